//! `zbridge run`: the node agent. `--standalone --workloads FILE` runs it without Kubernetes
//! (`shared/spec/workloads-v1.md`); the Kubernetes mode (the DaemonSet) is not built yet.
//!
//! Start-up order, so that no moment is left uncaptured: the programs are loaded and attached
//! first (reusing the pinned maps and links of a previous run, which kept capturing while the
//! agent was down), then the watcher subscribes and scans /proc, the resolver decides that
//! first picture, and only then (`Synced`) are entries the new run does not confirm removed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, select};
use programmer::{AyaBackend, Loaded, LoaderConfig, Programmer, ProgrammerConfig};
use resolver::{CgroupIds, Resolver, ResolverConfig, Workloads};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use watcher::live::{LiveConfig, LiveSource};
use watcher::CgroupId;

use crate::ops::{self, Metrics, Readiness};
use crate::pipeline::{Pipeline, PipelineConfig};

/// `BPF_FS_MAGIC` of statfs(2).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Flags of `zbridge run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Run without Kubernetes: the workloads file (--workloads) says which cgroup subtrees are
    /// ambient workloads, which one is ztunnel and which host cgroups are exempt.
    #[arg(long, requires = "workloads")]
    pub standalone: bool,

    /// The workloads file (format v1) of --standalone. SIGHUP re-reads it; a bad new file is
    /// refused and the old one stays.
    #[arg(long, value_name = "FILE", requires = "standalone")]
    pub workloads: Option<PathBuf>,

    /// Where the cgroup2 hierarchy is mounted [default: found in /proc/self/mountinfo].
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// The cgroup directory the programs are attached to [default: the cgroup2 root].
    #[arg(long, value_name = "DIR")]
    pub attach_cgroup: Option<PathBuf>,

    /// Where maps and links are pinned; must be on a bpffs.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/zbridge")]
    pub pin_dir: PathBuf,

    /// When no ztunnel address is known, let ambient pods connect as if not in the mesh
    /// (default: their connects fail).
    #[arg(long)]
    pub fail_open: bool,

    /// On a clean stop (SIGTERM, SIGINT) remove the programs, links and pins (default: leave
    /// them, so that traffic stays captured while the agent restarts).
    #[arg(long)]
    pub cleanup_on_exit: bool,

    /// Capacity of cgroup_info_map (entries: pods plus ztunnel and exempt cgroups).
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub max_entries: u32,

    /// Address of the metrics and health endpoints (/metrics, /healthz, /readyz), or `off`.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:15090")]
    pub metrics_addr: String,

    /// Let the programs bpf_printk their decisions (read them from tracefs).
    #[arg(long)]
    pub bpf_debug: bool,
}

/// Finds cgroup ids by stat-ing `<cgroup2 root>/<path>`: the id is the directory's inode.
struct StatCgroupIds {
    root: PathBuf,
}

impl CgroupIds for StatCgroupIds {
    fn id_of(&mut self, path: &str) -> Option<CgroupId> {
        let dir = self.root.join(path.trim_start_matches('/'));
        std::fs::metadata(dir).ok().map(|m| CgroupId(m.ino()))
    }
}

pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    if !args.standalone {
        // Kubernetes mode is issue 5; only standalone runs exist so far.
        return super::not_built("run without --standalone (Kubernetes mode)");
    }
    let workloads_path = args
        .workloads
        .clone()
        .context("--standalone needs --workloads FILE")?;
    let workloads = load_workloads(&workloads_path)?;

    let cgroup_root = match &args.cgroup_root {
        Some(dir) => dir.clone(),
        None => watcher::procfs::cgroup2_mount()
            .context("finding the cgroup2 mount (or give --cgroup-root DIR)")?,
    };
    check_dir(&cgroup_root, "--cgroup-root")?;
    let attach_cgroup = args
        .attach_cgroup
        .clone()
        .unwrap_or_else(|| cgroup_root.clone());
    check_dir(&attach_cgroup, "--attach-cgroup")?;
    if !attach_cgroup.starts_with(&cgroup_root) {
        bail!(
            "--attach-cgroup {} is not below the cgroup2 root {}",
            attach_cgroup.display(),
            cgroup_root.display()
        );
    }
    check_bpffs(&args.pin_dir)?;

    // 1. Programs and maps first: capture continues (or starts) before anything else.
    let (attached, backend) = attach(&args.pin_dir, &attach_cgroup, args.max_entries)?;
    let programmer = Programmer::new(
        backend,
        ProgrammerConfig {
            fail_open: args.fail_open,
            debug: args.bpf_debug,
            ..ProgrammerConfig::default()
        },
    )
    .with_context(|| format!("reading the pinned maps under {}", args.pin_dir.display()))?;

    // 2. The watcher: subscribe, then the first scan of /proc.
    let source = LiveSource::start(&LiveConfig::default())
        .context("starting the process watcher (proc connector)")?;
    if source.cgroup_root() != cgroup_root {
        log::warn!(
            "--cgroup-root {} differs from the cgroup2 mount the watcher reads paths against ({})",
            cgroup_root.display(),
            source.cgroup_root().display()
        );
    }
    let stop = source.stop_handle();

    // 3. The resolver, standalone: the file replaces the kube cache.
    let mut config = ResolverConfig::new(hostname());
    config.workloads = Some(workloads);
    let resolver = Resolver::with_cgroup_ids(
        config,
        Box::new(StatCgroupIds {
            root: cgroup_root.clone(),
        }),
    );

    // Signals arrive on a channel, so that the main thread waits on them and on the stages.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing the SIGTERM, SIGINT and SIGHUP handlers")?;
    let signal_handle = signals.handle();
    let (signal_tx, signal_rx) = bounded::<i32>(8);
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal_tx.send(signal).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;

    let pipeline_config = PipelineConfig {
        coalesce: programmer.coalesce_window(),
        ..PipelineConfig::default()
    };
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    // Standalone: there is no kube cache to wait for.
    readiness.set_cache_synced(true);
    let pipeline = Pipeline::start(
        source,
        stop,
        resolver,
        programmer,
        pipeline_config,
        (metrics.clone(), readiness.clone()),
    )?;
    let _ops = match args.metrics_addr.as_str() {
        "off" => None,
        addr => Some(
            ops::serve(addr, metrics.clone(), readiness)
                .with_context(|| format!("--metrics-addr {addr}"))?,
        ),
    };
    log::info!(
        "running standalone: workloads {}, programs attached to {}, pins under {}{}",
        workloads_path.display(),
        attach_cgroup.display(),
        args.pin_dir.display(),
        if args.fail_open { ", fail open" } else { "" }
    );

    let mut stage_ended = None;
    let tick = crossbeam_channel::tick(BPF_COUNTERS_EVERY);
    loop {
        select! {
            recv(tick) -> _ => export_bpf_counters(&args.pin_dir, &metrics),
            recv(signal_rx) -> signal => match signal {
                Ok(SIGHUP) => match load_workloads(&workloads_path) {
                    Ok(new) => {
                        log::info!("SIGHUP: re-read {}", workloads_path.display());
                        pipeline.reload(new)?;
                    }
                    Err(e) => log::error!("SIGHUP: {e:#}; the previous workloads file stays in force"),
                },
                Ok(signal) => {
                    log::info!("signal {signal}: stopping");
                    break;
                }
                Err(_) => break,
            },
            recv(pipeline.ended()) -> stage => {
                stage_ended = stage.ok();
                break;
            }
        }
    }
    signal_handle.close();
    let _ = signal_thread.join();
    let result = pipeline.stop();
    if let Some(stage) = stage_ended {
        // A stage ended on its own: that is an error, whether or not it said why.
        result.with_context(|| format!("the {stage} stage ended unexpectedly"))?;
        bail!("the {stage} stage ended unexpectedly");
    }
    let programmer = result?;
    drop(programmer);
    if args.cleanup_on_exit {
        drop(attached);
        programmer::detach(&args.pin_dir).with_context(|| {
            format!(
                "removing the programs and pins under {}",
                args.pin_dir.display()
            )
        })?;
        log::info!("--cleanup-on-exit: programs detached, pins removed");
    } else {
        log::info!(
            "stopped; programs and maps stay pinned under {} (traffic stays captured)",
            args.pin_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How often the programs' counters are copied into the metrics.
const BPF_COUNTERS_EVERY: Duration = Duration::from_secs(5);

/// Copies the pinned per-CPU counters (summed) into `zbridge_bpf_*` metrics.
fn export_bpf_counters(pin_dir: &Path, metrics: &Metrics) {
    match programmer::read_counters(pin_dir) {
        Ok(c) => {
            for (name, value) in [
                ("redirected_out", c.redirected_out),
                ("redirected_in", c.redirected_in),
                ("passed", c.passed),
                ("fail_closed", c.fail_closed),
                ("fail_open", c.fail_open),
                ("orig_dst_hit", c.orig_dst_hit),
                ("orig_dst_miss", c.orig_dst_miss),
                ("refused_loop", c.refused_loop),
                ("bind_rewritten", c.bind_rewritten),
            ] {
                metrics.set_bpf_counter(name, value);
            }
        }
        Err(e) => log::warn!("reading the BPF counters under {}: {e}", pin_dir.display()),
    }
}

fn load_workloads(path: &Path) -> anyhow::Result<Workloads> {
    Workloads::load(path).with_context(|| format!("--workloads {}", path.display()))
}

fn check_dir(dir: &Path, flag: &str) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("{flag} {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{flag} {}: not a directory", dir.display());
    }
    Ok(())
}

/// The pin directory (or, when it does not exist yet, its nearest existing parent) must be on
/// a bpffs: pins anywhere else fail, and a tmpfs would lose them.
fn check_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let mut probe = pin_dir;
    while !probe.exists() {
        probe = probe
            .parent()
            .with_context(|| format!("--pin-dir {}: no existing parent", pin_dir.display()))?;
    }
    let path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        .with_context(|| format!("--pin-dir {}: not a valid path", pin_dir.display()))?;
    // SAFETY: statfs fills the zeroed struct for a valid NUL-terminated path.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "--pin-dir {}: statfs {}",
                pin_dir.display(),
                probe.display()
            )
        });
    }
    if fs.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "--pin-dir {}: {} is not on a bpffs (filesystem magic {:#x}); mount one with \
             `mount -t bpf bpf /sys/fs/bpf` or choose a directory on one",
            pin_dir.display(),
            probe.display(),
            fs.f_type
        );
    }
    if !pin_dir.exists() {
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("--pin-dir {}: creating it", pin_dir.display()))?;
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// Loads the BPF object (embedded in the binary), checks and pins its maps (reusing those of a
/// previous run), attaches its programs to `attach_cgroup` as pinned links, and opens the
/// maps for the programmer.
fn attach(
    pin_dir: &Path,
    attach_cgroup: &Path,
    max_entries: u32,
) -> anyhow::Result<(Loaded, AyaBackend)> {
    let mut config = LoaderConfig::new(pin_dir, attach_cgroup);
    config.max_entries = max_entries;
    let loaded = Loaded::load_and_attach(config).with_context(|| {
        format!(
            "loading the BPF programs (pins under --pin-dir {}, attached to --attach-cgroup {})",
            pin_dir.display(),
            attach_cgroup.display()
        )
    })?;
    let report = loaded.report();
    log::info!(
        "programs attached to {}: maps reused {:?}, recreated {:?}, links created {:?}, re-pointed {:?}",
        attach_cgroup.display(),
        report.maps_reused,
        report.maps_recreated,
        report.links_created,
        report.links_updated
    );
    let backend = loaded
        .backend()
        .with_context(|| format!("opening the maps pinned under {}", pin_dir.display()))?;
    Ok((loaded, backend))
}
