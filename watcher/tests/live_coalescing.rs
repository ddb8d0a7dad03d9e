//! Receive coalescing against the real kernel (root): a burst of short children arrives
//! complete while the reader sleeps coalescing windows, and a stop request is honoured within
//! 0.5 s while it does. (Loss and rescan with coalescing on, the default, are in
//! `live_source.rs`.)
//!
//! The proc connector hears the whole machine: the checks filter by our children's pids.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use testkit::TestCgroup;
use watcher::connector::{ConnectorConfig, ReceiveStats, MAX_COALESCE_WINDOW};
use watcher::live::{LiveConfig, LiveSource, StopHandle};
use watcher::{CgroupId, EventSource, ProcEvent, Record};

/// Stops a source after a generous bound, so that a missing event fails the test instead of
/// hanging it (the bound is a safety net, not a measurement).
fn watchdog(stop: StopHandle, secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        stop.stop();
    });
}

fn coalescing(window: Duration) -> LiveConfig {
    LiveConfig {
        connector: ConnectorConfig {
            coalesce_window: window,
            ..ConnectorConfig::default()
        },
        ..LiveConfig::default()
    }
}

/// Starts `/bin/true` in `cg`, one after the other, `count` times (or until `stop`); returns
/// the children's pids. Each child is reaped before the next starts.
fn spawn_burst(
    cg: &TestCgroup,
    count: Option<usize>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<u32>> {
    let join = cg.joiner(&cg.path);
    std::thread::spawn(move || {
        let mut pids = Vec::new();
        while count.is_none_or(|n| pids.len() < n) && !stop.load(Ordering::Relaxed) {
            let mut cmd = Command::new("/bin/true");
            cmd.stdin(Stdio::null()).stdout(Stdio::null());
            join.apply(&mut cmd);
            let mut child = cmd.spawn().expect("spawn /bin/true");
            pids.push(child.id());
            child.wait().expect("wait /bin/true");
        }
        pids
    })
}

#[test]
fn live_burst_arrives_complete_while_coalescing() {
    if !testkit::require_root("live_burst_arrives_complete_while_coalescing") {
        return;
    }
    let cg = TestCgroup::new("live-coalesce").unwrap();
    let cgroup = CgroupId(cg.id());
    let mut source =
        LiveSource::start(&coalescing(ConnectorConfig::default().coalesce_window)).unwrap();
    watchdog(source.stop_handle(), 120);
    assert!(matches!(
        source.next_record().unwrap().unwrap().record,
        Record::Proc(ProcEvent::Scan { .. })
    ));

    // The children start while the source reads: events arrive during its windows.
    const CHILDREN: usize = 400;
    let mut spawner = Some(spawn_burst(
        &cg,
        Some(CHILDREN),
        Arc::new(AtomicBool::new(false)),
    ));
    let (mut forks, mut execs, mut exits) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut in_our_cgroup = 0;
    let mut children: Option<HashSet<u32>> = None;
    loop {
        if spawner.as_ref().is_some_and(|s| s.is_finished()) {
            let pids = spawner.take().unwrap().join().unwrap();
            children = Some(pids.into_iter().collect());
        }
        if let Some(children) = &children {
            if children.is_subset(&exits) {
                break;
            }
        }
        let record = source
            .next_record()
            .expect("live source error")
            .expect("the source ended (watchdog): events of the burst never came");
        match record.record {
            Record::Proc(ProcEvent::Fork { child_tgid, .. }) => {
                forks.insert(child_tgid);
            }
            Record::Proc(ProcEvent::Exec { tgid, facts, .. }) => {
                execs.insert(tgid);
                if facts.cgroup.map(|c| c.id) == Some(cgroup) {
                    in_our_cgroup += 1;
                }
            }
            Record::Proc(ProcEvent::Exit { pid, tgid, .. }) if pid == tgid => {
                exits.insert(tgid);
            }
            Record::Proc(ProcEvent::Lost) => panic!("events lost in a burst of {CHILDREN}"),
            _ => {}
        }
    }
    let children = children.unwrap();
    assert_eq!(children.len(), CHILDREN);
    let missing = |seen: &HashSet<u32>| children.difference(seen).count();
    assert_eq!(missing(&forks), 0, "forks missing");
    assert_eq!(missing(&execs), 0, "execs missing");
    assert_eq!(missing(&exits), 0, "exits missing");
    assert!(
        in_our_cgroup > 0,
        "exec facts name the test's cgroup (a child already gone when its first exec is \
         read may have none)"
    );
    let stats = source.receive_stats();
    let counters = source.counters().snapshot();
    eprintln!("burst of {CHILDREN}: {stats:?}");
    assert_eq!(counters.lost, 0, "{counters:?}");
    assert_eq!(counters.malformed, 0, "{counters:?}");
    assert_eq!(stats.truncated, 0, "{stats:?}");
    // 1,200 events from back-to-back children arrive far faster than one per millisecond: the
    // reader slept windows and read several datagrams at a time.
    assert!(
        stats.windows > 0,
        "no coalescing window was slept: {stats:?}"
    );
    assert!(
        stats.datagrams > stats.reads,
        "no read took a batch: {stats:?}"
    );
}

/// A stop request while the reader sleeps coalescing windows under a storm ends the source
/// within 0.5 s, with the longest window allowed and with the default one.
#[test]
fn live_stop_is_honoured_within_half_a_second_while_coalescing() {
    if !testkit::require_root("live_stop_is_honoured_within_half_a_second_while_coalescing") {
        return;
    }
    let cg = TestCgroup::new("live-coalesce-stop").unwrap();
    for window in [
        MAX_COALESCE_WINDOW,
        ConnectorConfig::default().coalesce_window,
    ] {
        let mut source = LiveSource::start(&coalescing(window)).unwrap();
        watchdog(source.stop_handle(), 120);
        let stop_spawning = Arc::new(AtomicBool::new(false));
        let spawner = spawn_burst(&cg, None, Arc::clone(&stop_spawning));
        // Read until the source is coalescing, then let another thread ask it to stop while
        // it is inside a receive.
        while source.receive_stats().windows < 3 {
            source
                .next_record()
                .expect("live source error")
                .expect("the source ended (watchdog) before it coalesced");
        }
        let (stopped_at, stop_time) = mpsc::channel();
        let stop = source.stop_handle();
        std::thread::spawn(move || {
            // Somewhere inside a window (or a receive) of the reader, which keeps reading.
            std::thread::sleep(Duration::from_millis(37));
            stop.stop();
            stopped_at.send(Instant::now()).unwrap();
        });
        while source.next_record().expect("live source error").is_some() {}
        let ended = Instant::now();
        let asked = stop_time.recv().unwrap();
        stop_spawning.store(true, Ordering::Relaxed);
        spawner.join().unwrap();
        let took = ended.saturating_duration_since(asked);
        eprintln!(
            "window {window:?}: stopped in {took:?} ({:?})",
            source.receive_stats()
        );
        assert!(
            took < Duration::from_millis(500),
            "window {window:?}: the stop took {took:?}"
        );
        assert_eq!(source.counters().snapshot().lost, 0);
    }
}

/// During a storm, the first exec in a cgroup the exec tap has not seen rings its doorbell and
/// ends the reader's window: a new pod's first process is not held back for it. The window is
/// the longest allowed, so the reader spends nearly all its time in windows; an exec that
/// comes while it reads instead needs no doorbell, and one that rings between a read and the
/// next window skips that window (not what this test is after), hence a few tries (each in a
/// new cgroup) until a ring ends a window that was being slept.
#[test]
fn live_first_exec_in_a_new_cgroup_ends_the_window() {
    if !testkit::require_root("live_first_exec_in_a_new_cgroup_ends_the_window") {
        return;
    }
    let cg = TestCgroup::new("live-coalesce-bell").unwrap();
    let storm = cg.child("storm").unwrap();
    let mut source = LiveSource::start(&coalescing(MAX_COALESCE_WINDOW)).unwrap();
    assert!(source.exec_tap().is_some(), "the exec tap loads as root");
    watchdog(source.stop_handle(), 120);
    let stop_spawning = Arc::new(AtomicBool::new(false));
    let spawner = spawn_burst_in(&cg, &storm, Arc::clone(&stop_spawning));
    while source.receive_stats().windows < 3 {
        source
            .next_record()
            .expect("live source error")
            .expect("the source ended (watchdog) before it coalesced");
    }
    let mut rung = ReceiveStats::default();
    for attempt in 0..8 {
        let new = cg.child(&format!("new{attempt}")).unwrap();
        let new_id = CgroupId(cg.id_of(&new).unwrap());
        let before = source.receive_stats();
        // Started by another thread while this one is inside a receive, most likely a window.
        // It lives on, so that its cgroup can be read when its exec is (a process gone by
        // then has no facts).
        let join = cg.joiner(&new);
        let first = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let mut cmd = Command::new("/bin/sleep");
            cmd.arg("60").stdin(Stdio::null()).stdout(Stdio::null());
            join.apply(&mut cmd);
            cmd.spawn().expect("start /bin/sleep in the new cgroup")
        });
        loop {
            let record = source
                .next_record()
                .expect("live source error")
                .expect("the source ended (watchdog): the new cgroup's exec never came");
            if let Record::Proc(ProcEvent::Exec { facts, .. }) = record.record {
                if facts.cgroup.is_some_and(|c| c.id == new_id) {
                    break;
                }
            }
        }
        let mut first = first.join().unwrap();
        let _ = first.kill();
        let _ = first.wait();
        rung = source.receive_stats().since(&before);
        if rung.doorbell_rings > rung.doorbell_skips {
            break;
        }
    }
    stop_spawning.store(true, Ordering::Relaxed);
    spawner.join().unwrap();
    eprintln!("storm with a new cgroup's exec: {rung:?}");
    assert!(
        rung.doorbell_rings > rung.doorbell_skips,
        "no window being slept was ended by the doorbell in 8 tries: {rung:?}"
    );
    // The counters an operator sees say so too (as of the source's last receive).
    assert!(source.counters().snapshot().windows_ended_by_doorbell > 0);
}

/// Starts `/bin/true` in `path` below `cg`, one after the other, until `stop`.
fn spawn_burst_in(cg: &TestCgroup, path: &str, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let join = cg.joiner(path);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let mut cmd = Command::new("/bin/true");
            cmd.stdin(Stdio::null()).stdout(Stdio::null());
            join.apply(&mut cmd);
            cmd.status().expect("run /bin/true");
        }
    })
}
