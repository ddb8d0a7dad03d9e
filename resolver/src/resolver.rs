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

use log::{debug, info, warn};
use rustc_hash::{FxHashMap, FxHashSet};
use watcher::{CgroupId, CgroupRef, Pid, ProcEvent, ProcFacts};

use crate::cgroup_path::{parse_cgroup_path, CgroupKind};
use crate::decide::{Decision, Rules};
use crate::facts::{NamespaceFacts, PodFacts};
use crate::input::{Input, KubeChange};
use crate::update::{Capture, Enrolment, Identity, PodName, Role, Update};
use crate::workloads::{ipv4_first, is_within, Address, Mode, Workloads, ZtunnelMode};

/// How many distinct unrecognized pod-like paths are remembered (to log each once).
const UNRECOGNIZED_LOG_LIMIT: usize = 4096;

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
        }
    }
}

/// Who owns a cgroup, and so decides it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum OwnerKey {
    /// A pod, by `metadata.uid`.
    Pod(Box<str>),
    /// `workloads[i]` of the workloads file.
    Workload(usize),
    /// The workloads file's ztunnel.
    Ztunnel,
    /// An exempt host subtree: the workloads file's `exempt[i]`, or the config's.
    Exempt(usize),
}

/// An owner that holds live cgroups or has entries programmed.
#[derive(Debug)]
struct Owner {
    /// The pod-level cgroup, or the standalone subtree.
    root: Box<str>,
    /// Its cgroups that hold live processes.
    live: BTreeSet<CgroupId>,
    /// The entries emitted for it (what the programmer holds).
    emitted: BTreeMap<CgroupId, Enrolment>,
    /// The last decision logged, to log changes only.
    logged: Option<(Role, Vec<IpAddr>)>,
    /// The role and addresses `emitted` was built from.
    decided: Option<(Role, Vec<IpAddr>)>,
    /// Something besides the decision changed since `emitted` was built (its live cgroups,
    /// its pod's facts): the entries must be rebuilt even if the decision is the same.
    stale: bool,
}

impl Owner {
    fn new(root: &str) -> Owner {
        Owner {
            root: root.into(),
            live: BTreeSet::new(),
            emitted: BTreeMap::new(),
            logged: None,
            decided: None,
            stale: true,
        }
    }
}

#[derive(Debug)]
struct CgroupState {
    path: Box<str>,
    /// Live processes in it.
    live: u32,
    owner: Option<OwnerKey>,
    /// The addresses of the network namespace of the first process seen in it that had any
    /// (for `address: auto`).
    ips: Vec<IpAddr>,
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
    by_path: FxHashMap<Box<str>, CgroupId>,
    owners: FxHashMap<OwnerKey, Owner>,
    pods: FxHashMap<Box<str>, PodFacts>,
    /// The uids of `pods`, by namespace: a namespace's change re-decides only its pods.
    pods_by_namespace: FxHashMap<String, BTreeSet<OwnerKey>>,
    namespaces: FxHashMap<String, NamespaceFacts>,
    /// Uids of local pods that qualify as the node's ztunnel.
    ztunnel_pods: BTreeSet<Box<str>>,
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
}

impl Resolver {
    /// A resolver that knows only the cgroups its events name ([`NoCgroupIds`]).
    pub fn new(config: ResolverConfig) -> Resolver {
        Resolver::with_cgroup_ids(config, Box::new(NoCgroupIds))
    }

    /// A resolver that asks `ids` for the ids of pod-level cgroups and standalone subtrees.
    pub fn with_cgroup_ids(config: ResolverConfig, ids: Box<dyn CgroupIds + Send>) -> Resolver {
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

    /// The workloads file's subtrees as their directories are now: one made since is enrolled
    /// (before any process runs in it), one removed loses its entries, one made again gets
    /// its new id. Only the subtrees themselves are asked about (`CgroupIds`), nothing else.
    fn refresh_configured_subtrees(&mut self, out: &mut Vec<Update>) {
        let mut keys = self.adopt_configured_subtrees();
        // Owners of configured subtrees that existed already: their root may be gone, or
        // made again with a new id.
        for key in self.owners.keys() {
            if !matches!(key, OwnerKey::Pod(_)) && !keys.contains(key) {
                keys.push(key.clone());
            }
        }
        keys.sort();
        for key in keys {
            if let Some(owner) = self.owners.get_mut(&key) {
                owner.stale = true;
            }
            self.recompute(&key, out);
            if key == OwnerKey::Ztunnel {
                self.update_ztunnel(out);
            }
        }
    }

    /// Replaces the workloads file (standalone mode; `SIGHUP`) and re-decides every cgroup.
    pub fn set_workloads(&mut self, workloads: Workloads, out: &mut Vec<Update>) {
        self.config.workloads = Some(workloads);
        let mut old: BTreeMap<CgroupId, Enrolment> = BTreeMap::new();
        for owner in self.owners.values_mut() {
            old.append(&mut owner.emitted);
        }
        self.owners.clear();
        let mut ids: Vec<CgroupId> = self.cgroups.keys().copied().collect();
        ids.sort();
        for id in &ids {
            let path = self.cgroups[id].path.clone();
            let owner = self.classify(&path);
            if let Some((key, root)) = &owner {
                self.owners
                    .entry(key.clone())
                    .or_insert_with(|| Owner::new(root))
                    .live
                    .insert(*id);
            }
            self.cgroups.get_mut(id).expect("listed above").owner = owner.map(|(k, _)| k);
        }
        self.adopt_configured_subtrees();
        let mut keys: Vec<OwnerKey> = self.owners.keys().cloned().collect();
        keys.sort();
        let mut new: BTreeMap<CgroupId, Enrolment> = BTreeMap::new();
        for key in keys {
            let (decision, desired) = self.desired(&key);
            new.extend(desired.iter().map(|(k, v)| (*k, v.clone())));
            let (label, quiet) = self.owner_label(&key);
            let owner = self.owners.get_mut(&key).expect("listed above");
            owner.emitted = desired;
            owner.decided = Some((decision.role, decision.ips.clone()));
            owner.stale = false;
            log_decision(owner, &decision, &label, quiet);
        }
        for id in old.keys() {
            if !new.contains_key(id) {
                out.push(Update::Delete { cgroup_id: *id });
            }
        }
        for (id, enrolment) in &new {
            if old.get(id) != Some(enrolment) {
                out.push(Update::Upsert(enrolment.clone()));
            }
        }
        self.owners
            .retain(|_, o| !o.live.is_empty() || !o.emitted.is_empty());
        self.update_ztunnel(out);
    }

    /// Makes an owner for every subtree of the workloads file whose directory exists already,
    /// so that it is enrolled before any process in it is seen: the first connect of the first
    /// process started there is captured, with no race against the watcher. (A subtree that
    /// does not exist yet is enrolled when an exec is seen in it.) Returns the owners made.
    fn adopt_configured_subtrees(&mut self) -> Vec<OwnerKey> {
        let Some(workloads) = &self.config.workloads else {
            return Vec::new();
        };
        let mut subtrees: Vec<(OwnerKey, String)> = Vec::new();
        if let Some(z) = &workloads.ztunnel {
            subtrees.push((OwnerKey::Ztunnel, z.cgroup.clone()));
        }
        // In-pod workloads wait for their first process: ztunnel must be handed the pod's
        // network namespace (a process's) and ack before anything is written, so an empty
        // subtree has nothing to enrol yet, and its owner is made by the first exec in it.
        let inpod = workloads
            .ztunnel
            .as_ref()
            .is_some_and(|z| matches!(z.mode, ZtunnelMode::InPod { .. }));
        if !inpod {
            for (i, w) in workloads.workloads.iter().enumerate() {
                subtrees.push((OwnerKey::Workload(i), w.cgroup.clone()));
            }
        }
        for (i, e) in workloads.exempt.iter().enumerate() {
            subtrees.push((OwnerKey::Exempt(i), e.clone()));
        }
        let mut adopted = Vec::new();
        for (key, root) in subtrees {
            if self.owners.contains_key(&key) || self.ids.id_of(&root).is_none() {
                continue;
            }
            self.owners.insert(key.clone(), Owner::new(&root));
            adopted.push(key);
        }
        adopted
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

    // ---- processes ----

    fn handle_proc(&mut self, event: ProcEvent, out: &mut Vec<Update>) {
        match event {
            ProcEvent::Exec { tgid, facts, .. } => self.exec(tgid, facts, out),
            ProcEvent::Fork {
                parent_tgid,
                child_pid,
                child_tgid,
                ..
            } => {
                // A new thread changes no process and no cgroup. The kernel reports a thread's
                // parent as the parent of the whole process (`real_parent`), so
                // `parent_tgid != child_tgid` for it: only `child_pid != child_tgid` tells a
                // thread on a real kernel. The spec's rule (`child_tgid == parent_tgid`) is
                // kept too, for recordings written by hand to the letter of it.
                if child_pid != child_tgid || child_tgid == parent_tgid {
                    return;
                }
                let cgroup = self.procs.get(&parent_tgid).copied().flatten();
                if let Some(id) = cgroup {
                    self.cgroups.get_mut(&id).expect("live cgroup").live += 1;
                }
                debug!("fork {parent_tgid} -> {child_tgid}");
                if let Some(Some(old)) = self.procs.insert(child_tgid, cgroup) {
                    // A pid reused without its exit seen: the old process is gone.
                    self.release(old, out);
                }
            }
            ProcEvent::Exit { pid, tgid, .. } => {
                if pid != tgid {
                    return; // a thread
                }
                debug!("exit {tgid}");
                if let Some(Some(old)) = self.procs.remove(&tgid) {
                    self.release(old, out);
                }
            }
            ProcEvent::Lost => {
                self.lost_since_scan += 1;
                if self.lost_since_scan == 1 {
                    info!("events were lost; waiting for the rescan");
                }
            }
            ProcEvent::Scan { processes } => {
                let lost = std::mem::take(&mut self.lost_since_scan);
                if lost > 1 {
                    info!("rescan after {lost} losses of events");
                }
                let mut listed: FxHashSet<Pid> = FxHashSet::default();
                listed.reserve(processes.len());
                for p in processes {
                    listed.insert(p.pid);
                    self.exec(p.pid, p.facts, out);
                }
                let mut gone: Vec<Pid> = self
                    .procs
                    .keys()
                    .filter(|pid| !listed.contains(pid))
                    .copied()
                    .collect();
                gone.sort_unstable();
                debug!("scan: {} processes, {} gone", listed.len(), gone.len());
                for pid in gone {
                    if let Some(Some(old)) = self.procs.remove(&pid) {
                        self.release(old, out);
                    }
                }
                self.scan_seen = true;
            }
        }
    }

    /// A process is (now) in the cgroup its facts name; without facts, it stays where it was.
    fn exec(&mut self, tgid: Pid, facts: ProcFacts, out: &mut Vec<Update>) {
        let Some(cgroup) = facts.cgroup else {
            debug!("process {tgid}: no cgroup (gone before /proc was read)");
            self.procs.entry(tgid).or_insert(None);
            return;
        };
        let id = cgroup.id;
        if self.procs.get(&tgid) == Some(&Some(id)) {
            return;
        }
        self.acquire(cgroup, facts.ips, out);
        if let Some(Some(old)) = self.procs.insert(tgid, Some(id)) {
            self.release(old, out);
        }
    }

    /// One more live process in `cgroup`.
    fn acquire(&mut self, cgroup: CgroupRef, ips: Vec<IpAddr>, out: &mut Vec<Update>) {
        if let Some(state) = self.cgroups.get_mut(&cgroup.id) {
            state.live += 1;
            if *state.path != *cgroup.path {
                debug!(
                    "cgroup {} is named both {} and {}; keeping the first",
                    cgroup.id, state.path, cgroup.path
                );
            }
            if state.ips.is_empty() && !ips.is_empty() {
                state.ips = usable_ips(ips);
                if let Some(key) = state.owner.clone() {
                    self.on_addresses_seen(key, out);
                }
            }
            return;
        }
        let owner = self.classify(&cgroup.path);
        debug!("cgroup {} {}: first process", cgroup.id, cgroup.path);
        let path: Box<str> = cgroup.path.into_boxed_str();
        self.by_path.insert(path.clone(), cgroup.id);
        self.cgroups.insert(
            cgroup.id,
            CgroupState {
                path,
                live: 1,
                owner: owner.as_ref().map(|(k, _)| k.clone()),
                ips: usable_ips(ips),
            },
        );
        if let Some((key, root)) = owner {
            let owner = self
                .owners
                .entry(key.clone())
                .or_insert_with(|| Owner::new(&root));
            owner.live.insert(cgroup.id);
            owner.stale = true;
            self.recompute(&key, out);
            if key == OwnerKey::Ztunnel {
                self.update_ztunnel(out);
            }
        }
    }

    /// One less live process in cgroup `id`.
    fn release(&mut self, id: CgroupId, out: &mut Vec<Update>) {
        let Some(state) = self.cgroups.get_mut(&id) else {
            return;
        };
        state.live -= 1;
        if state.live > 0 {
            return;
        }
        let state = self.cgroups.remove(&id).expect("present above");
        debug!("cgroup {id} {}: no process left", state.path);
        self.by_path.remove(&state.path);
        if let Some(key) = state.owner {
            if let Some(owner) = self.owners.get_mut(&key) {
                owner.live.remove(&id);
                owner.stale = true;
            }
            self.recompute(&key, out);
            if key == OwnerKey::Ztunnel {
                self.update_ztunnel(out);
            }
        }
    }

    /// The first addresses seen in a cgroup may give an `auto` owner its address.
    fn on_addresses_seen(&mut self, key: OwnerKey, out: &mut Vec<Update>) {
        if matches!(key, OwnerKey::Workload(_) | OwnerKey::Ztunnel) {
            self.recompute(&key, out);
            if key == OwnerKey::Ztunnel {
                self.update_ztunnel(out);
            }
        }
    }

    /// Who owns a cgroup path, and that owner's root (pod-level cgroup or subtree).
    fn classify(&mut self, path: &str) -> Option<(OwnerKey, String)> {
        if let Some(workloads) = &self.config.workloads {
            if let Some(z) = &workloads.ztunnel {
                if is_within(path, &z.cgroup) {
                    return Some((OwnerKey::Ztunnel, z.cgroup.clone()));
                }
            }
            for (i, w) in workloads.workloads.iter().enumerate() {
                if is_within(path, &w.cgroup) {
                    return Some((OwnerKey::Workload(i), w.cgroup.clone()));
                }
            }
            for (i, e) in workloads.exempt.iter().enumerate() {
                if is_within(path, e) {
                    return Some((OwnerKey::Exempt(i), e.clone()));
                }
            }
            return None;
        }
        match parse_cgroup_path(path) {
            CgroupKind::Pod(pod) => {
                return Some((OwnerKey::Pod(pod.uid.into_boxed_str()), pod.pod_path));
            }
            CgroupKind::Unrecognized => {
                if self.unrecognized_logged.len() < UNRECOGNIZED_LOG_LIMIT
                    && self.unrecognized_logged.insert(path.to_string())
                {
                    warn!(
                        "cgroup {path} is under kubepods but no pod uid could be read from it; \
                         treated as a host cgroup (role none)"
                    );
                }
            }
            CgroupKind::Host => {}
        }
        for (i, e) in self.config.exempt_cgroups.iter().enumerate() {
            if is_within(path, e) {
                return Some((OwnerKey::Exempt(i), e.clone()));
            }
        }
        None
    }

    // ---- decisions ----

    /// The decision for an owner and the entries it needs.
    fn desired(&mut self, key: &OwnerKey) -> (Decision, BTreeMap<CgroupId, Enrolment>) {
        let decision = self.decide(key);
        let desired = self.desired_for(key, &decision);
        (decision, desired)
    }

    /// The entries an owner needs under `decision`.
    fn desired_for(
        &mut self,
        key: &OwnerKey,
        decision: &Decision,
    ) -> BTreeMap<CgroupId, Enrolment> {
        let mut desired = BTreeMap::new();
        if decision.role == Role::None {
            return desired;
        }
        let Some(owner) = self.owners.get(key) else {
            return desired;
        };
        let pod = self.owner_name(key);
        let root_id = match self.by_path.get(&owner.root) {
            Some(id) => Some(*id),
            None => {
                let root = owner.root.clone();
                self.ids.id_of(&root)
            }
        };
        let (capture, identity) = match decision.role {
            Role::Ambient => self.capture_of(key),
            _ => (Capture::Node, None),
        };
        let owner = &self.owners[key];
        let enrol = |id: CgroupId, path: &str| Enrolment {
            cgroup_id: id,
            cgroup: path.to_string(),
            pod: pod.clone(),
            role: decision.role,
            ips: decision.ips.clone(),
            capture,
            identity: identity.clone(),
        };
        match root_id {
            Some(id) => {
                desired.insert(id, enrol(id, &owner.root));
            }
            None => {
                for id in &owner.live {
                    desired.insert(*id, enrol(*id, &self.cgroups[id].path));
                }
            }
        }
        desired
    }

    /// Where an ambient owner is captured to, and for in-pod capture who it is.
    fn capture_of(&self, key: &OwnerKey) -> (Capture, Option<Identity>) {
        match key {
            OwnerKey::Pod(uid) => match (self.config.capture, self.pods.get(uid)) {
                (capture @ Capture::InPod { .. }, Some(pod)) => (
                    capture,
                    Some(Identity {
                        uid: pod.uid.clone(),
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        service_account: pod.service_account.clone(),
                    }),
                ),
                _ => (Capture::Node, None),
            },
            // Standalone: the workloads file says where ztunnel listens (v2 `ztunnel.mode`).
            OwnerKey::Workload(i) => {
                let Some(file) = self.config.workloads.as_ref() else {
                    return (Capture::Node, None);
                };
                let inpod = file
                    .ztunnel
                    .as_ref()
                    .is_some_and(|z| matches!(z.mode, ZtunnelMode::InPod { .. }));
                match (inpod, file.workloads.get(*i)) {
                    (true, Some(w)) => {
                        let (namespace, name) = w.zds_namespace_and_name();
                        (
                            Capture::InPod {
                                dns: file.dns_capture,
                            },
                            Some(Identity {
                                uid: w.uid.clone(),
                                namespace: namespace.to_string(),
                                name: name.to_string(),
                                service_account: w.service_account.clone(),
                            }),
                        )
                    }
                    _ => (Capture::Node, None),
                }
            }
            _ => (Capture::Node, None),
        }
    }

    fn decide(&self, key: &OwnerKey) -> Decision {
        match key {
            OwnerKey::Pod(uid) => match self.pods.get(uid) {
                Some(pod) => self
                    .rules
                    .decide(pod, self.namespaces.get(pod.namespace.as_str())),
                None => Decision::none(format!("pod {uid} is not known on this node")),
            },
            OwnerKey::Workload(i) => {
                let Some(w) = self
                    .config
                    .workloads
                    .as_ref()
                    .and_then(|w| w.workloads.get(*i))
                else {
                    return Decision::none("workload no longer in the workloads file");
                };
                if w.mode == Mode::None {
                    return Decision::none("workloads file: mode none");
                }
                let ips = self.address_of(key, &w.address);
                if ips.is_empty() {
                    return Decision::none(
                        "workloads file: address auto, and no address seen in the subtree yet",
                    );
                }
                Decision {
                    role: Role::Ambient,
                    ips,
                    reason: "workloads file: mode ambient".to_string(),
                }
            }
            OwnerKey::Ztunnel => {
                let address = self
                    .config
                    .workloads
                    .as_ref()
                    .and_then(|w| w.ztunnel.as_ref())
                    .map(|z| z.address.clone())
                    .unwrap_or(Address::Fixed(Vec::new()));
                Decision {
                    role: Role::Ztunnel,
                    ips: self.address_of(key, &address),
                    reason: "workloads file: ztunnel".to_string(),
                }
            }
            OwnerKey::Exempt(_) => Decision {
                role: Role::Exempt,
                ips: Vec::new(),
                reason: "exempt host cgroup".to_string(),
            },
        }
    }

    /// A fixed address, or for `auto` the first addresses seen in the owner's live cgroups
    /// (lowest cgroup id first, so that a reload decides the same).
    fn address_of(&self, key: &OwnerKey, address: &Address) -> Vec<IpAddr> {
        match address {
            Address::Fixed(ips) => ips.clone(),
            Address::Auto => self
                .owners
                .get(key)
                .into_iter()
                .flat_map(|o| o.live.iter())
                .filter_map(|id| self.cgroups.get(id))
                .find(|c| !c.ips.is_empty())
                .map(|c| c.ips.clone())
                .unwrap_or_default(),
        }
    }

    /// Re-decides one owner and emits the difference in its entries.
    fn recompute(&mut self, key: &OwnerKey, out: &mut Vec<Update>) {
        let Some(owner) = self.owners.get(key) else {
            return;
        };
        let decision = self.decide(key);
        // Nothing but the decision could have changed, and it did not: the entries are
        // those emitted (a namespace change re-decides every pod in it; most stay the same).
        if !owner.stale
            && owner
                .decided
                .as_ref()
                .is_some_and(|(role, ips)| *role == decision.role && *ips == decision.ips)
        {
            return;
        }
        let desired = self.desired_for(key, &decision);
        let (label, quiet) = self.owner_label(key);
        let owner = self.owners.get_mut(key).expect("checked above");
        owner.decided = Some((decision.role, decision.ips.clone()));
        owner.stale = false;
        for id in owner.emitted.keys() {
            if !desired.contains_key(id) {
                out.push(Update::Delete { cgroup_id: *id });
            }
        }
        for (id, enrolment) in &desired {
            if owner.emitted.get(id) != Some(enrolment) {
                out.push(Update::Upsert(enrolment.clone()));
            }
        }
        owner.emitted = desired;
        log_decision(owner, &decision, &label, quiet);
        if owner.live.is_empty() && owner.emitted.is_empty() {
            self.owners.remove(key);
        }
    }

    /// Re-decides every owner whose pod is in `namespace`.
    fn recompute_namespace(&mut self, namespace: &str, out: &mut Vec<Update>) {
        // Taken out while its owners are re-decided (recompute needs `self`), then put back.
        let Some(keys) = self.pods_by_namespace.remove(namespace) else {
            return;
        };
        for key in &keys {
            self.recompute(key, out);
        }
        self.pods_by_namespace.insert(namespace.to_string(), keys);
    }

    /// The ztunnel address the programs should use; emitted when it changes.
    fn update_ztunnel(&mut self, out: &mut Vec<Update>) {
        let ips = if let Some(workloads) = &self.config.workloads {
            match &workloads.ztunnel {
                Some(z) => self.address_of(&OwnerKey::Ztunnel, &z.address),
                None => Vec::new(),
            }
        } else {
            // Several during a rollout: the newest (then by name, uid) that has an address.
            self.ztunnel_pods
                .iter()
                .filter_map(|uid| self.pods.get(uid))
                .filter(|p| !p.ips.is_empty())
                .max_by(|a, b| (a.created, &a.name, &a.uid).cmp(&(b.created, &b.name, &b.uid)))
                .map(|p| p.ips.clone())
                .unwrap_or_default()
        };
        if self.ztunnel_emitted.as_ref() == Some(&ips) {
            return;
        }
        // Before the first full picture, "no ztunnel" is not known to be true (the kube cache
        // may not have listed the ztunnel pod yet), and the address a previous run pinned is
        // still right: clearing it would fail every captured pod closed while the agent
        // restarts. It is said, if still true, right before `Synced`.
        if ips.is_empty() && !self.synced_emitted {
            return;
        }
        if self.ztunnel_emitted.is_some() || !ips.is_empty() {
            info!("ztunnel address: {}", join_ips(&ips));
        }
        self.ztunnel_emitted = Some(ips.clone());
        out.push(Update::SetZtunnel { ips });
    }

    fn maybe_synced(&mut self, out: &mut Vec<Update>) {
        if self.synced_emitted || !self.scan_seen || !(self.standalone() || self.kube_synced) {
            return;
        }
        self.synced_emitted = true;
        info!("synced: the process scan and the pod and namespace lists are complete");
        self.update_ztunnel(out);
        out.push(Update::Synced);
    }

    // ---- Kubernetes ----

    fn handle_kube(&mut self, change: KubeChange, out: &mut Vec<Update>) {
        match change {
            KubeChange::ApplyPod(facts) if facts.uid.is_empty() => {
                warn!("a pod without metadata.uid was ignored")
            }
            KubeChange::ApplyPod(facts) => {
                if facts.node.as_deref() == Some(self.config.node.as_str()) {
                    self.set_pod(facts.uid.clone().into_boxed_str(), Some(facts), out)
                } else {
                    // Not on this node: forget it if it was (a recording may say so).
                    self.set_pod(facts.uid.into_boxed_str(), None, out)
                }
            }
            KubeChange::DeletePod { uid } if uid.is_empty() => {
                warn!("a pod delete without metadata.uid was ignored")
            }
            KubeChange::DeletePod { uid } => self.set_pod(uid.into_boxed_str(), None, out),
            KubeChange::ApplyNamespace { name, .. } if name.is_empty() => {
                warn!("a namespace without metadata.name was ignored")
            }
            KubeChange::ApplyNamespace { name, facts } => {
                if self.namespaces.get(&name) != Some(&facts) {
                    debug!("namespace {name}: {facts:?}");
                    self.namespaces.insert(name.clone(), facts);
                    self.recompute_namespace(&name, out);
                }
            }
            KubeChange::DeleteNamespace { name } if name.is_empty() => {
                warn!("a namespace delete without metadata.name was ignored")
            }
            KubeChange::DeleteNamespace { name } => {
                if self.namespaces.remove(&name).is_some() {
                    self.recompute_namespace(&name, out);
                }
            }
            KubeChange::Synced => {
                if !self.kube_synced {
                    info!("kube cache synced");
                }
                self.kube_synced = true;
            }
        }
    }

    fn set_pod(&mut self, uid: Box<str>, facts: Option<PodFacts>, out: &mut Vec<Update>) {
        if self.pods.get(&uid) == facts.as_ref() {
            return;
        }
        let was_ztunnel = self.ztunnel_pods.remove(&uid);
        if let Some(old) = self.pods.remove(&uid) {
            if let Some(set) = self.pods_by_namespace.get_mut(&old.namespace) {
                set.remove(&OwnerKey::Pod(uid.clone()));
                if set.is_empty() {
                    self.pods_by_namespace.remove(&old.namespace);
                }
            }
        }
        let mut is_ztunnel = false;
        if let Some(facts) = facts {
            if self.rules.is_node_ztunnel(&facts) {
                self.ztunnel_pods.insert(uid.clone());
                is_ztunnel = true;
            }
            self.pods_by_namespace
                .entry(facts.namespace.clone())
                .or_default()
                .insert(OwnerKey::Pod(uid.clone()));
            self.pods.insert(uid.clone(), facts);
        }
        let key = OwnerKey::Pod(uid);
        // Its name, addresses or identity may have changed, not only its decision.
        if let Some(owner) = self.owners.get_mut(&key) {
            owner.stale = true;
        }
        self.recompute(&key, out);
        if was_ztunnel || is_ztunnel {
            self.update_ztunnel(out);
        }
    }
}

/// Logs a decision when it differs from the last one logged for the owner.
fn log_decision(owner: &mut Owner, decision: &Decision, name: &str, quiet: bool) {
    let now = (decision.role, decision.ips.clone());
    if owner.logged.as_ref() == Some(&now) {
        return;
    }
    let first_none = owner.logged.is_none() && decision.role == Role::None;
    owner.logged = Some(now);
    let ips = if decision.ips.is_empty() {
        String::new()
    } else {
        format!(" {}", join_ips(&decision.ips))
    };
    if quiet && first_none {
        debug!("{name}: cgroup {} → none ({})", owner.root, decision.reason);
    } else {
        info!(
            "{name}: cgroup {} → {}{ips} ({})",
            owner.root,
            decision.role.as_str(),
            decision.reason
        );
    }
}

fn join_ips(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        return "none".to_string();
    }
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Unicast, non-loopback addresses, IPv4 first.
fn usable_ips(ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ipv4_first(
        ips.into_iter()
            .filter(|ip| !ip.is_loopback() && !ip.is_multicast() && !ip.is_unspecified())
            .collect(),
    )
}
