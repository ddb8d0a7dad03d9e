//! Reading the facts of a process from /proc: cgroup v2 path and id, netns, addresses.
//!
//! This runs once per exec event, machine-wide, so it reuses its buffers and caches the
//! addresses of each network namespace. A process that is gone before it could be read is
//! normal (about a fifth of short-lived ones): its facts come back with `None` fields.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::event::{CgroupId, CgroupRef, Pid, ProcFacts, ScannedProcess};

/// Errors finding the host's cgroup2 hierarchy.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
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
    let text = std::fs::read_to_string(path).map_err(|source| MountError::Read { path, source })?;
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
        ProcReader {
            proc_root: proc_root.into(),
            cgroup_root: cgroup_root.into(),
            path: String::with_capacity(256),
            buf: Vec::with_capacity(4096),
            addresses: HashMap::new(),
        }
    }

    /// Where the cgroup2 hierarchy is mounted.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// What `/proc/PID` says now. Fields of a process that is gone (or unreadable) are `None`.
    pub fn read_facts(&mut self, pid: Pid) -> ProcFacts {
        let cgroup = self.read_cgroup(pid);
        if cgroup.is_none() && !self.process_dir_exists(pid) {
            // Gone already: every other read would fail too (a third of this path's cost in
            // a spawn storm of short processes).
            return ProcFacts::default();
        }
        let netns = self.netns_inode(pid);
        let ips = match netns {
            Some(inode) => self.netns_addresses(pid, inode),
            None => Vec::new(),
        };
        let comm = self.read_comm(pid);
        ProcFacts {
            cgroup,
            netns,
            ips,
            comm,
        }
    }

    /// Every process (`/proc/<tgid>`) with its facts. Processes that vanish while the scan runs
    /// are left out when even their cgroup can no longer be read.
    pub fn scan(&mut self) -> Vec<ScannedProcess> {
        let Ok(dir) = std::fs::read_dir(&self.proc_root) else {
            log::warn!("cannot list {}", self.proc_root.display());
            return Vec::new();
        };
        let pids: Vec<Pid> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let facts = self.read_facts(pid);
            if facts.cgroup.is_none() && facts.comm.is_none() {
                continue; // gone between the listing and the read
            }
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
    ///
    /// With plain `read` calls into a reused buffer: `read_to_end` would add an fstat, an lseek
    /// and a final empty read, nearly doubling the syscalls of this per-exec path. A short read
    /// of a /proc file is its end (seq_file fills the buffer while it has content).
    fn read_file(&mut self, pid: Pid, file: &str) -> bool {
        self.set_path(pid, file);
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return false;
        };
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

    fn read_cgroup(&mut self, pid: Pid) -> Option<CgroupRef> {
        if !self.read_file(pid, "cgroup") {
            return None;
        }
        let text = std::str::from_utf8(&self.buf).ok()?;
        let path = cgroup_v2_path(text)?.to_owned();
        // The cgroup id is the inode of the directory; the path is relative to the root.
        self.path.clear();
        self.path.push_str(self.cgroup_root.to_str()?);
        self.path.push_str(path.trim_end_matches('/'));
        let id = std::fs::metadata(&self.path).ok()?.ino();
        Some(CgroupRef {
            path,
            id: CgroupId(id),
        })
    }

    fn process_dir_exists(&mut self, pid: Pid) -> bool {
        self.set_path(pid, "");
        std::fs::symlink_metadata(&self.path).is_ok()
    }

    fn netns_inode(&mut self, pid: Pid) -> Option<u64> {
        self.set_path(pid, "ns/net");
        std::fs::metadata(&self.path).ok().map(|m| m.ino())
    }

    fn read_comm(&mut self, pid: Pid) -> Option<String> {
        if !self.read_file(pid, "comm") {
            return None;
        }
        let text = String::from_utf8_lossy(&self.buf);
        Some(text.trim_end_matches('\n').to_owned())
    }

    /// The unicast addresses of the network namespace `inode`, read through `pid`, cached.
    fn netns_addresses(&mut self, pid: Pid, inode: u64) -> Vec<IpAddr> {
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
        assert_eq!(cgroup.path, path);
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
        assert_eq!(cgroup.path, path);
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
