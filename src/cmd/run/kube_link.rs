//! Kubernetes mode's link: the kube cache's health turned into readiness, and the probe that
//! tells when a lost API server is back.

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

/// How often the probe checks a lost API server.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one probe request may take.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Says whether the API server answers. The kube cache's view says when its watchers fail, but
/// not when they are back (a resumed watch is silent until something changes), so while the
/// view is disconnected this probe lists one pod of this node on its own client, with the
/// same permission the watchers need.
pub(super) struct ApiProbe {
    reachable: Arc<AtomicBool>,
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiProbe {
    pub(super) fn start(
        config: kube::Config,
        node: &str,
        view: KubeView,
    ) -> anyhow::Result<ApiProbe> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the probe's tokio runtime")?;
        let url = config.cluster_url.to_string();
        let client = {
            // The client spawns its request buffer task: it needs the runtime's context.
            let _context = runtime.enter();
            kube::Client::try_from(config)
                .with_context(|| format!("building a Kubernetes client for {url}"))?
        };
        let pods = kube::Api::<Pod>::all(client);
        let params = ListParams::default()
            .fields(&format!("spec.nodeName={node}"))
            .limit(1);
        let reachable = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("kube-probe".into())
            .spawn({
                let reachable = reachable.clone();
                move || loop {
                    let now = view.is_connected()
                        || runtime.block_on(async {
                            matches!(
                                tokio::time::timeout(PROBE_TIMEOUT, pods.list(&params)).await,
                                Ok(Ok(_))
                            )
                        });
                    reachable.store(now, Ordering::Release);
                    match stopped.recv_timeout(PROBE_EVERY) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })
            .context("cannot start the kube-probe thread")?;
        Ok(ApiProbe {
            reachable,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub(super) fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }
}

impl Drop for ApiProbe {
    fn drop(&mut self) {
        self.stop.take(); // disconnects: the thread returns after its current probe
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the kube-probe thread panicked");
            }
        }
    }
}
