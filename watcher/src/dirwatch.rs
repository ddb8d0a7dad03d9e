//! Directories coming and going, watched with inotify: the standalone workloads file's cgroup
//! subtrees, so that a subtree is enrolled when it is created (before any process runs in it)
//! and its entry removed when it is removed. The watcher knows no workloads: it is given
//! paths, and says when one of them may have appeared or gone.
//!
//! For each path it watches the path's parent, or, while the parent does not exist, the
//! deepest ancestor that does (so that `mkdir -p` of a whole chain is seen). After any event
//! the watches are set up again for what exists now, and only then is the change reported: a
//! directory made between the event and the new watches is still seen by whoever acts on the
//! report, since they look at the directories themselves.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What a watched directory reports: entries made, removed or moved in it, or itself gone.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// How long a wait for events lasts before the stop flag is looked at.
const POLL_MS: i32 = 200;

/// A running watch; stops (and joins its thread) on drop.
pub struct DirWatch {
    paths: Arc<Mutex<Vec<PathBuf>>>,
    /// Set: the watches are rebuilt for new paths before the next wait.
    rearm: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DirWatch {
    /// Watches `paths`; `on_change` runs on the watch's thread after each batch of events.
    pub fn start(
        paths: Vec<PathBuf>,
        mut on_change: impl FnMut() + Send + 'static,
    ) -> io::Result<DirWatch> {
        // SAFETY: inotify_init1 with constant flags; the descriptor is owned at once.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let paths = Arc::new(Mutex::new(paths));
        let rearm = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (paths, rearm, stop) = (paths.clone(), rearm.clone(), stop.clone());
            std::thread::Builder::new()
                .name("dirwatch".into())
                .spawn(move || {
                    let mut watches: Vec<i32> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if rearm.swap(false, Ordering::Relaxed) {
                            let wanted = paths.lock().expect("dirwatch paths").clone();
                            arm(&fd, &mut watches, &wanted);
                        }
                        match wait_for_events(&fd) {
                            Ok(true) => {
                                let wanted = paths.lock().expect("dirwatch paths").clone();
                                arm(&fd, &mut watches, &wanted);
                                on_change();
                            }
                            Ok(false) => {}
                            Err(e) => {
                                log::error!("cgroup directory watch stopped: {e}");
                                return;
                            }
                        }
                    }
                })?
        };
        Ok(DirWatch {
            paths,
            rearm,
            stop,
            thread: Some(thread),
        })
    }

    /// Watches `paths` instead (a new workloads file).
    pub fn set_paths(&self, paths: Vec<PathBuf>) {
        *self.paths.lock().expect("dirwatch paths") = paths;
        self.rearm.store(true, Ordering::Relaxed);
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The directories to watch for `paths`: each one's parent, or its deepest existing ancestor.
pub fn watch_points(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut points = BTreeSet::new();
    for path in paths {
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d.is_dir() {
                points.insert(d.to_path_buf());
                break;
            }
            dir = d.parent();
        }
    }
    points
}

/// Replaces the watches with those `paths` need now.
fn arm(fd: &OwnedFd, watches: &mut Vec<i32>, paths: &[PathBuf]) {
    for wd in watches.drain(..) {
        // SAFETY: a watch descriptor of this inotify instance (gone ones fail harmlessly).
        unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
    }
    for dir in watch_points(paths) {
        match add_watch(fd, &dir) {
            Ok(wd) => watches.push(wd),
            // Removed between the look and the watch: the next event re-arms.
            Err(e) => log::debug!("cgroup directory watch: {}: {e}", dir.display()),
        }
    }
}

fn add_watch(fd: &OwnedFd, dir: &Path) -> io::Result<i32> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: a valid inotify descriptor and a NUL-terminated path.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), MASK) };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(wd)
}

/// Waits up to [`POLL_MS`] for events and drains them; `true` if there were any.
fn wait_for_events(fd: &OwnedFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    if n == 0 {
        return Ok(false);
    }
    let mut buf = [0u8; 4096];
    let mut any = false;
    loop {
        // SAFETY: reading into a buffer of the given length.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r > 0 {
            any = true;
            continue;
        }
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(any),
            io::ErrorKind::Interrupted => continue,
            _ => Err(e),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn watch_points_are_parents_or_the_deepest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let points = watch_points(&[a.join("b"), dir.path().join("x/y/z")]);
        assert_eq!(
            points.into_iter().collect::<Vec<_>>(),
            [dir.path().to_path_buf(), a]
        );
    }

    /// A chain made at once (`mkdir -p`), removed, made again: each change is reported.
    #[test]
    fn reports_a_subtree_made_removed_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("pods/app");
        let (tx, rx) = mpsc::channel();
        let _watch = DirWatch::start(vec![target.clone()], move || {
            let _ = tx.send(());
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let seen = |what: &str, exists: bool| {
            // Reports until the directory is as expected (several events may come).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                rx.recv_timeout(left)
                    .unwrap_or_else(|_| panic!("no report after {what}"));
                if target.is_dir() == exists {
                    return;
                }
            }
        };
        std::fs::create_dir_all(&target).unwrap();
        seen("mkdir -p", true);
        std::fs::remove_dir(&target).unwrap();
        seen("rmdir", false);
        std::fs::create_dir(&target).unwrap();
        seen("mkdir again", true);
    }
}
