//! The in-pod gate: where the resolver's in-pod entries meet ztunnel.
//!
//! An in-pod pod's cgroup entry sends its connections to ztunnel's listeners inside the pod's
//! own network namespace; before ztunnel has opened them there (and acked the pod over ZDS),
//! such connections are refused. What the gate does with a pod's entries until then is the
//! agent's fail policy ([`UntilServed`]): by default it lets them through at once, so that the
//! pod's connections are refused rather than let out uncaptured (as with istio-cni, whose rules
//! are in the pod before ztunnel's ack); with `--fail-open` it holds them until ztunnel has
//! acked the pod. Either way it asks the ZDS stage to serve the pod, and once ztunnel has acked
//! it, enrols the pod's namespace in the kernel ([`InPodKernel`]: inbound capture with
//! ztunnel's listener). When the pod's last entry goes, the entries are removed first, then the
//! pod is released in the kernel and ztunnel is told (`del`).
//!
//! The gate itself does no I/O: it turns updates and ZDS events into [`Step`]s that the
//! programmer thread carries out in order.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use resolver::{Capture, Enrolment, Identity, Role, Update};
use watcher::CgroupId;

/// One thing to do, in order.
#[derive(Debug)]
pub enum Step {
    /// Hand the update to the programmer (written with the next batch).
    Queue(Update),
    /// Tell the ZDS stage.
    Zds(zds::Command),
    /// Enrol the pod's namespace in the kernel (with its first entry as its cgroup entry);
    /// once that succeeded, queue the entries it held ([`InPodGate::enrolled`]). `exec_ts`: at
    /// the first enrolment, the kernel's timestamp of the exec that first asked for the pod
    /// (the in-pod enrolment latency ends when the enrolment succeeds).
    Enrol { uid: String, exec_ts: Option<u64> },
    /// Tell the observer that ztunnel serves the pod `pod` (`NAMESPACE/NAME`) as far as is
    /// known: a pod the previous run enrolled, whose namespace's link is still pinned.
    StillServed { pod: String },
    /// Once the batch with the pod's last deletes is written: release the pod in the kernel,
    /// then tell ztunnel.
    ReleaseAfterFlush { uid: String },
}

/// What an in-pod pod's connections do from its decision until ztunnel serves it (acked it
/// over ZDS, and the agent enrolled its namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UntilServed {
    /// Its entries are written at once: its connects go to ztunnel's listeners in its
    /// namespace, which are not open yet, and are refused. Nothing leaves the pod uncaptured
    /// (the default: fail closed, as when no ztunnel is known in node mode).
    #[default]
    Refused,
    /// Its entries wait for ztunnel's ack: its connects go out as if it were not in the mesh
    /// (`--fail-open`).
    Uncaptured,
}

/// When the enrolment of a pod that ztunnel serves failed, it is tried again with ztunnel's
/// ack as it was: `first` after the first failure, twice as long after each further failure in
/// a row, never longer than `max`. A new ack (ztunnel reconnected) is tried at once instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrolRetry {
    pub first: Duration,
    pub max: Duration,
}

impl Default for EnrolRetry {
    fn default() -> Self {
        EnrolRetry {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl EnrolRetry {
    /// How long to wait after the `failures`-th failure in a row (counted from 1).
    pub fn after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }
}

/// ztunnel's ack of a pod: the namespace it serves the pod in, and which process it is.
#[derive(Debug)]
pub struct Served {
    pub netns: OwnedFd,
    pub ztunnel_pid: i32,
}

#[derive(Debug, Default)]
struct Pod {
    identity: Option<Identity>,
    /// The pod's entries, by cgroup: written at once, or (failing open) held until ztunnel
    /// serves the pod.
    entries: BTreeMap<CgroupId, Arc<Enrolment>>,
    served: Option<Served>,
    /// Its entries go to the maps (acked once, enrolled by the previous run, or
    /// [`UntilServed::Refused`]).
    written: bool,
    /// The first exec timestamp among its entries, until its first enrolment.
    asked_since: Option<u64>,
    /// Enrolments failed in a row since the last one that succeeded.
    failed_enrolments: u32,
}

/// The gate. See the module doc.
#[derive(Debug, Default)]
pub struct InPodGate {
    pods: BTreeMap<String, Pod>,
    by_cgroup: HashMap<CgroupId, String>,
    /// Pods the previous run enrolled (their namespace links are pinned): across an agent
    /// restart their entries are written at once, so that the restart leaves no gap while
    /// ztunnel reconnects and acks them again.
    previous: std::collections::BTreeSet<String>,
    until_served: UntilServed,
}

/// Whether an entry is an in-pod pod's, and its identity.
fn in_pod(e: &Enrolment) -> Option<&Identity> {
    match (e.role, e.capture) {
        (Role::Ambient, Capture::InPod { .. }) => e.identity.as_ref(),
        _ => None,
    }
}

impl InPodGate {
    /// A gate under the policy `until_served`, that lets the entries of `previous` pods
    /// (enrolled by the last run) through before their ack whatever the policy.
    pub fn new(
        until_served: UntilServed,
        previous: std::collections::BTreeSet<String>,
    ) -> InPodGate {
        InPodGate {
            previous,
            until_served,
            ..InPodGate::default()
        }
    }

    /// Routes one update of the resolver; `exec_ts`: the exec that caused it, if one did.
    pub fn update(&mut self, update: Update, exec_ts: Option<u64>, steps: &mut Vec<Step>) {
        match update {
            Update::Upsert(e) => match in_pod(&e).cloned() {
                Some(identity) => self.upsert(identity, e, exec_ts, steps),
                None => {
                    // A cgroup that was an in-pod pod's and is now something else.
                    if self.by_cgroup.contains_key(&e.cgroup_id) {
                        self.forget(e.cgroup_id, false, steps);
                    }
                    steps.push(Step::Queue(Update::Upsert(e)));
                }
            },
            Update::Delete { cgroup_id } if self.by_cgroup.contains_key(&cgroup_id) => {
                self.forget(cgroup_id, true, steps);
            }
            // Every pod of the first full picture has been handed to the ZDS stage before it:
            // ztunnel may be sent the snapshot's end (after which it drops what it was not
            // sent).
            Update::Synced => {
                steps.push(Step::Queue(Update::Synced));
                steps.push(Step::Zds(zds::Command::Synced));
            }
            other => steps.push(Step::Queue(other)),
        }
    }

    fn upsert(
        &mut self,
        identity: Identity,
        e: Arc<Enrolment>,
        exec_ts: Option<u64>,
        steps: &mut Vec<Step>,
    ) {
        let uid = identity.uid.clone();
        if let Some(old) = self.by_cgroup.insert(e.cgroup_id, uid.clone()) {
            if old != uid {
                // The cgroup changed pods (a uid reused? never in Kubernetes): drop the old.
                self.by_cgroup.insert(e.cgroup_id, old);
                self.forget(e.cgroup_id, false, steps);
                self.by_cgroup.insert(e.cgroup_id, uid.clone());
            }
        }
        let pod = self.pods.entry(uid.clone()).or_default();
        pod.entries.insert(e.cgroup_id, e.clone());
        if pod.served.is_none() && pod.asked_since.is_none() {
            pod.asked_since = exec_ts;
        }
        if pod.identity.as_ref() != Some(&identity) {
            pod.identity = Some(identity.clone());
            steps.push(Step::Zds(zds::Command::Serve(zds::PodSpec {
                uid: uid.clone(),
                namespace: identity.namespace,
                name: identity.name,
                service_account: identity.service_account,
                cgroup: pod_cgroup(&pod.entries),
            })));
        }
        if pod.served.is_some() {
            // Already served: the change (addresses, DNS) goes to the kernel's per-pod state
            // first, then to the entry.
            steps.push(Step::Enrol { uid, exec_ts: None });
            steps.push(Step::Queue(Update::Upsert(e)));
        } else if pod.written
            || self.previous.contains(&uid)
            || self.until_served == UntilServed::Refused
        {
            if !pod.written && self.previous.contains(&uid) {
                // Not announced as waiting for ztunnel across the agent's restart.
                if let Some(name) = &e.pod {
                    steps.push(Step::StillServed { pod: name.clone() });
                }
            }
            pod.written = true;
            steps.push(Step::Queue(Update::Upsert(e)));
        }
    }

    /// Drops a cgroup from its pod; `delete`: queue the removal of its entry if it was written.
    fn forget(&mut self, cgroup_id: CgroupId, delete: bool, steps: &mut Vec<Step>) {
        let Some(uid) = self.by_cgroup.remove(&cgroup_id) else {
            return;
        };
        let Some(pod) = self.pods.get_mut(&uid) else {
            return;
        };
        pod.entries.remove(&cgroup_id);
        let written = pod.written;
        if delete && written {
            steps.push(Step::Queue(Update::Delete { cgroup_id }));
        }
        if pod.entries.is_empty() {
            self.pods.remove(&uid);
            self.previous.remove(&uid);
            if written {
                steps.push(Step::ReleaseAfterFlush { uid });
            } else {
                // Never written: nothing to remove first.
                steps.push(Step::Zds(zds::Command::Release { uid }));
            }
        }
    }

    /// ztunnel acked a pod: enrol it (then [`InPodGate::enrolled`] or
    /// [`InPodGate::enrol_failed`]).
    pub fn acked(&mut self, uid: &str, served: Served, steps: &mut Vec<Step>) {
        let Some(pod) = self.pods.get_mut(uid) else {
            // Gone meanwhile: its release is on its way to ztunnel.
            return;
        };
        pod.served = Some(served);
        steps.push(Step::Enrol {
            uid: uid.to_string(),
            exec_ts: pod.asked_since.take(),
        });
    }

    /// The pod's namespace is enrolled: its held entries, to be written now (none when they
    /// were written already: a re-ack after ztunnel restarted, or [`UntilServed::Refused`]).
    pub fn enrolled(&mut self, uid: &str) -> Vec<Update> {
        let Some(pod) = self.pods.get_mut(uid) else {
            return Vec::new();
        };
        pod.failed_enrolments = 0;
        if pod.written {
            return Vec::new();
        }
        pod.written = true;
        pod.entries
            .values()
            .map(|e| Update::Upsert(Arc::clone(e)))
            .collect()
    }

    /// The enrolment of a pod failed: it waits for ztunnel's next ack, or for the retry that
    /// hands back the ack returned here ([`InPodGate::acked`]), with the number of failures in
    /// a row. Its entries stay as they are: held ones stay held, written ones stay written
    /// (removing them would let the pod's connections escape ztunnel). `exec_ts`, the failed
    /// [`Step::Enrol`]'s, goes to the next enrolment, so that the in-pod latency ends at the
    /// one that succeeds.
    pub fn enrol_failed(&mut self, uid: &str, exec_ts: Option<u64>) -> Option<(Served, u32)> {
        let pod = self.pods.get_mut(uid)?;
        pod.failed_enrolments += 1;
        pod.asked_since = pod.asked_since.or(exec_ts);
        Some((pod.served.take()?, pod.failed_enrolments))
    }

    /// Whether a pod's entries are written.
    pub fn written(&self, uid: &str) -> bool {
        self.pods.get(uid).is_some_and(|p| p.written)
    }

    /// What [`Step::Enrol`] needs: the namespace, ztunnel's pid and the entry to enrol with.
    pub fn enrolment(&self, uid: &str) -> Option<(&Served, &Enrolment)> {
        let pod = self.pods.get(uid)?;
        Some((pod.served.as_ref()?, &**pod.entries.values().next()?))
    }

    /// The in-pod pods the gate knows (acked or not), by uid.
    pub fn uids(&self) -> impl Iterator<Item = &str> {
        self.pods.keys().map(|s| s.as_str())
    }

    /// How many pods wait for ztunnel's ack.
    pub fn waiting(&self) -> usize {
        self.pods.values().filter(|p| p.served.is_none()).count()
    }
}

/// The pod-level cgroup among a pod's entries: the shortest path (the resolver writes one
/// entry for the pod-level cgroup when it knows its id, else one per container cgroup).
fn pod_cgroup(entries: &BTreeMap<CgroupId, Arc<Enrolment>>) -> String {
    entries
        .values()
        .map(|e| &*e.cgroup)
        .min_by_key(|p| p.len())
        .unwrap_or("/")
        .to_string()
}

/// The kernel side of an in-pod pod: its namespace's inbound capture and per-namespace entry.
pub trait InPodKernel: Send {
    /// Enrols (or re-enrols) a pod that ztunnel serves in `served.netns`.
    fn enrol(&mut self, uid: &str, served: &Served, entry: &Enrolment) -> anyhow::Result<()>;
    /// Releases a pod: its inbound reaches it directly again.
    fn release(&mut self, uid: &str) -> anyhow::Result<()>;
    /// Releases the pods a previous run enrolled that are not in `keep`.
    fn retain(&mut self, keep: &std::collections::BTreeSet<String>) -> anyhow::Result<()>;
}

/// [`InPodKernel`] on the kernel's maps and ztunnel's real listener.
pub struct KernelInPod {
    capture: programmer::inpod::InPodCapture,
}

impl KernelInPod {
    /// Opens the in-pod state under the loader's pin directory and tells the inbound program
    /// the node's own addresses (host-originated traffic bypasses ztunnel, as with Istio).
    pub fn open(
        pin_dir: &std::path::Path,
        node_addrs: &[std::net::IpAddr],
    ) -> anyhow::Result<KernelInPod> {
        use anyhow::Context as _;
        let mut capture = programmer::inpod::InPodCapture::open(pin_dir)
            .context("opening the in-pod capture's maps")?;
        capture
            .set_node_addrs(node_addrs)
            .context("writing the node's addresses for the in-pod inbound program")?;
        Ok(KernelInPod { capture })
    }

    /// The pods enrolled (by this run or pinned by the previous one), by uid.
    pub fn pods(&self) -> std::collections::BTreeSet<String> {
        self.capture
            .pods()
            .into_iter()
            .map(str::to_string)
            .collect()
    }
}

impl InPodKernel for KernelInPod {
    fn enrol(&mut self, uid: &str, served: &Served, entry: &Enrolment) -> anyhow::Result<()> {
        use anyhow::Context as _;
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let netns = std::fs::File::from(served.netns.try_clone()?);
        let inode = netns.metadata()?.ino();
        let listener = programmer::ztunnel_socket::take_listener(
            served.ztunnel_pid,
            inode,
            ztunnel_ports::INBOUND,
        )
        .with_context(|| {
            format!(
                "taking ztunnel's (pid {}) inbound listener in the pod's namespace",
                served.ztunnel_pid
            )
        })?
        .with_context(|| {
            format!(
                "ztunnel (pid {}) has no listener on port {} in the pod's namespace (netns {inode})",
                served.ztunnel_pid,
                ztunnel_ports::INBOUND
            )
        })?;
        self.capture
            .enrol(
                uid,
                netns.as_fd(),
                &listener,
                programmer::programmer::entry_of(entry),
            )
            .context("enrolling the pod's namespace")?;
        Ok(())
    }

    fn release(&mut self, uid: &str) -> anyhow::Result<()> {
        self.capture.remove(uid)?;
        Ok(())
    }

    fn retain(&mut self, keep: &std::collections::BTreeSet<String>) -> anyhow::Result<()> {
        self.capture.retain(keep)?;
        Ok(())
    }
}

/// ztunnel's ports inside a pod's namespace.
mod ztunnel_ports {
    /// Inbound plaintext: what the `sk_lookup` program hands inbound connections to.
    pub const INBOUND: u16 = 15006;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn entry(id: u64, uid: &str) -> Enrolment {
        Enrolment {
            cgroup_id: CgroupId(id),
            cgroup: format!("/kubepods/pod{uid}/c{id}").into(),
            pod: Some(format!("ns/{uid}")),
            role: Role::Ambient,
            ips: vec!["10.0.0.1".parse::<IpAddr>().unwrap()],
            capture: Capture::InPod { dns: false },
            identity: Some(Identity {
                uid: uid.to_string(),
                namespace: "ns".into(),
                name: uid.to_string(),
                service_account: "default".into(),
            }),
        }
    }

    fn served() -> Served {
        Served {
            netns: std::fs::File::open("/proc/self/ns/net").unwrap().into(),
            ztunnel_pid: 1,
        }
    }

    fn names(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Queue(update) => name(update),
                Step::Zds(zds::Command::Serve(p)) => format!("serve {} {}", p.uid, p.cgroup),
                Step::Zds(zds::Command::Release { uid }) => format!("zds release {uid}"),
                Step::Zds(zds::Command::Synced) => "zds synced".to_string(),
                Step::Enrol { uid, .. } => format!("enrol {uid}"),
                Step::ReleaseAfterFlush { uid } => format!("release after flush {uid}"),
                Step::StillServed { pod } => format!("still served {pod}"),
            })
            .collect()
    }

    fn name(update: &Update) -> String {
        match update {
            Update::Upsert(e) => format!("upsert {}", e.cgroup_id),
            Update::Delete { cgroup_id } => format!("delete {cgroup_id}"),
            other => format!("{other:?}"),
        }
    }

    fn enrolled(gate: &mut InPodGate, uid: &str) -> Vec<String> {
        gate.enrolled(uid).iter().map(name).collect()
    }

    fn gate(until_served: UntilServed) -> InPodGate {
        InPodGate::new(until_served, Default::default())
    }

    #[test]
    fn by_default_entries_are_written_at_once_and_the_ack_enrols() {
        let mut gate = gate(UntilServed::default());
        let mut steps = Vec::new();
        gate.update(Update::Upsert(Arc::new(entry(1, "a"))), None, &mut steps);
        gate.update(Update::Upsert(Arc::new(entry(2, "a"))), None, &mut steps);
        assert_eq!(
            names(&steps),
            ["serve a /kubepods/poda/c1", "upsert 1", "upsert 2"]
        );
        assert_eq!(gate.waiting(), 1);
        steps.clear();
        gate.acked("a", served(), &mut steps);
        assert_eq!(names(&steps), ["enrol a"]);
        assert!(enrolled(&mut gate, "a").is_empty(), "written already");
        assert_eq!(gate.waiting(), 0);
    }

    #[test]
    fn failing_open_entries_wait_for_the_ack_and_the_enrolment_comes_first() {
        let mut gate = gate(UntilServed::Uncaptured);
        let mut steps = Vec::new();
        gate.update(Update::Upsert(Arc::new(entry(1, "a"))), None, &mut steps);
        gate.update(Update::Upsert(Arc::new(entry(2, "a"))), None, &mut steps);
        assert_eq!(names(&steps), ["serve a /kubepods/poda/c1"]);
        assert_eq!(gate.waiting(), 1);
        steps.clear();
        gate.acked("a", served(), &mut steps);
        assert_eq!(names(&steps), ["enrol a"]);
        assert_eq!(enrolled(&mut gate, "a"), ["upsert 1", "upsert 2"]);
        assert_eq!(gate.waiting(), 0);
        assert!(gate.enrolment("a").is_some());
        // A re-ack (ztunnel restarted) re-enrols only.
        steps.clear();
        gate.acked("a", served(), &mut steps);
        assert_eq!(names(&steps), ["enrol a"]);
        assert!(enrolled(&mut gate, "a").is_empty());
    }

    /// The first enrolment carries the exec that first asked for the pod, so that the in-pod
    /// enrolment latency runs from that exec until ztunnel serves the pod; a re-ack carries
    /// none.
    #[test]
    fn the_first_enrolment_carries_the_first_exec_timestamp() {
        for until_served in [UntilServed::Refused, UntilServed::Uncaptured] {
            let mut gate = gate(until_served);
            let mut steps = Vec::new();
            gate.update(
                Update::Upsert(Arc::new(entry(1, "a"))),
                Some(100),
                &mut steps,
            );
            gate.update(
                Update::Upsert(Arc::new(entry(2, "a"))),
                Some(200),
                &mut steps,
            );
            let stamps = |steps: &[Step]| -> Vec<Option<u64>> {
                steps
                    .iter()
                    .filter_map(|s| match s {
                        Step::Enrol { exec_ts, .. } => Some(*exec_ts),
                        _ => None,
                    })
                    .collect()
            };
            steps.clear();
            gate.acked("a", served(), &mut steps);
            assert_eq!(stamps(&steps), [Some(100)], "{until_served:?}");
            steps.clear();
            gate.acked("a", served(), &mut steps);
            assert_eq!(stamps(&steps), [None], "{until_served:?}");
        }
    }

    #[test]
    fn the_last_delete_removes_entries_then_releases() {
        for until_served in [UntilServed::Refused, UntilServed::Uncaptured] {
            let mut gate = gate(until_served);
            let mut steps = Vec::new();
            gate.update(Update::Upsert(Arc::new(entry(1, "a"))), None, &mut steps);
            gate.update(Update::Upsert(Arc::new(entry(2, "a"))), None, &mut steps);
            gate.acked("a", served(), &mut steps);
            gate.enrolled("a");
            steps.clear();
            gate.update(
                Update::Delete {
                    cgroup_id: CgroupId(1),
                },
                None,
                &mut steps,
            );
            assert_eq!(names(&steps), ["delete 1"]);
            steps.clear();
            gate.update(
                Update::Delete {
                    cgroup_id: CgroupId(2),
                },
                None,
                &mut steps,
            );
            assert_eq!(names(&steps), ["delete 2", "release after flush a"]);
            assert_eq!(gate.uids().count(), 0);
        }
    }

    #[test]
    fn a_pod_gone_before_its_ack_leaves_the_maps_then_ztunnel() {
        // Held: nothing was written, ztunnel is told at once.
        let mut gate = gate(UntilServed::Uncaptured);
        let mut steps = Vec::new();
        gate.update(Update::Upsert(Arc::new(entry(1, "a"))), None, &mut steps);
        steps.clear();
        let delete = || Update::Delete {
            cgroup_id: CgroupId(1),
        };
        gate.update(delete(), None, &mut steps);
        assert_eq!(names(&steps), ["zds release a"]);
        steps.clear();
        gate.acked("a", served(), &mut steps);
        assert!(
            steps.is_empty(),
            "a late ack enrols nothing: {:?}",
            names(&steps)
        );
        // Written at once: the entry goes first.
        let mut gate = self::gate(UntilServed::Refused);
        gate.update(Update::Upsert(Arc::new(entry(1, "a"))), None, &mut steps);
        steps.clear();
        gate.update(delete(), None, &mut steps);
        assert_eq!(names(&steps), ["delete 1", "release after flush a"]);
    }

    #[test]
    fn other_updates_pass_and_a_failed_enrolment_waits_for_the_next_ack() {
        let mut gate = gate(UntilServed::Uncaptured);
        let mut steps = Vec::new();
        let mut node = entry(9, "n");
        node.capture = Capture::Node;
        node.identity = None;
        gate.update(Update::Upsert(Arc::new(node)), None, &mut steps);
        gate.update(Update::Synced, None, &mut steps);
        gate.update(
            Update::Delete {
                cgroup_id: CgroupId(9),
            },
            None,
            &mut steps,
        );
        assert_eq!(
            names(&steps),
            ["upsert 9", "Synced", "zds synced", "delete 9"]
        );
        steps.clear();
        gate.update(Update::Upsert(Arc::new(entry(1, "a"))), None, &mut steps);
        gate.acked("a", served(), &mut steps);
        let (_, failures) = gate
            .enrol_failed("a", None)
            .expect("the ack, to try again with");
        assert_eq!(failures, 1);
        assert_eq!(gate.waiting(), 1);
        assert!(!gate.written("a"));
        steps.clear();
        // Not written: a changed entry waits for the next ack too, and is what is written
        // once the enrolment succeeds.
        let mut changed = entry(1, "a");
        changed.ips = vec!["10.0.0.9".parse().unwrap()];
        gate.update(Update::Upsert(Arc::new(changed.clone())), None, &mut steps);
        assert!(names(&steps).is_empty(), "{:?}", names(&steps));
        gate.acked("a", served(), &mut steps);
        assert_eq!(names(&steps), ["enrol a"]);
        let (again, failures) = gate.enrol_failed("a", Some(7)).expect("the ack");
        assert_eq!(failures, 2, "failures in a row are counted");
        steps.clear();
        // The retry hands the same ack back, with the failed enrolment's exec timestamp.
        gate.acked("a", again, &mut steps);
        assert!(
            matches!(&steps[..], [Step::Enrol { uid, exec_ts: Some(7) }] if uid == "a"),
            "{:?}",
            names(&steps)
        );
        let held = gate.enrolled("a");
        assert!(matches!(&held[..], [Update::Upsert(e)] if **e == changed));
        // A success starts the count afresh.
        gate.acked("a", served(), &mut steps);
        assert_eq!(gate.enrol_failed("a", None).map(|(_, n)| n), Some(1));
        // A pod the gate does not know has nothing to try again.
        assert!(gate.enrol_failed("z", None).is_none());
    }

    #[test]
    fn enrolment_retries_double_from_first_up_to_max() {
        let retry = EnrolRetry {
            first: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let waits: Vec<_> = (1..=6).map(|n| retry.after(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry.after(u32::MAX), Duration::from_secs(1));
        assert_eq!(EnrolRetry::default().after(1), Duration::from_secs(1));
    }

    #[test]
    fn pods_of_the_previous_run_keep_their_entries_while_ztunnel_reconnects() {
        let mut gate = InPodGate::new(UntilServed::Uncaptured, ["a".to_string()].into());
        let mut steps = Vec::new();
        gate.update(Update::Upsert(Arc::new(entry(1, "a"))), None, &mut steps);
        gate.update(Update::Upsert(Arc::new(entry(2, "b"))), None, &mut steps);
        assert_eq!(
            names(&steps),
            [
                "serve a /kubepods/poda/c1",
                "still served ns/a",
                "upsert 1",
                "serve b /kubepods/podb/c2"
            ]
        );
        steps.clear();
        gate.acked("a", served(), &mut steps);
        assert_eq!(names(&steps), ["enrol a"]);
        assert!(
            enrolled(&mut gate, "a").is_empty(),
            "entries written already"
        );
    }
}
