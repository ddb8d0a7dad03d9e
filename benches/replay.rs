//! Replay throughput: `zbridge replay` (release build) on generated recordings
//! (testkit::testgen) of two node shapes, 1,000,000 and 2,000,000 records each: process-heavy
//! (500 pods, 20,000 processes, few Kubernetes changes) and kube-heavy (3,000 pods, 20,000
//! processes, pod records about 15% and namespace changes about 2% of the records).
//! Prints records per second (median of 3 runs, wall clock, the whole process: reading,
//! parsing, resolving, programming the in-memory maps, printing) and the peak memory of the
//! replay process for each size: it should stay flat as the recording grows.
//!
//! Run: `cargo bench --bench replay` (ZBRIDGE_BENCH_RECORDS=N,M to choose the sizes,
//! ZBRIDGE_BENCH_KEEP=DIR to keep the generated recordings).

use std::io::{BufWriter, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use testkit::testgen::{GenConfig, Generator};

/// A node shape: its generator configuration for a number of records.
type Shape = fn(u64) -> GenConfig;

fn sizes() -> Vec<u64> {
    std::env::var("ZBRIDGE_BENCH_RECORDS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000_000, 2_000_000])
}

/// Runs one replay; returns (seconds, peak RSS in KiB).
fn run_once(path: &std::path::Path) -> (f64, i64) {
    let start = Instant::now();
    // The child is reaped by wait4 below (for its own peak RSS), which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_zbridge"))
        .args(["--log-level", "warn", "replay"])
        .arg(path)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn zbridge replay");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; `status` and `usage` are valid for writes. wait4 gives
    // this child's own peak RSS (RUSAGE_CHILDREN would mix in earlier runs).
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "replay failed: {status}"
    );
    (secs, usage.ru_maxrss)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it with no such flag: then
    // only check that it works on a small recording.
    let benching = std::env::args().any(|a| a == "--bench");
    let sizes = if benching { sizes() } else { vec![20_000] };
    let dir = tempfile::tempdir().expect("temp dir");
    let shapes: [(&str, Shape); 2] = [
        ("process-heavy", GenConfig::bench),
        ("kube-heavy", GenConfig::kube_heavy),
    ];
    for (shape, config) in shapes {
        for &records in &sizes {
            let path = dir
                .path()
                .join(format!("bench-{shape}-{records}.events.jsonl"));
            let config = config(records);
            let (pods, processes) = (config.pods, config.processes);
            let mut generator = Generator::new(config);
            let mut out = BufWriter::new(std::fs::File::create(&path).expect("create recording"));
            let written = generator.write_to(&mut out).expect("write recording");
            out.flush().expect("flush recording");
            drop(out);
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let runs = if benching { 3 } else { 1 };
            let mut results: Vec<(f64, i64)> = (0..runs).map(|_| run_once(&path)).collect();
            results.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (secs, _) = results[results.len() / 2];
            let peak = results.iter().map(|r| r.1).max().unwrap_or(0);
            println!(
            "replay/{shape}/{written} records ({:.0} MiB, {pods} pods, {processes} processes): {:.3} s median of {runs}, {:.2} M records/s, peak RSS {:.1} MiB",
            bytes as f64 / (1024.0 * 1024.0),
            secs,
            written as f64 / secs / 1e6,
            peak as f64 / 1024.0
        );
            // ZBRIDGE_BENCH_KEEP=DIR keeps the recording (to profile `zbridge replay` on it).
            if let Ok(keep) = std::env::var("ZBRIDGE_BENCH_KEEP") {
                let kept = std::path::Path::new(&keep).join(path.file_name().expect("a file name"));
                if let Err(err) = std::fs::copy(&path, &kept) {
                    panic!("keeping the recording at {}: {err}", kept.display());
                }
                println!("  kept at {}", kept.display());
            }
            std::fs::remove_file(&path).ok();
        }
    }
}
