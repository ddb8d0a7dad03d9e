//! End to end, on the real kernel: `zbridge run --standalone` with the programs attached to
//! the test's own cgroup, clients in a pod network namespace, a fake ztunnel and a service in
//! a node namespace. Each test asserts where connections really landed.

mod e2e_support;

use std::net::SocketAddr;
use std::time::Duration;

use e2e_support::{running_world, World, POD_PORT};
use testkit::mesh::{self, NODE4, POD4, POD6, SERVICE4, SERVICE6, ZTUNNEL4, ZTUNNEL6};
use testkit::ztunnel::{self, Accepted, Outcome, HBONE, INBOUND, OUTBOUND};

const WAIT: Duration = Duration::from_secs(10);

fn svc4() -> SocketAddr {
    SocketAddr::new(SERVICE4, mesh::SERVICE_PORT)
}

fn svc6() -> SocketAddr {
    SocketAddr::new(SERVICE6, mesh::SERVICE_PORT)
}

fn ok_peer(outcome: &Outcome) -> SocketAddr {
    match outcome {
        Outcome::Ok { peer, .. } => *peer,
        other => panic!("connection failed: {other:?}"),
    }
}

/// An ambient pod's connect lands on ztunnel's 15001 with the exact original destination, in
/// both families; ztunnel's upstream connect is not redirected, and its bind to the pod's
/// address is rewritten to its own, so the service sees ztunnel.
#[test]
fn ambient_pod_lands_on_ztunnel_with_original_destination() {
    if !testkit::require_root("ambient_pod_lands_on_ztunnel_with_original_destination") {
        return;
    }
    let world = running_world("e2e-out");
    let m = &world.mesh;
    for (svc, zt, pod) in [(svc4(), ZTUNNEL4, POD4), (svc6(), ZTUNNEL6, POD6)] {
        let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.app, svc).unwrap();
        assert_eq!(ok_peer(&outcome), SocketAddr::new(zt, OUTBOUND), "{svc}");
        let Outcome::Ok { local, .. } = outcome else {
            unreachable!()
        };
        assert_eq!(local.ip(), pod);
        let accepted = world.ztunnel().next(WAIT).expect("ztunnel accepted");
        assert_eq!(
            accepted,
            Accepted {
                local: SocketAddr::new(zt, OUTBOUND),
                peer: local,
                orig: Some(Ok(svc)),
                upstream: accepted.upstream,
            }
        );
        // Upstream: bound to the pod's address by ztunnel, rewritten to ztunnel's own.
        let upstream_local = match accepted.upstream {
            Some(Ok(l)) => l,
            other => panic!("ztunnel's upstream connect: {other:?}"),
        };
        assert_eq!(upstream_local.ip(), zt);
        let at_service = world.service.next(WAIT).expect("service accepted upstream");
        assert_eq!((at_service.local, at_service.peer), (svc, upstream_local));
    }
    // The agent says it is ready, and its metrics carry the programs' counters.
    assert_eq!(world.ops_get("/readyz").0, 200);
    let deadline = std::time::Instant::now() + e2e_support::DEADLINE;
    loop {
        let (code, body) = world.ops_get("/metrics");
        assert_eq!(code, 200);
        if body
            .lines()
            .any(|l| l.contains("redirected_out") && l.trim_end().ends_with(" 2"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no redirected_out 2 in metrics:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A cgroup made under the pod's after it was enrolled is captured from its very first
/// connect: a thousand times, a fresh child cgroup and a fresh process whose first connect is
/// checked; not one escapes.
#[test]
fn child_cgroup_created_after_enrolment_is_captured_from_first_connect() {
    if !testkit::require_root("child_cgroup_created_after_enrolment_is_captured_from_first_connect")
    {
        return;
    }
    let world = running_world("e2e-child");
    let m = &world.mesh;
    let zt = SocketAddr::new(ZTUNNEL4, OUTBOUND);
    let mut escaped = Vec::new();
    for i in 0..1000 {
        let child = m
            .cgroup
            .child(&format!("attach/pods/app/container-{i}"))
            .unwrap();
        let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &child, svc4()).unwrap();
        if !matches!(outcome, Outcome::Ok { peer, .. } if peer == zt) {
            escaped.push((i, outcome));
        }
        // The cgroup goes once its process has exited (as a container's does).
        let _ = std::fs::remove_dir(m.cgroup.dir_of(&child));
    }
    assert!(
        escaped.is_empty(),
        "{} of 1000 first connects not redirected: {:?}",
        escaped.len(),
        &escaped[..escaped.len().min(5)]
    );
    for n in 0..1000 {
        let a = world
            .ztunnel()
            .next(WAIT)
            .unwrap_or_else(|| panic!("ztunnel accepted only {n}"));
        assert_eq!(a.orig, Some(Ok(svc4())));
    }
    // Each upstream connect reached the service from ztunnel's address, none from the pod's.
    for n in 0..1000 {
        let a = world
            .service
            .next(WAIT)
            .unwrap_or_else(|| panic!("service saw only {n}"));
        assert_eq!(a.peer.ip(), ZTUNNEL4);
    }
    assert_eq!(world.service.drain(), vec![]);
}

/// Outside the mesh, loopback and ztunnel's own non-capture ports are reached directly.
#[test]
fn outside_mesh_loopback_and_ztunnel_ports_are_not_redirected() {
    if !testkit::require_root("outside_mesh_loopback_and_ztunnel_ports_are_not_redirected") {
        return;
    }
    let world = running_world("e2e-direct");
    let m = &world.mesh;
    // A pod in a cgroup under the attach cgroup, not enrolled.
    for (svc, pod) in [(svc4(), POD4), (svc6(), POD6)] {
        let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.other, svc).unwrap();
        assert_eq!(ok_peer(&outcome), svc);
        let a = world.service.next(WAIT).expect("service accepted");
        assert_eq!((a.local, a.peer.ip()), (svc, pod));
    }
    // The ambient pod to its loopback and to its own address: stays in the pod.
    for ip in ["127.0.0.1", "::1"]
        .map(|s| s.parse().unwrap())
        .into_iter()
        .chain([POD4, POD6])
    {
        let to = SocketAddr::new(ip, POD_PORT);
        let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.app, to).unwrap();
        assert_eq!(ok_peer(&outcome), to);
        assert_eq!(world.pod.next(WAIT).expect("pod accepted").local, to);
    }
    // The ambient pod to ztunnel's HBONE port: direct.
    for zt in [ZTUNNEL4, ZTUNNEL6] {
        let to = SocketAddr::new(zt, HBONE);
        let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.app, to).unwrap();
        assert_eq!(ok_peer(&outcome), to);
        let a = world
            .ztunnel()
            .next(WAIT)
            .expect("ztunnel accepted on 15008");
        assert_eq!(a.local, to);
        assert!(
            matches!(a.orig, Some(Err(_))),
            "no original destination: {a:?}"
        );
    }
    assert!(world.ztunnel().drain().is_empty());
}

/// A host process connecting to the ambient pod lands on 15006 with the pod as original
/// destination; an exempt host cgroup (the kubelet's) reaches the pod directly.
#[test]
fn host_to_ambient_pod_lands_on_inbound_port_exempt_does_not() {
    if !testkit::require_root("host_to_ambient_pod_lands_on_inbound_port_exempt_does_not") {
        return;
    }
    let mut world = World::new("e2e-in", true);
    world.write_workloads(&e2e_support::default_workloads(&world));
    let exempt = world.mesh.exempt.clone();
    world.sleeper(&exempt);
    world.start_agent(&[]);
    let (app, zt) = (world.mesh.app.clone(), world.mesh.ztunnel.clone());
    world.wait_enrolled(&[&app, &zt, &exempt]);
    let m = &world.mesh;
    for (pod, zt) in [(POD4, ZTUNNEL4), (POD6, ZTUNNEL6)] {
        let to = SocketAddr::new(pod, POD_PORT);
        let outcome = ztunnel::connect_once(&m.node_ns, &m.cgroup, &m.host, to).unwrap();
        assert_eq!(ok_peer(&outcome), SocketAddr::new(zt, INBOUND));
        let a = world
            .ztunnel()
            .next(WAIT)
            .expect("ztunnel accepted inbound");
        assert_eq!(
            (a.local, a.orig),
            (SocketAddr::new(zt, INBOUND), Some(Ok(to)))
        );
        // ztunnel's own connect to the pod is not captured again; it comes from ztunnel.
        let upstream = world
            .pod
            .next(WAIT)
            .expect("pod accepted ztunnel's upstream");
        assert_eq!((upstream.local, upstream.peer.ip()), (to, zt));
        assert_eq!(a.upstream, Some(Ok(upstream.peer)));

        let outcome = ztunnel::connect_once(&m.node_ns, &m.cgroup, &m.exempt, to).unwrap();
        assert_eq!(ok_peer(&outcome), to);
        let a = world.pod.next(WAIT).expect("pod accepted the exempt probe");
        assert_eq!(a.local, to);
        assert_eq!(a.peer.ip(), if pod == POD4 { NODE4 } else { mesh::NODE6 });
    }
}

/// Straight to ztunnel's capture ports, from the pod, a host process and ztunnel itself: the
/// connect is refused, and ztunnel accepts nothing (no loop).
#[test]
fn direct_connects_to_capture_ports_are_refused() {
    if !testkit::require_root("direct_connects_to_capture_ports_are_refused") {
        return;
    }
    let world = running_world("e2e-loop");
    let m = &world.mesh;
    for (ns, path) in [
        (&m.pod_ns, &m.app),
        (&m.node_ns, &m.host),
        (&m.node_ns, &m.ztunnel),
    ] {
        for zt in [ZTUNNEL4, ZTUNNEL6] {
            for port in [OUTBOUND, INBOUND] {
                let to = SocketAddr::new(zt, port);
                let outcome = ztunnel::connect_once(ns, &m.cgroup, path, to).unwrap();
                assert!(
                    matches!(&outcome, Outcome::Err { stage, errno } if stage == "connect" && *errno == libc::EPERM),
                    "{path} → {to}: {outcome:?}"
                );
            }
        }
    }
    // From the pod, the capture ports on other addresses of ztunnel's namespace (a service
    // address, the node's): ztunnel listening on every address would pass these on to
    // itself in a loop; refused too.
    for ip in [SERVICE4, SERVICE6, mesh::NODE4, mesh::NODE6] {
        for port in [OUTBOUND, INBOUND] {
            let to = SocketAddr::new(ip, port);
            let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.app, to).unwrap();
            assert!(
                matches!(&outcome, Outcome::Err { stage, errno } if stage == "connect" && *errno == libc::EPERM),
                "pod → {to}: {outcome:?}"
            );
        }
    }
    // The fake ztunnel passes connections on to their original destination, as ztunnel does:
    // a connect let through to a capture port would come back to it again and again. Nothing
    // arrived, and nothing keeps arriving (its count stays flat for 5 s).
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_secs(1));
        assert_eq!(
            world.ztunnel().drain(),
            vec![],
            "a capture port was reached"
        );
    }
    // A redirected connection on each port afterwards: the first thing ztunnel accepted on
    // either is that one (anything before would have been a refused connect let through).
    let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.app, svc4()).unwrap();
    assert_eq!(ok_peer(&outcome), SocketAddr::new(ZTUNNEL4, OUTBOUND));
    let a = world
        .ztunnel()
        .next(WAIT)
        .expect("redirected connect accepted");
    assert_eq!((a.local.port(), a.orig), (OUTBOUND, Some(Ok(svc4()))));
    let to = SocketAddr::new(POD4, POD_PORT);
    let outcome = ztunnel::connect_once(&m.node_ns, &m.cgroup, &m.host, to).unwrap();
    assert_eq!(ok_peer(&outcome), SocketAddr::new(ZTUNNEL4, INBOUND));
    let a = world
        .ztunnel()
        .next(WAIT)
        .expect("inbound connect accepted");
    assert_eq!((a.local.port(), a.orig), (INBOUND, Some(Ok(to))));
    assert_eq!(world.ztunnel().drain(), vec![]);
}
