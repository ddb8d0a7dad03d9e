//! Kubernetes mode's link: the kube cache's health turned into readiness, with the probe
//! (`kubecache::probe`) that tells when a lost API server is back.

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
