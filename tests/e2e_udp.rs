//! End to end: only TCP is captured. A UDP `connect()` from an ambient pod (a DNS resolver's,
//! say) keeps its destination: the connect hooks see UDP sockets too, and must let them be.

mod e2e_support;

use std::net::SocketAddr;

use e2e_support::running_world;
use testkit::mesh::{self, SERVICE4, SERVICE6};
use testkit::ztunnel::{self, Outcome};

#[test]
fn udp_connects_of_an_ambient_pod_are_not_redirected() {
    if !testkit::require_root("udp_connects_of_an_ambient_pod_are_not_redirected") {
        return;
    }
    let world = running_world("e2e-udp");
    let m = &world.mesh;
    for service in [SERVICE4, SERVICE6] {
        let dst = SocketAddr::new(service, 53);
        match ztunnel::udp_connect_once(&m.pod_ns, &m.cgroup, &m.app, dst).unwrap() {
            Outcome::Ok { peer, .. } => assert_eq!(peer, dst, "UDP connect kept its destination"),
            other => panic!("UDP connect to {dst}: {other:?}"),
        }
    }
    // The same pod's TCP connect is captured (the programs are in force for it).
    let tcp = SocketAddr::new(SERVICE4, mesh::SERVICE_PORT);
    match ztunnel::connect_once(&m.pod_ns, &m.cgroup, &m.app, tcp).unwrap() {
        Outcome::Ok { peer, .. } => assert_eq!(peer.port(), ztunnel::OUTBOUND),
        other => panic!("TCP connect: {other:?}"),
    }
}
