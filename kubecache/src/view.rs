//! The kube cache's read-mostly shared view: pods by UID and by IP, namespaces by name, and
//! the cache's health, for readers on other threads (inbound capture, status writer, health).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use k8s_openapi::api::core::v1::{Namespace, Pod};

/// A cheap, cloneable handle on the kube cache's current objects. Only the kube cache writes.
#[derive(Clone, Default)]
pub struct KubeView {
    inner: Arc<ViewInner>,
}

#[derive(Default)]
struct ViewInner {
    /// Pods on this node by `metadata.uid`.
    pods: DashMap<String, Arc<Pod>>,
    /// Pod IPs (v4 and v6) → pod UID, for pods that own their IP: not `hostNetwork` (they share
    /// the node's), not terminal (a finished pod's IP may already belong to a new one).
    pod_ips: DashMap<IpAddr, String>,
    /// Namespaces by `metadata.name`.
    namespaces: DashMap<String, Arc<Namespace>>,
    pods_connected: AtomicBool,
    namespaces_connected: AtomicBool,
    synced: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// The kube cache's state for readiness and health endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeHealth {
    /// The last request of both watchers succeeded.
    pub connected: bool,
    /// Both initial lists completed at least once.
    pub synced: bool,
    /// The last error, with what to do about it (kept after recovery, for the operator).
    pub last_error: Option<String>,
}

impl KubeView {
    /// A pod on this node by UID.
    pub fn pod(&self, uid: &str) -> Option<Arc<Pod>> {
        self.inner.pods.get(uid).map(|p| p.value().clone())
    }

    /// A pod on this node by namespace and name (a scan: for occasional use).
    pub fn pod_named(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.inner
            .pods
            .iter()
            .find(|e| {
                e.value().metadata.namespace.as_deref() == Some(namespace)
                    && e.value().metadata.name.as_deref() == Some(name)
            })
            .map(|e| e.value().clone())
    }

    /// The pod on this node that owns `ip` (not `hostNetwork`, not terminal).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        let uid = self.inner.pod_ips.get(&ip)?.value().clone();
        self.pod(&uid)
    }

    /// A namespace by name.
    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.inner.namespaces.get(name).map(|n| n.value().clone())
    }

    /// The UIDs of the pods on this node, in no particular order.
    pub fn pod_uids(&self) -> Vec<String> {
        self.inner.pods.iter().map(|e| e.key().clone()).collect()
    }

    /// The names of all namespaces, in no particular order.
    pub fn namespace_names(&self) -> Vec<String> {
        self.inner
            .namespaces
            .iter()
            .map(|e| e.key().clone())
            .collect()
    }

    pub fn pod_count(&self) -> usize {
        self.inner.pods.len()
    }

    pub fn namespace_count(&self) -> usize {
        self.inner.namespaces.len()
    }

    /// Both watchers' last request succeeded.
    pub fn is_connected(&self) -> bool {
        self.inner.pods_connected.load(Ordering::Acquire)
            && self.inner.namespaces_connected.load(Ordering::Acquire)
    }

    /// Both initial lists completed (stays true through later relists: the view still holds
    /// the last complete state meanwhile).
    pub fn is_synced(&self) -> bool {
        self.inner.synced.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn health(&self) -> KubeHealth {
        KubeHealth {
            connected: self.is_connected(),
            synced: self.is_synced(),
            last_error: self.last_error(),
        }
    }

    // Writers, for the kube cache's own thread.

    pub(crate) fn put_pod(&self, uid: String, pod: Arc<Pod>) {
        let new_ips = owned_ips(&pod);
        if let Some(old) = self.inner.pods.insert(uid.clone(), pod) {
            for ip in owned_ips(&old) {
                if !new_ips.contains(&ip) {
                    self.inner.pod_ips.remove_if(&ip, |_, owner| *owner == uid);
                }
            }
        }
        for ip in new_ips {
            self.inner.pod_ips.insert(ip, uid.clone());
        }
    }

    pub(crate) fn remove_pod(&self, uid: &str) -> Option<Arc<Pod>> {
        let (_, old) = self.inner.pods.remove(uid)?;
        for ip in owned_ips(&old) {
            self.inner.pod_ips.remove_if(&ip, |_, owner| owner == uid);
        }
        Some(old)
    }

    pub(crate) fn put_namespace(&self, name: String, namespace: Arc<Namespace>) {
        self.inner.namespaces.insert(name, namespace);
    }

    pub(crate) fn remove_namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.inner.namespaces.remove(name).map(|(_, n)| n)
    }

    pub(crate) fn set_connected(&self, which: Watched, connected: bool) {
        let flag = match which {
            Watched::Pods => &self.inner.pods_connected,
            Watched::Namespaces => &self.inner.namespaces_connected,
        };
        flag.store(connected, Ordering::Release);
    }

    pub(crate) fn set_synced(&self) {
        self.inner.synced.store(true, Ordering::Release);
    }

    pub(crate) fn set_last_error(&self, error: String) {
        *self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// Which of the two watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watched {
    Pods,
    Namespaces,
}

/// The IPs a pod owns (see [`ViewInner::pod_ips`]).
fn owned_ips(pod: &Pod) -> Vec<IpAddr> {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let terminal = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    if host_network || terminal {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|s| s.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};

    fn pod(ips: &[&str], host_network: bool, phase: &str) -> Arc<Pod> {
        Arc::new(Pod {
            spec: Some(PodSpec {
                host_network: Some(host_network),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ips.first().map(|s| s.to_string()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..PodStatus::default()
            }),
            ..Pod::default()
        })
    }

    #[test]
    fn ip_index_follows_pod_changes() {
        let view = KubeView::default();
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        view.put_pod("a".into(), pod(&["10.0.0.5", "fd00::5"], false, "Running"));
        assert_eq!(view.pod_by_ip(v4), view.pod("a"));
        assert!(view.pod_by_ip(v6).is_some());
        // The pod finishes: its IP is free for the next pod.
        view.put_pod("a".into(), pod(&["10.0.0.5"], false, "Succeeded"));
        assert!(view.pod_by_ip(v4).is_none());
        // A new pod takes the IP; removing the old pod keeps the new owner.
        view.put_pod("b".into(), pod(&["10.0.0.5"], false, "Running"));
        view.remove_pod("a");
        assert_eq!(view.pod_by_ip(v4), view.pod("b"));
        // hostNetwork pods share the node's IP and are not indexed.
        view.put_pod("h".into(), pod(&["192.168.1.1"], true, "Running"));
        assert!(view.pod_by_ip("192.168.1.1".parse().unwrap()).is_none());
        view.remove_pod("b");
        assert!(view.pod_by_ip(v4).is_none());
        assert_eq!(view.pod_count(), 1);
    }
}
