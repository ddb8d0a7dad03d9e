//! In-pod capture's per-pod state in the kernel: for each pod that ztunnel serves inside the
//! pod's own network namespace (ztunnel's `shared` mode), the `sk_lookup` program attached to
//! that namespace with ztunnel's 15006 listener for the pod's addresses ([`crate::inbound`]),
//! and the pod's entry by namespace cookie in `inpod_netns`, which the socket hooks read for
//! ztunnel's sockets in that namespace (bind, accepted inbound sockets).
//!
//! The pod's cgroup entry itself (flag `F_INPOD`) is written by the [`crate::Programmer`] like
//! every other entry; the caller enrols a pod here first, then its cgroup entry, so that no
//! connection is sent to a listener that is not there yet.
//!
//! Everything is pinned under `<pin dir>/<layout version>/`: the inbound maps beside the
//! others in `maps/`, and one link per pod in `inpod/<pod uid>`, so that a pod stays captured
//! while the agent restarts. A new agent finds the pods of the last one ([`InPodCapture::pods`])
//! and, once it has heard ztunnel's acks again, [`InPodCapture::retain`]s the ones still there.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use aya::programs::links::FdLink;

use crate::inbound::InboundCapture;
use crate::layout::{self, CgroupInfo};
use crate::ProgramError;

/// `SO_NETNS_COOKIE` (asm-generic/socket.h): the cookie of a socket's network namespace, the
/// key `bpf_get_netns_cookie()` gives the programs.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A value of `inpod_netns` (`struct cgroup_info`).
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
struct NetnsEntry(CgroupInfo);

// SAFETY: `CgroupInfo` is #[repr(C)] integers and bytes without padding.
unsafe impl aya::Pod for NetnsEntry {}

/// One enrolled in-pod pod; its link is pinned at `<links dir>/<uid>`.
struct Pod {
    /// Its namespace cookie and addresses; `None` for a pod a previous run enrolled (known
    /// only by its pinned link until it is enrolled again).
    keys: Option<(u64, Vec<IpAddr>)>,
}

/// The in-pod pods enrolled in the kernel, by pod UID.
pub struct InPodCapture {
    inbound: InboundCapture,
    netns_map: HashMap<MapData, u64, NetnsEntry>,
    links_dir: PathBuf,
    pods: BTreeMap<String, Pod>,
}

impl InPodCapture {
    /// Loads the inbound program and opens `inpod_netns` among the pinned maps of `pin_dir`
    /// (the loader's, [`crate::Loaded::pin_dir`]), with the pods a previous run pinned.
    pub fn open(pin_dir: &Path) -> Result<Self, ProgramError> {
        let maps_dir = crate::pins::maps_dir(pin_dir);
        let links_dir = crate::pins::versioned_dir(pin_dir).join("inpod");
        std::fs::create_dir_all(&links_dir)
            .map_err(|e| ProgramError::path(&links_dir, "create", e))?;
        let mut pods = BTreeMap::new();
        let entries =
            std::fs::read_dir(&links_dir).map_err(|e| ProgramError::path(&links_dir, "list", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ProgramError::path(&links_dir, "list", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A pin left half-way by a run that stopped inside `enrol`.
            if name.starts_with(STAGE_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            match uid_of_pin(&name) {
                Some(uid) => {
                    pods.insert(uid, Pod { keys: None });
                }
                None => log::warn!(
                    "{}: not a pin zbridge makes; left alone",
                    entry.path().display()
                ),
            }
        }
        let path = maps_dir.join(layout::INPOD_NETNS_MAP);
        let data = MapData::from_pin(&path).map_err(|e| ProgramError::Map {
            map: layout::INPOD_NETNS_MAP,
            op: "open pin",
            error: std::io::Error::other(e.to_string()),
        })?;
        let netns_map =
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|e| ProgramError::Map {
                map: layout::INPOD_NETNS_MAP,
                op: "open",
                error: std::io::Error::other(e.to_string()),
            })?;
        Ok(InPodCapture {
            inbound: InboundCapture::load_pinned(&maps_dir)?,
            netns_map,
            links_dir,
            pods,
        })
    }

    /// Captures a pod in-pod: `netns` is its network namespace, `listener` ztunnel's 15006
    /// listener there, `entry` its cgroup entry (addresses and flags). Replaces an earlier
    /// enrolment of the same pod.
    pub fn enrol(
        &mut self,
        uid: &str,
        netns: BorrowedFd<'_>,
        listener: &OwnedFd,
        entry: CgroupInfo,
    ) -> Result<(), ProgramError> {
        let cookie = netns_cookie(listener).map_err(|e| ProgramError::Map {
            map: layout::INPOD_NETNS_MAP,
            op: "read the listener's SO_NETNS_COOKIE",
            error: e,
        })?;
        let ips = entry.ips();
        let file = pin_name(uid);
        let pin = self.links_dir.join(&file);
        // The new link is attached before the old one goes (both may run for a moment: the
        // first to find a listener hands the connection over), so the pod is never uncaptured.
        let staged = self.links_dir.join(format!("{STAGE_PREFIX}{file}"));
        let _ = std::fs::remove_file(&staged);
        let link: FdLink = self.inbound.attach(netns)?;
        link.pin(&staged).map_err(|e| ProgramError::Program {
            program: "inpod_inbound".to_string(),
            detail: format!("pin link at {}: {e}", staged.display()),
        })?;
        std::fs::rename(&staged, &pin).map_err(|e| ProgramError::path(&pin, "pin link", e))?;
        if let Some(Pod {
            keys: Some((old_cookie, old_ips)),
        }) = self.pods.remove(uid)
        {
            if old_cookie != cookie {
                self.forget_cookie(old_cookie)?;
            }
            let gone: Vec<IpAddr> = old_ips.into_iter().filter(|ip| !ips.contains(ip)).collect();
            self.inbound.remove_listener(&gone)?;
        }
        self.inbound.set_listener(&ips, listener)?;
        self.netns_map
            .insert(cookie, NetnsEntry(entry), 0)
            .map_err(|e| ProgramError::Map {
                map: layout::INPOD_NETNS_MAP,
                op: "insert",
                error: std::io::Error::other(e.to_string()),
            })?;
        self.pods.insert(
            uid.to_string(),
            Pod {
                keys: Some((cookie, ips)),
            },
        );
        Ok(())
    }

    /// Releases a pod: its inbound connections reach it directly again, and ztunnel's
    /// sockets in its namespace are ordinary ones. Unknown pods are skipped.
    pub fn remove(&mut self, uid: &str) -> Result<(), ProgramError> {
        let Some(pod) = self.pods.remove(uid) else {
            return Ok(());
        };
        let pin = self.links_dir.join(pin_name(uid));
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProgramError::path(&pin, "unpin link", e)),
        }
        match pod.keys {
            Some((cookie, ips)) => {
                self.inbound.remove_listener(&ips)?;
                self.forget_cookie(cookie)
            }
            // Enrolled by a previous run: its map entries go with the next retain's sweep.
            None => Ok(()),
        }
    }

    /// Keeps the pods in `keep` and releases every other one, including a previous run's
    /// that were not enrolled again; then removes map entries that no kept pod owns (a
    /// previous run's, whose keys this run never learned). Call it once ztunnel has acked
    /// the snapshot.
    pub fn retain(&mut self, keep: &BTreeSet<String>) -> Result<(), ProgramError> {
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !keep.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.remove(&uid)?;
        }
        let (cookies, ips): (BTreeSet<u64>, BTreeSet<IpAddr>) =
            self.pods.values().filter_map(|p| p.keys.as_ref()).fold(
                (BTreeSet::new(), BTreeSet::new()),
                |(mut c, mut i), (cookie, pod_ips)| {
                    c.insert(*cookie);
                    i.extend(pod_ips.iter().copied());
                    (c, i)
                },
            );
        let stale: Vec<u64> = self
            .netns_map
            .keys()
            .filter_map(Result::ok)
            .filter(|c| !cookies.contains(c))
            .collect();
        for cookie in stale {
            self.forget_cookie(cookie)?;
        }
        self.inbound.retain_listeners(&ips)
    }

    fn forget_cookie(&mut self, cookie: u64) -> Result<(), ProgramError> {
        match self.netns_map.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(ProgramError::Map {
                    map: layout::INPOD_NETNS_MAP,
                    op: "delete",
                    error: std::io::Error::other(e.to_string()),
                })
            }
        }
        Ok(())
    }

    /// The node's own addresses, whose connections to pods are not captured inbound.
    pub fn set_node_addrs(&mut self, ips: &[IpAddr]) -> Result<(), ProgramError> {
        self.inbound.set_node_addrs(ips)
    }

    /// The inbound program's counters.
    pub fn inbound(&self) -> &InboundCapture {
        &self.inbound
    }

    /// The UIDs of the pods enrolled (by this run or, until [`InPodCapture::retain`], a
    /// previous one), sorted.
    pub fn pods(&self) -> Vec<&str> {
        self.pods.keys().map(String::as_str).collect()
    }
}

/// The name a link is pinned under while `enrol` replaces a pod's link (bpffs names may not
/// hold a dot).
const STAGE_PREFIX: &str = "stage_";

/// A pod's pin file name: its UID when it is a plain name (Kubernetes UIDs are: hex digits and
/// dashes), else `x-` and its bytes in hex, so that no UID can name a path outside the
/// directory (bpffs refuses names with a dot).
fn pin_name(uid: &str) -> String {
    let plain = !uid.is_empty()
        && uid.len() <= 120
        && !uid.starts_with("x-")
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if plain {
        uid.to_string()
    } else {
        let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x-{hex}")
    }
}

/// The UID a pin file name stands for (`None`: not a name this module makes for a pod).
pub fn uid_of_pin(name: &str) -> Option<String> {
    let Some(hex) = name.strip_prefix("x-") else {
        return Some(name.to_string());
    };
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The cookie of a socket's network namespace.
pub fn netns_cookie(socket: &impl AsFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 option into a u64 of the given length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_are_plain_or_hex_and_give_the_uid_back() {
        for uid in [
            "6f1c0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a6b",
            "a/../../etc",
            "x-41",
            "stage_p",
            "",
        ] {
            let name = pin_name(uid);
            assert!(!name.contains('/') && !name.contains('.'), "{name}");
            assert!(!name.starts_with(STAGE_PREFIX), "{name}");
            assert_eq!(uid_of_pin(&name).as_deref(), Some(uid), "{name}");
        }
        assert_eq!(pin_name("6f1c-7d"), "6f1c-7d");
        assert_eq!(pin_name("a/b"), "x-612f62");
    }
}
