//! Who serves ztunnel's ZDS socket: the listening socket bound at the path is found in
//! `/proc/net/unix` (its Path column), and its inode among the processes' descriptors
//! (`/proc/PID/fd/N` → `socket:[INODE]`).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::super::{fail, Outcome};

/// What to do when another process serves the socket.
pub const FIX_ZDS_HOLDER: &str = "istio-cni's node agent serves this socket: install Istio \
                                  without istio-cni (README) or stop it; two node agents would \
                                  each hand ztunnel pods";

/// `__SO_ACCEPTCON` in `/proc/net/unix`'s Flags column: the socket listens.
const SO_ACCEPTCON: u32 = 1 << 16;

/// A listening Unix socket bound to a filesystem path, as `/proc/net/unix` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixListenerEntry {
    pub inode: u64,
    /// The path as the binding process gave it (not resolved).
    pub path: String,
}

/// The listening sockets of `/proc/net/unix` that have a path. Accepted connections carry
/// the listener's path too, so the listening flag is what singles the listener out.
pub fn parse_unix_listeners(net_unix: &str) -> Vec<UnixListenerEntry> {
    net_unix
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode, then the path after one space (it may
            // hold spaces itself, so it is the rest of the line).
            let mut rest = line;
            let mut fields = [""; 7];
            for field in &mut fields {
                let trimmed = rest.trim_start();
                let end = trimmed.find(' ').unwrap_or(trimmed.len());
                *field = &trimmed[..end];
                rest = &trimmed[end..];
            }
            let path = rest.strip_prefix(' ')?;
            let flags = u32::from_str_radix(fields[3], 16).ok()?;
            let inode = fields[6].parse().ok()?;
            // `@name` is an abstract socket: it has no file.
            (flags & SO_ACCEPTCON != 0 && !path.is_empty() && !path.starts_with('@')).then(|| {
                UnixListenerEntry {
                    inode,
                    path: path.to_string(),
                }
            })
        })
        .collect()
}

/// The inode of a descriptor link's target `socket:[INODE]`; `None` for anything else.
pub fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A process holding the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// `/proc/PID/comm`: the name it was started as.
    pub comm: String,
    /// `/proc/PID/exe`, when readable.
    pub exe: Option<PathBuf>,
}

impl Holder {
    /// Whether this is zbridge, by the name it runs as or by its binary.
    pub fn is_zbridge(&self) -> bool {
        let binary = self
            .exe
            .as_ref()
            .and_then(|exe| exe.file_name())
            .map(|name| name.to_string_lossy().into_owned());
        self.comm == "zbridge"
            // A binary replaced on disk reads as `zbridge (deleted)`.
            || binary.is_some_and(|name| name.trim_end_matches(" (deleted)") == "zbridge")
    }

    /// `pid 812 (istio-cni, /usr/local/bin/install-cni)`.
    pub fn describe(&self) -> String {
        match &self.exe {
            Some(exe) => format!("pid {} ({}, {})", self.pid, self.comm, exe.display()),
            None => format!("pid {} ({})", self.pid, self.comm),
        }
    }
}

/// The processes under `proc_root` with a descriptor on one of the socket `inodes`, by pid.
/// Processes whose descriptors cannot be read (gone, or not ours to read) are left out.
pub fn socket_holders(proc_root: &Path, inodes: &[u64]) -> Vec<Holder> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut holders: Vec<Holder> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(fds) = std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
                return false;
            };
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .ok()
                    .and_then(|link| socket_inode(&link))
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        })
        .map(|pid| {
            let dir = proc_root.join(pid.to_string());
            Holder {
                pid,
                comm: std::fs::read_to_string(dir.join("comm"))
                    .map(|c| c.trim_end().to_string())
                    .unwrap_or_else(|_| "?".into()),
                exe: std::fs::read_link(dir.join("exe")).ok(),
            }
        })
        .collect();
    holders.sort_by_key(|h| h.pid);
    holders
}

/// What is at the ZDS socket's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZdsSocket {
    /// Nothing: no agent has served it yet.
    Absent,
    /// A file that is not a socket: `zbridge run` cannot bind there.
    NotASocket,
    /// The path could not be looked at (the error names it).
    Unreadable(String),
    /// A socket file nobody listens on, left by an agent that stopped.
    Stale,
    /// Someone listens; the connect failed in a way that does not say who (the error).
    Unknown(String),
    /// Someone listens: the matching listeners' inodes and the processes holding them (empty
    /// when they are in another network namespace or their descriptors are not readable).
    Served {
        inodes: Vec<u64>,
        holders: Vec<Holder>,
    },
}

/// Looks at the path, asks whether anyone listens there, and if so who.
pub fn probe_zds_socket(path: &Path, proc_root: &Path) -> ZdsSocket {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ZdsSocket::Absent,
        Err(e) => return ZdsSocket::Unreadable(format!("{}: {e}", path.display())),
        Ok(meta) if !meta.file_type().is_socket() => return ZdsSocket::NotASocket,
        Ok(_) => {}
    }
    // A stream connect to a SEQPACKET listener (ZDS's type) fails with EPROTOTYPE before any
    // connection is made: live and stale sockets are told apart without the server ever
    // seeing a peer.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => return ZdsSocket::Stale,
        Err(e) => return ZdsSocket::Unknown(format!("connect to {}: {e}", path.display())),
    }
    let net_unix = proc_root.join("net/unix");
    let listeners = match std::fs::read_to_string(&net_unix) {
        Ok(text) => parse_unix_listeners(&text),
        Err(e) => return ZdsSocket::Unknown(format!("{}: {e}", net_unix.display())),
    };
    let wanted = resolved(path);
    let inodes: Vec<u64> = listeners
        .iter()
        .filter(|l| {
            let bound = Path::new(&l.path);
            bound == path || (bound.file_name() == path.file_name() && resolved(bound) == wanted)
        })
        .map(|l| l.inode)
        .collect();
    let holders = match inodes.is_empty() {
        true => Vec::new(),
        false => socket_holders(proc_root, &inodes),
    };
    ZdsSocket::Served { inodes, holders }
}

/// The path with its directory's symlinks resolved (`/var/run` is often `/run`): the bound
/// path is recorded as the binder spelled it.
fn resolved(path: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(path.parent()?).ok()?;
    Some(dir.join(path.file_name()?))
}

/// The words for what is at the ZDS socket's path.
pub fn check_zds_socket(path: &Path, state: &ZdsSocket) -> Outcome {
    let at = path.display();
    match state {
        ZdsSocket::Absent => Outcome::Pass(format!("{at}: not served yet (zbridge run serves it)")),
        ZdsSocket::Stale => Outcome::Pass(format!(
            "{at}: a socket file nobody listens on, left by an agent that stopped (zbridge run \
             replaces it)"
        )),
        ZdsSocket::NotASocket => fail(
            format!("{at} exists and is not a socket: zbridge run cannot serve ZDS there"),
            "remove it, or pass another --zds-socket to run and doctor (ztunnel must be \
             pointed at the same path)",
        ),
        ZdsSocket::Unreadable(e) => fail(
            format!("cannot look at the ZDS socket: {e}"),
            "run doctor as root with the host's /var/run/ztunnel mounted, as the DaemonSet does",
        ),
        ZdsSocket::Unknown(e) => Outcome::Warn {
            what: format!("{at} is served, but doctor cannot tell by whom: {e}"),
            fix: format!(
                "run doctor as root in the host's PID and network namespaces; if the server is \
                 not zbridge: {FIX_ZDS_HOLDER}"
            ),
        },
        ZdsSocket::Served { inodes, holders } => {
            let others: Vec<String> = holders
                .iter()
                .filter(|h| !h.is_zbridge())
                .map(Holder::describe)
                .collect();
            if !others.is_empty() {
                return fail(
                    format!("{at} is served by {}, not zbridge", others.join(", ")),
                    FIX_ZDS_HOLDER,
                );
            }
            if holders.is_empty() {
                let inodes = match inodes.is_empty() {
                    true => "not listed in this network namespace's /proc/net/unix".to_string(),
                    false => format!(
                        "listening socket inode {}",
                        inodes
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                return Outcome::Warn {
                    what: format!("{at} is served by a process doctor cannot see ({inodes})"),
                    fix: format!(
                        "run doctor as root in the host's PID and network namespaces (hostPID, \
                         hostNetwork) to name it; if it is not zbridge: {FIX_ZDS_HOLDER}"
                    ),
                };
            }
            let pids: Vec<String> = holders.iter().map(|h| h.pid.to_string()).collect();
            Outcome::Pass(format!(
                "{at} is served by zbridge (pid {})",
                pids.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests;
