//! In-pod capture through the running pipeline (threads, channels, the real ZDS server) with
//! a ztunnel written in the test and the kernel side recorded. By default (fail closed) an
//! in-pod pod's entry is written at once, and ztunnel's ack enrols its namespace; failing
//! open, the entry is written only after ztunnel acked it and its namespace was enrolled, a
//! refused pod is not written, and neither is one whose enrolment failed until it succeeds
//! (tried again by the agent, or at the next ack).
//! A deleted pod's entry goes before the kernel releases it and ztunnel hears `del`.
//!
//! The pods' processes are faked with a /proc and a cgroup tree in a temporary directory
//! (their `ns/net` links point at this test's own namespace), so no root is needed.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use programmer::{MemoryBackend, Programmer, ProgrammerConfig};
use prost::Message;
use resolver::{Capture, Enrolment, Input, KubeChange, Resolver, ResolverConfig, Update};
use serde_json::{json, Value};
use watcher::live::StopHandle;
use watcher::{
    CgroupId, CgroupRef, KubeAction, KubeRecord, ProcEvent, ProcFacts, Record, ScannedProcess,
    TimedRecord,
};
use zbridge::ops::{Metrics, Readiness};
use zbridge::pipeline::inpod::{EnrolRetry, InPodKernel, Served, UntilServed};
use zbridge::pipeline::{InPodStage, Inputs, Observer, Pipeline, PipelineConfig, Stages};
use zds::proto::{self, workload_request::Payload, workload_response};
use zds::socket::{Conn, Received};

const NODE: &str = "worker-1";

/// What happened, in order: kernel calls and writes, as one log.
type Log = Arc<Mutex<Vec<String>>>;

struct Recorder(Log);

impl Observer for Recorder {
    fn written(&mut self, update: &Update) {
        let line = match update {
            Update::Upsert(e) => format!("write {}", e.pod.clone().unwrap_or_default()),
            Update::Delete { cgroup_id } => format!("delete {cgroup_id}"),
            other => format!("{other:?}"),
        };
        self.0.lock().unwrap().push(line);
    }
    fn served(&mut self, pod: &str) {
        self.0.lock().unwrap().push(format!("served {pod}"));
    }
}

/// The kernel side, recorded; the first enrolments of a [`Failing`] pod fail.
struct FakeKernel {
    log: Log,
    failing: Option<(String, u32)>,
    /// When each enrolment was asked for.
    asked: Arc<Mutex<Vec<Instant>>>,
}

/// A pod whose first `times` enrolments fail, and when the agent tries again.
struct Failing {
    uid: String,
    times: u32,
    retry: EnrolRetry,
}

impl InPodKernel for FakeKernel {
    fn enrol(&mut self, uid: &str, served: &Served, entry: &Enrolment) -> anyhow::Result<()> {
        self.asked.lock().unwrap().push(Instant::now());
        if let Some((failing, times)) = self.failing.as_mut().filter(|(f, n)| f == uid && *n > 0) {
            *times -= 1;
            let uid = failing.as_str();
            self.log.lock().unwrap().push(format!("enrol failed {uid}"));
            anyhow::bail!("ztunnel has no listener in the pod's namespace (the test's failure)");
        }
        let ino = std::fs::File::from(served.netns.try_clone()?)
            .metadata()?
            .ino();
        let own = std::fs::metadata("/proc/self/ns/net")?.ino();
        assert_eq!(ino, own, "the namespace of the pod's process");
        assert_eq!(entry.capture, Capture::InPod { dns: false });
        self.log.lock().unwrap().push(format!("enrol {uid}"));
        Ok(())
    }
    fn release(&mut self, uid: &str) -> anyhow::Result<()> {
        self.log.lock().unwrap().push(format!("release {uid}"));
        Ok(())
    }
    fn retain(&mut self, keep: &BTreeSet<String>) -> anyhow::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("retain {}", keep.len()));
        Ok(())
    }
}

fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn container_path(n: u32) -> String {
    format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{:064x}.scope",
        uid(n).replace('-', "_"),
        n
    )
}

fn pod(n: u32, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid(n)},
        "spec": {"nodeName": NODE, "containers": [], "serviceAccountName": format!("{name}-sa")},
        "status": {"phase": "Running", "podIP": format!("10.0.0.{n}"), "podIPs": [{"ip": format!("10.0.0.{n}")}]}
    })
}

fn kube(action: KubeAction, object: Value) -> Input {
    let change =
        kubecache::record::kube_record_to_change(&KubeRecord::from_value(action, &object)).unwrap();
    Input::Kube(change)
}

/// A fake /proc and cgroup tree: process `pid` of pod `n` lives in its container cgroup.
fn fake_process(root: &Path, n: u32, pid: u32) {
    let proc_dir = root.join("proc").join(pid.to_string());
    std::fs::create_dir_all(proc_dir.join("ns")).unwrap();
    std::os::unix::fs::symlink(
        std::fs::read_link("/proc/self/ns/net")
            .map(|_| Path::new("/proc/self/ns/net").to_path_buf())
            .unwrap(),
        proc_dir.join("ns/net"),
    )
    .unwrap();
    std::fs::write(
        proc_dir.join("cgroup"),
        format!("0::{}\n", container_path(n)),
    )
    .unwrap();
    let cg = root
        .join("cgroup")
        .join(container_path(n).trim_start_matches('/'));
    std::fs::create_dir_all(&cg).unwrap();
    std::fs::write(cg.join("cgroup.procs"), format!("{pid}\n")).unwrap();
}

struct Peer(Conn);

impl Peer {
    fn connect(path: &Path) -> Peer {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Conn::connect(path) {
                Ok(c) => {
                    c.set_recv_timeout(Some(Duration::from_secs(5))).unwrap();
                    let hello = proto::ZdsHello {
                        version: proto::Version::V1 as i32,
                    };
                    c.send(&hello.encode_to_vec(), None).unwrap();
                    return Peer(c);
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
    }
    fn request(&self) -> Payload {
        match self.0.recv().unwrap() {
            Received::Message(b) => proto::WorkloadRequest::decode(b.as_slice())
                .unwrap()
                .payload
                .unwrap(),
            Received::Closed => panic!("closed"),
        }
    }
    /// The next request is the `add` of `uid`.
    fn expect_add(&self, uid: &str) {
        match self.request() {
            Payload::Add(add) => assert_eq!(add.uid, uid),
            other => panic!("expected the add of {uid}, got {other:?}"),
        }
    }
    fn ack(&self, error: &str) {
        let ack = proto::WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(proto::Ack {
                error: error.into(),
            })),
        };
        self.0.send(&ack.encode_to_vec(), None).unwrap();
    }
}

fn wait_for(log: &Log, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if log.lock().unwrap().iter().any(|l| l == what) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("never saw {what:?}; log: {:?}", log.lock().unwrap());
}

fn position(log: &Log, what: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .position(|l| l == what)
        .unwrap_or_else(|| panic!("{what:?} not in {:?}", log.lock().unwrap()))
}

struct Running {
    pipeline: Option<Pipeline<MemoryBackend>>,
    kube: Option<Sender<Input>>,
    log: Log,
    _records: Sender<TimedRecord>,
    socket: std::path::PathBuf,
    metrics: Metrics,
    enrolments_asked: Arc<Mutex<Vec<Instant>>>,
    _dir: tempfile::TempDir,
}

/// The pipeline with pods `(n, pid)` running, under `until_served`; the first enrolments of
/// the `failing` pod fail.
fn start(pods: &[(u32, u32)], until_served: UntilServed, failing: Option<Failing>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    for (n, pid) in pods {
        fake_process(dir.path(), *n, *pid);
    }
    let socket = dir.path().join("ztunnel.sock");
    let mut zds_config = zds::ZdsConfig::new(
        &socket,
        zds::Roots {
            proc: dir.path().join("proc"),
            cgroup: dir.path().join("cgroup"),
        },
    );
    zds_config.retry_min = Duration::from_millis(50);
    let log: Log = Arc::default();
    let enrol_retry = failing.as_ref().map(|f| f.retry).unwrap_or_default();
    let enrolments_asked: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let inpod = InPodStage {
        zds: zds::Server::start(zds_config).unwrap(),
        kernel: Box::new(FakeKernel {
            log: log.clone(),
            failing: failing.map(|f| (f.uid, f.times)),
            asked: enrolments_asked.clone(),
        }),
        previous: BTreeSet::new(),
        until_served,
        enrol_retry,
    };
    let metrics = Metrics::new();
    let mut config = ResolverConfig::new(NODE);
    config.capture = Capture::InPod { dns: false };
    let stop = StopHandle::default();
    let (records, rx) = unbounded();
    let inputs = Inputs::new(64);
    let kube_tx = inputs.sender();
    let stages = Stages {
        source: testkit::source::FedSource {
            records: rx,
            stop: stop.clone(),
        },
        stop,
        inputs,
        resolver: Resolver::new(config),
        programmer: Programmer::new(MemoryBackend::default(), ProgrammerConfig::default()).unwrap(),
        observer: Some(Box::new(Recorder(log.clone()))),
        inpod: Some(inpod),
    };
    let pipeline = Pipeline::start(
        stages,
        PipelineConfig::default(),
        (metrics.clone(), Readiness::new()),
    )
    .unwrap();
    kube_tx
        .send(kube(
            KubeAction::Apply,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        ))
        .unwrap();
    for (n, _) in pods {
        kube_tx
            .send(kube(KubeAction::Apply, pod(*n, &format!("p{n}"))))
            .unwrap();
    }
    kube_tx.send(Input::Kube(KubeChange::Synced)).unwrap();
    let processes = pods
        .iter()
        .map(|(n, pid)| ScannedProcess {
            pid: *pid,
            facts: ProcFacts {
                cgroup: Some(CgroupRef {
                    path: container_path(*n).into(),
                    id: CgroupId(1000 + *n as u64),
                }),
                ..ProcFacts::default()
            },
        })
        .collect();
    records
        .send(TimedRecord {
            ts: 1,
            record: Record::Proc(ProcEvent::Scan { processes }),
        })
        .unwrap();
    Running {
        pipeline: Some(pipeline),
        kube: Some(kube_tx),
        log,
        _records: records,
        socket,
        metrics,
        enrolments_asked,
        _dir: dir,
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kube.take();
        if let Some(p) = self.pipeline.take() {
            let _ = p.stop();
        }
    }
}

/// Pod 1 is deleted: its entry is removed, then the kernel releases it, then ztunnel hears
/// `del`.
fn deleted_pod_leaves_maps_kernel_then_ztunnel(r: &Running, peer: &Peer) {
    r.kube
        .as_ref()
        .unwrap()
        .send(kube(KubeAction::Delete, pod(1, "p1")))
        .unwrap();
    match peer.request() {
        Payload::Del(del) => assert_eq!(del.uid, uid(1)),
        other => panic!("expected del, got {other:?}"),
    }
    let delete = position(&r.log, "delete 1001");
    let release = position(&r.log, &format!("release {}", uid(1)));
    assert!(delete < release, "{:?}", r.log.lock().unwrap());
    peer.ack("");
}

#[test]
fn by_default_an_in_pod_entry_is_written_at_once_and_the_ack_enrols_the_pod() {
    let r = start(&[(1, 4001)], UntilServed::Refused, None);
    // Written before ztunnel is even there: the pod's connects are refused, not uncaptured.
    wait_for(&r.log, "write shop/p1");
    let peer = Peer::connect(&r.socket);
    peer.expect_add(&uid(1));
    peer.ack("");
    wait_for(&r.log, &format!("enrol {}", uid(1)));
    wait_for(&r.log, "served shop/p1");
    assert!(position(&r.log, "write shop/p1") < position(&r.log, "served shop/p1"));
    assert!(matches!(peer.request(), Payload::SnapshotSent(_)));
    peer.ack("");
    assert_eq!(
        r.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == "write shop/p1")
            .count(),
        1,
        "the ack writes nothing more: {:?}",
        r.log.lock().unwrap()
    );

    deleted_pod_leaves_maps_kernel_then_ztunnel(&r, &peer);
}

#[test]
fn failing_open_an_in_pod_entry_is_written_only_after_the_ack_and_the_enrolment() {
    let r = start(&[(1, 4001)], UntilServed::Uncaptured, None);
    wait_for(&r.log, "Synced");
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !r.log.lock().unwrap().iter().any(|l| l == "write shop/p1"),
        "no entry before ztunnel serves the pod: {:?}",
        r.log.lock().unwrap()
    );
    let peer = Peer::connect(&r.socket);
    match peer.request() {
        Payload::Add(add) => {
            assert_eq!(add.uid, uid(1));
            let info = add.workload_info.unwrap();
            assert_eq!(
                (
                    info.namespace.as_str(),
                    info.name.as_str(),
                    info.service_account.as_str()
                ),
                ("shop", "p1", "p1-sa")
            );
        }
        other => panic!("expected add, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(!r.log.lock().unwrap().iter().any(|l| l == "write shop/p1"));
    peer.ack("");
    wait_for(&r.log, "write shop/p1");
    assert!(position(&r.log, &format!("enrol {}", uid(1))) < position(&r.log, "write shop/p1"));
    // Served before its entry is written: announced captured only with it.
    assert!(position(&r.log, "served shop/p1") < position(&r.log, "write shop/p1"));
    assert!(matches!(peer.request(), Payload::SnapshotSent(_)));
    peer.ack("");

    deleted_pod_leaves_maps_kernel_then_ztunnel(&r, &peer);
}

#[test]
fn failing_open_a_refused_pod_is_not_written_until_a_retry_is_acked() {
    let r = start(&[(1, 4001), (2, 4002)], UntilServed::Uncaptured, None);
    let peer = Peer::connect(&r.socket);
    let mut refused_once = false;
    let mut acked = Vec::new();
    // Refuse pod 2's first add; ack everything else.
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.len() < 2 && Instant::now() < deadline {
        match peer.request() {
            Payload::Add(add) if add.uid == uid(2) && !refused_once => {
                refused_once = true;
                peer.ack("no certificate for p2 yet");
                std::thread::sleep(Duration::from_millis(20));
                assert!(
                    !r.log.lock().unwrap().iter().any(|l| l == "write shop/p2"),
                    "a refused pod is not written"
                );
            }
            Payload::Add(add) => {
                acked.push(add.uid.clone());
                peer.ack("");
            }
            _ => peer.ack(""),
        }
    }
    assert!(refused_once);
    wait_for(&r.log, "write shop/p1");
    wait_for(&r.log, "write shop/p2");
}

/// Failing open, pod 1's first `times` enrolments fail, tried again after `retry`: the
/// pipeline once ztunnel has acked the pod and the snapshot's end, and the first enrolment
/// failed.
fn first_enrolment_fails(times: u32, retry: EnrolRetry) -> (Running, Peer) {
    let failing = Failing {
        uid: uid(1),
        times,
        retry,
    };
    let r = start(&[(1, 4001)], UntilServed::Uncaptured, Some(failing));
    // The pod is handed to the ZDS server before ztunnel connects: its add comes first.
    wait_for(&r.log, "Synced");
    let peer = Peer::connect(&r.socket);
    peer.expect_add(&uid(1));
    peer.ack("");
    wait_for(&r.log, &format!("enrol failed {}", uid(1)));
    assert!(matches!(peer.request(), Payload::SnapshotSent(_)));
    peer.ack("");
    (r, peer)
}

/// Failing open, a pod whose enrolment failed keeps its entries held, and the next ack (a
/// reconnected ztunnel's) enrols it and writes them (here before the agent's own retry).
#[test]
fn failing_open_a_failed_enrolment_holds_the_entries_until_the_next_ack() {
    let (r, peer) = first_enrolment_fails(
        1,
        EnrolRetry {
            first: Duration::from_secs(600),
            max: Duration::from_secs(600),
        },
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !r.log.lock().unwrap().iter().any(|l| l == "write shop/p1"),
        "not enrolled, not written: {:?}",
        r.log.lock().unwrap()
    );
    // ztunnel reconnects: the pod is added and acked again, enrolled, and written.
    drop(peer);
    let peer = Peer::connect(&r.socket);
    peer.expect_add(&uid(1));
    peer.ack("");
    wait_for(&r.log, "write shop/p1");
    assert!(position(&r.log, &format!("enrol {}", uid(1))) < position(&r.log, "write shop/p1"));
}

/// A pod whose enrolment fails is tried again with ztunnel's ack, without asking ztunnel,
/// waiting longer after each failure in a row, until it succeeds; each failure is counted.
#[test]
fn a_failed_enrolment_is_tried_again_until_it_succeeds() {
    let (r, _peer) = first_enrolment_fails(
        2,
        EnrolRetry {
            first: Duration::from_millis(100),
            max: Duration::from_secs(10),
        },
    );
    // Failed twice, then enrolled and written, with no further ack.
    wait_for(&r.log, "write shop/p1");
    let log = r.log.lock().unwrap().clone();
    let enrolments: Vec<_> = log.iter().filter(|l| l.contains("enrol")).collect();
    let failed = format!("enrol failed {}", uid(1));
    let enrolled = format!("enrol {}", uid(1));
    assert_eq!(enrolments, [&failed, &failed, &enrolled], "{log:?}");
    assert!(position(&r.log, &enrolled) < position(&r.log, "write shop/p1"));
    // The second try came 100 ms after the first failure, the third 200 ms after the second.
    let asked = r.enrolments_asked.lock().unwrap().clone();
    let gaps: Vec<Duration> = asked.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.len() == 2
            && gaps[0] >= Duration::from_millis(100)
            && gaps[1] >= Duration::from_millis(200),
        "{gaps:?}"
    );
    assert!(r
        .metrics
        .encode()
        .contains("zbridge_inpod_enrolment_failures_total 2\n"));
}
