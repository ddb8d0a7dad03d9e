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
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use kubecache::status::StatusWriter;
use programmer::{MapBackend, Programmer};
use resolver::{Input, PodName, Resolver, Role, Update, Workloads};
use watcher::live::StopHandle;
use watcher::{CgroupId, EventSource, ProcEvent, Record};

use crate::ops::{EventKind, Metrics, Readiness};

pub mod inpod;

use inpod::{InPodGate, InPodKernel, Served, Step};

/// How the stages are joined.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Capacity of the watcher → resolver channel (events).
    pub events_capacity: usize,
    /// Capacity of the resolver → programmer channel (updates).
    pub updates_capacity: usize,
    /// How long the programmer waits for more updates after the first of a burst.
    pub coalesce: Duration,
    /// A batch is written as soon as it holds this many updates.
    pub batch_max: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            events_capacity: 8192,
            updates_capacity: 8192,
            coalesce: Duration::from_millis(5),
            batch_max: 1024,
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
}

/// The pod status writer annotates pods when their capture is written, and removes the
/// annotation when their last entry is.
impl Observer for StatusWriter {
    fn written(&mut self, update: &Update) {
        self.observe(update);
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
    /// The pods the previous run enrolled (see [`InPodGate::with_previous`]).
    pub previous: std::collections::BTreeSet<String>,
}

/// An update with the kernel's timestamp of the exec that caused it, if an exec did: the
/// start of the enrolment latency.
struct Stamped {
    update: Update,
    exec_ts: Option<u64>,
    /// An in-pod entry written after ztunnel's ack (its latency is the in-pod one).
    inpod: bool,
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

        let watcher = {
            let (status, notice) = (status.clone(), EndNotice("watcher", ended_tx.clone()));
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("watcher".into())
                .spawn(move || {
                    let _notice = notice;
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
                    let ops = (&metrics, &readiness);
                    let outputs = Outputs { observer, inpod };
                    program(programmer, updates_rx, outputs, &config, &status, ops)
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
/// `zbridge_decisions`.
#[derive(Default)]
struct Decisions {
    /// Each entry's role and owner.
    entries: HashMap<CgroupId, (Role, Option<PodName>)>,
    /// Entries by role, in [`ENTRY_ROLES`] order.
    counts: [usize; 3],
    /// How many entries each owner has (a live cgroup of an owner with entries is covered).
    owners: HashMap<PodName, usize>,
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
        let (id, now) = match update {
            Update::Upsert(e) => (e.cgroup_id, Some((e.role, e.pod.clone()))),
            Update::Delete { cgroup_id } => (*cgroup_id, None),
            Update::SetZtunnel { .. } | Update::Synced => return,
        };
        let before = match now {
            Some((role, pod)) => {
                if let Some(pod) = &pod {
                    *self.owners.entry(pod.clone()).or_insert(0) += 1;
                }
                if let Some(i) = role_index(role) {
                    self.counts[i] += 1;
                }
                self.entries.insert(id, (role, pod))
            }
            None => self.entries.remove(&id),
        };
        if let Some((role, pod)) = before {
            if let Some(i) = role_index(role) {
                self.counts[i] -= 1;
            }
            if let Some(pod) = pod {
                if let Some(count) = self.owners.get_mut(&pod) {
                    *count -= 1;
                    if *count == 0 {
                        self.owners.remove(&pod);
                    }
                }
            }
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
        let none = resolver
            .live_cgroups()
            .iter()
            .filter(|c| {
                !self.entries.contains_key(&c.id)
                    && !c.pod.as_ref().is_some_and(|p| self.owners.contains_key(p))
            })
            .count();
        metrics.set_decisions(Role::None, none);
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
        let mut exec_ts = None;
        crossbeam_channel::select! {
            recv(events) -> input => match input {
                Ok(input) => {
                    if let Input::Proc { ts, event: ProcEvent::Exec { .. } } = &input {
                        exec_ts = Some(*ts);
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
        for update in updates.drain(..) {
            if matches!(update, Update::Synced) {
                readiness.set_first_scan_resolved(true);
            }
            decisions.apply(&update);
            status.updates.fetch_add(1, Ordering::Relaxed);
            let stamped = Stamped {
                update,
                exec_ts,
                inpod: false,
            };
            if out.send(stamped).is_err() {
                return Err(anyhow!("resolver: the programmer stopped taking updates"));
            }
        }
        decisions.publish_entries(metrics);
    }
}

/// What the programmer thread tells or drives besides the maps.
struct Outputs {
    observer: Option<Box<dyn Observer>>,
    inpod: Option<InPodStage>,
}

/// The programmer stage: updates → coalesced batches → maps; then the metrics and the
/// observer learn what was written. With in-pod capture, updates pass the [`InPodGate`] first,
/// and ztunnel's acks (from the ZDS stage) let held entries through.
fn program<B: MapBackend>(
    mut programmer: Programmer<B>,
    updates: Receiver<Stamped>,
    outputs: Outputs,
    config: &PipelineConfig,
    status: &Status,
    ops: (&Metrics, &Readiness),
) -> anyhow::Result<Programmer<B>> {
    let (metrics, readiness) = ops;
    let Outputs {
        mut observer,
        mut inpod,
    } = outputs;
    let mut gate = match &mut inpod {
        Some(stage) => InPodGate::with_previous(std::mem::take(&mut stage.previous)),
        None => InPodGate::default(),
    };
    let zds_events = match &inpod {
        Some(stage) => stage.zds.events().clone(),
        None => crossbeam_channel::never(),
    };
    let mut batch: Vec<Stamped> = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut after_flush: Vec<String> = Vec::new();
    // A `Synced` whose batch failed still counts once a later batch lands.
    let mut synced = false;
    let mut closed = false;
    loop {
        // The first update (or ack) of a burst.
        let mut first_ts = None;
        crossbeam_channel::select! {
            recv(updates) -> update => match update {
                Ok(stamped) => {
                    first_ts = stamped.exec_ts;
                    route(&mut gate, inpod.is_some(), stamped.update, stamped.exec_ts, &mut steps);
                }
                Err(_) => closed = true,
            },
            recv(zds_events) -> event => match event {
                Ok(event) => zds_event(&mut gate, event, &mut steps),
                Err(_) => {
                    return Err(anyhow!("programmer: the ZDS stage stopped"));
                }
            },
        }
        apply_steps(
            &mut steps,
            first_ts,
            &mut gate,
            &mut inpod,
            &mut programmer,
            &mut batch,
            &mut after_flush,
        );
        if !closed {
            let deadline = Instant::now() + config.coalesce;
            while batch.len() < config.batch_max {
                match updates.recv_deadline(deadline) {
                    Ok(stamped) => {
                        route(
                            &mut gate,
                            inpod.is_some(),
                            stamped.update,
                            stamped.exec_ts,
                            &mut steps,
                        );
                        apply_steps(
                            &mut steps,
                            stamped.exec_ts,
                            &mut gate,
                            &mut inpod,
                            &mut programmer,
                            &mut batch,
                            &mut after_flush,
                        );
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        if !batch.is_empty() {
            let count = batch.len();
            synced |= batch.iter().any(|s| matches!(s.update, Update::Synced));
            let started = Instant::now();
            match programmer.flush() {
                Ok(()) => {
                    metrics.observe_batch(count, started.elapsed());
                    metrics.set_map_entries(programmer.entry_count());
                    for stamped in &batch {
                        match (&stamped.update, stamped.exec_ts, stamped.inpod) {
                            (Update::Upsert(_), Some(ts), true) => {
                                metrics.observe_inpod_enrolment_since(ts)
                            }
                            (Update::Upsert(_), Some(ts), false) => {
                                metrics.observe_enrolment_since(ts)
                            }
                            _ => {}
                        }
                        if let Some(observer) = observer.as_mut() {
                            observer.written(&stamped.update);
                        }
                    }
                    status.flushes.fetch_add(1, Ordering::Relaxed);
                    log::debug!("programmer: wrote a batch of {count} updates");
                    if synced && !status.synced.swap(true, Ordering::Relaxed) {
                        readiness.set_maps_programmed(true);
                        log::info!("programmer: first full picture written (reconciled)");
                        if let Some(stage) = inpod.as_mut() {
                            // Pods the previous run enrolled that are no longer in-pod pods.
                            let keep = gate.uids().map(str::to_string).collect();
                            if let Err(e) = stage.kernel.retain(&keep) {
                                log::error!(
                                    "in-pod: releasing the previous run's pods failed: {e:#}"
                                );
                            }
                        }
                    }
                    release_after_flush(&mut after_flush, &mut inpod);
                }
                // The maps keep what they held; the next flush retries with the resolver's
                // later view. Counted and logged, never silent; the observer is not told (the
                // batch is not in force), and no pod is released in the kernel or ztunnel
                // before its entries are gone.
                Err(e) => {
                    status.flush_errors.fetch_add(1, Ordering::Relaxed);
                    log::error!("programmer: writing a batch of {count} updates failed: {e}");
                }
            }
            batch.clear();
        }
        if closed {
            log::info!("programmer: stopped");
            if let Some(stage) = inpod.take() {
                stage.zds.stop();
            }
            return Ok(programmer);
        }
    }
}

/// Sends an update through the in-pod gate (when in-pod capture runs) or straight on.
fn route(
    gate: &mut InPodGate,
    inpod: bool,
    update: Update,
    exec_ts: Option<u64>,
    steps: &mut Vec<Step>,
) {
    if inpod {
        gate.update(update, exec_ts, steps);
    } else {
        steps.push(Step::Queue(update));
    }
}

fn zds_event(gate: &mut InPodGate, event: zds::Event, steps: &mut Vec<Step>) {
    match event {
        zds::Event::Acked {
            uid,
            netns,
            ztunnel_pid,
        } => gate.acked(&uid, Served { netns, ztunnel_pid }, steps),
        zds::Event::Connected { ztunnel_pid } => {
            log::info!(
                "in-pod: ztunnel (pid {ztunnel_pid}) connected; {} pods wait for its ack",
                gate.waiting()
            );
        }
        zds::Event::Disconnected { reason } => {
            log::warn!("in-pod: ztunnel disconnected ({reason}); captured pods stay captured and wait for it");
        }
    }
}

/// Carries out the gate's steps in order: queue updates (stamped with `exec_ts`), tell the
/// ZDS stage, enrol pods in the kernel (a failed enrolment holds back the pod's entries
/// that follow it), and note the pods to release once the batch is written.
fn apply_steps<B: MapBackend>(
    steps: &mut Vec<Step>,
    exec_ts: Option<u64>,
    gate: &mut InPodGate,
    inpod: &mut Option<InPodStage>,
    programmer: &mut Programmer<B>,
    batch: &mut Vec<Stamped>,
    after_flush: &mut Vec<String>,
) {
    let mut failed: Vec<String> = Vec::new();
    for step in steps.drain(..) {
        match step {
            Step::Queue(update) => {
                if let Update::Upsert(e) = &update {
                    if let Some(id) = &e.identity {
                        if failed.contains(&id.uid) {
                            continue;
                        }
                    }
                }
                programmer.queue(&update);
                batch.push(Stamped {
                    update,
                    exec_ts,
                    inpod: false,
                });
            }
            Step::QueueHeld {
                update,
                exec_ts: held_since,
            } => {
                if let Update::Upsert(e) = &update {
                    if let Some(id) = &e.identity {
                        if failed.contains(&id.uid) {
                            continue;
                        }
                    }
                }
                programmer.queue(&update);
                batch.push(Stamped {
                    update,
                    exec_ts: held_since,
                    inpod: true,
                });
            }
            Step::Zds(command) => {
                if let Some(stage) = inpod.as_ref() {
                    let _ = stage.zds.commands().send(command);
                }
            }
            Step::Enrol { uid } => {
                let Some(stage) = inpod.as_mut() else {
                    continue;
                };
                let Some((served, entry)) = gate.enrolment(&uid) else {
                    continue;
                };
                let pod = entry.pod.clone().unwrap_or_default();
                match stage.kernel.enrol(&uid, served, entry) {
                    Ok(()) => log::info!("in-pod: pod {pod} (uid {uid}) enrolled: ztunnel (pid {}) serves it in its namespace", served.ztunnel_pid),
                    Err(e) => {
                        log::error!("in-pod: pod {pod} (uid {uid}): enrolment failed: {e:#}; its entries wait for ztunnel's next ack");
                        let written = gate.written(&uid) && !failed.contains(&uid);
                        gate.enrol_failed(&uid, written);
                        failed.push(uid);
                    }
                }
            }
            Step::ReleaseAfterFlush { uid } => after_flush.push(uid),
        }
    }
}

/// The pods whose last entries are written away: release them in the kernel, then tell
/// ztunnel (`del`).
fn release_after_flush(after_flush: &mut Vec<String>, inpod: &mut Option<InPodStage>) {
    let Some(stage) = inpod.as_mut() else {
        after_flush.clear();
        return;
    };
    for uid in after_flush.drain(..) {
        if let Err(e) = stage.kernel.release(&uid) {
            log::error!("in-pod: releasing pod uid {uid} in the kernel failed: {e:#}");
        }
        let _ = stage.zds.commands().send(zds::Command::Release { uid });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use programmer::{MemoryBackend, ProgrammerConfig};
    use resolver::ResolverConfig;
    use std::net::IpAddr;
    use watcher::{
        CgroupId, CgroupRef, ProcEvent, ProcFacts, ScannedProcess, SourceError, TimedRecord,
    };

    /// A source that yields its records, then waits for the stop flag.
    struct Scripted {
        records: std::vec::IntoIter<TimedRecord>,
        stop: StopHandle,
    }

    impl EventSource for Scripted {
        fn next_record(&mut self) -> Result<Option<TimedRecord>, SourceError> {
            if let Some(r) = self.records.next() {
                return Ok(Some(r));
            }
            while !self.stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(None)
        }
    }

    fn facts(path: &str, id: u64) -> ProcFacts {
        ProcFacts {
            cgroup: Some(CgroupRef {
                path: path.into(),
                id: CgroupId(id),
            }),
            ..ProcFacts::default()
        }
    }

    const FILE: &str = "version: 1\n\
        ztunnel: {cgroup: /zt, address: 10.99.0.1}\n\
        workloads:\n\
        - {name: demo/app, cgroup: /pods/app, address: 10.99.1.2, mode: ambient}\n\
        - {name: demo/web, cgroup: /pods/web, address: 10.99.1.3, mode: ambient}\n";

    /// The stages joined by channels program exactly what the resolver decided, reconcile a
    /// stale entry away, apply a reload, and write everything before `stop` returns.
    #[test]
    fn stages_program_scan_reconcile_and_reload() {
        let workloads = Workloads::parse(FILE).unwrap();
        let mut backend = MemoryBackend::default();
        // An entry of a previous run that the new run does not confirm.
        backend.cgroups.insert(CgroupId(999), Default::default());
        let programmer = Programmer::new(backend, ProgrammerConfig::default()).unwrap();
        let mut config = ResolverConfig::new("node");
        config.workloads = Some(workloads);
        let resolver = Resolver::new(config);
        let stop = StopHandle::default();
        let scan = ProcEvent::Scan {
            processes: vec![
                ScannedProcess {
                    pid: 10,
                    facts: facts("/pods/app", 100),
                },
                ScannedProcess {
                    pid: 11,
                    facts: facts("/pods/web", 101),
                },
                ScannedProcess {
                    pid: 12,
                    facts: facts("/zt", 102),
                },
            ],
        };
        let source = Scripted {
            records: vec![TimedRecord {
                ts: 1,
                record: Record::Proc(scan),
            }]
            .into_iter(),
            stop: stop.clone(),
        };
        let readiness = Readiness::new();
        let stages = Stages {
            source,
            stop,
            inputs: Inputs::new(16),
            resolver,
            programmer,
            observer: None,
            inpod: None,
        };
        let pipeline = Pipeline::start(
            stages,
            PipelineConfig::default(),
            (Metrics::new(), readiness.clone()),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pipeline.status.synced.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "never synced");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(readiness.not_ready(), vec!["kube cache not synced"]);
        // demo/web leaves the file.
        let reloaded = FILE
            .lines()
            .filter(|l| !l.contains("demo/web"))
            .collect::<Vec<_>>()
            .join("\n");
        pipeline
            .reload(Workloads::parse(&reloaded).unwrap())
            .unwrap();
        while pipeline.status.reloads.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "never reloaded");
            std::thread::sleep(Duration::from_millis(1));
        }
        let programmer = pipeline.stop().unwrap();
        let backend = programmer.backend();
        let ids: Vec<u64> = backend.cgroups.keys().map(|c| c.0).collect();
        assert_eq!(ids, vec![100, 102]);
        assert_eq!(
            backend.cgroups[&CgroupId(100)].ips(),
            vec!["10.99.1.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            backend.settings.ztunnel_ips(),
            vec!["10.99.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    /// A source fed by the test, one record at a time, until the stop flag.
    struct Fed {
        records: Receiver<TimedRecord>,
        stop: StopHandle,
    }

    impl EventSource for Fed {
        fn next_record(&mut self) -> Result<Option<TimedRecord>, SourceError> {
            loop {
                if self.stop.is_stopped() {
                    return Ok(None);
                }
                if let Ok(r) = self.records.recv_timeout(Duration::from_millis(1)) {
                    return Ok(Some(r));
                }
            }
        }
    }

    /// Records every update it is told was written.
    struct Recorder(Arc<std::sync::Mutex<Vec<Update>>>);

    impl Observer for Recorder {
        fn written(&mut self, update: &Update) {
            self.0.lock().unwrap().push(update.clone());
        }
    }

    fn pod_path(uid: &str) -> String {
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
             cri-containerd-{}.scope",
            uid.replace('-', "_"),
            "ab".repeat(32)
        )
    }

    fn kube_pod(name: &str, uid: &str, ip: &str, labels: serde_json::Value) -> resolver::Input {
        let pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "demo", "uid": uid, "labels": labels},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap();
        kubecache::Change::Apply(kubecache::Object::Pod(Box::new(pod))).into()
    }

    fn value(metrics: &Metrics, series: &str) -> Option<f64> {
        metrics.encode().lines().find_map(|line| {
            let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
            rest.split(' ').next()?.parse().ok()
        })
    }

    fn wait(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "not within 10 s: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kubernetes mode: the kube cache's inputs arrive on their own sender; nothing is synced
    /// before the cache is; the observer hears of captures only once written; decisions, map
    /// entries and the enrolment latency of an exec-caused enrolment are in the metrics.
    #[test]
    fn kube_inputs_on_their_own_sender_drive_decisions_observer_and_metrics() {
        const APP: &str = "0f8e0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a01";
        const LATE: &str = "0f8e0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a02";
        let programmer =
            Programmer::new(MemoryBackend::default(), ProgrammerConfig::default()).unwrap();
        let resolver = Resolver::new(ResolverConfig::new("node-a"));
        let stop = StopHandle::default();
        let (records, fed) = bounded(16);
        let inputs = Inputs::new(16);
        let kube = inputs.sender();
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (metrics, readiness) = (Metrics::new(), Readiness::new());
        let pipeline = Pipeline::start(
            Stages {
                source: Fed {
                    records: fed,
                    stop: stop.clone(),
                },
                stop,
                inputs,
                resolver,
                programmer,
                observer: Some(Box::new(Recorder(written.clone()))),
                inpod: None,
            },
            PipelineConfig::default(),
            (metrics.clone(), readiness.clone()),
        )
        .unwrap();
        // The scan: the app pod's container and a host process.
        let scan = ProcEvent::Scan {
            processes: vec![
                ScannedProcess {
                    pid: 10,
                    facts: facts(&pod_path(APP), 100),
                },
                ScannedProcess {
                    pid: 11,
                    facts: facts("/system.slice/cron.service", 101),
                },
            ],
        };
        records
            .send(TimedRecord {
                ts: 1,
                record: Record::Proc(scan),
            })
            .unwrap();
        let ambient = serde_json::json!({"istio.io/dataplane-mode": "ambient"});
        kube.send(kube_pod("app", APP, "10.1.0.2", ambient.clone()))
            .unwrap();
        kube.send(kube_pod("late", LATE, "10.1.0.3", ambient))
            .unwrap();
        // Not synced before the cache says so.
        wait("the app pod's entry written", || {
            written
                .lock()
                .unwrap()
                .iter()
                .any(|u| matches!(u, Update::Upsert(e) if e.cgroup_id == CgroupId(100)))
        });
        assert!(!pipeline.status.synced.load(Ordering::Relaxed));
        assert!(readiness.not_ready().contains(&"BPF maps not programmed"));
        kube.send(Input::Kube(resolver::KubeChange::Synced))
            .unwrap();
        wait("synced", || pipeline.status.synced.load(Ordering::Relaxed));
        // A new thread of the app's process, as the kernel reports it: the parent is the
        // process's own parent (pid 1 here). The process stays where it is.
        records
            .send(TimedRecord {
                ts: 2,
                record: Record::Proc(ProcEvent::Fork {
                    parent_pid: 1,
                    parent_tgid: 1,
                    child_pid: 12,
                    child_tgid: 10,
                }),
            })
            .unwrap();
        // An exec in the late pod, stamped now by the kernel's clock: its enrolment is timed.
        records
            .send(TimedRecord {
                ts: watcher::live::monotonic_now_ns(),
                record: Record::Proc(ProcEvent::Exec {
                    pid: 20,
                    tgid: 20,
                    facts: facts(&pod_path(LATE), 200),
                }),
            })
            .unwrap();
        wait("the late pod's enrolment timed", || {
            value(&metrics, "zbridge_enrolment_latency_seconds_count") == Some(1.0)
        });
        wait("decisions by role", || {
            value(&metrics, "zbridge_decisions{role=\"ambient\"}") == Some(2.0)
                && value(&metrics, "zbridge_decisions{role=\"none\"}") == Some(1.0)
        });
        assert_eq!(value(&metrics, "zbridge_map_entries"), Some(2.0));
        assert_eq!(
            value(&metrics, "zbridge_decisions{role=\"ztunnel\"}"),
            Some(0.0)
        );
        drop(kube);
        let programmer = pipeline.stop().unwrap();
        let ids: Vec<u64> = programmer.backend().cgroups.keys().map(|c| c.0).collect();
        assert_eq!(ids, vec![100, 200]);
        let upserts: Vec<u64> = written
            .lock()
            .unwrap()
            .iter()
            .filter_map(|u| match u {
                Update::Upsert(e) => Some(e.cgroup_id.0),
                _ => None,
            })
            .collect();
        assert_eq!(upserts, vec![100, 200]);
    }
}
