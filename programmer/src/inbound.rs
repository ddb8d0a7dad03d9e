//! In-pod inbound capture: the `sk_lookup` program of `bpf/inpod_inbound.bpf.c`, attached to
//! each in-pod pod's network namespace, hands the pod's inbound TCP connections to ztunnel's
//! 15006 listener in that namespace (the accepted socket's local address stays the original
//! destination). This module loads that object, attaches it to namespaces, and fills its maps:
//! which listener serves which pod address, and the node's own addresses (whose connections,
//! such as the kubelet's probes, reach the pod directly).

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::links::FdLink;
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};

use crate::ProgramError;

/// The object clang built from `bpf/inpod_inbound.bpf.c` (4-byte aligned, as aya requires).
pub static INBOUND_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inpod_inbound.bpf.o"));

const PROGRAM: &str = "inpod_inbound";
const LISTENER_MAP: &str = "inbound_listener";
const NODE_ADDR_MAP: &str = "node_addr_map";
const PODS_MAP: &str = "inbound_pods";
pub(crate) const COUNTER_MAP: &str = "inbound_counters";
/// The number of counters (`ZB_IN_MAX` in bpf/inpod.h).
pub(crate) const COUNTER_COUNT: usize = 6;

/// A key of `inbound_listener` and `node_addr_map`: an address, IPv4-mapped for IPv4
/// (`struct pod_addr` in bpf/zbridge.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct AddrKey([u8; 16]);

// SAFETY: a plain byte array, no padding, every bit pattern valid.
unsafe impl aya::Pod for AddrKey {}

impl From<IpAddr> for AddrKey {
    fn from(ip: IpAddr) -> Self {
        AddrKey(match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        })
    }
}

/// The program's counters (`enum zb_inbound_counter` in bpf/inpod.h), summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboundCounters {
    /// Connections handed to ztunnel's 15006 listener.
    pub redirected: u64,
    /// Connections from a node address, left to reach the pod.
    pub passed_node: u64,
    /// Connections to an address with no listener (not captured, or not yet acked).
    pub no_listener: u64,
    /// Connections from outside straight to 15001/15006, dropped (they would loop).
    pub refused_loop: u64,
    /// Connections whose listener the kernel refused (gone, or of the wrong family).
    pub assign_failed: u64,
    /// Connections to an enrolled pod whose ztunnel listener is gone (ztunnel restarting),
    /// refused rather than handed to the app behind ztunnel's back.
    pub no_ztunnel: u64,
}

impl InboundCounters {
    /// The counters from their values in index order (`enum zb_inbound_counter`).
    pub(crate) fn from_values(v: &[u64; COUNTER_COUNT]) -> InboundCounters {
        InboundCounters {
            redirected: v[0],
            passed_node: v[1],
            no_listener: v[2],
            refused_loop: v[3],
            assign_failed: v[4],
            no_ztunnel: v[5],
        }
    }

    /// The counters by name, as `zbridge dump` and the metrics print them.
    pub fn pairs(&self) -> [(&'static str, u64); 6] {
        [
            ("inbound_redirected", self.redirected),
            ("inbound_passed_node", self.passed_node),
            ("inbound_no_listener", self.no_listener),
            ("inbound_refused_loop", self.refused_loop),
            ("inbound_assign_failed", self.assign_failed),
            ("inbound_no_ztunnel", self.no_ztunnel),
        ]
    }
}

/// The loaded inbound program and its maps. Dropping it detaches the program from every
/// namespace whose link it still holds.
pub struct InboundCapture {
    ebpf: Ebpf,
}

impl InboundCapture {
    /// Loads the object and the program (through the verifier); attaches nothing yet. Its
    /// maps live only as long as this value (tests; see [`InboundCapture::load_pinned`]).
    pub fn load() -> Result<Self, ProgramError> {
        Self::load_with(EbpfLoader::new())
    }

    /// Like [`InboundCapture::load`], with the maps pinned in `maps_dir` (reused when a
    /// previous run pinned them: the listeners in `inbound_listener` stay in the kernel, so
    /// inbound capture goes on while the agent restarts).
    pub fn load_pinned(maps_dir: &Path) -> Result<Self, ProgramError> {
        let mut loader = EbpfLoader::new();
        let paths: Vec<_> = [LISTENER_MAP, PODS_MAP, NODE_ADDR_MAP, COUNTER_MAP]
            .into_iter()
            .map(|name| (name, maps_dir.join(name)))
            .collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        Self::load_with(loader)
    }

    fn load_with(mut loader: EbpfLoader<'_>) -> Result<Self, ProgramError> {
        let mut ebpf = loader
            .load(INBOUND_OBJECT)
            .map_err(|e| ProgramError::Object(format!("{}: {e}", "inpod_inbound.bpf.o")))?;
        let program = sk_lookup(&mut ebpf)?;
        program
            .load()
            .map_err(|e| crate::loader::load_error(PROGRAM, e))?;
        Ok(InboundCapture { ebpf })
    }

    /// Attaches the program to a network namespace (`/proc/PID/ns/net` or a netns file) and
    /// returns the link, which keeps it attached while it lives (or while it is pinned).
    pub fn attach(&mut self, netns: impl AsFd) -> Result<FdLink, ProgramError> {
        let program = sk_lookup(&mut self.ebpf)?;
        let link_id = program.attach(netns).map_err(|e| ProgramError::Program {
            program: PROGRAM.to_string(),
            detail: format!("attach to a network namespace: {e}"),
        })?;
        let link = program
            .take_link(link_id)
            .map_err(|e| ProgramError::Program {
                program: PROGRAM.to_string(),
                detail: format!("take the link: {e}"),
            })?;
        Ok(link.into())
    }

    /// Makes `listener` (ztunnel's 15006 listening socket in the pod's namespace) serve the
    /// pod's addresses. Replaces an earlier listener of those addresses.
    pub fn set_listener(
        &mut self,
        pod_ips: &[IpAddr],
        listener: &impl AsRawFd,
    ) -> Result<(), ProgramError> {
        let mut pods = self.pods_map()?;
        for ip in pod_ips {
            pods.insert(AddrKey::from(*ip), 1, 0)
                .map_err(|e| map_error(PODS_MAP, "insert", e))?;
        }
        let mut map = self.listener_map()?;
        for ip in pod_ips {
            map.insert(AddrKey::from(*ip), listener.as_raw_fd(), 0)
                .map_err(|e| map_error(LISTENER_MAP, "insert", e))?;
        }
        Ok(())
    }

    /// Stops capturing the pod's addresses (its connections reach the pod directly again).
    /// Addresses that had no listener are skipped.
    pub fn remove_listener(&mut self, pod_ips: &[IpAddr]) -> Result<(), ProgramError> {
        // The pod first: a connection in between reaches the pod, never a dropped SYN.
        let mut pods = self.pods_map()?;
        for ip in pod_ips {
            match pods.remove(&AddrKey::from(*ip)) {
                Ok(()) => {}
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_error(PODS_MAP, "delete", e)),
            }
        }
        let mut map = self.listener_map()?;
        for ip in pod_ips {
            match map.remove(&AddrKey::from(*ip)) {
                Ok(()) => {}
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_error(LISTENER_MAP, "delete", e)),
            }
        }
        Ok(())
    }

    /// Removes every listener entry whose address is not in `keep` (a previous run's pods
    /// that are gone).
    pub fn retain_listeners(
        &mut self,
        keep: &std::collections::BTreeSet<IpAddr>,
    ) -> Result<(), ProgramError> {
        let keep: Vec<AddrKey> = keep.iter().map(|ip| AddrKey::from(*ip)).collect();
        let mut pods = self.pods_map()?;
        let stale: Vec<AddrKey> = pods
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for key in stale {
            match pods.remove(&key) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_error(PODS_MAP, "delete", e)),
            }
        }
        let mut map = self.listener_map()?;
        let stale: Vec<AddrKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for key in stale {
            match map.remove(&key) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_error(LISTENER_MAP, "delete", e)),
            }
        }
        Ok(())
    }

    /// Sets the node's own addresses (replacing the earlier set): connections from them reach
    /// pods directly, as the kubelet's probes must.
    pub fn set_node_addrs(&mut self, ips: &[IpAddr]) -> Result<(), ProgramError> {
        let map = self
            .ebpf
            .map_mut(NODE_ADDR_MAP)
            .ok_or_else(|| ProgramError::Object(format!("no map `{NODE_ADDR_MAP}`")))?;
        let mut map: HashMap<&mut MapData, AddrKey, u32> =
            HashMap::try_from(map).map_err(|e| map_error(NODE_ADDR_MAP, "open", e))?;
        let wanted: Vec<AddrKey> = ips.iter().map(|ip| AddrKey::from(*ip)).collect();
        let stale: Vec<AddrKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            map.remove(&key)
                .map_err(|e| map_error(NODE_ADDR_MAP, "delete", e))?;
        }
        for key in wanted {
            map.insert(key, 1, 0)
                .map_err(|e| map_error(NODE_ADDR_MAP, "insert", e))?;
        }
        Ok(())
    }

    /// The program's counters, summed over CPUs.
    pub fn counters(&self) -> Result<InboundCounters, ProgramError> {
        let map = self
            .ebpf
            .map(COUNTER_MAP)
            .ok_or_else(|| ProgramError::Object(format!("no map `{COUNTER_MAP}`")))?;
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|e| map_error(COUNTER_MAP, "open", e))?;
        let mut sums = [0u64; COUNTER_COUNT];
        for (index, sum) in sums.iter_mut().enumerate() {
            *sum = array
                .get(&(index as u32), 0)
                .map_err(|e| map_error(COUNTER_MAP, "lookup", e))?
                .iter()
                .sum();
        }
        Ok(InboundCounters::from_values(&sums))
    }

    fn pods_map(&mut self) -> Result<HashMap<&mut MapData, AddrKey, u32>, ProgramError> {
        let map = self
            .ebpf
            .map_mut(PODS_MAP)
            .ok_or_else(|| ProgramError::Object(format!("no map `{PODS_MAP}`")))?;
        HashMap::try_from(map).map_err(|e| map_error(PODS_MAP, "open", e))
    }

    fn listener_map(&mut self) -> Result<SockHash<&mut MapData, AddrKey>, ProgramError> {
        let map = self
            .ebpf
            .map_mut(LISTENER_MAP)
            .ok_or_else(|| ProgramError::Object(format!("no map `{LISTENER_MAP}`")))?;
        SockHash::try_from(map).map_err(|e| map_error(LISTENER_MAP, "open", e))
    }
}

fn sk_lookup(ebpf: &mut Ebpf) -> Result<&mut SkLookup, ProgramError> {
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| ProgramError::Object(format!("no program `{PROGRAM}`")))?
        .try_into()
        .map_err(|e| ProgramError::Program {
            program: PROGRAM.to_string(),
            detail: format!("not an sk_lookup program: {e}"),
        })
}

fn map_error(map: &'static str, op: &'static str, e: aya::maps::MapError) -> ProgramError {
    let source = match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other.to_string()),
    };
    ProgramError::Map {
        map,
        op,
        error: source,
    }
}
