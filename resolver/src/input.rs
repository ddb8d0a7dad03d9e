//! What the resolver is told: process events, Kubernetes objects, and the standalone file.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use watcher::ProcEvent;

/// A pod or namespace object from the kube cache (or a recording's `kube` record).
#[derive(Debug, Clone, PartialEq)]
pub enum KubeObject {
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
}

/// A change seen by the kube cache.
#[derive(Debug, Clone, PartialEq)]
pub enum KubeChange {
    /// Added or modified: replaces any earlier version of the object (pods by
    /// `metadata.uid`, namespaces by `metadata.name`).
    Apply(KubeObject),
    /// Removed; only the identifying metadata needs to be set.
    Delete(KubeObject),
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
