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
mod tests {
    use super::super::super::test_util::{fix_of, is_fail};
    use super::*;

    /// `/proc/net/unix` of a node running istio-cni: its ZDS listener, a connection it
    /// accepted (same path, not listening), an abstract socket and unnamed ones.
    const NET_UNIX: &str = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 20482 /run/systemd/journal/stdout
0000000000000000: 00000002 00000000 00010000 0005 01 918273 /var/run/ztunnel/ztunnel.sock
0000000000000000: 00000003 00000000 00000000 0005 03 918301 /var/run/ztunnel/ztunnel.sock
0000000000000000: 00000002 00000000 00010000 0001 01 30001 @/containerd-shim/abc.sock@
0000000000000000: 00000003 00000000 00000000 0001 03  4242
0000000000000000: 00000002 00000000 00010000 0001 01 777 /tmp/dir with space/s.sock
";

    #[test]
    fn listeners_are_read_from_proc_net_unix() {
        let listeners = parse_unix_listeners(NET_UNIX);
        let entry = |inode: u64, path: &str| UnixListenerEntry {
            inode,
            path: path.into(),
        };
        assert_eq!(
            listeners,
            [
                entry(20482, "/run/systemd/journal/stdout"),
                entry(918273, "/var/run/ztunnel/ztunnel.sock"),
                entry(777, "/tmp/dir with space/s.sock"),
            ]
        );
        assert!(parse_unix_listeners("").is_empty());
        assert!(parse_unix_listeners("Num RefCount\ngarbage line\n").is_empty());
    }

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode(Path::new("socket:[918273]")), Some(918273));
        assert_eq!(socket_inode(Path::new("pipe:[918273]")), None);
        assert_eq!(socket_inode(Path::new("/dev/null")), None);
        assert_eq!(socket_inode(Path::new("socket:[x]")), None);
    }

    /// A simulated /proc: pid → (comm, exe, descriptor link targets).
    fn fake_proc(processes: &[(u32, &str, &str, &[&str])]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (pid, comm, exe, fds) in processes {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir_all(dir.join("fd")).unwrap();
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
            for (n, target) in fds.iter().enumerate() {
                std::os::unix::fs::symlink(target, dir.join("fd").join(n.to_string())).unwrap();
            }
        }
        std::fs::create_dir_all(root.path().join("self")).unwrap();
        root
    }

    #[test]
    fn holders_are_found_by_the_socket_inode() {
        let proc = fake_proc(&[
            (
                1,
                "systemd",
                "/usr/lib/systemd/systemd",
                &["socket:[20482]"],
            ),
            (
                812,
                "istio-cni",
                "/usr/local/bin/install-cni",
                &["/dev/null", "socket:[918301]", "socket:[918273]"],
            ),
            (
                913,
                "ztunnel",
                "/usr/local/bin/ztunnel",
                &["socket:[918302]"],
            ),
        ]);
        let holders = socket_holders(proc.path(), &[918273]);
        assert_eq!(
            holders,
            [Holder {
                pid: 812,
                comm: "istio-cni".into(),
                exe: Some("/usr/local/bin/install-cni".into()),
            }]
        );
        assert!(!holders[0].is_zbridge());
        assert!(socket_holders(proc.path(), &[1]).is_empty());
        assert!(socket_holders(Path::new("/nonexistent/proc"), &[918273]).is_empty());
    }

    fn holder(pid: u32, comm: &str, exe: Option<&str>) -> Holder {
        Holder {
            pid,
            comm: comm.into(),
            exe: exe.map(PathBuf::from),
        }
    }

    #[test]
    fn zbridge_is_known_by_its_name_or_binary() {
        assert!(holder(1, "zbridge", None).is_zbridge());
        assert!(holder(1, "tokio-runtime-w", Some("/usr/local/bin/zbridge")).is_zbridge());
        assert!(holder(1, "x", Some("/usr/local/bin/zbridge (deleted)")).is_zbridge());
        assert!(!holder(1, "istio-cni", Some("/usr/local/bin/istio-cni")).is_zbridge());
    }

    #[test]
    fn outcomes_name_the_holder_and_the_fix() {
        let path = Path::new("/var/run/ztunnel/ztunnel.sock");
        let absent = check_zds_socket(path, &ZdsSocket::Absent);
        assert!(
            matches!(&absent, Outcome::Pass(d) if d.contains("not served yet (zbridge run serves it)")),
            "{absent:?}"
        );
        assert!(matches!(
            check_zds_socket(path, &ZdsSocket::Stale),
            Outcome::Pass(d) if d.contains("zbridge run replaces it")
        ));
        let ours = ZdsSocket::Served {
            inodes: vec![5],
            holders: vec![holder(42, "zbridge", Some("/usr/local/bin/zbridge"))],
        };
        assert!(matches!(
            check_zds_socket(path, &ours),
            Outcome::Pass(d) if d.contains("served by zbridge (pid 42)")
        ));
        let theirs = ZdsSocket::Served {
            inodes: vec![5],
            holders: vec![holder(812, "istio-cni", Some("/usr/local/bin/istio-cni"))],
        };
        let outcome = check_zds_socket(path, &theirs);
        assert!(
            is_fail(
                &outcome,
                "/var/run/ztunnel/ztunnel.sock is served by pid 812 (istio-cni, \
                 /usr/local/bin/istio-cni), not zbridge"
            ),
            "{outcome:?}"
        );
        assert_eq!(fix_of(&outcome), FIX_ZDS_HOLDER);
        let unseen = ZdsSocket::Served {
            inodes: vec![918273],
            holders: vec![],
        };
        assert!(matches!(
            check_zds_socket(path, &unseen),
            Outcome::Warn { what, fix } if what.contains("inode 918273") && fix.contains("hostPID")
        ));
        assert!(is_fail(
            &check_zds_socket(path, &ZdsSocket::NotASocket),
            "is not a socket"
        ));
    }

    #[test]
    fn a_missing_path_and_a_plain_file_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let proc = Path::new("/proc");
        let path = dir.path().join("ztunnel.sock");
        assert_eq!(probe_zds_socket(&path, proc), ZdsSocket::Absent);
        std::fs::write(&path, "").unwrap();
        assert_eq!(probe_zds_socket(&path, proc), ZdsSocket::NotASocket);
    }

    #[test]
    fn a_socket_bound_in_this_process_is_found_and_a_closed_one_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ztunnel.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        match probe_zds_socket(&path, Path::new("/proc")) {
            ZdsSocket::Served { inodes, holders } => {
                assert_eq!(inodes.len(), 1, "{inodes:?}");
                let me = std::process::id();
                assert!(holders.iter().any(|h| h.pid == me), "{holders:?}");
            }
            other => panic!("{other:?}"),
        }
        drop(listener);
        assert_eq!(
            probe_zds_socket(&path, Path::new("/proc")),
            ZdsSocket::Stale
        );
    }
}
