//! The live source against the real kernel (root): exec/exit of our own children with their
//! cgroup (facts from the exec tap and from /proc), loss and rescan, stop and unsubscribe,
//! facts of a process in its own netns.
//!
//! The proc connector hears the whole machine: every check filters by our children's pids or
//! by our own test cgroup.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::TestCgroup;
use watcher::connector::{decode, Connector, ConnectorConfig, KernelEvent, Message, Received};
use watcher::live::{monotonic_now_ns, LiveConfig, LiveSource, StopHandle};
use watcher::procfs::ProcReader;
use watcher::{CgroupId, EventSource, ProcEvent, Record, TimedRecord};

/// Kills a child by its pid and reaps it, also when the test fails.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops a source after a generous bound, so that a missing event fails the test instead of
/// hanging it (the bound is a safety net, not a measurement).
fn watchdog(stop: StopHandle, secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        stop.stop();
    });
}

/// Spawns `argv` so that it joins `cgroup` before exec.
fn spawn_in(cg: &TestCgroup, argv: &[&str], stdin: Stdio, stdout: Stdio) -> Child {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).stdin(stdin).stdout(stdout);
    // SAFETY: the hook only writes to a file (async-signal-safe enough: open/write/close).
    unsafe {
        cmd.pre_exec(cg.pre_exec_join(&cg.path));
    }
    cmd.spawn().expect("spawn child")
}

fn next(source: &mut LiveSource) -> TimedRecord {
    source
        .next_record()
        .expect("live source error")
        .expect("the source ended (watchdog): an expected event never came")
}

#[test]
fn live_exec_and_exit_of_a_child_in_its_cgroup() {
    if !testkit::require_root("live_exec_and_exit_of_a_child_in_its_cgroup") {
        return;
    }
    // By default exec facts leave out comm; `exec_comm` asks for it. The same facts with the
    // exec tap (the default) and from /proc.
    live_exec_and_exit(&LiveConfig::default(), None);
    let with_comm = LiveConfig {
        exec_comm: true,
        ..LiveConfig::default()
    };
    live_exec_and_exit(&with_comm, Some("sh"));
    for exec_comm in [false, true] {
        let from_proc = LiveConfig {
            exec_comm,
            exec_tap: false,
            ..LiveConfig::default()
        };
        live_exec_and_exit(&from_proc, exec_comm.then_some("sh"));
    }
}

fn live_exec_and_exit(config: &LiveConfig, want_comm: Option<&str>) {
    let cg = TestCgroup::new("live-exec").unwrap();
    let mut source = LiveSource::start(config).unwrap();
    watchdog(source.stop_handle(), 60);
    let first = next(&mut source);
    assert!(
        matches!(first.record, Record::Proc(ProcEvent::Scan { ref processes }) if !processes.is_empty()),
        "the first record is the initial scan"
    );

    // The child waits on its stdin, so it is surely alive when its exec is read.
    let mut child = ChildGuard(spawn_in(
        &cg,
        &["/bin/sh", "-c", "read x; exit 3"],
        Stdio::piped(),
        Stdio::null(),
    ));
    let pid = child.0.id();
    let mut stdin = child.0.stdin.take();

    let mut saw_fork = false;
    let mut exec_ts = None;
    loop {
        let rec = next(&mut source);
        match rec.record {
            Record::Proc(ProcEvent::Fork {
                child_pid,
                child_tgid,
                parent_tgid,
                ..
            }) if child_pid == pid => {
                assert_eq!(child_tgid, pid);
                assert_eq!(parent_tgid, std::process::id());
                saw_fork = true;
            }
            Record::Proc(ProcEvent::Exec {
                pid: p,
                tgid,
                facts,
            }) if tgid == pid => {
                assert_eq!(p, pid);
                let cgroup = facts
                    .cgroup
                    .expect("the child is alive: its cgroup is readable");
                assert_eq!(&*cgroup.path, cg.path.as_str());
                assert_eq!(cgroup.id, CgroupId(cg.id()));
                assert_eq!(facts.comm.as_deref(), want_comm);
                // The child shares this test's network namespace.
                let netns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
                assert_eq!(facts.netns, Some(netns));
                exec_ts = Some(rec.ts);
                // Let the child exit now.
                stdin.take();
            }
            Record::Proc(ProcEvent::Exit {
                pid: p,
                tgid,
                exit_code,
            }) if tgid == pid && p == pid => {
                assert!(exec_ts.is_some(), "exit before exec");
                assert!(rec.ts >= exec_ts.unwrap());
                // The kernel reports the wait status: exit code 3 << 8.
                assert_eq!(exit_code, 3 << 8);
                break;
            }
            _ => {}
        }
    }
    assert!(saw_fork, "the fork of the child was reported");
    let counters = source.counters().snapshot();
    assert!(counters.execs >= 1 && counters.exits >= 1 && counters.forks >= 1);
    assert_eq!(counters.malformed, 0);
    if config.exec_tap {
        assert!(source.exec_tap().is_some(), "the exec tap loads as root");
        assert!(counters.execs_from_tap >= 1, "{counters:?}");
    } else {
        assert!(source.exec_tap().is_none());
        assert_eq!(counters.execs_from_tap, 0);
        assert!(counters.execs_from_proc >= 1);
    }
}

/// The exec events of `pid` until `want` of them have come (a child that execs twice under
/// one pid gives two).
fn execs_of(source: &mut LiveSource, pid: u32, want: usize) -> Vec<watcher::ProcFacts> {
    let mut facts = Vec::new();
    while facts.len() < want {
        if let Record::Proc(ProcEvent::Exec { tgid, facts: f, .. }) = next(source).record {
            if tgid == pid {
                facts.push(f);
            }
        }
    }
    facts
}

/// Waits until `/proc/PID/comm` says `comm` (the child's second exec is done).
fn wait_comm(pid: u32, comm: &str) {
    for _ in 0..1000 {
        let now = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if now.trim_end() == comm {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("child {pid} never became {comm}");
}

#[test]
fn live_exec_facts_come_from_the_tap_at_exec_time() {
    if !testkit::require_root("live_exec_facts_come_from_the_tap_at_exec_time") {
        return;
    }
    let cg_a = TestCgroup::new("live-tap-a").unwrap();
    let cg_b = TestCgroup::new("live-tap-b").unwrap();
    let (a, b) = (CgroupId(cg_a.id()), CgroupId(cg_b.id()));
    let mut source = LiveSource::start(&LiveConfig::default()).unwrap();
    assert!(source.exec_tap().is_some(), "the exec tap loads as root");
    watchdog(source.stop_handle(), 60);
    next(&mut source); // the scan
    let host_netns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    let check = |facts: &watcher::ProcFacts, cg: &TestCgroup, id: CgroupId, what: &str| {
        let cgroup = facts
            .cgroup
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: no cgroup"));
        assert_eq!((&*cgroup.path, cgroup.id), (cg.path.as_str(), id), "{what}");
        assert_eq!(facts.netns, Some(host_netns), "{what}");
        assert_eq!(facts.comm, None, "{what}");
    };
    // A child started in A that waits, is moved into B by its parent (what container runtimes
    // do) and is then let go: it execs a second time, under the same pid, in B.
    let moved_into_b = || {
        let mut child = ChildGuard(spawn_in(
            &cg_a,
            &["/bin/sh", "-c", "read x; exec /bin/sleep 1000"],
            Stdio::piped(),
            Stdio::null(),
        ));
        cg_b.enter(&cg_b.path, child.0.id()).unwrap();
        child.0.stdin.take().unwrap().write_all(b"\n").unwrap();
        child
    };

    // 1. A child that joins A itself before its exec: A's path is read from /proc once.
    let first = ChildGuard(spawn_in(
        &cg_a,
        &["/bin/sh", "-c", "read x"],
        Stdio::piped(),
        Stdio::null(),
    ));
    let facts = execs_of(&mut source, first.0.id(), 1);
    check(&facts[0], &cg_a, a, "joined A before exec");

    // 2. Moved into B by its parent just before its second exec (what container runtimes
    // do), under the same pid: the first exec's event says A, the second's B. Both events
    // are read only after the move, so the first one's A comes from its tap record.
    let moved = moved_into_b();
    let facts = execs_of(&mut source, moved.0.id(), 2);
    check(&facts[0], &cg_a, a, "first exec, in A");
    check(&facts[1], &cg_b, b, "second exec, moved into B before it");

    // 3. The same, then moved back to A before any event is read: /proc says A, but the
    // second exec happened in B and its record says so. Each exec event took its own record.
    let twice = moved_into_b();
    let pid = twice.0.id();
    wait_comm(pid, "sleep");
    cg_a.enter(&cg_a.path, pid).unwrap();
    let facts = execs_of(&mut source, pid, 2);
    check(&facts[0], &cg_a, a, "first exec of the double exec");
    check(
        &facts[1],
        &cg_b,
        b,
        "second exec of the double exec, in B at the time",
    );

    let counters = source.counters().snapshot();
    assert!(counters.execs_from_tap >= 5, "{counters:?}");
}

#[test]
fn live_stop_ends_the_source() {
    if !testkit::require_root("live_stop_ends_the_source") {
        return;
    }
    let mut source = LiveSource::start(&LiveConfig::default()).unwrap();
    let stop = source.stop_handle();
    assert!(matches!(
        next(&mut source).record,
        Record::Proc(ProcEvent::Scan { .. })
    ));
    stop.stop();
    assert!(source.next_record().unwrap().is_none());
    assert!(source.next_record().unwrap().is_none(), "stays ended");
}

#[test]
fn connector_unsubscribe_stops_delivery() {
    if !testkit::require_root("connector_unsubscribe_stops_delivery") {
        return;
    }
    let mut connector = Connector::subscribe(&ConnectorConfig::default()).unwrap();
    if !connector.event_mask_active() {
        // Before 6.6 the kernel keeps multicasting to an unsubscribed socket while others
        // listen, so there is nothing to observe here.
        eprintln!("SKIPPED connector_unsubscribe_stops_delivery: kernel older than 6.6");
        return;
    }
    let exec_seen = |connector: &mut Connector, pid: u32| -> bool {
        loop {
            match connector.recv().unwrap() {
                Received::Timeout => return false,
                Received::Overrun => continue,
                Received::Datagram(d) => {
                    for m in decode(d) {
                        if let Ok(Message::Event {
                            event: KernelEvent::Exec { tgid, .. },
                            ..
                        }) = m
                        {
                            if tgid == pid {
                                return true;
                            }
                        }
                    }
                }
            }
        }
    };
    // Subscribed: our child's exec arrives (before a quiet receive timeout, as the socket
    // keeps hearing the machine; loop until found or quiet).
    let mut before = Command::new("/bin/true").spawn().unwrap();
    let before_pid = before.id();
    before.wait().unwrap();
    assert!(
        exec_seen(&mut connector, before_pid),
        "subscribed socket hears the exec"
    );

    connector.unsubscribe().unwrap();
    // Drain what was queued before the unsubscribe.
    while !matches!(connector.recv().unwrap(), Received::Timeout) {}
    let mut after = Command::new("/bin/true").spawn().unwrap();
    let after_pid = after.id();
    after.wait().unwrap();
    assert!(
        !exec_seen(&mut connector, after_pid),
        "an unsubscribed socket hears nothing"
    );
}

/// Our cgroup's live set, as a consumer of the records would keep it.
fn apply(live: &mut HashSet<u32>, cgroup: CgroupId, record: &Record) {
    let Record::Proc(event) = record else { return };
    match event {
        ProcEvent::Scan { processes } => {
            *live = processes
                .iter()
                .filter(|p| p.facts.cgroup.as_ref().map(|c| c.id) == Some(cgroup))
                .map(|p| p.pid)
                .collect();
        }
        ProcEvent::Exec { tgid, facts, .. } => {
            if facts.cgroup.as_ref().map(|c| c.id) == Some(cgroup) {
                live.insert(*tgid);
            }
        }
        ProcEvent::Fork {
            parent_tgid,
            child_tgid,
            ..
        } => {
            if child_tgid != parent_tgid && live.contains(parent_tgid) {
                live.insert(*child_tgid);
            }
        }
        ProcEvent::Exit { pid, tgid, .. } => {
            if pid == tgid {
                live.remove(tgid);
            }
        }
        ProcEvent::Lost => {}
    }
}

fn cgroup_procs(cg: &TestCgroup) -> HashSet<u32> {
    std::fs::read_to_string(cg.dir().join("cgroup.procs"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

#[test]
fn live_loss_is_followed_by_a_scan_and_converges() {
    if !testkit::require_root("live_loss_is_followed_by_a_scan_and_converges") {
        return;
    }
    let cg = TestCgroup::new("live-loss").unwrap();
    let cgroup = CgroupId(cg.id());
    let config = LiveConfig {
        connector: ConnectorConfig {
            recv_buffer_bytes: 32 * 1024,
            ..ConnectorConfig::default()
        },
        ..LiveConfig::default()
    };
    let mut source = LiveSource::start(&config).unwrap();
    watchdog(source.stop_handle(), 300);
    let mut live = HashSet::new();
    let first = next(&mut source);
    apply(&mut live, cgroup, &first.record);
    assert!(live.is_empty(), "our cgroup is new and empty");

    let sleeper = || {
        ChildGuard(spawn_in(
            &cg,
            &["/bin/sleep", "1000"],
            Stdio::null(),
            Stdio::null(),
        ))
    };
    // The reader is paused from here on: the socket buffer overflows.
    let mut killed = sleeper();
    let kept = [sleeper(), sleeper()];
    let mut late = None;
    for i in 0..3000 {
        let mut child = spawn_in(&cg, &["/bin/true"], Stdio::null(), Stdio::null());
        child.wait().unwrap();
        if i == 1000 {
            killed.0.kill().unwrap();
            killed.0.wait().unwrap();
        }
        if i == 2000 {
            late = Some(sleeper());
        }
    }
    let late = late.unwrap();
    let expected = cgroup_procs(&cg);
    let want: HashSet<u32> = [kept[0].0.id(), kept[1].0.id(), late.0.id()].into();
    assert_eq!(expected, want, "only the sleepers are left in the cgroup");

    // Everything of the burst happened before `end`; an exec after it gives the stream a
    // record stamped later, where the reading stops.
    let end = monotonic_now_ns();
    let mut marker = Command::new("/bin/true").spawn().unwrap();
    marker.wait().unwrap();

    let mut saw_lost = false;
    let mut scan_after_lost = None;
    loop {
        let rec = next(&mut source);
        match &rec.record {
            Record::Proc(ProcEvent::Lost) => saw_lost = true,
            Record::Proc(ProcEvent::Scan { processes }) if saw_lost => {
                scan_after_lost = Some(processes.iter().map(|p| p.pid).collect::<HashSet<_>>());
            }
            _ => {}
        }
        apply(&mut live, cgroup, &rec.record);
        if rec.ts >= end && (!saw_lost || scan_after_lost.is_some()) {
            break;
        }
    }
    assert!(saw_lost, "a 32 KiB buffer and a paused reader lose events");
    let scanned = scan_after_lost.expect("a scan follows the loss");
    for k in &kept {
        assert!(
            scanned.contains(&k.0.id()),
            "the rescan lists a sleeper alive all along"
        );
    }
    assert_eq!(
        live, expected,
        "after the rescan the live set is what /proc says"
    );
    assert!(source.counters().snapshot().lost >= 1);
}

#[test]
fn live_facts_of_a_process_in_its_own_netns() {
    if !testkit::require_root("live_facts_of_a_process_in_its_own_netns") {
        return;
    }
    let cg = TestCgroup::new("live-netns").unwrap();
    let script = "ip link set lo up && ip addr add 10.77.0.1/32 dev lo && \
                  ip -6 addr add fd77::1/128 dev lo nodad && echo ready && read x";
    let mut child = ChildGuard(spawn_in(
        &cg,
        &["/usr/bin/unshare", "--net", "/bin/sh", "-c", script],
        Stdio::piped(),
        Stdio::piped(),
    ));
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.0.id();
    let mut reader = ProcReader::new().unwrap();
    let facts = reader.read_facts(pid);
    let want: Vec<IpAddr> = vec!["10.77.0.1".parse().unwrap(), "fd77::1".parse().unwrap()];
    assert_eq!(facts.ips, want);
    let own_netns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(
        own_netns,
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "the child has its own netns"
    );
    assert!(facts.netns.is_some());
    assert_eq!(facts.cgroup.unwrap().id, CgroupId(cg.id()));
    // Cached: a second read gives the same, and a gone process gives nothing.
    assert_eq!(reader.read_facts(pid).ips, want);
    let _ = child.0.stdin.take().map(|mut s| s.write_all(b"\n"));
    child.0.wait().unwrap();
    assert_eq!(reader.read_facts(pid), Default::default());
}

#[test]
fn connector_subscribe_outside_host_netns_is_refused() {
    if !testkit::require_root("connector_subscribe_outside_host_netns_is_refused") {
        return;
    }
    // unshare(CLONE_NEWNET) moves only the calling thread, so a thread of our own can be in a
    // fresh network namespace that goes away with it.
    let result = std::thread::spawn(|| {
        // SAFETY: unshare has no memory preconditions; it affects this thread only.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        Connector::subscribe(&ConnectorConfig::default()).map(|_| ())
    })
    .join()
    .unwrap();
    let err = result.expect_err("the connector exists only in the host netns");
    assert!(
        matches!(err, watcher::connector::ConnectorError::NotHostNetns),
        "{err}"
    );
    assert!(err.to_string().contains("hostNetwork"), "{err}");
}
