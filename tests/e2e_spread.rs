//! End to end, on the real kernel: a ztunnel with two IPv4 addresses. `zbridge run
//! --standalone` puts both in `settings`, and the programs spread a pod's connections over
//! them by a hash of the original destination (docs/tuple-space.md): each destination lands
//! on the address `Settings::ztunnel_for` predicts, with its exact original destination, and
//! both addresses are used.

mod e2e_support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use e2e_support::World;
use programmer::MapBackend;
use testkit::mesh::{ZTUNNEL4, ZTUNNEL6};
use testkit::ztunnel::{self, ClientOptions, Outcome, OUTBOUND};
use testkit::FakeZtunnel;

const WAIT: Duration = Duration::from_secs(10);
/// ztunnel's second IPv4 address (on the node namespace's loopback, like the first).
const ZTUNNEL4_B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2));

#[test]
fn connections_spread_over_two_ztunnel_addresses_by_destination() {
    if !testkit::require_root("connections_spread_over_two_ztunnel_addresses_by_destination") {
        return;
    }
    let mut world = World::new("e2e-spread", false);
    let m = &world.mesh;
    m.node_ns
        .addr("lo", "10.99.0.2/32")
        .expect("second address");
    let zt_ips = [ZTUNNEL4, ZTUNNEL4_B, ZTUNNEL6];
    // Only asks the original destination (no upstream: the destinations need not exist).
    let fake = FakeZtunnel::start(&m.node_ns, &m.cgroup, &m.ztunnel, &zt_ips, false)
        .expect("fake ztunnel");
    world.ztunnel = Some(fake);
    world.write_workloads(&world.mesh.workloads(&zt_ips, ""));
    world.start_agent(&[]);
    world.wait_enrolled(&[&world.mesh.app.clone(), &world.mesh.ztunnel.clone()]);
    let deadline = std::time::Instant::now() + e2e_support::DEADLINE;
    while world.ztunnel_ips() != Some(zt_ips.to_vec()) {
        assert!(
            std::time::Instant::now() < deadline,
            "settings never held {zt_ips:?}: {:?}",
            world.ztunnel_ips()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let settings = programmer::KernelMaps::open(&world.pin_dir())
        .unwrap()
        .settings()
        .unwrap();

    // 20 destinations, each twice (round-robin): every connection lands on the address the
    // hash picks for its destination, and ztunnel gets the exact original destination.
    let m = &world.mesh;
    let destinations: Vec<SocketAddr> = (1..=20u8)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 1, i)), 80 + u16::from(i)))
        .collect();
    let outcomes = ztunnel::connect(
        &m.pod_ns,
        &m.cgroup,
        &m.app,
        &destinations,
        &ClientOptions {
            count: 40,
            bind: None,
            ..ClientOptions::default()
        },
    )
    .expect("client");
    assert_eq!(outcomes.len(), 40);
    let mut used = BTreeSet::new();
    for (n, outcome) in outcomes.iter().enumerate() {
        let dst = destinations[n % destinations.len()];
        let want_zt = settings.ztunnel_for(dst).expect("an IPv4 ztunnel address");
        let Outcome::Ok { local, peer } = outcome else {
            panic!("connection {n} to {dst} failed: {outcome:?}");
        };
        assert_eq!(
            *peer,
            SocketAddr::new(want_zt, OUTBOUND),
            "connection {n} to {dst}"
        );
        let accepted = world.ztunnel().next(WAIT).expect("ztunnel accepted");
        assert_eq!(accepted.local, SocketAddr::new(want_zt, OUTBOUND), "{dst}");
        assert_eq!(accepted.peer, *local, "{dst}");
        assert_eq!(accepted.orig, Some(Ok(dst)), "{dst}");
        used.insert(want_zt);
    }
    assert_eq!(
        used,
        BTreeSet::from([ZTUNNEL4, ZTUNNEL4_B]),
        "20 destinations did not use both addresses"
    );

    // A connect straight to the second address's capture port is refused like the first's:
    // ztunnel would find no original destination and proxy to itself.
    let outcome = ztunnel::connect_once(
        &m.pod_ns,
        &m.cgroup,
        &m.app,
        SocketAddr::new(ZTUNNEL4_B, OUTBOUND),
    )
    .unwrap();
    assert_eq!(outcome.errno(), Some(libc::EPERM), "{outcome:?}");

    // `zbridge dump` shows every address, in the order the programs index them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zbridge"))
        .arg("dump")
        .arg("--pin-dir")
        .arg(world.pin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ztunnel 10.99.0.1, 10.99.0.2, fd00:99::1 (2 IPv4, 1 IPv6"),
        "{text}"
    );
    // The agent has written entries and settings: the generation has moved from 0.
    let generation: u32 = text
        .split("; generation ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no generation in:\n{text}"));
    assert!(generation >= 1, "{text}");
}
