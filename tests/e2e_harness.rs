//! The end-to-end harness itself, without the agent: the mesh's namespaces route, helpers land
//! in their cgroups, and the fake ztunnel reports what it accepted (no original destination
//! without zbridge's programs or iptables).

use std::net::SocketAddr;
use std::time::Duration;

use testkit::mesh::{self, Mesh};
use testkit::ztunnel::{self, Outcome};
use testkit::FakeZtunnel;

#[test]
fn mesh_routes_and_fake_ztunnel_reports_without_programs() {
    if !testkit::require_root("mesh_routes_and_fake_ztunnel_reports_without_programs") {
        return;
    }
    let mesh = Mesh::new("harness").unwrap();
    let service = ztunnel::service(
        &mesh.node_ns,
        &mesh.cgroup,
        &mesh.outside,
        &mesh::service_addrs(),
    )
    .unwrap();
    let zt = FakeZtunnel::start(
        &mesh.node_ns,
        &mesh.cgroup,
        &mesh.ztunnel,
        &[mesh::ZTUNNEL4, mesh::ZTUNNEL6],
        false,
    )
    .unwrap();

    // The pod reaches the service directly, from its own address, in both families.
    for (svc, pod) in mesh::service_addrs()
        .into_iter()
        .zip([mesh::POD4, mesh::POD6])
    {
        let outcome = ztunnel::connect_once(&mesh.pod_ns, &mesh.cgroup, &mesh.app, svc).unwrap();
        let Outcome::Ok { local, peer } = outcome else {
            panic!("pod → {svc}: {outcome:?}");
        };
        assert_eq!((local.ip(), peer), (pod, svc));
        let accepted = service
            .next(Duration::from_secs(5))
            .expect("service accepted");
        assert_eq!((accepted.local, accepted.peer), (svc, local));
    }

    // A direct connect to ztunnel has no original destination to report.
    let to = SocketAddr::new(mesh::ZTUNNEL4, ztunnel::OUTBOUND);
    let outcome = ztunnel::connect_once(&mesh.pod_ns, &mesh.cgroup, &mesh.app, to).unwrap();
    assert!(
        matches!(outcome, Outcome::Ok { peer, .. } if peer == to),
        "{outcome:?}"
    );
    let accepted = zt.next(Duration::from_secs(5)).expect("ztunnel accepted");
    assert_eq!(accepted.local, to);
    assert!(matches!(accepted.orig, Some(Err(_))), "{accepted:?}");

    // The helper processes really sit in their cgroups.
    let procs =
        std::fs::read_to_string(mesh.cgroup.dir_of(&mesh.ztunnel).join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), zt.listener.pid().to_string());
}
