//! `zbridge record`: what the watcher and the kube cache see on this host, as a recording
//! (format v1 of `shared/spec/recording-v1.md`): the header, the initial scan, then every
//! process event and every pod and namespace change of the kube cache (`kube` apply/delete
//! records and `kube_synced`), until the duration ends or SIGINT/SIGTERM. A recording made on
//! a cluster node thus replays to the decisions the agent would make there. `--standalone`
//! records processes only.
//!
//! One writer (this thread) takes both streams in arrival order: process records from the
//! watcher's thread, kube changes from the kube cache's. Timestamps are nanoseconds since the
//! recording started, never decreasing: a process record keeps its kernel time, a kube record
//! gets its arrival time, and a record stamped before the previous one gets the previous one's.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, select, Receiver};
use kubecache::record::change_record;
use kubecache::{Change, KubeCache};
use watcher::live::{monotonic_now_ns, LiveConfig, LiveSource};
use watcher::recording::{Header, RecordingWriter};
use watcher::{EventSource, Record, SourceError, TimedRecord};

/// How often what was recorded is pushed to the file, so that a recording cut short (the
/// process killed) keeps what came before.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Records queued between the watcher's thread and the writer; a writer that falls this far
/// behind makes the watcher wait, and the kernel's overrun then shows as a `lost` and a scan.
const PROC_QUEUE: usize = 16 * 1024;
/// Kube changes queued between the kube cache and the writer (the cache waits when full).
const KUBE_QUEUE: usize = 1024;

/// Flags of `zbridge record`.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// The process watcher's flags (`--cgroup-root`, `--coalesce-window-us`).
    #[command(flatten)]
    pub watcher: crate::cli::WatcherArgs,

    /// The recording to write (created or truncated).
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
    /// Stop after this long (`30s`, `500ms`, `5m`, `1h`, or plain seconds); without it, record
    /// until SIGINT or SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Compress with gzip.
    #[arg(long)]
    pub gzip: bool,
    /// Record processes only: no Kubernetes records, no API server needed.
    #[arg(long)]
    pub standalone: bool,
    /// The kubeconfig to reach the API server with [default: the in-cluster service account,
    /// else KUBECONFIG or ~/.kube/config].
    #[arg(long, value_name = "FILE", conflicts_with = "standalone")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name as the API server knows it (only its pods are recorded); required
    /// unless --standalone, where it defaults to this host's name. Set NODE_NAME from the
    /// downward API (spec.nodeName) in a DaemonSet.
    #[arg(long = "node-name", visible_alias = "node", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Receive buffer of the proc connector socket, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub recv_buffer: usize,
}

/// What the watcher's thread hands the writer.
type ProcItem = Result<TimedRecord, SourceError>;

pub fn main(args: RecordArgs) -> anyhow::Result<ExitCode> {
    super::use_host_cgroup_view()?;
    let node = match (args.node_name.as_deref().map(str::trim), args.standalone) {
        (Some(node), _) if !node.is_empty() => node.to_string(),
        (_, true) => host_name().context("cannot read this host's name; pass --node-name")?,
        (_, false) => bail!(
            "no node name: pass --node-name or set NODE_NAME (the kube records are the pods of \
             that node; the hostname is not used, it need not be the node's name), or record \
             processes only with --standalone"
        ),
    };
    if let Some(dir) = &args.watcher.cgroup_root {
        if !dir.is_dir() {
            bail!("--cgroup-root {}: not a directory", dir.display());
        }
    }
    let kube_config = if args.standalone {
        None
    } else {
        let loaded = kubecache::config::load(args.kubeconfig.as_deref()).context(
            "recording pods and namespaces needs a Kubernetes client configuration (to record \
             processes only, pass --standalone)",
        )?;
        Some(loaded.config)
    };

    // Recording time zero: every ts is nanoseconds since this moment.
    let zero = monotonic_now_ns();
    let mut config = LiveConfig::default();
    config.connector.recv_buffer_bytes = args.recv_buffer;
    config.connector.coalesce_window = Duration::from_micros(args.watcher.coalesce_window_us);
    config.cgroup_root = args.watcher.cgroup_root.clone();
    // A recording is read by people too: which program ran is worth its read here.
    config.exec_comm = true;
    let mut source = LiveSource::start(&config).context("cannot watch processes")?;
    let stop = source.stop_handle();
    let counters = source.counters();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while stopping exits at once (exit status 130).
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.flag())
            .context("cannot install a signal handler")?;
        signal_hook::flag::register(signal, stop.flag())
            .context("cannot install a signal handler")?;
    }
    if let Some(duration) = args.duration {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(duration);
            stop.stop();
        });
    }

    let mut header = Header::new(node.clone());
    header.cgroup_root = Some(source.cgroup_root().display().to_string());
    if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        header
            .extra
            .insert("kernel".into(), kernel.trim().to_string().into());
    }
    header
        .extra
        .insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
    let writer = RecordingWriter::create(&args.output, &header, args.gzip)
        .with_context(|| format!("cannot write the recording {}", args.output.display()))?;

    // The kube cache starts before the watcher's thread so that neither stream waits for the
    // other; its changes queue until the writer takes them.
    let (kube_tx, kube_rx) = bounded::<Change>(KUBE_QUEUE);
    let mut cache = match kube_config {
        Some(config) => Some(
            KubeCache::start(config, &node, kube_tx)
                .context("cannot start the kube cache (pods and namespaces)")?,
        ),
        None => {
            drop(kube_tx);
            None
        }
    };
    let (proc_tx, proc_rx) = bounded::<ProcItem>(PROC_QUEUE);
    let watcher_thread = std::thread::Builder::new()
        .name("watcher".into())
        .spawn(move || loop {
            match source.next_record() {
                Ok(Some(rec)) => {
                    if proc_tx.send(Ok(rec)).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = proc_tx.send(Err(e));
                    return;
                }
            }
        })
        .context("cannot start the watcher thread")?;
    log::info!(
        "recording to {}{}{}",
        args.output.display(),
        if cache.is_some() {
            format!(" (processes, and pods of node {node} and namespaces)")
        } else {
            " (processes only: --standalone)".to_string()
        },
        match args.duration {
            Some(d) => format!(" for {d:?}"),
            None => " until SIGINT or SIGTERM".to_string(),
        }
    );

    let mut out = Output {
        writer,
        path: &args.output,
        zero,
        last_ts: 0,
        records: 0,
        kube_records: 0,
    };
    let result = out.run(&proc_rx, &kube_rx);
    // Stop everything, also after an error, so the file is closed properly.
    stop.stop();
    if let Some(cache) = &mut cache {
        cache.stop();
    }
    drop(proc_rx);
    if watcher_thread.join().is_err() {
        log::error!("the watcher thread panicked");
    }
    // What the kube cache delivered before it stopped is still part of the recording.
    let drained = match &result {
        Ok(()) => kube_rx
            .try_iter()
            .try_for_each(|change| out.write_kube(change)),
        Err(_) => Ok(()),
    };
    let Output {
        writer,
        records,
        kube_records,
        ..
    } = out;
    writer
        .finish()
        .with_context(|| format!("closing {}", args.output.display()))?;
    result?;
    drained?;
    let c = counters.snapshot();
    log::info!(
        "recorded {records} records to {} (exec {}, fork {}, exit {}, lost {}, scans {}, exec \
         without /proc facts {}, kube {kube_records})",
        args.output.display(),
        c.execs,
        c.forks,
        c.exits,
        c.lost,
        c.scans,
        c.execs_without_facts
    );
    Ok(ExitCode::SUCCESS)
}

/// The recording being written, and its clock.
struct Output<'a, W: std::io::Write> {
    writer: RecordingWriter<W>,
    path: &'a Path,
    /// CLOCK_MONOTONIC at the start of the recording.
    zero: u64,
    last_ts: u64,
    records: u64,
    kube_records: u64,
}

impl<W: std::io::Write> Output<'_, W> {
    /// Writes both streams in arrival order until the watcher ends.
    fn run(
        &mut self,
        proc_rx: &Receiver<ProcItem>,
        kube_rx: &Receiver<Change>,
    ) -> anyhow::Result<()> {
        let mut kube_open = true;
        let mut last_flush = Instant::now();
        loop {
            // A disconnected kube channel (standalone, or the cache gone) is left out of the
            // select: it would be ready forever.
            let never = crossbeam_channel::never();
            let kube = if kube_open { kube_rx } else { &never };
            select! {
                recv(proc_rx) -> item => match item {
                    Ok(Ok(rec)) => {
                        // Live timestamps are the kernel's CLOCK_MONOTONIC, not before `zero`
                        // (events before the initial scan are superseded by it).
                        let ts = rec.ts.saturating_sub(self.zero);
                        self.write(ts, rec.record)?;
                    }
                    Ok(Err(e)) => return Err(e).context("watching processes failed"),
                    Err(_) => return Ok(()),
                },
                recv(kube) -> change => match change {
                    Ok(change) => self.write_kube(change)?,
                    Err(_) => kube_open = false,
                },
                default(FLUSH_INTERVAL) => {}
            }
            if last_flush.elapsed() >= FLUSH_INTERVAL {
                self.writer
                    .flush()
                    .with_context(|| format!("writing {}", self.path.display()))?;
                last_flush = Instant::now();
            }
        }
    }

    /// Writes a kube cache change, stamped with its arrival time.
    fn write_kube(&mut self, change: Change) -> anyhow::Result<()> {
        let record = change_record(change)
            .with_context(|| format!("writing {}: a kube object", self.path.display()))?;
        let ts = monotonic_now_ns().saturating_sub(self.zero);
        self.kube_records += 1;
        self.write(ts, record)
    }

    fn write(&mut self, ts: u64, record: Record) -> anyhow::Result<()> {
        self.last_ts = self.last_ts.max(ts);
        let rec = TimedRecord {
            ts: self.last_ts,
            record,
        };
        self.writer
            .write(&rec)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.records += 1;
        Ok(())
    }
}

fn host_name() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string())
}

/// `1.5s`, `500ms`, `5m`, `1h`, `30` (seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (examples: 30s, 500ms, 5m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}` (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 days").is_err());
    }
}
