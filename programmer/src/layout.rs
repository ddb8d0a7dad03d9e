//! Rust mirrors of the map layouts in `bpf/zbridge.h`. Keep the two in step: a test checks
//! sizes and offsets against the BTF of the built object.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Map names, as in the C object.
pub const CGROUP_INFO_MAP: &str = "cgroup_info_map";
pub const SETTINGS_MAP: &str = "settings";
pub const POD_ADDR_MAP: &str = "pod_addr_map";

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

/// `struct pod_addr`: the key of `pod_addr_map` (IPv4 stored IPv4-mapped).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PodAddr {
    pub addr: [u8; 16],
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
