//! `zbridge record` on the live host (root), read back through the recording reader: the
//! children this test spawns into its own cgroup appear with their pids and the cgroup's id.

mod record_support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use record_support::{waiting_child_in, Recorder};
use testkit::TestCgroup;
use watcher::recording::RecordingReader;
use watcher::{CgroupId, ProcEvent, Record};

/// Whether the (plain) recording already holds the exit record of `pid`.
fn holds_exit_of(path: &Path, pid: u32) -> bool {
    let needle = format!("\"type\":\"exit\",\"pid\":{pid},\"tgid\":{pid},");
    std::fs::read_to_string(path).is_ok_and(|text| text.contains(&needle))
}

#[test]
fn record_roundtrip_of_children_in_a_test_cgroup() {
    if !testkit::require_root("record_roundtrip_of_children_in_a_test_cgroup") {
        return;
    }
    let cg = TestCgroup::new("record-rt").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rt.events.jsonl");

    // Subscribed and scanned once it says it is recording.
    let recorder = Recorder::start(
        Command::new(env!("CARGO_BIN_EXE_zbridge"))
            .args([
                "record",
                "--standalone",
                "--node",
                "rt-node",
                "--duration",
                "10m",
                "--output",
            ])
            .arg(&file),
    );

    // Children that wait on stdin: alive when their exec is read, then let go together.
    let mut children = Vec::new();
    for _ in 0..20 {
        children.push(waiting_child_in(&cg, &cg.path));
    }
    let pids: Vec<u32> = children.iter().map(|c| c.0.id()).collect();
    for child in &mut children {
        drop(child.0.stdin.take());
        child.0.wait().unwrap();
    }

    // Stop the recorder once the file (flushed every second while records come) holds the
    // last exit; short processes outside our cgroup keep records coming meanwhile. The bound
    // only turns a hang into a failure.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !holds_exit_of(&file, *pids.last().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "the recording never got the exits"
        );
        Command::new("/bin/true").status().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = recorder.stop();
    assert!(log.contains("recorded "), "{log}");

    let mut reader = RecordingReader::open(&file).unwrap();
    assert_eq!(reader.header().node, "rt-node");
    assert!(reader.header().cgroup_root.is_some());
    let cgroup_id = CgroupId(cg.id());
    #[derive(Default, Debug)]
    struct Seen {
        fork: bool,
        exec: bool,
        exit: bool,
    }
    let mut seen: HashMap<u32, Seen> = pids.iter().map(|p| (*p, Seen::default())).collect();
    let mut first = true;
    let mut last_ts = 0;
    while let Some(rec) = reader.read_record().unwrap() {
        assert!(rec.ts >= last_ts);
        last_ts = rec.ts;
        let Record::Proc(event) = rec.record else {
            panic!("record writes no kube records");
        };
        if first {
            assert!(matches!(event, ProcEvent::Scan { .. }), "first is the scan");
            first = false;
        }
        match event {
            ProcEvent::Fork { child_pid, .. } => {
                if let Some(s) = seen.get_mut(&child_pid) {
                    s.fork = true;
                }
            }
            ProcEvent::Exec { pid, tgid, facts } => {
                if let Some(s) = seen.get_mut(&tgid) {
                    assert_eq!(pid, tgid);
                    let cgroup = facts.cgroup.expect("alive child: cgroup read");
                    assert_eq!(&*cgroup.path, cg.path.as_str());
                    assert_eq!(cgroup.id, cgroup_id);
                    s.exec = true;
                }
            }
            ProcEvent::Exit { pid, tgid, .. } => {
                if let Some(s) = seen.get_mut(&tgid) {
                    assert_eq!(pid, tgid);
                    assert!(s.exec, "exit of {pid} before its exec");
                    s.exit = true;
                }
            }
            ProcEvent::Lost => panic!("an 8 MiB buffer lost events: {log}"),
            ProcEvent::Scan { .. } => {}
        }
    }
    for (pid, s) in &seen {
        assert!(s.fork && s.exec && s.exit, "child {pid}: {s:?}");
    }
}
