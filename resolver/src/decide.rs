//! Istio's ambient membership rules (`shared/design.md`, "Who is ambient"), as a pure function
//! of a pod's and its namespace's facts. Every decision carries its reason, for the logs.

use std::net::IpAddr;

use crate::facts::{NamespaceFacts, PodFacts};
use crate::update::Role;

/// The value of `istio.io/dataplane-mode` that opts in.
pub const AMBIENT: &str = "ambient";
/// The value of `istio.io/dataplane-mode` with which a pod opts out of its namespace's choice.
pub const OPT_OUT: &str = "none";
/// The value of ztunnel pods' `app` label.
pub const ZTUNNEL_APP: &str = "ztunnel";

/// What the rules read besides the objects.
#[derive(Debug, Clone)]
pub struct Rules {
    pub node: String,
    pub system_namespace: String,
    pub excluded_namespaces: Vec<String>,
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub role: Role,
    /// The pod's addresses (IPv4 first); empty for `none`.
    pub ips: Vec<IpAddr>,
    /// Why, in words, for the log line that names the pod (so the text need not repeat its
    /// namespace): a constant, so that deciding allocates nothing but the addresses (a
    /// namespace's change re-decides every pod in it).
    pub reason: &'static str,
}

impl Decision {
    pub fn none(reason: &'static str) -> Decision {
        Decision {
            role: Role::None,
            ips: Vec::new(),
            reason,
        }
    }
}

impl Rules {
    /// Whether a pod is (one of) the node's ztunnel: `app=ztunnel` in the system namespace, on
    /// this node, not terminated. A pod so labelled elsewhere is an ordinary pod.
    pub fn is_node_ztunnel(&self, pod: &PodFacts) -> bool {
        pod.app.as_deref() == Some(ZTUNNEL_APP)
            && pod.namespace == self.system_namespace
            && pod.node.as_deref() == Some(self.node.as_str())
            && !pod.terminal
    }

    /// The decision for a pod of this node.
    pub fn decide(&self, pod: &PodFacts, namespace: Option<&NamespaceFacts>) -> Decision {
        if self.is_node_ztunnel(pod) {
            return Decision {
                role: Role::Ztunnel,
                ips: pod.ips.clone(),
                reason: "the node's ztunnel: app=ztunnel in the system namespace",
            };
        }
        if pod.terminal {
            return Decision::none("pod is in a terminal phase");
        }
        if pod.host_network {
            return Decision::none("pod uses hostNetwork");
        }
        if self.excluded_namespaces.contains(&pod.namespace) {
            return Decision::none("its namespace is excluded");
        }
        if pod.has_sidecar {
            return Decision::none("pod has a sidecar (sidecar.istio.io/status)");
        }
        if pod.ips.is_empty() {
            return Decision::none("pod has no IP yet");
        }
        let pod_mode = pod.dataplane_mode.as_deref();
        if pod_mode == Some(AMBIENT) {
            return Decision {
                role: Role::Ambient,
                ips: pod.ips.clone(),
                reason: "pod labelled istio.io/dataplane-mode=ambient",
            };
        }
        if pod_mode == Some(OPT_OUT) {
            return Decision::none("pod labelled istio.io/dataplane-mode=none");
        }
        let ns_mode = namespace.and_then(|ns| ns.dataplane_mode.as_deref());
        if ns_mode == Some(AMBIENT) {
            return Decision {
                role: Role::Ambient,
                ips: pod.ips.clone(),
                reason: "its namespace labelled istio.io/dataplane-mode=ambient",
            };
        }
        Decision::none(
            "neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient",
        )
    }
}
