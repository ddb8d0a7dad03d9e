//! What the resolver is told: process events, and the facts of pods and namespaces.

use std::sync::Arc;

use watcher::ProcEvent;

use crate::facts::{NamespaceFacts, PodFacts};

/// A change of the node's Kubernetes picture, as the kube cache (or a recording's `kube`
/// record) reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum KubeChange {
    /// A pod added or modified: replaces any earlier facts of the pod with the same uid.
    ApplyPod(PodFacts),
    /// A pod removed.
    DeletePod { uid: Arc<str> },
    /// A namespace added or modified: replaces any earlier facts of the namespace.
    ApplyNamespace { name: String, facts: NamespaceFacts },
    /// A namespace removed.
    DeleteNamespace { name: String },
    /// The initial list of pods and namespaces is complete (a relist completing counts too).
    Synced,
}

/// One input of the resolver.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A process event with its timestamp (ns).
    Proc {
        ts: u64,
        event: ProcEvent,
    },
    Kube(KubeChange),
    /// A cgroup directory the workloads file names was made or removed (standalone mode): its
    /// subtree is enrolled, or its entries go, whether or not a process ever runs in it.
    ConfiguredCgroupsChanged,
}
