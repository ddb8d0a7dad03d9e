//! Rust mirrors of the map layouts in `bpf/zbridge.h`. Keep the two in step: a test checks
//! sizes and offsets against the BTF of the built object.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Map names, as in the C object.
pub const CGROUP_INFO_MAP: &str = "cgroup_info_map";
pub const SETTINGS_MAP: &str = "settings";
pub const POD_ADDR_MAP: &str = "pod_addr_map";
/// `BPF_MAP_TYPE_TASK_STORAGE`: the connect-time record, one per thread, handed from connect4/6
/// to sock_ops (it cannot be iterated; `zbridge dump` shows no entries for it).
pub const ORIG_DST_BY_TASK_MAP: &str = "orig_dst_by_task";
/// `BPF_MAP_TYPE_LRU_HASH`, [`ConnTuple`] → [`OrigDst`]: the records that answer ztunnel's
/// `SO_ORIGINAL_DST`, each deleted once answered (`bpf/tuple_map.h`).
pub const ORIG_DST_BY_TUPLE_MAP: &str = "orig_dst_by_tuple";
pub const COUNTERS_MAP: &str = "counters";
/// In-pod: an in-pod pod's entry by its network namespace's cookie (`bpf/inpod_capture.h`).
pub const INPOD_NETNS_MAP: &str = "inpod_netns";
/// In-pod DNS: a UDP socket's DNS server (`BPF_MAP_TYPE_SK_STORAGE`, not iterable).
pub const DNS_ORIG_DST_MAP: &str = "dns_orig_dst";

/// Every map of the object, in the order `zbridge dump` shows them.
pub const MAPS: [&str; 8] = [
    CGROUP_INFO_MAP,
    SETTINGS_MAP,
    POD_ADDR_MAP,
    ORIG_DST_BY_TASK_MAP,
    ORIG_DST_BY_TUPLE_MAP,
    COUNTERS_MAP,
    INPOD_NETNS_MAP,
    DNS_ORIG_DST_MAP,
];

/// The layout version: the pin directory's subdirectory (`<pin dir>/v7/`). Bump it when a
/// map's key or value changes, so that a new agent never reads an old agent's maps (the loader
/// removes the pins of every other version). The layout it names is the one in this file and
/// `bpf/zbridge.h`; why the maps have their shape is in docs/design-notes.md, and what each
/// earlier version differed in is in this constant's git history.
pub const LAYOUT_VERSION: &str = "v7";

/// How many ztunnel addresses of each family the programs spread connections over
/// (`ZB_MAX_ZTUNNEL_ADDRS`); further ones are not used.
pub const MAX_ZTUNNEL_ADDRS: usize = 4;

/// Default size of `cgroup_info_map` and `pod_addr_map` (`ZB_CGROUP_ENTRIES`).
pub const DEFAULT_MAX_ENTRIES: u32 = 65536;

pub const F_AMBIENT: u32 = 1 << 0;
pub const F_ZTUNNEL: u32 = 1 << 1;
pub const F_EXEMPT: u32 = 1 << 2;
pub const F_HAS_V4: u32 = 1 << 3;
pub const F_HAS_V6: u32 = 1 << 4;
/// In-pod: ztunnel listens inside the pod's own network namespace (`ZB_F_INPOD`).
pub const F_INPOD: u32 = 1 << 5;
/// In-pod: the pod's DNS goes to ztunnel's 15053 (`ZB_F_DNS`).
pub const F_DNS: u32 = 1 << 6;

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
        self.addresses().collect()
    }

    /// [`CgroupInfo::ips`] one by one, without a vector (the programmer counts references to
    /// them on every write).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        let v4 = (self.flags & F_HAS_V4 != 0)
            .then(|| IpAddr::V4(Ipv4Addr::from(u32::from_be(self.addr4))));
        let v6 = (self.flags & F_HAS_V6 != 0).then(|| IpAddr::V6(Ipv6Addr::from(self.addr6)));
        v4.into_iter().chain(v6)
    }
}

/// `struct settings`: the single value of the `settings` array map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    pub flags: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Bit N set: some entry sits at cgroup level N (root = 0).
    pub levels: u32,
    /// How many of `ztunnel_addr4` are used.
    pub ztunnel_count4: u8,
    /// How many of `ztunnel_addr6` are used.
    pub ztunnel_count6: u8,
    pub reserved: u16,
    /// Moves after every change of `cgroup_info_map` or of these settings: the programs' cached
    /// decision of a thread is good for one generation only. Backends count it
    /// ([`crate::MapBatch::settings_after`]).
    pub generation: u32,
    /// Network byte order.
    pub ztunnel_addr4: [u32; MAX_ZTUNNEL_ADDRS],
    pub ztunnel_addr6: [[u8; 16]; MAX_ZTUNNEL_ADDRS],
}

impl Settings {
    /// The ztunnel addresses the programs use (IPv4 first, each family in its order).
    pub fn ztunnel_ips(&self) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        if self.flags & S_HAS_ZTUNNEL4 != 0 {
            let n = usize::from(self.ztunnel_count4).min(MAX_ZTUNNEL_ADDRS);
            ips.extend(
                self.ztunnel_addr4[..n]
                    .iter()
                    .map(|a| IpAddr::V4(Ipv4Addr::from(u32::from_be(*a)))),
            );
        }
        if self.flags & S_HAS_ZTUNNEL6 != 0 {
            let n = usize::from(self.ztunnel_count6).min(MAX_ZTUNNEL_ADDRS);
            ips.extend(
                self.ztunnel_addr6[..n]
                    .iter()
                    .map(|a| IpAddr::V6(Ipv6Addr::from(*a))),
            );
        }
        ips
    }

    /// Sets ztunnel's addresses: the first [`MAX_ZTUNNEL_ADDRS`] of each family, in order
    /// (the programs' choice depends on the order). Returns the addresses left out.
    pub fn set_ztunnel_ips(&mut self, ips: &[IpAddr]) -> Vec<IpAddr> {
        self.flags &= !(S_HAS_ZTUNNEL4 | S_HAS_ZTUNNEL6);
        self.ztunnel_count4 = 0;
        self.ztunnel_count6 = 0;
        self.ztunnel_addr4 = [0; MAX_ZTUNNEL_ADDRS];
        self.ztunnel_addr6 = [[0; 16]; MAX_ZTUNNEL_ADDRS];
        let mut left_out = Vec::new();
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => {
                    let n = usize::from(self.ztunnel_count4);
                    let be = u32::from(*v4).to_be();
                    if self.ztunnel_addr4[..n].contains(&be) {
                        continue;
                    }
                    if n == MAX_ZTUNNEL_ADDRS {
                        left_out.push(*ip);
                        continue;
                    }
                    self.ztunnel_addr4[n] = be;
                    self.ztunnel_count4 += 1;
                    self.flags |= S_HAS_ZTUNNEL4;
                }
                IpAddr::V6(v6) => {
                    let n = usize::from(self.ztunnel_count6);
                    if self.ztunnel_addr6[..n].contains(&v6.octets()) {
                        continue;
                    }
                    if n == MAX_ZTUNNEL_ADDRS {
                        left_out.push(*ip);
                        continue;
                    }
                    self.ztunnel_addr6[n] = v6.octets();
                    self.ztunnel_count6 += 1;
                    self.flags |= S_HAS_ZTUNNEL6;
                }
            }
        }
        left_out
    }

    /// The ztunnel address the programs send a connection to `dst` to (`None`: no address of
    /// its family is known). An IPv4-mapped IPv6 destination is decided as IPv4.
    pub fn ztunnel_for(&self, dst: SocketAddr) -> Option<IpAddr> {
        let ip = PodAddr::from(dst.ip()).ip();
        let family: Vec<IpAddr> = self
            .ztunnel_ips()
            .into_iter()
            .filter(|z| z.is_ipv4() == ip.is_ipv4())
            .collect();
        if family.is_empty() {
            return None;
        }
        Some(family[ztunnel_index(ip, dst.port(), family.len() as u32) as usize])
    }
}

/// Which of ztunnel's `n` addresses of its family a destination goes to: the mirror of
/// `zb_ztunnel_index` in `bpf/helpers.h` (the same hash over the same words, read in the
/// CPU's byte order as the program reads them). `port` is the destination port (0 for a
/// rewritten bind, whose hash is over the address alone).
pub fn ztunnel_index(dst: IpAddr, port: u16, n: u32) -> u32 {
    let bytes = PodAddr::from(dst).addr;
    let mut h = u32::from(u16::from_ne_bytes(port.to_be_bytes()));
    for word in bytes.chunks_exact(4) {
        h ^= u32::from_ne_bytes(word.try_into().expect("4 bytes"));
    }
    let h = h.wrapping_mul(0x9e37_79b1);
    (((u64::from(h >> 16)) * u64::from(n)) >> 16) as u32
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

/// `struct connect_record`: a thread's own storage in `orig_dst_by_task` (the map is keyed by
/// the thread; from user space, by a pidfd). The programs hand the original destination from
/// connect4/6 to sock_ops in it and cache the thread's cgroup entry in it; user space only
/// reads it (tests, diagnostics).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectRecord {
    /// 1 from a redirect until the thread's next TCP_CONNECT takes the record.
    pub armed: u32,
    /// `ZB_REC_*`: how the armed redirect went.
    pub flags: u32,
    /// Where that connect was going.
    pub dst: OrigDst,
    pub reserved: u32,
    /// The cgroup whose entry is cached (0: none).
    pub cached_cgroup: u64,
    /// The `settings.generation` the cached entry was read in.
    pub cached_generation: u32,
    pub reserved2: u32,
    /// The cached entry: the cgroup's own, or its nearest enrolled ancestor's.
    pub cached_info: CgroupInfo,
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

impl ConnTuple {
    /// A connection seen from its client: `src` the client, `dst` ztunnel's capture socket.
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        ConnTuple {
            src: PodAddr::from(src.ip()).addr,
            dst: PodAddr::from(dst.ip()).addr,
            sport: src.port().to_be(),
            dport: dst.port().to_be(),
        }
    }
}

/// `ZB_TUPLE_RECORDS`: the records `orig_dst_by_tuple` holds (its `max_entries`); when it is
/// full, the kernel's LRU takes back the least recently used one.
pub const TUPLE_RECORDS: u32 = 65536;

/// `enum zb_counter`: the indices of the per-CPU `counters` array, with their names.
pub const COUNTER_NAMES: [&str; COUNTER_COUNT] = [
    "redirected_out",
    "redirected_in",
    "passed",
    "fail_closed",
    "fail_open",
    "orig_dst_hit",
    "orig_dst_miss",
    "refused_loop",
    "bind_rewritten",
    "orig_dst_not_stored",
    "redirected_dns",
    "orig_dst_local",
];

/// `ZB_C_MAX`: how many counters there are.
pub const COUNTER_COUNT: usize = 12;

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
    /// `SO_ORIGINAL_DST` on a capture socket with no record: not stored, evicted by the
    /// LRU, already answered, or a connection that was not redirected. Counted once per
    /// connection, at the `SOL_IPV6` question that ztunnel asks whenever its `SOL_IP`
    /// question found nothing (a client that asks `SOL_IP` alone is not counted).
    pub orig_dst_miss: u64,
    /// A connect straight to a capture port, refused (it would loop through ztunnel).
    pub refused_loop: u64,
    /// ztunnel's bind to a pod address moved to its own address.
    pub bind_rewritten: u64,
    /// sock_ops could not store a connection's record (the update of `orig_dst_by_tuple`
    /// failed): that connection's `SO_ORIGINAL_DST` misses. Records the LRU evicts are not
    /// counted here (the kernel does not tell); their question counts as a miss.
    pub orig_dst_not_stored: u64,
    /// In-pod: a DNS query sent to ztunnel's 15053 in the pod.
    pub redirected_dns: u64,
    /// In-pod: `SO_ORIGINAL_DST` of an accepted inbound socket answered with its local
    /// address.
    pub orig_dst_local: u64,
}

impl Counters {
    /// From the summed values, by index of `enum zb_counter`.
    pub fn from_values(v: &[u64; COUNTER_COUNT]) -> Self {
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
            orig_dst_not_stored: v[9],
            redirected_dns: v[10],
            orig_dst_local: v[11],
        }
    }

    /// Name and value of each counter, in index order.
    pub fn pairs(&self) -> [(&'static str, u64); COUNTER_COUNT] {
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
            self.orig_dst_not_stored,
            self.redirected_dns,
            self.orig_dst_local,
        ];
        std::array::from_fn(|i| (COUNTER_NAMES[i], v[i]))
    }
}

// SAFETY (aya's `Pod`: handed to the kernel as bytes): #[repr(C)] structs of integers and byte
// arrays without padding, any bit pattern valid (sizes 24, 96, 16, 20, 56 and 36, checked
// against the object's BTF by a test).
unsafe impl aya::Pod for CgroupInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for Settings {}
// SAFETY: as above.
unsafe impl aya::Pod for PodAddr {}
// SAFETY: as above.
unsafe impl aya::Pod for OrigDst {}
// SAFETY: as above.
unsafe impl aya::Pod for ConnectRecord {}
// SAFETY: as above.
unsafe impl aya::Pod for ConnTuple {}

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
