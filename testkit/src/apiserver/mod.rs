//! A fake Kubernetes API server, in process, that speaks the real list/watch protocol over
//! HTTP/1.1, so the kube cache's tests run the real kube-rs client end to end.
//!
//! What it serves (plain HTTP on 127.0.0.1, no authentication):
//! - `GET /api/v1/pods`, `/api/v1/namespaces/NS/pods`, `/api/v1/namespaces`: a LIST answers a
//!   `PodList`/`NamespaceList` with `metadata.resourceVersion`; `limit` pages through a
//!   snapshot with `continue` tokens (pages of one list are consistent, as on a real server).
//!   `fieldSelector` is honoured for the fields a real server supports for these kinds
//!   (`spec.nodeName`, `metadata.name`, ...; `=`, `==`, `!=`); an unsupported field or a
//!   `labelSelector` answers 400, so a test cannot silently pass on an ignored selector.
//! - `?watch=true&resourceVersion=N`: a chunked stream of JSON lines (`ADDED`, `MODIFIED`,
//!   `DELETED`, and `BOOKMARK` when `allowWatchBookmarks=true`) of every change after N that
//!   matches the selector; an object moving into or out of the selector arrives as `ADDED` or
//!   `DELETED`, as the real server does. `resourceVersion` `0` or absent starts with synthetic
//!   `ADDED` events for the current objects. A watch from a version older than the last
//!   [`FakeApiServer::expire_history`] answers, like the real server, `200` with one `ERROR`
//!   event holding a `Status` of code 410 (`Expired`), and ends. `sendInitialEvents`
//!   (streaming lists) is not implemented and answers 400.
//! - `GET /api/v1/namespaces/NS/pods/NAME`, and `PATCH` of it or of its `/status`
//!   subresource: the body is applied as a JSON merge patch (for the metadata maps a strategic
//!   merge patch means the same), the version increments and watchers see `MODIFIED`.
//! - `GET /version`: a `version.Info` (v1.33.0).
//! - `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`: answers `201` with the
//!   review and `status.allowed`: true, unless the verb and resource (`pods/status` for a
//!   subresource) were denied with [`FakeApiServer::deny_access`] (a missing RBAC rule).
//!   `nonResourceAttributes` reviews answer 400.
//!
//! Every request is recorded (method, path, decoded query, body) for the test to assert on.
//!
//! The parts: `state` (objects, change history, switches), `selector` (what a list or watch
//! selects), `api` (what each request answers), `http` (the HTTP/1.1 plumbing).

mod api;
mod http;
mod selector;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use tokio::sync::oneshot;

use state::{Entry, Kind, Shared, State};

/// One request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path without the query (`/api/v1/pods`).
    pub path: String,
    /// The query pairs, percent-decoded, in the order sent.
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of a query parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A `GET` with `watch=true` (or `1`).
    pub fn is_watch(&self) -> bool {
        self.method == "GET" && matches!(self.param("watch"), Some("true" | "1"))
    }

    /// A `GET` of a collection that is not a watch.
    pub fn is_list(&self) -> bool {
        self.method == "GET" && !self.is_watch()
    }
}

/// The fake API server. Stops (closing every connection) when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// Tells the server's thread to stop accepting.
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Listens on an ephemeral port of 127.0.0.1.
    pub fn start() -> std::io::Result<Self> {
        Self::start_on(0)
    }

    /// Listens on the given port of 127.0.0.1 (0: any), e.g. a port a client already tries.
    pub fn start_on(port: u16) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, stopped) = oneshot::channel();
        let server = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fake-apiserver".into())
                .spawn(move || {
                    runtime.block_on(http::serve(listener, shared, stopped));
                    // Watches still streaming were cut by `stopping`.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?
        };
        Ok(FakeApiServer {
            shared,
            addr,
            stop: Some(stop),
            server: Some(server),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs client configuration for this server (plain HTTP, no credentials).
    pub fn kube_config(&self) -> kube::Config {
        kube_config_for(self.addr)
    }

    /// A kubeconfig file's text for this server ([`kubeconfig_yaml_for`]).
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml_for(self.addr)
    }

    /// The current resource version (of the last change).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Creates or replaces a pod (by namespace and name). Sets `metadata.resourceVersion`, and
    /// `metadata.uid` when missing (kept from the earlier version on replace). Returns the
    /// stored pod.
    pub fn apply_pod(&self, pod: &Pod) -> Pod {
        let value = serde_json::to_value(pod).expect("a Pod serializes");
        let stored = self.shared.apply(Kind::Pod, value);
        serde_json::from_value(stored).expect("the stored pod deserializes")
    }

    /// Deletes a pod; returns it (with the deletion's resource version) if it existed.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let key = (namespace.to_string(), name.to_string());
        self.shared
            .delete(Kind::Pod, |st| st.pods.remove(&key))
            .map(|v| serde_json::from_value(v).expect("the stored pod deserializes"))
    }

    /// Creates or replaces a namespace (by name), as [`FakeApiServer::apply_pod`].
    pub fn apply_namespace(&self, namespace: &Namespace) -> Namespace {
        let value = serde_json::to_value(namespace).expect("a Namespace serializes");
        let stored = self.shared.apply(Kind::Namespace, value);
        serde_json::from_value(stored).expect("the stored namespace deserializes")
    }

    /// Deletes a namespace (not its pods); returns it if it existed.
    pub fn delete_namespace(&self, name: &str) -> Option<Namespace> {
        self.shared
            .delete(Kind::Namespace, |st| st.namespaces.remove(name))
            .map(|v| serde_json::from_value(v).expect("the stored namespace deserializes"))
    }

    /// A pod as stored now.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let st = self.shared.lock();
        st.pods
            .get(&(namespace.to_string(), name.to_string()))
            .map(|v| serde_json::from_value(v.clone()).expect("the stored pod deserializes"))
    }

    /// Sends a `BOOKMARK` at the current version on every open watch that asked for them.
    pub fn bookmark(&self) {
        let mut st = self.shared.lock();
        let rv = st.rv;
        st.history.push(Entry::Bookmark { rv });
        self.shared.changed.notify_all();
    }

    /// Holds back every open watch's events (a partition) until [`FakeApiServer::drop_watches`]
    /// or [`FakeApiServer::resume_watches`].
    pub fn pause_watches(&self) {
        self.shared.lock().paused = true;
    }

    /// Lets paused watches send again.
    pub fn resume_watches(&self) {
        self.shared.lock().paused = false;
        self.shared.changed.notify_all();
    }

    /// Cuts every open watch connection abruptly (no final chunk), and lifts a pause: the
    /// client must notice, and watch again from the last version it saw. Each stream first
    /// sends what happened before this call (a bookmark, say), unless watches were paused:
    /// then the changes made during the pause are left for the client's next watch.
    pub fn drop_watches(&self) {
        let mut st = self.shared.lock();
        st.generation += 1;
        st.cut_at = st.history.len();
        st.cut_while_paused = st.paused;
        st.paused = false;
        self.shared.changed.notify_all();
    }

    /// Forgets the change history up to now (an etcd compaction): a watch that starts from an
    /// older version answers 410 Gone, so the client must list again.
    pub fn expire_history(&self) {
        let mut st = self.shared.lock();
        st.compacted_rv = st.rv;
    }

    /// While set, every request answers 403 Forbidden (a missing RBAC grant).
    pub fn set_forbidden(&self, forbidden: bool) {
        self.shared.lock().forbidden = forbidden;
    }

    /// Makes access reviews of `verb` on `resource` (`pods`, `namespaces`, or with a
    /// subresource: `pods/status`) answer not allowed, as if the RBAC rule were missing.
    /// Everything not denied is allowed.
    pub fn deny_access(&self, verb: &str, resource: &str) {
        let mut st = self.shared.lock();
        let entry = (verb.to_string(), resource.to_string());
        if !st.denied_access.contains(&entry) {
            st.denied_access.push(entry);
        }
    }

    /// Undoes [`FakeApiServer::deny_access`].
    pub fn allow_access(&self, verb: &str, resource: &str) {
        self.shared
            .lock()
            .denied_access
            .retain(|(v, r)| !(v == verb && r == resource));
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// How many watch streams are open now.
    pub fn open_watch_count(&self) -> usize {
        self.shared.lock().open_watches
    }
}

/// A kubeconfig file's text for a plain-HTTP server at `addr` (one cluster, one user with no
/// credentials, one current context), for programs that take `--kubeconfig`.
pub fn kubeconfig_yaml_for(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: fake\n  \
           cluster:\n    \
             server: http://{addr}\n\
         users:\n\
         - name: fake\n  \
           user: {{}}\n\
         contexts:\n\
         - name: fake\n  \
           context:\n    \
             cluster: fake\n    \
             user: fake\n\
         current-context: fake\n"
    )
}

/// A kube-rs client configuration for a plain-HTTP server at `addr`, no credentials.
pub fn kube_config_for(addr: SocketAddr) -> kube::Config {
    kube::Config::new(
        format!("http://{addr}")
            .parse()
            .expect("an http URL of a socket address parses"),
    )
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Open watches see it and cut their connections.
        self.shared.lock().stopping = true;
        self.shared.changed.notify_all();
        drop(self.stop.take());
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}
