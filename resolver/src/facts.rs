//! The facts of pods and namespaces that Istio's ambient rules read: what the resolver keeps
//! of the Kubernetes objects. The kube cache (`kubecache`) makes them from the objects it
//! watches or a recording holds; the resolver never sees an object itself.

use std::net::IpAddr;
use std::sync::Arc;

/// The label that opts a pod or namespace into (or, on a pod, out of) ambient.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Present on pods that carry an Istio sidecar: never captured by ambient.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// The label ztunnel's pods carry (`app=ztunnel`).
pub const APP_LABEL: &str = "app";
/// The service account of a pod that names none (the API server fills it in).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What the ambient rules read from a pod.
///
/// The strings are `Arc<str>`, so that a reader may hand out one copy of each (replay does:
/// those many pods share, and a pod's uid and name in each of its versions): a pod's facts are
/// made on one thread and dropped, when replaced, on another, and the resolver keys its maps
/// by the uid without copying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// `metadata.uid`: the pod's identity (empty only for an object without one, which the
    /// resolver ignores).
    pub uid: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub node: Option<Arc<str>>,
    /// The pod's `istio.io/dataplane-mode` label.
    pub dataplane_mode: Option<Arc<str>>,
    /// The pod's `app` label.
    pub app: Option<Arc<str>>,
    pub host_network: bool,
    pub has_sidecar: bool,
    /// `Succeeded` or `Failed`.
    pub terminal: bool,
    /// `status.podIPs` (or `status.podIP`), IPv4 first.
    pub ips: Vec<IpAddr>,
    /// `metadata.creationTimestamp` in ns since the epoch; `None` when absent (sorts first).
    pub created: Option<i128>,
    /// `spec.serviceAccountName` (`default` when unset, as the API server fills it): the
    /// identity ztunnel serves an in-pod pod with.
    pub service_account: Arc<str>,
}

impl PodFacts {
    /// `NAMESPACE/NAME`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the ambient rules read from a namespace: its labels that matter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceFacts {
    /// The namespace's `istio.io/dataplane-mode` label.
    pub dataplane_mode: Option<String>,
}
