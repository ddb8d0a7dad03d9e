//! In-pod mode's start: the kernel's per-pod state, the ZDS server ztunnel connects to, and
//! what standalone mode watches for its subtrees.

use super::*;

/// In-pod capture's stage when ztunnel listens in the pods: the flag says so in Kubernetes
/// mode (as `config.capture`), the workloads file in standalone mode. `None` otherwise.
pub(super) fn inpod_stage(
    args: &RunArgs,
    mode: &Mode,
    config: &ResolverConfig,
    cgroup_root: &Path,
) -> anyhow::Result<Option<InPodStage>> {
    // Where ztunnel listens: the flag (Kubernetes) or the workloads file (standalone).
    let inpod_socket = match mode {
        Mode::Standalone { workloads, .. } => match workloads.ztunnel.as_ref().map(|z| &z.mode) {
            Some(ZtunnelModeInFile::InPod { zds }) => Some((zds.clone(), workloads.dns_capture)),
            _ => None,
        },
        Mode::Kubernetes { .. } => match config.capture {
            Capture::InPod { dns } => Some((args.zds_socket.clone(), dns)),
            Capture::Node => None,
        },
    };
    let Some((socket, dns)) = inpod_socket else {
        return Ok(None);
    };
    let stage = start_inpod(args, &socket, cgroup_root, dns)
        .context("starting in-pod capture (ztunnel in-pod, over ZDS)")?;
    Ok(Some(stage))
}

/// Opens the kernel's in-pod state (with the pods a previous run enrolled) and starts the ZDS
/// server ztunnel connects to.
fn start_inpod(
    args: &RunArgs,
    socket: &Path,
    cgroup_root: &Path,
    dns: bool,
) -> anyhow::Result<InPodStage> {
    let node_addrs = host_addresses();
    let kernel = KernelInPod::open(&args.pin_dir, &node_addrs)?;
    let previous = kernel.pods();
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| {
            format!("creating the directory of the ZDS socket {}", dir.display())
        })?;
    }
    let roots = zds::Roots {
        proc: PathBuf::from("/proc"),
        cgroup: cgroup_root.to_path_buf(),
    };
    let mut zds_config = zds::ZdsConfig::new(socket, roots);
    zds_config.status_file = Some(args.zds_status_file.clone());
    // ztunnel reconciles to the snapshot: not before this agent has decided its pods.
    zds_config.hold_snapshot_until_synced = true;
    let zds = zds::Server::start(zds_config)
        .with_context(|| format!("serving ZDS on {}", socket.display()))?;
    // As in node mode without a ztunnel: fail closed unless asked to fail open.
    let until_served = if args.fail_open {
        UntilServed::Uncaptured
    } else {
        UntilServed::Refused
    };
    log::info!(
        "in-pod capture: ZDS on {}, DNS capture {}, node addresses {:?} reach pods directly, {} pods enrolled by the previous run; until ztunnel serves a pod, its connects {}",
        socket.display(),
        if dns { "on" } else { "off" },
        node_addrs,
        previous.len(),
        match until_served {
            UntilServed::Refused => "are refused",
            UntilServed::Uncaptured => "go out uncaptured (--fail-open)",
        }
    );
    Ok(InPodStage {
        zds,
        kernel: Box::new(kernel),
        previous,
        until_served,
        enrol_retry: Default::default(),
    })
}

/// Standalone: the file's subtrees are enrolled when their directories are made and lose
/// their entries when removed, not only when a process runs in them. `None` in Kubernetes mode.
pub(super) fn watch_configured_dirs(
    mode: &Mode,
    cgroup_root: &Path,
    inputs: &Inputs,
) -> anyhow::Result<Option<DirWatch>> {
    let Mode::Standalone { workloads, .. } = mode else {
        return Ok(None);
    };
    let tx = inputs.sender();
    let watch = DirWatch::start(configured_dirs(cgroup_root, workloads), move || {
        let _ = tx.send(resolver::Input::ConfiguredCgroupsChanged);
    })
    .context("watching the workloads file's cgroup directories (inotify)")?;
    Ok(Some(watch))
}

/// The directories of the workloads file's subtrees (ztunnel, workloads, exempt).
pub(super) fn configured_dirs(cgroup_root: &Path, workloads: &Workloads) -> Vec<PathBuf> {
    let relative = |p: &str| cgroup_root.join(p.trim_start_matches('/'));
    workloads
        .ztunnel
        .iter()
        .map(|z| relative(&z.cgroup))
        .chain(workloads.workloads.iter().map(|w| relative(&w.cgroup)))
        .chain(workloads.exempt.iter().map(|e| relative(e)))
        .collect()
}

/// This (the host's) network namespace's own addresses: traffic from them to a pod is
/// host-originated (kubelet probes) and, as with Istio, bypasses ztunnel.
pub(super) fn host_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/self/net/fib_trie") {
        watcher::procfs::fib_trie_local_addresses(&text, &mut out);
    }
    if let Ok(text) = std::fs::read_to_string("/proc/self/net/if_inet6") {
        watcher::procfs::if_inet6_addresses(&text, &mut out);
    }
    out
}
