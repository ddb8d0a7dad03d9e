//! Joining the host's cgroup namespace makes /proc's cgroup paths the host's again. (This file
//! holds one test only: it moves the whole test process into a cgroup of its own for a moment.)

use watcher::hostns::enter_cgroup_namespace_of;

fn cgroup_line(file: &str) -> String {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap()
        .to_string()
}

#[test]
fn a_thread_in_a_private_cgroup_namespace_gets_the_host_view_back() {
    if !testkit::require_root("a_thread_in_a_private_cgroup_namespace_gets_the_host_view_back") {
        return;
    }
    let cg = testkit::TestCgroup::new("hostns").unwrap();
    let home = cgroup_line("/proc/self/cgroup")["0::".len()..].to_string();
    let pid = std::process::id();
    cg.enter(&cg.path, pid).unwrap();
    // The namespace to go back to: this process's (the host's here). The agent names PID 1's,
    // which under hostPID is the host's init; this sandbox does not let us open PID 1's.
    let host_ns = format!("/proc/{pid}/ns/cgroup");
    // A thread in a cgroup namespace rooted at the test's cgroup sees its cgroup as "/", as an
    // agent in a container sees its own; joining the host's namespace gives the host's path.
    let target = host_ns.clone();
    let seen = std::thread::spawn(move || {
        // SAFETY: unsharing the cgroup namespace only affects this thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWCGROUP) }, 0);
        let inside = cgroup_line("/proc/thread-self/cgroup");
        let moved = enter_cgroup_namespace_of(&target);
        (inside, moved, cgroup_line("/proc/thread-self/cgroup"))
    })
    .join();
    // Back home before anything can fail: the cgroup guard kills what is left in it.
    cg.enter(&home, pid).unwrap();
    let (inside, moved, after) = seen.unwrap();
    assert_eq!(inside, "0::/");
    assert!(moved.expect("setns into the host's cgroup namespace"));
    assert_eq!(after, format!("0::{}", cg.path));
    // Already in the host's namespace: nothing to do.
    assert!(!enter_cgroup_namespace_of(&host_ns).expect("same namespace"));
}
