//! The resolver's state machine: live processes → cgroups → owners (pods, standalone
//! workloads) → decisions → [`Update`]s.
//!
//! Every live process is in at most one cgroup; each cgroup counts its live processes and is
//! forgotten when the count drops to zero. A cgroup's owner (a pod, read from its path, or a
//! standalone subtree) is decided once when the cgroup is first seen. An owner's map entries
//! are the pod-level cgroup when its id is known (a live cgroup, or the injected
//! [`CgroupIds`]), else each of its live cgroups; they are diffed against what was emitted, so
//! nothing is emitted twice for an unchanged decision.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use log::{debug, info, warn};
use rustc_hash::{FxHashMap, FxHashSet};
use watcher::{CgroupId, CgroupRef, Pid, ProcEvent, ProcFacts};

use crate::cgroup_path::{find_pod, PodOf};
use crate::decide::{namespace_opts_in, Decision, Rules};
use crate::facts::{NamespaceFacts, PodFacts};
use crate::input::{Input, KubeChange};
use crate::update::{Capture, Enrolment, Identity, PodName, Role, Update};
use crate::workloads::{ipv4_first, is_within, Address, Mode, Workloads};

/// How many distinct unrecognized pod-like paths are remembered (to log each once).
const UNRECOGNIZED_LOG_LIMIT: usize = 4096;

/// The node's init process: its network namespace is the node's.
const INIT_PID: Pid = 1;

/// Finds the id of a cgroup directory by its path (relative to the cgroup2 root).
///
/// The live agent stats `<cgroup2 root>/<path>`; replay knows no more than the recording.
pub trait CgroupIds {
    fn id_of(&mut self, path: &str) -> Option<CgroupId>;
}

/// Knows no cgroup beyond those that hold live processes (replay, tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCgroupIds;

impl CgroupIds for NoCgroupIds {
    fn id_of(&mut self, _path: &str) -> Option<CgroupId> {
        None
    }
}

/// What the resolver is told by the operator.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// This node's name: only pods whose `spec.nodeName` equals it are local.
    pub node: String,
    /// Where the node's ztunnel runs (`app=ztunnel`).
    pub system_namespace: String,
    /// Namespaces whose pods are never captured.
    pub excluded_namespaces: Vec<String>,
    /// Host cgroup subtrees whose connects to ambient pods are not sent to ztunnel's inbound
    /// port (Kubernetes mode; in standalone mode the workloads file's `exempt` is used).
    pub exempt_cgroups: Vec<String>,
    /// Standalone mode: the workloads file replaces the kube cache, whose inputs are ignored.
    pub workloads: Option<Workloads>,
    /// Where ztunnel listens for ambient pods in Kubernetes mode: in its own namespace
    /// (`Node`, ztunnel's `dedicated` mode) or in each pod's (`InPod`, `shared` mode, fed over
    /// ZDS). Standalone mode takes it from the workloads file.
    pub capture: Capture,
    /// The node's network namespace (its inode), when the caller knows it (the agent runs in
    /// it: the DaemonSet is `hostNetwork`); PID 1's, once its facts are seen, takes its place.
    /// Addresses shown there are never taken for a pod's.
    pub node_netns: Option<u64>,
}

impl ResolverConfig {
    /// Defaults: system namespace `istio-system`, excluded `kube-system`, nothing exempt.
    pub fn new(node: impl Into<String>) -> ResolverConfig {
        ResolverConfig {
            node: node.into(),
            system_namespace: "istio-system".to_string(),
            excluded_namespaces: vec!["kube-system".to_string()],
            exempt_cgroups: Vec::new(),
            workloads: None,
            capture: Capture::Node,
            node_netns: None,
        }
    }
}

/// Who owns a cgroup, and so decides it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum OwnerKey {
    /// A pod, by `metadata.uid`.
    Pod(Arc<str>),
    /// `workloads[i]` of the workloads file.
    Workload(usize),
    /// The workloads file's ztunnel.
    Ztunnel,
    /// An exempt host subtree: the workloads file's `exempt[i]`, or the config's.
    Exempt(usize),
}

/// An owner's map entries, by cgroup.
type Entries = BTreeMap<CgroupId, Arc<Enrolment>>;

/// An owner that holds live cgroups or has entries programmed.
#[derive(Debug)]
struct Owner {
    /// The pod-level cgroup, or the standalone subtree.
    root: Arc<str>,
    /// Its cgroups that hold live processes.
    live: BTreeSet<CgroupId>,
    /// The last decision made for it (`None` before the first): also what was last logged of
    /// it, and which entries were emitted (what the programmer holds).
    decided: Option<Decided>,
    /// The last decision that enrolled it (a role other than `none`) and its entries: emitted
    /// while `decided` is [`Decided::Enrolled`]. After a decision of `none` they are kept while
    /// `stale` is false, so that a decision that flips back (a namespace label flipped to and
    /// fro) emits them again instead of building them again.
    enrolled: Option<Enrolled>,
    /// Something besides the decision changed since the entries were built (its live cgroups,
    /// its pod's facts): the entries must be rebuilt even if the decision is the same.
    stale: bool,
}

/// An owner's last decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decided {
    /// Role `none`, no addresses: nothing emitted.
    Nothing,
    /// The role and addresses of [`Owner::enrolled`], whose entries were emitted.
    Enrolled,
}

/// An enrolling decision and the entries it made.
#[derive(Debug)]
struct Enrolled {
    role: Role,
    ips: Vec<IpAddr>,
    entries: Entries,
}

impl Owner {
    fn new(root: &str) -> Owner {
        Owner {
            root: root.into(),
            live: BTreeSet::new(),
            decided: None,
            enrolled: None,
            stale: true,
        }
    }

    /// The last decision's role and addresses.
    fn decision(&self) -> Option<(Role, &[IpAddr])> {
        match (self.decided?, &self.enrolled) {
            (Decided::Enrolled, Some(enrolled)) => Some((enrolled.role, &enrolled.ips)),
            _ => Some((Role::None, &[])),
        }
    }

    /// The entries emitted for it (what the programmer holds).
    fn emitted(&self) -> Option<&Entries> {
        match (self.decided?, &self.enrolled) {
            (Decided::Enrolled, Some(enrolled)) => Some(&enrolled.entries),
            _ => None,
        }
    }

    /// Takes the entries emitted for it out, leaving it as if nothing had been decided.
    fn take_emitted(&mut self) -> Entries {
        let entries = match (self.decided.take(), self.enrolled.take()) {
            (Some(Decided::Enrolled), Some(enrolled)) => enrolled.entries,
            _ => Entries::new(),
        };
        self.enrolled = None;
        entries
    }

    /// Records `decision`, with `entries` its entries (none for `none`), as emitted.
    fn set_decided(&mut self, decision: Decision, entries: Entries) {
        if decision.role == Role::None {
            self.decided = Some(Decided::Nothing);
            if self.stale {
                self.enrolled = None;
            }
        } else {
            self.decided = Some(Decided::Enrolled);
            self.enrolled = Some(Enrolled {
                role: decision.role,
                ips: decision.ips,
                entries,
            });
        }
    }
}

#[derive(Debug)]
struct CgroupState {
    /// Shared with `by_path` and with the event that named it.
    path: Arc<str>,
    /// Live processes in it.
    live: u32,
    owner: Option<OwnerKey>,
    /// The addresses of the network namespace of the first process seen in it that had any
    /// (for `address: auto`).
    ips: Vec<IpAddr>,
}

/// Where a ztunnel pod stands among the candidates: by creation time, then name, then uid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ZtunnelRank {
    created: Option<i128>,
    name: Arc<str>,
    uid: Arc<str>,
}

impl ZtunnelRank {
    fn of(uid: &Arc<str>, pod: &PodFacts) -> ZtunnelRank {
        ZtunnelRank {
            created: pod.created,
            name: Arc::clone(&pod.name),
            uid: Arc::clone(uid),
        }
    }
}

/// A cgroup that holds live processes, for output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCgroup<'a> {
    pub id: CgroupId,
    pub path: &'a str,
    /// The pod (`NAMESPACE/NAME`) or workload name, when known.
    pub pod: Option<PodName>,
}

/// The resolver. Feed it [`Input`]s with [`Resolver::handle`]; it pushes [`Update`]s.
pub struct Resolver {
    config: ResolverConfig,
    rules: Rules,
    ids: Box<dyn CgroupIds + Send>,
    procs: FxHashMap<Pid, Option<CgroupId>>,
    cgroups: FxHashMap<CgroupId, CgroupState>,
    by_path: FxHashMap<Arc<str>, CgroupId>,
    owners: FxHashMap<OwnerKey, Owner>,
    pods: FxHashMap<Arc<str>, PodFacts>,
    /// The uids of `pods`, by namespace: a namespace's change re-decides only its pods.
    pods_by_namespace: FxHashMap<Arc<str>, BTreeSet<OwnerKey>>,
    namespaces: FxHashMap<String, NamespaceFacts>,
    /// The local pods that qualify as the node's ztunnel and have an address, in the order
    /// that picks one during a rollout (the last is the newest): a ztunnel pod's change looks
    /// only at the last, not at every candidate.
    ztunnel_pods: BTreeSet<ZtunnelRank>,
    kube_synced: bool,
    scan_seen: bool,
    /// `lost` records since the last scan: the first is logged, the others counted (one line
    /// each would flood the log when records are lost by the thousand).
    lost_since_scan: u64,
    synced_emitted: bool,
    started: bool,
    /// The ztunnel addresses last emitted (`None`: nothing emitted yet).
    ztunnel_emitted: Option<Vec<IpAddr>>,
    unrecognized_logged: HashSet<String>,
    /// The node's network namespace (PID 1's, once its facts were seen, else the config's):
    /// addresses shown there are never a pod's.
    host_netns: Option<u64>,
}

impl Resolver {
    /// A resolver that knows only the cgroups its events name ([`NoCgroupIds`]).
    pub fn new(config: ResolverConfig) -> Resolver {
        Resolver::with_cgroup_ids(config, Box::new(NoCgroupIds))
    }

    /// A resolver that asks `ids` for the ids of pod-level cgroups and standalone subtrees.
    pub fn with_cgroup_ids(config: ResolverConfig, ids: Box<dyn CgroupIds + Send>) -> Resolver {
        let host_netns = config.node_netns;
        let rules = Rules {
            node: config.node.clone(),
            system_namespace: config.system_namespace.clone(),
            excluded_namespaces: config.excluded_namespaces.clone(),
        };
        Resolver {
            config,
            rules,
            ids,
            procs: FxHashMap::default(),
            cgroups: FxHashMap::default(),
            by_path: FxHashMap::default(),
            owners: FxHashMap::default(),
            pods: FxHashMap::default(),
            pods_by_namespace: FxHashMap::default(),
            namespaces: FxHashMap::default(),
            ztunnel_pods: BTreeSet::new(),
            kube_synced: false,
            scan_seen: false,
            lost_since_scan: 0,
            synced_emitted: false,
            started: false,
            ztunnel_emitted: None,
            unrecognized_logged: HashSet::new(),
            host_netns,
        }
    }

    pub fn config(&self) -> &ResolverConfig {
        &self.config
    }

    fn standalone(&self) -> bool {
        self.config.workloads.is_some()
    }

    /// Handles one input, pushing the updates it causes onto `out`.
    pub fn handle(&mut self, input: Input, out: &mut Vec<Update>) {
        if !self.started {
            self.started = true;
            let mut keys = self.adopt_configured_subtrees();
            keys.sort();
            for key in keys {
                self.recompute(&key, out);
            }
            self.update_ztunnel(out);
        }
        match input {
            Input::Proc { event, .. } => self.handle_proc(event, out),
            Input::Kube(change) => {
                if self.standalone() {
                    debug!("standalone mode: ignoring a Kubernetes input");
                } else {
                    self.handle_kube(change, out);
                }
            }
            Input::ConfiguredCgroupsChanged => self.refresh_configured_subtrees(out),
        }
        self.maybe_synced(out);
    }

    /// Every cgroup that holds a live process, sorted by id.
    pub fn live_cgroups(&self) -> Vec<LiveCgroup<'_>> {
        let mut all: Vec<LiveCgroup<'_>> = self
            .cgroups
            .iter()
            .map(|(id, state)| LiveCgroup {
                id: *id,
                path: &state.path,
                pod: state.owner.as_ref().and_then(|k| self.owner_name(k)),
            })
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// How many live cgroups neither have an entry nor belong to an owner that has one (not
    /// decided yet, or decided `none`): `zbridge_decisions{role="none"}`. A walk of the live
    /// cgroups that allocates nothing.
    pub fn live_cgroups_without_entries(&self) -> usize {
        self.cgroups
            .values()
            .filter(|c| {
                c.owner
                    .as_ref()
                    .and_then(|key| self.owners.get(key))
                    .and_then(Owner::emitted)
                    .is_none_or(|entries| entries.is_empty())
            })
            .count()
    }

    /// The id of a live cgroup (one holding processes) by its path.
    pub fn live_cgroup_id(&self, path: &str) -> Option<CgroupId> {
        self.by_path.get(path).copied()
    }

    /// How many processes are live.
    pub fn live_processes(&self) -> usize {
        self.procs.len()
    }

    fn owner_name(&self, key: &OwnerKey) -> Option<PodName> {
        match key {
            OwnerKey::Pod(uid) => self.pods.get(uid).map(PodFacts::full_name),
            OwnerKey::Workload(i) => self
                .config
                .workloads
                .as_ref()
                .and_then(|w| w.workloads.get(*i))
                .map(|w| w.name.clone()),
            OwnerKey::Ztunnel | OwnerKey::Exempt(_) => None,
        }
    }

    /// How logs name an owner, and whether its first `none` is quiet (debug): a pod not (yet)
    /// known is the common case before the kube cache syncs.
    fn owner_label(&self, key: &OwnerKey) -> (String, bool) {
        match (self.owner_name(key), key) {
            (Some(name), _) => (name, false),
            (None, OwnerKey::Pod(uid)) => (format!("pod {uid}"), true),
            (None, OwnerKey::Ztunnel) => ("ztunnel (workloads file)".to_string(), false),
            (None, OwnerKey::Exempt(_)) => ("exempt host cgroup".to_string(), false),
            (None, OwnerKey::Workload(i)) => (format!("workloads[{i}]"), false),
        }
    }
}

mod decisions;
mod kube;
mod processes;
mod standalone;

use decisions::{log_decision, usable_ips};
