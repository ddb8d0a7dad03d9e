//! A cgroup v2 directory of the test's own, removed on drop.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A cgroup made for one test under the cgroup2 root. On drop, processes still in it (and in
/// its children) are killed, by the PIDs listed in its `cgroup.procs` (only processes the test
/// put there), and the directories are removed deepest first.
pub struct TestCgroup {
    /// The cgroup2 mount point (e.g. `/sys/fs/cgroup/unified`).
    pub root: PathBuf,
    /// The path relative to the cgroup2 root, as `/proc/PID/cgroup` names it (`/zbt-...`).
    pub path: String,
}

impl TestCgroup {
    /// Makes `/<unique name>` under the cgroup2 root.
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let root = watcher::procfs::cgroup2_mount().map_err(std::io::Error::other)?;
        let path = format!("/{}", crate::unique_name(prefix));
        std::fs::create_dir(root.join(&path[1..]))?;
        Ok(TestCgroup { root, path })
    }

    /// Makes a child cgroup (`name` may contain `/` for deeper ones; parents are made too).
    pub fn child(&self, name: &str) -> std::io::Result<String> {
        let path = format!("{}/{}", self.path, name);
        std::fs::create_dir_all(self.dir_of(&path))?;
        Ok(path)
    }

    /// The directory of a cgroup path (relative to the cgroup2 root).
    pub fn dir_of(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The directory of this cgroup.
    pub fn dir(&self) -> PathBuf {
        self.dir_of(&self.path)
    }

    /// The cgroup id (inode of the directory) of a cgroup path.
    pub fn id_of(&self, path: &str) -> std::io::Result<u64> {
        Ok(std::fs::metadata(self.dir_of(path))?.ino())
    }

    /// The id of this cgroup.
    pub fn id(&self) -> u64 {
        self.id_of(&self.path).expect("test cgroup exists")
    }

    /// Moves a process into a cgroup path (relative to the cgroup2 root).
    pub fn enter(&self, path: &str, pid: u32) -> std::io::Result<()> {
        std::fs::write(self.dir_of(path).join("cgroup.procs"), pid.to_string())
    }

    /// A `std::process::Command` hook: the child joins `path` before it execs, so its exec
    /// event already carries that cgroup.
    pub fn pre_exec_join(&self, path: &str) -> impl FnMut() -> std::io::Result<()> + Send + Sync {
        let procs = self.joiner(path).procs;
        move || std::fs::write(&procs, b"0")
    }

    /// What makes children join `path` before they exec, as a value a spawning thread can own
    /// (it needs no borrow of this cgroup).
    pub fn joiner(&self, path: &str) -> CgroupJoiner {
        CgroupJoiner {
            procs: self.dir_of(path).join("cgroup.procs"),
        }
    }
}

/// Makes a command's child join a cgroup before it execs ([`TestCgroup::joiner`]).
#[derive(Debug, Clone)]
pub struct CgroupJoiner {
    procs: PathBuf,
}

impl CgroupJoiner {
    /// Adds the hook to `cmd`: the child writes itself into the cgroup's `cgroup.procs`.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let procs = self.procs.clone();
        // SAFETY: between fork and exec the hook only opens, writes and closes a file.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let mut dirs = Vec::new();
        collect_dirs(&self.dir(), &mut dirs);
        // Deepest first, so that children are empty and gone before their parents.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in &dirs {
            kill_members(dir);
        }
        for dir in &dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // Killed processes take a moment to leave the cgroup.
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

fn kill_members(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: kill has no memory preconditions; the pid is one the test put in its cgroup.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
