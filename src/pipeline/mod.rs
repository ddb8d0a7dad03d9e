//! The running agent's wiring: watcher → resolver → programmer, each on its own thread,
//! joined by bounded crossbeam channels. The stages share nothing but those channels (and the
//! read-only status flags and counters here, for the health and metrics endpoints). In
//! Kubernetes mode the kube cache is one more sender on the resolver's input channel
//! ([`Inputs::sender`]), and the pod status writer an [`Observer`] of what was written.
//!
//! The programmer coalesces: after the first update of a burst it keeps taking updates for a
//! short window (or until a batch is full), then writes them as one batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context};
use crossbeam_channel::{bounded, Receiver, Sender};
use kubecache::status::StatusWriter;
use programmer::{MapBackend, Programmer};
use resolver::{Input, Resolver, Role, Update, Workloads};
use watcher::live::StopHandle;
use watcher::{CgroupId, EventSource, ProcEvent, Record};

use crate::ops::{EnrolmentStage, EventKind, Metrics, Readiness};

mod hot_path;
pub use hot_path::HotPathScheduling;
pub mod inpod;
mod program;

use inpod::InPodKernel;
use program::{program, Outputs};

/// How the stages are joined.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Capacity of the watcher → resolver channel (events).
    pub events_capacity: usize,
    /// Capacity of the resolver → programmer channel (updates). How updates are gathered
    /// into batches is the programmer's config ([`programmer::Batching`]).
    pub updates_capacity: usize,
    /// How the watcher, resolver and programmer threads are scheduled.
    pub hot_path: HotPathScheduling,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            events_capacity: 8192,
            updates_capacity: 8192,
            hot_path: HotPathScheduling::default(),
        }
    }
}

/// What the operator tells a running resolver.
#[derive(Debug)]
pub enum Control {
    /// A new workloads file, already parsed and checked (`SIGHUP`).
    Workloads(Box<Workloads>),
}

/// The resolver's input channel. The watcher sends on it; in Kubernetes mode the kube cache
/// does too ([`Inputs::sender`]). The resolver ends once every sender is gone.
pub struct Inputs {
    tx: Sender<Input>,
    rx: Receiver<Input>,
}

impl Inputs {
    /// A bounded channel of `capacity` inputs (see [`PipelineConfig::events_capacity`]).
    pub fn new(capacity: usize) -> Inputs {
        let (tx, rx) = bounded(capacity);
        Inputs { tx, rx }
    }

    /// One more sender, for another source of inputs (the kube cache). It must be dropped
    /// before [`Pipeline::stop`], or the resolver waits for it.
    pub fn sender(&self) -> Sender<Input> {
        self.tx.clone()
    }
}

/// Told of every update once the batch that holds it has been written to the maps (so that
/// what it announces, such as a pod's capture, is already in force).
pub trait Observer: Send {
    fn written(&mut self, update: &Update);
    /// ztunnel serves the in-pod pod `pod` (`NAMESPACE/NAME`): it acked the pod and its
    /// namespace is enrolled. Told before the entries written with it, if any.
    fn served(&mut self, _pod: &str) {}
}

/// The pod status writer annotates pods when their capture is written (`pending` for an
/// in-pod pod ztunnel does not serve yet), and removes the annotation when their last entry
/// is.
impl Observer for StatusWriter {
    fn written(&mut self, update: &Update) {
        self.observe(update);
    }
    fn served(&mut self, pod: &str) {
        StatusWriter::served(self, pod);
    }
}

/// What the pipeline runs.
pub struct Stages<S, B: MapBackend> {
    /// The process events (the live watcher, or a scripted source in tests).
    pub source: S,
    /// Stops `source`: its `next_record` then returns `Ok(None)`.
    pub stop: StopHandle,
    pub inputs: Inputs,
    pub resolver: Resolver,
    pub programmer: Programmer<B>,
    /// Told of each update after it is written (the pod status writer), if any.
    pub observer: Option<Box<dyn Observer>>,
    /// In-pod capture (ztunnel's `shared` mode): the ZDS server and the kernel's per-pod
    /// state. `None` when ztunnel listens in its own namespace.
    pub inpod: Option<InPodStage>,
}

/// What in-pod capture runs beside the programmer.
pub struct InPodStage {
    pub zds: zds::Server,
    pub kernel: Box<dyn InPodKernel>,
    /// The pods the previous run enrolled (see [`InPodGate::new`]).
    pub previous: std::collections::BTreeSet<String>,
    /// What a pod's connections do until ztunnel serves it.
    pub until_served: inpod::UntilServed,
    /// When a pod whose enrolment failed is tried again.
    pub enrol_retry: inpod::EnrolRetry,
}

/// An update with the kernel's timestamp of the exec that caused it, if an exec did: the
/// start of the enrolment latency.
struct Stamped {
    update: Update,
    exec_ts: Option<u64>,
}

/// Status and counters of a running pipeline, readable from any thread.
#[derive(Debug, Default)]
pub struct Status {
    /// The first full picture (scan resolved, `Synced`) has been written to the maps.
    pub synced: AtomicBool,
    /// Records the watcher passed on.
    pub records: AtomicU64,
    /// Updates the resolver emitted.
    pub updates: AtomicU64,
    /// Batches the programmer wrote.
    pub flushes: AtomicU64,
    /// Batches that failed (each logged with its cause).
    pub flush_errors: AtomicU64,
    /// Workloads files applied after start (`SIGHUP`).
    pub reloads: AtomicU64,
}

/// The running stages.
pub struct Pipeline<B: MapBackend> {
    stop: StopHandle,
    control: Option<Sender<Control>>,
    /// Each stage sends its name here when its thread ends (also on panic).
    ended: Receiver<&'static str>,
    watcher: Option<JoinHandle<anyhow::Result<()>>>,
    resolver: Option<JoinHandle<anyhow::Result<()>>>,
    programmer: Option<JoinHandle<anyhow::Result<Programmer<B>>>>,
    pub status: Arc<Status>,
}

/// Sends the stage's name when dropped, so that the end of a thread (even by panic) is seen.
struct EndNotice(&'static str, Sender<&'static str>);

impl Drop for EndNotice {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

impl<B: MapBackend + Send + 'static> Pipeline<B> {
    /// Starts the three threads. `stages.stop` must stop `stages.source`; the rest of the
    /// pipeline drains and ends after it (once other senders of `stages.inputs` are gone).
    pub fn start<S: EventSource + Send + 'static>(
        stages: Stages<S, B>,
        config: PipelineConfig,
        ops: (Metrics, Readiness),
    ) -> anyhow::Result<Pipeline<B>> {
        let Stages {
            source,
            stop,
            inputs,
            resolver,
            programmer,
            observer,
            inpod,
        } = stages;
        let (metrics, readiness) = ops;
        let status = Arc::new(Status::default());
        let Inputs {
            tx: events_tx,
            rx: events_rx,
        } = inputs;
        let (updates_tx, updates_rx) = bounded::<Stamped>(config.updates_capacity);
        let (control_tx, control_rx) = bounded::<Control>(4);
        let (ended_tx, ended) = bounded::<&'static str>(3);
        let hot_path = config.hot_path;

        let watcher = {
            let (status, notice) = (status.clone(), EndNotice("watcher", ended_tx.clone()));
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("watcher".into())
                .spawn(move || {
                    let _notice = notice;
                    hot_path::enter("watcher", &hot_path)?;
                    watch(source, events_tx, &status, &metrics)
                })
                .context("cannot start the watcher thread")?
        };
        let resolver = {
            let (status, notice) = (status.clone(), EndNotice("resolver", ended_tx.clone()));
            let (metrics, readiness) = (metrics.clone(), readiness.clone());
            std::thread::Builder::new()
                .name("resolver".into())
                .spawn(move || {
                    let _notice = notice;
                    hot_path::enter("resolver", &hot_path)?;
                    let ops = (&metrics, &readiness);
                    resolve(resolver, events_rx, control_rx, updates_tx, &status, ops)
                })
                .context("cannot start the resolver thread")?
        };
        let programmer = {
            let (status, notice) = (status.clone(), EndNotice("programmer", ended_tx));
            std::thread::Builder::new()
                .name("programmer".into())
                .spawn(move || {
                    let _notice = notice;
                    hot_path::enter("programmer", &hot_path)?;
                    let ops = (&metrics, &readiness);
                    let outputs = Outputs { observer, inpod };
                    program(programmer, updates_rx, outputs, &status, ops)
                })
                .context("cannot start the programmer thread")?
        };
        Ok(Pipeline {
            stop,
            control: Some(control_tx),
            ended,
            watcher: Some(watcher),
            resolver: Some(resolver),
            programmer: Some(programmer),
            status,
        })
    }

    /// Hands a new workloads file to the resolver.
    pub fn reload(&self, workloads: Workloads) -> anyhow::Result<()> {
        self.control
            .as_ref()
            .expect("control channel lives until stop")
            .send(Control::Workloads(Box::new(workloads)))
            .map_err(|_| anyhow!("the resolver has stopped; the workloads file was not applied"))
    }

    /// A receiver that yields a stage's name when its thread ends.
    pub fn ended(&self) -> &Receiver<&'static str> {
        &self.ended
    }

    /// Stops the watcher, lets the resolver and the programmer drain (the last updates are
    /// written), and returns the programmer. The first stage error, if any, is returned.
    /// Other senders of the inputs (the kube cache) must be dropped first.
    pub fn stop(mut self) -> anyhow::Result<Programmer<B>> {
        self.stop.stop();
        self.control.take();
        let watcher = join("watcher", self.watcher.take());
        let resolver = join("resolver", self.resolver.take());
        let programmer = join("programmer", self.programmer.take());
        let s = &self.status;
        log::info!(
            "pipeline stopped: {} records, {} updates, {} batches written, {} failed, {} reloads",
            s.records.load(Ordering::Relaxed),
            s.updates.load(Ordering::Relaxed),
            s.flushes.load(Ordering::Relaxed),
            s.flush_errors.load(Ordering::Relaxed),
            s.reloads.load(Ordering::Relaxed)
        );
        watcher?;
        resolver?;
        programmer
    }
}

fn join<T>(name: &str, handle: Option<JoinHandle<anyhow::Result<T>>>) -> anyhow::Result<T> {
    handle
        .ok_or_else(|| anyhow!("{name} thread already joined"))?
        .join()
        .map_err(|_| anyhow!("the {name} thread panicked"))?
}

/// The watcher stage: records → resolver inputs.
fn watch<S: EventSource>(
    mut source: S,
    out: Sender<Input>,
    status: &Status,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    loop {
        let record = source
            .next_record()
            .context("watcher: reading process events")?;
        let Some(record) = record else {
            log::info!("watcher: stopped");
            return Ok(());
        };
        let input = match record.record {
            Record::Proc(event) => {
                metrics.event(EventKind::of(&event));
                if matches!(event, ProcEvent::Exec { .. }) {
                    metrics.observe_exec_delivery_since(record.ts);
                }
                if matches!(event, ProcEvent::Lost) {
                    // The live source rescans right after a loss: that scan is a resync.
                    metrics.lost_events();
                    metrics.resync();
                }
                Input::Proc {
                    ts: record.ts,
                    event,
                }
            }
            // The live source yields process events only; Kubernetes objects come from the
            // kube cache on its own sender, and recordings are not read by `run`.
            Record::Kube(_) | Record::KubeSynced => continue,
        };
        status.records.fetch_add(1, Ordering::Relaxed);
        if out.send(input).is_err() {
            return Err(anyhow!("watcher: the resolver stopped taking events"));
        }
    }
}

/// How often the count of cgroups decided `none` is refreshed (it walks every live cgroup).
const NONE_COUNT_EVERY: Duration = Duration::from_secs(1);

/// The resolver's decisions as its updates say them: the entries it wants, by role, for
/// `zbridge_decisions` (`none` is asked of the resolver: [`Resolver::live_cgroups_without_entries`]).
#[derive(Default)]
struct Decisions {
    /// Each entry's role.
    entries: HashMap<CgroupId, Role>,
    /// Entries by role, in [`ENTRY_ROLES`] order.
    counts: [usize; 3],
    /// Whether anything changed since the `none` count was refreshed.
    dirty: bool,
}

/// The roles that have map entries (`none` has none).
const ENTRY_ROLES: [Role; 3] = [Role::Ambient, Role::Ztunnel, Role::Exempt];

fn role_index(role: Role) -> Option<usize> {
    ENTRY_ROLES.iter().position(|r| *r == role)
}

impl Decisions {
    fn apply(&mut self, update: &Update) {
        let before = match update {
            Update::Upsert(e) => {
                if let Some(i) = role_index(e.role) {
                    self.counts[i] += 1;
                }
                self.entries.insert(e.cgroup_id, e.role)
            }
            Update::Delete { cgroup_id } => self.entries.remove(cgroup_id),
            Update::SetZtunnel { .. } | Update::Synced => return,
        };
        if let Some(i) = before.and_then(role_index) {
            self.counts[i] -= 1;
        }
        self.dirty = true;
    }

    /// Sets the gauges of the roles that have entries.
    fn publish_entries(&self, metrics: &Metrics) {
        for (role, count) in ENTRY_ROLES.iter().zip(self.counts) {
            metrics.set_decisions(*role, count);
        }
    }

    /// Sets `none`: live cgroups that neither have an entry nor belong to an owner that has.
    fn publish_none(&mut self, resolver: &Resolver, metrics: &Metrics) {
        metrics.set_decisions(Role::None, resolver.live_cgroups_without_entries());
        self.dirty = false;
    }
}

/// The resolver stage: inputs (and reloads) → updates.
fn resolve(
    mut resolver: Resolver,
    events: Receiver<Input>,
    control: Receiver<Control>,
    out: Sender<Stamped>,
    status: &Status,
    ops: (&Metrics, &Readiness),
) -> anyhow::Result<()> {
    let (metrics, readiness) = ops;
    let mut updates = Vec::new();
    let mut control = Some(control);
    let mut decisions = Decisions::default();
    let refresh = crossbeam_channel::tick(NONE_COUNT_EVERY);
    loop {
        let never = crossbeam_channel::never();
        let control_rx = control.as_ref().unwrap_or(&never);
        let (mut exec_ts, mut received_ns) = (None, 0);
        crossbeam_channel::select! {
            recv(events) -> input => match input {
                Ok(input) => {
                    if let Input::Proc { ts, event: ProcEvent::Exec { .. } } = &input {
                        exec_ts = Some(*ts);
                        received_ns = watcher::live::monotonic_now_ns();
                    }
                    if matches!(input, Input::Proc { .. }) {
                        decisions.dirty = true; // live cgroups may have changed
                    }
                    resolver.handle(input, &mut updates);
                }
                Err(_) => {
                    log::info!("resolver: stopped");
                    return Ok(());
                }
            },
            recv(control_rx) -> msg => match msg {
                Ok(Control::Workloads(workloads)) => {
                    resolver.set_workloads(*workloads, &mut updates);
                    status.reloads.fetch_add(1, Ordering::Relaxed);
                    log::info!("resolver: new workloads file applied ({} updates)", updates.len());
                }
                Err(_) => control = None,
            },
            recv(refresh) -> _ => {
                if decisions.dirty {
                    decisions.publish_none(&resolver, metrics);
                }
            },
        }
        if updates.is_empty() {
            continue;
        }
        if let Some(ts) = exec_ts.filter(|_| enrols(&updates)) {
            // Taken at the receive, observed only now that the exec is known to enrol.
            metrics.observe_enrolment_stage_between(
                EnrolmentStage::ResolverReceived,
                ts,
                received_ns,
            );
            metrics.observe_enrolment_stage_since(EnrolmentStage::Decided, ts);
        }
        for update in updates.drain(..) {
            if matches!(update, Update::Synced) {
                readiness.set_first_scan_resolved(true);
            }
            decisions.apply(&update);
            status.updates.fetch_add(1, Ordering::Relaxed);
            let stamped = Stamped { update, exec_ts };
            if out.send(stamped).is_err() {
                return Err(anyhow!("resolver: the programmer stopped taking updates"));
            }
        }
        decisions.publish_entries(metrics);
    }
}

/// Whether `updates` give some cgroup an entry (an exec that caused them enrolled it).
fn enrols(updates: &[Update]) -> bool {
    updates.iter().any(|u| matches!(u, Update::Upsert(_)))
}

#[cfg(test)]
mod tests;
