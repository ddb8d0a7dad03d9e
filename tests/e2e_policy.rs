//! End to end: an ambient pod while no ztunnel address is known fails closed by default, and
//! connects as if outside the mesh with `--fail-open`.

mod e2e_support;

use std::net::SocketAddr;

use e2e_support::World;
use testkit::mesh::{self, POD4, SERVICE4};
use testkit::ztunnel::{self, Outcome};

fn world_without_ztunnel(prefix: &str, flags: &[&str]) -> World {
    let mut world = World::new(prefix, false);
    // ztunnel's address is `auto` and no process runs in its cgroup: no address is known.
    world.write_workloads(&world.mesh.workloads(&[], ""));
    world.start_agent(flags);
    let app = world.mesh.app.clone();
    world.wait_enrolled(&[&app]);
    assert_eq!(world.ztunnel_ips(), Some(vec![]));
    world
}

#[test]
fn no_ztunnel_fails_closed_by_default() {
    if !testkit::require_root("no_ztunnel_fails_closed_by_default") {
        return;
    }
    let world = world_without_ztunnel("e2e-closed", &[]);
    let m = &world.mesh;
    let to = SocketAddr::new(SERVICE4, mesh::SERVICE_PORT);
    let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.app, to).unwrap();
    assert!(
        matches!(&outcome, Outcome::Err { stage, errno } if stage == "connect" && *errno == libc::EPERM),
        "{outcome:?}"
    );
    assert_eq!(world.service.drain(), vec![]);
}

#[test]
fn no_ztunnel_fails_open_when_configured() {
    if !testkit::require_root("no_ztunnel_fails_open_when_configured") {
        return;
    }
    let world = world_without_ztunnel("e2e-open", &["--fail-open"]);
    let m = &world.mesh;
    let to = SocketAddr::new(SERVICE4, mesh::SERVICE_PORT);
    let outcome = ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.app, to).unwrap();
    assert!(
        matches!(outcome, Outcome::Ok { peer, .. } if peer == to),
        "{outcome:?}"
    );
    let a = world
        .service
        .next(std::time::Duration::from_secs(10))
        .expect("service accepted");
    assert_eq!((a.local, a.peer.ip()), (to, POD4));
}
