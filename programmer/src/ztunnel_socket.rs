//! Finding ztunnel's listening socket in a pod's network namespace, for in-pod inbound capture.
//!
//! In-pod ztunnel opens its 15006 listener inside each pod's namespace itself; the `sk_lookup`
//! program can hand connections only to a socket in its `inbound_listener` map, and a socket
//! enters a map by a file descriptor of the inserting process. So the agent takes a duplicate
//! of ztunnel's descriptor with `pidfd_getfd(2)` (it needs `PTRACE_MODE_ATTACH` over ztunnel:
//! CAP_SYS_PTRACE in the DaemonSet), after checking on the duplicate itself that it is a TCP
//! listener on that port in that namespace (`SIOCGSKNS` gives a socket's namespace).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `ioctl` that opens the network namespace of a socket (linux/sockios.h).
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// Returns a duplicate of the TCP listening socket of process `pid` bound to `port` in the
/// network namespace whose inode is `netns_inode`, or `None` when the process has none (yet).
pub fn take_listener(pid: i32, netns_inode: u64, port: u16) -> io::Result<Option<OwnedFd>> {
    let pidfd = pidfd_open(pid)?;
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<RawFd> = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let Ok(entry) = entry else { continue };
        if let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        {
            fds.push(fd);
        }
    }
    // Highest number first: the listener asked for was opened just before ztunnel's ack, and
    // the kernel gives a new descriptor the lowest free number, so a recent one is usually
    // among the highest (not always: a lower number freed meanwhile is taken first, and then
    // the search only goes further). A ztunnel serving many pods holds many descriptors (a
    // socket per connection); each one looked at costs a link read, and a socket a duplicate
    // and two queries more, so they are looked at one by one and the search ends at the
    // listener.
    fds.sort_unstable_by(|a, b| b.cmp(a));
    for fd in fds {
        // Only sockets: the link reads `socket:[INODE]`. A descriptor closed meanwhile is
        // skipped, not an error.
        match std::fs::read_link(format!("{dir}/{fd}")) {
            Ok(target)
                if target
                    .as_os_str()
                    .as_encoded_bytes()
                    .starts_with(b"socket:") => {}
            _ => continue,
        }
        let Ok(dup) = pidfd_getfd(&pidfd, fd) else {
            continue;
        };
        if is_tcp_listener_on(&dup, port) && socket_netns_inode(&dup).ok() == Some(netns_inode) {
            return Ok(Some(dup));
        }
    }
    Ok(None)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the returned descriptor is owned at once.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number of that process and flags 0; the
    // returned descriptor (close-on-exec) is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn sockopt_int(fd: &OwnedFd, level: i32, name: i32) -> Option<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized option into an int of the given length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &mut value as *mut _ as *mut _,
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

fn is_tcp_listener_on(fd: &OwnedFd, port: u16) -> bool {
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) != Some(1)
        || sockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL) != Some(libc::IPPROTO_TCP)
    {
        return false;
    }
    // SAFETY: all-zero is a valid sockaddr_storage; getsockname writes at most `len` bytes.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = unsafe { libc::getsockname(fd.as_raw_fd(), &mut addr as *mut _ as *mut _, &mut len) };
    if rc != 0 {
        return false;
    }
    // The port sits at the same offset in sockaddr_in and sockaddr_in6, network order.
    let bound = match addr.ss_family as i32 {
        // SAFETY: the family says which struct the kernel wrote.
        libc::AF_INET => unsafe { (*(&addr as *const _ as *const libc::sockaddr_in)).sin_port },
        libc::AF_INET6 => unsafe { (*(&addr as *const _ as *const libc::sockaddr_in6)).sin6_port },
        _ => return false,
    };
    u16::from_be(bound) == port
}

fn socket_netns_inode(fd: &OwnedFd) -> io::Result<u64> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor (or -1).
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a valid descriptor into a stat buffer.
    if unsafe { libc::fstat(ns.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}
