//! Programmer benchmarks (root; a private bpffs and a test cgroup, removed at the end):
//!
//! 1. Writing 10,000 `cgroup_info_map` entries and deleting them again: one
//!    `BPF_MAP_UPDATE_BATCH` / `DELETE_BATCH` call against one syscall per entry.
//! 2. The programs' own run time per connection (`BPF_ENABLE_STATS`), in three set-ups: (1) a
//!    process in an ambient cgroup whose connections connect4 redirects to a listener on
//!    loopback that never asks for the original destination; (2) the same to a fake ztunnel
//!    that asks for every one, as ztunnel does (from bash, and (2b) from a compiled client);
//!    (3) a host process (no enrolled ancestor) whose connects are not redirected.
//!
//! `cargo bench --bench programmer` prints the figures; BENCHMARKS.md ("Programmer") keeps them.
//! `ONLY_ASKS=1` skips set-up (1), for comparing two builds of the programs side by side.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use programmer::layout::{self, CgroupInfo};
use programmer::{BatchMode, Loaded, LoaderConfig, MapBackend, MapBatch};
use watcher::CgroupId;

const ENTRIES: u64 = 10_000;
const ROUNDS: usize = 20;
const CONNECTIONS: usize = 2_000;
/// Rounds of CONNECTIONS for the run time (median and fastest reported).
const RUN_TIME_ROUNDS: usize = 9;

fn entries() -> Vec<(CgroupId, CgroupInfo)> {
    (0..ENTRIES)
        .map(|i| {
            (
                CgroupId(10_000_000 + i),
                CgroupInfo {
                    flags: layout::F_AMBIENT | layout::F_HAS_V4,
                    addr4: (0x0a00_0000u32 + i as u32).to_be(),
                    addr6: [0; 16],
                },
            )
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this binary too: measure only
    // when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !testkit::require_root("bench programmer") {
        return;
    }
    let cg = testkit::TestCgroup::new("bench-programmer").expect("test cgroup");
    let fs = testkit::BpfFs::new("bench-programmer").expect("mount a private bpffs");
    let loaded = Loaded::load_and_attach(LoaderConfig::new(fs.pin_dir(), cg.dir()))
        .expect("load and attach");

    let all = entries();
    let write = MapBatch {
        cgroup_upserts: all.clone(),
        ..MapBatch::default()
    };
    let delete = MapBatch {
        cgroup_deletes: all.iter().map(|(id, _)| *id).collect(),
        ..MapBatch::default()
    };
    println!("programmer: {ENTRIES} cgroup_info_map entries, median of {ROUNDS} rounds");
    for mode in [BatchMode::Auto, BatchMode::SingleOps] {
        let mut backend = loaded.backend().expect("backend");
        backend.set_mode(mode);
        let (mut ups, mut dels) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let t = Instant::now();
            backend.apply(&write).expect("write");
            ups.push(t.elapsed());
            let t = Instant::now();
            backend.apply(&delete).expect("delete");
            dels.push(t.elapsed());
        }
        assert!(backend.cgroup_entries().expect("read").is_empty());
        let (up, del) = (median(ups), median(dels));
        let rate = |d: Duration| ENTRIES as f64 / d.as_secs_f64() / 1e6;
        println!(
            "  {mode:?}: update {:.2} ms ({:.2} M entries/s), delete {:.2} ms ({:.2} M entries/s)",
            up.as_secs_f64() * 1e3,
            rate(up),
            del.as_secs_f64() * 1e3,
            rate(del)
        );
    }

    let stats = programmer::sys::enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let pod = cg.child("pod").expect("pod cgroup");
    let enrol = |port: u16| {
        let mut backend = loaded.backend().expect("backend");
        let mut settings = backend.settings().expect("settings");
        settings.set_ztunnel_ips(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        settings.outbound_port = port;
        settings.inbound_port = 15006;
        settings.levels = 1 << 2;
        backend
            .apply(&MapBatch {
                cgroup_upserts: vec![(
                    CgroupId(cg.id_of(&pod).expect("pod id")),
                    CgroupInfo {
                        flags: layout::F_AMBIENT | layout::F_HAS_V4,
                        addr4: u32::from(Ipv4Addr::new(10, 200, 0, 5)).to_be(),
                        addr6: [0; 16],
                    },
                )],
                settings: Some(settings),
                ..MapBatch::default()
            })
            .expect("enrol");
    };
    // The client: CONNECTIONS connects to a service address, each redirected to "ztunnel".
    let client = |ns: Option<&testkit::NetNs>| {
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(format!(
            "for i in $(seq {CONNECTIONS}); do exec 3<>/dev/tcp/10.200.0.99/80; exec 3>&-; done"
        ));
        match ns {
            Some(ns) => ns.place(&mut cmd, &cg, &pod).expect("place client"),
            // SAFETY: the hook only writes the cgroup.procs file before exec.
            None => unsafe {
                cmd.pre_exec(cg.pre_exec_join(&pod));
            },
        }
        let status = cmd.status().expect("bash");
        assert!(status.success(), "client loop failed");
    };

    // 1. A listener outside the cgroup that never asks SO_ORIGINAL_DST: no record is ever
    //    taken, so every write takes a new element of orig_dst_by_tuple (CONNECTIONS x
    //    RUN_TIME_ROUNDS records pile up, fewer than the map holds: nothing is evicted).
    // ONLY_ASKS=1 skips this set-up (for comparing builds of the programs on the others).
    if std::env::var_os("ONLY_ASKS").is_none() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        enrol(listener.local_addr().expect("addr").port());
        let acceptor = std::thread::spawn(move || {
            for _ in 0..CONNECTIONS * RUN_TIME_ROUNDS {
                drop(listener.accept().expect("accept"));
            }
        });
        let never_asks = run_time_rounds(&loaded, true, || client(None));
        acceptor.join().expect("acceptor");
        report(
            "a listener that never asks SO_ORIGINAL_DST (records pile up)",
            &never_asks,
        );
    }

    // 2. As in production: a fake ztunnel (testkit's zbt-net, in its own cgroup outside the
    //    attach point, with only getsockopt attached there, so that its own sockets' sock_ops
    //    callbacks stay out of the client's figure) asks SO_ORIGINAL_DST for every connection.
    let ns = testkit::NetNs::new("bench-programmer").expect("netns");
    let zcg = testkit::TestCgroup::new("bench-programmer-zt").expect("ztunnel cgroup");
    let zt = zcg.child("zt").expect("ztunnel child cgroup");
    let zdir = std::fs::File::open(zcg.dir_of(&zt)).expect("open ztunnel cgroup");
    let getsockopt = loaded
        .ebpf()
        .program("getsockopt")
        .expect("program")
        .fd()
        .expect("fd");
    let link = programmer::sys::link_create(getsockopt.as_fd(), zdir.as_fd(), 21)
        .expect("attach getsockopt to the ztunnel cgroup");
    enrol(testkit::ztunnel::OUTBOUND);
    let ztunnel = testkit::ztunnel::FakeZtunnel::start(
        &ns,
        &zcg,
        &zt,
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        false,
    )
    .expect("fake ztunnel");
    let before = loaded.counters().expect("counters");
    let asks = run_time_rounds(&loaded, true, || client(Some(&ns)));
    // (2b) The same from a compiled client (testkit's zbt-net) that connects and closes in a
    // loop, with none of bash's work between two connections.
    let compiled_client = || {
        let outcomes = testkit::ztunnel::connect(
            &ns,
            &cg,
            &pod,
            &["10.200.0.99:80".parse().expect("addr")],
            &testkit::ztunnel::ClientOptions {
                count: CONNECTIONS as u64,
                no_echo: true,
                ..Default::default()
            },
        )
        .expect("compiled client");
        assert!(outcomes.iter().all(|o| o.errno().is_none()));
    };
    let asks_compiled = run_time_rounds(&loaded, true, compiled_client);
    // ztunnel asks after the accept, so its last answers may come after the client is done.
    let answered: Vec<_> = std::iter::from_fn(|| ztunnel.next(Duration::from_secs(5)))
        .take(2 * CONNECTIONS * RUN_TIME_ROUNDS)
        .collect();
    let after = loaded.counters().expect("counters");
    // The figures first, then the checks: a build that breaks the answers on purpose (the
    // floor in BENCHMARKS.md, "Where the programs' time goes") still shows its run time.
    report(
        "a fake ztunnel that asks SO_ORIGINAL_DST for each connection (as ztunnel does)",
        &asks,
    );
    report(
        "(2b) as (2), from a compiled client (testkit's zbt-net) instead of bash",
        &asks_compiled,
    );
    // scripts/bpf-steps.sh (objects built with ZBRIDGE_BPF_STEPS=1) reads the step map while
    // the programs are still loaded: say how many connections it holds, and wait for it.
    if std::env::var("ZBRIDGE_BENCH_STEPS").is_ok_and(|v| v == "1") {
        println!("STEPS {}", 2 * CONNECTIONS * RUN_TIME_ROUNDS);
        std::thread::sleep(Duration::from_secs(20));
    }
    assert_eq!(answered.len(), 2 * CONNECTIONS * RUN_TIME_ROUNDS);
    assert!(answered
        .iter()
        .all(|a| a.orig == Some(Ok("10.200.0.99:80".parse().expect("addr")))));
    assert_eq!(
        after.orig_dst_hit - before.orig_dst_hit,
        (2 * CONNECTIONS * RUN_TIME_ROUNDS) as u64
    );
    drop(ztunnel);
    drop(link);

    // 3. A host process (a cgroup under the attach point with no entry, on a node with an
    //    enrolled pod) connecting to an address that is no pod's: what every process outside
    //    the mesh pays per connect. Nothing routes there in the namespace, so the connect fails
    //    at the route lookup, before any sock_ops callback: the figure is connect4's alone.
    let host = cg.child("host").expect("host cgroup");
    let host_client = || {
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(format!(
            "for i in $(seq {CONNECTIONS}); do true 2>/dev/null 3<>/dev/tcp/10.200.0.99/80; done; true"
        ));
        ns.place(&mut cmd, &cg, &host).expect("place host client");
        let status = cmd.status().expect("bash");
        assert!(status.success(), "host client loop failed");
    };
    let host_rounds = run_time_rounds(&loaded, false, host_client);
    report(
        "a host process (no enrolled ancestor) connecting to an address that is no pod's \
         (not redirected)",
        &host_rounds,
    );
    drop(stats);
}

/// Per round: the run time and runs of each program over the round, and ns per connection
/// of all programs together.
type Round = (Vec<(f64, u64)>, f64);

/// RUN_TIME_ROUNDS rounds of `client()` (CONNECTIONS connections each, every one of them
/// redirected by connect4, or with `redirected` false, none of them).
fn run_time_rounds(loaded: &Loaded, redirected_each: bool, client: impl Fn()) -> Vec<Round> {
    let totals = || -> Vec<(f64, u64)> {
        programmer::object::PROGRAMS
            .iter()
            .map(|(name, _, _)| {
                let info = loaded
                    .ebpf()
                    .program(name)
                    .expect("program")
                    .info()
                    .expect("info");
                (info.run_time().as_nanos() as f64, info.run_count())
            })
            .collect()
    };
    let redirected = loaded.counters().expect("counters").redirected_out;
    let mut rounds = Vec::new();
    for _ in 0..RUN_TIME_ROUNDS {
        let before = totals();
        client();
        let delta: Vec<(f64, u64)> = totals()
            .iter()
            .zip(&before)
            .map(|(after, before)| (after.0 - before.0, after.1 - before.1))
            .collect();
        let all = delta.iter().map(|(ns, _)| ns).sum::<f64>() / CONNECTIONS as f64;
        rounds.push((delta, all));
    }
    let want = if redirected_each {
        CONNECTIONS * RUN_TIME_ROUNDS
    } else {
        0
    };
    assert_eq!(
        loaded.counters().expect("counters").redirected_out - redirected,
        want as u64
    );
    rounds
}

/// Prints the median and the fastest round. The machine is shared: a program preempted (or
/// interrupted) while it runs has the pause counted in its run time, so rounds differ; the
/// median round is the figure, the fastest shows the cost undisturbed.
fn report(scenario: &str, rounds: &[Round]) {
    let mut rounds = rounds.to_vec();
    rounds.sort_by(|a, b| a.1.total_cmp(&b.1));
    println!(
        "programs' run time, {scenario}: {RUN_TIME_ROUNDS} rounds of {CONNECTIONS} \
         connections (BPF_ENABLE_STATS)"
    );
    let all: Vec<String> = rounds.iter().map(|r| format!("{:.0}", r.1)).collect();
    println!(
        "  all programs per connection, each round (sorted): {}",
        all.join(" ")
    );
    for (label, (delta, all)) in [
        ("median round", &rounds[rounds.len() / 2]),
        ("fastest round", &rounds[0]),
    ] {
        println!("  {label}:");
        let mut client = 0.0;
        for ((name, _, _), (ns, runs)) in programmer::object::PROGRAMS.iter().zip(delta) {
            let per_conn = ns / CONNECTIONS as f64;
            if *name != "getsockopt" {
                client += per_conn;
            }
            println!(
                "    {name:<10} runs {runs:>6}  {:>7.0} ns/run  {per_conn:>7.0} ns/connection",
                if *runs > 0 { ns / *runs as f64 } else { 0.0 },
            );
        }
        println!("    client side (connect4 + sock_ops): {client:.0} ns per connection");
        println!("    all programs: {all:.0} ns per connection");
    }
}
