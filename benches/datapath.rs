//! Datapath benchmarks (root, real kernel, namespaces of their own; everything is removed at
//! the end, also on failure).
//!
//! 1. Latency of one short connection (connect, 1-byte echo, close) from a pod namespace to a
//!    listener on ztunnel's address (10.99.0.1:15001) in the node namespace, side by side in
//!    interleaved rounds:
//!    - `direct`: straight to the listener, no programs run for the client (the floor);
//!    - `dnat-0`, `dnat-5000`: to a service address, iptables DNAT in the pod namespace with
//!      0 and 5,000 other rules before the match;
//!    - `zbridge-0`, `zbridge-50000`: to a service address, through zbridge's programs with
//!      only the pod (and ztunnel) enrolled, and with 50,000 other enrolled entries.
//!
//!    zbridge's two paths come from a pod of their own: its `2 x ROUNDS x PER_ROUND`
//!    connections to ztunnel, all within TIME_WAIT's 60 s, must stay below half of its
//!    ephemeral port range (14,116 ports of the default range), beyond which connects slow
//!    down many times over.
//!
//!    The listener asks the original destination of every connection, as ztunnel does; the
//!    `answered` column counts the answers from `orig_dst_by_tuple` (the programs' counter).
//! 2. The sustained rate of new short connections from one pod to many destinations, the
//!    client closing first: through zbridge every connection shares the one tuple space
//!    (pod address, port → ztunnel:15001); through DNAT, conntrack keeps the real tuple. The
//!    zbridge run is from a fresh pod, whose tuple space part 1 left empty.
//!
//! 3. The ways out of that limit (docs/tuple-space.md), each from a fresh pod namespace of its
//!    own whose ephemeral port range is cut to `SPREAD_PORTS` ports (so that every limit is
//!    reached well within TIME_WAIT's 60 s): zbridge with one ztunnel address, with two
//!    (connections spread by a hash of the destination), and with one address and
//!    `net.ipv4.tcp_tw_reuse=1` set in the pod's namespace.
//!
//! `cargo test --benches` runs a small check instead (a few rounds and connections; every
//! zbridge connection answered).
//!
//! `cargo bench --bench datapath` (env: `ROUNDS`, `PER_ROUND`, `BURST`, `SPREAD_BURST`,
//! `SPREAD_PORTS`; `ONLY_SPREAD=1` runs part 3 alone; `RUN_TIME=1` also reports the zbridge
//! paths' sock_ops and getsockopt run time per connection, from `BPF_ENABLE_STATS`).

mod common;
use common::{env_or, percentile, root_bench};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use programmer::{KernelMaps, Loaded, LoaderConfig, Programmer, ProgrammerConfig};
use resolver::{Enrolment, Role, Update};
use testkit::mesh::{Mesh, ZTUNNEL4, ZTUNNEL6};
use testkit::ztunnel::{self, Helper, OUTBOUND};
use testkit::{BpfFs, NetNs};
use watcher::CgroupId;

/// The address pods connect to (no host has it: DNAT or zbridge takes it to ztunnel).
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
/// ztunnel's second IPv4 address (part 3).
const ZTUNNEL4_B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2));

/// A pod namespace of its own, wired to the node namespace on subnet 10.98.N.0/24.
fn pod_ns(mesh: &Mesh, n: u8) -> NetNs {
    let ns = NetNs::new(&format!("bench-p{n}")).expect("netns");
    let (here, there) = (format!("zb-n{n}"), format!("zb-p{n}"));
    mesh.node_ns.veth(&here, &ns, &there).expect("veth");
    mesh.node_ns
        .addr(&here, &format!("10.98.{n}.1/24"))
        .expect("node addr");
    ns.addr(&there, &format!("10.98.{n}.2/24"))
        .expect("pod addr");
    ns.route("default", &format!("10.98.{n}.1")).expect("route");
    ns
}

/// A fresh ambient pod (`pod_ns` number `n`, address 10.98.n.2, cgroup `attach/pods/<name>`),
/// enrolled.
fn fresh_pod(
    mesh: &Mesh,
    programmer: &mut Programmer<KernelMaps>,
    n: u8,
    name: &str,
) -> (NetNs, String) {
    let ns = pod_ns(mesh, n);
    let path = mesh
        .cgroup
        .child(&format!("attach/pods/{name}"))
        .expect("pod cgroup");
    let pod_ip = IpAddr::V4(Ipv4Addr::new(10, 98, n, 2));
    programmer.queue(&enrol(mesh.id(&path), &path, Role::Ambient, vec![pod_ip]));
    programmer.flush().expect("enrol the pod");
    (ns, path)
}

/// The programs attached through the loader.
struct Programs {
    loaded: Loaded,
}

impl Programs {
    fn new(pin_dir: PathBuf, attach: PathBuf) -> Self {
        let loaded = Loaded::load_and_attach(LoaderConfig::new(&pin_dir, &attach))
            .expect("load and attach the programs");
        Programs { loaded }
    }

    /// The run time of sock_ops and getsockopt so far, ns (0 unless `BPF_ENABLE_STATS` is
    /// on): the programs that write and read `orig_dst_by_tuple`.
    fn run_time(&self) -> u64 {
        ["sock_ops", "getsockopt"]
            .iter()
            .map(|name| {
                let program = self.loaded.ebpf().program(name).expect("program");
                program.info().expect("info").run_time().as_nanos() as u64
            })
            .sum()
    }

    /// `SO_ORIGINAL_DST` answered from `orig_dst_by_tuple` so far (the programs' counter).
    fn answered(&self) -> u64 {
        self.loaded.counters().expect("counters").orig_dst_hit
    }
}

/// The ratios of `p50s` to `base`, round by round: "median (lowest-highest)".
fn round_ratios(p50s: &[u64], base: &[u64]) -> String {
    let mut ratios: Vec<f64> = p50s
        .iter()
        .zip(base)
        .map(|(&p, &b)| p as f64 / b.max(1) as f64)
        .collect();
    ratios.sort_by(f64::total_cmp);
    match (ratios.first(), ratios.last()) {
        (Some(low), Some(high)) => format!("{:.2} ({low:.2}-{high:.2})", percentile(&ratios, 0.50)),
        _ => "-".to_string(),
    }
}

/// iptables DNAT of VIP:80 to ztunnel:15001 in `ns`, after `others` non-matching rules.
fn dnat(ns: &NetNs, others: u32) {
    let mut rules = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..others {
        rules.push_str(&format!(
            "-A OUTPUT -d 10.{}.{}.{}/32 -p tcp --dport 80 -j DNAT --to-destination 10.99.0.1:15001\n",
            200 + i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    rules.push_str(&format!(
        "-A OUTPUT -d {VIP}/32 -p tcp -j DNAT --to-destination 10.99.0.1:15001\nCOMMIT\n"
    ));
    ns.exec_with_input("iptables-restore", &[], rules.as_bytes())
        .expect("iptables-restore");
}

/// Runs one client process: `count` connections round-robin over `to`; per-connection
/// latencies (ns) and the errors seen (index, line).
fn client(
    ns: &NetNs,
    mesh: &Mesh,
    cgroup: &str,
    to: &[SocketAddr],
    count: u64,
) -> (Vec<u64>, Vec<String>) {
    let mut args = vec![
        "connect".to_string(),
        "--latency".into(),
        "--count".into(),
        count.to_string(),
    ];
    for a in to {
        args.push("--to".into());
        args.push(a.to_string());
    }
    let helper = Helper::spawn(ns, &mesh.cgroup, cgroup, &args).expect("client");
    let (mut latencies, mut errors) = (Vec::new(), Vec::new());
    loop {
        let line = helper
            .line(std::time::Duration::from_secs(600))
            .expect("client reports");
        if line == "done" {
            break;
        }
        match line.strip_prefix("latency-ns=") {
            Some(ns) => latencies.push(ns.parse().expect("latency")),
            None => errors.push(line),
        }
    }
    (latencies, errors)
}

fn enrol(id: u64, path: &str, role: Role, ips: Vec<IpAddr>) -> Update {
    Update::Upsert(Arc::new(Enrolment {
        cgroup_id: CgroupId(id),
        cgroup: path.to_string().into(),
        pod: Some(path.to_string()),
        role,
        ips,
        capture: Default::default(),
        identity: None,
    }))
}

/// 50,000 other ambient pods (cgroup ids no directory has, addresses 10.200.0.0/16).
fn others(count: u32, delete: bool) -> Vec<Update> {
    (0..count)
        .map(|i| {
            let id = (1u64 << 40) + u64::from(i);
            if delete {
                Update::Delete {
                    cgroup_id: CgroupId(id),
                }
            } else {
                let ip = IpAddr::V4(Ipv4Addr::new(10, 200, (i / 256) as u8, (i % 256) as u8));
                enrol(
                    id,
                    &format!("/kubepods.slice/kubepods-besteffort.slice/pod{i}"),
                    Role::Ambient,
                    vec![ip],
                )
            }
        })
        .collect()
}

fn main() {
    let Some(bench) = root_bench("benches/datapath") else {
        return;
    };
    // `cargo test --benches`: a few connections of each kind, and the check that zbridge
    // answered every one of them (see below).
    let size = |full: u64, check: u64| if bench { full } else { check };
    let rounds = env_or("ROUNDS", size(10, 2));
    let per_round = env_or("PER_ROUND", size(500, 50));
    let burst = env_or("BURST", size(40_000, 1_000));
    let spread_burst = env_or("SPREAD_BURST", size(30_000, 1_000));
    let spread_ports = env_or("SPREAD_PORTS", size(10_000, 500));
    let only_spread = env_or("ONLY_SPREAD", 0) == 1;
    // RUN_TIME=1: the kernel times every program run (BPF_ENABLE_STATS; a little more work
    // in each), for the zbridge paths' sock_ops and getsockopt ns per connection.
    let _stats = (env_or("RUN_TIME", 0) == 1)
        .then(|| programmer::sys::enable_run_time_stats().expect("BPF_ENABLE_STATS"));

    let mesh = Mesh::new("bench").expect("mesh");
    let bpffs = BpfFs::new("bench").expect("bpffs");
    mesh.node_ns
        .addr("lo", "10.99.0.2/32")
        .expect("ztunnel's second address");
    // The listener on ztunnel's addresses, in ztunnel's cgroup, asking original destinations.
    let _listener = ztunnel::FakeZtunnel::start(
        &mesh.node_ns,
        &mesh.cgroup,
        &mesh.ztunnel,
        &[ZTUNNEL4, ZTUNNEL4_B, ZTUNNEL6],
        false,
    )
    .expect("listener");
    let direct_ns = pod_ns(&mesh, 1);
    let dnat0_ns = pod_ns(&mesh, 2);
    let dnat5k_ns = pod_ns(&mesh, 3);
    dnat(&dnat0_ns, 0);
    dnat(&dnat5k_ns, 5000);

    // zbridge: the programs attached to the mesh's attach cgroup, ztunnel enrolled.
    let programs = Programs::new(bpffs.pin_dir(), mesh.attach_dir());
    let mut programmer = Programmer::new(
        programs.loaded.backend().expect("maps"),
        ProgrammerConfig::default(),
    )
    .expect("programmer");
    for update in [
        enrol(
            mesh.id(&mesh.ztunnel),
            &mesh.ztunnel,
            Role::Ztunnel,
            vec![ZTUNNEL4],
        ),
        Update::SetZtunnel {
            ips: vec![ZTUNNEL4, ZTUNNEL6],
        },
    ] {
        programmer.queue(&update);
    }
    programmer.flush().expect("enrol");
    // zbridge's paths from an enrolled pod of their own, wired as direct's and DNAT's: all
    // of a pod's connections to ztunnel share one tuple space, and its connects become many
    // times slower once about half of its ports are in TIME_WAIT (connect() tries the
    // range's even ports first).
    let (zbridge_ns, zbridge_pod) = fresh_pod(&mesh, &mut programmer, 9, "zbridge9");

    let floor = [SocketAddr::new(ZTUNNEL4, OUTBOUND)];
    let vip = [SocketAddr::new(IpAddr::V4(VIP), 80)];
    let names = [
        "direct",
        "dnat-0",
        "dnat-5000",
        "zbridge-0",
        "zbridge-50000",
    ];
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); names.len()];
    let mut errors: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let mut answered = vec![0u64; names.len()];
    // Each round's p50, for the spread of one path from round to round.
    let mut round_p50: Vec<Vec<u64>> = vec![Vec::new(); names.len()];
    // Each round's sock_ops + getsockopt run time per connection (RUN_TIME=1).
    let mut round_run_time: Vec<Vec<u64>> = vec![Vec::new(); names.len()];
    let rounds = if only_spread { 0 } else { rounds };
    for round in 0..rounds {
        for i in 0..names.len() {
            let before = programs.answered();
            let run_time_before = programs.run_time();
            let (lat, err) = match names[i] {
                // Outside the attach cgroup: no program runs for these clients.
                "direct" => client(&direct_ns, &mesh, &mesh.outside, &floor, per_round),
                "dnat-0" => client(&dnat0_ns, &mesh, &mesh.outside, &vip, per_round),
                "dnat-5000" => client(&dnat5k_ns, &mesh, &mesh.outside, &vip, per_round),
                "zbridge-0" => client(&zbridge_ns, &mesh, &zbridge_pod, &vip, per_round),
                "zbridge-50000" => {
                    for u in others(50_000, false) {
                        programmer.queue(&u);
                    }
                    programmer.flush().expect("50,000 entries");
                    let result = client(&zbridge_ns, &mesh, &zbridge_pod, &vip, per_round);
                    for u in others(50_000, true) {
                        programmer.queue(&u);
                    }
                    programmer.flush().expect("remove 50,000 entries");
                    result
                }
                _ => unreachable!(),
            };
            answered[i] += programs.answered() - before;
            round_run_time[i].push((programs.run_time() - run_time_before) / per_round.max(1));
            let mut sorted = lat.clone();
            sorted.sort_unstable();
            round_p50[i].push(percentile(&sorted, 0.50));
            samples[i].extend(lat);
            errors[i].extend(err);
        }
        let p50s: Vec<String> = names
            .iter()
            .zip(&round_p50)
            .map(|(name, p50)| format!("{name} {:.0}", p50[round as usize] as f64 / 1e3))
            .collect();
        eprintln!("round {}/{rounds}: p50 µs {}", round + 1, p50s.join(", "));
    }

    if !only_spread {
        println!(
            "\nDatapath: one connection (connect, 1-byte echo, close), {rounds} interleaved rounds x {per_round}"
        );
        println!(
            "{:<18} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7} {:>9} {:>14}",
            "path",
            "n",
            "p50 µs",
            "p99 µs",
            "mean µs",
            "p50/a",
            "p99/a",
            "errors",
            "answered",
            "p50/a by round"
        );
        let mut base = (1.0, 1.0);
        for (i, name) in names.iter().enumerate() {
            let s = &mut samples[i];
            s.sort_unstable();
            let (p50, p99) = (percentile(s, 0.50) as f64, percentile(s, 0.99) as f64);
            let mean = s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
            if i == 0 {
                base = (p50, p99);
            }
            println!(
                "{:<18} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>7} {:>9} {:>20}",
                name,
                s.len(),
                p50 / 1e3,
                p99 / 1e3,
                mean / 1e3,
                p50 / base.0,
                p99 / base.1,
                errors[i].len(),
                answered[i],
                round_ratios(&round_p50[i], &round_p50[0])
            );
            if let Some(first) = errors[i].first() {
                println!("    first error: {first}");
            }
        }
        println!("(p50/a by round: median (lowest-highest) over the rounds of the path's p50 over direct's)");
        if !bench {
            // Every zbridge connection landed and its ztunnel got an original destination.
            for (i, name) in names.iter().enumerate() {
                if name.starts_with("zbridge") {
                    assert!(errors[i].is_empty(), "{name}: {:?}", errors[i]);
                    assert_eq!(answered[i], rounds * per_round, "{name}");
                }
            }
        }
        if round_run_time.iter().flatten().any(|&ns| ns > 0) {
            println!("sock_ops + getsockopt, ns per connection: median round (lowest-highest)");
            for (i, name) in names
                .iter()
                .enumerate()
                .filter(|(_, n)| n.starts_with("zbridge"))
            {
                let mut ns = round_run_time[i].clone();
                ns.sort_unstable();
                println!(
                    "  {name:<18} {} ({}-{})",
                    percentile(&ns, 0.50),
                    ns.first().copied().unwrap_or_default(),
                    ns.last().copied().unwrap_or_default()
                );
            }
        }
    }
    // The tuple space: one pod, many destinations, client closes first, as fast as it can.
    let destinations: Vec<SocketAddr> = (0..100u8)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 1, i + 1)), 80))
        .collect();
    let mut rules = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n");
    rules.push_str(
        "-A OUTPUT -d 10.96.1.0/24 -p tcp --dport 80 -j DNAT --to-destination 10.99.0.1:15001\nCOMMIT\n",
    );
    dnat0_ns
        .exec_with_input("iptables-restore", &[], rules.as_bytes())
        .expect("iptables-restore");
    let ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse::<u64>().ok())
        .collect::<Vec<_>>();
    println!(
        "\nTuple space: {burst} short connections from one pod over 100 destinations, client closes first \
         (ephemeral ports {ports:?})"
    );
    // zbridge from a fresh pod (7): part 1 left TIME_WAIT sockets in its pod's tuple space.
    let mut full_runs: Vec<(&str, &NetNs, &str)> = Vec::new();
    let zbridge_burst = (!only_spread).then(|| fresh_pod(&mesh, &mut programmer, 7, "burst7"));
    if let Some((ns, path)) = &zbridge_burst {
        full_runs.push(("dnat", &dnat0_ns, &mesh.outside));
        full_runs.push(("zbridge", ns, path));
    }
    for (name, ns, cgroup) in full_runs {
        let start = Instant::now();
        let (mut lat, errs) = client(ns, &mesh, cgroup, &destinations, burst);
        let took = start.elapsed().as_secs_f64();
        lat.sort_unstable();
        println!(
            "{name:<11} {} ok, {} failed in {took:.1} s ({:.0} conn/s; ok p50 {:.1} µs, p99 {:.1} µs){}",
            lat.len(),
            errs.len(),
            lat.len() as f64 / took,
            percentile(&lat, 0.50) as f64 / 1e3,
            percentile(&lat, 0.99) as f64 / 1e3,
            errs.first()
                .map(|e| format!("; first failure: {e}"))
                .unwrap_or_default()
        );
    }
    // The ways out, each from a fresh pod (namespace, cgroup, address) with a cut port range.
    let (low, high) = (40_000u64, 40_000 + spread_ports - 1);
    println!(
        "\nWays out: {spread_burst} short connections per run from a fresh pod over the same 100 \
         destinations, ephemeral ports {low}-{high} ({spread_ports}) in the pod's namespace"
    );
    let runs: [(&str, &[IpAddr], bool); 3] = [
        ("1 ztunnel address", &[ZTUNNEL4, ZTUNNEL6], false),
        (
            "2 ztunnel addresses",
            &[ZTUNNEL4, ZTUNNEL4_B, ZTUNNEL6],
            false,
        ),
        ("1 address + tcp_tw_reuse=1", &[ZTUNNEL4, ZTUNNEL6], true),
    ];
    for (i, (name, ztunnel_ips, tw_reuse)) in runs.into_iter().enumerate() {
        let n = 4 + i as u8;
        let (ns, path) = fresh_pod(&mesh, &mut programmer, n, &format!("spread{n}"));
        ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv4.ip_local_port_range={low} {high}")],
        )
        .expect("port range");
        if tw_reuse {
            ns.exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])
                .expect("tcp_tw_reuse");
        }
        programmer.queue(&Update::SetZtunnel {
            ips: ztunnel_ips.to_vec(),
        });
        programmer.flush().expect("set ztunnel");
        // Where the programs send each destination (the mirror of their hash).
        let settings = programmer::MapBackend::settings(programmer.backend()).expect("settings");
        let mut share: Vec<(IpAddr, usize)> = Vec::new();
        for d in &destinations {
            let zt = settings.ztunnel_for(*d).expect("a ztunnel address");
            match share.iter_mut().find(|(ip, _)| *ip == zt) {
                Some((_, count)) => *count += 1,
                None => share.push((zt, 1)),
            }
        }
        let start = Instant::now();
        let (lat, errs) = client(&ns, &mesh, &path, &destinations, spread_burst);
        let took = start.elapsed().as_secs_f64();
        let share: Vec<String> = share
            .iter()
            .map(|(ip, count)| format!("{ip}: {count} destinations"))
            .collect();
        println!(
            "{name:<28} {} ok, {} failed in {took:.1} s ({:.0} conn/s) [{}]{}",
            lat.len(),
            errs.len(),
            lat.len() as f64 / took,
            share.join(", "),
            errs.first()
                .map(|e| format!("; first failure: {e}"))
                .unwrap_or_default()
        );
    }

    drop(programmer);
    drop(programs);
    // Guards remove the namespaces, the bpffs (and with it the pinned links) and the cgroups.
}
