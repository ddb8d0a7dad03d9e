//! Fixtures of the programmer's kernel tests: a private bpffs and a loader config on it.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use programmer::LoaderConfig;
use testkit::TestCgroup;

/// A bpffs mounted on a fresh temp directory; unmounted (dropping every pin, so detaching
/// every pinned link) and removed on drop.
pub struct PrivateBpfFs {
    pub dir: PathBuf,
}

impl PrivateBpfFs {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(testkit::unique_name(prefix));
        std::fs::create_dir(&dir).expect("make bpffs mount point");
        let target = CString::new(dir.as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated strings, no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            panic!("mount -t bpf on {}: {err}", dir.display());
        }
        PrivateBpfFs { dir }
    }

    /// The pin directory the loader gets (a subdirectory, as /sys/fs/bpf/zbridge would be).
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.join("zbridge")
    }
}

impl Drop for PrivateBpfFs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.as_os_str().as_bytes()).expect("path");
        // SAFETY: valid path.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "cannot unmount {}: {}",
                self.dir.display(),
                std::io::Error::last_os_error()
            );
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A loader config: the embedded object, pins on `fs`, programs on `cgroup`.
pub fn config(fs: &PrivateBpfFs, cgroup: &TestCgroup) -> LoaderConfig {
    LoaderConfig::new(fs.pin_dir(), cgroup.dir())
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
