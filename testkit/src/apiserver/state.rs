//! The server's objects, change history and switches, behind one lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};

use serde_json::{json, Value};

use super::RecordedRequest;

/// Which collection a change or a watch is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Pod,
    Namespace,
}

impl Kind {
    pub(super) fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
        }
    }

    /// The field selector keys the real API server supports for this kind.
    pub(super) fn supported_fields(self) -> &'static [&'static str] {
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
pub(super) enum Entry {
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
pub(super) struct State {
    pub(super) rv: u64,
    pub(super) pods: BTreeMap<(String, String), Value>,
    pub(super) namespaces: BTreeMap<String, Value>,
    pub(super) history: Vec<Entry>,
    /// Watches from a version below this answer 410 Gone.
    pub(super) compacted_rv: u64,
    /// Bumped by `drop_watches`: streams of an older generation close.
    pub(super) generation: u64,
    /// At the last `drop_watches`: the history length then, and whether watches were paused
    /// (a cut stream first sends what happened before the cut, unless paused).
    pub(super) cut_at: usize,
    pub(super) cut_while_paused: bool,
    /// While set, open watches send nothing (a partition); changes queue in the history.
    pub(super) paused: bool,
    /// While set, every request answers 403 Forbidden.
    pub(super) forbidden: bool,
    /// (verb, resource[/subresource]) that access reviews answer as not allowed.
    pub(super) denied_access: Vec<(String, String)>,
    pub(super) stopping: bool,
    pub(super) requests: Vec<RecordedRequest>,
    /// Watch streams open now.
    pub(super) open_watches: usize,
    /// List snapshots for `continue` tokens: token id → (version, remaining items).
    pub(super) snapshots: HashMap<u64, (u64, Vec<Value>)>,
    pub(super) next_snapshot: u64,
    pub(super) next_uid: u64,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) changed: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the whole fake down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object; returns it as stored.
    pub(super) fn apply(&self, kind: Kind, mut value: Value) -> Value {
        let mut st = self.lock();
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
        self.changed.notify_all();
        value
    }

    /// Deletes the object `remove` takes out of the state; returns it as deleted.
    pub(super) fn delete(
        &self,
        kind: Kind,
        remove: impl FnOnce(&mut State) -> Option<Value>,
    ) -> Option<Value> {
        let mut st = self.lock();
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
        self.changed.notify_all();
        Some(old)
    }
}

/// The (namespace, name) of an object value ("" when absent).
pub(super) fn identity(value: &Value) -> (String, String) {
    let field = |p: &str| {
        value
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (field("/metadata/namespace"), field("/metadata/name"))
}
