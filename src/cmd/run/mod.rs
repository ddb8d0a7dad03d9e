//! `zbridge run`: the node agent. By default it runs in Kubernetes mode (the DaemonSet): the
//! kube cache watches the pods of this node and all namespaces and feeds the resolver, and the
//! status writer annotates captured pods. `--standalone --workloads FILE` runs it without
//! Kubernetes (`shared/spec/workloads-v1.md`).
//!
//! Start-up order, so that no moment is left uncaptured: the programs are loaded and attached
//! first (reusing the pinned maps and links of a previous run, which kept capturing while the
//! agent was down), then the watcher subscribes and scans /proc and the kube cache lists pods
//! and namespaces; the resolver decides that first picture, and only when both are complete
//! (`Synced`) are entries the new run does not confirm removed.
//!
//! The API server unreachable, at start or later, removes nothing: the resolver only acts on
//! what the kube cache saw, and the cache keeps its last state while its watchers retry with
//! backoff. `/readyz` says so meanwhile.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, select, Receiver};
use kubecache::probe::ApiProbe;
use kubecache::status::StatusWriter;
use kubecache::KubeCache;
use programmer::{KernelMaps, Loaded, LoaderConfig, Programmer, ProgrammerConfig};
use resolver::workloads::ZtunnelMode as ZtunnelModeInFile;
use resolver::{Capture, CgroupIds, Resolver, ResolverConfig, Workloads};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use watcher::dirwatch::DirWatch;
use watcher::live::{LiveConfig, LiveCounters, LiveSource};
use watcher::CgroupId;

use crate::ops::{self, Metrics, OpsServer, Readiness};
use crate::pipeline::inpod::{KernelInPod, UntilServed};
use crate::pipeline::{InPodStage, Inputs, Observer, Pipeline, PipelineConfig, Stages};

mod args;
mod inpod;
mod kube_link;
mod reload;
mod resolver_setup;
mod serve;

pub use args::{RunArgs, ZtunnelMode};
use inpod::{configured_dirs, inpod_stage, watch_configured_dirs};
use kube_link::{KubeLink, KUBE_HEALTH_EVERY};
use reload::Reloads;
use resolver_setup::ResolverSetup;
use serve::{Running, Signals};

/// Where the resolver learns who is who.
enum Mode {
    Standalone {
        path: PathBuf,
        workloads: Workloads,
    },
    Kubernetes {
        config: Box<kube::Config>,
        /// Where `config` came from, in words.
        source: String,
        node: String,
    },
}

impl Mode {
    /// Reads what the mode needs before anything is touched, so that a bad flag or file fails
    /// at once.
    fn of(args: &RunArgs) -> anyhow::Result<Mode> {
        if args.standalone {
            let path = args
                .workloads
                .clone()
                .context("--standalone needs --workloads FILE")?;
            let workloads = load_workloads(&path)?;
            return Ok(Mode::Standalone { path, workloads });
        }
        let node = match args.node_name.as_deref().map(str::trim) {
            Some(node) if !node.is_empty() => node.to_string(),
            _ => bail!(
                "Kubernetes mode needs this node's name: pass --node-name NAME or set NODE_NAME \
                 (in the DaemonSet from the downward API: valueFrom.fieldRef.fieldPath \
                 spec.nodeName); the hostname is not used, it need not be the node's name. \
                 Without Kubernetes, run --standalone --workloads FILE"
            ),
        };
        let loaded = kubecache::config::load(args.kubeconfig.as_deref()).context(
            "Kubernetes mode needs a client configuration (without Kubernetes, run \
             --standalone --workloads FILE)",
        )?;
        Ok(Mode::Kubernetes {
            config: Box::new(loaded.config),
            source: loaded.origin,
            node,
        })
    }
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
    super::use_host_cgroup_view()?;
    let mode = Mode::of(&args)?;
    args.hot_path().check()?;
    let metrics_addr = metrics_addr(&args, &mode);
    let cgroups = Cgroups::of(&args)?;
    check_bpffs(&args.pin_dir)?;

    // 1. Programs and maps first: capture continues (or starts) before anything else.
    let (attached, programmer) = start_programs(&args, &cgroups.attach)?;

    // 2. The watcher: subscribe, then the first scan of /proc; cgroup paths and ids are read
    // against the same cgroup2 root as the resolver's.
    let source = start_watcher(&args, &cgroups.root)?;
    let stop = source.stop_handle();
    let watcher_counters = source.counters();

    // 3. The resolver, fed by the watcher and by the workloads file or the kube cache.
    let pipeline_config = PipelineConfig {
        hot_path: args.hot_path(),
        ..PipelineConfig::default()
    };
    let inputs = Inputs::new(pipeline_config.events_capacity);
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let setup = ResolverSetup::start(&args, &mode, &inputs, &readiness)?;

    // 4. In-pod capture when ztunnel listens in the pods; standalone's watched subtrees.
    let inpod = inpod_stage(&args, &mode, &setup.config, &cgroups.root)?;
    let inpod_running = inpod.is_some();
    let zds_status = inpod.as_ref().map(|stage| stage.zds.status_handle());
    let dir_watch = watch_configured_dirs(&mode, &cgroups.root, &inputs)?;
    let resolver = Resolver::with_cgroup_ids(
        setup.config,
        Box::new(StatCgroupIds {
            root: cgroups.root.clone(),
        }),
    );

    // 5. The pipeline's threads, with the signals installed first; then the ops endpoint.
    let signals = Signals::install()?;
    let stages = Stages {
        source,
        stop,
        inputs,
        resolver,
        programmer,
        observer: setup.observer,
        inpod,
    };
    let pipeline = Pipeline::start(
        stages,
        pipeline_config,
        (metrics.clone(), readiness.clone()),
    )?;
    let _ops = serve_ops(&metrics_addr, &metrics, &readiness)?;
    log_running(&args, &mode, &cgroups.attach);

    // 6. Until a signal or a stage's end; 7. the shutdown.
    let mut running = Running {
        args: &args,
        cgroup_root: &cgroups.root,
        pipeline,
        signals,
        dir_watch,
        kube: setup.kube,
        zds_status,
        reloads: Reloads::new(
            match &mode {
                Mode::Standalone { path, .. } => Some(path.clone()),
                Mode::Kubernetes { .. } => None,
            },
            inpod_running,
        ),
        metrics,
        readiness,
        watcher_counters,
    };
    let stage_ended = running.serve()?;
    running.stop(stage_ended)?;
    finish(&args, attached)?;
    Ok(ExitCode::SUCCESS)
}

/// Where the ops endpoint listens: the flag, else the mode's default.
fn metrics_addr(args: &RunArgs, mode: &Mode) -> String {
    args.metrics_addr.clone().unwrap_or_else(|| {
        match mode {
            Mode::Standalone { .. } => "127.0.0.1:15090",
            // The DaemonSet's pod: Prometheus and the kubelet's probes come from outside.
            Mode::Kubernetes { .. } => "0.0.0.0:15090",
        }
        .to_string()
    })
}

/// The cgroup2 directories the agent works under, checked before anything is touched.
struct Cgroups {
    /// The cgroup2 root: cgroup paths and ids are read against it.
    root: PathBuf,
    /// Where the programs are attached (the root, or a cgroup below it).
    attach: PathBuf,
}

impl Cgroups {
    fn of(args: &RunArgs) -> anyhow::Result<Cgroups> {
        let cgroup_root = match &args.watcher.cgroup_root {
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
        Ok(Cgroups {
            root: cgroup_root,
            attach: attach_cgroup,
        })
    }
}

/// Attaches the programs (see [`attach`]) and opens the programmer on their pinned maps, which
/// keep what a previous run wrote until the first full picture.
fn start_programs(
    args: &RunArgs,
    attach_cgroup: &Path,
) -> anyhow::Result<(Loaded, Programmer<KernelMaps>)> {
    let (attached, backend) = attach(&args.pin_dir, attach_cgroup, args.max_entries)?;
    let programmer = Programmer::new(
        backend,
        ProgrammerConfig {
            fail_open: args.fail_open,
            debug: args.bpf_debug,
            ..ProgrammerConfig::default()
        },
    )
    .with_context(|| format!("reading the pinned maps under {}", args.pin_dir.display()))?;
    log::info!(
        "{} entries pinned by a previous run stay in force until the first full picture",
        programmer.entry_count()
    );
    Ok((attached, programmer))
}

/// Subscribes to the proc connector and scans /proc (with the exec tap when it loads).
fn start_watcher(args: &RunArgs, cgroup_root: &Path) -> anyhow::Result<LiveSource> {
    let mut watcher_config = LiveConfig {
        cgroup_root: Some(cgroup_root.to_path_buf()),
        ..LiveConfig::default()
    };
    watcher_config.connector.coalesce_window =
        Duration::from_micros(args.watcher.coalesce_window_us);
    let source = LiveSource::start(&watcher_config).with_context(|| {
        format!(
            "starting the process watcher (proc connector, cgroup2 root {})",
            cgroup_root.display()
        )
    })?;
    log::info!(
        "process watcher: exec facts from {}",
        if source.exec_tap().is_some() {
            "the exec tap (BPF on sched_process_exec)"
        } else {
            "/proc reads (the exec tap is not loaded: see the warning above)"
        }
    );
    Ok(source)
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr`, unless it is `off`.
fn serve_ops(
    addr: &str,
    metrics: &Metrics,
    readiness: &Readiness,
) -> anyhow::Result<Option<OpsServer>> {
    Ok(match addr {
        "off" => None,
        addr => Some(
            ops::serve(addr, metrics.clone(), readiness.clone())
                .with_context(|| format!("--metrics-addr {addr}"))?,
        ),
    })
}

/// Says what runs where, once everything has started.
fn log_running(args: &RunArgs, mode: &Mode, attach_cgroup: &Path) {
    match mode {
        Mode::Standalone { path, .. } => log::info!(
            "running standalone: workloads {}, programs attached to {}, pins under {}{}",
            path.display(),
            attach_cgroup.display(),
            args.pin_dir.display(),
            if args.fail_open { ", fail open" } else { "" }
        ),
        Mode::Kubernetes { node, .. } => log::info!(
            "running on node {node}: programs attached to {}, pins under {}{}",
            attach_cgroup.display(),
            args.pin_dir.display(),
            if args.fail_open { ", fail open" } else { "" }
        ),
    }
    if let Some(settings) = args.hot_path().describe() {
        log::info!("hot path (watcher, resolver, programmer threads): {settings}");
    }
}

/// After the pipeline has stopped: `--cleanup-on-exit` detaches the programs and removes the
/// pins; otherwise they stay, and traffic stays captured.
fn finish(args: &RunArgs, attached: Loaded) -> anyhow::Result<()> {
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
    Ok(())
}

fn load_workloads(path: &Path) -> anyhow::Result<Workloads> {
    let workloads =
        Workloads::load(path).with_context(|| format!("--workloads {}", path.display()))?;
    for warning in workloads.warnings() {
        log::warn!("--workloads {}: {warning}", path.display());
    }
    Ok(workloads)
}

fn check_dir(dir: &Path, flag: &str) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("{flag} {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{flag} {}: not a directory", dir.display());
    }
    Ok(())
}

/// The pin directory must be on a bpffs, and it and the directories above it root's alone
/// (`programmer::pins`); the loader creates it.
fn check_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    programmer::check_pin_dir(pin_dir)
        .with_context(|| format!("--pin-dir {}", pin_dir.display()))?;
    Ok(())
}

/// Loads the BPF object (embedded in the binary), checks and pins its maps (reusing those of a
/// previous run), attaches its programs to `attach_cgroup` as pinned links, and opens the
/// maps for the programmer.
fn attach(
    pin_dir: &Path,
    attach_cgroup: &Path,
    max_entries: u32,
) -> anyhow::Result<(Loaded, KernelMaps)> {
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
