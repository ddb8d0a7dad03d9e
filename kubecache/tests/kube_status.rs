//! The status writer against testkit's FakeApiServer: the real kube-rs client sends the
//! pods/status merge patches over HTTP; we check the requests and the pods' annotations.
//!
//! Every wait is bounded by a deadline (a hang guard, not a timing assertion).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kubecache::status::{StatusWriter, REDIRECTION_ANNOTATION};
use kubecache::KubeCache;
use resolver::{Capture, Enrolment, Role, Update};
use serde_json::json;
use testkit::apiserver::RecordedRequest;
use testkit::FakeApiServer;
use watcher::CgroupId;

const DEADLINE: Duration = Duration::from_secs(30);

fn pod(ns: &str, name: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": format!("uid-{ns}-{name}"),
            "annotations": annotations,
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.10"},
    }))
    .unwrap()
}

fn redirection(server: &FakeApiServer, ns: &str, name: &str) -> Option<String> {
    server
        .pod(ns, name)
        .and_then(|p| p.metadata.annotations)
        .and_then(|a| a.get(REDIRECTION_ANNOTATION).cloned())
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < DEADLINE,
            "not within {DEADLINE:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn patches_of(server: &FakeApiServer, ns: &str, name: &str) -> Vec<RecordedRequest> {
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path == path)
        .collect()
}

fn body(request: &RecordedRequest) -> serde_json::Value {
    serde_json::from_slice(&request.body).unwrap()
}

#[test]
fn enrol_sets_and_unenrol_removes_the_annotation_with_status_merge_patches() {
    let server = FakeApiServer::start().unwrap();
    server.apply_pod(&pod("apps", "web", json!({"keep": "me"})));
    let writer = StatusWriter::start(server.kube_config(), None).unwrap();

    writer.enrolled("apps", "web");
    wait_until("the annotation is set", || {
        redirection(&server, "apps", "web").as_deref() == Some("enabled")
    });
    let patches = patches_of(&server, "apps", "web");
    assert_eq!(patches.len(), 1);
    assert_eq!(
        body(&patches[0]),
        json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}})
    );

    writer.unenrolled("apps", "web");
    wait_until("the annotation is removed", || {
        redirection(&server, "apps", "web").is_none()
    });
    let patches = patches_of(&server, "apps", "web");
    assert_eq!(patches.len(), 2);
    assert_eq!(
        body(&patches[1]),
        json!({"metadata": {"annotations": {"ambient.istio.io/redirection": null}}})
    );
    // Other annotations are left alone.
    let annotations = server.pod("apps", "web").unwrap().metadata.annotations;
    assert_eq!(
        annotations.unwrap().get("keep").map(String::as_str),
        Some("me")
    );
}

#[test]
fn a_gone_pod_is_done_and_a_forbidden_patch_is_retried() {
    let server = FakeApiServer::start().unwrap();
    server.apply_pod(&pod("apps", "web", json!({})));
    let writer = StatusWriter::start(server.kube_config(), None).unwrap();
    // Gone: one patch, answered 404, and nothing left to write.
    writer.enrolled("apps", "ghost");
    wait_until("the ghost's wish is done", || writer.unwritten() == 0);
    assert_eq!(patches_of(&server, "apps", "ghost").len(), 1);

    // Forbidden: tried again (with backoff) until allowed.
    server.set_forbidden(true);
    writer.enrolled("apps", "web");
    wait_until("a retry after 403", || {
        patches_of(&server, "apps", "web").len() >= 2
    });
    assert_eq!(writer.unwritten(), 1);
    server.set_forbidden(false);
    wait_until("written once allowed", || writer.unwritten() == 0);
    assert_eq!(
        redirection(&server, "apps", "web").as_deref(),
        Some("enabled")
    );
    assert_eq!(patches_of(&server, "apps", "ghost").len(), 1);
}

#[test]
fn observe_follows_the_resolvers_updates() {
    let server = FakeApiServer::start().unwrap();
    server.apply_pod(&pod("apps", "web", json!({})));
    let mut writer = StatusWriter::start(server.kube_config(), None).unwrap();
    let enrolment = |cgroup_id: u64, role| {
        Update::Upsert(Arc::new(Enrolment {
            cgroup_id: CgroupId(cgroup_id),
            cgroup: format!("/kubepods/pod-web/{cgroup_id}").into(),
            pod: Some("apps/web".into()),
            role,
            ips: vec!["10.1.0.10".parse().unwrap()],
            capture: Default::default(),
            identity: None,
        }))
    };
    writer.observe(&enrolment(11, Role::Ambient));
    wait_until("enabled", || {
        redirection(&server, "apps", "web").as_deref() == Some("enabled")
    });
    // A second cgroup of the same pod, then the first one goes: still captured, no patch.
    writer.observe(&enrolment(12, Role::Ambient));
    writer.observe(&Update::Delete {
        cgroup_id: CgroupId(11),
    });
    // The last one leaves the mesh: removed.
    writer.observe(&enrolment(12, Role::None));
    wait_until("removed", || redirection(&server, "apps", "web").is_none());
    let patches = patches_of(&server, "apps", "web");
    assert_eq!(patches.len(), 2, "{patches:#?}");
    // Standalone workloads (no namespace) are not pods: nothing sent.
    writer.observe(&Update::Upsert(Arc::new(Enrolment {
        cgroup_id: CgroupId(13),
        cgroup: "/standalone".into(),
        pod: Some("dev-vm-app".into()),
        role: Role::Ambient,
        ips: vec![],
        capture: Default::default(),
        identity: None,
    })));
    writer.stop();
    assert!(server
        .requests()
        .iter()
        .all(|r| !r.path.contains("dev-vm-app")));
}

/// An in-pod pod captured before ztunnel serves it is `pending` (as Istio's node agent marks a
/// pod ztunnel has not acked), `enabled` once served; one served soon after its capture is
/// written, or before, gets `enabled` alone.
#[test]
fn an_in_pod_pod_is_pending_until_ztunnel_serves_it() {
    let server = FakeApiServer::start().unwrap();
    server.apply_pod(&pod("apps", "web", json!({})));
    server.apply_pod(&pod("apps", "api", json!({})));
    let mut writer = StatusWriter::start(server.kube_config(), None).unwrap();
    let enrolment = |cgroup_id: u64, pod: &str| {
        Update::Upsert(Arc::new(Enrolment {
            cgroup_id: CgroupId(cgroup_id),
            cgroup: format!("/kubepods/pod-{cgroup_id}").into(),
            pod: Some(pod.into()),
            role: Role::Ambient,
            ips: vec!["10.1.0.10".parse().unwrap()],
            capture: Capture::InPod { dns: false },
            identity: None,
        }))
    };
    writer.observe(&enrolment(11, "apps/web"));
    wait_until("pending", || {
        redirection(&server, "apps", "web").as_deref() == Some("pending")
    });
    writer.served("apps/web");
    wait_until("enabled once served", || {
        redirection(&server, "apps", "web").as_deref() == Some("enabled")
    });
    writer.observe(&Update::Delete {
        cgroup_id: CgroupId(11),
    });
    wait_until("removed", || redirection(&server, "apps", "web").is_none());

    // Served within the grace: one patch, `enabled`.
    server.apply_pod(&pod("apps", "fast", json!({})));
    writer.observe(&enrolment(13, "apps/fast"));
    // Time for the writer to take the first wish, well within the grace.
    std::thread::sleep(Duration::from_millis(200));
    writer.served("apps/fast");
    wait_until("enabled", || {
        redirection(&server, "apps", "fast").as_deref() == Some("enabled")
    });

    writer.served("apps/api");
    writer.observe(&enrolment(12, "apps/api"));
    wait_until("enabled", || {
        redirection(&server, "apps", "api").as_deref() == Some("enabled")
    });
    wait_until("all written", || writer.unwritten() == 0);
    for name in ["api", "fast"] {
        let patches = patches_of(&server, "apps", name);
        assert_eq!(patches.len(), 1, "{name}: {patches:#?}");
        assert_eq!(
            body(&patches[0]),
            json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}})
        );
    }
}

#[test]
fn a_pod_already_annotated_in_the_view_is_not_patched_again() {
    let server = FakeApiServer::start().unwrap();
    server.apply_pod(&pod(
        "apps",
        "web",
        json!({REDIRECTION_ANNOTATION: "enabled"}),
    ));
    server.apply_pod(&pod("apps", "db", json!({})));
    let (tx, _rx) = crossbeam_channel::bounded::<kubecache::Change>(64);
    let cache = KubeCache::start(server.kube_config(), "node-a", tx).unwrap();
    let view = cache.view();
    wait_until("the cache synced", || view.is_synced());
    let writer = StatusWriter::start(server.kube_config(), Some(view)).unwrap();
    // In order: web (already so: skipped), then db (patched).
    writer.enrolled("apps", "web");
    writer.enrolled("apps", "db");
    wait_until("db annotated", || {
        redirection(&server, "apps", "db").as_deref() == Some("enabled")
    });
    assert!(patches_of(&server, "apps", "web").is_empty());
}

/// After a restart: a pod annotated by an earlier run that is not captured at `Synced` (it left
/// the mesh while no agent watched) loses the annotation; a captured one keeps it untouched.
#[test]
fn at_synced_annotated_pods_that_are_not_captured_are_unannotated() {
    let server = FakeApiServer::start().unwrap();
    let enabled = json!({REDIRECTION_ANNOTATION: "enabled"});
    server.apply_pod(&pod("apps", "left", enabled.clone()));
    server.apply_pod(&pod("apps", "kept", enabled));
    let (tx, _rx) = crossbeam_channel::bounded::<kubecache::Change>(64);
    let cache = KubeCache::start(server.kube_config(), "node-a", tx).unwrap();
    let view = cache.view();
    wait_until("the cache synced", || view.is_synced());
    let mut writer = StatusWriter::start(server.kube_config(), Some(view)).unwrap();
    writer.observe(&Update::Upsert(Arc::new(Enrolment {
        cgroup_id: CgroupId(700),
        cgroup: "/kubepods.slice/kept".into(),
        pod: Some("apps/kept".into()),
        role: Role::Ambient,
        ips: vec!["10.1.0.10".parse().unwrap()],
        capture: Default::default(),
        identity: None,
    })));
    assert!(
        patches_of(&server, "apps", "left").is_empty(),
        "nothing is removed before the full picture"
    );
    writer.observe(&Update::Synced);
    wait_until("left unannotated", || {
        redirection(&server, "apps", "left").is_none()
    });
    wait_until("all wishes written", || writer.unwritten() == 0);
    assert_eq!(
        redirection(&server, "apps", "kept").as_deref(),
        Some("enabled")
    );
    assert!(
        patches_of(&server, "apps", "kept").is_empty(),
        "already annotated as wished: not patched"
    );
}

/// The nice value and scheduling policy of each of this process's threads named `name`, from
/// /proc/self/task/*/stat (fields 19 and 41).
fn threads_named(name: &str) -> Vec<(i64, u32)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        // The fields after the command name start at field 3.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        found.push((
            fields[19 - 3].parse().unwrap(),
            fields[41 - 3].parse().unwrap(),
        ));
    }
    found
}

#[test]
fn the_writer_thread_runs_below_the_hot_path() {
    let server = FakeApiServer::start().unwrap();
    let _writer = StatusWriter::start(server.kube_config(), None).unwrap();
    const SCHED_BATCH: u32 = 3;
    wait_until("a kube-status thread at nice 10 under SCHED_BATCH", || {
        threads_named("kube-status").iter().any(|&(nice, policy)| {
            nice == kubecache::background::BACKGROUND_NICE as i64 && policy == SCHED_BATCH
        })
    });
    // The thread that started it was not lowered (its nice is the test run's: not checked).
    let own = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let fields: Vec<&str> = own.rsplit_once(')').unwrap().1.split_whitespace().collect();
    assert_eq!(fields[41 - 3], "0", "this thread stays SCHED_OTHER");
}
