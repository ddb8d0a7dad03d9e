//! `zbridge doctor`: checks this host for what zbridge needs and says, for each missing
//! piece, what to do about it. Exits non-zero when a required check fails.
//!
//! Each check is a function of what it reads (file contents, paths, the result of a probe), so
//! a test can feed it a simulated host (a wrong mount, no capability, another namespace) and
//! read the words it prints. The probes that touch the live kernel (the proc connector's
//! subscribe, the verifier) and the API server are small functions beside them.
//!
//! One file per concern: `host` (kernel, BTF, cgroup2, bpffs, capabilities), `connector` (the
//! proc connector probe), `object` (the BPF object through the verifier), `kube` and `rbac`
//! (API server access), `inpod` (another node agent: the ZDS socket's holder, istio-cni's
//! chains in pod namespaces).

use std::path::PathBuf;
use std::process::ExitCode;

mod connector;
mod host;
pub mod inpod;
mod kube;
mod object;
mod rbac;

pub use connector::{check_proc_connector, probe_proc_connector};
pub use host::{
    check_bpffs, check_btf, check_capabilities, check_cgroup2, check_kernel, host_checks, HostFiles,
};
pub use inpod::{inpod_checks, InpodTarget};
pub use kube::{check_node_name, kube_checks, KubeTarget};
pub use object::check_bpf_object;

/// Where ztunnel looks for its node agent's ZDS socket; `zbridge run --zds-socket` and
/// `zbridge doctor --zds-socket` default to it.
pub const DEFAULT_ZDS_SOCKET: &str = zds::DEFAULT_SOCKET;

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
    /// The ZDS socket ztunnel connects to (`zbridge run --zds-socket`): doctor names the
    /// process serving it, which must be zbridge and not istio-cni's node agent.
    #[arg(
        long,
        value_name = "PATH",
        default_value = DEFAULT_ZDS_SOCKET,
        conflicts_with = "standalone"
    )]
    pub zds_socket: PathBuf,
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
        // In-pod capture is Kubernetes mode's: `run --standalone` serves no ZDS socket.
        checks.extend(inpod_checks(&InpodTarget::new(args.zds_socket)));
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
fn fail(what: impl Into<String>, fix: impl Into<String>) -> Outcome {
    Outcome::Fail {
        what: what.into(),
        fix: fix.into(),
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

#[cfg(test)]
mod test_util {
    use super::{Check, Outcome};

    pub fn is_fail(o: &Outcome, words: &str) -> bool {
        matches!(o, Outcome::Fail { what, fix } if what.contains(words) || fix.contains(words))
    }

    pub fn fix_of(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::Pass(_) => "",
            Outcome::Warn { fix, .. } | Outcome::Fail { fix, .. } => fix,
        }
    }

    pub fn outcome_of<'c>(checks: &'c [Check], name: &str) -> &'c Outcome {
        &checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
            .outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
