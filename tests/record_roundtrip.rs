//! `zbridge record` on the live host (root), read back through the recording reader: the
//! children this test spawns into its own cgroup appear with their pids and the cgroup's id.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::TestCgroup;
use watcher::recording::RecordingReader;
use watcher::{CgroupId, ProcEvent, Record};

/// Kills a child by its pid and reaps it, also when the test fails.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

    let mut recorder = ChildGuard(
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
            .arg(&file)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Subscribed and scanned once it says it is recording.
    let mut stderr = BufReader::new(recorder.0.stderr.take().unwrap());
    let mut log = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "record ended early: {log}"
        );
        log.push_str(&line);
        if line.contains("recording to") {
            break;
        }
    }
    // Keep draining the log so the recorder never blocks on a full pipe.
    let log_thread = std::thread::spawn(move || {
        let mut rest = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });

    // Children that wait on stdin: alive when their exec is read, then let go together.
    let mut children = Vec::new();
    for _ in 0..20 {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "read x"]).stdin(Stdio::piped());
        // SAFETY: the hook only writes the cgroup.procs file.
        unsafe {
            cmd.pre_exec(cg.pre_exec_join(&cg.path));
        }
        children.push(ChildGuard(cmd.spawn().unwrap()));
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
    // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
    unsafe {
        libc::kill(recorder.0.id() as i32, libc::SIGINT);
    }
    let status = recorder.0.wait().unwrap();
    let log = log + &log_thread.join().unwrap();
    assert!(status.success(), "record failed: {status}\n{log}");
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
                    assert_eq!(cgroup.path, cg.path);
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
