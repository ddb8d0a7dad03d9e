//! `zbridge doctor`: checks this host for what zbridge needs and says, for each missing
//! piece, what to do about it. Exits non-zero when a required check fails.
//!
//! Each check is a function of what it reads (file contents, paths, the result of a probe), so
//! a test can feed it a simulated host (a wrong mount, no capability, another namespace) and
//! read the words it prints. The probes that touch the live kernel (the proc connector's
//! subscribe, the verifier) and the API server are small functions beside them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use watcher::connector::{Connector, ConnectorConfig, ConnectorError};

/// Flags of `zbridge doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Leave out the Kubernetes checks (for dev VMs running `zbridge run --standalone`).
    #[arg(long)]
    pub standalone: bool,
    /// Where maps and links are pinned (must be on a bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/zbridge")]
    pub pin_dir: PathBuf,
    /// The kubeconfig to reach the API server with; without it, the in-cluster service
    /// account, else what kubectl would use ($KUBECONFIG, ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as the API server knows it (set NODE_NAME from the downward API:
    /// `fieldRef: {fieldPath: spec.nodeName}`). Never guessed from the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
}

/// The files the host checks read; tests point them at simulated hosts.
#[derive(Debug, Clone)]
pub struct HostFiles {
    pub osrelease: PathBuf,
    pub btf: PathBuf,
    pub mountinfo: PathBuf,
    pub status: PathBuf,
}

impl Default for HostFiles {
    fn default() -> Self {
        HostFiles {
            osrelease: "/proc/sys/kernel/osrelease".into(),
            btf: "/sys/kernel/btf/vmlinux".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            status: "/proc/self/status".into(),
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    /// Works, but something is degraded; not a reason to fail.
    Warn {
        what: String,
        fix: String,
    },
    Fail {
        what: String,
        fix: String,
    },
}

/// One named check and its outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
}

pub fn main(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut checks = host_checks(&HostFiles::default(), &args.pin_dir);
    checks.extend(kernel_checks());
    if !args.standalone {
        checks.extend(kube_checks(&KubeTarget {
            kubeconfig: args.kubeconfig,
            node_name: args.node_name,
        }));
    }
    let mut out = String::new();
    let failed = render(&checks, &mut out);
    print!("{out}");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Renders the checks for a person; returns whether any failed.
pub fn render(checks: &[Check], out: &mut String) -> bool {
    use std::fmt::Write;
    let mut failed = false;
    for check in checks {
        match &check.outcome {
            Outcome::Pass(detail) => {
                let _ = writeln!(out, "PASS  {:<16} {detail}", check.name);
            }
            Outcome::Warn { what, fix } => {
                let _ = writeln!(
                    out,
                    "WARN  {:<16} {what}\n      {:<16} fix: {fix}",
                    check.name, ""
                );
            }
            Outcome::Fail { what, fix } => {
                failed = true;
                let _ = writeln!(
                    out,
                    "FAIL  {:<16} {what}\n      {:<16} fix: {fix}",
                    check.name, ""
                );
            }
        }
    }
    out.push_str(if failed {
        "doctor: some required checks failed; zbridge will not work until they pass\n"
    } else {
        "doctor: this host has what zbridge needs\n"
    });
    failed
}

/// The checks that need no Kubernetes.
pub fn host_checks(files: &HostFiles, pin_dir: &Path) -> Vec<Check> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let mountinfo = read(&files.mountinfo);
    vec![
        Check {
            name: "kernel",
            outcome: match read(&files.osrelease) {
                Ok(text) => check_kernel(text.trim()),
                Err(e) => fail(
                    format!("cannot read the kernel version ({e})"),
                    "run on Linux",
                ),
            },
        },
        Check {
            name: "btf",
            outcome: check_btf(&files.btf),
        },
        Check {
            name: "cgroup2",
            outcome: match &mountinfo {
                Ok(text) => check_cgroup2(text),
                Err(e) => fail(e.clone(), "mount /proc"),
            },
        },
        Check {
            name: "bpffs",
            outcome: match &mountinfo {
                Ok(text) => match check_bpffs(text, pin_dir) {
                    // On a bpffs: the programmer's own check says whether the way to the pins
                    // is root's alone (the loader refuses it otherwise).
                    Outcome::Pass(msg) => match programmer::check_pin_dir(pin_dir) {
                        Ok(_) => Outcome::Pass(msg),
                        Err(e) => fail(e.to_string(), programmer::pins::MOUNT_HINT),
                    },
                    other => other,
                },
                Err(e) => fail(e.clone(), "mount /proc"),
            },
        },
        Check {
            name: "capabilities",
            outcome: match read(&files.status) {
                Ok(text) => check_capabilities(&text),
                Err(e) => fail(e, "mount /proc"),
            },
        },
    ]
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Outcome {
    Outcome::Fail {
        what: what.into(),
        fix: fix.into(),
    }
}

/// The oldest kernel with every hook and helper the programs use: cgroup getsockopt (5.3),
/// `bpf_get_current_ancestor_cgroup_id` and map batch operations (5.6), BPF links for cgroup
/// programs (5.7); 5.10 is the first long-term kernel with all of them.
const MIN_KERNEL: (u32, u32) = (5, 10);
/// The proc connector accepts an event mask from this version on (fewer wake-ups).
const MASK_KERNEL: (u32, u32) = (6, 6);

pub fn check_kernel(release: &str) -> Outcome {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    let (Some(major), Some(minor)) = (major, minor) else {
        return fail(
            format!("cannot parse the kernel release {release:?}"),
            "report this release string as a bug",
        );
    };
    if (major, minor) < MIN_KERNEL {
        return fail(
            format!(
                "kernel {release} is older than {}.{}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            "upgrade the node's kernel to 5.10 or later (cgroup getsockopt, ancestor cgroup ids, \
             map batch operations and BPF links are needed)",
        );
    }
    if (major, minor) < MASK_KERNEL {
        return Outcome::Warn {
            what: format!("kernel {release}: the proc connector cannot filter event types"),
            fix: "works as is; kernel 6.6 or later wakes the agent less often".into(),
        };
    }
    Outcome::Pass(format!("{release} (5.10 or later needed)"))
}

pub fn check_btf(path: &Path) -> Outcome {
    if path.exists() {
        Outcome::Pass(format!("{} present", path.display()))
    } else {
        fail(
            format!("{} is missing: the kernel exposes no BTF", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels are)",
        )
    }
}

pub fn check_cgroup2(mountinfo: &str) -> Outcome {
    match watcher::procfs::cgroup2_mount_in(mountinfo) {
        Some(mount) if mount == Path::new("/sys/fs/cgroup") => {
            Outcome::Pass("unified hierarchy at /sys/fs/cgroup".into())
        }
        Some(mount) => Outcome::Pass(format!(
            "hybrid hierarchy: cgroup2 at {} (pass --cgroup-root {} if it is not found)",
            mount.display(),
            mount.display()
        )),
        None => fail(
            "no cgroup2 filesystem is mounted",
            "mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) or boot with \
             systemd.unified_cgroup_hierarchy=1; in a pod, mount the host's /sys/fs/cgroup",
        ),
    }
}

/// The pin directory (or the nearest existing parent) must be on a bpffs mount.
pub fn check_bpffs(mountinfo: &str, pin_dir: &Path) -> Outcome {
    // The mount that holds the pin dir is the longest mount point that is its prefix.
    let holder = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let point = PathBuf::from(left.split_whitespace().nth(4)?);
            pin_dir
                .starts_with(&point)
                .then_some((point, fstype.to_string()))
        })
        .max_by_key(|(point, _)| point.components().count());
    match holder {
        Some((point, fstype)) if fstype == "bpf" => Outcome::Pass(format!(
            "{} is on the bpffs mounted at {}",
            pin_dir.display(),
            point.display()
        )),
        Some((point, fstype)) => fail(
            format!(
                "{} is on {} ({fstype}), not on a bpffs: pins there would not survive",
                pin_dir.display(),
                point.display()
            ),
            format!(
                "{} (in a pod: mount the host's /sys/fs/bpf), or choose another --pin-dir \
                 than {}",
                programmer::pins::MOUNT_HINT,
                pin_dir.display()
            ),
        ),
        None => fail(
            format!("no mount holds {}", pin_dir.display()),
            programmer::pins::MOUNT_HINT,
        ),
    }
}

/// Capabilities by bit number (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

pub fn check_capabilities(status: &str) -> Outcome {
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return fail("no CapEff line in /proc/self/status", "mount /proc");
    };
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    // CAP_SYS_ADMIN implies what CAP_BPF grants on kernels before 5.8, and still does.
    let missing: Vec<&str> = [
        ("CAP_BPF", has(CAP_BPF) || has(CAP_SYS_ADMIN)),
        ("CAP_NET_ADMIN", has(CAP_NET_ADMIN)),
        ("CAP_SYS_ADMIN", has(CAP_SYS_ADMIN)),
    ]
    .iter()
    .filter(|(_, ok)| !ok)
    .map(|(name, _)| *name)
    .collect();
    if missing.is_empty() {
        Outcome::Pass("CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN are effective".into())
    } else {
        fail(
            format!("missing {}", missing.join(", ")),
            "run as root, or add the capabilities to the container's securityContext \
             (BPF, NET_ADMIN, SYS_ADMIN)",
        )
    }
}

/// The checks that ask the live kernel: the proc connector's subscribe and the verifier.
pub fn kernel_checks() -> Vec<Check> {
    vec![
        Check {
            name: "proc connector",
            outcome: probe_proc_connector(),
        },
        Check {
            name: "bpf programs",
            outcome: check_bpf_object(programmer::loader::verify_object()),
        },
    ]
}

/// The fix for a proc connector refusal for lack of privilege.
const FIX_NET_ADMIN: &str = "run as root, or add NET_ADMIN to the container's securityContext \
                             capabilities (older kernels refuse the proc connector's subscribe \
                             without CAP_NET_ADMIN in the host user namespace, and every kernel \
                             refuses the large receive buffer without it)";

/// Subscribes to the proc connector, waits for the kernel's ACK, and unsubscribes: the
/// start-up self-check of `zbridge run`, which proves the host network and PID namespaces
/// and the privilege to listen.
pub fn probe_proc_connector() -> Outcome {
    let config = ConnectorConfig {
        // The plain subscribe is the one the kernel acknowledges.
        event_mask: false,
        ..ConnectorConfig::default()
    };
    match Connector::subscribe(&config) {
        Ok(mut connector) => {
            let granted = connector.recv_buffer_bytes();
            check_proc_connector(
                Ok(granted),
                config.recv_buffer_bytes,
                connector.unsubscribe(),
            )
        }
        Err(e) => check_proc_connector(Err(e), config.recv_buffer_bytes, Ok(())),
    }
}

/// The words for the subscribe's result (the receive buffer the kernel granted, as `SO_RCVBUF`
/// reads it), against the buffer the agent asks for, and for the unsubscribe after it.
pub fn check_proc_connector(
    subscribe: Result<usize, ConnectorError>,
    wanted_buffer: usize,
    unsubscribe: Result<(), ConnectorError>,
) -> Outcome {
    let error = match subscribe {
        Ok(granted) => {
            if let Err(e) = unsubscribe {
                return Outcome::Warn {
                    what: format!("subscribed, but the unsubscribe failed: {e}"),
                    fix: "the kernel keeps producing proc events until the socket closes; \
                          report this with the error above"
                        .into(),
                };
            }
            // SO_RCVBUF reads back twice what was set (the kernel's bookkeeping overhead);
            // SO_RCVBUFFORCE (CAP_NET_ADMIN) is what lifts the net.core.rmem_max cap.
            if granted < 2 * wanted_buffer {
                return Outcome::Warn {
                    what: format!(
                        "the kernel acknowledged the subscribe, but granted a receive buffer \
                         of {} KiB, not {} KiB: SO_RCVBUFFORCE was refused (no CAP_NET_ADMIN), \
                         so events may be lost under a burst of process starts",
                        (granted / 2) >> 10,
                        wanted_buffer >> 10
                    ),
                    fix: FIX_NET_ADMIN.into(),
                };
            }
            return Outcome::Pass(format!(
                "the kernel acknowledged the subscribe (host network and PID namespaces); \
                 receive buffer {} KiB; unsubscribed",
                (granted / 2) >> 10
            ));
        }
        Err(e) => e,
    };
    let fix = match &error {
        ConnectorError::Bind(_) | ConnectorError::NotPermitted => FIX_NET_ADMIN.to_string(),
        ConnectorError::NotHostNetns => {
            "run in the host network namespace: `hostNetwork: true` in the DaemonSet's pod spec"
                .to_string()
        }
        ConnectorError::NoAck(_) => "run in the host PID namespace (and the host user \
                                     namespace): `hostPID: true` in the DaemonSet's pod spec"
            .to_string(),
        ConnectorError::Socket(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {
            "use a kernel built with CONFIG_CONNECTOR=y and CONFIG_PROC_EVENTS=y".to_string()
        }
        ConnectorError::SocketOption { error: e, .. } if e.raw_os_error() == Some(libc::EPERM) => {
            FIX_NET_ADMIN.to_string()
        }
        _ => "report this as a bug, with the error above and the kernel version".to_string(),
    };
    Outcome::Fail {
        what: error.to_string(),
        fix,
    }
}

/// The words for loading the embedded object's programs into the verifier (nothing attached,
/// nothing pinned).
pub fn check_bpf_object(
    result: Result<Vec<programmer::loader::VerifiedProgram>, programmer::ProgramError>,
) -> Outcome {
    use programmer::ProgramError;
    let error = match result {
        Ok(programs) => {
            // How close each came to the verifier's limit: a program near it is the first a
            // kernel with weaker pruning refuses.
            let names: Vec<String> = programs
                .iter()
                .map(|p| match p.verified_insns {
                    Some(n) => format!("{} ({n} instructions checked)", p.name),
                    None => p.name.to_string(),
                })
                .collect();
            return Outcome::Pass(format!(
                "the verifier accepted {} (loaded, not attached; its limit is {} per program)",
                names.join(", "),
                programmer::loader::VERIFIER_INSN_LIMIT
            ));
        }
        Err(e) => e,
    };
    let text = error.to_string();
    let fix = if text.contains("Operation not permitted") {
        "run as root, or add BPF, NET_ADMIN and SYS_ADMIN to the container's securityContext \
         capabilities (loading cgroup programs needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)"
    } else if matches!(error, ProgramError::Program { .. }) {
        "the kernel's verifier refused a program (its last words are above): this kernel lacks \
         a helper or hook zbridge needs (5.10 or later), or it is a bug: report it with the \
         kernel version and the words above"
    } else {
        "the BPF object embedded in this zbridge binary is unusable: rebuild zbridge (clang -g \
         is required: the loader needs the object's BTF)"
    };
    Outcome::Fail {
        what: text,
        fix: fix.into(),
    }
}

/// Where the Kubernetes checks look.
#[derive(Debug, Clone, Default)]
pub struct KubeTarget {
    /// `--kubeconfig`; `None`: in-cluster, else inferred.
    pub kubeconfig: Option<PathBuf>,
    /// `--node-name` / `NODE_NAME`.
    pub node_name: Option<String>,
}

/// The rules of deploy/clusterrole.yaml, as the fixes quote them.
const RULE_PODS_NAMESPACES: &str =
    r#"{apiGroups: [""], resources: ["pods", "namespaces"], verbs: ["get", "list", "watch"]}"#;
const RULE_POD_STATUS: &str = r#"{apiGroups: [""], resources: ["pods/status"], verbs: ["patch"]}"#;

/// One RBAC check: the verbs on a resource the agent needs, and the rule that grants them.
struct AccessNeed {
    name: &'static str,
    resource: &'static str,
    subresource: &'static str,
    verbs: &'static [&'static str],
    /// Where the agent needs it, in words.
    scope: &'static str,
    why: &'static str,
    rule: &'static str,
}

const ACCESS_NEEDS: [AccessNeed; 3] = [
    AccessNeed {
        name: "rbac pods",
        resource: "pods",
        subresource: "",
        verbs: &["list", "watch"],
        scope: "in all namespaces",
        // RBAC has no rule per field selector: list/watch in all namespaces is what a
        // `spec.nodeName=` list needs.
        why: "the kube cache lists and watches this node's pods across all namespaces (its \
              spec.nodeName field selector does not narrow what RBAC asks for)",
        rule: RULE_PODS_NAMESPACES,
    },
    AccessNeed {
        name: "rbac namespaces",
        resource: "namespaces",
        subresource: "",
        verbs: &["list", "watch"],
        scope: "cluster-wide",
        why: "the kube cache watches namespaces for their istio.io/dataplane-mode label",
        rule: RULE_PODS_NAMESPACES,
    },
    AccessNeed {
        name: "rbac pods/status",
        resource: "pods",
        subresource: "status",
        verbs: &["patch"],
        scope: "in all namespaces",
        why: "zbridge marks the pods it captures with ambient.istio.io/redirection=enabled in \
              their status, which istiod reads",
        rule: RULE_POD_STATUS,
    },
];

/// The Kubernetes checks: the configuration, the node name, the API server, and RBAC (by
/// SelfSubjectAccessReview, which answers for whoever the configuration authenticates as).
pub fn kube_checks(target: &KubeTarget) -> Vec<Check> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return vec![Check {
                name: "kubernetes",
                outcome: fail(
                    format!("cannot start an async runtime for the API client: {e}"),
                    "report this as a bug, with the error above",
                ),
            }]
        }
    };
    runtime.block_on(kube_checks_async(target))
}

async fn kube_checks_async(target: &KubeTarget) -> Vec<Check> {
    let mut checks = vec![Check {
        name: "node name",
        outcome: check_node_name(target.node_name.as_deref()),
    }];
    let config = match load_kube_config(target.kubeconfig.as_deref()).await {
        Ok((config, source)) => {
            checks.push(Check {
                name: "kube config",
                outcome: Outcome::Pass(format!(
                    "{source}: API server {}",
                    config.cluster_url.to_string().trim_end_matches('/')
                )),
            });
            config
        }
        Err(outcome) => {
            checks.push(Check {
                name: "kube config",
                outcome,
            });
            checks.push(not_checked(
                "api server",
                "the API server and RBAC",
                "kube config",
            ));
            return checks;
        }
    };
    let url = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let client = match kube::Client::try_from(config) {
        Ok(client) => client,
        Err(e) => {
            checks.push(Check {
                name: "api server",
                outcome: fail(
                    format!("cannot make a client for {url}: {e}"),
                    "check the server URL and the credentials of the configuration",
                ),
            });
            checks.push(not_checked("rbac", "RBAC", "api server"));
            return checks;
        }
    };
    let reachable = check_api_server(&client, &url).await;
    let ok = !matches!(reachable, Outcome::Fail { .. });
    checks.push(Check {
        name: "api server",
        outcome: reachable,
    });
    if !ok {
        checks.push(not_checked("rbac", "RBAC", "api server"));
        return checks;
    }
    for need in &ACCESS_NEEDS {
        checks.push(Check {
            name: need.name,
            outcome: check_access(&client, need).await,
        });
    }
    checks
}

/// A check that could not run because an earlier one failed.
fn not_checked(name: &'static str, what: &str, because: &str) -> Check {
    Check {
        name,
        outcome: fail(
            format!("{what} not checked: the {because} check failed"),
            format!("fix the {because} check first"),
        ),
    }
}

pub fn check_node_name(node_name: Option<&str>) -> Outcome {
    match node_name.map(str::trim) {
        Some(name) if !name.is_empty() => Outcome::Pass(format!(
            "{name} (pods are watched with fieldSelector spec.nodeName={name})"
        )),
        _ => fail(
            "no node name: --node-name and NODE_NAME are unset (the hostname is not used: it \
             may differ from the node's name, and a wrong name watches no pods at all)",
            "set NODE_NAME from the downward API in the DaemonSet: env: [{name: NODE_NAME, \
             valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]; or pass --node-name",
        ),
    }
}

/// The configuration: `--kubeconfig`, else the in-cluster service account, else inferred.
/// Returns it with words saying where it came from.
async fn load_kube_config(kubeconfig: Option<&Path>) -> Result<(kube::Config, String), Outcome> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let (mut config, source) = match kubeconfig {
        Some(path) => {
            let loaded = match Kubeconfig::read_from(path) {
                Ok(file) => {
                    kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await
                }
                Err(e) => Err(e),
            };
            match loaded {
                Ok(config) => (config, format!("kubeconfig {}", path.display())),
                Err(e) => {
                    return Err(fail(
                        format!("cannot use the kubeconfig {}: {e}", path.display()),
                        format!(
                            "check the file (`kubectl --kubeconfig {} cluster-info` should work)",
                            path.display()
                        ),
                    ))
                }
            }
        }
        None => match kube::Config::incluster() {
            Ok(config) => (config, "in-cluster service account".to_string()),
            // infer() tries the kubeconfig, then in-cluster again: its error names both.
            Err(_) => match kube::Config::infer().await {
                Ok(config) => (
                    config,
                    "inferred ($KUBECONFIG or ~/.kube/config)".to_string(),
                ),
                Err(inferred) => {
                    return Err(fail(
                        format!("no Kubernetes configuration ({inferred})"),
                        "run in a pod with a service account token mounted, or pass \
                         --kubeconfig PATH; on a host without Kubernetes run \
                         `zbridge doctor --standalone`",
                    ))
                }
            },
        },
    };
    // A doctor that hangs on a black-holed address answers nothing.
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(10));
    Ok((config, source))
}

async fn check_api_server(client: &kube::Client, url: &str) -> Outcome {
    match client.apiserver_version().await {
        Ok(info) => Outcome::Pass(format!(
            "GET {url}/version: Kubernetes {}",
            info.git_version
        )),
        Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => fail(
            format!(
                "GET {url}/version answered {} {}: the credentials were refused",
                status.code, status.message
            ),
            "check the service account token (automountServiceAccountToken) or the kubeconfig's \
             user",
        ),
        Err(e) => fail(
            format!("GET {url}/version failed: {e}"),
            format!(
                "check that {url} is reachable from this node (a hostNetwork pod uses the node's \
                 routes, DNS and firewall) and that the configuration names the right server"
            ),
        ),
    }
}

/// Asks the API server, verb by verb, whether this identity may do what `need` says.
async fn check_access(client: &kube::Client, need: &AccessNeed) -> Outcome {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let reviews: kube::Api<SelfSubjectAccessReview> = kube::Api::all(client.clone());
    let resource = match need.subresource {
        "" => need.resource.to_string(),
        sub => format!("{}/{sub}", need.resource),
    };
    let mut denied = Vec::new();
    let mut reasons = Vec::new();
    for verb in need.verbs {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(String::new()),
                    resource: Some(need.resource.to_string()),
                    subresource: (!need.subresource.is_empty())
                        .then(|| need.subresource.to_string()),
                    verb: Some(verb.to_string()),
                    // All namespaces.
                    namespace: None,
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        match reviews
            .create(&kube::api::PostParams::default(), &review)
            .await
        {
            Ok(answer) => {
                let status = answer.status.unwrap_or_default();
                if !status.allowed {
                    denied.push(*verb);
                    // A real server often gives no reason for a plain "no".
                    if let Some(reason) = status.reason.filter(|r| !r.is_empty()) {
                        reasons.push(reason);
                    }
                }
            }
            Err(e) => {
                return fail(
                    format!("cannot ask whether {verb} {resource} is allowed (SelfSubjectAccessReview): {e}"),
                    "check that the API server serves authorization.k8s.io/v1 and that the \
                     identity is authenticated (every authenticated identity may create \
                     SelfSubjectAccessReviews)",
                )
            }
        }
    }
    if denied.is_empty() {
        return Outcome::Pass(format!(
            "{} {resource} {} allowed",
            need.verbs.join(", "),
            need.scope
        ));
    }
    let reasons = match reasons.is_empty() {
        true => String::new(),
        false => format!(" ({})", reasons.join("; ")),
    };
    fail(
        format!(
            "{} {resource} {} is not allowed{reasons}; needed because {}",
            denied.join(", "),
            need.scope,
            need.why
        ),
        format!(
            "add this rule to the ClusterRole bound to zbridge's identity (deploy/clusterrole.yaml \
             has it): {}",
            need.rule
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "30 24 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
                          31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                          40 24 0:40 / /sys/fs/bpf rw - bpf bpf rw\n\
                          20 1 0:20 / / rw - ext4 /dev/vda rw\n";

    fn is_fail(o: &Outcome, words: &str) -> bool {
        matches!(o, Outcome::Fail { what, fix } if what.contains(words) || fix.contains(words))
    }

    #[test]
    fn kernel_versions() {
        assert!(matches!(check_kernel("6.18.44-fc"), Outcome::Pass(_)));
        assert!(matches!(
            check_kernel("6.1.0-18-amd64"),
            Outcome::Warn { .. }
        ));
        assert!(is_fail(
            &check_kernel("5.4.0-1"),
            "upgrade the node's kernel"
        ));
        assert!(is_fail(&check_kernel("garbage"), "cannot parse"));
    }

    #[test]
    fn cgroup2_found_or_explained() {
        assert!(
            matches!(check_cgroup2(HYBRID), Outcome::Pass(d) if d.contains("hybrid") && d.contains("/sys/fs/cgroup/unified"))
        );
        let v1_only = "32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert!(is_fail(&check_cgroup2(v1_only), "no cgroup2 filesystem"));
    }

    #[test]
    fn bpffs_must_hold_the_pin_dir() {
        assert!(matches!(
            check_bpffs(HYBRID, Path::new("/sys/fs/bpf/zbridge")),
            Outcome::Pass(_)
        ));
        let outcome = check_bpffs(HYBRID, Path::new("/tmp/pins"));
        assert!(is_fail(&outcome, "not on a bpffs"), "{outcome:?}");
        assert!(is_fail(&outcome, programmer::pins::MOUNT_HINT));
    }

    #[test]
    fn capabilities_named_when_missing() {
        let root = "Name:\tzbridge\nCapEff:\t000001ffffffffff\n";
        assert!(matches!(check_capabilities(root), Outcome::Pass(_)));
        let none = "CapEff:\t0000000000000000\n";
        let outcome = check_capabilities(none);
        assert!(
            is_fail(&outcome, "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"),
            "{outcome:?}"
        );
        // NET_ADMIN only: BPF and SYS_ADMIN are named.
        let net_admin = format!("CapEff:\t{:016x}\n", 1u64 << CAP_NET_ADMIN);
        let outcome = check_capabilities(&net_admin);
        assert!(
            is_fail(&outcome, "missing CAP_BPF, CAP_SYS_ADMIN"),
            "{outcome:?}"
        );
    }

    #[test]
    fn simulated_host_renders_actionable_words_and_fails() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let files = HostFiles {
            osrelease: write("osrelease", "6.18.0\n"),
            btf: dir.path().join("no-btf"),
            mountinfo: write("mountinfo", "20 1 0:20 / / rw - ext4 /dev/vda rw\n"),
            status: write("status", "CapEff:\t0000000000000000\n"),
        };
        let checks = host_checks(&files, Path::new("/sys/fs/bpf/zbridge"));
        let mut out = String::new();
        assert!(render(&checks, &mut out));
        assert!(out.contains("PASS  kernel"), "{out}");
        assert!(
            out.contains("FAIL  btf") && out.contains("CONFIG_DEBUG_INFO_BTF"),
            "{out}"
        );
        assert!(out.contains("FAIL  cgroup2"), "{out}");
        assert!(
            out.contains("FAIL  bpffs") && out.contains("not on a bpffs"),
            "{out}"
        );
        assert!(
            out.contains("FAIL  capabilities") && out.contains("missing CAP_BPF"),
            "{out}"
        );
        assert!(out.contains("some required checks failed"), "{out}");
    }

    #[test]
    fn this_host_passes_as_root() {
        if !testkit::require_root("doctor_this_host_passes_as_root") {
            return;
        }
        // This machine: hybrid cgroup2, BTF, root, host namespaces. /sys/fs/bpf is not mounted
        // here by default, so the pin dir is on a private bpffs of the test's own.
        let bpffs = testkit::BpfFs::new("doctor-host").expect("mount a private bpffs");
        let pin_dir = bpffs.pin_dir();
        let mut checks = host_checks(&HostFiles::default(), &pin_dir);
        checks.extend(kernel_checks());
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "kernel",
                "btf",
                "cgroup2",
                "bpffs",
                "capabilities",
                "proc connector",
                "bpf programs"
            ]
        );
        for check in &checks {
            assert!(
                matches!(check.outcome, Outcome::Pass(_) | Outcome::Warn { .. }),
                "{}: {:?}",
                check.name,
                check.outcome
            );
        }
        let bpffs_outcome = &checks[3].outcome;
        assert!(
            matches!(bpffs_outcome, Outcome::Pass(d) if d.contains(&*bpffs.path().to_string_lossy())),
            "{bpffs_outcome:?}"
        );
        // Every program of the object went through the verifier.
        let Outcome::Pass(verified) = &checks[6].outcome else {
            panic!("{:?}", checks[6].outcome)
        };
        for (program, _, _) in programmer::object::PROGRAMS {
            assert!(
                verified.contains(program),
                "{program} missing in {verified}"
            );
        }
        // Nothing was pinned: the check only loads.
        assert!(!pin_dir.exists(), "{} was created", pin_dir.display());
    }

    fn fix_of(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::Pass(_) => "",
            Outcome::Warn { fix, .. } | Outcome::Fail { fix, .. } => fix,
        }
    }

    #[test]
    fn proc_connector_errors_say_what_to_do() {
        let ok = check_proc_connector(Ok(16 << 20), 8 << 20, Ok(()));
        assert!(
            matches!(&ok, Outcome::Pass(d) if d.contains("acknowledged") && d.contains("8192 KiB")),
            "{ok:?}"
        );
        let cases: [(ConnectorError, &str); 5] = [
            (ConnectorError::NotPermitted, "add NET_ADMIN"),
            (
                ConnectorError::Bind(std::io::Error::from_raw_os_error(libc::EPERM)),
                "add NET_ADMIN",
            ),
            (ConnectorError::NotHostNetns, "hostNetwork: true"),
            (
                ConnectorError::NoAck(Duration::from_secs(2)),
                "hostPID: true",
            ),
            (
                ConnectorError::Socket(std::io::Error::from_raw_os_error(libc::EPROTONOSUPPORT)),
                "CONFIG_PROC_EVENTS=y",
            ),
        ];
        for (error, words) in cases {
            let text = error.to_string();
            let outcome = check_proc_connector(Err(error), 8 << 20, Ok(()));
            assert!(is_fail(&outcome, words), "{text}: {outcome:?}");
            // The kernel's own reason is kept.
            assert!(
                matches!(&outcome, Outcome::Fail { what, .. } if *what == text),
                "{outcome:?}"
            );
        }
        // A capped buffer (no SO_RCVBUFFORCE) works, with a warning naming the capability.
        let capped = check_proc_connector(Ok(8 << 20), 8 << 20, Ok(()));
        assert!(
            matches!(&capped, Outcome::Warn { what, fix } if what.contains("4096 KiB, not 8192 KiB") && fix.contains("NET_ADMIN")),
            "{capped:?}"
        );
        let stuck = check_proc_connector(
            Ok(16 << 20),
            8 << 20,
            Err(ConnectorError::Send {
                what: "unsubscribe",
                error: std::io::Error::from_raw_os_error(libc::ENOBUFS),
            }),
        );
        assert!(
            matches!(&stuck, Outcome::Warn { what, .. } if what.contains("unsubscribe failed")),
            "{stuck:?}"
        );
    }

    #[test]
    fn proc_connector_outside_the_host_network_namespace_fails() {
        if !testkit::require_root("doctor_proc_connector_outside_the_host_network_namespace") {
            return;
        }
        let netns = testkit::NetNs::new("doctor").expect("create a netns");
        let outcome = netns
            .in_thread(probe_proc_connector)
            .expect("run the probe in the netns");
        assert!(is_fail(&outcome, "ECONNREFUSED"), "{outcome:?}");
        assert!(
            fix_of(&outcome).contains("hostNetwork: true"),
            "{outcome:?}"
        );
    }

    #[test]
    fn bpf_object_failures_say_what_to_do() {
        let broken = check_bpf_object(programmer::loader::verify_object_bytes(
            b"not an ELF object",
        ));
        assert!(is_fail(&broken, "rebuild zbridge"), "{broken:?}");
        let refused = check_bpf_object(Err(programmer::ProgramError::Program {
            program: "connect4".into(),
            detail: "verifier rejected: Invalid argument (os error 22):\nR1 invalid mem access"
                .into(),
        }));
        assert!(
            is_fail(&refused, "verifier refused") && is_fail(&refused, "R1 invalid mem access"),
            "{refused:?}"
        );
        let eperm = check_bpf_object(Err(programmer::ProgramError::Object(
            "load: map error: failed to create map `x`: Operation not permitted (os error 1)"
                .into(),
        )));
        assert!(
            is_fail(&eperm, "add BPF, NET_ADMIN and SYS_ADMIN"),
            "{eperm:?}"
        );
    }

    /// A kubeconfig file for `yaml`, in a temp dir that lives as long as the returned guard.
    fn kubeconfig(yaml: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, yaml).unwrap();
        (dir, path)
    }

    fn outcome_of<'c>(checks: &'c [Check], name: &str) -> &'c Outcome {
        &checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
            .outcome
    }

    /// The access reviews the server received: (verb, resource, subresource, namespace).
    fn reviews(server: &testkit::FakeApiServer) -> Vec<(String, String, String, String)> {
        server
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/selfsubjectaccessreviews"))
            .map(|r| {
                let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                let attr = &body["spec"]["resourceAttributes"];
                let field = |k: &str| attr[k].as_str().unwrap_or_default().to_string();
                (
                    field("verb"),
                    field("resource"),
                    field("subresource"),
                    field("namespace"),
                )
            })
            .collect()
    }

    #[test]
    fn kube_checks_pass_against_a_server_that_allows_everything() {
        let server = testkit::FakeApiServer::start().unwrap();
        let (_dir, path) = kubeconfig(&server.kubeconfig_yaml());
        let checks = kube_checks(&KubeTarget {
            kubeconfig: Some(path.clone()),
            node_name: Some("node-a".into()),
        });
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "node name",
                "kube config",
                "api server",
                "rbac pods",
                "rbac namespaces",
                "rbac pods/status"
            ]
        );
        for check in &checks {
            assert!(matches!(check.outcome, Outcome::Pass(_)), "{check:?}");
        }
        assert!(
            matches!(outcome_of(&checks, "api server"), Outcome::Pass(d) if d.contains("/version: Kubernetes v1.33.0")),
            "{checks:?}"
        );
        assert!(
            matches!(outcome_of(&checks, "kube config"), Outcome::Pass(d) if d.contains(&*path.to_string_lossy()) && d.contains(&server.url())),
            "{checks:?}"
        );
        let s = |x: &str| x.to_string();
        assert_eq!(
            reviews(&server),
            vec![
                (s("list"), s("pods"), s(""), s("")),
                (s("watch"), s("pods"), s(""), s("")),
                (s("list"), s("namespaces"), s(""), s("")),
                (s("watch"), s("namespaces"), s(""), s("")),
                (s("patch"), s("pods"), s("status"), s("")),
            ]
        );
        let mut out = String::new();
        assert!(!render(&checks, &mut out), "{out}");
    }

    #[test]
    fn kube_checks_name_a_denied_verb_and_its_rule() {
        let server = testkit::FakeApiServer::start().unwrap();
        server.deny_access("patch", "pods/status");
        server.deny_access("watch", "namespaces");
        let (_dir, path) = kubeconfig(&server.kubeconfig_yaml());
        let checks = kube_checks(&KubeTarget {
            kubeconfig: Some(path),
            node_name: Some("node-a".into()),
        });
        assert!(matches!(outcome_of(&checks, "rbac pods"), Outcome::Pass(_)));
        let status = outcome_of(&checks, "rbac pods/status");
        assert!(
            is_fail(status, "patch pods/status in all namespaces is not allowed"),
            "{status:?}"
        );
        assert!(is_fail(status, "pods/status"), "{status:?}");
        assert!(
            fix_of(status).contains(r#"resources: ["pods/status"], verbs: ["patch"]"#),
            "{status:?}"
        );
        let namespaces = outcome_of(&checks, "rbac namespaces");
        assert!(
            matches!(namespaces, Outcome::Fail { what, fix } if what.starts_with("watch namespaces cluster-wide is not allowed") && fix.contains(r#"resources: ["pods", "namespaces"]"#)),
            "{namespaces:?}"
        );
        let mut out = String::new();
        assert!(render(&checks, &mut out));
        assert!(out.contains("FAIL  rbac pods/status"), "{out}");
    }

    #[test]
    fn kube_checks_say_what_was_tried_when_the_server_is_unreachable() {
        // A port that was just free: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (_dir, path) = kubeconfig(&testkit::apiserver::kubeconfig_yaml_for(addr));
        let checks = kube_checks(&KubeTarget {
            kubeconfig: Some(path),
            node_name: Some("node-a".into()),
        });
        let api = outcome_of(&checks, "api server");
        assert!(
            is_fail(api, &format!("GET http://{addr}/version failed")),
            "{api:?}"
        );
        assert!(fix_of(api).contains("reachable from this node"), "{api:?}");
        // RBAC is not asked of a server that does not answer, and says so.
        assert!(is_fail(outcome_of(&checks, "rbac"), "not checked"));
        assert_eq!(checks.len(), 4, "{checks:?}");
    }

    #[test]
    fn kube_checks_report_refused_credentials() {
        let server = testkit::FakeApiServer::start().unwrap();
        server.set_forbidden(true);
        let (_dir, path) = kubeconfig(&server.kubeconfig_yaml());
        let checks = kube_checks(&KubeTarget {
            kubeconfig: Some(path),
            node_name: Some("node-a".into()),
        });
        let api = outcome_of(&checks, "api server");
        assert!(is_fail(api, "credentials were refused"), "{api:?}");
    }

    #[test]
    fn node_name_is_required_and_never_guessed() {
        let server = testkit::FakeApiServer::start().unwrap();
        let (_dir, path) = kubeconfig(&server.kubeconfig_yaml());
        for missing in [None, Some(""), Some("  ")] {
            let checks = kube_checks(&KubeTarget {
                kubeconfig: Some(path.clone()),
                node_name: missing.map(str::to_string),
            });
            let node = outcome_of(&checks, "node name");
            assert!(is_fail(node, "NODE_NAME"), "{node:?}");
            assert!(
                fix_of(node).contains("fieldPath: spec.nodeName"),
                "{node:?}"
            );
        }
        assert!(matches!(
            check_node_name(Some("node-a")),
            Outcome::Pass(d) if d.contains("spec.nodeName=node-a")
        ));
    }

    #[test]
    fn unreadable_kubeconfig_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        let checks = kube_checks(&KubeTarget {
            kubeconfig: Some(path.clone()),
            node_name: Some("node-a".into()),
        });
        let config = outcome_of(&checks, "kube config");
        assert!(
            is_fail(
                config,
                &format!("cannot use the kubeconfig {}", path.display())
            ),
            "{config:?}"
        );
        assert!(is_fail(outcome_of(&checks, "api server"), "not checked"));
    }
}
