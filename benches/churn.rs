//! Churn soak (root, real kernel, the real agent; cgroups and namespaces of its own, removed
//! at the end): standalone subtrees made, run a process, and removed, `CYCLES` times over
//! `SUBTREES` configured paths (each path made again and again, a new cgroup id each time).
//! At the end half the paths are left made with a process in each: the agent's map must hold
//! exactly their entries (plus ztunnel's, the exempt cgroup's and the mesh's pod's), and its
//! memory must not have grown with the cycles. Prints the cycle rate, the agent's RSS at the
//! start and the end, and whether the map matched.
//!
//! `cargo bench --bench churn` (env: `CYCLES`, `SUBTREES`).

mod common;
use common::{env_or, pinned_maps, root_bench};

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use programmer::MapBackend;
use testkit::mesh::{Mesh, ZTUNNEL4};
use testkit::ztunnel::Helper;
use testkit::BpfFs;

/// The agent's resident memory (VmRSS, KiB).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let Some(benching) = root_bench("benches/churn") else {
        return;
    };
    let cycles = env_or("CYCLES", if benching { 20_000 } else { 200 });
    let subtrees = env_or("SUBTREES", 100) as usize;

    let mesh = Mesh::new("bench-churn").expect("mesh");
    let bpffs = BpfFs::new("bench-churn").expect("bpffs");
    let dir = tempfile::tempdir().expect("temp dir");
    let parent = mesh.cgroup.child("attach/churn").expect("parent");
    let paths: Vec<String> = (0..subtrees).map(|i| format!("{parent}/s{i}")).collect();
    let mut extra = String::new();
    for (i, path) in paths.iter().enumerate() {
        extra.push_str(&format!(
            "  - name: churn/s{i}\n    cgroup: {path}\n    address: 10.98.{}.{}\n    mode: ambient\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let workloads = dir.path().join("workloads.yaml");
    std::fs::write(&workloads, mesh.workloads(&[ZTUNNEL4], &extra)).expect("workloads");
    let mut agent = mesh
        .spawn_standalone_agent(
            std::path::Path::new(env!("CARGO_BIN_EXE_zbridge")),
            &bpffs.pin_dir(),
            &workloads,
            &dir.path().join("agent.log"),
            &[],
        )
        .expect("spawn zbridge");
    let maps = pinned_maps(&bpffs.pin_dir());
    let entries = || -> BTreeSet<u64> {
        maps.cgroup_entries()
            .map(|e| e.into_iter().map(|(id, _)| id.0).collect())
            .unwrap_or_default()
    };
    // Settled: the entries of ztunnel, the exempt cgroup and the mesh's own pod (its subtree
    // exists from the start).
    let fixed: BTreeSet<u64> = [
        mesh.id(&mesh.ztunnel),
        mesh.id(&mesh.exempt),
        mesh.id(&mesh.app),
    ]
    .into();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fixed.is_subset(&entries()) {
        assert!(Instant::now() < deadline, "the agent did not settle");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_start = rss_kib(agent.id());

    let started = Instant::now();
    for cycle in 0..cycles {
        let path = &paths[cycle as usize % subtrees];
        let dir = mesh.cgroup.dir_of(path);
        std::fs::create_dir(&dir).expect("mkdir");
        // A process runs in it and exits.
        let mut proc = Command::new("/bin/true");
        // SAFETY: the hook only writes to cgroup.procs.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(
                &mut proc,
                mesh.cgroup.pre_exec_join(path),
            );
        }
        let status = proc.status().expect("run a process in the subtree");
        assert!(status.success());
        // An exited process may linger in the cgroup for a moment.
        let mut tries = 0;
        while let Err(e) = std::fs::remove_dir(&dir) {
            tries += 1;
            assert!(tries < 1000, "rmdir {}: {e}", dir.display());
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let secs = started.elapsed().as_secs_f64();

    // Half the paths made again, each with a process that stays.
    let mut live = Vec::new();
    let mut want = fixed.clone();
    for path in paths.iter().step_by(2) {
        std::fs::create_dir(mesh.cgroup.dir_of(path)).expect("mkdir");
        want.insert(mesh.id(path));
        live.push(
            Helper::spawn(&mesh.pod_ns, &mesh.cgroup, path, &["sleep".to_string()])
                .expect("sleeper"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = entries();
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        got = entries();
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_end = rss_kib(agent.id());
    println!(
        "churn: {cycles} cycles (mkdir, a process, rmdir) over {subtrees} paths in {secs:.1} s ({:.0} cycles/s); agent RSS {:.1} MiB at the start, {:.1} MiB at the end",
        cycles as f64 / secs,
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    println!(
        "churn: map entries {} (want {}: {} live subtrees, ztunnel, exempt, the mesh's pod): {}",
        got.len(),
        want.len(),
        want.len() - fixed.len(),
        if got == want {
            "exactly the live ones"
        } else {
            "MISMATCH"
        }
    );
    drop(live);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(got, want, "the map does not hold exactly the live subtrees");
}
