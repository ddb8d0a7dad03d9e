//! `zbridge record`: what the watcher sees on this host, as a recording (format v1 of
//! `shared/spec/recording-v1.md`): the header, the initial scan, then every process event,
//! until the duration ends or SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use watcher::live::{monotonic_now_ns, LiveConfig, LiveSource};
use watcher::recording::{Header, RecordingWriter};
use watcher::{EventSource, TimedRecord};

/// How often what was recorded is pushed to the file, so that a recording cut short (the
/// process killed) keeps what came before.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Flags of `zbridge record`.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
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
    /// The node name for the header (default: this host's name).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// Receive buffer of the proc connector socket, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub recv_buffer: usize,
}

pub fn main(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let node = match args.node {
        Some(node) => node,
        None => host_name().context("cannot read this host's name; pass --node")?,
    };
    // Recording time zero: every ts is nanoseconds since this moment.
    let zero = monotonic_now_ns();
    let mut config = LiveConfig::default();
    config.connector.recv_buffer_bytes = args.recv_buffer;
    let mut source = LiveSource::start(&config).context("cannot watch processes")?;
    let stop = source.stop_handle();
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

    let mut header = Header::new(node);
    header.cgroup_root = Some(source.cgroup_root().display().to_string());
    if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        header
            .extra
            .insert("kernel".into(), kernel.trim().to_string().into());
    }
    header
        .extra
        .insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
    let mut writer = RecordingWriter::create(&args.output, &header, args.gzip)
        .with_context(|| format!("cannot write the recording {}", args.output.display()))?;
    log::info!(
        "recording to {}{}",
        args.output.display(),
        match args.duration {
            Some(d) => format!(" for {d:?}"),
            None => " until SIGINT or SIGTERM".to_string(),
        }
    );

    let mut records: u64 = 0;
    let mut last_flush = Instant::now();
    while let Some(rec) = source.next_record().context("watching processes failed")? {
        // Live timestamps are the kernel's CLOCK_MONOTONIC, never decreasing and not before
        // `zero` (events before the initial scan are superseded by it).
        let rec = TimedRecord {
            ts: rec.ts.saturating_sub(zero),
            record: rec.record,
        };
        writer
            .write(&rec)
            .with_context(|| format!("writing {}", args.output.display()))?;
        records += 1;
        if last_flush.elapsed() >= FLUSH_INTERVAL {
            writer
                .flush()
                .with_context(|| format!("writing {}", args.output.display()))?;
            last_flush = Instant::now();
        }
    }
    writer
        .finish()
        .with_context(|| format!("closing {}", args.output.display()))?;
    let counters = source.counters().snapshot();
    log::info!(
        "recorded {records} records to {} (exec {}, fork {}, exit {}, lost {}, scans {}, exec \
         without /proc facts {})",
        args.output.display(),
        counters.execs,
        counters.forks,
        counters.exits,
        counters.lost,
        counters.scans,
        counters.execs_without_facts
    );
    Ok(ExitCode::SUCCESS)
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
