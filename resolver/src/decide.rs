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
            && *pod.namespace == *self.system_namespace
            && pod.node.as_deref() == Some(self.node.as_str())
            && !pod.terminal
    }

    /// The addresses a pod is decided with: those of its status; while its status has none,
    /// for a pod other than the node's ztunnel, those `seen` in its network namespace (the
    /// addresses of the namespace of its first live process that had any). The kubelet
    /// reports a new pod's IP in its status only after its sandbox has started, and its
    /// containers may already run and connect by then; the sandbox's namespace has the address
    /// from the start, as the CNI result that Istio's own node agent captures with does. Once
    /// the status has addresses they alone count. ztunnel's address is what the programs send
    /// every captured connection to: it is taken from its status only.
    ///
    /// `seen` is asked only when it is needed (a namespace's change re-decides every pod in
    /// it).
    pub fn addresses<'a>(
        &self,
        pod: &'a PodFacts,
        seen: impl FnOnce() -> &'a [IpAddr],
    ) -> &'a [IpAddr] {
        if pod.ips.is_empty() && !self.is_node_ztunnel(pod) {
            seen()
        } else {
            &pod.ips
        }
    }

    /// The decision for a pod of this node; `seen` are the addresses seen in its network
    /// namespace ([`Rules::addresses`]).
    pub fn decide<'a>(
        &self,
        pod: &'a PodFacts,
        namespace: Option<&NamespaceFacts>,
        seen: impl FnOnce() -> &'a [IpAddr],
    ) -> Decision {
        let ips = self.addresses(pod, seen);
        let (role, reason) = self.role(pod, namespace, ips);
        Decision {
            role,
            ips: match role {
                Role::None => Vec::new(),
                _ => ips.to_vec(),
            },
            reason,
        }
    }

    /// [`Rules::decide`]'s role and reason, without the addresses (`ips`, what
    /// [`Rules::addresses`] gave, for a role other than `none`): a re-decision that changes
    /// nothing allocates nothing.
    pub fn role(
        &self,
        pod: &PodFacts,
        namespace: Option<&NamespaceFacts>,
        ips: &[IpAddr],
    ) -> (Role, &'static str) {
        if self.is_node_ztunnel(pod) {
            return (
                Role::Ztunnel,
                "the node's ztunnel: app=ztunnel in the system namespace",
            );
        }
        if pod.terminal {
            return (Role::None, "pod is in a terminal phase");
        }
        if pod.host_network {
            return (Role::None, "pod uses hostNetwork");
        }
        if self
            .excluded_namespaces
            .iter()
            .any(|n| **n == *pod.namespace)
        {
            return (Role::None, "its namespace is excluded");
        }
        if pod.has_sidecar {
            return (Role::None, "pod has a sidecar (sidecar.istio.io/status)");
        }
        if ips.is_empty() {
            return (
                Role::None,
                "pod has no IP yet: none in its status or its network namespace",
            );
        }
        let pod_mode = pod.dataplane_mode.as_deref();
        if pod_mode == Some(AMBIENT) {
            return (
                Role::Ambient,
                "pod labelled istio.io/dataplane-mode=ambient",
            );
        }
        if pod_mode == Some(OPT_OUT) {
            return (Role::None, "pod labelled istio.io/dataplane-mode=none");
        }
        if namespace_opts_in(namespace) {
            return (
                Role::Ambient,
                "its namespace labelled istio.io/dataplane-mode=ambient",
            );
        }
        (
            Role::None,
            "neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient",
        )
    }
}

/// Whether a namespace opts its pods in: all that the rules read of a namespace, so that its
/// pods need re-deciding only when this changes.
pub fn namespace_opts_in(namespace: Option<&NamespaceFacts>) -> bool {
    namespace.and_then(|ns| ns.dataplane_mode.as_deref()) == Some(AMBIENT)
}
