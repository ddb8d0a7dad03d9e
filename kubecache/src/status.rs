//! Tells istiod which pods are captured: the pod annotation
//! `ambient.istio.io/redirection: enabled`, set when a pod is captured and removed when it
//! leaves the mesh, as Istio's own node agent does (a JSON merge patch on the `pods/status`
//! subresource, which needs less privilege than `pods`; a removal for a pod that is gone is
//! done). An in-pod pod whose capture is written before ztunnel serves it is `pending` until
//! then, as Istio's node agent marks a pod whose rules are in but whom ztunnel has not acked:
//! istiod does not count it as captured yet (written only if ztunnel has not served the pod
//! within [`PENDING_GRACE`]).
//!
//! It is downstream of the programmer: it is told of each update once the maps hold it (the
//! agent's pipeline calls [`StatusWriter::observe`] after a batch is written), so a pod is
//! announced captured only when it is.
//!
//! Patches are made on a thread of their own, latest wish per pod wins (an enrol and an unenrol
//! in quick succession send only the unenrol), failures are retried with a capped backoff, and
//! a pod whose annotation already says what we want (as the kube cache's view shows it) is not
//! patched again (an agent restart does not re-patch every pod).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::time::Instant;

use resolver::{Capture, PodName, Role, Update};
use watcher::CgroupId;

use crate::config::client_on_own_runtime;
use crate::{KubeError, KubeView};

/// The annotation istiod reads.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Its value for a captured pod.
pub const REDIRECTION_ENABLED: &str = "enabled";
/// Its value for an in-pod pod captured before ztunnel serves it.
pub const REDIRECTION_PENDING: &str = "pending";

/// First retry delay after a failed patch; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// How long a `pending` wish waits before it is written: ztunnel usually serves a new pod
/// within milliseconds, and its `enabled` then replaces the wish, so that a pod start costs
/// one PATCH (and one round of watch events), not two. istiod counts the pod as not captured
/// meanwhile either way.
const PENDING_GRACE: Duration = Duration::from_secs(1);

/// A wish for one pod's annotation.
#[derive(Debug)]
struct Wish {
    namespace: String,
    name: String,
    /// The annotation's value; `None`: remove it.
    value: Option<&'static str>,
}

impl Wish {
    /// How long after it is made the wish is due.
    fn delay(&self) -> Duration {
        if self.value == Some(REDIRECTION_PENDING) {
            PENDING_GRACE
        } else {
            Duration::ZERO
        }
    }
}

/// Writes the redirection annotation. Stops its thread on [`StatusWriter::stop`] or drop.
pub struct StatusWriter {
    wishes: Option<mpsc::UnboundedSender<Wish>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Wishes sent and not yet done (written, found already so, or the pod gone).
    unwritten: Arc<AtomicUsize>,
    /// For [`StatusWriter::observe`]: the captured cgroups and their pods.
    ambient_cgroups: HashMap<CgroupId, PodName>,
    /// How many of `ambient_cgroups` each pod has: `observe` runs on the programmer's thread
    /// for every update written, so it must not walk every captured cgroup.
    ambient_cgroups_per_pod: HashMap<PodName, usize>,
    /// Captured in-pod pods that ztunnel does not serve yet (annotated `pending`).
    unserved: std::collections::HashSet<PodName>,
    /// In-pod pods ztunnel serves, captured or not yet ([`StatusWriter::served`]).
    served: std::collections::HashSet<PodName>,
    /// The kube cache's view: at `Synced`, pods still annotated from an earlier run that are
    /// not captured now are found there.
    view: Option<KubeView>,
}

impl StatusWriter {
    /// Starts the writer with its own client for `client_config`. With a `view` (the kube
    /// cache's), pods already annotated as wished are not patched.
    pub fn start(
        client_config: kube::Config,
        view: Option<KubeView>,
    ) -> Result<StatusWriter, KubeError> {
        let (runtime, client) = client_on_own_runtime(client_config)?;
        let (wishes, received) = mpsc::unbounded_channel();
        let unwritten = Arc::new(AtomicUsize::new(0));
        let own_view = view.clone();
        let done = unwritten.clone();
        let thread = std::thread::Builder::new()
            .name("kube-status".into())
            .spawn(move || {
                // Off the hot path: see `background`.
                if let Err(e) = crate::background::lower_this_thread() {
                    log::warn!(
                        "kube status writer: cannot lower its thread's priority ({e}); it \
                         competes with the enrolments for the CPU"
                    );
                }
                runtime.block_on(write_loop(client, view, received, done));
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(KubeError::Thread)?;
        Ok(StatusWriter {
            wishes: Some(wishes),
            thread: Some(thread),
            unwritten,
            ambient_cgroups: HashMap::new(),
            ambient_cgroups_per_pod: HashMap::new(),
            unserved: Default::default(),
            served: Default::default(),
            view: own_view,
        })
    }

    /// The pod is captured: annotate it.
    pub fn enrolled(&self, namespace: &str, name: &str) {
        self.wish(namespace, name, Some(REDIRECTION_ENABLED));
    }

    /// The pod left the mesh: remove the annotation.
    pub fn unenrolled(&self, namespace: &str, name: &str) {
        self.wish(namespace, name, None);
    }

    /// ztunnel serves the in-pod pod `pod` (`NAMESPACE/NAME`): `enabled` if it is captured
    /// (it was `pending`), and when it is captured later.
    pub fn served(&mut self, pod: &str) {
        self.served.insert(pod.to_string());
        if self.unserved.remove(pod) {
            self.wish_pod(pod, Some(REDIRECTION_ENABLED));
        }
    }

    /// Follows the resolver's updates: a pod is enrolled while at least one of its cgroups is
    /// `Ambient` (`pending` while it is an in-pod pod ztunnel does not serve yet), unenrolled
    /// when the last one stops being so. Pod names are `NAMESPACE/NAME` (standalone workloads,
    /// without `/`, are not Kubernetes pods and are ignored).
    pub fn observe(&mut self, update: &Update) {
        let mut in_pod = false;
        let (cgroup_id, now_ambient) = match update {
            Update::Upsert(e) => {
                in_pod = matches!(e.capture, Capture::InPod { .. });
                (e.cgroup_id, (e.role == Role::Ambient).then_some(&e.pod))
            }
            Update::Delete { cgroup_id } => (*cgroup_id, None),
            Update::Synced => return self.unenrol_stale(),
            Update::SetZtunnel { .. } => return,
        };
        let now = now_ambient.and_then(|p| p.clone());
        let before = match &now {
            Some(pod) => self.ambient_cgroups.insert(cgroup_id, pod.clone()),
            None => self.ambient_cgroups.remove(&cgroup_id),
        };
        if before == now {
            return;
        }
        if let Some(pod) = now {
            let cgroups = self.ambient_cgroups_per_pod.entry(pod.clone()).or_insert(0);
            *cgroups += 1;
            if *cgroups == 1 {
                if in_pod && !self.served.contains(&pod) {
                    self.unserved.insert(pod.clone());
                    self.wish_pod(&pod, Some(REDIRECTION_PENDING));
                } else {
                    self.wish_pod(&pod, Some(REDIRECTION_ENABLED));
                }
            }
        }
        if let Some(pod) = before {
            if let Some(cgroups) = self.ambient_cgroups_per_pod.get_mut(&pod) {
                *cgroups -= 1;
                if *cgroups == 0 {
                    self.ambient_cgroups_per_pod.remove(&pod);
                    self.unserved.remove(&pod);
                    self.served.remove(&pod);
                    self.wish_pod(&pod, None);
                }
            }
        }
    }

    /// How many wishes are not written yet (queued, or failed and waiting for a retry).
    pub fn unwritten(&self) -> usize {
        self.unwritten.load(Ordering::Acquire)
    }

    /// Stops the thread (wishes not yet written are dropped). Idempotent.
    pub fn stop(&mut self) {
        self.wishes = None; // closing the channel ends the loop
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("kube status writer: the thread panicked");
            }
        }
    }

    /// At `Synced` (the full picture: after a restart, after the maps were reconciled), the
    /// pods the view shows annotated that no captured cgroup belongs to left the mesh while no
    /// agent was watching (or their entries were stale): remove their annotation.
    fn unenrol_stale(&self) {
        let Some(view) = &self.view else {
            return;
        };
        let captured: std::collections::HashSet<&str> =
            self.ambient_cgroups.values().map(String::as_str).collect();
        for uid in view.pod_uids() {
            let Some(pod) = view.pod(&uid) else { continue };
            let annotated = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION))
                .is_some_and(|v| v == REDIRECTION_ENABLED || v == REDIRECTION_PENDING);
            let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name)
            else {
                continue;
            };
            if annotated && !captured.contains(format!("{namespace}/{name}").as_str()) {
                log::info!(
                    "kube status writer: {namespace}/{name} is annotated but not captured \
                     (it left the mesh while no agent watched): removing {REDIRECTION_ANNOTATION}"
                );
                self.wish(namespace, name, None);
            }
        }
    }

    fn wish_pod(&self, pod: &str, value: Option<&'static str>) {
        if let Some((namespace, name)) = pod.split_once('/') {
            self.wish(namespace, name, value);
        }
    }

    fn wish(&self, namespace: &str, name: &str, value: Option<&'static str>) {
        let wish = Wish {
            namespace: namespace.to_string(),
            name: name.to_string(),
            value,
        };
        if let Some(wishes) = &self.wishes {
            self.unwritten.fetch_add(1, Ordering::AcqRel);
            if wishes.send(wish).is_err() {
                self.unwritten.fetch_sub(1, Ordering::AcqRel);
                log::error!("kube status writer: the writer thread is gone; {namespace}/{name} not annotated");
            }
        }
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A wish not yet written.
struct Pending {
    wish: Wish,
    attempts: u32,
    due: Instant,
}

/// The wishes not yet written, in arrival order, at most one per pod: a newer wish for the
/// same pod replaces the older one in its place. Found by pod in constant time, so that a
/// node's worth of wishes at once (the first full picture, an API server that fails for a
/// while) costs no search per wish.
#[derive(Default)]
struct PendingWishes {
    /// By arrival number.
    by_arrival: std::collections::BTreeMap<u64, Pending>,
    /// Each pod's arrival number, by (namespace, name).
    by_pod: HashMap<(String, String), u64>,
    next_arrival: u64,
}

impl PendingWishes {
    /// Adds `wish`; true when it replaced an older wish for the same pod (done without
    /// writing).
    fn add(&mut self, wish: Wish) -> bool {
        let fresh = Pending {
            due: Instant::now() + wish.delay(),
            wish,
            attempts: 0,
        };
        let key = (fresh.wish.namespace.clone(), fresh.wish.name.clone());
        if let Some(arrival) = self.by_pod.get(&key) {
            self.by_arrival.insert(*arrival, fresh);
            return true;
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.by_pod.insert(key, arrival);
        self.by_arrival.insert(arrival, fresh);
        false
    }

    fn remove(&mut self, arrival: u64) {
        if let Some(p) = self.by_arrival.remove(&arrival) {
            self.by_pod.remove(&(p.wish.namespace, p.wish.name));
        }
    }

    /// The earliest time a wish is due.
    fn next_due(&self) -> Option<Instant> {
        self.by_arrival.values().map(|p| p.due).min()
    }

    /// The arrival numbers of the wishes due at `now`, in arrival order.
    fn due(&self, now: Instant) -> Vec<u64> {
        self.by_arrival
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(a, _)| *a)
            .collect()
    }
}

async fn write_loop(
    client: Client,
    view: Option<KubeView>,
    mut wishes: mpsc::UnboundedReceiver<Wish>,
    unwritten: Arc<AtomicUsize>,
) {
    let mut pending = PendingWishes::default();
    let add = |pending: &mut PendingWishes, wish: Wish| {
        if pending.add(wish) {
            // The older wish is superseded: done without writing.
            unwritten.fetch_sub(1, Ordering::AcqRel);
        }
    };
    loop {
        // Take every wish already queued before writing: the latest per pod wins.
        loop {
            match wishes.try_recv() {
                Ok(wish) => add(&mut pending, wish),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        let now = Instant::now();
        match pending.next_due() {
            Some(due) if due <= now => {}
            Some(due) => {
                tokio::select! {
                    wish = wishes.recv() => match wish {
                        Some(wish) => add(&mut pending, wish),
                        None => return,
                    },
                    _ = tokio::time::sleep_until(due) => {}
                }
                continue;
            }
            None => {
                match wishes.recv().await {
                    Some(wish) => add(&mut pending, wish),
                    None => return,
                }
                continue;
            }
        }
        for arrival in pending.due(now) {
            let Some(p) = pending.by_arrival.get(&arrival) else {
                continue;
            };
            if write(&client, view.as_ref(), &p.wish).await {
                pending.remove(arrival);
                unwritten.fetch_sub(1, Ordering::AcqRel);
            } else if let Some(p) = pending.by_arrival.get_mut(&arrival) {
                p.attempts += 1;
                let delay = FIRST_RETRY
                    .saturating_mul(1 << (p.attempts - 1).min(10))
                    .min(MAX_RETRY);
                p.due = Instant::now() + delay;
            }
        }
    }
}

/// Writes one wish; true when done (written, already so, or the pod is gone).
async fn write(client: &Client, view: Option<&KubeView>, wish: &Wish) -> bool {
    let Wish {
        namespace,
        name,
        value,
    } = wish;
    if let Some(view) = view {
        if let Some(pod) = view.pod_named(namespace, name) {
            let current = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION));
            if current.map(String::as_str) == *value {
                return true;
            }
        }
    }
    let patch =
        serde_json::json!({ "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } } });
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            log::debug!(
                "kube status writer: {namespace}/{name}: {REDIRECTION_ANNOTATION} {}",
                value.map_or("removed".to_string(), |v| format!("set to {v}"))
            );
            true
        }
        Err(kube::Error::Api(status)) if status.code == 404 => {
            log::debug!("kube status writer: {namespace}/{name} is gone; nothing to annotate");
            true
        }
        Err(kube::Error::Api(status)) if status.code == 403 => {
            log::warn!(
                "kube status writer: annotating {namespace}/{name}: forbidden (403): {}; grant \
                 the agent's service account patch on pods/status; retrying with backoff",
                status.message
            );
            false
        }
        Err(e) => {
            log::warn!(
                "kube status writer: annotating {namespace}/{name}: {e}; retrying with backoff"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wish(name: &str, enabled: bool) -> Wish {
        Wish {
            namespace: "ns".into(),
            name: name.into(),
            value: enabled.then_some(REDIRECTION_ENABLED),
        }
    }

    fn names_due(pending: &PendingWishes) -> Vec<(String, bool)> {
        pending
            .due(Instant::now())
            .iter()
            .map(|a| {
                let w = &pending.by_arrival[a].wish;
                (w.name.clone(), w.value.is_some())
            })
            .collect()
    }

    #[test]
    fn a_newer_wish_replaces_the_older_in_its_place_and_written_ones_leave() {
        let mut pending = PendingWishes::default();
        assert!(!pending.add(wish("a", true)));
        assert!(!pending.add(wish("b", true)));
        assert!(!pending.add(wish("c", true)));
        // b changes its mind: replaced where it was, not moved to the end.
        assert!(pending.add(wish("b", false)));
        assert_eq!(
            names_due(&pending),
            [("a".into(), true), ("b".into(), false), ("c".into(), true)]
        );
        // a is written; a later wish for it is new again, and comes last.
        let first = pending.due(Instant::now())[0];
        pending.remove(first);
        assert!(!pending.add(wish("a", false)));
        assert_eq!(
            names_due(&pending),
            [("b".into(), false), ("c".into(), true), ("a".into(), false)]
        );
        // One record per pod, in both indexes.
        assert_eq!((pending.by_arrival.len(), pending.by_pod.len()), (3, 3));
    }

    #[test]
    fn only_wishes_due_are_taken_and_the_next_due_time_is_the_earliest() {
        let mut pending = PendingWishes::default();
        pending.add(wish("a", true));
        pending.add(wish("b", true));
        let later = Instant::now() + Duration::from_secs(60);
        let a = pending.by_pod[&("ns".to_string(), "a".to_string())];
        pending.by_arrival.get_mut(&a).unwrap().due = later;
        assert_eq!(names_due(&pending), [("b".into(), true)]);
        let b = pending.by_pod[&("ns".to_string(), "b".to_string())];
        pending.remove(b);
        assert_eq!(pending.next_due(), Some(later));
        assert!(names_due(&pending).is_empty());
    }
}
