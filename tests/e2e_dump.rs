//! End to end, on the real kernel: `zbridge dump` shows the records of `orig_dst_by_tuple`
//! that wait for ztunnel's question. In ztunnel's place a listener that never asks (a ztunnel
//! that drops connections, or one stuck): each of the pod's connections leaves its record, and
//! dump lists each with its client and original destination.

mod e2e_support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use e2e_support::World;
use testkit::mesh::{ZTUNNEL4, ZTUNNEL6};
use testkit::ztunnel::{self, ClientOptions, Outcome, OUTBOUND};

/// `zbridge dump` of the world's pin directory, its standard output.
fn dump(world: &World) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zbridge"))
        .arg("dump")
        .arg("--pin-dir")
        .arg(world.pin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn dump_lists_the_records_ztunnel_has_not_asked_about() {
    if !testkit::require_root("dump_lists_the_records_ztunnel_has_not_asked_about") {
        return;
    }
    let mut world = World::new("e2e-dump", false);
    let m = &world.mesh;
    let _silent = ztunnel::service(
        &m.node_ns,
        &m.cgroup,
        &m.ztunnel,
        &[SocketAddr::new(ZTUNNEL4, OUTBOUND)],
    )
    .expect("a listener in ztunnel's place");
    world.write_workloads(&world.mesh.workloads(&[ZTUNNEL4, ZTUNNEL6], ""));
    world.start_agent(&[]);
    world.wait_enrolled(&[&world.mesh.app.clone(), &world.mesh.ztunnel.clone()]);
    let deadline = Instant::now() + e2e_support::DEADLINE;
    while world.ztunnel_ips() != Some(vec![ZTUNNEL4, ZTUNNEL6]) {
        assert!(Instant::now() < deadline, "settings never held ztunnel");
        std::thread::sleep(Duration::from_millis(20));
    }
    let empty = dump(&world);
    assert!(
        empty
            .contains("orig_dst_by_tuple: 0 records waiting for ztunnel's question (holds 65536):"),
        "{empty}"
    );

    let destinations: Vec<SocketAddr> = (1..=3u8)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 2, i)), 80 + u16::from(i)))
        .collect();
    let m = &world.mesh;
    let outcomes = ztunnel::connect(
        &m.pod_ns,
        &m.cgroup,
        &m.app,
        &destinations,
        &ClientOptions {
            count: destinations.len() as u64,
            ..ClientOptions::default()
        },
    )
    .expect("client");
    let want: BTreeSet<(String, String)> = outcomes
        .iter()
        .zip(&destinations)
        .map(|(outcome, dst)| match outcome {
            Outcome::Ok { local, .. } => (local.to_string(), dst.to_string()),
            other => panic!("connection to {dst} failed: {other:?}"),
        })
        .collect();

    let text = dump(&world);
    assert!(
        text.contains("orig_dst_by_tuple: 3 records waiting for ztunnel's question (holds 65536):"),
        "{text}"
    );
    // "  client <address:port> to <original destination>", one line per record.
    let listed: BTreeSet<(String, String)> = text
        .lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["client", client, "to", dst] => Some((client.to_string(), dst.to_string())),
                _ => None,
            },
        )
        .collect();
    assert_eq!(listed, want, "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().eq(["orig_dst_not_stored", "0"])),
        "{text}"
    );
}
