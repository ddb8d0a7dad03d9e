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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, select};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kubecache::status::StatusWriter;
use kubecache::{KubeCache, KubeView};
use programmer::{KernelMaps, Loaded, LoaderConfig, Programmer, ProgrammerConfig};
use resolver::workloads::ZtunnelMode as ZtunnelModeInFile;
use resolver::{Capture, CgroupIds, Resolver, ResolverConfig, Workloads};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use watcher::live::{LiveConfig, LiveSource};
use watcher::CgroupId;

use crate::ops::{self, Metrics, Readiness};
use crate::pipeline::inpod::KernelInPod;
use crate::pipeline::{InPodStage, Inputs, Observer, Pipeline, PipelineConfig, Stages};

mod args;
mod inpod;
mod kube_link;
mod reload;

pub use args::{RunArgs, ZtunnelMode};
use inpod::{configured_dirs, start_inpod};
use kube_link::{ApiProbe, KubeLink, KUBE_HEALTH_EVERY};

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
    let metrics_addr = args.metrics_addr.clone().unwrap_or_else(|| {
        match mode {
            Mode::Standalone { .. } => "127.0.0.1:15090",
            // The DaemonSet's pod: Prometheus and the kubelet's probes come from outside.
            Mode::Kubernetes { .. } => "0.0.0.0:15090",
        }
        .to_string()
    });

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
    log::info!(
        "{} entries pinned by a previous run stay in force until the first full picture",
        programmer.entry_count()
    );

    // 2. The watcher: subscribe, then the first scan of /proc; cgroup paths and ids are read
    // against the same cgroup2 root as the resolver's.
    let mut watcher_config = LiveConfig {
        cgroup_root: Some(cgroup_root.clone()),
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
    let stop = source.stop_handle();
    log::info!(
        "process watcher: exec facts from {}",
        if source.exec_tap().is_some() {
            "the exec tap (BPF on sched_process_exec)"
        } else {
            "/proc reads (the exec tap is not loaded: see the warning above)"
        }
    );
    let watcher_counters = source.counters();

    // 3. The resolver, fed by the watcher and by the workloads file or the kube cache.
    let pipeline_config = PipelineConfig {
        coalesce: programmer.coalesce_window(),
        ..PipelineConfig::default()
    };
    let inputs = Inputs::new(pipeline_config.events_capacity);
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let mut kube = None;
    let mut observer: Option<Box<dyn Observer>> = None;
    let config = match &mode {
        Mode::Standalone { workloads, .. } => {
            // Standalone pods are not on a node the resolver must match.
            let mut config = ResolverConfig::new("standalone");
            config.workloads = Some(workloads.clone());
            // There is no kube cache to wait for.
            readiness.set_cache_synced(true);
            readiness.set_warnings(workloads.warnings());
            config
        }
        Mode::Kubernetes {
            config: kube_config,
            source: config_source,
            node,
        } => {
            let mut config = ResolverConfig::new(node.clone());
            if args.ztunnel_mode == ZtunnelMode::Inpod {
                config.capture = Capture::InPod {
                    dns: args.dns_capture,
                };
            } else if args.dns_capture {
                bail!("--dns-capture needs --ztunnel-mode inpod (ztunnel's DNS proxy listens in the pod's namespace)");
            }
            config.system_namespace = args.system_namespace.clone();
            config.excluded_namespaces = args.exclude_namespaces.clone();
            config.exempt_cgroups = args.exempt_cgroups.clone();
            let url = kube_config.cluster_url.to_string();
            let cache = KubeCache::start(*kube_config.clone(), node, inputs.sender())
                .with_context(|| {
                    format!("starting the kube cache ({config_source}, API server {url})")
                })?;
            if args.no_pod_status {
                log::info!("--no-pod-status: captured pods are not annotated");
            } else {
                let writer = StatusWriter::start(*kube_config.clone(), Some(cache.view()))
                    .with_context(|| {
                        format!(
                            "starting the pod status writer ({config_source}, API server {url})"
                        )
                    })?;
                observer = Some(Box::new(writer));
            }
            let probe = ApiProbe::start(*kube_config.clone(), node, cache.view())
                .context("starting the API server probe")?;
            log::info!(
                "Kubernetes mode: node {node}, API server {url} ({config_source}), ztunnel from \
                 app=ztunnel in {}, excluded namespaces {:?}, exempt cgroups {:?}",
                config.system_namespace,
                config.excluded_namespaces,
                config.exempt_cgroups
            );
            kube = Some(KubeLink {
                cache,
                probe,
                lost: false,
            });
            config
        }
    };
    // Where ztunnel listens: the flag (Kubernetes) or the workloads file (standalone).
    let inpod_socket = match &mode {
        Mode::Standalone { workloads, .. } => match workloads.ztunnel.as_ref().map(|z| &z.mode) {
            Some(ZtunnelModeInFile::InPod { zds }) => Some((zds.clone(), workloads.dns_capture)),
            _ => None,
        },
        Mode::Kubernetes { .. } => match config.capture {
            Capture::InPod { dns } => Some((args.zds_socket.clone(), dns)),
            Capture::Node => None,
        },
    };
    let inpod_running = inpod_socket.is_some();
    let mut zds_status = None;
    let inpod = match inpod_socket {
        Some((socket, dns)) => {
            let stage = start_inpod(&args, &socket, &cgroup_root, dns)
                .context("starting in-pod capture (ztunnel in-pod, over ZDS)")?;
            zds_status = Some(stage.zds.status_handle());
            Some(stage)
        }
        None => None,
    };
    // Standalone: the file's subtrees are enrolled when their directories are made and lose
    // their entries when removed, not only when a process runs in them.
    let dir_watch = match &mode {
        Mode::Standalone { workloads, .. } => {
            let tx = inputs.sender();
            let watch = watcher::dirwatch::DirWatch::start(
                configured_dirs(&cgroup_root, workloads),
                move || {
                    let _ = tx.send(resolver::Input::ConfiguredCgroupsChanged);
                },
            )
            .context("watching the workloads file's cgroup directories (inotify)")?;
            Some(watch)
        }
        Mode::Kubernetes { .. } => None,
    };
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

    let stages = Stages {
        source,
        stop,
        inputs,
        resolver,
        programmer,
        observer,
        inpod,
    };
    let pipeline = Pipeline::start(
        stages,
        pipeline_config,
        (metrics.clone(), readiness.clone()),
    )?;
    let _ops = match metrics_addr.as_str() {
        "off" => None,
        addr => Some(
            ops::serve(addr, metrics.clone(), readiness.clone())
                .with_context(|| format!("--metrics-addr {addr}"))?,
        ),
    };
    match &mode {
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

    let mut reloads = reload::Reloads::new(
        match &mode {
            Mode::Standalone { path, .. } => Some(path.clone()),
            Mode::Kubernetes { .. } => None,
        },
        inpod_running,
    );
    let mut stage_ended = None;
    let health_tick = crossbeam_channel::tick(KUBE_HEALTH_EVERY);
    let counters_tick = crossbeam_channel::tick(BPF_COUNTERS_EVERY);
    loop {
        select! {
            recv(counters_tick) -> _ => {
                export_bpf_counters(&args.pin_dir, &metrics);
                metrics.set_watcher_counters(&watcher_counters.snapshot());
                if let Some(zds) = &zds_status {
                    metrics.set_zds(&zds.get());
                }
            },
            recv(health_tick) -> _ => {
                if let Some(kube) = kube.as_mut() {
                    kube.update_readiness(&readiness);
                }
            },
            recv(signal_rx) -> signal => match signal {
                // Read off this thread: signals stay answered while the file is parsed.
                Ok(SIGHUP) => reloads.request(),
                Ok(signal) => {
                    log::info!("signal {signal}: stopping");
                    break;
                }
                Err(_) => break,
            },
            recv(reloads.done()) -> read => {
                let Some(new) = read.ok().and_then(|read| reloads.finished(read)) else {
                    continue;
                };
                if let Some(watch) = &dir_watch {
                    watch.set_paths(configured_dirs(&cgroup_root, &new));
                }
                readiness.set_warnings(new.warnings());
                pipeline.reload(new)?;
            },
            recv(pipeline.ended()) -> stage => {
                stage_ended = stage.ok();
                break;
            }
        }
    }
    signal_handle.close();
    let _ = signal_thread.join();
    // The kube cache and the directory watch are senders of the resolver's inputs: they go
    // first, so that the pipeline can drain and end.
    drop(kube);
    drop(dir_watch);
    let result = pipeline.stop();
    if let Some(stage) = stage_ended {
        // A stage ended on its own: that is an error, whether or not it said why.
        result.with_context(|| format!("the {stage} stage ended unexpectedly"))?;
        bail!("the {stage} stage ended unexpectedly");
    }
    let c = watcher_counters.snapshot();
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
