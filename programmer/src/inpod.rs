//! In-pod capture's per-pod state in the kernel: for each pod that ztunnel serves inside the
//! pod's own network namespace (ztunnel's `shared` mode), the `sk_lookup` program attached to
//! that namespace with ztunnel's 15006 listener for the pod's addresses ([`crate::inbound`]),
//! and the pod's entry by namespace cookie in `inpod_netns`, which the socket hooks read for
//! ztunnel's sockets in that namespace (bind, accepted inbound sockets).
//!
//! The pod's cgroup entry itself (flag `F_INPOD`) is written by the [`crate::Programmer`] like
//! every other entry; the caller enrols a pod here first, then its cgroup entry, so that no
//! connection is sent to a listener that is not there yet.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

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

/// One enrolled in-pod pod.
struct Pod {
    /// Keeps the `sk_lookup` program attached to the pod's namespace.
    _link: FdLink,
    cookie: u64,
    ips: Vec<IpAddr>,
}

/// The in-pod pods enrolled in the kernel, by pod UID.
pub struct InPodCapture {
    inbound: InboundCapture,
    netns_map: HashMap<MapData, u64, NetnsEntry>,
    pods: BTreeMap<String, Pod>,
}

impl InPodCapture {
    /// Loads the inbound program and opens `inpod_netns` among the pinned maps of `pin_dir`
    /// (the loader's, [`crate::Loaded::pin_dir`]).
    pub fn open(pin_dir: &Path) -> Result<Self, ProgramError> {
        let path = crate::loader::maps_dir(pin_dir).join(layout::INPOD_NETNS_MAP);
        let data = MapData::from_pin(&path).map_err(|e| ProgramError::Map {
            map: layout::INPOD_NETNS_MAP,
            op: "open pin",
            source: std::io::Error::other(e.to_string()),
        })?;
        let netns_map =
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|e| ProgramError::Map {
                map: layout::INPOD_NETNS_MAP,
                op: "open",
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(InPodCapture {
            inbound: InboundCapture::load()?,
            netns_map,
            pods: BTreeMap::new(),
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
            source: e,
        })?;
        let ips = entry.ips();
        self.remove(uid)?;
        let link = self.inbound.attach(netns)?;
        self.inbound.set_listener(&ips, listener)?;
        self.netns_map
            .insert(cookie, NetnsEntry(entry), 0)
            .map_err(|e| ProgramError::Map {
                map: layout::INPOD_NETNS_MAP,
                op: "insert",
                source: std::io::Error::other(e.to_string()),
            })?;
        self.pods.insert(
            uid.to_string(),
            Pod {
                _link: link,
                cookie,
                ips,
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
        self.inbound.remove_listener(&pod.ips)?;
        match self.netns_map.remove(&pod.cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(ProgramError::Map {
                    map: layout::INPOD_NETNS_MAP,
                    op: "delete",
                    source: std::io::Error::other(e.to_string()),
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

    /// The UIDs of the pods enrolled, sorted.
    pub fn pods(&self) -> Vec<&str> {
        self.pods.keys().map(String::as_str).collect()
    }
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
