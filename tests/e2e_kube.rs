//! End to end in Kubernetes mode: the real `zbridge run --kubeconfig FILE` against testkit's
//! in-process API server (the real kube-rs client over HTTP, list/watch, pods/status patches)
//! and the real kernel: programs attached to the test's own cgroup, pods as cgroups with the
//! kubelet's systemd layout below it, whose UIDs are those of the pod objects, clients in a pod
//! network namespace, a fake ztunnel and a service in a node namespace.
//!
//! Every wait is bounded by a deadline (a hang guard, not a timing assertion).

mod e2e_support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_support::{http_get, Agent};
use programmer::layout::CgroupInfo;
use programmer::MapBackend;
use serde_json::json;
use testkit::http::sample;
use testkit::mesh::{self, Mesh, POD4, POD6, SERVICE4, ZTUNNEL4, ZTUNNEL6};
use testkit::objects::{namespace, pod};
use testkit::zds_ztunnel::{InPodOptions, InPodZtunnel, ZdsEvent};
use testkit::ztunnel::{self, Helper, Listener, Outcome, OUTBOUND};
use testkit::{BpfFs, FakeApiServer, FakeZtunnel};

const DEADLINE: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(10);
const REDIRECTION: &str = "ambient.istio.io/redirection";

/// [`testkit::wait_until`] with this file's [`DEADLINE`].
fn wait_until(what: &str, context: impl Fn() -> String, cond: impl Fn() -> bool) {
    testkit::wait_until(what, DEADLINE, context, cond)
}

fn svc4() -> SocketAddr {
    SocketAddr::new(SERVICE4, mesh::SERVICE_PORT)
}

/// A pod's cgroups as the kubelet (systemd driver, containerd) makes them, under the test's
/// attach cgroup: `.../kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID
/// with _>.slice/cri-containerd-<64 hex>.scope`.
struct PodCgroup {
    uid: String,
    /// The pod-level cgroup (what the agent enrols).
    pod: String,
    /// The container's cgroup (where its processes run).
    container: String,
}

impl PodCgroup {
    fn new(mesh: &Mesh) -> PodCgroup {
        let uid = unique_uid();
        let pod = mesh
            .cgroup
            .child(&format!(
                "attach/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ))
            .unwrap();
        let container = format!("{pod}/cri-containerd-{}.scope", "c0".repeat(32));
        std::fs::create_dir(mesh.cgroup.dir_of(&container)).unwrap();
        PodCgroup {
            uid,
            pod,
            container,
        }
    }
}

/// A pod UID no other test (or run) uses: the agent sees every process on the machine.
fn unique_uid() -> String {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// `pod` as it is before the kubelet has reported its address: pending, no IP in its status.
fn without_status_address(pod: &mut k8s_openapi::api::core::v1::Pod) {
    let status = pod.status.as_mut().expect("testkit's pods have a status");
    status.phase = Some("Pending".to_string());
    status.pod_ip = None;
    status.pod_ips = None;
}

/// A TCP proxy in front of the API server that can go away (its port refuses connections and
/// every open connection is cut) and come back on the same port: the API server lost and
/// found, while the server keeps its state and history.
struct Proxy {
    port: u16,
    target: SocketAddr,
    up: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    /// Both ends of every connection, to cut them.
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut proxy = Proxy {
            port,
            target,
            up: None,
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        proxy.serve(listener);
        proxy
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let (target, conns) = (self.target, self.conns.clone());
        let thread = std::thread::spawn({
            let running = running.clone();
            move || {
                while running.load(Ordering::Acquire) {
                    let client = match listener.accept() {
                        Ok((client, _)) => client,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(_) => continue,
                    };
                    client.set_nonblocking(false).unwrap();
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let mut all = conns.lock().unwrap();
                    all.push(client.try_clone().unwrap());
                    all.push(server.try_clone().unwrap());
                    pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                    pump(server, client);
                }
                // The listener is dropped here: the port refuses from now on.
            }
        });
        self.up = Some((running, thread));
    }

    /// The API server goes away: refused connections, open ones cut.
    fn down(&mut self) {
        if let Some((running, thread)) = self.up.take() {
            running.store(false, Ordering::Release);
            thread.join().unwrap();
        }
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// It comes back on the same port.
    fn up(&mut self) {
        let listener = TcpListener::bind(self.addr()).unwrap();
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

/// Copies `from` to `to` on a thread until either end closes.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// One test's node: a mesh (cgroups, namespaces), a bpffs, the API server, the fake ztunnel
/// and the service. Field order is drop order: the agent first, the mesh last.
struct Node {
    agent: Option<Agent>,
    sleepers: Vec<Helper>,
    ztunnel: FakeZtunnel,
    service: Listener,
    proxy: Option<Proxy>,
    server: FakeApiServer,
    bpffs: BpfFs,
    dir: tempfile::TempDir,
    /// The node's name (unique: the pods' `spec.nodeName`).
    name: String,
    ztunnel_pod: PodCgroup,
    mesh: Mesh,
}

impl Node {
    /// The mesh, the API server with `istio-system`, the node's ztunnel pod (app=ztunnel, the
    /// fake ztunnel's addresses, its process in the pod's cgroup), and the service.
    fn new(prefix: &str) -> Node {
        let mesh = Mesh::new(prefix).expect("mesh");
        let bpffs = BpfFs::new(prefix).expect("bpffs");
        let dir = tempfile::tempdir().unwrap();
        let name = testkit::unique_name(prefix);
        let server = FakeApiServer::start().unwrap();
        server.apply_namespace(&namespace("istio-system", false));
        let ztunnel_pod = PodCgroup::new(&mesh);
        server.apply_pod(&pod(
            "istio-system",
            "ztunnel-abcde",
            &ztunnel_pod.uid,
            &name,
            &[ZTUNNEL4, ZTUNNEL6],
            json!({"app": "ztunnel"}),
        ));
        let ztunnel = FakeZtunnel::start(
            &mesh.node_ns,
            &mesh.cgroup,
            &ztunnel_pod.container,
            &[ZTUNNEL4, ZTUNNEL6],
            true,
        )
        .expect("fake ztunnel");
        let service = ztunnel::service(
            &mesh.node_ns,
            &mesh.cgroup,
            &mesh.outside,
            &mesh::service_addrs(),
        )
        .expect("service");
        Node {
            agent: None,
            sleepers: Vec::new(),
            ztunnel,
            service,
            proxy: None,
            server,
            bpffs,
            dir,
            name,
            ztunnel_pod,
            mesh,
        }
    }

    /// A long-lived process in a pod's container, in the pod network namespace.
    fn sleeper(&mut self, pod: &PodCgroup) {
        let helper = Helper::spawn(
            &self.mesh.pod_ns,
            &self.mesh.cgroup,
            &pod.container,
            &["sleep".to_string()],
        )
        .expect("sleeper");
        helper.wait_ready().expect("sleeper ready");
        self.sleepers.push(helper);
    }

    /// Applies pod `namespace/name` of this node (running, with `ips` and `labels`) whose UID
    /// is that of `cgroup`.
    fn apply_pod(
        &self,
        namespace: &str,
        name: &str,
        cgroup: &PodCgroup,
        ips: &[IpAddr],
        labels: serde_json::Value,
    ) {
        self.server
            .apply_pod(&pod(namespace, name, &cgroup.uid, &self.name, ips, labels));
    }

    /// Starts `zbridge run` in Kubernetes mode with a kubeconfig for `api` (the server, or a
    /// proxy in front of it); the node name from `--node-name`, or with `node_name_env` from
    /// `NODE_NAME` as the downward API sets it.
    fn start_agent(&mut self, api: SocketAddr, node_name_env: bool) {
        // These tests' ztunnel listens in its own namespace (node mode); in-pod mode, the
        // default, has a test of its own below.
        self.start_agent_with(api, node_name_env, &["--ztunnel-mode", "node"]);
    }

    /// [`Node::start_agent`] with `mode` flags before the others.
    fn start_agent_with(&mut self, api: SocketAddr, node_name_env: bool, mode: &[&str]) {
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, testkit::apiserver::kubeconfig_yaml_for(api)).unwrap();
        let log = self.dir.path().join("agent.log");
        let name = self.name.clone();
        let agent = Agent::spawn(&self.mesh, &self.pin_dir(), log, |cmd| {
            cmd.args(mode)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .env_remove("NODE_NAME")
                .env_remove("KUBECONFIG");
            if node_name_env {
                cmd.env("NODE_NAME", name);
            } else {
                cmd.args(["--node-name", &name]);
            }
        });
        self.agent = Some(agent);
    }

    fn pin_dir(&self) -> PathBuf {
        self.bpffs.pin_dir()
    }

    fn log(&self) -> String {
        self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
    }

    /// The pinned `cgroup_info_map` (empty while the agent has not made it yet).
    fn entries(&self) -> BTreeMap<u64, CgroupInfo> {
        let Ok(backend) = programmer::KernelMaps::open(&self.pin_dir()) else {
            return BTreeMap::new();
        };
        backend
            .cgroup_entries()
            .unwrap_or_default()
            .into_iter()
            .map(|(id, info)| (id.0, info))
            .collect()
    }

    fn id(&self, path: &str) -> u64 {
        self.mesh.id(path)
    }

    fn wait_entries(&self, what: &str, cond: impl Fn(&BTreeMap<u64, CgroupInfo>) -> bool) {
        wait_until(
            what,
            || format!("entries: {:?}\nagent log:\n{}", self.entries(), self.log()),
            || cond(&self.entries()),
        );
    }

    /// The address of the agent's ops endpoint, from its log.
    fn ops_addr(&self) -> SocketAddr {
        const NEEDLE: &str = "ops endpoint listening on http://";
        wait_until(
            "the ops endpoint",
            || self.log(),
            || self.log().contains(NEEDLE),
        );
        let log = self.log();
        let rest = log.split(NEEDLE).nth(1).unwrap();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// `GET path` on the ops endpoint: status code and body.
    fn ops_get(&self, path: &str) -> (u16, String) {
        http_get(self.ops_addr(), path)
    }

    fn wait_ready(&self, ready: bool) {
        let want = if ready { 200 } else { 503 };
        wait_until(
            &format!("/readyz {want}"),
            || format!("{:?}\nagent log:\n{}", self.ops_get("/readyz"), self.log()),
            || self.ops_get("/readyz").0 == want,
        );
    }

    /// The pod's `ambient.istio.io/redirection` annotation as the server stores it.
    fn redirection(&self, namespace: &str, name: &str) -> Option<String> {
        self.server
            .pod(namespace, name)
            .and_then(|p| p.metadata.annotations)
            .and_then(|a| a.get(REDIRECTION).cloned())
    }

    /// The pods/status patches the server received for a pod, as JSON bodies.
    fn status_patches(&self, namespace: &str, name: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}/status");
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path == path)
            .map(|r| serde_json::from_slice(&r.body).expect("a JSON patch"))
            .collect()
    }

    /// One connection from a fresh process in `pod`'s container to the service.
    fn connect(&self, pod: &PodCgroup) -> Outcome {
        let m = &self.mesh;
        ztunnel::connect_once(&m.pod_ns, &m.cgroup, &pod.container, svc4()).unwrap()
    }

    /// Asserts that a connection from `pod` landed on ztunnel's 15001 with the service as its
    /// original destination.
    fn assert_redirected(&self, pod: &PodCgroup) {
        match self.connect(pod) {
            Outcome::Ok { peer, .. } => assert_eq!(peer, SocketAddr::new(ZTUNNEL4, OUTBOUND)),
            other => panic!("connect failed: {other:?}\nagent log:\n{}", self.log()),
        }
        let accepted = self.ztunnel.next(WAIT).expect("ztunnel accepted");
        assert_eq!(accepted.orig, Some(Ok(svc4())));
        let at_service = self.service.next(WAIT).expect("ztunnel's upstream connect");
        assert_eq!(at_service.peer.ip(), ZTUNNEL4);
    }

    /// Waits for `pod`'s in-pod entry (ztunnel acked it, the agent enrolled it).
    fn wait_inpod_entry(&self, pod: &PodCgroup) {
        let id = self.id(&pod.pod);
        self.wait_entries("the pod's in-pod entry", |e| {
            e.get(&id)
                .is_some_and(|i| i.flags & programmer::layout::F_INPOD != 0)
        });
    }

    /// Asserts that a connection from `pod` landed on the in-pod ztunnel's 15001 inside the pod
    /// (`fake`), with the service as its original destination.
    fn assert_inpod_redirected(&self, pod: &PodCgroup, fake: &InPodZtunnel) {
        match self.connect(pod) {
            Outcome::Ok { peer, .. } => assert!(
                peer.port() == 15001 && peer.ip().is_loopback(),
                "not to ztunnel in the pod: {peer}"
            ),
            other => panic!("connect failed: {other:?}\n{}", self.log()),
        }
        let accepted = fake
            .wait_for(WAIT, |e| matches!(e, ZdsEvent::Accepted { .. }))
            .unwrap_or_else(|seen| panic!("nothing accepted; saw {seen:?}"));
        let ZdsEvent::Accepted { uid, accepted } = accepted else {
            unreachable!()
        };
        assert_eq!((uid, accepted.orig), (pod.uid.clone(), Some(Ok(svc4()))));
    }

    /// Asserts that a connection from `pod` went straight to the service from the pod's address.
    fn assert_direct(&self, pod: &PodCgroup) {
        match self.connect(pod) {
            Outcome::Ok { peer, .. } => assert_eq!(peer, svc4()),
            other => panic!("connect failed: {other:?}\nagent log:\n{}", self.log()),
        }
        let at_service = self.service.next(WAIT).expect("service accepted");
        assert_eq!((at_service.local, at_service.peer.ip()), (svc4(), POD4));
        assert_eq!(self.ztunnel.drain(), vec![]);
    }
}

/// A pod appears, its namespace gets the ambient label, and the process in its cgroup is
/// redirected to the fake ztunnel while the server sees the status patch; the label goes, and
/// the next connect goes direct while the annotation is removed. A pod that execs its first
/// process after the agent is ready is enrolled by that exec, and /metrics shows the
/// enrolment latency, the decisions and the map entries.
#[test]
fn namespace_label_captures_and_releases_a_pod_with_status_and_metrics() {
    if !testkit::require_root("namespace_label_captures_and_releases_a_pod_with_status_and_metrics")
    {
        return;
    }
    let mut node = Node::new("e2e-kube");
    let app = PodCgroup::new(&node.mesh);
    let late = PodCgroup::new(&node.mesh);
    node.server.apply_namespace(&namespace("shop", false));
    node.apply_pod("shop", "app", &app, &[POD4, POD6], json!({}));
    // A pod of its own choosing (pod label), whose container runs nothing yet.
    let late_ip: IpAddr = "10.99.1.3".parse().unwrap();
    node.apply_pod(
        "shop",
        "late",
        &late,
        &[late_ip],
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    node.sleeper(&app);
    let api = node.server.addr();
    node.start_agent(api, true);

    // Ready: the cache synced, the scan resolved, the maps programmed; ztunnel enrolled at
    // its pod-level cgroup, the app pod (namespace not ambient) not.
    node.wait_ready(true);
    let (zt_id, app_id, late_id) = (
        node.id(&node.ztunnel_pod.pod),
        node.id(&app.pod),
        node.id(&late.pod),
    );
    node.wait_entries("ztunnel's entry", |e| e.contains_key(&zt_id));
    assert_eq!(
        node.entries().keys().copied().collect::<Vec<_>>(),
        vec![zt_id]
    );
    node.assert_direct(&app);

    // The namespace joins the mesh: the running pod is captured, and annotated.
    node.server.apply_namespace(&namespace("shop", true));
    node.wait_entries("the app pod's entry", |e| e.contains_key(&app_id));
    assert_eq!(node.entries()[&app_id].ips(), vec![POD4, POD6]);
    node.assert_redirected(&app);
    wait_until(
        "the redirection annotation",
        || format!("{:?}\n{}", node.server.pod("shop", "app"), node.log()),
        || node.redirection("shop", "app").as_deref() == Some("enabled"),
    );
    assert_eq!(
        node.status_patches("shop", "app"),
        vec![json!({"metadata": {"annotations": {REDIRECTION: "enabled"}}})]
    );
    let log = node.log();
    assert!(
        log.contains(&format!("shop/app: cgroup {} → ambient", app.pod)),
        "the decision change is logged with pod, cgroup and reason:\n{log}"
    );

    // The namespace leaves: the entry goes, the next connect is direct, the annotation goes.
    node.server.apply_namespace(&namespace("shop", false));
    node.wait_entries("the app pod's entry removed", |e| !e.contains_key(&app_id));
    node.assert_direct(&app);
    wait_until(
        "the redirection annotation removed",
        || format!("{:?}\n{}", node.server.pod("shop", "app"), node.log()),
        || node.redirection("shop", "app").is_none(),
    );
    assert_eq!(
        node.status_patches("shop", "app")[1..],
        [json!({"metadata": {"annotations": {REDIRECTION: null}}})]
    );
    assert!(node
        .log()
        .contains(&format!("shop/app: cgroup {} → none", app.pod)));

    // The late pod's first process: its exec enrols the pod.
    node.sleeper(&late);
    node.wait_entries("the late pod's entry", |e| e.contains_key(&late_id));
    assert_eq!(node.entries()[&late_id].ips(), vec![late_ip]);
    let metrics = || node.ops_get("/metrics").1;
    wait_until("the map entries and decisions in /metrics", metrics, || {
        let text = metrics();
        sample(&text, "zbridge_map_entries") == Some(2.0)
            && sample(&text, "zbridge_decisions{role=\"ambient\"}") == Some(1.0)
            && sample(&text, "zbridge_decisions{role=\"ztunnel\"}") == Some(1.0)
    });
    let text = metrics();
    // Exactly one enrolment was caused by an exec (the late pod's); the others came from the
    // scan and from the namespace label.
    assert_eq!(
        sample(&text, "zbridge_enrolment_latency_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "zbridge_enrolment_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(1.0)
    );
    let sum = sample(&text, "zbridge_enrolment_latency_seconds_sum").unwrap();
    assert!(sum > 0.0, "{text}");
    assert!(sample(&text, "zbridge_events_total{type=\"exec\"}").unwrap() >= 1.0);
    assert!(sample(&text, "zbridge_batch_size_count").unwrap() >= 3.0);
}

/// A new pod whose status has no address yet (the kubelet reports it after the sandbox has
/// started, and the containers may run and connect before): its first process enrols it with
/// the address of its network namespace, and its connects land on ztunnel; when the status
/// brings the same addresses, the entry is left as it is.
#[test]
fn a_pod_is_captured_before_its_status_has_its_address() {
    if !testkit::require_root("a_pod_is_captured_before_its_status_has_its_address") {
        return;
    }
    let mut node = Node::new("e2e-kube-noip");
    let fresh = PodCgroup::new(&node.mesh);
    node.server.apply_namespace(&namespace("shop", true));
    let mut pending = pod("shop", "fresh", &fresh.uid, &node.name, &[POD4], json!({}));
    without_status_address(&mut pending);
    node.server.apply_pod(&pending);
    let api = node.server.addr();
    node.start_agent(api, true);
    node.wait_ready(true);
    let (zt_id, fresh_id) = (node.id(&node.ztunnel_pod.pod), node.id(&fresh.pod));
    node.wait_entries("ztunnel's entry", |e| e.contains_key(&zt_id));
    assert!(!node.entries().contains_key(&fresh_id));

    // The pod's first process (in the pod network namespace, which has POD4 and POD6).
    node.sleeper(&fresh);
    node.wait_entries("the fresh pod's entry", |e| e.contains_key(&fresh_id));
    assert_eq!(node.entries()[&fresh_id].ips(), vec![POD4, POD6]);
    node.assert_redirected(&fresh);
    let log = node.log();
    assert!(
        log.contains(&format!(
            "shop/fresh: cgroup {} → ambient {POD4},{POD6} (its namespace labelled \
             istio.io/dataplane-mode=ambient; the address of its network namespace, not yet in \
             its status)",
            fresh.pod
        )),
        "the decision names where its address came from:\n{log}"
    );

    // The kubelet reports the addresses: the same entry, no second decision line. A pod
    // applied after it, whose entry shows that the agent has seen the status (one watch,
    // in order), marks the moment.
    let marker = PodCgroup::new(&node.mesh);
    node.sleeper(&marker);
    node.apply_pod("shop", "fresh", &fresh, &[POD4, POD6], json!({}));
    node.apply_pod(
        "shop",
        "marker",
        &marker,
        &["10.99.1.5".parse().unwrap()],
        json!({}),
    );
    let marker_id = node.id(&marker.pod);
    node.wait_entries("the marker pod's entry", |e| e.contains_key(&marker_id));
    node.assert_redirected(&fresh);
    assert_eq!(node.entries()[&fresh_id].ips(), vec![POD4, POD6]);
    assert_eq!(
        node.log()
            .matches(&format!("shop/fresh: cgroup {} →", fresh.pod))
            .count(),
        1,
        "{}",
        node.log()
    );
}

/// The app pod of [`shop_pods_behind_proxy`] and the cgroup ids of ztunnel's pod and both pods.
struct ShopPods {
    app: PodCgroup,
    zt_id: u64,
    app_id: u64,
    other_id: u64,
}

/// The ambient namespace `shop` with two pods on `node`, "app" (the mesh's pod addresses) and
/// "other" (`other_ip`), each with a live process, and the agent started through a [`Proxy`]
/// (kept in `node.proxy`) that can take the API server away.
fn shop_pods_behind_proxy(node: &mut Node, other_ip: IpAddr) -> ShopPods {
    let app = PodCgroup::new(&node.mesh);
    let other = PodCgroup::new(&node.mesh);
    node.server.apply_namespace(&namespace("shop", true));
    node.apply_pod("shop", "app", &app, &[POD4, POD6], json!({}));
    node.apply_pod("shop", "other", &other, &[other_ip], json!({}));
    node.sleeper(&app);
    node.sleeper(&other);
    let proxy = Proxy::start(node.server.addr());
    let api = proxy.addr();
    node.proxy = Some(proxy);
    node.start_agent(api, false);
    ShopPods {
        zt_id: node.id(&node.ztunnel_pod.pod),
        app_id: node.id(&app.pod),
        other_id: node.id(&other.pod),
        app,
    }
}

/// The API server goes away mid-run: the agent reports not ready and keeps every decision
/// (the captured pod's connects still land on ztunnel) while the namespace loses its label
/// and a pod is deleted; when the server returns, both changes are applied.
#[test]
fn api_server_lost_and_back_keeps_decisions_then_applies_changes_made_meanwhile() {
    if !testkit::require_root(
        "api_server_lost_and_back_keeps_decisions_then_applies_changes_made_meanwhile",
    ) {
        return;
    }
    let mut node = Node::new("e2e-kube-lost");
    let ShopPods {
        app,
        zt_id,
        app_id,
        other_id,
    } = shop_pods_behind_proxy(&mut node, "10.99.1.4".parse().unwrap());

    node.wait_ready(true);
    node.wait_entries("both pods and ztunnel enrolled", |e| {
        e.contains_key(&zt_id) && e.contains_key(&app_id) && e.contains_key(&other_id)
    });
    node.assert_redirected(&app);
    wait_until(
        "the app pod annotated",
        || node.log(),
        || node.redirection("shop", "app").as_deref() == Some("enabled"),
    );

    // The API server goes away.
    node.proxy.as_mut().unwrap().down();
    node.wait_ready(false);
    let (_, body) = node.ops_get("/readyz");
    assert!(
        body.contains("Kubernetes API server unreachable"),
        "/readyz says why: {body}"
    );
    wait_until(
        "the loss logged",
        || node.log(),
        || node.log().contains("Kubernetes API server lost"),
    );
    let before = node.entries();
    // Meanwhile the namespace leaves the mesh and a pod is deleted: the agent cannot see it.
    node.server.apply_namespace(&namespace("shop", false));
    node.server.delete_pod("shop", "other");
    // Nothing is cleared: the entries are as they were, the pod is still captured, and the
    // agent is still not ready.
    node.assert_redirected(&app);
    assert_eq!(node.entries(), before);
    assert!(before.contains_key(&app_id) && before.contains_key(&other_id));
    assert_eq!(node.ops_get("/readyz").0, 503);

    // It comes back: the changes made meanwhile are applied.
    node.proxy.as_mut().unwrap().up();
    node.wait_entries("both pods released, ztunnel kept", |e| {
        e.contains_key(&zt_id) && !e.contains_key(&app_id) && !e.contains_key(&other_id)
    });
    node.assert_direct(&app);
    node.wait_ready(true);
    assert!(node.log().contains("Kubernetes API server reachable again"));
    wait_until(
        "the app pod's annotation removed through the returned server",
        || node.log(),
        || node.redirection("shop", "app").is_none(),
    );
}

/// A restart while the API server is unreachable: the new agent reuses the pinned maps, so the
/// pods stay captured, removes nothing while it cannot see, and says it is not ready; once the
/// server is back and the cache synced, the entry of a pod deleted meanwhile is removed and
/// the others are kept.
#[test]
fn restart_with_api_server_unreachable_keeps_pinned_state_until_synced() {
    if !testkit::require_root("restart_with_api_server_unreachable_keeps_pinned_state_until_synced")
    {
        return;
    }
    let mut node = Node::new("e2e-kube-restart");
    let ShopPods {
        app,
        zt_id,
        app_id,
        other_id,
    } = shop_pods_behind_proxy(&mut node, "10.99.1.5".parse().unwrap());
    let api = node.proxy.as_ref().unwrap().addr();
    node.wait_entries("both pods and ztunnel enrolled", |e| {
        e.contains_key(&zt_id) && e.contains_key(&app_id) && e.contains_key(&other_id)
    });
    node.wait_ready(true);

    // The agent dies; while it is down a pod is deleted and the API server goes away.
    drop(node.agent.take());
    node.server.delete_pod("shop", "other");
    node.proxy.as_mut().unwrap().down();
    let before = node.entries();
    node.start_agent(api, false);
    wait_until(
        "the new agent up, the API server unreachable",
        || node.log(),
        || node.log().contains("Kubernetes API server lost"),
    );
    let (code, body) = node.ops_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("kube cache not synced"), "{body}");
    assert!(body.contains("Kubernetes API server unreachable"), "{body}");
    assert!(
        node.log()
            .contains("3 entries pinned by a previous run stay in force"),
        "{}",
        node.log()
    );
    // The pinned state is untouched and in force.
    node.assert_redirected(&app);
    assert_eq!(node.entries(), before);

    // The server returns: the cache syncs, the deleted pod's entry goes, the others stay.
    node.proxy.as_mut().unwrap().up();
    node.wait_entries("the deleted pod's entry reconciled away", |e| {
        !e.contains_key(&other_id)
    });
    assert_eq!(
        node.entries()
            .keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [zt_id, app_id].into_iter().collect(),
        "agent log:\n{}",
        node.log()
    );
    node.wait_ready(true);
    node.assert_redirected(&app);
}

/// Kubernetes mode refuses to guess: no node name, or a kubeconfig it cannot read, is an error
/// naming the flag, before anything on the host is touched.
#[test]
fn kubernetes_mode_needs_a_node_name_and_a_readable_kubeconfig() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_zbridge"))
            .arg("run")
            .args(args)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stderr) = run(&["--pin-dir", "/nonexistent/pins"]);
    assert!(!ok);
    assert!(
        stderr.contains("--node-name NAME or set NODE_NAME") && stderr.contains("hostname"),
        "{stderr}"
    );
    let (ok, stderr) = run(&[
        "--node-name",
        "node-a",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--kubeconfig /nonexistent/kubeconfig: cannot read it"),
        "{stderr}"
    );
    // Standalone-only and Kubernetes-only flags do not mix.
    let (ok, stderr) = run(&[
        "--standalone",
        "--workloads",
        "/nonexistent/w.yaml",
        "--kubeconfig",
        "/k",
    ]);
    assert!(!ok);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

/// Kubernetes mode, in-pod (the default): an ambient pod of the API server is handed to a fake
/// in-pod ztunnel over ZDS with the pod's uid, namespace, name and service account and its
/// network namespace; once acked, the pod's connect lands on ztunnel's 15001 inside the pod
/// with its original destination; the pod deleted from the API server, its entry goes first,
/// then ztunnel is told `del`.
#[test]
fn kubernetes_inpod_pod_is_handed_to_ztunnel_over_zds_and_captured() {
    if !testkit::require_root("kubernetes_inpod_pod_is_handed_to_ztunnel_over_zds_and_captured") {
        return;
    }
    inpod_pod_handed_over_and_captured("e2e-kinpod", true);
}

/// The same for a pod whose status has no address yet: its first process hands it to ztunnel
/// with the address of its network namespace (docs/design-notes.md, "Resolver").
#[test]
fn kubernetes_inpod_pod_without_a_status_address_is_handed_over_by_its_first_process() {
    if !testkit::require_root(
        "kubernetes_inpod_pod_without_a_status_address_is_handed_over_by_its_first_process",
    ) {
        return;
    }
    inpod_pod_handed_over_and_captured("e2e-kinpod-noip", false);
}

/// The in-pod round of the two tests above: the pod with or without addresses in its status.
fn inpod_pod_handed_over_and_captured(prefix: &str, status_has_address: bool) {
    let mut node = Node::new(prefix);
    let app = PodCgroup::new(&node.mesh);
    node.server.apply_namespace(&namespace("shop", true));
    let mut app_pod = pod(
        "shop",
        "app",
        &app.uid,
        &node.name,
        &[POD4, POD6],
        json!({}),
    );
    if !status_has_address {
        without_status_address(&mut app_pod);
    }
    node.server.apply_pod(&app_pod);
    node.sleeper(&app);
    let zds = node.dir.path().join("ztunnel.sock");
    let state = node.dir.path().join("zds.json");
    let api = node.server.addr();
    node.start_agent_with(
        api,
        false,
        &[
            "--zds-socket",
            zds.to_str().unwrap(),
            "--zds-status-file",
            state.to_str().unwrap(),
        ],
    );
    // Before ztunnel is there the pod is captured (fail closed): announced `pending`, as
    // Istio's node agent marks a pod ztunnel has not acked, and its connects are refused.
    wait_until(
        "the pending annotation",
        || node.log(),
        || node.redirection("shop", "app").as_deref() == Some("pending"),
    );
    let outcome = node.connect(&app);
    assert_eq!(outcome.errno(), Some(libc::ECONNREFUSED), "{outcome:?}");
    // ztunnel's in-pod process, in ztunnel's pod cgroup.
    let fake = InPodZtunnel::start(
        &node.mesh.cgroup,
        &node.ztunnel_pod.container,
        &zds,
        InPodOptions::default(),
    )
    .expect("fake in-pod ztunnel");
    let netns =
        std::os::unix::fs::MetadataExt::ino(&node.mesh.pod_ns.file().unwrap().metadata().unwrap());
    let add = fake
        .wait_for(WAIT, |e| matches!(e, ZdsEvent::Add { .. }))
        .unwrap_or_else(|seen| panic!("no add; saw {seen:?}\n{}", node.log()));
    assert_eq!(
        add,
        ZdsEvent::Add {
            uid: app.uid.clone(),
            name: "app".into(),
            namespace: "shop".into(),
            service_account: "default".into(),
            netns_inode: netns,
        }
    );
    let id = node.id(&app.pod);
    node.wait_inpod_entry(&app);
    node.assert_inpod_redirected(&app, &fake);
    wait_until(
        "the enabled annotation once ztunnel serves the pod",
        || node.log(),
        || node.redirection("shop", "app").as_deref() == Some("enabled"),
    );
    assert_eq!(
        node.status_patches("shop", "app"),
        vec![
            json!({"metadata": {"annotations": {REDIRECTION: "pending"}}}),
            json!({"metadata": {"annotations": {REDIRECTION: "enabled"}}})
        ]
    );

    // Deleted from the API server: the entry first, then `del`.
    node.server.delete_pod("shop", "app");
    fake.wait_for(
        WAIT,
        |e| matches!(e, ZdsEvent::Del { uid } if *uid == app.uid),
    )
    .unwrap_or_else(|seen| panic!("no del; saw {seen:?}\n{}", node.log()));
    assert!(
        !node.entries().contains_key(&id),
        "del was sent while the pod's entry was still there"
    );
}

/// In-pod mode, the agent restarts while the API server is unreachable and ztunnel keeps
/// running (it connects again, as it does). The new agent cannot decide its pods yet: it sends
/// ztunnel no snapshot's end, so ztunnel drops no pod and the pod's connects still land on it;
/// once the server is back, the pod is added again before the end, and nothing is dropped.
#[test]
fn inpod_restart_with_api_server_unreachable_leaves_ztunnels_pods_alone() {
    if !testkit::require_root(
        "inpod_restart_with_api_server_unreachable_leaves_ztunnels_pods_alone",
    ) {
        return;
    }
    let mut node = Node::new("e2e-kinpod-rs");
    let app = PodCgroup::new(&node.mesh);
    node.server.apply_namespace(&namespace("shop", true));
    node.apply_pod("shop", "app", &app, &[POD4, POD6], json!({}));
    node.sleeper(&app);
    let proxy = Proxy::start(node.server.addr());
    let api = proxy.addr();
    node.proxy = Some(proxy);
    let zds = node.dir.path().join("ztunnel.sock");
    let state = node.dir.path().join("zds.json");
    let inpod_args = [
        "--zds-socket",
        zds.to_str().unwrap(),
        "--zds-status-file",
        state.to_str().unwrap(),
    ];
    node.start_agent_with(api, false, &inpod_args);
    let options = InPodOptions {
        reconnect: true,
        ..InPodOptions::default()
    };
    let fake = InPodZtunnel::start(
        &node.mesh.cgroup,
        &node.ztunnel_pod.container,
        &zds,
        options,
    )
    .expect("fake in-pod ztunnel");
    let wait = |what: &str, want: &dyn Fn(&ZdsEvent) -> bool| {
        fake.wait_for(WAIT, want)
            .unwrap_or_else(|events| panic!("no {what}; saw {events:?}"));
    };
    wait("the pod's add", &|e| matches!(e, ZdsEvent::Add { .. }));
    wait("the snapshot's end", &|e| *e == ZdsEvent::Snapshot);
    node.wait_inpod_entry(&app);
    node.assert_inpod_redirected(&app, &fake);

    // The API server goes away, then the agent restarts.
    node.proxy.as_mut().unwrap().down();
    drop(node.agent.take());
    node.start_agent_with(api, false, &inpod_args);
    wait("ztunnel connected to the new agent", &|e| {
        *e == ZdsEvent::Ready
    });
    wait_until(
        "the new agent up, the API server unreachable",
        || node.log(),
        || node.log().contains("Kubernetes API server lost"),
    );
    // No end of a snapshot while the agent cannot see its pods: ztunnel still serves the pod.
    assert!(
        fake.wait_for(Duration::from_millis(500), |e| matches!(
            e,
            ZdsEvent::Snapshot | ZdsEvent::Dropped { .. }
        ))
        .is_err(),
        "a snapshot's end (or a drop) before the agent saw its pods"
    );
    node.assert_inpod_redirected(&app, &fake);

    // The server returns: the pod is added again, then the end; nothing is dropped.
    node.proxy.as_mut().unwrap().up();
    let mut since = Vec::new();
    fake.wait_for(WAIT, |e| {
        since.push(e.clone());
        *e == ZdsEvent::Snapshot
    })
    .unwrap_or_else(|events| panic!("no snapshot's end; saw {events:?}\n{}", node.log()));
    assert!(
        since
            .iter()
            .any(|e| matches!(e, ZdsEvent::Add { uid, .. } if *uid == app.uid)),
        "the pod is added before the end: {since:?}"
    );
    assert!(
        fake.wait_for(Duration::from_millis(300), |e| matches!(
            e,
            ZdsEvent::Dropped { .. }
        ))
        .is_err(),
        "ztunnel dropped a pod"
    );
    node.assert_inpod_redirected(&app, &fake);
}
