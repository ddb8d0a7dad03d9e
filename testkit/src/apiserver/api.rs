//! The API's semantics: what each request answers. LIST with `resourceVersion` and `continue`
//! pages, WATCH from a version (synthetic `ADDED` events, `BOOKMARK`s, `410 Gone` after a
//! compaction), GET and PATCH of a pod, access reviews, `/version`. No HTTP here: a request
//! comes in as a [`RecordedRequest`], the answer goes out as a [`Response`].

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::selector::{parse_field_selector, Selection};
#[cfg(doc)]
use super::state::State;
use super::state::{Entry, Kind, Shared};
use super::RecordedRequest;

/// The answer to a request.
pub(super) enum Response {
    /// A JSON body with its status code.
    Json { code: u16, body: String },
    /// `200` and a stream of watch events, one JSON line each.
    Watch(WatchStream),
}

impl Response {
    fn json(code: u16, body: &str) -> Response {
        Response::Json {
            code,
            body: body.to_string(),
        }
    }
}

/// Records the request and answers it (403 to everything while forbidden).
pub(super) fn handle(request: &RecordedRequest, shared: &Arc<Shared>) -> Response {
    let forbidden = {
        let mut st = shared.lock();
        st.requests.push(request.clone());
        st.forbidden
    };
    if forbidden {
        return Response::json(
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
    route(request, shared)
}

fn route(req: &RecordedRequest, shared: &Arc<Shared>) -> Response {
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "pods"]) => collection(req, shared, Kind::Pod, None),
        ("GET", ["api", "v1", "namespaces"]) => collection(req, shared, Kind::Namespace, None),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => {
            collection(req, shared, Kind::Pod, Some(ns))
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let st = shared.lock();
            match st.pods.get(&(ns.to_string(), name.to_string())) {
                Some(pod) => {
                    let body = pod.to_string();
                    drop(st);
                    Response::json(200, &body)
                }
                None => {
                    drop(st);
                    Response::json(404, &not_found(ns, name))
                }
            }
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "pods", name])
        | ("PATCH", ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            patch_pod(req, shared, ns, name)
        }
        ("GET", ["version"]) => Response::json(200, &version_json()),
        ("POST", ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]) => {
            access_review(req, shared)
        }
        _ => Response::json(404,
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

fn collection(
    req: &RecordedRequest,
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<&str>,
) -> Response {
    if req.param("labelSelector").is_some() {
        return Response::json(
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
        Err(message) => return Response::json(400, &status_json(400, "BadRequest", &message)),
    };
    let selection = Selection {
        kind,
        namespace: namespace.map(str::to_string),
        fields,
    };
    if req.is_watch() {
        watch(req, shared, selection)
    } else {
        list(req, shared, &selection)
    }
}

fn list(req: &RecordedRequest, shared: &Arc<Shared>, selection: &Selection) -> Response {
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
                    return Response::json(
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
    Response::json(200, &body.to_string())
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

fn watch(req: &RecordedRequest, shared: &Arc<Shared>, selection: Selection) -> Response {
    if req.param("sendInitialEvents").is_some() {
        return Response::json(
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
                return Response::json(
                    400,
                    &status_json(400, "BadRequest", &format!("invalid resourceVersion {v:?}")),
                )
            }
        },
    };
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
            return Response::Watch(WatchStream {
                shared: None,
                selection,
                bookmarks,
                generation: 0,
                next: 0,
                initial: vec![json!({"type": "ERROR", "object": status}).to_string()],
            });
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
    st.open_watches += 1;
    let generation = st.generation;
    drop(st);
    Response::Watch(WatchStream {
        shared: Some(shared.clone()),
        selection,
        bookmarks,
        generation,
        next,
        initial,
    })
}

/// What a watch sends next.
pub(super) enum WatchNext {
    /// Event lines (JSON), to send as they are.
    Lines(Vec<String>),
    /// The stream is over (after a 410 `ERROR` event): end it properly.
    End,
    /// The watch was dropped or the server stops: cut the connection, no final chunk, as a
    /// dropped watch looks to a client.
    Cut,
}

/// An open watch: the events it has still to send, from the change history.
pub(super) struct WatchStream {
    /// `None` for a watch that only sends its initial lines (a 410), and is not counted open.
    shared: Option<Arc<Shared>>,
    selection: Selection,
    bookmarks: bool,
    /// The [`State::generation`] it started in: a newer one means it was dropped.
    generation: u64,
    /// The index in the history of the next entry to look at.
    next: usize,
    /// Lines to send first (the synthetic `ADDED` events, or the 410 `ERROR`).
    initial: Vec<String>,
}

impl WatchStream {
    /// The next lines, waiting for changes as long as it takes.
    pub(super) fn next(&mut self) -> WatchNext {
        if !self.initial.is_empty() {
            return WatchNext::Lines(std::mem::take(&mut self.initial));
        }
        let Some(shared) = &self.shared else {
            return WatchNext::End;
        };
        loop {
            let batch: Vec<Entry> = {
                let mut st = shared.lock();
                loop {
                    if st.stopping {
                        return WatchNext::Cut;
                    }
                    if st.generation != self.generation {
                        if st.cut_while_paused || self.next >= st.cut_at {
                            return WatchNext::Cut;
                        }
                        let batch = st.history[self.next..st.cut_at].to_vec();
                        self.next = st.cut_at;
                        break batch;
                    }
                    if !st.paused && self.next < st.history.len() {
                        let batch = st.history[self.next..].to_vec();
                        self.next = st.history.len();
                        break batch;
                    }
                    st = shared
                        .changed
                        .wait_timeout(st, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            let lines: Vec<String> = batch
                .iter()
                .filter_map(|entry| render(entry, &self.selection, self.bookmarks))
                .collect();
            if !lines.is_empty() {
                return WatchNext::Lines(lines);
            }
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.lock().open_watches -= 1;
        }
    }
}

fn patch_pod(req: &RecordedRequest, shared: &Arc<Shared>, ns: &str, name: &str) -> Response {
    let patch: Value = match serde_json::from_slice(&req.body) {
        Ok(p) => p,
        Err(e) => {
            return Response::json(
                400,
                &status_json(400, "BadRequest", &format!("the patch is not JSON: {e}")),
            )
        }
    };
    let key = (ns.to_string(), name.to_string());
    let mut st = shared.lock();
    let Some(old) = st.pods.get(&key).cloned() else {
        drop(st);
        return Response::json(404, &not_found(ns, name));
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
    Response::json(200, &new.to_string())
}

/// A SelfSubjectAccessReview: allowed unless its verb and resource were denied.
fn access_review(req: &RecordedRequest, shared: &Arc<Shared>) -> Response {
    let mut review: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return Response::json(
                400,
                &status_json(400, "BadRequest", &format!("the review is not JSON: {e}")),
            )
        }
    };
    let Some(attrs) = review.pointer("/spec/resourceAttributes").cloned() else {
        return Response::json(
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
    Response::json(201, &review.to_string())
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

fn not_found(ns: &str, name: &str) -> String {
    status_json(
        404,
        "NotFound",
        &format!("pods \"{name}\" not found in namespace \"{ns}\""),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
