//! Tells istiod which pods are captured: the pod annotation
//! `ambient.istio.io/redirection: enabled`, set when a pod is captured and removed when it
//! leaves the mesh, as Istio's own node agent does (a JSON merge patch on the `pods/status`
//! subresource, which needs less privilege than `pods`; a removal for a pod that is gone is
//! done).
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

use resolver::{PodName, Role, Update};
use watcher::CgroupId;

use crate::config::client_on_own_runtime;
use crate::{KubeError, KubeView};

/// The annotation istiod reads.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Its value for a captured pod.
pub const REDIRECTION_ENABLED: &str = "enabled";

/// First retry delay after a failed patch; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// A wish for one pod's annotation.
#[derive(Debug)]
struct Wish {
    namespace: String,
    name: String,
    enabled: bool,
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
            view: own_view,
        })
    }

    /// The pod is captured: annotate it.
    pub fn enrolled(&self, namespace: &str, name: &str) {
        self.wish(namespace, name, true);
    }

    /// The pod left the mesh: remove the annotation.
    pub fn unenrolled(&self, namespace: &str, name: &str) {
        self.wish(namespace, name, false);
    }

    /// Follows the resolver's updates: a pod is enrolled while at least one of its cgroups is
    /// `Ambient`, unenrolled when the last one stops being so. Pod names are `NAMESPACE/NAME`
    /// (standalone workloads, without `/`, are not Kubernetes pods and are ignored).
    pub fn observe(&mut self, update: &Update) {
        let (cgroup_id, now_ambient) = match update {
            Update::Upsert(e) => (e.cgroup_id, (e.role == Role::Ambient).then_some(&e.pod)),
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
                self.wish_pod(&pod, true);
            }
        }
        if let Some(pod) = before {
            if let Some(cgroups) = self.ambient_cgroups_per_pod.get_mut(&pod) {
                *cgroups -= 1;
                if *cgroups == 0 {
                    self.ambient_cgroups_per_pod.remove(&pod);
                    self.wish_pod(&pod, false);
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
                .is_some_and(|v| v == REDIRECTION_ENABLED);
            let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name)
            else {
                continue;
            };
            if annotated && !captured.contains(format!("{namespace}/{name}").as_str()) {
                log::info!(
                    "kube status writer: {namespace}/{name} is annotated but not captured \
                     (it left the mesh while no agent watched): removing {REDIRECTION_ANNOTATION}"
                );
                self.wish(namespace, name, false);
            }
        }
    }

    fn wish_pod(&self, pod: &str, enabled: bool) {
        if let Some((namespace, name)) = pod.split_once('/') {
            self.wish(namespace, name, enabled);
        }
    }

    fn wish(&self, namespace: &str, name: &str, enabled: bool) {
        let wish = Wish {
            namespace: namespace.to_string(),
            name: name.to_string(),
            enabled,
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

async fn write_loop(
    client: Client,
    view: Option<KubeView>,
    mut wishes: mpsc::UnboundedReceiver<Wish>,
    unwritten: Arc<AtomicUsize>,
) {
    // In arrival order; a newer wish for the same pod replaces the older one in place.
    let mut pending: Vec<Pending> = Vec::new();
    let add = |pending: &mut Vec<Pending>, wish: Wish| {
        let fresh = Pending {
            wish,
            attempts: 0,
            due: Instant::now(),
        };
        match pending
            .iter_mut()
            .find(|p| p.wish.namespace == fresh.wish.namespace && p.wish.name == fresh.wish.name)
        {
            Some(p) => {
                // The older wish is superseded: done without writing.
                *p = fresh;
                unwritten.fetch_sub(1, Ordering::AcqRel);
            }
            None => pending.push(fresh),
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
        match pending.iter().map(|p| p.due).min() {
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
        let mut index = 0;
        while index < pending.len() {
            if pending[index].due > now {
                index += 1;
                continue;
            }
            if write(&client, view.as_ref(), &pending[index].wish).await {
                pending.remove(index);
                unwritten.fetch_sub(1, Ordering::AcqRel);
            } else {
                let p = &mut pending[index];
                p.attempts += 1;
                let delay = FIRST_RETRY
                    .saturating_mul(1 << (p.attempts - 1).min(10))
                    .min(MAX_RETRY);
                p.due = Instant::now() + delay;
                index += 1;
            }
        }
    }
}

/// Writes one wish; true when done (written, already so, or the pod is gone).
async fn write(client: &Client, view: Option<&KubeView>, wish: &Wish) -> bool {
    let Wish {
        namespace,
        name,
        enabled,
    } = wish;
    if let Some(view) = view {
        if let Some(pod) = view.pod_named(namespace, name) {
            let current = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION));
            if (current.map(String::as_str) == Some(REDIRECTION_ENABLED)) == *enabled {
                return true;
            }
        }
    }
    let value = if *enabled {
        serde_json::Value::from(REDIRECTION_ENABLED)
    } else {
        serde_json::Value::Null
    };
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
                if *enabled { "set" } else { "removed" }
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
