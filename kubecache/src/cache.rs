//! The kube cache: the pods on this node and all namespaces, watched from the Kubernetes API
//! with kube-rs, delivered as [`Change`]s (to the resolver, as its inputs) and kept in a shared
//! read-mostly [`KubeView`] (pods by UID and by IP, namespaces by name).
//!
//! It decides nothing: it delivers the objects faithfully and in order. Two kube-runtime
//! watchers (pods with `spec.nodeName=<node>`, namespaces) run on a tokio runtime on a thread
//! of their own. The watchers use the list-then-watch strategy (`ListWatch`, the default):
//! a paged LIST (500 a page, consistent "most recent" reads) then a WATCH from the list's
//! `resourceVersion` with bookmarks; a dropped watch resumes from the last version seen, and a
//! `410 Gone` lists again. A relist's objects are diffed against the view: what changed is an
//! `Apply`, what is no longer listed is a `Delete`, what is unchanged is not repeated.
//!
//! [`Change::Synced`] is sent when both lists have completed, and again each time a later
//! relist completes (the resolver may then trust the absence of a pod again). Errors (API
//! unreachable, 403) are logged with what to do, retried with kube-runtime's default backoff
//! (0.8 s doubling to 30 s, with jitter), and shown in [`KubeView::health`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};

use crate::change::Change;
use crate::config::{client_on_own_runtime, ClientError};
use crate::tracker::{Cached, Tracker};
use crate::view::{KubeView, Watched};

/// Why the kube cache could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "kube cache: the node name is empty: set it from the pod's spec.nodeName (downward API)"
    )]
    EmptyNodeName,
    // Each cause is in the message and not the error's source: a chain printer (anyhow's
    // `{:#}`) would print it twice.
    #[error("kube cache: cannot build the tokio runtime of the kube thread: {0}")]
    Runtime(std::io::Error),
    #[error("kube cache: cannot build a Kubernetes client for {url}: {error}")]
    Client { url: String, error: kube::Error },
    #[error("kube cache: cannot start the kube thread: {0}")]
    Thread(std::io::Error),
}

impl From<ClientError> for KubeError {
    fn from(error: ClientError) -> KubeError {
        match error {
            ClientError::Runtime(error) => KubeError::Runtime(error),
            ClientError::Client { url, error } => KubeError::Client { url, error },
        }
    }
}

/// The running kube cache. Stops its thread on [`KubeCache::stop`] or drop.
pub struct KubeCache {
    view: KubeView,
    stopping: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeCache {
    /// Starts watching pods on `node_name` and all namespaces with `client_config`, sending
    /// every change to `tx`: the resolver's input channel (`T` = [`resolver::Input`]), or
    /// [`Change`]s as they are (`zbridge record`). Returns once the client is built; the API
    /// server need not be reachable yet (the watchers retry, and [`KubeView::health`] says how
    /// it goes).
    pub fn start<T: From<Change> + Send + 'static>(
        client_config: kube::Config,
        node_name: &str,
        tx: Sender<T>,
    ) -> Result<KubeCache, KubeError> {
        if node_name.is_empty() {
            return Err(KubeError::EmptyNodeName);
        }
        let url = client_config.cluster_url.to_string();
        let (runtime, client) = client_on_own_runtime(client_config)?;
        let view = KubeView::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = Watch {
            client,
            node: node_name.to_string(),
            url,
            tx,
            view: view.clone(),
            stopping: stopping.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("kube-cache".into())
            .spawn(move || {
                runtime.block_on(task.run(stopped));
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(KubeError::Thread)?;
        Ok(KubeCache {
            view,
            stopping,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The shared view of the cache's objects and health.
    pub fn view(&self) -> KubeView {
        self.view.clone()
    }

    /// Stops the watchers and joins the thread. Idempotent.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("kube cache: the kube thread panicked");
            }
        }
    }
}

impl Drop for KubeCache {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The watchers' task, on the kube thread.
struct Watch<T> {
    client: Client,
    node: String,
    url: String,
    tx: Sender<T>,
    view: KubeView,
    stopping: Arc<AtomicBool>,
}

impl<T: From<Change>> Watch<T> {
    async fn run(self, mut stopped: tokio::sync::oneshot::Receiver<()>) {
        let pods = watcher(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node)),
        )
        .default_backoff();
        let namespaces = watcher(
            Api::<Namespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        let mut pods = std::pin::pin!(pods);
        let mut namespaces = std::pin::pin!(namespaces);
        let mut pod_tracker = Tracker::default();
        let mut namespace_tracker = Tracker::default();
        log::info!(
            "kube cache: watching pods on node {} and all namespaces at {}",
            self.node,
            self.url
        );
        loop {
            let delivered = tokio::select! {
                _ = &mut stopped => return,
                Some(event) = pods.next() => {
                    self.handle(Watched::Pods, event, &mut pod_tracker, &namespace_tracker)
                }
                Some(event) = namespaces.next() => {
                    self.handle(Watched::Namespaces, event, &mut namespace_tracker, &pod_tracker)
                }
            };
            if !delivered {
                return;
            }
        }
    }

    /// Applies one watcher result; false when the resolver is gone or we are stopping.
    fn handle<K: Cached>(
        &self,
        which: Watched,
        event: Result<watcher::Event<K>, watcher::Error>,
        tracker: &mut Tracker,
        other: &Tracker,
    ) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                self.view.set_connected(which, false);
                self.report(which, &error);
                return true;
            }
        };
        self.view.set_connected(which, true);
        let outcome = tracker.on_event(&self.view, event);
        for change in outcome.changes {
            if !self.send(change) {
                return false;
            }
        }
        if outcome.list_done && other.listed_once {
            let first = !self.view.is_synced();
            self.view.set_synced();
            if first {
                log::info!(
                    "kube cache: synced ({} pods on node {}, {} namespaces)",
                    self.view.pod_count(),
                    self.node,
                    self.view.namespace_count()
                );
            }
            return self.send(Change::Synced);
        }
        true
    }

    /// Sends to the resolver, waiting while its channel is full unless we are stopping.
    fn send(&self, change: Change) -> bool {
        let mut input = T::from(change);
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return false;
            }
            match self.tx.send_timeout(input, Duration::from_millis(100)) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(back)) => input = back,
                Err(SendTimeoutError::Disconnected(_)) => {
                    log::info!("kube cache: the resolver is gone; stopping the watchers");
                    return false;
                }
            }
        }
    }

    /// Logs a watcher error with what to do, and keeps it for the health view.
    fn report(&self, which: Watched, error: &watcher::Error) {
        let what = match which {
            Watched::Pods => format!("pods on node {}", self.node),
            Watched::Namespaces => "namespaces".to_string(),
        };
        let client_error = match error {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => Some(e),
            _ => None,
        };
        let status_code = match (error, client_error) {
            (watcher::Error::WatchError(status), _) => Some(status.code),
            (_, Some(kube::Error::Api(status))) => Some(status.code),
            _ => None,
        };
        let message = match status_code {
            Some(410) => {
                // Routine: the watch fell out of the server's history window.
                log::info!("kube cache: the watch of {what} expired (410 Gone): listing again");
                return;
            }
            Some(401) => format!(
                "kube cache: watching {what} at {}: unauthorized (401): {error}; check the \
                 service account token the agent mounts; retrying with backoff",
                self.url
            ),
            Some(403) => format!(
                "kube cache: watching {what} at {}: forbidden (403): {error}; grant the agent's \
                 service account get, list and watch on pods and namespaces (ClusterRole and \
                 ClusterRoleBinding); retrying with backoff",
                self.url
            ),
            Some(code) => format!(
                "kube cache: watching {what} at {}: the API server answered {code}: {error}; \
                 retrying with backoff",
                self.url
            ),
            None if client_error.is_some() => format!(
                "kube cache: watching {what}: cannot reach the Kubernetes API server at {}: \
                 {error}; check that it is up and reachable from the node (the address from \
                 KUBERNETES_SERVICE_HOST or the kubeconfig, network policy); retrying with backoff",
                self.url
            ),
            None => format!(
                "kube cache: watching {what} at {}: {error}; listing again with backoff",
                self.url
            ),
        };
        log::warn!("{message}");
        self.view.set_last_error(message);
    }
}
