//! The BPF object, as clang built it from `bpf/` (by `build.rs`), embedded in the binary so
//! that deployment needs no compiler; and what it declares (maps, programs).

use std::collections::BTreeMap;

use crate::ProgramError;

/// The object's bytes (4-byte aligned, as aya requires).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zbridge.bpf.o"));

/// Where build.rs wrote the object (for tools such as `bpftool btf dump file`).
pub const OBJECT_PATH: &str = concat!(env!("OUT_DIR"), "/zbridge.bpf.o");

/// How a program attaches to its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// `cgroup/connect4`, `connect6`, `bind4`, `bind6` (aya's `CgroupSockAddr`).
    SockAddr,
    /// `sockops`.
    SockOps,
    /// `cgroup/getsockopt` (aya's `CgroupSockopt`).
    Sockopt,
}

/// The programs, by function name, in attach order: the ones that complete a redirect
/// (sockops, getsockopt, bind) before the connect hooks that start it, so that no connection
/// is redirected without its original destination being answerable.
/// The third field is the kernel's `enum bpf_attach_type`.
/// The DNS reply programs (recvmsg) come before the ones that send queries to ztunnel
/// (sendmsg, connect), for the same reason.
pub const PROGRAMS: [(&str, ProgramKind, u32); 10] = [
    ("sock_ops", ProgramKind::SockOps, 3),    // BPF_CGROUP_SOCK_OPS
    ("getsockopt", ProgramKind::Sockopt, 21), // BPF_CGROUP_GETSOCKOPT
    ("bind4", ProgramKind::SockAddr, 8),      // BPF_CGROUP_INET4_BIND
    ("bind6", ProgramKind::SockAddr, 9),      // BPF_CGROUP_INET6_BIND
    ("recvmsg4", ProgramKind::SockAddr, 19),  // BPF_CGROUP_UDP4_RECVMSG
    ("recvmsg6", ProgramKind::SockAddr, 20),  // BPF_CGROUP_UDP6_RECVMSG
    ("sendmsg4", ProgramKind::SockAddr, 14),  // BPF_CGROUP_UDP4_SENDMSG
    ("sendmsg6", ProgramKind::SockAddr, 15),  // BPF_CGROUP_UDP6_SENDMSG
    ("connect4", ProgramKind::SockAddr, 10),  // BPF_CGROUP_INET4_CONNECT
    ("connect6", ProgramKind::SockAddr, 11),  // BPF_CGROUP_INET6_CONNECT
];

/// A map as the object declares it (before any max-entries override).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSpec {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// `BPF_F_*` (BPF_F_MMAPABLE changes where a map's elements start).
    pub map_flags: u32,
}

/// The object's named maps (not the `.rodata`-style data sections clang adds).
pub fn map_specs(object: &[u8]) -> Result<BTreeMap<String, MapSpec>, ProgramError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| ProgramError::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, map)| {
            (
                name.clone(),
                MapSpec {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                    map_flags: map.map_flags(),
                },
            )
        })
        .collect())
}
