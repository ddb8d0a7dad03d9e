//! Fixtures of the programmer's kernel tests: a private bpffs and a loader config on it.
#![allow(dead_code)]

use std::process::{Command, Output};

use programmer::{Loaded, LoaderConfig};
use testkit::{BpfFs, TestCgroup};

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
