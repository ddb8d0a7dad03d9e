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
//! Every response closes its connection (`Connection: close`): simple, and the client opens a
//! new one for the next request, which it must be able to do anyway.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{json, Value};

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

/// Which collection a change or a watch is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pod,
    Namespace,
}

impl Kind {
    fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
        }
    }

    /// The field selector keys the real API server supports for this kind.
    fn supported_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            Kind::Namespace => &["metadata.name", "status.phase"],
        }
    }
}

/// One entry of the change history that watches stream from.
#[derive(Debug, Clone)]
enum Entry {
    Change {
        rv: u64,
        kind: Kind,
        old: Option<Value>,
        new: Option<Value>,
    },
    Bookmark {
        rv: u64,
    },
}

/// The server's objects and switches, behind one lock.
#[derive(Default)]
struct State {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    namespaces: BTreeMap<String, Value>,
    history: Vec<Entry>,
    /// Watches from a version below this answer 410 Gone.
    compacted_rv: u64,
    /// Bumped by `drop_watches`: streams of an older generation close.
    generation: u64,
    /// At the last `drop_watches`: the history length then, and whether watches were paused
    /// (a cut stream first sends what happened before the cut, unless paused).
    cut_at: usize,
    cut_while_paused: bool,
    /// While set, open watches send nothing (a partition); changes queue in the history.
    paused: bool,
    /// While set, every request answers 403 Forbidden.
    forbidden: bool,
    /// (verb, resource[/subresource]) that access reviews answer as not allowed.
    denied_access: Vec<(String, String)>,
    stopping: bool,
    requests: Vec<RecordedRequest>,
    /// Open watch connections, to cut them abruptly.
    open_watches: Vec<(u64, TcpStream)>,
    next_watch_id: u64,
    /// List snapshots for `continue` tokens: token id → (version, remaining items).
    snapshots: HashMap<u64, (u64, Vec<Value>)>,
    next_snapshot: u64,
    next_uid: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the whole fake down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server. Stops (closing every connection) when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Listens on an ephemeral port of 127.0.0.1.
    pub fn start() -> std::io::Result<Self> {
        Self::start_on(0)
    }

    /// Listens on the given port of 127.0.0.1 (0: any), e.g. a port a client already tries.
    pub fn start_on(port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fake-apiserver".into())
                .spawn(move || accept_loop(listener, shared))?
        };
        Ok(FakeApiServer {
            shared,
            addr,
            acceptor: Some(acceptor),
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
        let stored = self.apply(Kind::Pod, value);
        serde_json::from_value(stored).expect("the stored pod deserializes")
    }

    /// Deletes a pod; returns it (with the deletion's resource version) if it existed.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let key = (namespace.to_string(), name.to_string());
        self.delete(Kind::Pod, |st| st.pods.remove(&key))
            .map(|v| serde_json::from_value(v).expect("the stored pod deserializes"))
    }

    /// Creates or replaces a namespace (by name), as [`FakeApiServer::apply_pod`].
    pub fn apply_namespace(&self, namespace: &Namespace) -> Namespace {
        let value = serde_json::to_value(namespace).expect("a Namespace serializes");
        let stored = self.apply(Kind::Namespace, value);
        serde_json::from_value(stored).expect("the stored namespace deserializes")
    }

    /// Deletes a namespace (not its pods); returns it if it existed.
    pub fn delete_namespace(&self, name: &str) -> Option<Namespace> {
        self.delete(Kind::Namespace, |st| st.namespaces.remove(name))
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
        self.shared.lock().open_watches.len()
    }

    fn apply(&self, kind: Kind, mut value: Value) -> Value {
        let mut st = self.shared.lock();
        let (namespace, name) = identity(&value);
        assert!(
            !name.is_empty(),
            "FakeApiServer: an object needs metadata.name"
        );
        st.rv += 1;
        let rv = st.rv;
        let old = match kind {
            Kind::Pod => st.pods.get(&(namespace.clone(), name.clone())).cloned(),
            Kind::Namespace => st.namespaces.get(&name).cloned(),
        };
        let uid = match old.as_ref().and_then(|o| o.pointer("/metadata/uid")) {
            Some(uid) => uid.clone(),
            None => match value.pointer("/metadata/uid") {
                Some(uid) => uid.clone(),
                None => {
                    st.next_uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012x}", st.next_uid))
                }
            },
        };
        let meta = value
            .as_object_mut()
            .expect("a kube object is a JSON object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        meta["uid"] = uid;
        meta["resourceVersion"] = json!(rv.to_string());
        match kind {
            Kind::Pod => {
                st.pods.insert((namespace, name), value.clone());
            }
            Kind::Namespace => {
                st.namespaces.insert(name, value.clone());
            }
        }
        st.history.push(Entry::Change {
            rv,
            kind,
            old,
            new: Some(value.clone()),
        });
        self.shared.changed.notify_all();
        value
    }

    fn delete(
        &self,
        kind: Kind,
        remove: impl FnOnce(&mut State) -> Option<Value>,
    ) -> Option<Value> {
        let mut st = self.shared.lock();
        let mut old = remove(&mut st)?;
        st.rv += 1;
        let rv = st.rv;
        // The real server's DELETED object carries the deletion's resource version.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(Entry::Change {
            rv,
            kind,
            old: Some(old.clone()),
            new: None,
        });
        self.shared.changed.notify_all();
        Some(old)
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
        {
            let mut st = self.shared.lock();
            st.stopping = true;
            for (_, stream) in st.open_watches.drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        self.shared.changed.notify_all();
        // Wake the acceptor, which then sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.lock().stopping {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("fake-apiserver-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &shared) {
                    // Clients hang up mid-stream; that is their right, not a server failure.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                    ) {
                        eprintln!("fake-apiserver: connection error: {e}");
                    }
                }
            });
    }
}

/// The (namespace, name) of an object value ("" when absent).
fn identity(value: &Value) -> (String, String) {
    let field = |p: &str| {
        value
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (field("/metadata/namespace"), field("/metadata/name"))
}

/// Reads one HTTP/1.1 request and answers it.
fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(()); // a connect without a request (the acceptor's wake-up)
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut content_length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(());
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target.clone(), Vec::new()),
    };
    let request = RecordedRequest {
        method,
        path,
        query,
        body,
    };
    let forbidden = {
        let mut st = shared.lock();
        st.requests.push(request.clone());
        st.forbidden
    };
    let mut out = stream;
    if forbidden {
        return respond(
            &mut out,
            403,
            &status_json(
                403,
                "Forbidden",
                &format!(
                    "{} {} is forbidden: User \"system:anonymous\" cannot do this (FakeApiServer set_forbidden)",
                    request.method, request.path
                ),
            ),
        );
    }
    route(&mut out, &request, shared)
}

fn route(out: &mut TcpStream, req: &RecordedRequest, shared: &Shared) -> std::io::Result<()> {
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "pods"]) => collection(out, req, shared, Kind::Pod, None),
        ("GET", ["api", "v1", "namespaces"]) => collection(out, req, shared, Kind::Namespace, None),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => {
            collection(out, req, shared, Kind::Pod, Some(ns))
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let st = shared.lock();
            match st.pods.get(&(ns.to_string(), name.to_string())) {
                Some(pod) => {
                    let body = pod.to_string();
                    drop(st);
                    respond(out, 200, &body)
                }
                None => {
                    drop(st);
                    respond(out, 404, &not_found(ns, name))
                }
            }
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "pods", name])
        | ("PATCH", ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            patch_pod(out, req, shared, ns, name)
        }
        ("GET", ["version"]) => respond(out, 200, &version_json()),
        ("POST", ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]) => {
            access_review(out, req, shared)
        }
        _ => respond(
            out,
            404,
            &status_json(
                404,
                "NotFound",
                &format!(
                    "the server could not find the requested resource ({} {}; FakeApiServer serves pods and namespaces)",
                    req.method, req.path
                ),
            ),
        ),
    }
}

/// A `version.Info` as a v1.33 server sends it.
fn version_json() -> String {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
    .to_string()
}

/// A SelfSubjectAccessReview: allowed unless its verb and resource were denied.
fn access_review(
    out: &mut TcpStream,
    req: &RecordedRequest,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut review: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return respond(
                out,
                400,
                &status_json(400, "BadRequest", &format!("the review is not JSON: {e}")),
            )
        }
    };
    let Some(attrs) = review.pointer("/spec/resourceAttributes").cloned() else {
        return respond(
            out,
            400,
            &status_json(
                400,
                "BadRequest",
                "FakeApiServer answers resourceAttributes reviews only",
            ),
        );
    };
    let field = |k: &str| attrs.get(k).and_then(Value::as_str).unwrap_or_default();
    let resource = match field("subresource") {
        "" => field("resource").to_string(),
        sub => format!("{}/{sub}", field("resource")),
    };
    let verb = field("verb").to_string();
    let denied = shared
        .lock()
        .denied_access
        .iter()
        .any(|(v, r)| *v == verb && *r == resource);
    review["status"] = if denied {
        json!({"allowed": false, "reason": format!("FakeApiServer: {verb} {resource} denied")})
    } else {
        json!({"allowed": true, "reason": "FakeApiServer: allowed"})
    };
    review["metadata"] = json!({"creationTimestamp": null});
    respond(out, 201, &review.to_string())
}

fn not_found(ns: &str, name: &str) -> String {
    status_json(
        404,
        "NotFound",
        &format!("pods \"{name}\" not found in namespace \"{ns}\""),
    )
}

fn patch_pod(
    out: &mut TcpStream,
    req: &RecordedRequest,
    shared: &Shared,
    ns: &str,
    name: &str,
) -> std::io::Result<()> {
    let patch: Value = match serde_json::from_slice(&req.body) {
        Ok(p) => p,
        Err(e) => {
            return respond(
                out,
                400,
                &status_json(400, "BadRequest", &format!("the patch is not JSON: {e}")),
            )
        }
    };
    let key = (ns.to_string(), name.to_string());
    let mut st = shared.lock();
    let Some(old) = st.pods.get(&key).cloned() else {
        drop(st);
        return respond(out, 404, &not_found(ns, name));
    };
    let mut new = old.clone();
    merge_patch(&mut new, &patch);
    st.rv += 1;
    let rv = st.rv;
    new["metadata"]["resourceVersion"] = json!(rv.to_string());
    // Identity is not patchable.
    new["metadata"]["uid"] = old["metadata"]["uid"].clone();
    new["metadata"]["name"] = json!(name);
    new["metadata"]["namespace"] = json!(ns);
    st.pods.insert(key, new.clone());
    st.history.push(Entry::Change {
        rv,
        kind: Kind::Pod,
        old: Some(old),
        new: Some(new.clone()),
    });
    drop(st);
    shared.changed.notify_all();
    respond(out, 200, &new.to_string())
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// A parsed field selector: (field, wanted value, equal?).
type FieldSelector = Vec<(String, String, bool)>;

fn parse_field_selector(kind: Kind, selector: &str) -> Result<FieldSelector, String> {
    let mut terms = Vec::new();
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, v, true)
        } else {
            return Err(format!("invalid field selector term {term:?}"));
        };
        if !kind.supported_fields().contains(&field) {
            return Err(format!(
                "field label not supported: {field} (for {})",
                kind.kind()
            ));
        }
        terms.push((field.to_string(), value.to_string(), equal));
    }
    Ok(terms)
}

fn field_value(object: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        // The real server compares a missing field as its zero value.
        _ if field == "spec.hostNetwork" => "false".into(),
        _ => String::new(),
    }
}

/// What a list or watch selects: the field selector and an optional namespace.
struct Selection<'a> {
    kind: Kind,
    namespace: Option<&'a str>,
    fields: FieldSelector,
}

impl Selection<'_> {
    fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = self.namespace {
            if identity(object).0 != ns {
                return false;
            }
        }
        self.fields
            .iter()
            .all(|(field, value, equal)| (field_value(object, field) == *value) == *equal)
    }

    fn current<'s>(&self, st: &'s State) -> Vec<&'s Value> {
        match self.kind {
            Kind::Pod => st.pods.values().filter(|v| self.matches(v)).collect(),
            Kind::Namespace => st.namespaces.values().filter(|v| self.matches(v)).collect(),
        }
    }
}

fn collection(
    out: &mut TcpStream,
    req: &RecordedRequest,
    shared: &Shared,
    kind: Kind,
    namespace: Option<&str>,
) -> std::io::Result<()> {
    if req.param("labelSelector").is_some() {
        return respond(
            out,
            400,
            &status_json(
                400,
                "BadRequest",
                "labelSelector is not implemented by FakeApiServer",
            ),
        );
    }
    let fields = match parse_field_selector(kind, req.param("fieldSelector").unwrap_or("")) {
        Ok(f) => f,
        Err(message) => return respond(out, 400, &status_json(400, "BadRequest", &message)),
    };
    let selection = Selection {
        kind,
        namespace,
        fields,
    };
    if req.is_watch() {
        watch(out, req, shared, &selection)
    } else {
        list(out, req, shared, &selection)
    }
}

fn list(
    out: &mut TcpStream,
    req: &RecordedRequest,
    shared: &Shared,
    selection: &Selection,
) -> std::io::Result<()> {
    let limit: Option<usize> = req
        .param("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0);
    let mut st = shared.lock();
    let (rv, mut items) = match req.param("continue") {
        Some(token) => {
            let snapshot = token
                .parse::<u64>()
                .ok()
                .and_then(|id| st.snapshots.remove(&id));
            match snapshot {
                Some(s) => s,
                None => {
                    drop(st);
                    return respond(
                        out,
                        410,
                        &status_json(410, "Expired", "The provided continue parameter is too old"),
                    );
                }
            }
        }
        None => (st.rv, selection.current(&st).into_iter().cloned().collect()),
    };
    let mut continue_token = String::new();
    if let Some(limit) = limit {
        if items.len() > limit {
            let rest = items.split_off(limit);
            st.next_snapshot += 1;
            let id = st.next_snapshot;
            st.snapshots.insert(id, (rv, rest));
            continue_token = id.to_string();
        }
    }
    drop(st);
    let kind = selection.kind.kind();
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if !continue_token.is_empty() {
        metadata["continue"] = json!(continue_token);
    }
    let body = json!({
        "kind": format!("{kind}List"),
        "apiVersion": "v1",
        "metadata": metadata,
        "items": items,
    });
    respond(out, 200, &body.to_string())
}

/// One watch event line for `entry`, if this watch sees it.
fn render(entry: &Entry, selection: &Selection, bookmarks: bool) -> Option<String> {
    match entry {
        Entry::Bookmark { rv } => bookmarks.then(|| {
            json!({
                "type": "BOOKMARK",
                "object": {
                    "kind": selection.kind.kind(),
                    "apiVersion": "v1",
                    "metadata": { "resourceVersion": rv.to_string() },
                },
            })
            .to_string()
        }),
        Entry::Change { rv, kind, old, new } => {
            if *kind != selection.kind {
                return None;
            }
            let was = old.as_ref().is_some_and(|o| selection.matches(o));
            let is = new.as_ref().is_some_and(|n| selection.matches(n));
            let (event, object) = match (was, is, new) {
                (true, true, Some(n)) => ("MODIFIED", n.clone()),
                (false, true, Some(n)) => ("ADDED", n.clone()),
                (true, false, Some(n)) => ("DELETED", n.clone()),
                (true, false, None) => {
                    let mut o = old.clone().expect("was matched, so it exists");
                    o["metadata"]["resourceVersion"] = json!(rv.to_string());
                    ("DELETED", o)
                }
                _ => return None,
            };
            Some(json!({ "type": event, "object": object }).to_string())
        }
    }
}

fn watch(
    out: &mut TcpStream,
    req: &RecordedRequest,
    shared: &Shared,
    selection: &Selection,
) -> std::io::Result<()> {
    if req.param("sendInitialEvents").is_some() {
        return respond(
            out,
            400,
            &status_json(
                400,
                "BadRequest",
                "sendInitialEvents (streaming lists) is not implemented by FakeApiServer",
            ),
        );
    }
    let bookmarks = req.param("allowWatchBookmarks") == Some("true");
    let from = req.param("resourceVersion").unwrap_or("");
    let start_rv: Option<u64> = match from {
        "" | "0" => None,
        v => match v.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                return respond(
                    out,
                    400,
                    &status_json(400, "BadRequest", &format!("invalid resourceVersion {v:?}")),
                )
            }
        },
    };
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )?;
    let (id, generation, mut next, initial) = {
        let mut st = shared.lock();
        if let Some(rv) = start_rv {
            if rv < st.compacted_rv {
                let current = st.rv;
                drop(st);
                let status: Value = serde_json::from_str(&status_json(
                    410,
                    "Expired",
                    &format!("too old resource version: {rv} ({current})"),
                ))
                .expect("status_json is JSON");
                write_chunk(out, &json!({"type": "ERROR", "object": status}).to_string())?;
                out.write_all(b"0\r\n\r\n")?;
                return out.flush();
            }
        }
        let initial: Vec<String> = match start_rv {
            None => selection
                .current(&st)
                .into_iter()
                .map(|o| json!({"type": "ADDED", "object": o}).to_string())
                .collect(),
            Some(_) => Vec::new(),
        };
        let start = start_rv.unwrap_or(st.rv);
        let next = st.history.iter().position(|e| match e {
            Entry::Change { rv, .. } => *rv > start,
            Entry::Bookmark { rv } => *rv > start,
        });
        let next = next.unwrap_or(st.history.len());
        st.next_watch_id += 1;
        let id = st.next_watch_id;
        st.open_watches.push((id, out.try_clone()?));
        (id, st.generation, next, initial)
    };
    let result = (|| {
        for line in &initial {
            write_chunk(out, line)?;
        }
        out.flush()?;
        loop {
            let batch: Vec<Entry> = {
                let mut st = shared.lock();
                loop {
                    if st.stopping {
                        return Ok(());
                    }
                    if st.generation != generation {
                        if st.cut_while_paused || next >= st.cut_at {
                            return Ok(());
                        }
                        let batch = st.history[next..st.cut_at].to_vec();
                        next = st.cut_at;
                        break batch;
                    }
                    if !st.paused && next < st.history.len() {
                        let batch = st.history[next..].to_vec();
                        next = st.history.len();
                        break batch;
                    }
                    st = shared
                        .changed
                        .wait_timeout(st, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            for entry in &batch {
                if let Some(line) = render(entry, selection, bookmarks) {
                    write_chunk(out, &line)?;
                }
            }
            out.flush()?;
        }
    })();
    let mut st = shared.lock();
    st.open_watches.retain(|(w, _)| *w != id);
    drop(st);
    // Cut (no final chunk): a dropped watch must look dropped to the client.
    let _ = out.shutdown(Shutdown::Both);
    result
}

fn write_chunk(out: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(out, "{:x}\r\n{data}\r\n", data.len())
}

fn respond(out: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// A `metav1.Status` failure, as the real server sends it.
fn status_json(code: u16, reason: &str, message: &str) -> String {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
    .to_string()
}

/// Decodes an `application/x-www-form-urlencoded` query.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("fieldSelector=spec.nodeName%3Dnode-a&watch=true&x=a+b"),
            vec![
                ("fieldSelector".into(), "spec.nodeName=node-a".into()),
                ("watch".into(), "true".into()),
                ("x".into(), "a b".into()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn merge_patch_sets_and_removes() {
        let mut target = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        merge_patch(
            &mut target,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        );
        assert_eq!(
            target,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}})
        );
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}});
        let sel = parse_field_selector(Kind::Pod, "spec.nodeName=n1").unwrap();
        let s = Selection {
            kind: Kind::Pod,
            namespace: None,
            fields: sel,
        };
        assert!(s.matches(&pod));
        let sel = parse_field_selector(Kind::Pod, "spec.nodeName!=n1").unwrap();
        let s = Selection {
            kind: Kind::Pod,
            namespace: None,
            fields: sel,
        };
        assert!(!s.matches(&pod));
        assert!(parse_field_selector(Kind::Pod, "spec.containers=x").is_err());
        assert!(parse_field_selector(Kind::Namespace, "spec.nodeName=n1").is_err());
    }
}
