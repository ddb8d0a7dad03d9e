//! Kubernetes mode's link: the kube cache, the pod status writer and the probe
//! (`kubecache::probe`) that tells when a lost API server is back, started together; the
//! cache's health turned into readiness.

use super::*;

/// How often the kube cache's health is turned into readiness.
pub(super) const KUBE_HEALTH_EVERY: Duration = Duration::from_secs(1);

/// The agent's link to Kubernetes: the kube cache and the probe that tells when a lost API
/// server is back.
pub(super) struct KubeLink {
    pub(super) cache: KubeCache,
    pub(super) probe: ApiProbe,
    /// Whether the API server was last seen lost (to log changes once).
    pub(super) lost: bool,
}

impl KubeLink {
    /// Starts the kube cache (feeding `inputs`), the pod status writer unless
    /// `--no-pod-status` (returned: it observes written updates), and the API server probe.
    pub(super) fn start(
        args: &RunArgs,
        kube_config: &kube::Config,
        config_source: &str,
        node: &str,
        config: &ResolverConfig,
        inputs: &Inputs,
    ) -> anyhow::Result<(KubeLink, Option<StatusWriter>)> {
        let url = kube_config.cluster_url.to_string();
        let cache =
            KubeCache::start(kube_config.clone(), node, inputs.sender()).with_context(|| {
                format!("starting the kube cache ({config_source}, API server {url})")
            })?;
        let writer = if args.no_pod_status {
            log::info!("--no-pod-status: captured pods are not annotated");
            None
        } else {
            let writer = StatusWriter::start(kube_config.clone(), Some(cache.view()))
                .with_context(|| {
                    format!("starting the pod status writer ({config_source}, API server {url})")
                })?;
            Some(writer)
        };
        let probe = ApiProbe::start(kube_config.clone(), node, cache.view())
            .context("starting the API server probe")?;
        log::info!(
            "Kubernetes mode: node {node}, API server {url} ({config_source}), ztunnel from \
             app=ztunnel in {}, excluded namespaces {:?}, exempt cgroups {:?}",
            config.system_namespace,
            config.excluded_namespaces,
            config.exempt_cgroups
        );
        let link = KubeLink {
            cache,
            probe,
            lost: false,
        };
        Ok((link, writer))
    }

    /// The cache synced (once: later relists keep the last state meanwhile), and the API
    /// server reachable now.
    pub(super) fn update_readiness(&mut self, readiness: &Readiness) {
        let view = self.cache.view();
        readiness.set_cache_synced(view.is_synced());
        let lost = !self.probe.reachable();
        readiness.set_api_server_lost(lost);
        if lost != self.lost {
            self.lost = lost;
            if lost {
                log::warn!(
                    "Kubernetes API server lost ({}): keeping every decision and map entry as \
                     they are; the kube cache retries with backoff; not ready meanwhile",
                    view.last_error()
                        .unwrap_or_else(|| "no error recorded yet".to_string())
                );
            } else {
                log::info!("Kubernetes API server reachable again: ready once the cache is synced");
            }
        }
    }
}
