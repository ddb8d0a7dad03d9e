//! End to end: the agent killed with SIGKILL while a pod connects in a loop lets nothing
//! escape (programs and maps stay pinned), and a restarted agent reconciles what changed
//! while it was down. Also: SIGHUP re-reads the workloads file and refuses a bad one, and
//! SIGTERM with --cleanup-on-exit removes the pins.

mod e2e_support;

use std::net::SocketAddr;
use std::time::Duration;

use e2e_support::{default_workloads, World};
use testkit::mesh::{self, SERVICE4, ZTUNNEL4};
use testkit::ztunnel::{Helper, OUTBOUND};

#[test]
fn sigkill_lets_nothing_escape_and_restart_reconciles() {
    if !testkit::require_root("sigkill_lets_nothing_escape_and_restart_reconciles") {
        return;
    }
    let mut world = World::new("e2e-kill", true);
    let gone = world.mesh.cgroup.child("attach/pods/gone").unwrap();
    let gone_entry = format!(
        "  - name: e2e/gone\n    cgroup: {gone}\n    address: 10.99.1.9\n    mode: ambient\n"
    );
    world.write_workloads(
        &world
            .mesh
            .workloads(&[mesh::ZTUNNEL4, mesh::ZTUNNEL6], &gone_entry),
    );
    world.sleeper(&gone);
    world.start_agent(&[]);
    let (app, zt) = (world.mesh.app.clone(), world.mesh.ztunnel.clone());
    world.wait_enrolled(&[&app, &zt, &gone]);

    // A client looping over short connections; the agent is killed in the middle of it.
    let m = &world.mesh;
    let to = SocketAddr::new(SERVICE4, mesh::SERVICE_PORT);
    let count = 3000;
    let client = Helper::spawn(
        &m.pod_ns,
        &m.cgroup,
        &m.app,
        &[
            "connect",
            "--count",
            &count.to_string(),
            "--to",
            &to.to_string(),
        ]
        .map(String::from),
    )
    .unwrap();
    let expected = format!("peer={}", SocketAddr::new(ZTUNNEL4, OUTBOUND));
    let mut seen = 0;
    let mut agent = world.agent.take();
    loop {
        let line = client
            .line(Duration::from_secs(30))
            .expect("client reports");
        if line == "done" {
            break;
        }
        assert!(
            line.starts_with("ok ") && line.ends_with(&expected),
            "connection {seen}: {line}"
        );
        seen += 1;
        if seen == 500 {
            agent.take().expect("agent running").kill();
        }
    }
    assert_eq!(seen, count);
    assert!(agent.is_none(), "the agent was killed mid-loop");
    assert_eq!(
        world
            .service
            .drain()
            .iter()
            .filter(|a| a.peer.ip() != ZTUNNEL4)
            .count(),
        0
    );

    // While it is down, e2e/gone leaves the file; the restarted agent removes its entry and
    // keeps the others.
    world.write_workloads(&default_workloads(&world));
    world.start_agent(&[]);
    let (gone_id, app_id, zt_id) = (
        world.mesh.id(&gone),
        world.mesh.id(&app),
        world.mesh.id(&zt),
    );
    world.wait_for("the entry of e2e/gone to be reconciled away", |entries| {
        !entries.contains_key(&gone_id)
            && entries.contains_key(&app_id)
            && entries.contains_key(&zt_id)
    });
}

#[test]
fn sighup_rereads_the_file_and_refuses_a_bad_one_and_cleanup_on_exit_unpins() {
    if !testkit::require_root(
        "sighup_rereads_the_file_and_refuses_a_bad_one_and_cleanup_on_exit_unpins",
    ) {
        return;
    }
    let mut world = World::new("e2e-hup", true);
    let late = world.mesh.cgroup.child("attach/pods/late").unwrap();
    world.sleeper(&late);
    world.write_workloads(&default_workloads(&world));
    world.start_agent(&["--cleanup-on-exit"]);
    let (app, zt) = (world.mesh.app.clone(), world.mesh.ztunnel.clone());
    world.wait_enrolled(&[&app, &zt]);
    let late_id = world.mesh.id(&late);
    assert!(!world.entries().unwrap().contains_key(&late_id));

    // A bad file is refused: the old one stays (nothing removed).
    world.write_workloads(
        "version: 1\nworkloads: [{name: x, cgroup: /x, address: nope, mode: ambient}]\n",
    );
    world.agent.as_ref().unwrap().signal(libc::SIGHUP);
    world.wait_log(
        "the bad file refused",
        "previous workloads file stays in force",
    );
    let app_id = world.mesh.id(&app);
    assert!(world.entries().unwrap().contains_key(&app_id));
    // A good file adds e2e/late.
    let entry = format!(
        "  - name: e2e/late\n    cgroup: {late}\n    address: 10.99.1.7\n    mode: ambient\n"
    );
    world.write_workloads(
        &world
            .mesh
            .workloads(&[mesh::ZTUNNEL4, mesh::ZTUNNEL6], &entry),
    );
    world.agent.as_ref().unwrap().signal(libc::SIGHUP);
    world.wait_for("e2e/late enrolled after SIGHUP", |entries| {
        entries.contains_key(&late_id) && entries.contains_key(&app_id)
    });
    let agent = world.agent.take().unwrap();
    agent.signal(libc::SIGTERM);
    let status = agent.wait();
    assert!(status.success(), "agent exit: {status}");
    // --cleanup-on-exit: every pin (maps, links) and the pin directory are gone.
    assert!(
        !world.pin_dir().exists(),
        "pins left under {}",
        world.pin_dir().display()
    );
}
