//! Running `zbridge record` in the record tests: the recorder as a child that is killed by its
//! pid even when the test fails, started once it says it is recording and stopped with SIGINT
//! as an operator would; and workload processes in the test's own cgroup.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use testkit::TestCgroup;

/// Kills a child by its pid and reaps it, also when the test fails.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `zbridge record`, its stderr read on a thread (so it never blocks on a full pipe).
pub struct Recorder {
    child: ChildGuard,
    /// The log up to and with the "recording to" line.
    log: String,
    rest_of_log: Option<JoinHandle<String>>,
}

impl Recorder {
    /// Spawns `cmd` (a `zbridge record` command) with its stderr piped, and returns once it
    /// says it is recording (subscribed and scanned); fails if it ends before that.
    pub fn start(cmd: &mut Command) -> Recorder {
        let mut child = ChildGuard(cmd.stderr(Stdio::piped()).spawn().unwrap());
        let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
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
        let rest_of_log = std::thread::spawn(move || {
            let mut rest = String::new();
            for line in stderr.lines().map_while(Result::ok) {
                rest.push_str(&line);
                rest.push('\n');
            }
            rest
        });
        Recorder {
            child,
            log,
            rest_of_log: Some(rest_of_log),
        }
    }

    /// Stops the recorder with SIGINT and waits for it; asserts that it succeeded and returns
    /// its whole log.
    pub fn stop(mut self) -> String {
        // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.0.id() as i32, libc::SIGINT);
        }
        let status = self.child.0.wait().unwrap();
        let rest = self.rest_of_log.take().unwrap().join().unwrap();
        let log = std::mem::take(&mut self.log) + &rest;
        assert!(status.success(), "record failed: {status}\n{log}");
        log
    }
}

/// A process in cgroup `path` of `cg` that waits on its stdin (`sh -c "read x"`): alive when
/// its exec is read, and it exits once its stdin is closed.
pub fn waiting_child_in(cg: &TestCgroup, path: &str) -> ChildGuard {
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "read x"]).stdin(Stdio::piped());
    // SAFETY: the hook only writes the cgroup.procs file.
    unsafe {
        cmd.pre_exec(cg.pre_exec_join(path));
    }
    ChildGuard(cmd.spawn().unwrap())
}
