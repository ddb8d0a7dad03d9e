//! What the root-run benches share: their knobs from the environment and percentiles.
#![allow(dead_code)] // each bench uses its own part

/// How a root bench starts: `None` when it must not run (`cargo test --benches` asks for its
/// list of tests, of which it has none; or not root: said on stderr by
/// `testkit::require_root`), else whether it runs as a benchmark (`cargo bench` passes
/// `--bench`) rather than as the small check `cargo test --benches` runs.
pub fn root_bench(name: &str) -> Option<bool> {
    if std::env::args().any(|a| a == "--list") {
        return None;
    }
    if !testkit::require_root(name) {
        return None;
    }
    Some(std::env::args().any(|a| a == "--bench"))
}

/// The environment variable `name` as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank; the default value when empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The maps the agent pinned under `pin_dir`, once it has: waits up to 30 s for a starting
/// agent to load its programs.
pub fn pinned_maps(pin_dir: &std::path::Path) -> programmer::KernelMaps {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(maps) = programmer::KernelMaps::open(pin_dir) {
            return maps;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not pin its maps under {}",
            pin_dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
