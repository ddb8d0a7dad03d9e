//! The pipeline's stages joined by their channels, with scripted sources and an in-memory
//! backend.

use super::*;
use programmer::{MemoryBackend, ProgrammerConfig};
use resolver::ResolverConfig;
use std::net::IpAddr;
use std::time::Instant;
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
    // The three stages ask for the hot path's short slice (other tests' stages too).
    for stage in ["watcher", "resolver", "programmer"] {
        let slices = thread_slices(stage);
        assert!(!slices.is_empty(), "no {stage} thread");
        assert!(
            slices.iter().all(|s| *s == hot_path::HOT_PATH_SLICE),
            "{stage}: {slices:?}"
        );
    }
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

/// The scheduler slice each of this process's threads named `name` asked for.
fn thread_slices(name: &str) -> Vec<Duration> {
    let mut slices = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let tid: libc::pid_t = task.file_name().to_string_lossy().parse().unwrap();
        if let Ok(slice) = hot_path::slice_of(tid) {
            slices.push(slice);
        }
    }
    slices
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
            source: testkit::source::FedSource {
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
