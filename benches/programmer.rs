//! Programmer benchmarks (root; a private bpffs and a test cgroup, removed at the end):
//!
//! 1. Writing 10,000 `cgroup_info_map` entries and deleting them again: one
//!    `BPF_MAP_UPDATE_BATCH` / `DELETE_BATCH` call against one syscall per entry.
//! 2. The programs' own run time per connection (`BPF_ENABLE_STATS`): a process in an
//!    ambient cgroup opens connections that connect4 redirects to a listener on loopback.
//!
//! `cargo bench --bench programmer` prints the figures; BENCHMARKS.md ("Programmer") keeps them.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use programmer::layout::{self, CgroupInfo};
use programmer::{BatchMode, Loaded, LoaderConfig, MapBackend, MapBatch};
use watcher::CgroupId;

const ENTRIES: u64 = 10_000;
const ROUNDS: usize = 20;
const CONNECTIONS: usize = 2_000;

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

    // Run time per connection: an ambient pod whose connects go to "ztunnel" on loopback.
    let pod = cg.child("pod").expect("pod cgroup");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
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
    let acceptor = std::thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            drop(listener.accept().expect("accept"));
        }
    });
    let stats = programmer::sys::enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!(
        "for i in $(seq {CONNECTIONS}); do exec 3<>/dev/tcp/10.200.0.99/80; exec 3>&-; done"
    ));
    // SAFETY: the hook only writes the cgroup.procs file before exec.
    unsafe {
        cmd.pre_exec(cg.pre_exec_join(&pod));
    }
    let status = cmd.status().expect("bash");
    assert!(status.success(), "client loop failed");
    acceptor.join().expect("acceptor");
    let counters = loaded.counters().expect("counters");
    assert_eq!(counters.redirected_out, CONNECTIONS as u64);
    println!("programs' run time ({CONNECTIONS} redirected connections, BPF_ENABLE_STATS):");
    let mut per_conn_total = 0.0;
    for (name, _, _) in programmer::object::PROGRAMS {
        let info = loaded
            .ebpf()
            .program(name)
            .expect("program")
            .info()
            .expect("info");
        let (ns, runs) = (info.run_time().as_nanos() as f64, info.run_count());
        let per_conn = ns / CONNECTIONS as f64;
        per_conn_total += per_conn;
        println!(
            "  {name:<10} runs {runs:>6}  {:>7.0} ns/run  {:>7.0} ns/connection",
            if runs > 0 { ns / runs as f64 } else { 0.0 },
            per_conn
        );
    }
    println!("  all programs: {per_conn_total:.0} ns per connection");
    drop(stats);
}
