//! The agent's end of ZDS's transport: a `SOCK_SEQPACKET` Unix socket (one protobuf message
//! per packet), a network namespace passed with `add` in `SCM_RIGHTS`, and the peer's process
//! id from `SO_PEERCRED` (ztunnel's, whose listeners the in-pod capture borrows).

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The largest message ztunnel reads (its receive buffer): a request must fit.
pub const MAX_REQUEST: usize = 1024;
/// The largest response read; an `Ack` with a long error is cut here and refused as truncated.
const MAX_RESPONSE: usize = 4096;

/// The listening socket; its file is removed on drop.
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` (a stale socket file left by a previous run is replaced; any other file
    /// there is an error) with mode 0600: whoever connects is handed pods' network namespaces,
    /// so only root may.
    pub fn bind(path: &Path) -> io::Result<Listener> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "exists and is not a socket; remove it or choose another path",
                    ));
                }
                // A socket someone still serves is another node agent's (istio-cni's): taking
                // it over would leave two agents each handing ztunnel pods and two captures.
                if Conn::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process serves ZDS on this socket (istio-cni's node agent?); \
                         stop it, or install Istio without istio-cni (README), then start zbridge",
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let fd = socket()?;
        let (addr, len) = sockaddr_un(path)?;
        // The umask covers the moment between bind and chmod.
        let old = unsafe { libc::umask(0o177) };
        let rc = unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const _, len) };
        unsafe { libc::umask(old) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        if unsafe { libc::listen(fd.as_raw_fd(), 8) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection (blocking; [`Listener::shutdown`] ends the wait with an
    /// error).
    pub fn accept(&self) -> io::Result<Conn> {
        loop {
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                return Ok(Conn {
                    fd: unsafe { OwnedFd::from_raw_fd(fd) },
                });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Wakes a thread blocked in [`Listener::accept`].
    pub fn shutdown(&self) {
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connection from ztunnel.
pub struct Conn {
    fd: OwnedFd,
}

/// What one `recv` gave.
#[derive(Debug)]
pub enum Received {
    Message(Vec<u8>),
    /// The peer closed the connection.
    Closed,
}

impl Conn {
    /// Connects to a listening ZDS socket (what ztunnel does; for tests and tools).
    pub fn connect(path: &Path) -> io::Result<Conn> {
        let fd = socket()?;
        let (addr, len) = sockaddr_un(path)?;
        if unsafe { libc::connect(fd.as_raw_fd(), &addr as *const _ as *const _, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Conn { fd })
    }

    /// Another handle to the same connection (one thread reads, another writes).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn {
            fd: self.fd.try_clone()?,
        })
    }

    /// The peer's process id (`SO_PEERCRED`, as of its `connect`).
    pub fn peer_pid(&self) -> io::Result<i32> {
        let mut cred: libc::ucred = unsafe { zeroed() };
        let mut len = size_of::<libc::ucred>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut _ as *mut _,
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.pid)
    }

    /// Sends one message, with `fd` in `SCM_RIGHTS` if given.
    pub fn send(&self, message: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if message.len() > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "message of {} bytes is over ztunnel's {MAX_REQUEST}-byte buffer",
                    message.len()
                ),
            ));
        }
        let mut iov = libc::iovec {
            iov_base: message.as_ptr() as *mut _,
            iov_len: message.len(),
        };
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // Space for one descriptor, aligned as the kernel wants a cmsghdr.
        let mut control = [0u64; 4];
        if let Some(fd) = fd {
            let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
            msg.msg_control = control.as_mut_ptr() as *mut _;
            msg.msg_controllen = space;
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd.as_raw_fd());
            }
        }
        loop {
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Receives one message. Descriptors the peer sends are closed (ztunnel sends none); a
    /// message larger than we read is an error, never half a message.
    pub fn recv(&self) -> io::Result<Received> {
        let mut buf = vec![0u8; MAX_RESPONSE];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut _,
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut _;
        msg.msg_controllen = size_of::<[u64; 8]>();
        let n = loop {
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        close_passed_fds(&msg);
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a message longer than {MAX_RESPONSE} bytes (truncated)"),
            ));
        }
        if n == 0 {
            return Ok(Received::Closed);
        }
        buf.truncate(n);
        Ok(Received::Message(buf))
    }

    /// Sets how long [`Conn::recv`] waits (`None`: forever).
    pub fn set_recv_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(t) => libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const _,
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ends the connection both ways (a blocked `recv` returns).
    pub fn shutdown(&self) {
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Closes any descriptor the peer passed: none is expected, and each would leak.
fn close_passed_fds(msg: &libc::msghdr) {
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count =
                    ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    libc::close(std::ptr::read_unaligned(data.add(i)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
}

fn socket() -> io::Result<OwnedFd> {
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path of {} bytes is over the {}-byte limit of a Unix socket address",
                bytes.len(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = (size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    Ok((addr, len))
}
