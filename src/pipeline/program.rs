//! The programmer stage's thread: updates (through the in-pod gate when in-pod capture runs)
//! and ztunnel's acks → coalesced batches → maps; then the metrics, the observer, the kernel's
//! in-pod state and the ZDS stage learn what was written.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use programmer::{MapBackend, Programmer};
use resolver::Update;

use super::inpod::{InPodGate, Served, Step, UntilServed};
use super::{InPodStage, Observer, Stamped, Status};
use crate::ops::{EnrolmentStage, Metrics, Readiness};

/// What the programmer thread tells or drives besides the maps.
pub(super) struct Outputs {
    pub(super) observer: Option<Box<dyn Observer>>,
    pub(super) inpod: Option<InPodStage>,
}

/// The programmer stage: updates → coalesced batches → maps; then the metrics and the
/// observer learn what was written. With in-pod capture, updates pass the [`InPodGate`] first,
/// and ztunnel's acks (from the ZDS stage) let held entries through.
pub(super) fn program<B: MapBackend>(
    mut programmer: Programmer<B>,
    updates: Receiver<Stamped>,
    outputs: Outputs,
    status: &Status,
    ops: (&Metrics, &Readiness),
) -> anyhow::Result<Programmer<B>> {
    let (metrics, readiness) = ops;
    let Outputs {
        mut observer,
        mut inpod,
    } = outputs;
    let mut gate = match &mut inpod {
        Some(stage) => InPodGate::new(stage.until_served, std::mem::take(&mut stage.previous)),
        None => InPodGate::default(),
    };
    let zds_events = match &inpod {
        Some(stage) => stage.zds.events().clone(),
        None => crossbeam_channel::never(),
    };
    if let Some(stage) = &inpod {
        readiness.set_inpod_warning(Some(no_ztunnel_warning(stage.until_served)));
    }
    let mut pending = Pending::default();
    let mut retries = Retries::default();
    let mut steps: Vec<Step> = Vec::new();
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
                    observe_received(&stamped, metrics);
                    route(&mut gate, inpod.is_some(), stamped.update, stamped.exec_ts, &mut steps);
                }
                Err(_) => closed = true,
            },
            recv(zds_events) -> event => match event {
                Ok(event) => {
                    match (&event, &inpod) {
                        (zds::Event::Connected { .. }, _) => readiness.set_inpod_warning(None),
                        (zds::Event::Disconnected { .. }, Some(stage)) => {
                            readiness
                                .set_inpod_warning(Some(no_ztunnel_warning(stage.until_served)));
                            // The acks kept were that ztunnel's: its next connection acks anew.
                            retries.clear();
                        }
                        (zds::Event::Acked { uid, .. }, _) => retries.forget(uid),
                        _ => {}
                    }
                    zds_event(&mut gate, event, &mut steps)
                }
                Err(_) => {
                    return Err(anyhow!("programmer: the ZDS stage stopped"));
                }
            },
            recv(retries.timer()) -> _ => {
                for (uid, served) in retries.take_due(Instant::now()) {
                    log::info!("in-pod: pod uid {uid}: trying its enrolment again");
                    gate.acked(&uid, served, &mut steps);
                }
            }
        }
        apply_steps(
            &mut steps,
            first_ts,
            &mut gate,
            &mut inpod,
            &mut programmer,
            (&mut pending, &mut retries),
            metrics,
        );
        if !closed {
            // A zero window: the deadline has passed, and only what is queued is taken.
            let batching = programmer.batching();
            let deadline = Instant::now() + batching.window;
            while batching.max == 0 || pending.batch.len() < batching.max {
                match next_in_window(&updates, batching.window, deadline) {
                    Ok(stamped) => {
                        observe_received(&stamped, metrics);
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
                            (&mut pending, &mut retries),
                            metrics,
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
        // Before the batch: a pod's entries written with its enrolment are then announced
        // as served at once.
        for pod in pending.served.drain(..) {
            if let Some(observer) = observer.as_mut() {
                observer.served(&pod);
            }
        }
        if !pending.batch.is_empty() {
            let count = pending.batch.len();
            synced |= pending
                .batch
                .iter()
                .any(|s| matches!(s.update, Update::Synced));
            let started = Instant::now();
            match programmer.flush() {
                Ok(()) => {
                    // Every entry of the batch was written now: their latencies end here, not
                    // after the observer has been told of the entries before them.
                    let written_ns = watcher::live::monotonic_now_ns();
                    metrics.observe_batch(count, started.elapsed());
                    for stamped in &pending.batch {
                        if let (Update::Upsert(_), Some(ts)) = (&stamped.update, stamped.exec_ts) {
                            metrics.observe_enrolment_between(ts, written_ns)
                        }
                    }
                    metrics.set_map_entries(programmer.entry_count());
                    if let Some(observer) = observer.as_mut() {
                        for stamped in &pending.batch {
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
                    release_after_flush(&mut pending.after_flush, &mut inpod);
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
            pending.batch.clear();
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

/// The next update of the batch: within the window, or with a zero window only one already
/// queued. Not `recv_deadline` with a deadline already passed: crossbeam's receive spins and
/// then yields the CPU a few times before it looks at the deadline, and on a busy node each
/// yield can put the programmer behind other threads' slices while the batch it holds waits
/// for its map write.
fn next_in_window(
    updates: &Receiver<Stamped>,
    window: Duration,
    deadline: Instant,
) -> Result<Stamped, RecvTimeoutError> {
    if window.is_zero() {
        return updates.try_recv().map_err(|e| match e {
            TryRecvError::Empty => RecvTimeoutError::Timeout,
            TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
        });
    }
    updates.recv_deadline(deadline)
}

/// An enrolment's update has reached the programmer: `zbridge_enrolment_stage_seconds`.
fn observe_received(stamped: &Stamped, metrics: &Metrics) {
    if let (Update::Upsert(_), Some(ts)) = (&stamped.update, stamped.exec_ts) {
        metrics.observe_enrolment_stage_since(EnrolmentStage::ProgrammerReceived, ts);
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

/// What `/readyz` says while no ztunnel is connected to the ZDS socket.
fn no_ztunnel_warning(until_served: UntilServed) -> String {
    let meanwhile = match until_served {
        UntilServed::Refused => "are refused",
        UntilServed::Uncaptured => "go out uncaptured (--fail-open)",
    };
    format!("in-pod: no ztunnel is connected to the ZDS socket; the connects of ambient pods it does not serve yet {meanwhile}")
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
/// ZDS stage, enrol pods in the kernel (and then queue the entries the gate held for them),
/// and note the pods to release once the batch is written.
fn apply_steps<B: MapBackend>(
    steps: &mut Vec<Step>,
    exec_ts: Option<u64>,
    gate: &mut InPodGate,
    inpod: &mut Option<InPodStage>,
    programmer: &mut Programmer<B>,
    (pending, retries): (&mut Pending, &mut Retries),
    metrics: &Metrics,
) {
    for step in steps.drain(..) {
        match step {
            Step::Queue(update) => {
                programmer.queue(&update);
                pending.batch.push(Stamped { update, exec_ts });
            }
            Step::Zds(command) => {
                if let Some(stage) = inpod.as_ref() {
                    let _ = stage.zds.commands().send(command);
                }
            }
            Step::Enrol {
                uid,
                exec_ts: asked_since,
            } => {
                let Some(stage) = inpod.as_mut() else {
                    continue;
                };
                let Some((served, entry)) = gate.enrolment(&uid) else {
                    continue;
                };
                let pod = entry.pod.clone().unwrap_or_default();
                match stage.kernel.enrol(&uid, served, entry) {
                    Ok(()) => {
                        log::info!("in-pod: pod {pod} (uid {uid}) enrolled: ztunnel (pid {}) serves it in its namespace", served.ztunnel_pid);
                        if let Some(name) = &entry.pod {
                            pending.served.push(name.clone());
                        }
                        if let Some(ts) = asked_since {
                            metrics.observe_inpod_enrolment_between(
                                ts,
                                watcher::live::monotonic_now_ns(),
                            );
                        }
                        // Held entries: their latency is the in-pod one, just observed.
                        for update in gate.enrolled(&uid) {
                            programmer.queue(&update);
                            pending.batch.push(Stamped {
                                update,
                                exec_ts: None,
                            });
                        }
                    }
                    Err(e) => {
                        metrics.inpod_enrolment_failed();
                        let entries = if gate.written(&uid) {
                            "its entries stay written"
                        } else {
                            "its entries stay held (its connects go out uncaptured)"
                        };
                        let Some((served, failures)) = gate.enrol_failed(&uid, asked_since) else {
                            continue;
                        };
                        let after = stage.enrol_retry.after(failures);
                        log::error!(
                            "in-pod: pod {pod} (uid {uid}): enrolment failed ({failures} in a \
                             row): {e:#}; {entries} until it succeeds: trying again in \
                             {after:?}, or at ztunnel's next ack"
                        );
                        retries.push(Instant::now() + after, uid, served);
                    }
                }
            }
            Step::ReleaseAfterFlush { uid } => pending.after_flush.push(uid),
            Step::StillServed { pod } => pending.served.push(pod),
        }
    }
}

/// Pods whose enrolment failed, each with the ack to try again with and when.
#[derive(Default)]
struct Retries {
    due: Vec<(Instant, String, Served)>,
}

impl Retries {
    fn push(&mut self, at: Instant, uid: String, served: Served) {
        self.forget(&uid);
        self.due.push((at, uid, served));
    }

    /// Fires when the earliest retry is due (never while there is none).
    fn timer(&self) -> Receiver<Instant> {
        match self.due.iter().map(|(at, ..)| *at).min() {
            Some(at) => crossbeam_channel::at(at),
            None => crossbeam_channel::never(),
        }
    }

    /// The retries due by `now`, taken out.
    fn take_due(&mut self, now: Instant) -> Vec<(String, Served)> {
        let (due, later) = std::mem::take(&mut self.due)
            .into_iter()
            .partition(|(at, ..)| *at <= now);
        self.due = later;
        due.into_iter()
            .map(|(_, uid, served)| (uid, served))
            .collect()
    }

    /// A new ack of the pod replaces the one kept.
    fn forget(&mut self, uid: &str) {
        self.due.retain(|(_, u, _)| u != uid);
    }

    fn clear(&mut self) {
        self.due.clear();
    }
}

/// What the steps carried out leave for the batch's write.
#[derive(Default)]
struct Pending {
    /// The updates queued in the programmer, with their exec stamps.
    batch: Vec<Stamped>,
    /// Pods to release (in the kernel, then to ztunnel) once the batch is written.
    after_flush: Vec<String>,
    /// In-pod pods ztunnel now serves, for the observer.
    served: Vec<String>,
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
