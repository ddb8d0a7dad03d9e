//! The running agent: the main thread waits on signals, the stages' ends and its ticks (the
//! programs' counters into the metrics, the kube cache's health into readiness), then stops
//! the stages in the order that lets the pipeline drain.

use super::*;

/// Signals arrive on a channel, so that the main thread waits on them and on the stages.
pub(super) struct Signals {
    handle: signal_hook::iterator::Handle,
    received: Receiver<i32>,
    thread: std::thread::JoinHandle<()>,
}

impl Signals {
    /// Installs the SIGTERM, SIGINT and SIGHUP handlers and the thread that forwards them.
    pub(super) fn install() -> anyhow::Result<Signals> {
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
            .context("installing the SIGTERM, SIGINT and SIGHUP handlers")?;
        let handle = signals.handle();
        let (signal_tx, received) = bounded::<i32>(8);
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal_tx.send(signal).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Signals {
            handle,
            received,
            thread,
        })
    }

    /// Stops the forwarding thread.
    fn close(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

/// What the main thread holds while the agent runs.
pub(super) struct Running<'a> {
    pub(super) args: &'a RunArgs,
    pub(super) cgroup_root: &'a Path,
    pub(super) pipeline: Pipeline<KernelMaps>,
    pub(super) signals: Signals,
    /// Standalone's watch of the workloads file's directories (a sender of the inputs).
    pub(super) dir_watch: Option<DirWatch>,
    /// Kubernetes mode's cache and probe (the cache is a sender of the inputs).
    pub(super) kube: Option<KubeLink>,
    pub(super) zds_status: Option<zds::StatusHandle>,
    /// SIGHUP's re-reads of the workloads file, off this thread.
    pub(super) reloads: Reloads,
    pub(super) metrics: Metrics,
    pub(super) readiness: Readiness,
    pub(super) watcher_counters: Arc<LiveCounters>,
}

impl Running<'_> {
    /// Waits until SIGTERM or SIGINT (`None`) or a stage's end (its name), meanwhile copying
    /// counters into the metrics, the kube cache's health into readiness, and re-reading the
    /// workloads file on SIGHUP.
    pub(super) fn serve(&mut self) -> anyhow::Result<Option<&'static str>> {
        let health_tick = crossbeam_channel::tick(KUBE_HEALTH_EVERY);
        let counters_tick = crossbeam_channel::tick(BPF_COUNTERS_EVERY);
        loop {
            select! {
                recv(counters_tick) -> _ => self.export_counters(),
                recv(health_tick) -> _ => {
                    if let Some(kube) = self.kube.as_mut() {
                        kube.update_readiness(&self.readiness);
                    }
                },
                recv(self.signals.received) -> signal => match signal {
                    // Read off this thread: signals stay answered while the file is parsed.
                    Ok(SIGHUP) => self.reloads.request(),
                    Ok(signal) => {
                        log::info!("signal {signal}: stopping");
                        return Ok(None);
                    }
                    Err(_) => return Ok(None),
                },
                recv(self.reloads.done()) -> read => {
                    if let Some(new) = read.ok().and_then(|read| self.reloads.finished(read)) {
                        self.apply(new)?;
                    }
                },
                recv(self.pipeline.ended()) -> stage => return Ok(stage.ok()),
            }
        }
    }

    /// The programs', the watcher's and the ZDS server's counters into the metrics.
    fn export_counters(&self) {
        export_bpf_counters(&self.args.pin_dir, &self.metrics);
        self.metrics
            .set_watcher_counters(&self.watcher_counters.snapshot());
        if let Some(zds) = &self.zds_status {
            self.metrics.set_zds(&zds.get());
        }
    }

    /// A re-read workloads file ([`Reloads::finished`] has refused a bad one, or one that
    /// would start or stop the ZDS server) into force.
    fn apply(&self, new: Workloads) -> anyhow::Result<()> {
        if let Some(watch) = &self.dir_watch {
            watch.set_paths(configured_dirs(self.cgroup_root, &new));
        }
        self.readiness.set_warnings(new.warnings());
        self.pipeline.reload(new)?;
        Ok(())
    }

    /// Stops the signal thread, then the other senders of the resolver's inputs, then the
    /// pipeline (which drains). A stage that ended on its own (`stage_ended`) is an error.
    pub(super) fn stop(self, stage_ended: Option<&'static str>) -> anyhow::Result<()> {
        self.signals.close();
        // The kube cache and the directory watch are senders of the resolver's inputs: they go
        // first, so that the pipeline can drain and end.
        drop(self.kube);
        drop(self.dir_watch);
        let result = self.pipeline.stop();
        if let Some(stage) = stage_ended {
            // A stage ended on its own: that is an error, whether or not it said why.
            result.with_context(|| format!("the {stage} stage ended unexpectedly"))?;
            bail!("the {stage} stage ended unexpectedly");
        }
        let c = self.watcher_counters.snapshot();
        log::info!(
            "process watcher: {} execs (facts from the exec tap {}, from /proc {}), exec tap records \
             dropped {}, unmatched {}",
            c.execs,
            c.execs_from_tap,
            c.execs_from_proc,
            c.tap_dropped,
            c.tap_unmatched
        );
        let programmer = result?;
        drop(programmer);
        Ok(())
    }
}

/// How often the programs' counters are copied into the metrics.
const BPF_COUNTERS_EVERY: Duration = Duration::from_secs(5);

/// Copies the pinned per-CPU counters (summed) into `zbridge_bpf_*` metrics.
fn export_bpf_counters(pin_dir: &Path, metrics: &Metrics) {
    match programmer::read_counters(pin_dir) {
        Ok(c) => {
            for (name, value) in c.pairs() {
                metrics.set_bpf_counter(name, value);
            }
        }
        Err(e) => log::warn!("reading the BPF counters under {}: {e}", pin_dir.display()),
    }
    // In-pod inbound (the sk_lookup program's counters), once in-pod capture has run.
    match programmer::inspect::read_inbound_counters(pin_dir) {
        Ok(Some(c)) => {
            for (name, value) in c.pairs() {
                metrics.set_bpf_counter(name, value);
            }
        }
        Ok(None) => {}
        Err(e) => log::warn!(
            "reading the in-pod inbound counters under {}: {e}",
            pin_dir.display()
        ),
    }
}
