//! Rust mirrors of the map layouts in `bpf/zbridge.h`. Keep the two in step: a test checks
//! sizes and offsets against the BTF of the built object.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Map names, as in the C object.
pub const CGROUP_INFO_MAP: &str = "cgroup_info_map";
pub const SETTINGS_MAP: &str = "settings";
pub const POD_ADDR_MAP: &str = "pod_addr_map";
pub const ORIG_DST_BY_COOKIE_MAP: &str = "orig_dst_by_cookie";
pub const ORIG_DST_BY_TUPLE_MAP: &str = "orig_dst_by_tuple";
pub const COUNTERS_MAP: &str = "counters";

/// Every map of the object, in the order `zbridge dump` shows them.
pub const MAPS: [&str; 6] = [
    CGROUP_INFO_MAP,
    SETTINGS_MAP,
    POD_ADDR_MAP,
    ORIG_DST_BY_COOKIE_MAP,
    ORIG_DST_BY_TUPLE_MAP,
    COUNTERS_MAP,
];

/// The layout version: the pin directory's subdirectory (`<pin dir>/v1/`). Bump it when a
/// map's key or value changes, so that a new agent never reads an old agent's maps.
pub const LAYOUT_VERSION: &str = "v1";

/// Default size of `cgroup_info_map` and `pod_addr_map` (`ZB_CGROUP_ENTRIES`).
pub const DEFAULT_MAX_ENTRIES: u32 = 65536;

pub const F_AMBIENT: u32 = 1 << 0;
pub const F_ZTUNNEL: u32 = 1 << 1;
pub const F_EXEMPT: u32 = 1 << 2;
pub const F_HAS_V4: u32 = 1 << 3;
pub const F_HAS_V6: u32 = 1 << 4;

pub const S_HAS_ZTUNNEL4: u32 = 1 << 0;
pub const S_HAS_ZTUNNEL6: u32 = 1 << 1;
pub const S_FAIL_OPEN: u32 = 1 << 2;
pub const S_DEBUG: u32 = 1 << 3;

/// ztunnel's outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's inbound capture port.
pub const INBOUND_PORT: u16 = 15006;

/// `struct cgroup_info`: the value of `cgroup_info_map`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupInfo {
    pub flags: u32,
    /// Network byte order.
    pub addr4: u32,
    pub addr6: [u8; 16],
}

impl CgroupInfo {
    /// The pod's addresses as the programs see them (IPv4 first).
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        if self.flags & F_HAS_V4 != 0 {
            ips.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(self.addr4))));
        }
        if self.flags & F_HAS_V6 != 0 {
            ips.push(IpAddr::V6(Ipv6Addr::from(self.addr6)));
        }
        ips
    }
}

/// `struct settings`: the single value of the `settings` array map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    pub flags: u32,
    /// Network byte order.
    pub ztunnel_addr4: u32,
    pub ztunnel_addr6: [u8; 16],
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Bit N set: some entry sits at cgroup level N (root = 0).
    pub levels: u32,
}

impl Settings {
    /// The ztunnel addresses the programs use (IPv4 first).
    pub fn ztunnel_ips(&self) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        if self.flags & S_HAS_ZTUNNEL4 != 0 {
            ips.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(self.ztunnel_addr4))));
        }
        if self.flags & S_HAS_ZTUNNEL6 != 0 {
            ips.push(IpAddr::V6(Ipv6Addr::from(self.ztunnel_addr6)));
        }
        ips
    }
}

/// `struct orig_dst`: where a redirected connect was going.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// IPv4 stored IPv4-mapped.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
}

/// `struct conn_tuple`: a connection seen from its client (addresses IPv4-mapped, ports in
/// network byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnTuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// `enum zb_counter`: the indices of the per-CPU `counters` array, with their names.
pub const COUNTER_NAMES: [&str; 9] = [
    "redirected_out",
    "redirected_in",
    "passed",
    "fail_closed",
    "fail_open",
    "orig_dst_hit",
    "orig_dst_miss",
    "refused_loop",
    "bind_rewritten",
];

/// The counters, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// An ambient pod's connect sent to ztunnel's outbound port.
    pub redirected_out: u64,
    /// A host process's connect to an ambient pod sent to ztunnel's inbound port.
    pub redirected_in: u64,
    /// An ambient pod's connect left alone by a rule (loopback, its own address).
    pub passed: u64,
    /// No ztunnel known: the connect was refused.
    pub fail_closed: u64,
    /// No ztunnel known: the connect went out uncaptured (fail-open).
    pub fail_open: u64,
    /// `SO_ORIGINAL_DST` answered.
    pub orig_dst_hit: u64,
    /// `SO_ORIGINAL_DST` on a capture socket with no record.
    pub orig_dst_miss: u64,
    /// A connect straight to a capture port, refused (it would loop through ztunnel).
    pub refused_loop: u64,
    /// ztunnel's bind to a pod address moved to its own address.
    pub bind_rewritten: u64,
}

impl Counters {
    /// From the summed values, by index of `enum zb_counter`.
    pub fn from_values(v: &[u64; 9]) -> Self {
        Counters {
            redirected_out: v[0],
            redirected_in: v[1],
            passed: v[2],
            fail_closed: v[3],
            fail_open: v[4],
            orig_dst_hit: v[5],
            orig_dst_miss: v[6],
            refused_loop: v[7],
            bind_rewritten: v[8],
        }
    }

    /// Name and value of each counter, in index order.
    pub fn pairs(&self) -> [(&'static str, u64); 9] {
        let v = [
            self.redirected_out,
            self.redirected_in,
            self.passed,
            self.fail_closed,
            self.fail_open,
            self.orig_dst_hit,
            self.orig_dst_miss,
            self.refused_loop,
            self.bind_rewritten,
        ];
        std::array::from_fn(|i| (COUNTER_NAMES[i], v[i]))
    }
}

// SAFETY: #[repr(C)] structs of integers and byte arrays without padding (sizes 24, 32, 16,
// 20 and 36, checked against the object's BTF by a test).
unsafe impl crate::sys::Plain for CgroupInfo {}
// SAFETY: as above.
unsafe impl crate::sys::Plain for Settings {}
// SAFETY: as above.
unsafe impl crate::sys::Plain for PodAddr {}
// SAFETY: as above.
unsafe impl crate::sys::Plain for OrigDst {}
// SAFETY: as above.
unsafe impl crate::sys::Plain for ConnTuple {}

/// `struct pod_addr`: the key of `pod_addr_map` (IPv4 stored IPv4-mapped).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PodAddr {
    pub addr: [u8; 16],
}

impl PodAddr {
    /// The address, IPv4 when it is IPv4-mapped.
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<IpAddr> for PodAddr {
    fn from(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        PodAddr { addr: v6.octets() }
    }
}
