//! Reading the facts of a process from /proc: cgroup v2 path and id, netns, addresses.
//!
//! Without the exec tap this runs once per exec event, machine-wide, so every read is the
//! cheapest syscall that gives the fact (their cost: BENCHMARKS.md, "Watcher", "Decode and
//! /proc facts"): the cgroup file with plain `read` calls into a reused buffer; the cgroup id by
//! `fstatat` relative to an open directory of the cgroup2 root (no walk of `/sys/fs/cgroup/...`
//! each time); the netns inode from `readlink` of `ns/net` (`net:[INODE]`: cheaper than a
//! `stat`, which makes the kernel open the namespace file); the addresses of each network
//! namespace cached; `comm` (informative only) left out of exec events unless asked for. A
//! process that is gone before it could be read is normal (short-lived ones often are): its
//! facts come back with `None` fields.
//!
//! The scan lists processes with the `procfs` crate (`all_processes_with_root`), whose
//! [`procfs::process::Process`] holds the `/proc/PID` directory open: the scan's cgroup and
//! `comm` reads go through it, so they come from the listed process even if its pid is reused
//! meanwhile. That costs one open per process, a small part of a scan; the per-exec path has no
//! listing and reads by path.

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::{CgroupId, CgroupRef, Pid, ProcFacts, ScannedProcess};

/// Errors finding the host's cgroup2 hierarchy.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    // Each I/O error is in the message and not the error's source (a field named `source` is
    // one for thiserror): a chain printer (anyhow's `{:#}`) would print it twice.
    #[error("cannot read {path}: {error}")]
    Read {
        path: &'static str,
        error: std::io::Error,
    },
    #[error(
        "no cgroup2 filesystem in /proc/self/mountinfo: zbridge needs the unified (v2) hierarchy \
         (mounted at /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)"
    )]
    NoCgroup2,
}

/// Where the cgroup2 hierarchy is mounted, from `/proc/self/mountinfo` (the first cgroup2
/// mount: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, MountError> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|error| MountError::Read { path, error })?;
    cgroup2_mount_in(&text).ok_or(MountError::NoCgroup2)
}

/// The first cgroup2 mount point in a mountinfo text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - cgroup2 cgroup2 rw": the fields after
        // " - " are the filesystem type, the source and the super options.
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How long the addresses of a network namespace are trusted before they are read again
/// (a pod's address is configured by the CNI around the time its first process starts).
const ADDRESS_CACHE_TTL: Duration = Duration::from_secs(2);
/// More namespaces than this in the cache: it is cleared (dead namespaces leave entries).
const ADDRESS_CACHE_MAX: usize = 4096;

/// Reads [`ProcFacts`] from `/proc`, reusing its buffers between calls.
pub struct ProcReader {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    /// The cgroup2 root, open (`O_PATH`), for `fstatat` of cgroup directories relative to it;
    /// `None` when it could not be opened (then every cgroup id read fails, as a stat would).
    cgroup_root_dir: Option<OwnedFd>,
    path: String,
    buf: Vec<u8>,
    addresses: HashMap<u64, (Instant, Vec<IpAddr>)>,
}

impl ProcReader {
    /// A reader of the host's `/proc`, with the cgroup2 mount found in mountinfo.
    pub fn new() -> Result<ProcReader, MountError> {
        Ok(ProcReader::with_roots("/proc", cgroup2_mount()?))
    }

    /// A reader of the host's `/proc`, with the cgroup2 hierarchy mounted at `cgroup_root`
    /// (`--cgroup-root`).
    pub fn with_cgroup_root(cgroup_root: impl Into<PathBuf>) -> Self {
        ProcReader::with_roots("/proc", cgroup_root)
    }

    /// A reader of another proc and cgroup2 root (tests).
    pub fn with_roots(proc_root: impl Into<PathBuf>, cgroup_root: impl Into<PathBuf>) -> Self {
        let cgroup_root = cgroup_root.into();
        let cgroup_root_dir = open_dir_path(&cgroup_root);
        if cgroup_root_dir.is_none() {
            log::warn!(
                "cannot open the cgroup2 root {}: no cgroup ids can be read",
                cgroup_root.display()
            );
        }
        ProcReader {
            proc_root: proc_root.into(),
            cgroup_root,
            cgroup_root_dir,
            path: String::with_capacity(256),
            buf: Vec::with_capacity(4096),
            addresses: HashMap::new(),
        }
    }

    /// Where the cgroup2 hierarchy is mounted.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// What `/proc/PID` says now, `comm` included. Fields of a process that is gone (or
    /// unreadable) are `None`.
    pub fn read_facts(&mut self, pid: Pid) -> ProcFacts {
        self.read_facts_as_asked(pid, true)
    }

    /// [`ProcReader::read_facts`] without `comm` (informative only, and one open and read
    /// fewer): what an exec event needs.
    pub fn read_facts_without_comm(&mut self, pid: Pid) -> ProcFacts {
        self.read_facts_as_asked(pid, false)
    }

    /// The cgroup of `/proc/PID/cgroup` and its id (an `fstatat` below the cgroup2 root);
    /// `None` when the process is gone or the cgroup unreadable. For an exec whose cgroup id
    /// is known already (the exec tap) and whose path is not cached.
    pub fn read_cgroup(&mut self, pid: Pid) -> Option<CgroupRef> {
        self.set_path(pid, "cgroup");
        let f = File::open(&self.path).ok()?;
        self.read_cgroup_from(f)
    }

    /// `/proc/PID/comm`; `None` when the process is gone.
    pub fn read_comm(&mut self, pid: Pid) -> Option<String> {
        self.set_path(pid, "comm");
        let f = File::open(&self.path).ok()?;
        self.read_comm_from(f)
    }

    fn read_facts_as_asked(&mut self, pid: Pid, comm: bool) -> ProcFacts {
        let cgroup = self.read_cgroup(pid);
        if cgroup.is_none() && !self.process_exists(pid) {
            // Gone already: every other read would fail too (a third of this path's cost in
            // a spawn storm of short processes).
            return ProcFacts::default();
        }
        let comm = if comm { self.read_comm(pid) } else { None };
        self.rest_of_facts(pid, cgroup, comm)
    }

    /// The netns and its addresses, around the cgroup and comm already read.
    fn rest_of_facts(
        &mut self,
        pid: Pid,
        cgroup: Option<CgroupRef>,
        comm: Option<String>,
    ) -> ProcFacts {
        let netns = self.netns_inode(pid);
        let ips = match netns {
            Some(inode) => self.netns_addresses(pid, inode),
            None => Vec::new(),
        };
        ProcFacts {
            cgroup,
            netns,
            ips,
            comm,
        }
    }

    /// Every process (`/proc/<tgid>`) with its facts, `comm` included. Processes that vanish
    /// while the scan runs are left out when neither their cgroup nor their comm can be read.
    pub fn scan(&mut self) -> Vec<ScannedProcess> {
        let listing = match procfs::process::all_processes_with_root(&self.proc_root) {
            Ok(listing) => listing,
            Err(e) => {
                log::warn!("cannot list {}: {e}", self.proc_root.display());
                return Vec::new();
            }
        };
        let mut processes = Vec::new();
        // An entry that cannot be opened is a process gone since the listing.
        for process in listing.flatten() {
            let Ok(pid) = Pid::try_from(process.pid()) else {
                continue;
            };
            // Through the open /proc/PID: these reads fail rather than read a newer process
            // that got the same pid.
            let cgroup = process
                .open_relative("cgroup")
                .ok()
                .and_then(|f| self.read_cgroup_from(f));
            let comm = process
                .open_relative("comm")
                .ok()
                .and_then(|f| self.read_comm_from(f));
            if cgroup.is_none() && comm.is_none() {
                continue; // gone between the listing and the read
            }
            let facts = self.rest_of_facts(pid, cgroup, comm);
            processes.push(ScannedProcess { pid, facts });
        }
        processes
    }

    /// Sets `self.path` to `<proc>/<pid>/<file>`.
    fn set_path(&mut self, pid: Pid, file: &str) {
        self.path.clear();
        self.path
            .push_str(self.proc_root.to_str().unwrap_or("/proc"));
        // Writing to a String cannot fail.
        let _ = write!(self.path, "/{pid}/{file}");
    }

    /// Reads `<proc>/<pid>/<file>` into `self.buf`.
    fn read_file(&mut self, pid: Pid, file: &str) -> bool {
        self.set_path(pid, file);
        match File::open(&self.path) {
            Ok(f) => self.read_into_buf(f),
            Err(_) => false,
        }
    }

    /// Reads an open /proc file into `self.buf`.
    ///
    /// With plain `read` calls into a reused buffer: `read_to_end` would add an fstat, an lseek
    /// and a final empty read, nearly doubling the syscalls of this per-exec path. A short read
    /// of a /proc file is its end (seq_file fills the buffer while it has content).
    fn read_into_buf(&mut self, mut f: File) -> bool {
        self.buf.clear();
        self.buf.resize(self.buf.capacity().max(4096), 0);
        let mut len = 0;
        loop {
            match f.read(&mut self.buf[len..]) {
                Ok(0) => break,
                Ok(n) => {
                    len += n;
                    if len < self.buf.len() {
                        break;
                    }
                    let grown = self.buf.len() * 2;
                    self.buf.resize(grown, 0);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.buf.truncate(len);
        true
    }

    /// The cgroup of an open `/proc/PID/cgroup`, and its id.
    fn read_cgroup_from(&mut self, f: File) -> Option<CgroupRef> {
        if !self.read_into_buf(f) {
            return None;
        }
        let text = std::str::from_utf8(&self.buf).ok()?;
        let path: Arc<str> = Arc::from(cgroup_v2_path(text)?);
        let id = self.cgroup_id(&path)?;
        Some(CgroupRef { path, id })
    }

    /// The inode of `<cgroup root>/<path>`, by `fstatat` relative to the open root.
    pub(crate) fn cgroup_id(&mut self, path: &str) -> Option<CgroupId> {
        let root = self.cgroup_root_dir.as_ref()?;
        self.path.clear();
        match path.trim_matches('/') {
            "" => self.path.push('.'),
            relative => self.path.push_str(relative),
        }
        self.path.push('\0');
        let c_path = std::ffi::CStr::from_bytes_with_nul(self.path.as_bytes()).ok()?;
        // SAFETY: an all-zero stat is a valid value for fstatat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is open for the reader's life, the path is NUL-terminated, and `st` is
        // a valid stat to write to.
        let rc = unsafe { libc::fstatat(root.as_raw_fd(), c_path.as_ptr(), &mut st, 0) };
        (rc == 0).then_some(CgroupId(st.st_ino))
    }

    /// Whether `/proc/PID` is still there.
    pub(crate) fn process_exists(&mut self, pid: Pid) -> bool {
        self.set_path(pid, "");
        std::fs::symlink_metadata(&self.path).is_ok()
    }

    /// The netns inode, from the `net:[INODE]` that `readlink` of `ns/net` gives.
    fn netns_inode(&mut self, pid: Pid) -> Option<u64> {
        self.set_path(pid, "ns/net");
        self.path.push('\0');
        let c_path = std::ffi::CStr::from_bytes_with_nul(self.path.as_bytes()).ok()?;
        let mut link = [0u8; 64];
        // SAFETY: the path is NUL-terminated; the pointer and length describe `link`.
        let n = unsafe { libc::readlink(c_path.as_ptr(), link.as_mut_ptr().cast(), link.len()) };
        let link = link.get(..usize::try_from(n).ok()?)?;
        netns_link_inode(link)
    }

    /// The comm of an open `/proc/PID/comm`.
    fn read_comm_from(&mut self, f: File) -> Option<String> {
        if !self.read_into_buf(f) {
            return None;
        }
        let text = String::from_utf8_lossy(&self.buf);
        Some(text.trim_end_matches('\n').to_owned())
    }

    /// The unicast addresses of the network namespace `inode`, read through `pid` (from its
    /// `net/fib_trie` and `net/if_inet6`) and cached by namespace for a short while. Empty when
    /// the namespace has none or `pid` is gone.
    pub fn netns_addresses(&mut self, pid: Pid, inode: u64) -> Vec<IpAddr> {
        if let Some((read_at, ips)) = self.addresses.get(&inode) {
            if read_at.elapsed() < ADDRESS_CACHE_TTL {
                return ips.clone();
            }
        }
        let mut ips = Vec::new();
        if self.read_file(pid, "net/fib_trie") {
            if let Ok(text) = std::str::from_utf8(&self.buf) {
                fib_trie_local_addresses(text, &mut ips);
            }
        }
        if self.read_file(pid, "net/if_inet6") {
            if let Ok(text) = std::str::from_utf8(&self.buf) {
                if_inet6_addresses(text, &mut ips);
            }
        }
        if self.addresses.len() >= ADDRESS_CACHE_MAX {
            self.addresses.clear();
        }
        // An empty answer is not cached: the process may be gone, or the namespace not yet
        // configured.
        if !ips.is_empty() {
            self.addresses.insert(inode, (Instant::now(), ips.clone()));
        }
        ips
    }
}

/// Opens a directory `O_PATH` (enough for `fstatat` relative to it).
fn open_dir_path(dir: &Path) -> Option<OwnedFd> {
    let c_dir = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: the path is NUL-terminated; the returned fd, when valid, is owned by us alone.
    let fd = unsafe {
        libc::open(
            c_dir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just opened and is not owned elsewhere.
    Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// The inode of a namespace link's target, `net:[4026531840]`.
pub fn netns_link_inode(link: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(link).ok()?;
    text.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

/// The path of the `0::` line of a `/proc/PID/cgroup` text.
pub fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|p| p.trim_end())
        .filter(|p| p.starts_with('/'))
}

/// The IPv4 addresses of `/32 host LOCAL` entries of a `/proc/PID/net/fib_trie` text, except
/// 127.0.0.0/8, each once, in order of appearance.
pub fn fib_trie_local_addresses(text: &str, out: &mut Vec<IpAddr>) {
    let mut current: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim_start();
        if let Some(addr) = line.strip_prefix("|-- ") {
            current = addr.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(addr) = current {
                let ip = IpAddr::V4(addr);
                if !addr.is_loopback() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
}

/// The IPv6 addresses of a `/proc/PID/net/if_inet6` text, except `::1` and link-local
/// `fe80::/10`.
pub fn if_inet6_addresses(text: &str, out: &mut Vec<IpAddr>) {
    for line in text.lines() {
        let Some(hex) = line.split_whitespace().next() else {
            continue;
        };
        let Ok(bits) = u128::from_str_radix(hex, 16) else {
            continue;
        };
        if hex.len() != 32 {
            continue;
        }
        let addr = Ipv6Addr::from(bits);
        let link_local = addr.segments()[0] & 0xffc0 == 0xfe80;
        let ip = IpAddr::V6(addr);
        if !addr.is_loopback() && !link_local && !addr.is_multicast() && !out.contains(&ip) {
            out.push(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const FIB_TRIE: &str = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 127.0.0.0/8 2 0 2\n        +-- 127.0.0.0/31 1 0 0\n           |-- 127.0.0.0\n              /8 host LOCAL\n           |-- 127.0.0.1\n              /32 host LOCAL\n        |-- 127.255.255.255\n           /32 link BROADCAST\n     +-- 192.0.2.0/24 2 0 2\n        +-- 192.0.2.0/30 2 0 2\n           |-- 192.0.2.0\n              /24 link UNICAST\n           |-- 192.0.2.2\n              /32 host LOCAL\n        |-- 192.0.2.255\n           /32 link BROADCAST\n     |-- 10.244.1.7\n        /32 link UNICAST\n        /32 host LOCAL\nLocal:\n  +-- 0.0.0.0/0 3 0 5\n           |-- 192.0.2.2\n              /32 host LOCAL\n";

    #[test]
    fn fib_trie_gives_local_host_addresses_once_without_loopback() {
        let mut ips = Vec::new();
        fib_trie_local_addresses(FIB_TRIE, &mut ips);
        assert_eq!(
            ips,
            vec![
                "192.0.2.2".parse::<IpAddr>().unwrap(),
                "10.244.1.7".parse().unwrap()
            ]
        );
    }

    #[test]
    fn if_inet6_skips_loopback_and_link_local() {
        let text = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n\
                    fd000000000000000000000000000002 04 40 00 82     eth0\n\
                    00000000000000000000000000000001 01 80 10 80       lo\n\
                    garbage\n";
        let mut ips = Vec::new();
        if_inet6_addresses(text, &mut ips);
        assert_eq!(ips, vec!["fd00::2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn cgroup_v2_line_on_hybrid_and_unified_hosts() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/kubepods.slice/a.scope\n";
        assert_eq!(cgroup_v2_path(hybrid), Some("/kubepods.slice/a.scope"));
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(cgroup_v2_path("4:memory:/x\n"), None);
    }

    #[test]
    fn facts_of_this_process() {
        let Ok(mut reader) = ProcReader::new() else {
            return; // no cgroup2 here: covered by the mount tests
        };
        let pid = std::process::id();
        let facts = reader.read_facts(pid);
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = cgroup_v2_path(&text).unwrap();
        let cgroup = facts.cgroup.expect("own cgroup readable");
        assert_eq!(&*cgroup.path, path);
        let dir = reader.cgroup_root().join(path.trim_start_matches('/'));
        assert_eq!(cgroup.id, CgroupId(std::fs::metadata(dir).unwrap().ino()));
        assert_eq!(
            facts.netns,
            Some(std::fs::metadata("/proc/self/ns/net").unwrap().ino())
        );
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(facts.comm.as_deref(), Some(comm.trim_end()));
        for ip in &facts.ips {
            assert!(!ip.is_loopback(), "{ip}");
        }
    }

    #[test]
    fn cgroup_ids_are_inodes_below_the_given_root() {
        // A stand-in root holding a directory at this process's cgroup path: the id must be
        // that directory's inode, not the real cgroup's.
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(path) = cgroup_v2_path(&text) else {
            return; // no cgroup2 line: nothing to resolve
        };
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        let mut reader = ProcReader::with_cgroup_root(root.path());
        assert_eq!(reader.cgroup_root(), root.path());
        let cgroup = reader.read_facts(std::process::id()).cgroup.unwrap();
        assert_eq!(&*cgroup.path, path);
        assert_eq!(cgroup.id, CgroupId(std::fs::metadata(&dir).unwrap().ino()));
    }

    #[test]
    fn a_gone_process_has_empty_facts() {
        let mut reader = ProcReader::with_roots("/proc", "/sys/fs/cgroup");
        // Above the kernel's pid_max limit (4194304), so no such process can exist.
        assert_eq!(reader.read_facts(4_194_305), ProcFacts::default());
    }

    #[test]
    fn scan_lists_this_process() {
        let Ok(mut reader) = ProcReader::new() else {
            return;
        };
        let me = std::process::id();
        let scan = reader.scan();
        let mine = scan.iter().find(|p| p.pid == me).expect("self in scan");
        assert!(mine.facts.cgroup.is_some());
        assert!(scan.iter().any(|p| p.pid == 1));
    }

    #[test]
    fn netns_link_target_gives_the_inode() {
        assert_eq!(netns_link_inode(b"net:[4026531840]"), Some(4026531840));
        assert_eq!(netns_link_inode(b"net:[]"), None);
        assert_eq!(netns_link_inode(b"/proc/1/ns/net"), None);
    }

    #[test]
    fn facts_without_comm_are_the_facts_minus_comm() {
        let Ok(mut reader) = ProcReader::new() else {
            return;
        };
        let pid = std::process::id();
        let mut all = reader.read_facts(pid);
        assert!(all.comm.is_some());
        all.comm = None;
        assert_eq!(reader.read_facts_without_comm(pid), all);
    }

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let text = "30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                    32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount_in(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            cgroup2_mount_in("32 30 0:28 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_spaces() {
        let text = "31 30 0:27 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(text),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
