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

/// A subtree made after the agent started is enrolled before any process runs in it, loses
/// its entry when removed, and is enrolled again (with its new id) when made again, where the
/// first connect of a short process is captured: no SIGHUP, no exec needed.
#[test]
fn a_subtree_made_removed_and_made_again_follows_its_directory() {
    if !testkit::require_root("a_subtree_made_removed_and_made_again_follows_its_directory") {
        return;
    }
    let mut world = World::new("e2e-redo", true);
    let parent = world.mesh.cgroup.child("attach/pods").unwrap();
    let later = format!("{parent}/later");
    let extra = format!(
        "  - name: e2e/later\n    cgroup: {later}\n    address: 10.99.1.4\n    mode: ambient\n"
    );
    world.write_workloads(&world.mesh.workloads(&[ZTUNNEL4, ZTUNNEL6], &extra));
    world.start_agent(&[]);
    world.wait_log("the first full picture", "first full picture written");
    let dir = world.mesh.cgroup.dir_of(&later);
    assert!(!dir.exists());

    std::fs::create_dir(&dir).unwrap();
    let first = world.mesh.id(&later);
    world.wait_for("the made subtree's entry", |e| e.contains_key(&first));

    std::fs::remove_dir(&dir).unwrap();
    world.wait_for("the removed subtree's entry gone", |e| {
        !e.contains_key(&first)
    });

    std::fs::create_dir(&dir).unwrap();
    let second = world.mesh.id(&later);
    assert_ne!(first, second, "a new directory, a new cgroup id");
    world.wait_for("the re-made subtree's entry", |e| e.contains_key(&second));
    let service = SocketAddr::new(mesh::SERVICE4, mesh::SERVICE_PORT);
    let outcome = ztunnel::connect_once(&world.mesh.pod_ns, &world.mesh.cgroup, &later, service)
        .expect("client ran");
    match outcome {
        Outcome::Ok { peer, .. } => assert_eq!(peer, SocketAddr::new(ZTUNNEL4, OUTBOUND)),
        other => panic!("the first connect was not redirected: {other:?}"),
    }
}

/// A workloads file with ambient workloads and no ztunnel is valid but refuses every captured
/// connect: the agent warns, and `/readyz` says why.
#[test]
fn ambient_workloads_without_ztunnel_are_explained_by_readyz() {
    if !testkit::require_root("ambient_workloads_without_ztunnel_are_explained_by_readyz") {
        return;
    }
    let mut world = World::new("e2e-nozt", false);
    world.write_workloads(&format!(
        "version: 1\nworkloads:\n  - name: e2e/app\n    cgroup: {}\n    address: 10.99.1.2\n    mode: ambient\n",
        world.mesh.app
    ));
    world.start_agent(&[]);
    world.wait_enrolled(&[&world.mesh.app.clone()]);
    let body = world.wait_readyz(|body| body.starts_with("ready\n"));
    assert!(
        body.contains("warning: ") && body.contains("no ztunnel"),
        "{body}"
    );
}
