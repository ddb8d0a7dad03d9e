//! The API server probe: tells when a lost API server is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;

use crate::config::{client_on_own_runtime, ClientError};
use crate::KubeView;

/// How often the probe checks a lost API server.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one probe request may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the probe could not start. Each cause is in the message and not the error's source: a
/// chain printer (anyhow's `{:#}`) would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("building the probe's tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("building a Kubernetes client for {url}: {error}")]
    Client { url: String, error: kube::Error },
    #[error("cannot start the kube-probe thread: {0}")]
    Thread(std::io::Error),
}

impl From<ClientError> for ProbeError {
    fn from(error: ClientError) -> ProbeError {
        match error {
            ClientError::Runtime(error) => ProbeError::Runtime(error),
            ClientError::Client { url, error } => ProbeError::Client { url, error },
        }
    }
}

/// Says whether the API server answers. The kube cache's view says when its watchers fail, but
/// not when they are back (a resumed watch is silent until something changes), so while the
/// view is disconnected this probe lists one pod of this node on its own client, with the
/// same permission the watchers need.
pub struct ApiProbe {
    reachable: Arc<AtomicBool>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiProbe {
    /// Starts probing with its own client for `config`, every [`PROBE_EVERY`] while `view`
    /// (the kube cache's) is disconnected. Reachable until a probe says otherwise.
    pub fn start(config: kube::Config, node: &str, view: KubeView) -> Result<ApiProbe, ProbeError> {
        let (runtime, client) = client_on_own_runtime(config)?;
        let pods = Api::<Pod>::all(client);
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
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })
            .map_err(ProbeError::Thread)?;
        Ok(ApiProbe {
            reachable,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// What the last probe said (or the view, while it is connected).
    pub fn reachable(&self) -> bool {
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
