//! What the resolver decides with and what feeds it besides the watcher: the workloads file
//! (standalone), or the kube cache with the pod status writer and the API server probe
//! (Kubernetes).

use super::*;

/// The resolver's configuration, and in Kubernetes mode the link to the API server and the
/// observer of written updates (the pod status writer).
pub(super) struct ResolverSetup {
    pub(super) config: ResolverConfig,
    pub(super) kube: Option<KubeLink>,
    pub(super) observer: Option<Box<dyn Observer>>,
}

impl ResolverSetup {
    /// Configures the resolver for `mode`; in Kubernetes mode starts the kube cache (sending on
    /// `inputs`), the status writer (unless `--no-pod-status`) and the probe.
    pub(super) fn start(
        args: &RunArgs,
        mode: &Mode,
        inputs: &Inputs,
        readiness: &Readiness,
    ) -> anyhow::Result<ResolverSetup> {
        match mode {
            Mode::Standalone { workloads, .. } => {
                // Standalone pods are not on a node the resolver must match.
                let mut config = ResolverConfig::new("standalone");
                config.workloads = Some(workloads.clone());
                // There is no kube cache to wait for.
                readiness.set_cache_synced(true);
                readiness.set_warnings(workloads.warnings());
                Ok(ResolverSetup {
                    config,
                    kube: None,
                    observer: None,
                })
            }
            Mode::Kubernetes {
                config: kube_config,
                source,
                node,
            } => {
                let config = kube_resolver_config(args, node)?;
                let (kube, writer) =
                    KubeLink::start(args, kube_config, source, node, &config, inputs)?;
                Ok(ResolverSetup {
                    config,
                    kube: Some(kube),
                    observer: writer.map(|w| Box::new(w) as Box<dyn Observer>),
                })
            }
        }
    }
}

/// The resolver's configuration in Kubernetes mode, from the flags.
fn kube_resolver_config(args: &RunArgs, node: &str) -> anyhow::Result<ResolverConfig> {
    let mut config = ResolverConfig::new(node.to_string());
    if args.ztunnel_mode == ZtunnelMode::Inpod {
        config.capture = Capture::InPod {
            dns: args.dns_capture,
        };
    } else if args.dns_capture {
        bail!("--dns-capture needs --ztunnel-mode inpod (ztunnel's DNS proxy listens in the pod's namespace)");
    }
    config.system_namespace = args.system_namespace.clone();
    config.excluded_namespaces = args.exclude_namespaces.clone();
    config.exempt_cgroups = args.exempt_cgroups.clone();
    // The agent runs in the node's network namespace (the DaemonSet is hostNetwork): its own
    // stands in for PID 1's where that cannot be read.
    config.node_netns = std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    Ok(config)
}
