//! Fixtures of the programmer's kernel tests: a private bpffs and a loader config on it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use programmer::{Loaded, LoaderConfig};
use testkit::{BpfFs, NetNs, TestCgroup};

/// A private bpffs (testkit's guard: unmounted, dropping every pin, and removed on drop).
pub fn bpffs(prefix: &str) -> BpfFs {
    BpfFs::new(prefix).expect("mount a private bpffs")
}

/// A loader config: the embedded object, pins on `fs`, programs on `cgroup`.
pub fn config(fs: &BpfFs, cgroup: &TestCgroup) -> LoaderConfig {
    LoaderConfig::new(fs.pin_dir(), cgroup.dir())
}

/// A test cgroup and a private bpffs, both named after `prefix`, with the object loaded and its
/// programs attached to the cgroup. Bound as `let (cg, fs, loaded) = ...`, they drop in reverse:
/// the loader, then the pins, then the cgroup.
pub fn attached(prefix: &str) -> (TestCgroup, BpfFs, Loaded) {
    let cg = TestCgroup::new(prefix).expect("make a test cgroup");
    let fs = bpffs(prefix);
    let loaded = Loaded::load_and_attach(config(&fs, &cg)).expect("load and attach");
    (cg, fs, loaded)
}

/// Runs bash in cgroup `path` opening a TCP connection to `addr:port` (bash's /dev/tcp).
pub fn connect_from(cgroup: &TestCgroup, path: &str, addr: &str, port: u16) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!("exec 3<>/dev/tcp/{addr}/{port}"));
    // SAFETY: the hook only writes to a file (joining the cgroup) before exec.
    unsafe {
        cmd.pre_exec(cgroup.pre_exec_join(path));
    }
    cmd.output().expect("run bash")
}

/// One long-lived bash, a single thread, in cgroup `path` and namespace `ns`, that opens a TCP
/// connection each time it is asked: for tests of what the programs keep per thread. Killed
/// (by its PID) and reaped on drop, a failed assertion included.
pub struct ConnectShell {
    child: Child,
    to_shell: ChildStdin,
    from_shell: BufReader<ChildStdout>,
}

impl ConnectShell {
    pub fn start(ns: &NetNs, cgroup: &TestCgroup, path: &str) -> ConnectShell {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(
                "while read -r addr port; do \
                   if true 2>/dev/null 3<>/dev/tcp/$addr/$port; then echo ok; else echo fail; fi; \
                 done",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        ns.place(&mut cmd, cgroup, path).expect("place the shell");
        let mut child = cmd.spawn().expect("start bash");
        let to_shell = child.stdin.take().expect("stdin");
        let from_shell = BufReader::new(child.stdout.take().expect("stdout"));
        ConnectShell {
            child,
            to_shell,
            from_shell,
        }
    }

    /// The shell's process id (its only thread's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects to `addr:port` and closes; true when the connect succeeded.
    pub fn connect(&mut self, addr: &str, port: u16) -> bool {
        writeln!(self.to_shell, "{addr} {port}").expect("write to the shell");
        let mut line = String::new();
        self.from_shell
            .read_line(&mut line)
            .expect("read from the shell");
        match line.trim() {
            "ok" => true,
            "fail" => false,
            other => panic!("the shell said {other:?}"),
        }
    }
}

impl Drop for ConnectShell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
