//! End to end: a workload subtree that exists before any process runs in it is enrolled when
//! the agent starts, so the very first connect of the very first process started there is
//! captured (no race with the watcher seeing its exec).

mod e2e_support;

use std::net::SocketAddr;
use std::time::Duration;

use e2e_support::World;
use testkit::mesh::{self, ZTUNNEL4, ZTUNNEL6};
use testkit::ztunnel::{self, Outcome, OUTBOUND};

#[test]
fn first_process_in_an_idle_subtree_is_captured_on_its_first_connect() {
    if !testkit::require_root("first_process_in_an_idle_subtree_is_captured_on_its_first_connect") {
        return;
    }
    let mut world = World::new("e2e-first", true);
    let fresh = world.mesh.cgroup.child("attach/pods/fresh").unwrap();
    let extra = format!(
        "  - name: e2e/fresh\n    cgroup: {fresh}\n    address: 10.99.1.3\n    mode: ambient\n"
    );
    world.write_workloads(&world.mesh.workloads(&[ZTUNNEL4, ZTUNNEL6], &extra));
    world.start_agent(&[]);
    // Enrolled with no process in it: the entry is the subtree's own.
    world.wait_enrolled(&[&fresh]);
    assert_eq!(
        std::fs::read_to_string(world.mesh.cgroup.dir_of(&fresh).join("cgroup.procs")).unwrap(),
        "",
        "nothing has run in the subtree yet"
    );

    let service = SocketAddr::new(mesh::SERVICE4, mesh::SERVICE_PORT);
    let outcome = ztunnel::connect_once(&world.mesh.pod_ns, &world.mesh.cgroup, &fresh, service)
        .expect("client ran");
    match outcome {
        Outcome::Ok { peer, .. } => assert_eq!(peer, SocketAddr::new(ZTUNNEL4, OUTBOUND)),
        other => panic!("the first connect was not redirected: {other:?}"),
    }
    let accepted = world
        .ztunnel()
        .next(Duration::from_secs(10))
        .expect("ztunnel accepted the first connect");
    assert_eq!(accepted.orig, Some(Ok(service)));
}
