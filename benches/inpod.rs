//! In-pod datapath benchmarks (root, real kernel, namespaces and cgroups of their own, all
//! removed at the end, also on failure). ztunnel listens inside each pod's namespace, as in
//! every current Istio ambient install; three pods side by side, each in its own namespace on
//! a veth pair to a "node" namespace that holds the destinations:
//!
//! - `direct`: no capture (no program runs for it, no rule): the floor;
//! - `iptables`: Istio's in-pod rules (istio-cni's `ISTIO_OUTPUT`: ztunnel's mark and loopback
//!   exempt, other TCP `REDIRECT --to-ports 15001`), conntrack on: what a user runs today;
//! - `zbridge`: zbridge's programs, the pod enrolled in-pod (`F_INPOD`, its namespace's
//!   inbound capture and entry) among 50,000 other entries.
//!
//! A fake ztunnel listens on `[::]:15001` in each captured pod's namespace (in ztunnel's
//! cgroup, as ztunnel opens its in-pod listeners), asks each connection's original destination
//! as ztunnel does and echoes one byte.
//!
//! 1. Latency of one short connection (connect, 1-byte echo, close) to a service address, in
//!    interleaved rounds: p50 and p99 per set-up and their ratio to `direct`.
//! 2. New connections per second that one pod sustains to 100 destinations, the client
//!    closing first (each connection leaves its tuple in TIME_WAIT for 60 s on the client's
//!    side), with the kernel's default sysctls: `CPS_COUNT` connections, the rate they ran at
//!    and how many failed.
//!
//! `cargo bench --bench inpod` (env: `ROUNDS`, `PER_ROUND`, `CPS_COUNT`). Under `cargo test
//! --benches` it runs once with small counts, as a check that it works.

mod common;
use common::{env_or, percentile, root_bench};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Instant;

use programmer::inpod::InPodCapture;
use programmer::programmer::entry_of;
use programmer::ztunnel_socket::take_listener;
use programmer::{Loaded, LoaderConfig, Programmer, ProgrammerConfig};
use resolver::{Capture, Enrolment, Identity, Role, Update};
use testkit::ztunnel::{self, FakeZtunnel, Helper};
use testkit::{BpfFs, NetNs, TestCgroup};
use watcher::CgroupId;

const SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);

/// The 100 destinations of part 2 (on the node namespace's loopback).
fn destinations() -> Vec<SocketAddr> {
    (1..=100u8)
        .map(|n| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 97, 0, n)), 80))
        .collect()
}

/// A pod namespace wired to the node namespace on 10.88.N.0/24.
fn pod_ns(node: &NetNs, n: u8) -> NetNs {
    let ns = NetNs::new(&format!("bip{n}")).expect("pod netns");
    let (here, there) = (format!("zb-in{n}"), format!("zb-ip{n}"));
    node.veth(&here, &ns, &there).expect("veth");
    node.addr(&here, &format!("10.88.{n}.1/24"))
        .expect("node addr");
    ns.addr(&there, &format!("10.88.{n}.2/24"))
        .expect("pod addr");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    ns.route("default", &format!("10.88.{n}.1")).expect("route");
    ns
}

/// Istio's in-pod outbound rules (istio-cni): ztunnel's own packets (mark 1337) and traffic
/// to loopback pass, other TCP is redirected to ztunnel's 15001 in the namespace.
fn istio_rules(ns: &NetNs) {
    let rules = "*nat\n\
        :PREROUTING ACCEPT [0:0]\n\
        :INPUT ACCEPT [0:0]\n\
        :OUTPUT ACCEPT [0:0]\n\
        :POSTROUTING ACCEPT [0:0]\n\
        :ISTIO_OUTPUT - [0:0]\n\
        -A OUTPUT -p tcp -j ISTIO_OUTPUT\n\
        -A ISTIO_OUTPUT -m mark --mark 0x539/0xfff -j ACCEPT\n\
        -A ISTIO_OUTPUT -o lo -j ACCEPT\n\
        -A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n\
        COMMIT\n";
    ns.exec_with_input("iptables-restore", &[], rules.as_bytes())
        .expect("iptables-restore");
}

/// One client process: `count` connections round-robin over `to`; per-connection latencies
/// (ns) with `latency`, else the number that succeeded; and the failures.
fn client(
    ns: &NetNs,
    cg: &TestCgroup,
    path: &str,
    to: &[SocketAddr],
    count: u64,
    latency: bool,
) -> (Vec<u64>, u64, Vec<String>) {
    let mut args = vec!["connect".to_string(), "--count".into(), count.to_string()];
    if latency {
        args.push("--latency".into());
    }
    for a in to {
        args.push("--to".into());
        args.push(a.to_string());
    }
    let helper = Helper::spawn(ns, cg, path, &args).expect("client");
    let (mut latencies, mut ok, mut errors) = (Vec::new(), 0u64, Vec::new());
    loop {
        let line = helper
            .line(std::time::Duration::from_secs(900))
            .expect("client reports");
        if line == "done" {
            break;
        }
        if let Some(ns) = line.strip_prefix("latency-ns=") {
            latencies.push(ns.parse().expect("latency"));
        } else if line.starts_with("ok ") {
            ok += 1;
        } else {
            errors.push(line);
        }
    }
    (latencies, ok, errors)
}

fn entry(cg: &TestCgroup, path: &str, role: Role, ips: Vec<IpAddr>, capture: Capture) -> Update {
    let identity = matches!(capture, Capture::InPod { .. }).then(|| Identity {
        uid: "bench-pod".into(),
        namespace: "bench".into(),
        name: "pod".into(),
        service_account: "default".into(),
    });
    Update::Upsert(Arc::new(Enrolment {
        cgroup_id: CgroupId(cg.id_of(path).expect("cgroup id")),
        cgroup: path.to_string().into(),
        pod: Some(path.to_string()),
        role,
        ips,
        capture,
        identity,
    }))
}

/// 50,000 other in-pod pods' entries (cgroup ids no directory has).
fn others() -> Vec<Update> {
    (0..50_000u32)
        .map(|i| {
            Update::Upsert(Arc::new(Enrolment {
                cgroup_id: CgroupId((1u64 << 40) + u64::from(i)),
                cgroup: format!("/kubepods.slice/pod{i}").into(),
                pod: Some(format!("bench/p{i}")),
                role: Role::Ambient,
                ips: vec![IpAddr::V4(Ipv4Addr::new(
                    10,
                    200,
                    (i / 256) as u8,
                    (i % 256) as u8,
                ))],
                capture: Capture::InPod { dns: false },
                identity: None,
            }))
        })
        .collect()
}

fn main() {
    let Some(benching) = root_bench("benches/inpod") else {
        return;
    };
    let rounds = env_or("ROUNDS", if benching { 10 } else { 1 });
    let per_round = env_or("PER_ROUND", if benching { 500 } else { 20 });
    let cps_count = env_or("CPS_COUNT", if benching { 300_000 } else { 200 });

    let cg = TestCgroup::new("bench-inpod").expect("test cgroup");
    let attach = cg.child("attach").unwrap();
    let ztunnel_path = cg.child("attach/ztunnel").unwrap();
    let zbridge_pod = cg.child("attach/pods/zbridge").unwrap();
    // Outside the attach cgroup: no program runs for these.
    let outside = cg.child("outside").unwrap();
    let outside_ztunnel = cg.child("outside/ztunnel").unwrap();
    let fs = BpfFs::new("bench-inpod").expect("bpffs");
    let node = NetNs::new("binode").expect("node netns");
    node.ip(&["link", "set", "lo", "up"]).unwrap();
    node.addr("lo", "10.96.0.10/32").unwrap();
    let dsts = destinations();
    for d in &dsts {
        node.addr("lo", &format!("{}/32", d.ip())).unwrap();
    }
    let mut listen = vec![SERVICE];
    listen.extend(&dsts);
    let _service = ztunnel::service(&node, &cg, &outside, &listen).expect("service");

    let direct = pod_ns(&node, 1);
    let iptables = pod_ns(&node, 2);
    let zbridge = pod_ns(&node, 3);
    istio_rules(&iptables);
    let any = [IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)];
    let _iptables_ztunnel =
        FakeZtunnel::start(&iptables, &cg, &outside_ztunnel, &any, false).expect("ztunnel");
    let zbridge_ztunnel =
        FakeZtunnel::start(&zbridge, &cg, &ztunnel_path, &any, false).expect("ztunnel");

    // zbridge: the programs on `attach`, ztunnel and the pod enrolled, the pod in-pod with
    // ztunnel's 15006 listener in its namespace (as the agent does once ztunnel acked it).
    let loaded = Loaded::load_and_attach(LoaderConfig::new(fs.pin_dir(), cg.dir_of(&attach)))
        .expect("load and attach");
    let mut programmer =
        Programmer::new(loaded.backend().expect("maps"), ProgrammerConfig::default())
            .expect("programmer");
    let pod_ip = IpAddr::V4(Ipv4Addr::new(10, 88, 3, 2));
    let pod_entry = entry(
        &cg,
        &zbridge_pod,
        Role::Ambient,
        vec![pod_ip],
        Capture::InPod { dns: false },
    );
    let mut inpod = InPodCapture::open(loaded.pin_dir()).expect("in-pod capture");
    let netns = zbridge.file().unwrap();
    let listener = take_listener(
        zbridge_ztunnel.listener.pid() as i32,
        netns.metadata().unwrap().ino(),
        15006,
    )
    .expect("ztunnel's descriptors")
    .expect("ztunnel's 15006 listener");
    let Update::Upsert(e) = &pod_entry else {
        unreachable!()
    };
    inpod
        .enrol("bench-pod", netns.as_fd(), &listener, entry_of(e))
        .expect("enrol the pod's namespace");
    for update in others().into_iter().chain([
        entry(&cg, &ztunnel_path, Role::Ztunnel, vec![], Capture::Node),
        pod_entry,
    ]) {
        programmer.queue(&update);
    }
    programmer.flush().expect("entries");

    // 1. Latency, interleaved.
    let names = ["direct", "iptables", "zbridge"];
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); names.len()];
    let mut failures: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for (i, name) in names.iter().enumerate() {
            let (lat, _, err) = match *name {
                "direct" => client(&direct, &cg, &outside, &[SERVICE], per_round, true),
                "iptables" => client(&iptables, &cg, &outside, &[SERVICE], per_round, true),
                _ => client(&zbridge, &cg, &zbridge_pod, &[SERVICE], per_round, true),
            };
            samples[i].extend(lat);
            failures[i].extend(err);
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    let floor = {
        let mut s = samples[0].clone();
        s.sort_unstable();
        (percentile(&s, 0.5), percentile(&s, 0.99))
    };
    println!(
        "in-pod connection latency (connect, 1-byte echo, close), {rounds} interleaved rounds of {per_round}:"
    );
    for (i, name) in names.iter().enumerate() {
        let mut s = samples[i].clone();
        s.sort_unstable();
        let (p50, p99) = (percentile(&s, 0.5), percentile(&s, 0.99));
        println!(
            "    {name:<9} p50 {:>7.1} µs  p99 {:>7.1} µs   ratio to direct p50 {:.2}x p99 {:.2}x   ({} samples, {} failed)",
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
            p50 as f64 / floor.0.max(1) as f64,
            p99 as f64 / floor.1.max(1) as f64,
            s.len(),
            failures[i].len()
        );
        assert!(
            failures[i].is_empty(),
            "{name}: {:?}",
            &failures[i][..failures[i].len().min(3)]
        );
    }

    // 2. Sustained new connections from one pod to 100 destinations, the client closing first.
    println!(
        "in-pod new connections, one pod, {cps_count} to 100 destinations, client closing first:"
    );
    for name in names {
        let started = Instant::now();
        let (_, ok, err) = match name {
            "direct" => client(&direct, &cg, &outside, &dsts, cps_count, false),
            "iptables" => client(&iptables, &cg, &outside, &dsts, cps_count, false),
            _ => client(&zbridge, &cg, &zbridge_pod, &dsts, cps_count, false),
        };
        let secs = started.elapsed().as_secs_f64();
        println!(
            "    {name:<9} {ok} succeeded in {secs:.1} s: {:.0} conn/s, {} failed{}",
            ok as f64 / secs,
            err.len(),
            err.first()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    let counters = inpod.inbound().counters().expect("inbound counters");
    eprintln!("inbound counters: {counters:?}");
}
