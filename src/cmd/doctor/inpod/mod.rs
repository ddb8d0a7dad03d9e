//! The in-pod checks: is another node agent (istio-cni's) at work on this node? It shows by
//! holding ztunnel's ZDS socket (`socket`) and by its iptables chains in pods' network
//! namespaces (`rules`). With both agents, each would hand ztunnel pods, and istio-cni's rules
//! would capture a pod's traffic a second time behind zbridge's hooks.

pub mod rules;
pub mod socket;

use std::path::PathBuf;

use super::Check;

use rules::{pod_rules_check, MAX_POD_NAMESPACES};
use socket::{check_zds_socket, probe_zds_socket};

/// Where the in-pod checks look.
#[derive(Debug, Clone)]
pub struct InpodTarget {
    /// `--zds-socket`.
    pub zds_socket: PathBuf,
    /// `/proc`, or a simulated one in tests.
    pub proc_root: PathBuf,
    /// How many pod network namespaces to look into: each costs a few process starts.
    pub max_namespaces: usize,
}

impl InpodTarget {
    pub fn new(zds_socket: PathBuf) -> InpodTarget {
        InpodTarget {
            zds_socket,
            proc_root: "/proc".into(),
            max_namespaces: MAX_POD_NAMESPACES,
        }
    }
}

/// The ZDS socket's holder, then istio-cni's chains in pod namespaces.
pub fn inpod_checks(target: &InpodTarget) -> Vec<Check> {
    let state = probe_zds_socket(&target.zds_socket, &target.proc_root);
    vec![
        Check {
            name: "zds socket",
            outcome: check_zds_socket(&target.zds_socket, &state),
        },
        Check {
            name: "istio-cni rules",
            outcome: pod_rules_check(&target.proc_root, target.max_namespaces),
        },
    ]
}
