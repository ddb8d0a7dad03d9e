//! The kube cache against testkit's FakeApiServer: the real kube-rs client does its list and
//! watch requests over HTTP, and we check what it delivers and what it asked for.
//!
//! Every wait is bounded by a deadline (a hang guard, not a timing assertion).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kubecache::{Change, KubeCache, Object};
use serde_json::json;
use testkit::apiserver::RecordedRequest;
use testkit::FakeApiServer;

const NODE: &str = "node-a";
/// Long enough for kube-runtime's backoff after an error (0.8 s, doubling, jittered).
const DEADLINE: Duration = Duration::from_secs(30);

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": format!("uid-{ns}-{name}"),
            "labels": {"app": name},
        },
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }))
    .unwrap()
}

fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    }))
    .unwrap()
}

/// A short, comparable description of a change: ("apply"|"delete", "pod"|"ns", name, rv).
type Seen = (&'static str, &'static str, String, String);

fn describe(change: &Change) -> Seen {
    let (verb, object) = match change {
        Change::Apply(o) => ("apply", o),
        Change::Delete(o) => ("delete", o),
        Change::Synced => return ("synced", "", String::new(), String::new()),
    };
    let (kind, meta) = match object {
        Object::Pod(p) => ("pod", &p.metadata),
        Object::Namespace(n) => ("ns", &n.metadata),
    };
    (
        verb,
        kind,
        meta.name.clone().unwrap_or_default(),
        meta.resource_version.clone().unwrap_or_default(),
    )
}

fn seen(verb: &'static str, kind: &'static str, name: &str, rv: &str) -> Seen {
    (verb, kind, name.to_string(), rv.to_string())
}

fn rv_of_pod(p: &Pod) -> String {
    p.metadata.resource_version.clone().unwrap()
}

fn rv_of_ns(n: &Namespace) -> String {
    n.metadata.resource_version.clone().unwrap()
}

fn next_change(rx: &Receiver<Change>) -> Change {
    match rx.recv_timeout(DEADLINE) {
        Ok(change) => change,
        Err(e) => panic!("no kube change within {DEADLINE:?}: {e}"),
    }
}

/// The changes up to (not including) the `count`th `Synced`.
fn changes_until_synced(rx: &Receiver<Change>, count: usize) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut synced = 0;
    while synced < count {
        match next_change(rx) {
            Change::Synced => synced += 1,
            change => changes.push(change),
        }
    }
    changes
}

fn set_of(changes: &[Change]) -> BTreeSet<Seen> {
    changes.iter().map(describe).collect()
}

/// Waits (bounded) until the server's requests satisfy `done`.
fn wait_for_requests(
    server: &FakeApiServer,
    what: &str,
    done: impl Fn(&[RecordedRequest]) -> bool,
) -> Vec<RecordedRequest> {
    let start = Instant::now();
    loop {
        let requests = server.requests();
        if done(&requests) {
            return requests;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the server did not see {what} within {DEADLINE:?}; it saw: {requests:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pod_lists(requests: &[RecordedRequest]) -> Vec<&RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && r.is_list())
        .collect()
}

fn pod_watches(requests: &[RecordedRequest]) -> Vec<&RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && r.is_watch())
        .collect()
}

fn namespace_lists(requests: &[RecordedRequest]) -> Vec<&RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.path == "/api/v1/namespaces" && r.is_list())
        .collect()
}

fn namespace_watches(requests: &[RecordedRequest]) -> Vec<&RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.path == "/api/v1/namespaces" && r.is_watch())
        .collect()
}

/// A server with namespaces `apps` (ambient) and `other`, pods `web` and `db` on this node and
/// `far` on another; a cache started on it and synced, and both watches open.
struct Fixture {
    server: FakeApiServer,
    cache: KubeCache,
    rx: Receiver<Change>,
    web: Pod,
    db: Pod,
    apps: Namespace,
}

fn synced_fixture() -> Fixture {
    let server = FakeApiServer::start().unwrap();
    let apps = server.apply_namespace(&namespace(
        "apps",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    server.apply_namespace(&namespace("other", json!({})));
    let web = server.apply_pod(&pod("apps", "web", NODE, "10.1.0.10"));
    let db = server.apply_pod(&pod("apps", "db", NODE, "10.1.0.11"));
    server.apply_pod(&pod("apps", "far", "node-b", "10.2.0.10"));
    let (tx, rx) = crossbeam_channel::bounded(64);
    let cache = KubeCache::start(server.kube_config(), NODE, tx).unwrap();
    let initial = changes_until_synced(&rx, 1);
    assert_eq!(initial.len(), 4, "initial changes: {initial:#?}");
    wait_for_requests(&server, "both watches", |r| {
        pod_watches(r).len() == 1 && namespace_watches(r).len() == 1
    });
    // Open (registered), so that a pause or cut from now on reaches them.
    let start = Instant::now();
    while server.open_watch_count() < 2 {
        assert!(start.elapsed() < DEADLINE, "the watches did not open");
        std::thread::sleep(Duration::from_millis(10));
    }
    Fixture {
        server,
        cache,
        rx,
        web,
        db,
        apps,
    }
}

#[test]
fn initial_list_is_delivered_then_synced_and_only_this_nodes_pods() {
    let server = FakeApiServer::start().unwrap();
    let apps = server.apply_namespace(&namespace(
        "apps",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    let other = server.apply_namespace(&namespace("other", json!({})));
    let web = server.apply_pod(&pod("apps", "web", NODE, "10.1.0.10"));
    server.apply_pod(&pod("apps", "far", "node-b", "10.2.0.10"));
    let list_rv = server.resource_version().to_string();

    let (tx, rx) = crossbeam_channel::bounded(64);
    let cache = KubeCache::start(server.kube_config(), NODE, tx).unwrap();
    let initial = changes_until_synced(&rx, 1);
    assert_eq!(
        set_of(&initial),
        BTreeSet::from([
            seen("apply", "ns", "apps", &rv_of_ns(&apps)),
            seen("apply", "ns", "other", &rv_of_ns(&other)),
            seen("apply", "pod", "web", &rv_of_pod(&web)),
        ]),
        "the far pod is on node-b and must not be delivered"
    );
    // The objects arrive whole.
    assert!(initial.contains(&Change::Apply(Object::Pod(Box::new(web.clone())))));

    // What the client asked: a list of pods with the node's field selector, then a watch
    // from the list's version, with bookmarks.
    let requests = wait_for_requests(&server, "both watches", |r| {
        pod_watches(r).len() == 1 && namespace_watches(r).len() == 1
    });
    let lists = pod_lists(&requests);
    assert_eq!(lists.len(), 1, "{requests:#?}");
    assert_eq!(
        lists[0].param("fieldSelector"),
        Some("spec.nodeName=node-a")
    );
    assert_eq!(
        lists[0].param("limit"),
        Some("500"),
        "kube-runtime's page size"
    );
    let watch = pod_watches(&requests)[0];
    assert_eq!(watch.param("fieldSelector"), Some("spec.nodeName=node-a"));
    assert_eq!(watch.param("resourceVersion"), Some(list_rv.as_str()));
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(namespace_lists(&requests).len(), 1);
    assert_eq!(namespace_lists(&requests)[0].param("fieldSelector"), None);

    let view = cache.view();
    assert_eq!(view.pod_count(), 1);
    assert_eq!(view.pod("uid-apps-web").as_deref(), Some(&web));
    assert_eq!(
        view.pod_by_ip("10.1.0.10".parse().unwrap()).as_deref(),
        Some(&web)
    );
    assert!(view.pod_by_ip("10.2.0.10".parse().unwrap()).is_none());
    assert_eq!(view.namespace("apps").as_deref(), Some(&apps));
    let health = view.health();
    assert!(health.connected && health.synced, "{health:?}");
}

#[test]
fn watched_pod_and_namespace_changes_are_delivered_in_order() {
    let f = synced_fixture();
    // Added on this node.
    let cache_pod = f.server.apply_pod(&pod("apps", "cache", NODE, "10.1.0.12"));
    assert_eq!(
        next_change(&f.rx),
        Change::Apply(Object::Pod(Box::new(cache_pod.clone())))
    );
    // Modified: a label.
    let mut relabelled = cache_pod.clone();
    relabelled
        .metadata
        .labels
        .get_or_insert_default()
        .insert("istio.io/dataplane-mode".into(), "none".into());
    let relabelled = f.server.apply_pod(&relabelled);
    assert_eq!(
        next_change(&f.rx),
        Change::Apply(Object::Pod(Box::new(relabelled.clone())))
    );
    // Added on another node: not delivered (the next change is the namespace flip).
    f.server
        .apply_pod(&pod("apps", "elsewhere", "node-b", "10.2.0.11"));
    // A namespace label flip.
    let mut flipped = f.apps.clone();
    flipped.metadata.labels =
        Some([("istio.io/dataplane-mode".to_string(), "none".to_string())].into());
    let flipped = f.server.apply_namespace(&flipped);
    assert_eq!(
        next_change(&f.rx),
        Change::Apply(Object::Namespace(Box::new(flipped.clone())))
    );
    assert_eq!(f.cache.view().namespace("apps").as_deref(), Some(&flipped));
    // Deleted.
    let gone = f.server.delete_pod("apps", "cache").unwrap();
    assert_eq!(
        describe(&next_change(&f.rx)),
        seen("delete", "pod", "cache", &rv_of_pod(&gone))
    );
    assert!(f.cache.view().pod("uid-apps-cache").is_none());
    assert!(f
        .cache
        .view()
        .pod_by_ip("10.1.0.12".parse().unwrap())
        .is_none());
    // A pod scheduled onto this node later (bound after creation) arrives as it is bound.
    let mut pending = pod("apps", "late", "", "10.1.0.13");
    pending.spec.as_mut().unwrap().node_name = None;
    f.server.apply_pod(&pending);
    let bound = f.server.apply_pod(&pod("apps", "late", NODE, "10.1.0.13"));
    assert_eq!(
        next_change(&f.rx),
        Change::Apply(Object::Pod(Box::new(bound)))
    );
    // Nothing was listed again.
    let requests = f.server.requests();
    assert_eq!(pod_lists(&requests).len(), 1);
    assert_eq!(namespace_lists(&requests).len(), 1);
    let _ = (&f.web, &f.db);
}

#[test]
fn bookmark_advances_the_watch_version_without_changes() {
    let f = synced_fixture();
    // Versions move on with changes this node's pod watch does not see; the bookmark tells
    // the client the version it has reached.
    f.server
        .apply_pod(&pod("apps", "far-2", "node-b", "10.2.0.12"));
    f.server
        .apply_pod(&pod("apps", "far-3", "node-b", "10.2.0.13"));
    f.server.bookmark();
    let bookmark_rv = f.server.resource_version().to_string();
    let before = pod_watches(&f.server.requests())[0]
        .param("resourceVersion")
        .unwrap()
        .to_string();
    assert_ne!(before, bookmark_rv);
    // Cut the watches: the client must resume from the bookmark's version.
    f.server.drop_watches();
    let requests = wait_for_requests(&f.server, "the re-watches", |r| {
        pod_watches(r).len() == 2 && namespace_watches(r).len() == 2
    });
    assert_eq!(
        pod_watches(&requests)[1].param("resourceVersion"),
        Some(bookmark_rv.as_str())
    );
    assert_eq!(
        namespace_watches(&requests)[1].param("resourceVersion"),
        Some(bookmark_rv.as_str())
    );
    assert_eq!(
        pod_lists(&requests).len(),
        1,
        "a bookmark is no reason to relist"
    );
    // No spurious change: the next change is the one made now.
    let db = f.server.apply_pod(&{
        let mut db = f.db.clone();
        db.metadata.labels = Some([("app".to_string(), "db-2".to_string())].into());
        db
    });
    assert_eq!(next_change(&f.rx), Change::Apply(Object::Pod(Box::new(db))));
}

#[test]
fn dropped_watch_resumes_and_delivers_changes_made_meanwhile() {
    let f = synced_fixture();
    let watched_from = pod_watches(&f.server.requests())[0]
        .param("resourceVersion")
        .unwrap()
        .to_string();
    // A partition: the open watches hear nothing while things change; then they are cut.
    f.server.pause_watches();
    let api = f.server.apply_pod(&pod("apps", "api", NODE, "10.1.0.14"));
    let web_gone = f.server.delete_pod("apps", "web").unwrap();
    let mut flipped = f.apps.clone();
    flipped.metadata.labels = Some(Default::default());
    let flipped = f.server.apply_namespace(&flipped);
    f.server.drop_watches();

    let mut pod_changes = Vec::new();
    let mut ns_changes = Vec::new();
    while pod_changes.len() + ns_changes.len() < 3 {
        let change = describe(&next_change(&f.rx));
        match change.1 {
            "pod" => pod_changes.push(change),
            _ => ns_changes.push(change),
        }
    }
    assert_eq!(
        pod_changes,
        [
            seen("apply", "pod", "api", &rv_of_pod(&api)),
            seen("delete", "pod", "web", &rv_of_pod(&web_gone)),
        ]
    );
    assert_eq!(
        ns_changes,
        [seen("apply", "ns", "apps", &rv_of_ns(&flipped))]
    );
    let requests = f.server.requests();
    assert_eq!(pod_watches(&requests).len(), 2);
    assert_eq!(
        pod_watches(&requests)[1].param("resourceVersion"),
        Some(watched_from.as_str()),
        "resumed from the last version seen"
    );
    assert_eq!(
        pod_lists(&requests).len(),
        1,
        "a dropped watch resumes without a relist"
    );
    assert!(f.cache.view().pod("uid-apps-web").is_none());
    assert!(f.cache.view().pod("uid-apps-api").is_some());
}

#[test]
fn gone_forces_a_relist_and_the_gap_arrives_as_deletes_and_applies() {
    let f = synced_fixture();
    // While the watches are partitioned: web is deleted, db changes, api is added, and the
    // server's history is compacted past the client's version.
    f.server.pause_watches();
    let web_before = f.cache.view().pod("uid-apps-web").unwrap();
    f.server.delete_pod("apps", "web").unwrap();
    let db = f.server.apply_pod(&{
        let mut db = f.db.clone();
        db.metadata.labels = Some([("app".to_string(), "db-2".to_string())].into());
        db
    });
    let api = f.server.apply_pod(&pod("apps", "api", NODE, "10.1.0.14"));
    f.server.expire_history();
    f.server.drop_watches();

    // Both watches get 410 and relist; each relist completing says Synced again.
    let changes = changes_until_synced(&f.rx, 2);
    assert_eq!(
        set_of(&changes),
        BTreeSet::from([
            // The delete carries the last version the cache had.
            seen("delete", "pod", "web", &rv_of_pod(&web_before)),
            seen("apply", "pod", "db", &rv_of_pod(&db)),
            seen("apply", "pod", "api", &rv_of_pod(&api)),
        ]),
        "unchanged objects (the namespaces) are not repeated: {changes:#?}"
    );
    assert_eq!(changes.len(), 3);
    let requests = f.server.requests();
    assert_eq!(
        pod_lists(&requests).len(),
        2,
        "the 410 forces a second LIST"
    );
    assert_eq!(namespace_lists(&requests).len(), 2);
    let view = f.cache.view();
    assert!(view.pod("uid-apps-web").is_none());
    assert!(view.pod_by_ip("10.1.0.10".parse().unwrap()).is_none());
    assert_eq!(view.pod("uid-apps-db").as_deref(), Some(&db));
    assert!(view.is_synced());
    // And the watch goes on from the new list.
    let late = f.server.apply_pod(&pod("apps", "late", NODE, "10.1.0.15"));
    assert_eq!(
        next_change(&f.rx),
        Change::Apply(Object::Pod(Box::new(late)))
    );
}

#[test]
fn a_list_longer_than_a_page_is_followed_with_continue_tokens() {
    let server = FakeApiServer::start().unwrap();
    let count = 520;
    for i in 0..count {
        let ip = format!("10.3.{}.{}", i / 250, i % 250 + 1);
        server.apply_pod(&pod("bulk", &format!("p{i:03}"), NODE, &ip));
    }
    let (tx, rx) = crossbeam_channel::bounded(1024);
    let cache = KubeCache::start(server.kube_config(), NODE, tx).unwrap();
    let changes = changes_until_synced(&rx, 1);
    assert_eq!(changes.len(), count);
    assert_eq!(cache.view().pod_count(), count);
    let requests = server.requests();
    let lists = pod_lists(&requests);
    assert_eq!(lists.len(), 2, "two pages: {lists:#?}");
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some());
    assert_eq!(
        lists[1].param("fieldSelector"),
        Some("spec.nodeName=node-a")
    );
}

#[test]
fn unreachable_api_server_is_retried_until_it_comes_up() {
    // A port nobody listens on (yet).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (tx, rx) = crossbeam_channel::bounded(64);
    let cache = KubeCache::start(testkit::apiserver::kube_config_for(addr), NODE, tx).unwrap();
    let view = cache.view();
    let start = Instant::now();
    while view.last_error().is_none() {
        assert!(
            start.elapsed() < DEADLINE,
            "no error reported for an unreachable server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let error = view.last_error().unwrap();
    assert!(error.contains("cannot reach"), "{error}");
    assert!(!view.is_connected() && !view.is_synced());

    let server = FakeApiServer::start_on(port).unwrap();
    let web = server.apply_pod(&pod("apps", "web", NODE, "10.1.0.10"));
    let changes = changes_until_synced(&rx, 1);
    assert_eq!(
        set_of(&changes),
        BTreeSet::from([seen("apply", "pod", "web", &rv_of_pod(&web))])
    );
    assert!(view.is_synced());
}

#[test]
fn forbidden_is_reported_with_what_to_do_then_recovers() {
    let server = FakeApiServer::start().unwrap();
    server.set_forbidden(true);
    let apps = server.apply_namespace(&namespace("apps", json!({})));
    let (tx, rx) = crossbeam_channel::bounded(64);
    let cache = KubeCache::start(server.kube_config(), NODE, tx).unwrap();
    let view = cache.view();
    let start = Instant::now();
    while view.last_error().is_none() {
        assert!(start.elapsed() < DEADLINE, "no error reported for a 403");
        std::thread::sleep(Duration::from_millis(20));
    }
    let error = view.last_error().unwrap();
    assert!(
        error.contains("forbidden (403)") && error.contains("ClusterRole"),
        "{error}"
    );
    assert!(!view.is_synced());
    assert!(rx.is_empty(), "nothing delivered while forbidden");

    server.set_forbidden(false);
    let changes = changes_until_synced(&rx, 1);
    assert_eq!(
        set_of(&changes),
        BTreeSet::from([seen("apply", "ns", "apps", &rv_of_ns(&apps))])
    );
    assert!(view.health().connected);
}

#[test]
fn stop_ends_the_thread_and_drops_the_sender() {
    let f = synced_fixture();
    let Fixture { mut cache, rx, .. } = f;
    cache.stop();
    // The sender went with the thread: the channel reports disconnection, not a hang.
    assert!(matches!(
        rx.recv_timeout(DEADLINE),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
    ));
}

#[test]
fn an_empty_node_name_is_refused() {
    let (tx, _rx) = crossbeam_channel::bounded::<Change>(1);
    let config = testkit::apiserver::kube_config_for("127.0.0.1:1".parse().unwrap());
    assert!(matches!(
        KubeCache::start(config, "", tx),
        Err(kubecache::KubeError::EmptyNodeName)
    ));
}
