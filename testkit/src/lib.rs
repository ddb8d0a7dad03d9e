//! Fixtures for zbridge's privileged tests, and random recordings for differential tests and
//! benchmarks ([`testgen`]).
//!
//! Every fixture is a guard that removes what it made when dropped, also when the test fails.
//! Names are unique per test and process, so tests run in parallel on a shared machine.

pub mod apiserver;
pub mod bpffs;
pub mod cgroup;
pub mod http;
pub mod mesh;
pub mod netns;
pub mod objects;
pub mod source;
pub mod testgen;
pub mod workloads_text;
pub mod zds_ztunnel;
pub mod ztunnel;

pub use apiserver::FakeApiServer;
pub use bpffs::BpfFs;
pub use cgroup::TestCgroup;
pub use mesh::Mesh;
pub use netns::NetNs;
pub use zds_ztunnel::{InPodOptions, InPodZtunnel, ZdsEvent};
pub use ztunnel::FakeZtunnel;

/// Whether a privileged test may run. Not root: prints why the test is skipped and returns
/// `false`; under `CI=true` a skip is a failure (CI is root and must run every test).
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root, and CI=true: a skipped root test is a failure in CI");
    }
    eprintln!("SKIPPED {test}: needs root (run the tests as root to include it)");
    false
}

/// A name unique to this process and call, with a prefix saying which test made it.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "zbt-{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `cond` every 20 ms until it holds; panics once `deadline` has passed, saying `what`,
/// with `context()` (a hang guard, not a timing assertion).
pub fn wait_until(
    what: &str,
    deadline: std::time::Duration,
    context: impl Fn() -> String,
    cond: impl Fn() -> bool,
) {
    let deadline = std::time::Instant::now() + deadline;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
