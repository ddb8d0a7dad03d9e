//! Reading /proc from the host's view of the cgroup tree.
//!
//! `/proc/PID/cgroup` names paths relative to the *reader's* cgroup namespace. A container has
//! its own by default (cgroup v2 runtimes), so inside the DaemonSet's pod every path would be
//! relative to the agent's own cgroup (`/../../kubepods.slice/...`), and the cgroup ids looked
//! up under the host's cgroup2 mount would be wrong. With `hostPID`, PID 1 is the host's init:
//! joining its cgroup namespace makes every path the host's.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Errors joining the host's cgroup namespace.
#[derive(Debug, thiserror::Error)]
pub enum HostNsError {
    // Each I/O error is in the message and not the error's source (a field named `source` is
    // one for thiserror): a chain printer (anyhow's `{:#}`) would print it twice.
    #[error("cannot read {path}: {error} (is /proc the host's? run with hostPID: true)")]
    Read { path: String, error: std::io::Error },
    #[error(
        "cannot join the host's cgroup namespace ({path}): {error}; cgroup paths read from \
         /proc would be relative to the agent's own cgroup. Run with CAP_SYS_ADMIN and hostPID"
    )]
    Setns { path: String, error: std::io::Error },
}

/// Moves the calling thread into the cgroup namespace of `/proc/1` (the host's init under
/// `hostPID`) when it is in another one. Call it before starting threads: threads made later
/// inherit it. Returns whether it moved.
pub fn enter_host_cgroup_namespace() -> Result<bool, HostNsError> {
    enter_cgroup_namespace_of("/proc/1/ns/cgroup")
}

/// Moves the calling thread into the cgroup namespace at `target` (a `/proc/PID/ns/cgroup`)
/// unless it is there already.
pub fn enter_cgroup_namespace_of(target: &str) -> Result<bool, HostNsError> {
    let inode = |path: &str| {
        std::fs::metadata(path)
            .map(|m| m.ino())
            .map_err(|error| HostNsError::Read {
                path: path.to_string(),
                error,
            })
    };
    if inode("/proc/thread-self/ns/cgroup")? == inode(target)? {
        return Ok(false);
    }
    let file = std::fs::File::open(target).map_err(|error| HostNsError::Read {
        path: target.to_string(),
        error,
    })?;
    // SAFETY: setns on a namespace file descriptor we own; it only changes this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(HostNsError::Setns {
            path: target.to_string(),
            error: std::io::Error::last_os_error(),
        });
    }
    Ok(true)
}
