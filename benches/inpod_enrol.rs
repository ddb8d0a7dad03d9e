//! In-pod enrolment without a CNI (root, real kernel, the real agent; namespaces and cgroups
//! of its own, removed at the end): how long after a pod's first ("sandbox") process starts
//! ztunnel is handed the pod and its entry is written, and what becomes of the first connect
//! of an application started 0, 10 and 100 ms after the sandbox: captured (it reached
//! ztunnel), refused, or escaped (it reached the service uncaptured). Under both of the
//! agent's policies for a pod that ztunnel does not serve yet, in one run: the default (its
//! entry is written at once: its connects are refused until ztunnel listens in its namespace)
//! and `--fail-open` (its entry waits for ztunnel's ack: its connects go out uncaptured).
//!
//! Istio's CNI closes this gap by holding the pod's start until ztunnel has it; zbridge cannot
//! (it is no CNI plugin). The agent runs `--standalone` with a v2 workloads file (`ztunnel.mode:
//! inpod`) listing one subtree per trial, each made before the agent starts (as the kubelet
//! makes a pod's cgroup before its sandbox starts); the fake in-pod ztunnel (testkit's
//! `zbt-net inpod-ztunnel`) acks each pod once its listeners are open in the pod's namespace.
//! Each policy has its own agent, pin directory, fake ztunnel and pods.
//!
//! 1. Per trial: the sandbox process is spawned into an empty subtree at t0; the bench reports
//!    t0 → ztunnel's `add` (the fake's line; its listeners are open by then) and t0 → the
//!    pod's entry in `cgroup_info_map` (polled every 200 µs): by default written once the
//!    agent has decided the pod, failing open once ztunnel has acked it too. (An in-pod
//!    subtree's owner is made by its first exec, as a pod's is in Kubernetes mode.)
//! 2. Per delay d: the sandbox at t0, an application process at t0 + d that connects once to
//!    a service.
//!
//! `cargo bench --bench inpod_enrol` (env: `TRIALS`, trials per measurement).

mod common;
use common::{env_or, percentile, pinned_maps, root_bench};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use testkit::mesh::{self, Mesh};
use testkit::zds_ztunnel::{InPodOptions, InPodZtunnel, ZdsEvent};
use testkit::ztunnel::{self, Helper, Outcome};
use testkit::{BpfFs, NetNs};

fn show(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "    {name:<34} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} trials)",
        percentile(&v, 0.5).as_secs_f64() * 1e3,
        percentile(&v, 0.99).as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        v.len()
    );
}

fn main() {
    let Some(benching) = root_bench("benches/inpod_enrol") else {
        return;
    };
    let trials = env_or("TRIALS", if benching { 100 } else { 3 }) as usize;
    let mesh = Mesh::new("bench-enrol").expect("mesh");
    let _service = ztunnel::service(
        &mesh.node_ns,
        &mesh.cgroup,
        &mesh.outside,
        &[SocketAddr::new(mesh::SERVICE4, mesh::SERVICE_PORT)],
    )
    .expect("service");
    let mut first_pod = 0;
    for (label, args) in [
        ("default (fail closed)", &[][..]),
        ("--fail-open", &["--fail-open"][..]),
    ] {
        println!("agent {label}:");
        first_pod = measure(&mesh, trials, args, first_pod);
    }
}

/// One policy's measurements with pods `first_pod..`; returns the next unused pod index.
fn measure(mesh: &Mesh, trials: usize, agent_args: &[&str], first_pod: usize) -> usize {
    let delays = [0u64, 10, 100];
    let total = trials * (1 + delays.len());
    let bpffs = BpfFs::new("bench-enrol").expect("bpffs");
    let dir = tempfile::tempdir().expect("temp dir");
    let zds = dir.path().join("ztunnel.sock");

    // One pod per trial: a subtree, made now and empty, and a network namespace of its own
    // (ztunnel opens its listeners in each pod's namespace) on a /30 to the node namespace.
    let subtrees: Vec<String> = (first_pod..first_pod + total)
        .map(|i| {
            mesh.cgroup
                .child(&format!("attach/pods/t{i}"))
                .expect("subtree")
        })
        .collect();
    let pods: Vec<(NetNs, IpAddr)> = (first_pod..first_pod + total)
        .map(|i| pod_ns(mesh, i))
        .collect();
    let mut file = format!(
        "version: 2\nztunnel:\n  cgroup: {}\n  mode: inpod\n  zds: {}\nworkloads:\n",
        mesh.ztunnel,
        zds.display()
    );
    for (i, path) in subtrees.iter().enumerate() {
        file.push_str(&format!(
            "  - name: bench/t{}\n    cgroup: {path}\n    address: \"{}\"\n    mode: ambient\n",
            first_pod + i,
            pods[i].1
        ));
    }
    let workloads = dir.path().join("workloads.yaml");
    std::fs::write(&workloads, file).expect("workloads file");
    let status_file = dir.path().join("zds.json");
    let mut extra: Vec<&std::ffi::OsStr> =
        vec!["--zds-status-file".as_ref(), status_file.as_os_str()];
    extra.extend(agent_args.iter().map(|a| std::ffi::OsStr::new(*a)));
    let mut agent = mesh
        .spawn_standalone_agent(
            std::path::Path::new(env!("CARGO_BIN_EXE_zbridge")),
            &bpffs.pin_dir(),
            &workloads,
            &dir.path().join("agent.log"),
            &extra,
        )
        .expect("spawn zbridge");
    let fake = InPodZtunnel::start(&mesh.cgroup, &mesh.ztunnel, &zds, InPodOptions::default())
        .expect("fake in-pod ztunnel");
    let maps = pinned_maps(&bpffs.pin_dir());
    let entered = |id: u64| {
        maps.cgroup_entry(watcher::CgroupId(id))
            .is_ok_and(|e| e.is_some())
    };

    let mut next = 0;
    let mut sleepers = Vec::new();
    let mut to_add = Vec::new();
    let mut to_entry = Vec::new();
    for _ in 0..trials {
        let (path, ns) = (&subtrees[next], &pods[next].0);
        let id = mesh.id(path);
        let uid = resolver::workloads::derived_uid(&format!("bench/t{}", first_pod + next));
        next += 1;
        let t0 = Instant::now();
        let sandbox =
            Helper::spawn(ns, &mesh.cgroup, path, &["sleep".to_string()]).expect("sandbox");
        let (mut added, mut entry) = (None, None);
        let deadline = t0 + Duration::from_secs(10);
        while added.is_none() || entry.is_none() {
            if entry.is_none() && entered(id) {
                entry = Some(t0.elapsed());
            }
            if added.is_none() {
                // This pod's add: ztunnel's listeners are open in its namespace by then.
                if let Some(ZdsEvent::Add { uid: of, .. }) =
                    fake.next_event(Duration::from_micros(200))
                {
                    if of == uid {
                        added = Some(t0.elapsed());
                    }
                }
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
            assert!(
                Instant::now() < deadline,
                "trial {next}: no add or no entry within 10 s"
            );
        }
        to_add.extend(added);
        to_entry.extend(entry);
        sleepers.push(sandbox);
    }
    println!(
        "  in-pod enrolment from the sandbox's start (standalone agent, fake in-pod ztunnel):"
    );
    show("sandbox start → ztunnel's add", to_add);
    show("sandbox start → the pod's entry", to_entry);

    println!("  first connect of an application started after the sandbox:");
    let service = SocketAddr::new(mesh::SERVICE4, mesh::SERVICE_PORT);
    for delay in delays {
        let (mut captured, mut refused, mut escaped, mut failed) = (0, 0, 0, 0);
        for _ in 0..trials {
            let (path, ns) = (&subtrees[next], &pods[next].0);
            next += 1;
            let sandbox =
                Helper::spawn(ns, &mesh.cgroup, path, &["sleep".to_string()]).expect("sandbox");
            std::thread::sleep(Duration::from_millis(delay));
            match ztunnel::connect_once(ns, &mesh.cgroup, path, service) {
                Ok(Outcome::Ok { peer, .. }) if peer.port() == 15001 => captured += 1,
                Ok(Outcome::Ok { .. }) => escaped += 1,
                Ok(outcome) if outcome.errno() == Some(libc::ECONNREFUSED) => refused += 1,
                _ => failed += 1,
            }
            sleepers.push(sandbox);
        }
        println!(
            "    app {delay:>3} ms after the sandbox: {captured} captured, {refused} refused, {escaped} escaped, {failed} failed otherwise, of {trials} ({:.0}% escaped)",
            escaped as f64 * 100.0 / trials as f64
        );
    }
    drop(sleepers);
    let _ = agent.kill();
    let _ = agent.wait();
    first_pod + total
}

/// Pod `i`'s namespace, on 10.90.0.0/16 (a /30 each) to the node namespace; its address.
fn pod_ns(mesh: &Mesh, i: usize) -> (NetNs, IpAddr) {
    let ns = NetNs::new(&format!("ben{i}")).expect("pod netns");
    let base = 4 * i as u32;
    let addr = |k: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 90, 0, 0)) + base + k);
    let (here, there) = (format!("zbe{i}"), format!("zbp{i}"));
    mesh.node_ns.veth(&here, &ns, &there).expect("veth");
    mesh.node_ns
        .addr(&here, &format!("{}/30", addr(1)))
        .expect("node addr");
    ns.addr(&there, &format!("{}/30", addr(2)))
        .expect("pod addr");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    ns.route("default", &addr(1).to_string()).expect("route");
    (ns, IpAddr::V4(addr(2)))
}
