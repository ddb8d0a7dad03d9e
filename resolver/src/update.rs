//! What the resolver tells the programmer.

use std::net::IpAddr;
use std::sync::Arc;
use watcher::CgroupId;

/// The decision for a cgroup: what the BPF programs do for a process in it (or below it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// An ambient pod: its connects go to ztunnel.
    Ambient,
    /// The node's ztunnel: never redirected; its binds to pod addresses are rewritten.
    Ztunnel,
    /// A host cgroup whose connects to ambient pods are not sent to ztunnel's inbound port
    /// (the kubelet's, so that probes reach the pod).
    Exempt,
    /// Not in the mesh.
    None,
}

impl Role {
    /// The name used in replay output, logs and dumps.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ambient => "ambient",
            Role::Ztunnel => "ztunnel",
            Role::Exempt => "exempt",
            Role::None => "none",
        }
    }
}

/// `NAMESPACE/NAME` of a pod, or the `name` of a standalone workload.
pub type PodName = String;

/// Where an ambient pod's connections are captured to: which ztunnel listens for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Capture {
    /// ztunnel listens in its own network namespace on its own address (ztunnel's
    /// `dedicated` mode: a VM, a dev box, standalone v1). Also what every non-ambient role
    /// carries.
    #[default]
    Node,
    /// ztunnel listens inside the pod's own network namespace (ztunnel's `shared` mode, fed
    /// the namespace over ZDS); `dns`: the pod's DNS goes to ztunnel's DNS proxy too.
    InPod { dns: bool },
}

/// One cgroup's entry: what the programmer writes to `cgroup_info_map`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolment {
    pub cgroup_id: CgroupId,
    /// The cgroup's path relative to the cgroup2 root (for logs and dumps). Shared with the
    /// resolver's record of the cgroup.
    pub cgroup: Arc<str>,
    pub pod: Option<PodName>,
    pub role: Role,
    /// The workload's addresses (IPv4 first); empty for exempt host cgroups.
    pub ips: Vec<IpAddr>,
    /// For an ambient pod: where ztunnel listens for it.
    pub capture: Capture,
    /// For an in-pod ambient pod: who it is, for ztunnel (`None` otherwise).
    pub identity: Option<Identity>,
}

/// Who an in-pod pod is: what ztunnel is told when it is handed the pod's namespace (ZDS's
/// `AddWorkload`), so that it serves it with the right workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The pod's `metadata.uid` (standalone: the workload's `uid`).
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

/// A change the programmer must apply. Nothing is emitted twice for an unchanged decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Add or replace the entry of a cgroup. Shared with the resolver's record of what it
    /// emitted, so that an upsert copies no path, name or address.
    Upsert(Arc<Enrolment>),
    /// Remove the entry of a cgroup.
    Delete { cgroup_id: CgroupId },
    /// The node's ztunnel addresses (empty: no ztunnel known).
    SetZtunnel { ips: Vec<IpAddr> },
    /// The resolver has seen a full picture (cache synced and first scan resolved): entries
    /// the programmer holds that no `Upsert` since start confirmed may now be removed.
    Synced,
}
