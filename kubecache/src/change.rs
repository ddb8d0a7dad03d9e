//! What the kube cache delivers: pod and namespace objects as the API server serves them, and
//! the facts of them the resolver decides on.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP};
use resolver::facts::{
    NamespaceFacts, PodFacts, APP_LABEL, DATAPLANE_MODE_LABEL, DEFAULT_SERVICE_ACCOUNT,
    SIDECAR_STATUS_ANNOTATION,
};
use resolver::workloads::ipv4_first;
use resolver::{Input, KubeChange};

/// A pod or namespace object from the kube cache (or a recording's `kube` record).
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
}

/// A change seen by the kube cache.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Added or modified: replaces any earlier version of the object (pods by
    /// `metadata.uid`, namespaces by `metadata.name`).
    Apply(Object),
    /// Removed; only the identifying metadata needs to be set.
    Delete(Object),
    /// The initial list of pods and namespaces is complete (a relist completing counts too).
    Synced,
}

impl Change {
    /// The change as the resolver takes it: the facts of the object. An object without its
    /// identity (a pod's uid, a namespace's name) keeps it empty, and the resolver ignores it.
    pub fn to_resolver(&self) -> KubeChange {
        match self {
            Change::Apply(Object::Pod(pod)) => KubeChange::ApplyPod(pod_facts(pod)),
            Change::Delete(Object::Pod(pod)) => KubeChange::DeletePod {
                uid: Arc::from(pod.metadata.uid.as_deref().unwrap_or_default()),
            },
            Change::Apply(Object::Namespace(ns)) => KubeChange::ApplyNamespace {
                name: ns.metadata.name.clone().unwrap_or_default(),
                facts: namespace_facts(ns),
            },
            Change::Delete(Object::Namespace(ns)) => KubeChange::DeleteNamespace {
                name: ns.metadata.name.clone().unwrap_or_default(),
            },
            Change::Synced => KubeChange::Synced,
        }
    }
}

/// The kube cache feeds the resolver's input channel directly.
impl From<Change> for Input {
    fn from(change: Change) -> Input {
        Input::Kube(change.to_resolver())
    }
}

/// A pod's addresses, IPv4 first: those of `status.podIPs` that parse, else `status.podIP`.
pub(crate) fn status_ips(pod_ips: Option<&[PodIP]>, pod_ip: Option<&str>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = pod_ips
        .unwrap_or_default()
        .iter()
        .filter_map(|pod_ip| pod_ip.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(pod_ip.and_then(|s| s.parse::<IpAddr>().ok()));
    }
    ipv4_first(ips)
}

/// What the ambient rules read from a pod (its uid empty when it has none).
pub fn pod_facts(pod: &Pod) -> PodFacts {
    let meta = &pod.metadata;
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(|v| Arc::from(v.as_str()));
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let ips = status.map_or_else(Vec::new, |s| {
        status_ips(s.pod_ips.as_deref(), s.pod_ip.as_deref())
    });
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    PodFacts {
        uid: Arc::from(meta.uid.as_deref().unwrap_or_default()),
        namespace: Arc::from(meta.namespace.as_deref().unwrap_or_default()),
        name: Arc::from(meta.name.as_deref().unwrap_or_default()),
        node: spec.and_then(|s| s.node_name.as_deref()).map(Arc::from),
        dataplane_mode: label(DATAPLANE_MODE_LABEL),
        app: label(APP_LABEL),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        has_sidecar: meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION)),
        terminal: phase == "Succeeded" || phase == "Failed",
        ips,
        created: meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_nanosecond()),
        service_account: Arc::from(
            spec.and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .unwrap_or(DEFAULT_SERVICE_ACCOUNT),
        ),
    }
}

/// What the ambient rules read from a namespace.
pub fn namespace_facts(ns: &Namespace) -> NamespaceFacts {
    let labels: Option<&BTreeMap<String, String>> = ns.metadata.labels.as_ref();
    NamespaceFacts {
        dataplane_mode: labels.and_then(|l| l.get(DATAPLANE_MODE_LABEL)).cloned(),
    }
}
