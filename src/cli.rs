//! The command line. Each subcommand's flags live beside its code in `cmd/`.

use clap::{Parser, Subcommand};

use crate::cmd;

/// zbridge captures the traffic of Istio ambient-mesh pods for the node's ztunnel with eBPF
/// socket hooks (cgroup connect/bind/getsockopt and sockops programs) instead of iptables.
///
/// It watches processes through the kernel's proc connector, maps each to its cgroup and pod,
/// and programs the BPF maps that the hooks read.
#[derive(Debug, Parser)]
#[command(name = "zbridge", version, propagate_version = true)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info", env = "ZBRIDGE_LOG")]
    pub log_level: log::LevelFilter,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: watch processes, decide, program the BPF maps (DaemonSet or
    /// --standalone with a workloads file).
    Run(cmd::run::RunArgs),
    /// Replay a recording through the resolver and an in-memory programmer, and print what
    /// would be programmed.
    Replay(cmd::replay::ReplayArgs),
    /// Record what the watcher (and the kube cache) sees, as a recording (format v1).
    Record(cmd::record::RecordArgs),
    /// Check this host for what zbridge needs, and say what to do about what is missing.
    Doctor(cmd::doctor::DoctorArgs),
    /// Print the pinned maps, decoded (cgroup, pod, role, address), and the counters.
    Dump(cmd::dump::DumpArgs),
    /// Remove the programs, links and maps zbridge pinned.
    Detach(cmd::detach::DetachArgs),
}

/// The process watcher's flags, the same for every command that watches (`run`, `record`).
#[derive(Debug, clap::Args)]
pub struct WatcherArgs {
    /// Where the cgroup2 hierarchy is mounted [default: found in /proc/self/mountinfo].
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<std::path::PathBuf>,

    /// Proc connector receive coalescing, in microseconds (0 = off, at most 100000). While
    /// process events arrive faster than one per millisecond the watcher sleeps this long
    /// instead of waking for each event, then reads all that came meanwhile at once: a spawn
    /// storm costs it one wake-up per window instead of nearly one per event (less CPU), and
    /// each event of the storm is delivered up to this much later (plus the timer's slack).
    /// Under light load events are read at once, as with 0.
    #[arg(long, value_name = "MICROSECONDS",
          default_value_t = watcher::connector::DEFAULT_COALESCE_WINDOW.as_micros() as u64,
          value_parser = clap::value_parser!(u64)
              .range(0..=watcher::connector::MAX_COALESCE_WINDOW.as_micros() as u64))]
    pub coalesce_window_us: u64,
}
