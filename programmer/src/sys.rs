//! Raw `bpf(2)` calls for what aya 0.14 lacks; each says which gap it fills. Everything else
//! (opening and pinning maps, map info, element operations, attaching the programs that aya
//! can pin a link of) goes through aya.
//!
//! Each call returns the kernel's `io::Error`; callers add the map or program name.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aya::Pod;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `BPF_ANY`: create or replace.
pub const BPF_ANY: u64 = 0;

/// A pidfd for process `pid` (`pidfd_open(2)`, no flags: a thread that is not its group's
/// leader is refused; it would need `PIDFD_THREAD`, Linux 6.9+). Task storage is keyed by one.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the kernel returns a new descriptor or -1.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`, valid for its size;
    // the kernel zero-extends what it does not receive.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut A).cast::<libc::c_void>(),
            size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// `BPF_OBJ_GET` of a pinned link.
/// aya 0.14 gap: its `PinnedLink` hands out no fd, which [`link_info`] and [`link_update`] need.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN` of a link made by [`link_create`].
/// aya 0.14 gap: it pins only an `FdLink` of its own, which that link is not.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// The start of `struct bpf_link_info` for a cgroup link.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
    _pad2: u32,
}

/// `BPF_LINK_TYPE_CGROUP`.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// What a (cgroup) link is: its program and, for cgroup links, the cgroup and attach type.
/// aya 0.14 gap: its `LinkInfo` has the link's id, program and type, not its cgroup.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<CgroupLinkInfo>() as u32,
        info: (&mut info as *mut CgroupLinkInfo) as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// `BPF_LINK_CREATE` of a cgroup link (detached when its last fd and pin are gone).
/// aya 0.14 gap: the link `CgroupSockopt::attach` makes cannot be taken as an `FdLink`, so it
/// cannot be pinned.
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: a new fd owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: swaps the program of a link in place (no moment without a program).
/// aya 0.14 gap: it re-points only XDP and TC links of its own, never a pinned link.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Looks up `key`; `Ok(None)` when absent.
/// aya 0.14 gap: it has no typed map for `BPF_MAP_TYPE_TASK_STORAGE` (keyed by a pidfd).
pub fn lookup_elem<K: Pod, V: Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::zeroed();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: (key as *const K) as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        // SAFETY: zeroed, then written by the kernel; V is Pod (any bit pattern is valid).
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_UPDATE_BATCH` of `keys` with `values` (the same length). Returns how many the
/// kernel applied, and its error if it stopped early.
/// aya 0.14 gap: it has no batch operations.
pub fn update_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, io::Result<()>) {
    assert_eq!(keys.len(), values.len(), "update_batch: keys and values");
    let count = keys.len();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: BPF_ANY,
        ..Default::default()
    };
    let result = sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map(|_| ());
    let done = if result.is_ok() {
        count
    } else {
        attr.count as usize
    };
    (done, result)
}

/// `BPF_MAP_DELETE_BATCH` of `keys`. Returns how many the kernel deleted, and its error if it
/// stopped early (ENOENT: the key at that index was absent).
/// aya 0.14 gap: it has no batch operations.
pub fn delete_batch<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> (usize, io::Result<()>) {
    let count = keys.len();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    let result = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr).map(|_| ());
    let done = if result.is_ok() {
        count
    } else {
        attr.count as usize
    };
    (done, result)
}

/// `BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)` (aya's): the kernel counts each program's runs and
/// run time while the returned fd is open (benchmarks read them from the program info).
pub fn enable_run_time_stats() -> io::Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| io::Error::new(e.io_error.kind(), format!("{}: {}", e.call, e.io_error)))
}
