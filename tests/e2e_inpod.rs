//! End to end, in-pod mode: the real `zbridge run --standalone` with a v2 workloads file
//! (`ztunnel.mode: inpod`), the real kernel, and a fake in-pod ztunnel that speaks ZDS
//! (testkit's `zbt-net inpod-ztunnel`, in ztunnel's cgroup): it is handed the pod's network
//! namespace, opens ztunnel's listeners inside it, and acks.
//!
//! Every wait is bounded by a deadline (a hang guard, not a timing assertion).

mod e2e_support;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use e2e_support::{World, POD_PORT};
use testkit::mesh::{self, POD4, POD6, SERVICE4, SERVICE6};
use testkit::zds_ztunnel::{InPodOptions, InPodZtunnel, ZdsEvent};
use testkit::ztunnel::{self, Outcome};

const WAIT: Duration = Duration::from_secs(20);

/// The pod's ZDS uid: the workloads file's default, derived from its name.
fn app_uid() -> String {
    resolver::workloads::derived_uid("e2e/app")
}

/// A v2 workloads file: ztunnel in-pod on `zds`, the app pod ambient (`with_app`).
fn file(world: &World, zds: &std::path::Path, with_app: bool) -> String {
    let app = if with_app {
        format!(
            "  - name: e2e/app\n    cgroup: {}\n    address: [\"{POD4}\", \"{POD6}\"]\n    mode: ambient\n",
            world.mesh.app
        )
    } else {
        String::new()
    };
    format!(
        "version: 2\nztunnel:\n  cgroup: {}\n  mode: inpod\n  zds: {}\nworkloads:\n{app}exempt:\n  - {}\n",
        world.mesh.ztunnel,
        zds.display(),
        world.mesh.exempt
    )
}

fn start(prefix: &str) -> (World, PathBuf) {
    start_with(prefix, &[])
}

/// [`start`] with more flags for the agent.
fn start_with(prefix: &str, agent_args: &[&str]) -> (World, PathBuf) {
    let mut world = World::new(prefix, false);
    let zds = world.dir.path().join("ztunnel.sock");
    world.write_workloads(&file(&world, &zds, true));
    world.start_agent(agent_args);
    (world, zds)
}

/// A fake in-pod ztunnel that refuses the pod's first three adds (the agent's retries come
/// 0.5, 1 and 2 s apart: time enough to look), once it has refused the first.
fn ztunnel_refusing_the_pod(world: &World, zds: &std::path::Path) -> InPodZtunnel {
    let options = InPodOptions {
        nack: vec![(app_uid(), 3)],
        ..InPodOptions::default()
    };
    let fake = InPodZtunnel::start(&world.mesh.cgroup, &world.mesh.ztunnel, zds, options)
        .expect("fake in-pod ztunnel");
    wait(
        &fake,
        "the refusal",
        |e| matches!(e, ZdsEvent::Nack { uid, .. } if *uid == app_uid()),
    );
    fake
}

fn pod_netns_inode(world: &World) -> u64 {
    world.mesh.pod_ns.file().unwrap().metadata().unwrap().ino()
}

fn inpod_entry(world: &World) -> bool {
    let id = world.mesh.id(&world.mesh.app);
    world.entries().is_some_and(|e| {
        e.get(&id)
            .is_some_and(|i| i.flags & programmer::layout::F_INPOD != 0)
    })
}

/// The fake's next event that `want` matches, failing with every event seen.
fn wait(fake: &InPodZtunnel, what: &str, want: impl FnMut(&ZdsEvent) -> bool) -> ZdsEvent {
    fake.wait_for(WAIT, want).unwrap_or_else(|seen| {
        panic!("fake in-pod ztunnel: no {what} within {WAIT:?}; saw {seen:?}")
    })
}

fn accepted_on(fake: &InPodZtunnel, port: u16) -> testkit::ztunnel::Accepted {
    let what = format!("a connection on {port}");
    match wait(
        fake,
        &what,
        |e| matches!(e, ZdsEvent::Accepted { accepted, .. } if accepted.local.port() == port),
    ) {
        ZdsEvent::Accepted { uid, accepted } => {
            assert_eq!(uid, app_uid());
            accepted
        }
        _ => unreachable!(),
    }
}

/// Waits until the agent has enrolled the pod's namespace for ztunnel `fake`, after its ack:
/// the pod's entry does not say so, as it is written before the ack (its connects are
/// refused until then).
fn wait_served(world: &World, fake: &InPodZtunnel) {
    world.wait_log(
        "the pod served by ztunnel",
        &format!("enrolled: ztunnel (pid {}) serves it", fake.pid()),
    );
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[test]
fn inpod_outbound_inbound_and_release_through_zds() {
    if !testkit::require_root("inpod_outbound_inbound_and_release_through_zds") {
        return;
    }
    let (world, zds) = start("e2e-inpod");
    // No ztunnel yet: /readyz says what that means for the pods.
    let no_ztunnel = "warning: in-pod: no ztunnel is connected to the ZDS socket; the connects \
                      of ambient pods it does not serve yet are refused";
    let readyz = world.wait_readyz(|body| body.starts_with("ready\n"));
    assert!(readyz.contains(no_ztunnel), "{readyz}");
    let fake = InPodZtunnel::start(
        &world.mesh.cgroup,
        &world.mesh.ztunnel,
        &zds,
        InPodOptions::default(),
    )
    .expect("fake in-pod ztunnel");
    world.wait_readyz(|body| body == "ready\n");

    // The pod, with the namespace of its process and its identity.
    let add = wait(&fake, "the pod's add", |e| {
        matches!(e, ZdsEvent::Add { .. })
    });
    assert_eq!(
        add,
        ZdsEvent::Add {
            uid: app_uid(),
            namespace: "e2e".into(),
            name: "app".into(),
            service_account: "default".into(),
            netns_inode: pod_netns_inode(&world),
        }
    );
    // (The snapshot's end may come before the add: ztunnel can connect before the agent
    // has seen the pod.)
    world.wait_for("the pod's in-pod entry", |_| inpod_entry(&world));
    wait_served(&world, &fake);
    // What /metrics says of ZDS: a ztunnel connected, the pod acked.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, text) = world.ops_get("/metrics");
        if text.contains("zbridge_zds_connected 1")
            && text.contains("zbridge_zds_pods{state=\"acked\"} 1")
            && text.contains("zbridge_zds_total{type=\"add\"} 1")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ZDS metrics:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Outbound, v4 and v6: to ztunnel's 15001 in the pod's own namespace, with the original
    // destination answered.
    for service in [SERVICE4, SERVICE6] {
        let to = SocketAddr::new(service, mesh::SERVICE_PORT);
        let outcome =
            ztunnel::connect_once(&world.mesh.pod_ns, &world.mesh.cgroup, &world.mesh.app, to)
                .expect("client ran");
        match outcome {
            // IPv4 to an address of 127.1.0.0/16 (one per destination), IPv6 to ::1.
            Outcome::Ok { peer, .. } => {
                let ok = match canonical(peer).ip() {
                    std::net::IpAddr::V4(v4) => v4.octets()[..2] == [127, 1],
                    std::net::IpAddr::V6(v6) => v6.is_loopback(),
                };
                assert!(ok && peer.port() == 15001, "{to}: {peer}");
            }
            other => panic!("{to}: not captured: {other:?}"),
        }
        let accepted = accepted_on(&fake, 15001);
        assert_eq!(accepted.orig, Some(Ok(to)));
    }

    // Inbound from another namespace (not the node's own addresses) to the pod's port: to
    // ztunnel's 15006, the accepted socket's local address (and the answer) the pod's.
    let app4 = SocketAddr::new(POD4, POD_PORT);
    let outcome = ztunnel::connect_once(
        &world.mesh.node_ns,
        &world.mesh.cgroup,
        &world.mesh.outside,
        app4,
    )
    .expect("client ran");
    assert!(matches!(outcome, Outcome::Ok { .. }), "{outcome:?}");
    let accepted = accepted_on(&fake, POD_PORT);
    assert_eq!(canonical(accepted.local), app4);
    assert_eq!(accepted.orig.map(|o| o.map(canonical)), Some(Ok(app4)));
    // HBONE reaches ztunnel's 15008 directly.
    let hbone = SocketAddr::new(POD4, 15008);
    ztunnel::connect_once(
        &world.mesh.node_ns,
        &world.mesh.cgroup,
        &world.mesh.outside,
        hbone,
    )
    .expect("client ran");
    assert_eq!(canonical(accepted_on(&fake, 15008).local), hbone);

    // The pod leaves (its workload removed, SIGHUP): its entry goes first, then ztunnel is
    // told; and its inbound reaches the app again.
    world.write_workloads(&file(&world, &zds, false));
    world.agent.as_ref().unwrap().signal(libc::SIGHUP);
    wait(&fake, "the pod's del", |e| {
        *e == ZdsEvent::Del { uid: app_uid() }
    });
    let id = world.mesh.id(&world.mesh.app);
    assert!(
        !world.entries().unwrap().contains_key(&id),
        "del was sent while the pod's entry was still there"
    );
    world.pod.drain();
    ztunnel::connect_once(
        &world.mesh.node_ns,
        &world.mesh.cgroup,
        &world.mesh.outside,
        app4,
    )
    .expect("client ran");
    let reached = world.pod.next(WAIT).expect("the app got the connection");
    assert_eq!(canonical(reached.local), app4);
}

/// The pod's outbound connect to the service, from its own namespace and cgroup.
fn pod_connects_to_the_service(world: &World) -> Outcome {
    let to = SocketAddr::new(SERVICE4, mesh::SERVICE_PORT);
    ztunnel::connect_once(&world.mesh.pod_ns, &world.mesh.cgroup, &world.mesh.app, to)
        .expect("client ran")
}

/// ztunnel refuses the pod's first adds (the agent retries with backoff): by default (fail
/// closed) the pod is captured meanwhile and its connects are refused, never let out
/// uncaptured; then the retry is acked and it is served.
#[test]
fn inpod_refused_pod_waits_and_a_restarted_ztunnel_gets_the_snapshot() {
    if !testkit::require_root("inpod_refused_pod_waits_and_a_restarted_ztunnel_gets_the_snapshot") {
        return;
    }
    let (world, zds) = start("e2e-inpod-r");
    let first = ztunnel_refusing_the_pod(&world, &zds);
    world.wait_for("the pod's in-pod entry, before ztunnel serves it", |_| {
        inpod_entry(&world)
    });
    let outcome = pod_connects_to_the_service(&world);
    assert_eq!(
        outcome.errno(),
        Some(libc::ECONNREFUSED),
        "refused while ztunnel does not serve the pod, not uncaptured: {outcome:?}"
    );
    // Retried with backoff, acked, served.
    wait(&first, "the acked add", |e| {
        matches!(e, ZdsEvent::Add { .. })
    });
    let deadline = std::time::Instant::now() + WAIT;
    while !matches!(pod_connects_to_the_service(&world), Outcome::Ok { peer, .. } if peer.port() == 15001)
    {
        assert!(std::time::Instant::now() < deadline, "never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_served(&world, &first);

    // ztunnel restarts: while it is gone, inbound to the pod is refused (never handed to the
    // app behind ztunnel's back) and the pod keeps its entry; the new ztunnel gets the whole
    // snapshot and the pod's inbound lands on its listener.
    drop(first);
    let app4 = SocketAddr::new(POD4, POD_PORT);
    let refused = ztunnel::connect_once(
        &world.mesh.node_ns,
        &world.mesh.cgroup,
        &world.mesh.outside,
        app4,
    )
    .expect("client ran");
    assert_eq!(refused.errno(), Some(libc::ECONNREFUSED), "{refused:?}");
    assert!(
        inpod_entry(&world),
        "the pod stays captured while ztunnel restarts"
    );
    let second = InPodZtunnel::start(
        &world.mesh.cgroup,
        &world.mesh.ztunnel,
        &zds,
        InPodOptions::default(),
    )
    .expect("the restarted fake");
    wait(&second, "the pod's add again", |e| {
        matches!(e, ZdsEvent::Add { .. })
    });
    wait(&second, "the snapshot's end", |e| *e == ZdsEvent::Snapshot);
    // The agent enrols the pod with the new listener right after the ack: retry briefly.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let outcome = ztunnel::connect_once(
            &world.mesh.node_ns,
            &world.mesh.cgroup,
            &world.mesh.outside,
            app4,
        )
        .expect("client ran");
        if matches!(outcome, Outcome::Ok { .. }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{outcome:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let accepted = accepted_on(&second, POD_PORT);
    assert_eq!(canonical(accepted.local), app4);
}

/// Two in-pod pods over ZDS, each in its own namespace: connections from the same source port
/// in both land on each pod's own ztunnel listener with each its own original destination;
/// with `dns_capture`, a pod's DNS over UDP reaches ztunnel's 15053 in the pod and the answer
/// comes back from the server asked, and DNS over TCP goes to 15053 too.
/// ztunnel listens in the pod's namespace from the moment it has the pod's `add`, and the
/// agent enrols the namespace in the kernel only after ztunnel's ack: a connection captured in
/// between still has its original destination for ztunnel (here a ztunnel that never acks).
#[test]
fn inpod_a_connection_captured_before_ztunnels_ack_has_its_original_destination() {
    if !testkit::require_root(
        "inpod_a_connection_captured_before_ztunnels_ack_has_its_original_destination",
    ) {
        return;
    }
    let (world, zds) = start("e2e-inpod-n");
    let options = InPodOptions {
        no_ack: true,
        ..InPodOptions::default()
    };
    let fake = InPodZtunnel::start(&world.mesh.cgroup, &world.mesh.ztunnel, &zds, options)
        .expect("fake in-pod ztunnel");
    wait(&fake, "the pod's add", |e| {
        matches!(e, ZdsEvent::Add { .. })
    });
    let outcome = pod_connects_to_the_service(&world);
    assert!(
        matches!(outcome, Outcome::Ok { peer, .. } if peer.port() == 15001),
        "captured to ztunnel's listener in the pod: {outcome:?}"
    );
    let accepted = accepted_on(&fake, 15001);
    assert_eq!(
        accepted.orig,
        Some(Ok(SocketAddr::new(SERVICE4, mesh::SERVICE_PORT)))
    );
}

/// `--fail-open`: until ztunnel serves the pod it is not captured (its connect reaches the
/// service directly and it has no entry); once the retried add is acked it is.
#[test]
fn inpod_failing_open_a_pod_ztunnel_refuses_is_not_captured_until_served() {
    if !testkit::require_root(
        "inpod_failing_open_a_pod_ztunnel_refuses_is_not_captured_until_served",
    ) {
        return;
    }
    let (world, zds) = start_with("e2e-inpod-o", &["--fail-open"]);
    let fake = ztunnel_refusing_the_pod(&world, &zds);
    let outcome = pod_connects_to_the_service(&world);
    assert!(
        matches!(outcome, Outcome::Ok { peer, .. } if canonical(peer) == SocketAddr::new(SERVICE4, mesh::SERVICE_PORT)),
        "failing open, straight to the service: {outcome:?}"
    );
    assert!(
        !inpod_entry(&world),
        "no entry before ztunnel serves the pod"
    );
    wait(&fake, "the acked add", |e| {
        matches!(e, ZdsEvent::Add { .. })
    });
    world.wait_for("the pod's in-pod entry", |_| inpod_entry(&world));
    let outcome = pod_connects_to_the_service(&world);
    assert!(
        matches!(outcome, Outcome::Ok { peer, .. } if peer.port() == 15001),
        "served: captured: {outcome:?}"
    );
}

#[test]
fn inpod_two_pods_same_source_port_and_dns_through_zds() {
    if !testkit::require_root("inpod_two_pods_same_source_port_and_dns_through_zds") {
        return;
    }
    let mut world = World::new("e2e-inpod2", false);
    // The second pod: its own namespace on 10.99.2.0/24 and its own cgroup.
    let second_ns = testkit::NetNs::new("e2e-inpod2-b").expect("netns");
    world
        .mesh
        .node_ns
        .veth("zb-node2", &second_ns, "zb-pod2")
        .expect("veth");
    world.mesh.node_ns.addr("zb-node2", "10.99.2.1/24").unwrap();
    second_ns.addr("zb-pod2", "10.99.2.2/24").unwrap();
    second_ns.ip(&["link", "set", "lo", "up"]).unwrap();
    second_ns.route("default", "10.99.2.1").unwrap();
    let second = world.mesh.cgroup.child("attach/pods/second").unwrap();
    let sleeper = testkit::ztunnel::Helper::spawn(
        &second_ns,
        &world.mesh.cgroup,
        &second,
        &["sleep".to_string()],
    )
    .expect("second pod's process");
    sleeper.wait_ready().unwrap();

    let zds = world.dir.path().join("ztunnel.sock");
    world.write_workloads(&format!(
        "version: 2\nztunnel:\n  cgroup: {}\n  mode: inpod\n  zds: {}\ndns_capture: true\nworkloads:\n  - name: e2e/app\n    cgroup: {}\n    address: [\"{POD4}\", \"{POD6}\"]\n    mode: ambient\n  - name: e2e/second\n    cgroup: {second}\n    address: 10.99.2.2\n    mode: ambient\n",
        world.mesh.ztunnel,
        zds.display(),
        world.mesh.app,
    ));
    world.start_agent(&[]);
    let fake = InPodZtunnel::start(
        &world.mesh.cgroup,
        &world.mesh.ztunnel,
        &zds,
        InPodOptions::default(),
    )
    .expect("fake in-pod ztunnel");
    let second_uid = resolver::workloads::derived_uid("e2e/second");
    let mut added = std::collections::BTreeSet::new();
    while added.len() < 2 {
        if let ZdsEvent::Add { uid, .. } = wait(&fake, "both pods' adds", |e| {
            matches!(e, ZdsEvent::Add { .. })
        }) {
            added.insert(uid);
        }
    }
    assert_eq!(added, [app_uid(), second_uid.clone()].into());
    let ids = [world.mesh.id(&world.mesh.app), world.mesh.id(&second)];
    world.wait_for("both pods' in-pod entries", |e| {
        ids.iter().all(|id| {
            e.get(id)
                .is_some_and(|i| i.flags & programmer::layout::F_INPOD != 0)
        })
    });

    // The same source port in both pods, each to its own destination.
    let to_app = SocketAddr::new(SERVICE4, mesh::SERVICE_PORT);
    let to_second: SocketAddr = "10.96.0.20:8080".parse().unwrap();
    for (ns, path, source, to) in [
        (
            &world.mesh.pod_ns,
            world.mesh.app.as_str(),
            SocketAddr::new(POD4, 40123),
            to_app,
        ),
        (
            &second_ns,
            second.as_str(),
            "10.99.2.2:40123".parse().unwrap(),
            to_second,
        ),
    ] {
        let out = ztunnel::connect(
            ns,
            &world.mesh.cgroup,
            path,
            &[to],
            &ztunnel::ClientOptions {
                count: 1,
                bind_addrs: vec![source],
                ..ztunnel::ClientOptions::default()
            },
        )
        .expect("client ran");
        assert!(
            matches!(out[..], [Outcome::Ok { local, peer }] if local.port() == 40123 && peer.port() == 15001),
            "{path}: {out:?}"
        );
    }
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 2 {
        if let ZdsEvent::Accepted { uid, accepted } = wait(
            &fake,
            "both connections",
            |e| matches!(e, ZdsEvent::Accepted { accepted, .. } if accepted.peer.port() == 40123),
        ) {
            seen.insert(uid, accepted.orig);
        }
    }
    assert_eq!(seen[&app_uid()], Some(Ok(to_app)));
    assert_eq!(seen[&second_uid], Some(Ok(to_second)));

    // DNS over UDP: to ztunnel's 15053 in the pod, answered as if by the server asked.
    let dns: SocketAddr = "10.96.0.53:53".parse().unwrap();
    let out = ztunnel::udp_ask(
        &world.mesh.pod_ns,
        &world.mesh.cgroup,
        &world.mesh.app,
        dns,
        false,
    )
    .expect("client ran");
    assert!(
        matches!(out, Outcome::Ok { peer, .. } if canonical(peer) == dns),
        "the answer must come from the server asked: {out:?}"
    );
    let udp = wait(&fake, "the DNS question", |e| {
        matches!(e, ZdsEvent::Udp { .. })
    });
    let ZdsEvent::Udp { uid, local, .. } = udp else {
        unreachable!()
    };
    assert_eq!((uid, local.port()), (app_uid(), 15053));
    // DNS over TCP: to 15053 too.
    let out = ztunnel::connect_once(&world.mesh.pod_ns, &world.mesh.cgroup, &world.mesh.app, dns)
        .expect("client ran");
    assert!(
        matches!(out, Outcome::Ok { peer, .. } if peer.port() == 15053 && peer.ip().is_loopback()),
        "{out:?}"
    );
    drop(sleeper);
}

/// One outbound connect from a fresh process in the pod: it must land on the fake's 15001 in
/// the pod's namespace with the service as its original destination.
fn assert_outbound_captured(world: &World, fake: &InPodZtunnel, seen: &mut Vec<ZdsEvent>) {
    let to = SocketAddr::new(SERVICE4, mesh::SERVICE_PORT);
    let outcome =
        ztunnel::connect_once(&world.mesh.pod_ns, &world.mesh.cgroup, &world.mesh.app, to)
            .expect("client ran");
    assert!(
        matches!(outcome, Outcome::Ok { peer, .. } if peer.port() == 15001),
        "{outcome:?}"
    );
    let accepted = wait(fake, "the connect on 15001", |e| {
        seen.push(e.clone());
        matches!(e, ZdsEvent::Accepted { accepted, .. } if accepted.local.port() == 15001)
    });
    let ZdsEvent::Accepted { uid, accepted } = accepted else {
        unreachable!()
    };
    assert_eq!((uid, accepted.orig), (app_uid(), Some(Ok(to))));
}

/// Stops the agent (SIGTERM, as the kubelet does) and starts it again; the fake, which keeps
/// running and connects again as ztunnel does, reports its new session up to the snapshot's
/// end (into `seen`).
fn restart_agent(world: &mut World, fake: &InPodZtunnel, seen: &mut Vec<ZdsEvent>) {
    let agent = world.agent.take().expect("agent running");
    agent.signal(libc::SIGTERM);
    assert!(agent.wait().success());
    world.start_agent(&[]);
    wait(fake, "the new session's snapshot", |e| {
        seen.push(e.clone());
        *e == ZdsEvent::Snapshot
    });
}

/// The agent restarts while ztunnel keeps running (and connects again, as it does). A pod with
/// a live process is added again in the new session's snapshot; a pod whose processes are all
/// gone (its namespace cannot be opened) is kept; ztunnel's reconcile at the snapshot's end
/// drops neither, and the pod's connects land on ztunnel before, during and after each
/// restart. The pod's first process after the second restart gets its add.
#[test]
fn inpod_agent_restarts_while_ztunnel_runs_and_ztunnel_drops_no_pod() {
    if !testkit::require_root("inpod_agent_restarts_while_ztunnel_runs_and_ztunnel_drops_no_pod") {
        return;
    }
    let (mut world, zds) = start("e2e-inpod-ar");
    let options = InPodOptions {
        reconnect: true,
        ..InPodOptions::default()
    };
    let fake = InPodZtunnel::start(&world.mesh.cgroup, &world.mesh.ztunnel, &zds, options)
        .expect("fake in-pod ztunnel");
    let mut seen = Vec::new();
    wait(&fake, "the pod's add", |e| {
        seen.push(e.clone());
        matches!(e, ZdsEvent::Add { .. })
    });
    world.wait_for("the pod's in-pod entry", |_| inpod_entry(&world));
    wait_served(&world, &fake);
    assert_outbound_captured(&world, &fake, &mut seen);

    // A restart with the pod's process alive: added again before the snapshot's end.
    seen.clear();
    restart_agent(&mut world, &fake, &mut seen);
    let adds: Vec<_> = seen
        .iter()
        .filter(|e| matches!(e, ZdsEvent::Add { uid, .. } if *uid == app_uid()))
        .collect();
    assert_eq!(adds.len(), 1, "{seen:?}");
    assert_outbound_captured(&world, &fake, &mut seen);
    assert!(inpod_entry(&world));

    // The pod's only process exits; a restart now cannot hand its namespace over: the pod is
    // kept, and stays served.
    // SAFETY: kill(2) on the pid of the pod's listener, a process this test started.
    unsafe { libc::kill(world.pod.pid() as i32, libc::SIGKILL) };
    seen.clear();
    restart_agent(&mut world, &fake, &mut seen);
    assert!(
        seen.contains(&ZdsEvent::Keep { uid: app_uid() }),
        "the pod is kept: {seen:?}\n{}",
        world.agent.as_ref().unwrap().log_text()
    );
    assert!(inpod_entry(&world), "the pod keeps its entry");
    // Its first process after the restart: the add follows, and its connect is captured.
    let sleeper = testkit::ztunnel::Helper::spawn(
        &world.mesh.pod_ns,
        &world.mesh.cgroup,
        &world.mesh.app,
        &["sleep".to_string()],
    )
    .expect("the pod's new process");
    sleeper.wait_ready().expect("sleeper ready");
    wait(&fake, "the pod's add after its new process", |e| {
        seen.push(e.clone());
        matches!(e, ZdsEvent::Add { uid, .. } if *uid == app_uid())
    });
    assert_outbound_captured(&world, &fake, &mut seen);
    assert!(
        !seen.iter().any(|e| matches!(e, ZdsEvent::Dropped { .. })),
        "ztunnel dropped a pod: {seen:?}"
    );
}
