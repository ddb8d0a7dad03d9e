//! `zbridge record` with a kube cache (root): against the in-process fake API server, a pod
//! whose UID names a kubepods-like cgroup (made under the test's own cgroup) in an
//! ambient-labelled namespace, and a process running in that pod's container cgroup. The
//! recording holds the pod, the namespace and `kube_synced`, and `zbridge replay` of it decides
//! the pod `ambient` with its IP: the decision the live agent would make on that node.

mod record_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use record_support::{waiting_child_in, Recorder};
use serde_json::{json, Value};
use testkit::{FakeApiServer, TestCgroup};
use watcher::recording::RecordingReader;
use watcher::{KubeAction, Record};

const NODE: &str = "rec-kube-node";
const POD_IP: &str = "10.244.7.9";

/// Waits until the (plain) recording, flushed every second, holds every needle.
fn wait_for_file(path: &Path, needles: &[String]) {
    // The bound only turns a hang into a failure.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n.as_str())) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the recording never got {needles:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn record_with_kube_cache_replays_to_the_live_decision() {
    if !testkit::require_root("record_with_kube_cache_replays_to_the_live_decision") {
        return;
    }
    // A UID and container id of this test's own, so that parallel runs never collide.
    let salt = std::process::id() as u64;
    let uid = format!("{:08x}-7d4b-4a5e-9d3b-{:012x}", salt, 0x1c2d3e4f5a6b_u64);
    let container = format!("{:064x}", 0xabcdef_u64 << 32 | salt);
    let namespace = testkit::unique_name("rec-ns");

    let server = FakeApiServer::start().unwrap();
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace, "labels": {"istio.io/dataplane-mode": "ambient"}}
    }))
    .unwrap();
    server.apply_namespace(&ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": namespace, "uid": uid},
        "spec": {"nodeName": NODE, "containers": [{"name": "web", "image": "nginx"}]},
        "status": {"phase": "Running", "podIP": POD_IP, "podIPs": [{"ip": POD_IP}]}
    }))
    .unwrap();
    server.apply_pod(&pod);
    // A pod of another node: the cache watches this node's pods only.
    let other: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "elsewhere", "namespace": namespace},
        "spec": {"nodeName": "another-node", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.244.9.9"}
    }))
    .unwrap();
    server.apply_pod(&other);

    let cg = TestCgroup::new("record-kube").unwrap();
    let pod_dir = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    );
    let container_path = cg
        .child(&format!("{pod_dir}/cri-containerd-{container}.scope"))
        .unwrap();
    let container_id = cg.id_of(&container_path).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
    let file = dir.path().join("kube.events.jsonl");
    let recorder = Recorder::start(
        Command::new(env!("CARGO_BIN_EXE_zbridge"))
            .args(["record", "--node-name", NODE, "--duration", "10m"])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--output")
            .arg(&file)
            .env_remove("NODE_NAME"),
    );

    // The pod's process: alive when its exec is read and still alive when recording stops.
    let workload = waiting_child_in(&cg, &container_path);
    let pid = workload.0.id();
    wait_for_file(
        &file,
        &[
            format!("\"type\":\"exec\",\"pid\":{pid},"),
            "\"type\":\"kube_synced\"".to_string(),
        ],
    );
    recorder.stop();
    drop(workload);

    // The file: the header's node, kube apply records of the pod and the namespace (not of
    // the other node's pod), and kube_synced, with timestamps that never go back.
    let mut reader = RecordingReader::open(&file).unwrap();
    assert_eq!(reader.header().node, NODE);
    let (mut pod_applied, mut ns_applied, mut synced) = (false, false, false);
    let mut last_ts = 0;
    while let Some(rec) = reader.read_record().unwrap() {
        assert!(rec.ts >= last_ts, "ts went back at line {}", reader.line());
        last_ts = rec.ts;
        match rec.record {
            Record::Kube(kube) => {
                let o = &kube.object_value();
                assert_eq!(o["apiVersion"], "v1", "{o}");
                assert_ne!(
                    o["metadata"]["name"], "elsewhere",
                    "another node's pod: {o}"
                );
                match (kube.action, o["kind"].as_str()) {
                    (KubeAction::Apply, Some("Pod")) if o["metadata"]["uid"] == uid.as_str() => {
                        assert_eq!(o["spec"]["nodeName"], NODE);
                        assert_eq!(o["status"]["podIP"], POD_IP);
                        pod_applied = true;
                    }
                    (KubeAction::Apply, Some("Namespace"))
                        if o["metadata"]["name"] == namespace.as_str() =>
                    {
                        assert_eq!(
                            o["metadata"]["labels"]["istio.io/dataplane-mode"],
                            "ambient"
                        );
                        ns_applied = true;
                    }
                    _ => {}
                }
            }
            Record::KubeSynced => synced = true,
            Record::Proc(_) => {}
        }
    }
    assert!(pod_applied, "no kube apply of the pod");
    assert!(ns_applied, "no kube apply of the namespace");
    assert!(synced, "no kube_synced");

    // Replay: the pod's container cgroup is captured, with the pod's address.
    let out = Command::new(env!("CARGO_BIN_EXE_zbridge"))
        .args(["replay", "--output", "json"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["node"], NODE);
    let workloads = doc["workloads"].as_array().unwrap();
    let mine = workloads
        .iter()
        .find(|w| w["cgroup_id"] == container_id)
        .unwrap_or_else(|| panic!("no workload for cgroup {container_id}: {doc:#}"));
    assert_eq!(
        mine,
        &json!({
            "cgroup_id": container_id,
            "cgroup": container_path,
            "pod": format!("{namespace}/web-0"),
            "ip": POD_IP,
            "role": "ambient",
        })
    );
}

#[test]
fn record_with_kube_needs_a_node_name_and_never_guesses_the_hostname() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("never.events.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_zbridge"))
        .args(["record", "--duration", "1s", "--output"])
        .arg(&file)
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no node name"), "{stderr}");
    assert!(stderr.contains("--node-name"), "{stderr}");
    assert!(
        !file.exists(),
        "a recording was started without a node name"
    );
}
