//! The running agent's wiring: watcher → resolver → programmer, each on its own thread,
//! joined by bounded crossbeam channels. The stages share nothing but those channels (and the
//! read-only status flags and counters here, for the health and metrics endpoints).
//!
//! The programmer coalesces: after the first update of a burst it keeps taking updates for a
//! short window (or until a batch is full), then writes them as one batch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use programmer::{MapBackend, Programmer};
use resolver::{Input, Resolver, Update, Workloads};
use watcher::live::StopHandle;
use watcher::{EventSource, ProcEvent, Record};

use crate::ops::{EventKind, Metrics, Readiness};

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
    /// Starts the three threads. `stop` must stop `source` (its `next_record` then returns
    /// `Ok(None)`); the rest of the pipeline drains and ends after it.
    pub fn start<S: EventSource + Send + 'static>(
        source: S,
        stop: StopHandle,
        resolver: Resolver,
        programmer: Programmer<B>,
        config: PipelineConfig,
        ops: (Metrics, Readiness),
    ) -> anyhow::Result<Pipeline<B>> {
        let (metrics, readiness) = ops;
        let status = Arc::new(Status::default());
        let (events_tx, events_rx) = bounded::<Input>(config.events_capacity);
        let (updates_tx, updates_rx) = bounded::<Update>(config.updates_capacity);
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
            let readiness = readiness.clone();
            std::thread::Builder::new()
                .name("resolver".into())
                .spawn(move || {
                    let _notice = notice;
                    resolve(
                        resolver, events_rx, control_rx, updates_tx, &status, &readiness,
                    )
                })
                .context("cannot start the resolver thread")?
        };
        let programmer = {
            let (status, notice) = (status.clone(), EndNotice("programmer", ended_tx));
            std::thread::Builder::new()
                .name("programmer".into())
                .spawn(move || {
                    let _notice = notice;
                    program(
                        programmer, updates_rx, &config, &status, &metrics, &readiness,
                    )
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
            // The live source yields process events only; Kubernetes records come from
            // recordings, which `run` does not read.
            Record::Kube(_) | Record::KubeSynced => continue,
        };
        status.records.fetch_add(1, Ordering::Relaxed);
        if out.send(input).is_err() {
            return Err(anyhow!("watcher: the resolver stopped taking events"));
        }
    }
}

/// The resolver stage: inputs (and reloads) → updates.
fn resolve(
    mut resolver: Resolver,
    events: Receiver<Input>,
    control: Receiver<Control>,
    out: Sender<Update>,
    status: &Status,
    readiness: &Readiness,
) -> anyhow::Result<()> {
    let mut updates = Vec::new();
    let mut control = Some(control);
    loop {
        let never = crossbeam_channel::never();
        let control_rx = control.as_ref().unwrap_or(&never);
        crossbeam_channel::select! {
            recv(events) -> input => match input {
                Ok(input) => resolver.handle(input, &mut updates),
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
        }
        for update in updates.drain(..) {
            if matches!(update, Update::Synced) {
                readiness.set_first_scan_resolved(true);
            }
            status.updates.fetch_add(1, Ordering::Relaxed);
            if out.send(update).is_err() {
                return Err(anyhow!("resolver: the programmer stopped taking updates"));
            }
        }
    }
}

/// The programmer stage: updates → coalesced batches → maps.
fn program<B: MapBackend>(
    mut programmer: Programmer<B>,
    updates: Receiver<Update>,
    config: &PipelineConfig,
    status: &Status,
    metrics: &Metrics,
    readiness: &Readiness,
) -> anyhow::Result<Programmer<B>> {
    loop {
        let first = match updates.recv() {
            Ok(update) => update,
            Err(_) => {
                log::info!("programmer: stopped");
                return Ok(programmer);
            }
        };
        let mut synced = matches!(first, Update::Synced);
        programmer.queue(&first);
        let mut count = 1;
        let deadline = Instant::now() + config.coalesce;
        let mut closed = false;
        while count < config.batch_max {
            match updates.recv_deadline(deadline) {
                Ok(update) => {
                    synced |= matches!(update, Update::Synced);
                    programmer.queue(&update);
                    count += 1;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let started = Instant::now();
        match programmer.flush() {
            Ok(()) => {
                metrics.observe_batch(count, started.elapsed());
                status.flushes.fetch_add(1, Ordering::Relaxed);
                log::debug!("programmer: wrote a batch of {count} updates");
                if synced && !status.synced.swap(true, Ordering::Relaxed) {
                    readiness.set_maps_programmed(true);
                    log::info!("programmer: first full picture written (reconciled)");
                }
            }
            // The maps keep what they held; the next flush retries with the resolver's
            // later view. Counted and logged, never silent.
            Err(e) => {
                status.flush_errors.fetch_add(1, Ordering::Relaxed);
                log::error!("programmer: writing a batch of {count} updates failed: {e}");
            }
        }
        if closed {
            log::info!("programmer: stopped");
            return Ok(programmer);
        }
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
        let pipeline = Pipeline::start(
            source,
            stop,
            resolver,
            programmer,
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
}
