//! Random recordings (format v1) for tests and benchmarks, with an independent model of what
//! `zbridge replay` must print for them.
//!
//! The generator plays a node: namespaces whose labels flip, pods (every cgroup layout) that
//! are applied, relabelled, opted out and back in, deleted and recreated, ztunnels replaced,
//! processes that fork, exec (also into other containers, or without facts), exit, reuse pids,
//! and events lost then rescanned. It writes every record, and keeps the simplest possible
//! model of the node as the records describe it; [`Generator::expected`] applies Istio's rules
//! to that model directly (no cgroup parsing, no entries, no ancestors), which is what makes it
//! an independent check of the resolver and programmer. Deterministic for a seed.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};

use serde_json::{json, Value};

/// The node the generated recordings are from.
pub const NODE: &str = "gen-node";

/// Sizes and rates of a generated recording.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub seed: u64,
    /// Records to write after the header (at least this many; the last scan may add one).
    pub records: u64,
    /// Pod slots (each may be recreated with a new uid).
    pub pods: u32,
    /// Ordinary namespaces (besides `istio-system` and `kube-system`).
    pub namespaces: u32,
    /// The number of live processes the generator steers towards.
    pub processes: u32,
    /// Out of 1000 records, how many are Kubernetes changes.
    pub kube_per_mille: u32,
    /// Out of 100,000 records, how many are a `lost` (each followed by a scan).
    pub lost_per_100k: u32,
    /// Whether the facts of a pod's processes carry its network namespace and addresses, as
    /// the live watcher writes them (a pod whose status has no address yet is decided with
    /// them). The benchmark shapes leave them out, so that their figures stay those of the
    /// recordings they were first measured on.
    pub netns_addresses: bool,
}

impl GenConfig {
    /// A small node, for differential tests.
    pub fn small(seed: u64) -> GenConfig {
        GenConfig {
            seed,
            records: 400,
            pods: 12,
            namespaces: 3,
            processes: 60,
            kube_per_mille: 120,
            lost_per_100k: 800,
            netns_addresses: true,
        }
    }

    /// The kube-heavy benchmark node: 3,000 pod slots and 20,000 processes (about ten
    /// thousand live cgroups), with pod records about 15% and namespace label changes about 2%
    /// of all records: the shape where a namespace change re-decides many pods.
    pub fn kube_heavy(records: u64) -> GenConfig {
        GenConfig {
            seed: 2,
            records,
            pods: 3_000,
            namespaces: 20,
            processes: 20_000,
            kube_per_mille: 175,
            lost_per_100k: 1,
            netns_addresses: false,
        }
    }

    /// The benchmark's node: 500 pods, 20,000 processes.
    pub fn bench(records: u64) -> GenConfig {
        GenConfig {
            seed: 1,
            records,
            pods: 500,
            namespaces: 20,
            processes: 20_000,
            kube_per_mille: 5,
            lost_per_100k: 1,
            netns_addresses: false,
        }
    }
}

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Systemd { runtime: usize, qos: usize },
    Cgroupfs { qos: usize, crio: bool },
    Kind { qos: usize },
}

/// A pod as its (latest) object says.
#[derive(Debug, Clone)]
struct PodModel {
    uid: String,
    namespace: String,
    name: String,
    local: bool,
    /// `istio.io/dataplane-mode` label.
    mode: Option<&'static str>,
    ztunnel_label: bool,
    host_network: bool,
    sidecar: bool,
    phase: &'static str,
    /// As in `status.podIPs`, in that order.
    ips: Vec<String>,
    /// The addresses of its network namespace (IPv6 first when it has both, to check the
    /// ordering; none for some pods), fixed for the pod's life.
    netns_ips: Vec<String>,
    created: u64,
    /// Whether the kube cache has it (applied and not deleted).
    known: bool,
}

struct PodSlot {
    pod: PodModel,
    layout: Layout,
    generation: u32,
}

/// A cgroup's path and id (an id is never reused for another path).
#[derive(Debug, Clone)]
struct Cgroup {
    path: String,
    id: u64,
    /// The pod uid it belongs to, if any.
    pod_uid: Option<String>,
    /// The addresses its processes' facts show (those of its pod's network namespace, with
    /// [`GenConfig::netns_addresses`]).
    ips: Vec<String>,
}

/// Writes a random recording and models its expected replay.
pub struct Generator {
    config: GenConfig,
    rng: Rng,
    ts: u64,
    written: u64,
    slots: Vec<PodSlot>,
    namespaces: BTreeMap<String, Option<&'static str>>,
    cgroups: Vec<Cgroup>,
    cgroup_by_path: HashMap<String, usize>,
    /// Live processes → index in `cgroups` (None: the recording never said where).
    procs: HashMap<u32, Option<usize>>,
    live: Vec<u32>,
    live_index: HashMap<u32, usize>,
    next_pid: u32,
    next_id: u64,
    next_created: u64,
    synced: bool,
    line: String,
}

const QOS: [&str; 3] = ["guaranteed", "burstable", "besteffort"];
const RUNTIMES: [&str; 3] = ["cri-containerd", "crio", "docker"];
const HOST_CGROUPS: [&str; 4] = [
    "/init.scope",
    "/system.slice/containerd.service",
    "/system.slice/kubelet.service",
    "/user.slice/user-1000.slice/session-1.scope",
];

impl Generator {
    pub fn new(config: GenConfig) -> Generator {
        let rng = Rng(config.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xdead_beef);
        let mut g = Generator {
            rng,
            ts: 0,
            written: 0,
            slots: Vec::new(),
            namespaces: BTreeMap::new(),
            cgroups: Vec::new(),
            cgroup_by_path: HashMap::new(),
            procs: HashMap::new(),
            live: Vec::new(),
            live_index: HashMap::new(),
            next_pid: 2,
            next_id: 100,
            next_created: 1_700_000_000,
            synced: false,
            line: String::with_capacity(512),
            config,
        };
        for i in 0..g.config.namespaces {
            g.namespaces.insert(format!("ns{i}"), None);
        }
        g.namespaces.insert("istio-system".into(), None);
        g.namespaces.insert("kube-system".into(), None);
        for i in 0..g.config.pods {
            let slot = g.new_slot(i);
            g.slots.push(slot);
        }
        g
    }

    /// Writes the header and the records; returns how many records were written.
    pub fn write_to(&mut self, out: &mut impl Write) -> io::Result<u64> {
        writeln!(
            out,
            "{{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"{NODE}\",\"generator_seed\":{}}}",
            self.config.seed
        )?;
        // Start: a scan of a few host processes, the namespaces and the pods' first versions.
        for (i, path) in HOST_CGROUPS.iter().enumerate() {
            let c = self.cgroup_index(path, None);
            let pid = if i == 0 { 1 } else { self.fresh_pid() };
            self.set_proc(pid, Some(c));
        }
        self.write_scan(out)?;
        let names: Vec<String> = self.namespaces.keys().cloned().collect();
        for ns in names {
            if self.rng.chance(500) {
                self.namespaces.insert(ns.clone(), Some("ambient"));
            }
            self.write_namespace(out, &ns, true)?;
        }
        for s in 0..self.slots.len() {
            self.slots[s].pod.known = true;
            let object = self.pod_object(&self.slots[s].pod);
            self.write_kube(out, "apply", object)?;
        }
        while self.written < self.config.records {
            self.step(out)?;
        }
        Ok(self.written)
    }

    /// What `zbridge replay --output json` must print for the recording (without `stats`).
    pub fn expected(&self) -> Value {
        // Every pod the model knows: the current objects of the slots.
        let known = |uid: &str| -> Option<&PodModel> {
            self.slots
                .iter()
                .map(|s| &s.pod)
                .find(|p| p.uid == uid && p.known && p.local)
        };
        let mut counts: BTreeMap<u64, (usize, u32)> = BTreeMap::new();
        for c in self.procs.values().flatten() {
            let entry = counts.entry(self.cgroups[*c].id).or_insert((*c, 0));
            entry.1 += 1;
        }
        let mut workloads = Vec::new();
        for (id, (c, _)) in counts {
            let cg = &self.cgroups[c];
            let pod = cg.pod_uid.as_deref().and_then(known);
            // Every cgroup of a pod shows the same addresses, those of the pod's namespace.
            let (role, ip) = match pod {
                Some(p) => self.rule(p, &cg.ips),
                None => ("none", None),
            };
            workloads.push(json!({
                "cgroup_id": id,
                "cgroup": cg.path,
                "pod": pod.map(|p| format!("{}/{}", p.namespace, p.name)),
                "ip": ip,
                "role": role,
            }));
        }
        let ztunnel = self
            .slots
            .iter()
            .map(|s| &s.pod)
            .filter(|p| p.known && p.local && self.is_ztunnel(p) && !p.ips.is_empty())
            .max_by_key(|p| p.created);
        let ztunnel_ips: Vec<String> = ztunnel.map(|p| v4_first(&p.ips)).unwrap_or_default();
        json!({"node": NODE, "ztunnel": {"ips": ztunnel_ips}, "workloads": workloads})
    }

    fn is_ztunnel(&self, p: &PodModel) -> bool {
        p.ztunnel_label && p.namespace == "istio-system" && p.local && !is_terminal(p.phase)
    }

    /// Istio's rules, written out plainly: (role, ip). `seen`: the addresses the pod's live
    /// processes showed, which stand in for an address its status does not have yet (not
    /// for ztunnel's).
    fn rule(&self, p: &PodModel, seen: &[String]) -> (&'static str, Option<String>) {
        if self.is_ztunnel(p) {
            return ("ztunnel", v4_first(&p.ips).into_iter().next());
        }
        let ips = if p.ips.is_empty() { seen } else { &p.ips };
        let first = v4_first(ips).into_iter().next();
        let ns_mode = self.namespaces.get(&p.namespace).copied().flatten();
        let ambient = !is_terminal(p.phase)
            && !p.host_network
            && p.namespace != "kube-system"
            && !p.sidecar
            && !ips.is_empty()
            && (p.mode == Some("ambient")
                || (ns_mode == Some("ambient") && p.mode != Some("none")));
        if ambient {
            ("ambient", first)
        } else {
            ("none", None)
        }
    }

    // ---- the node's story ----

    fn new_slot(&mut self, i: u32) -> PodSlot {
        let layout = match self.rng.below(3) {
            0 => Layout::Systemd {
                runtime: self.rng.below(3) as usize,
                qos: self.rng.below(3) as usize,
            },
            1 => Layout::Cgroupfs {
                qos: self.rng.below(3) as usize,
                crio: self.rng.chance(300),
            },
            _ => Layout::Kind {
                qos: self.rng.below(3) as usize,
            },
        };
        let mut slot = PodSlot {
            pod: self.random_pod(i, 0),
            layout,
            generation: 0,
        };
        slot.pod.known = false;
        slot
    }

    fn random_pod(&mut self, slot: u32, generation: u32) -> PodModel {
        let r = self.rng.next();
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            slot,
            generation & 0xffff,
            (r >> 8) & 0xfff,
            (r >> 20) & 0xfff,
            r >> 16
        );
        let ztunnel = slot.is_multiple_of(7);
        let namespace = if ztunnel && self.rng.chance(800) {
            "istio-system".to_string()
        } else if self.rng.chance(80) {
            "kube-system".to_string()
        } else {
            format!(
                "ns{}",
                self.rng.below(u64::from(self.config.namespaces.max(1)))
            )
        };
        self.next_created += 1;
        let mut pod = PodModel {
            uid,
            name: format!("pod{slot}-g{generation}"),
            namespace,
            local: !self.rng.chance(30),
            mode: None,
            ztunnel_label: ztunnel,
            host_network: false,
            sidecar: false,
            phase: "Running",
            ips: Vec::new(),
            netns_ips: netns_ips(slot, generation),
            created: self.next_created,
            known: true,
        };
        self.mutate_pod(&mut pod, slot, generation);
        pod
    }

    /// A random new version of a pod's object.
    fn mutate_pod(&mut self, pod: &mut PodModel, slot: u32, generation: u32) {
        pod.mode = match self.rng.below(4) {
            0 => Some("ambient"),
            1 => Some("none"),
            _ => None,
        };
        pod.host_network = self.rng.chance(60);
        pod.sidecar = self.rng.chance(60);
        pod.phase = match self.rng.below(20) {
            0 => "Succeeded",
            1 => "Failed",
            2 => "Pending",
            _ => "Running",
        };
        let host = slot % 250;
        let net = (generation + self.rng.below(3) as u32) % 250;
        pod.ips = match self.rng.below(10) {
            0 => Vec::new(),
            1 => vec![
                format!("fd00::{:x}:{:x}", net + 1, host + 1),
                format!("10.{}.{}.{}", slot / 250, net, host + 1),
            ],
            _ => vec![format!("10.{}.{}.{}", slot / 250, net, host + 1)],
        };
    }

    fn step(&mut self, out: &mut impl Write) -> io::Result<()> {
        if !self.synced && self.written > self.config.records / 20 {
            self.synced = true;
            return self.write_line(out, "\"type\":\"kube_synced\"".to_string());
        }
        if self.rng.below(100_000) < u64::from(self.config.lost_per_100k) {
            return self.lost_and_scan(out);
        }
        if self.rng.below(1000) < u64::from(self.config.kube_per_mille) {
            return self.kube_change(out);
        }
        let want = u64::from(self.config.processes);
        let live = self.live.len() as u64;
        let roll = self.rng.below(100);
        if live < 8 || (roll < 40 && (live < want || self.rng.chance(300))) {
            self.fork_or_start(out)
        } else if roll < 70 {
            self.exec(out)
        } else {
            self.exit(out)
        }
    }

    fn fork_or_start(&mut self, out: &mut impl Write) -> io::Result<()> {
        // A thread now and then: no new process.
        if !self.live.is_empty() && self.rng.chance(50) {
            let parent = self.random_live();
            let child = self.fresh_pid();
            return self.write_line(
                out,
                format!("\"type\":\"fork\",\"parent_pid\":{parent},\"parent_tgid\":{parent},\"child_pid\":{child},\"child_tgid\":{parent}"),
            );
        }
        if self.live.is_empty() {
            return self.exec(out);
        }
        let parent = self.random_live();
        // Pid reuse: a pid whose exit was never seen (a live one) or a fresh one.
        let child = if self.rng.chance(10) {
            self.random_live()
        } else {
            self.fresh_pid()
        };
        if child == parent {
            return Ok(());
        }
        let cgroup = self.procs[&parent];
        self.set_proc(child, cgroup);
        self.write_line(
            out,
            format!("\"type\":\"fork\",\"parent_pid\":{parent},\"parent_tgid\":{parent},\"child_pid\":{child},\"child_tgid\":{child}"),
        )
    }

    /// An exec: a process (new, or live) in a cgroup (its own, another container of a pod, a
    /// pod-level cgroup, a host cgroup); sometimes without facts.
    fn exec(&mut self, out: &mut impl Write) -> io::Result<()> {
        let pid = if self.live.is_empty() || self.rng.chance(300) {
            self.fresh_pid()
        } else {
            self.random_live()
        };
        if self.rng.chance(30) {
            // Gone before /proc was read: the record has no cgroup.
            self.procs.entry(pid).or_insert(None);
            self.mark_live(pid);
            return self.write_line(
                out,
                format!("\"type\":\"exec\",\"pid\":{pid},\"tgid\":{pid},\"comm\":\"x\""),
            );
        }
        let c = match self.procs.get(&pid).copied().flatten() {
            Some(c) if self.rng.chance(500) => c,
            _ => self.random_cgroup(),
        };
        self.set_proc(pid, Some(c));
        let cg = &self.cgroups[c];
        let line = format!(
            "\"type\":\"exec\",\"pid\":{pid},\"tgid\":{pid},\"comm\":\"app\",\"cgroup\":\"{}\",\"cgroup_id\":{}{}",
            cg.path,
            cg.id,
            netns_fields(cg)
        );
        self.write_line(out, line)
    }

    fn exit(&mut self, out: &mut impl Write) -> io::Result<()> {
        let pid = self.random_live();
        if self.rng.chance(50) {
            // A thread's exit.
            let tid = self.fresh_pid();
            return self.write_line(
                out,
                format!("\"type\":\"exit\",\"pid\":{tid},\"tgid\":{pid},\"exit_code\":0"),
            );
        }
        self.remove_proc(pid);
        self.write_line(
            out,
            format!("\"type\":\"exit\",\"pid\":{pid},\"tgid\":{pid},\"exit_code\":0"),
        )
    }

    /// `lost`, silent changes (forks and exits the recording never shows), then a full scan.
    fn lost_and_scan(&mut self, out: &mut impl Write) -> io::Result<()> {
        self.write_line(out, "\"type\":\"lost\"".to_string())?;
        let silent = self.rng.below(20);
        for _ in 0..silent {
            if self.live.len() > 4 && self.rng.chance(500) {
                let pid = self.random_live();
                self.remove_proc(pid);
            } else if !self.live.is_empty() {
                let parent = self.random_live();
                let child = self.fresh_pid();
                let cgroup = self.procs[&parent];
                self.set_proc(child, cgroup);
            }
        }
        self.write_scan(out)
    }

    fn kube_change(&mut self, out: &mut impl Write) -> io::Result<()> {
        let roll = self.rng.below(100);
        if roll < 12 {
            // A namespace label flips (or the namespace is deleted / re-created).
            let names: Vec<String> = self.namespaces.keys().cloned().collect();
            let ns = names[self.rng.below(names.len() as u64) as usize].clone();
            if self.rng.chance(150) {
                self.namespaces.insert(ns.clone(), None);
                return self.write_namespace(out, &ns, false);
            }
            let label = match self.rng.below(3) {
                0 => None,
                1 => Some("none"),
                _ => Some("ambient"),
            };
            self.namespaces.insert(ns.clone(), label);
            return self.write_namespace(out, &ns, true);
        }
        let s = self.rng.below(self.slots.len() as u64) as usize;
        if roll < 25 && self.slots[s].pod.known {
            // Deleted (its processes may outlive it for a while).
            self.slots[s].pod.known = false;
            let uid = self.slots[s].pod.uid.clone();
            let object = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"uid": uid, "name": self.slots[s].pod.name, "namespace": self.slots[s].pod.namespace}});
            return self.write_kube(out, "delete", object);
        }
        if roll < 35 && !self.slots[s].pod.known {
            // Recreated: a new uid, new cgroups, maybe a new address (ztunnel replaced).
            self.slots[s].generation += 1;
            let generation = self.slots[s].generation;
            self.slots[s].pod = self.random_pod(s as u32, generation);
        } else {
            let mut pod = self.slots[s].pod.clone();
            self.mutate_pod(&mut pod, s as u32, self.slots[s].generation);
            pod.known = true;
            self.slots[s].pod = pod;
        }
        let object = self.pod_object(&self.slots[s].pod);
        self.write_kube(out, "apply", object)
    }

    fn pod_object(&self, p: &PodModel) -> Value {
        let mut labels = serde_json::Map::new();
        if let Some(mode) = p.mode {
            labels.insert("istio.io/dataplane-mode".into(), mode.into());
        }
        if p.ztunnel_label {
            labels.insert("app".into(), "ztunnel".into());
        }
        let mut meta = json!({
            "name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": labels,
            "creationTimestamp": format!("{}", iso(p.created)),
        });
        if p.sidecar {
            meta["annotations"] =
                json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
        }
        let node = if p.local { NODE } else { "other-node" };
        let mut status = json!({"phase": p.phase});
        if let Some(first) = p.ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = Value::Array(p.ips.iter().map(|ip| json!({"ip": ip})).collect());
        }
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "hostNetwork": p.host_network, "containers": [{"name": "app", "image": "app"}]},
            "status": status,
        })
    }

    // ---- cgroups and processes ----

    fn random_cgroup(&mut self) -> usize {
        if self.rng.chance(100) {
            let path = HOST_CGROUPS[self.rng.below(HOST_CGROUPS.len() as u64) as usize];
            return self.cgroup_index(path, None);
        }
        let s = self.rng.below(self.slots.len() as u64) as usize;
        let slot = &self.slots[s];
        let uid = slot.pod.uid.clone();
        let ips = if self.config.netns_addresses {
            slot.pod.netns_ips.clone()
        } else {
            Vec::new()
        };
        let pod_path = pod_path(slot.layout, &uid);
        let path = if self.rng.chance(20) {
            pod_path
        } else {
            let container = self.rng.below(3);
            container_path(slot.layout, &pod_path, &uid, container)
        };
        self.cgroup_index(&path, Some((uid, ips)))
    }

    /// The cgroup at `path` (made on first use, with its pod's uid and the addresses its
    /// processes show).
    fn cgroup_index(&mut self, path: &str, pod: Option<(String, Vec<String>)>) -> usize {
        if let Some(i) = self.cgroup_by_path.get(path) {
            return *i;
        }
        self.next_id += 1 + self.rng.below(5);
        let (pod_uid, ips) = match pod {
            Some((uid, ips)) => (Some(uid), ips),
            None => (None, Vec::new()),
        };
        self.cgroups.push(Cgroup {
            path: path.to_string(),
            id: self.next_id,
            pod_uid,
            ips,
        });
        self.cgroup_by_path
            .insert(path.to_string(), self.cgroups.len() - 1);
        self.cgroups.len() - 1
    }

    fn fresh_pid(&mut self) -> u32 {
        self.next_pid += 1;
        if self.next_pid > 4_000_000 {
            self.next_pid = 2;
        }
        self.next_pid
    }

    fn random_live(&mut self) -> u32 {
        self.live[self.rng.below(self.live.len() as u64) as usize]
    }

    fn mark_live(&mut self, pid: u32) {
        if !self.live_index.contains_key(&pid) {
            self.live_index.insert(pid, self.live.len());
            self.live.push(pid);
        }
    }

    fn set_proc(&mut self, pid: u32, cgroup: Option<usize>) {
        self.procs.insert(pid, cgroup);
        self.mark_live(pid);
    }

    fn remove_proc(&mut self, pid: u32) {
        self.procs.remove(&pid);
        if let Some(i) = self.live_index.remove(&pid) {
            self.live.swap_remove(i);
            if let Some(moved) = self.live.get(i) {
                self.live_index.insert(*moved, i);
            }
        }
    }

    // ---- writing ----

    fn write_line(&mut self, out: &mut impl Write, body: String) -> io::Result<()> {
        self.ts += 1 + self.rng.below(1000);
        self.line.clear();
        self.line.push_str("{\"ts\":");
        self.line.push_str(&self.ts.to_string());
        self.line.push(',');
        self.line.push_str(&body);
        self.line.push_str("}\n");
        self.written += 1;
        out.write_all(self.line.as_bytes())
    }

    fn write_scan(&mut self, out: &mut impl Write) -> io::Result<()> {
        let mut pids: Vec<u32> = self.procs.keys().copied().collect();
        pids.sort_unstable();
        let mut body = String::from("\"type\":\"scan\",\"processes\":[");
        for (i, pid) in pids.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            match self.procs[pid] {
                Some(c) => body.push_str(&format!(
                    "{{\"pid\":{pid},\"cgroup\":\"{}\",\"cgroup_id\":{}{}}}",
                    self.cgroups[c].path,
                    self.cgroups[c].id,
                    netns_fields(&self.cgroups[c])
                )),
                // Still unreadable: listed without facts.
                None => body.push_str(&format!("{{\"pid\":{pid}}}")),
            }
        }
        body.push(']');
        self.write_line(out, body)
    }

    fn write_namespace(&mut self, out: &mut impl Write, ns: &str, apply: bool) -> io::Result<()> {
        let mut meta = json!({"name": ns});
        if let Some(Some(mode)) = self.namespaces.get(ns) {
            meta["labels"] = json!({"istio.io/dataplane-mode": mode});
        }
        let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta});
        self.write_kube(out, if apply { "apply" } else { "delete" }, object)
    }

    fn write_kube(&mut self, out: &mut impl Write, action: &str, object: Value) -> io::Result<()> {
        let body = format!("\"type\":\"kube\",\"action\":\"{action}\",\"object\":{object}");
        self.write_line(out, body)
    }
}

/// A pod's namespace addresses: by slot and generation, no random draw (so that the recordings
/// of shapes without them are those they always were). One pod in eleven has none yet; one in
/// nine has an IPv6 address too, written first.
fn netns_ips(slot: u32, generation: u32) -> Vec<String> {
    let v4 = format!(
        "10.{}.{}.{}",
        100 + slot / 250,
        generation % 250,
        slot % 250 + 1
    );
    match slot % 99 {
        s if s % 11 == 0 => Vec::new(),
        s if s % 9 == 0 => vec![format!("fd00::a:{:x}:{:x}", generation + 1, slot + 1), v4],
        _ => vec![v4],
    }
}

/// `,"netns":N,"ips":[...]` for a cgroup whose processes show addresses; empty otherwise. The
/// namespace's inode is made from its addresses (FNV-1a), so that every cgroup of a pod names
/// the same namespace, as the pod's processes share one.
fn netns_fields(cg: &Cgroup) -> String {
    if cg.ips.is_empty() {
        return String::new();
    }
    let joined = cg.ips.join(",");
    let hash = joined.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let ips: Vec<String> = cg.ips.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        ",\"netns\":{},\"ips\":[{}]",
        4_026_532_000 + hash % 1_000_000_000,
        ips.join(",")
    )
}

fn is_terminal(phase: &str) -> bool {
    phase == "Succeeded" || phase == "Failed"
}

fn v4_first(ips: &[String]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().filter(|s| !s.contains(':')).cloned().collect();
    v.extend(ips.iter().filter(|s| s.contains(':')).cloned());
    v
}

/// Seconds since the epoch as RFC 3339 (UTC), without a date library.
fn iso(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn pod_path(layout: Layout, uid: &str) -> String {
    let u = uid.replace('-', "_");
    match layout {
        Layout::Systemd { qos, .. } | Layout::Kind { qos } => {
            let prefix = if matches!(layout, Layout::Kind { .. }) {
                "/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope/kubelet.slice/kubelet-kubepods.slice".to_string()
            } else {
                "/kubepods.slice".to_string()
            };
            let base = if matches!(layout, Layout::Kind { .. }) {
                "kubelet-kubepods"
            } else {
                "kubepods"
            };
            match QOS[qos] {
                "guaranteed" => format!("{prefix}/{base}-pod{u}.slice"),
                q => format!("{prefix}/{base}-{q}.slice/{base}-{q}-pod{u}.slice"),
            }
        }
        Layout::Cgroupfs { qos, .. } => match QOS[qos] {
            "guaranteed" => format!("/kubepods/pod{uid}"),
            q => format!("/kubepods/{q}/pod{uid}"),
        },
    }
}

fn container_path(layout: Layout, pod_path: &str, uid: &str, container: u64) -> String {
    let id = format!(
        "{:0>48}{:016x}",
        uid.replace('-', "").get(..16).unwrap_or(""),
        container
    );
    match layout {
        Layout::Systemd { runtime, .. } => format!("{pod_path}/{}-{id}.scope", RUNTIMES[runtime]),
        Layout::Kind { .. } => format!("{pod_path}/cri-containerd-{id}.scope"),
        Layout::Cgroupfs { crio: true, .. } => format!("{pod_path}/crio-{id}"),
        Layout::Cgroupfs { crio: false, .. } => format!("{pod_path}/{id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn container_ids_are_64_hex() {
        let uid = "00000001-0000-4abc-8def-0123456789ab";
        let p = container_path(
            Layout::Cgroupfs {
                qos: 0,
                crio: false,
            },
            "/kubepods/podx",
            uid,
            2,
        );
        let id = p.rsplit('/').next().unwrap();
        assert_eq!(id.len(), 64, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
