//! A pod's network namespace, opened from one of its live processes so that ztunnel can be
//! handed it.
//!
//! The process is found in the pod's cgroup (`cgroup.procs` of the pod-level cgroup and the
//! container cgroups below it) and opened through its `/proc/PID` directory: the directory's
//! descriptor pins that one process, so `ns/net` and `cgroup` read through it belong to the
//! same process even if the PID is reused meanwhile (reads through a dead process's directory
//! fail). Only a namespace whose process is, after the namespace was opened, still in the
//! pod's cgroup is returned: a reused PID can never hand ztunnel another pod's namespace.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How deep below the pod's cgroup processes are looked for (pod → container is one level;
/// systemd-style or nested runtimes add one or two).
const MAX_DEPTH: usize = 4;

/// Why no namespace was opened.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cgroup {cgroup}: no live process in it or below it")]
    NoProcess { cgroup: String },
    #[error("cgroup {cgroup}: reading {path}: {error}")]
    Read {
        cgroup: String,
        path: PathBuf,
        error: io::Error,
    },
}

/// Where processes and cgroups are read.
#[derive(Debug, Clone)]
pub struct Roots {
    /// Usually `/proc`.
    pub proc: PathBuf,
    /// The cgroup2 mount, usually `/sys/fs/cgroup`.
    pub cgroup: PathBuf,
}

/// The network namespace of a live process of `cgroup` (a path relative to the cgroup2
/// root, as `/proc/PID/cgroup` gives it), and that process's id.
pub fn open_pod_netns(roots: &Roots, cgroup: &str) -> Result<(OwnedFd, i32), NetnsError> {
    let dir = roots.cgroup.join(cgroup.trim_start_matches('/'));
    let mut pending = vec![(dir, 0usize)];
    let mut last_error = None;
    while let Some((dir, depth)) = pending.pop() {
        let procs = dir.join("cgroup.procs");
        match std::fs::read_to_string(&procs) {
            Ok(text) => {
                for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    if let Some(fd) = open_checked(&roots.proc, pid, cgroup) {
                        return Ok((fd, pid));
                    }
                }
            }
            Err(e) if depth == 0 => {
                return Err(NetnsError::Read {
                    cgroup: cgroup.to_string(),
                    path: procs,
                    error: e,
                })
            }
            // A container cgroup removed while we walk: its processes are gone anyway.
            Err(e) => last_error = Some(e),
        }
        if depth < MAX_DEPTH {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        pending.push((entry.path(), depth + 1));
                    }
                }
            }
        }
    }
    if let Some(e) = last_error {
        log::debug!("cgroup {cgroup}: a child cgroup vanished while looking for a process: {e}");
    }
    Err(NetnsError::NoProcess {
        cgroup: cgroup.to_string(),
    })
}

/// `/proc/PID/ns/net`, if the process still lives in `cgroup` (or below it) once it is open.
fn open_checked(proc_root: &Path, pid: i32, cgroup: &str) -> Option<OwnedFd> {
    let dir = open_at(None, &proc_root.join(pid.to_string()), libc::O_DIRECTORY)?;
    let netns = open_at(Some(&dir), Path::new("ns/net"), 0)?;
    let cg = open_at(Some(&dir), Path::new("cgroup"), 0)?;
    let mut text = String::new();
    std::fs::File::from(cg).read_to_string(&mut text).ok()?;
    let path = watcher::procfs::cgroup_v2_path(&text)?;
    if path == cgroup || path.strip_prefix(cgroup)?.starts_with('/') {
        Some(netns)
    } else {
        log::debug!("pid {pid} is in {path}, no longer in {cgroup}: not its namespace");
        None
    }
}

fn open_at(dir: Option<&OwnedFd>, path: &Path, flags: libc::c_int) -> Option<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let base = dir.map(|d| d.as_raw_fd()).unwrap_or(libc::AT_FDCWD);
    let fd = unsafe { libc::openat(base, c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | flags) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// This test's own process, found through its own cgroup: the namespace opened is ours.
    #[test]
    fn opens_the_namespace_of_a_process_of_the_cgroup() {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(own) = watcher::procfs::cgroup_v2_path(&text) else {
            eprintln!("SKIP: no cgroup v2 path for this process");
            return;
        };
        let roots = Roots {
            proc: "/proc".into(),
            cgroup: watcher::procfs::cgroup2_mount().unwrap(),
        };
        let (fd, pid) = open_pod_netns(&roots, own).unwrap();
        let got = std::fs::File::from(fd).metadata().unwrap().ino();
        let want = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino();
        assert_eq!(got, want);
        let err = open_pod_netns(&roots, "/zbridge-no-such-cgroup").unwrap_err();
        assert!(err.to_string().contains("/zbridge-no-such-cgroup"), "{err}");
    }

    /// A reused PID: the pod's `cgroup.procs` (as last read) names a PID that now belongs to
    /// a process of another cgroup (this test's). Its namespace is never handed over; the
    /// same PID under its real cgroup is.
    #[test]
    fn a_pid_listed_for_a_pod_but_now_another_cgroups_is_never_used() {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(own) = watcher::procfs::cgroup_v2_path(&text) else {
            eprintln!("SKIP: no cgroup v2 path for this process");
            return;
        };
        let fake_root = tempfile::tempdir().unwrap();
        let me = std::process::id();
        for cgroup in ["/kubepods/pod-a", own] {
            let dir = fake_root.path().join(cgroup.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cgroup.procs"), format!("{me}\n")).unwrap();
        }
        let roots = Roots {
            proc: "/proc".into(),
            cgroup: fake_root.path().to_path_buf(),
        };
        let err = open_pod_netns(&roots, "/kubepods/pod-a").unwrap_err();
        assert!(matches!(err, NetnsError::NoProcess { .. }), "{err}");
        let (_, pid) = open_pod_netns(&roots, own).expect("its own cgroup");
        assert_eq!(pid, me as i32);
    }

    /// A process whose cgroup is not the asked one is refused: what a reused PID would be.
    #[test]
    fn a_process_outside_the_cgroup_is_refused() {
        let me = std::process::id() as i32;
        assert!(open_checked(Path::new("/proc"), me, "/zbridge-other-pod").is_none());
    }
}
