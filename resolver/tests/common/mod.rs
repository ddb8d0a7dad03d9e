//! Helpers of the resolver's tests: inputs built from JSON as a recording holds them, and the
//! map the updates build.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use resolver::{Enrolment, Input, Resolver, ResolverConfig, Role, Update};
use serde_json::{json, Value};
use watcher::{CgroupId, CgroupRef, KubeAction, KubeRecord, ProcEvent, ProcFacts, ScannedProcess};

pub const NODE: &str = "worker-1";

/// A resolver and what its updates programmed, applied one by one.
pub struct Harness {
    pub resolver: Resolver,
    pub entries: BTreeMap<CgroupId, Enrolment>,
    pub ztunnel: Option<Vec<IpAddr>>,
    pub synced: u32,
    /// Every update, in order, since the last `take_updates`.
    pub log: Vec<Update>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with(ResolverConfig::new(NODE))
    }

    pub fn with(config: ResolverConfig) -> Harness {
        Harness {
            resolver: Resolver::new(config),
            entries: BTreeMap::new(),
            ztunnel: None,
            synced: 0,
            log: Vec::new(),
        }
    }

    pub fn feed(&mut self, input: Input) {
        let mut out = Vec::new();
        self.resolver.handle(input, &mut out);
        self.apply(out);
    }

    pub fn apply(&mut self, out: Vec<Update>) {
        for update in out {
            match &update {
                Update::Upsert(e) => {
                    self.entries.insert(e.cgroup_id, Enrolment::clone(e));
                }
                Update::Delete { cgroup_id } => {
                    assert!(
                        self.entries.remove(cgroup_id).is_some(),
                        "delete of cgroup {cgroup_id} that has no entry"
                    );
                }
                Update::SetZtunnel { ips } => self.ztunnel = Some(ips.clone()),
                Update::Synced => self.synced += 1,
            }
            self.log.push(update);
        }
    }

    pub fn take_updates(&mut self) -> Vec<Update> {
        std::mem::take(&mut self.log)
    }

    pub fn kube(&mut self, action: KubeAction, object: Value) {
        let change =
            kubecache::record::kube_record_to_change(&KubeRecord::from_value(action, &object))
                .expect("test objects are valid");
        self.feed(Input::Kube(change));
    }

    pub fn apply_obj(&mut self, object: Value) {
        self.kube(KubeAction::Apply, object);
    }

    pub fn delete_obj(&mut self, object: Value) {
        self.kube(KubeAction::Delete, object);
    }

    pub fn synced_kube(&mut self) {
        self.feed(Input::Kube(resolver::KubeChange::Synced));
    }

    pub fn exec(&mut self, tgid: u32, path: &str, id: u64) {
        self.feed(proc(ProcEvent::Exec {
            pid: tgid,
            tgid,
            facts: facts(path, id),
        }));
    }

    /// An exec in a network namespace of its own whose addresses are `ips`.
    pub fn exec_with_ips(&mut self, tgid: u32, path: &str, id: u64, ips: &[&str]) {
        self.exec_in_netns(tgid, path, id, 4026532000, ips);
    }

    /// An exec in network namespace `netns`, whose addresses are `ips`.
    pub fn exec_in_netns(&mut self, tgid: u32, path: &str, id: u64, netns: u64, ips: &[&str]) {
        self.feed(proc(ProcEvent::Exec {
            pid: tgid,
            tgid,
            facts: facts_in_netns(path, id, netns, ips),
        }));
    }

    pub fn fork(&mut self, parent: u32, child: u32) {
        self.feed(proc(ProcEvent::Fork {
            parent_pid: parent,
            parent_tgid: parent,
            child_pid: child,
            child_tgid: child,
        }));
    }

    pub fn exit(&mut self, tgid: u32) {
        self.feed(proc(ProcEvent::Exit {
            pid: tgid,
            tgid,
            exit_code: 0,
        }));
    }

    pub fn scan(&mut self, processes: &[(u32, &str, u64)]) {
        self.feed(proc(ProcEvent::Scan {
            processes: processes
                .iter()
                .map(|(pid, path, id)| ScannedProcess {
                    pid: *pid,
                    facts: facts(path, *id),
                })
                .collect(),
        }));
    }

    /// The role and addresses of the entry at `id`, if any.
    pub fn entry(&self, id: u64) -> Option<(Role, Vec<IpAddr>)> {
        self.entries
            .get(&CgroupId(id))
            .map(|e| (e.role, e.ips.clone()))
    }

    /// The live cgroups as (id, path, pod).
    pub fn live(&self) -> Vec<(u64, String, Option<String>)> {
        self.resolver
            .live_cgroups()
            .into_iter()
            .map(|c| (c.id.0, c.path.to_string(), c.pod))
            .collect()
    }
}

pub fn proc(event: ProcEvent) -> Input {
    Input::Proc { ts: 0, event }
}

pub fn facts(path: &str, id: u64) -> ProcFacts {
    ProcFacts {
        cgroup: Some(CgroupRef {
            path: path.into(),
            id: CgroupId(id),
        }),
        ..ProcFacts::default()
    }
}

/// [`facts`] with a network namespace and its addresses.
pub fn facts_in_netns(path: &str, id: u64, netns: u64, ips: &[&str]) -> ProcFacts {
    let mut facts = facts(path, id);
    facts.netns = Some(netns);
    facts.ips = ips.iter().map(|s| ip(s)).collect();
    facts
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A UID made from a small number, e.g. `00000000-0000-4000-8000-000000000007`.
pub fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// A burstable containerd container cgroup of pod `n` (systemd driver), container `c`.
pub fn container_path(n: u32, c: u32) -> String {
    format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{:064x}.scope",
        uid(n).replace('-', "_"),
        c
    )
}

pub fn pod_path(n: u32) -> String {
    format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        uid(n).replace('-', "_")
    )
}

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A running pod of this node with an IP.
pub fn pod(n: u32, ns: &str, name: &str, labels: Value, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid(n), "labels": labels},
        "spec": {"nodeName": NODE, "containers": []},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

pub fn ambient_ns(name: &str) -> Value {
    namespace(name, json!({"istio.io/dataplane-mode": "ambient"}))
}
