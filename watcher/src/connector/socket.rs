//! The subscribed socket: open, size its buffer, subscribe and check the kernel's
//! acknowledgement, unsubscribe on drop.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_CONNECTOR, Socket, SocketAddr};

use super::batch::{BatchReader, Doorbell, ReceiveStats, Received};
use super::codec::{
    decode, proc_input_message, subscribe_message, Message, CN_IDX_PROC, PROC_CN_MCAST_IGNORE,
    PROC_CN_MCAST_LISTEN, PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK,
};
use super::{ConnectorConfig, ConnectorError};
#[cfg(doc)]
use super::{FAST_WAKEUP, STORM_AFTER};

/// A subscribed proc connector socket. Unsubscribes on drop.
pub struct Connector {
    socket: Socket,
    port: u32,
    seq: u32,
    subscribed: bool,
    event_mask_active: bool,
    recv_buffer_bytes: usize,
    reader: BatchReader,
}

impl Connector {
    /// Opens the socket, sizes its buffer, subscribes and checks the kernel's acknowledgement.
    pub fn subscribe(config: &ConnectorConfig) -> Result<Connector, ConnectorError> {
        let mut socket = Socket::new(NETLINK_CONNECTOR).map_err(ConnectorError::Socket)?;
        let recv_buffer_bytes = set_recv_buffer(&socket, config.recv_buffer_bytes)?;
        socket
            .bind(&SocketAddr::new(0, CN_IDX_PROC))
            .map_err(ConnectorError::Bind)?;
        let mut addr = SocketAddr::new(0, 0);
        socket
            .get_address(&mut addr)
            .map_err(ConnectorError::Socket)?;
        let mut connector = Connector {
            socket,
            port: addr.port_number(),
            seq: 0,
            subscribed: false,
            event_mask_active: false,
            recv_buffer_bytes,
            reader: BatchReader::new(),
        };
        connector.set_recv_timeout(config.ack_timeout.min(Duration::from_millis(100)))?;
        connector.send_op(PROC_CN_MCAST_LISTEN, None, "subscribe")?;
        // From here on the kernel counts us as a listener, so Drop must unsubscribe even when
        // the acknowledgement is missing or says no.
        connector.subscribed = true;
        connector.wait_ack(config.ack_timeout)?;
        if config.event_mask && kernel_at_least(6, 6) {
            // With a mask the kernel filters the ACK too (its type is PROC_EVENT_NONE), so this
            // one is not awaited; the plain subscribe above was the self-check.
            let mask = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT;
            connector.send_op(
                PROC_CN_MCAST_LISTEN,
                Some(mask),
                "subscribe with event mask",
            )?;
            connector.event_mask_active = true;
        }
        connector.set_recv_timeout(config.recv_timeout)?;
        connector.reader.set_coalesce_window(config.coalesce_window);
        Ok(connector)
    }

    /// The coalescing window in use (zero: off).
    pub fn coalesce_window(&self) -> Duration {
        self.reader.coalesce_window()
    }

    /// Coalescing windows end as soon as `doorbell` rings (the exec tap's, for the first exec
    /// in a cgroup).
    pub fn set_doorbell(&mut self, doorbell: Box<dyn Doorbell>) {
        self.reader.set_doorbell(doorbell);
    }

    /// How the receives went so far.
    pub fn receive_stats(&self) -> ReceiveStats {
        self.reader.stats()
    }

    /// Whether the kernel was asked for fork, exec and exit only.
    pub fn event_mask_active(&self) -> bool {
        self.event_mask_active
    }

    /// The receive buffer the kernel granted (as `SO_RCVBUF` reads it: twice what was set).
    pub fn recv_buffer_bytes(&self) -> usize {
        self.recv_buffer_bytes
    }

    /// Receives one datagram, waiting at most the coalescing window plus the receive timeout.
    ///
    /// Datagrams come from a batch: when it is used up the next batch is read with
    /// `recvmmsg`, without blocking first if the last batch was full. On an empty socket,
    /// while a storm lasts (the last [`STORM_AFTER`] blocking waits each returned within
    /// [`FAST_WAKEUP`], and every
    /// window since brought something) the reader sleeps the coalescing window and reads
    /// again without blocking; otherwise, or when that read finds nothing, it blocks for at
    /// most the receive timeout. An overrun (ENOBUFS) is reported after the datagrams read
    /// before it, as the kernel reports it.
    pub fn recv(&mut self) -> Result<Received<'_>, ConnectorError> {
        self.reader.recv(self.socket.as_raw_fd())
    }

    /// Tells the kernel to stop sending events to this socket. The kernel counts listeners
    /// globally and keeps producing events while the count is above zero, so closing the
    /// socket is not enough.
    pub fn unsubscribe(&mut self) -> Result<(), ConnectorError> {
        if !self.subscribed {
            return Ok(());
        }
        self.subscribed = false;
        self.send_op(PROC_CN_MCAST_IGNORE, None, "unsubscribe")
    }

    fn set_recv_timeout(&self, timeout: Duration) -> Result<(), ConnectorError> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        setsockopt(&self.socket, libc::SO_RCVTIMEO, &tv, "SO_RCVTIMEO")
    }

    fn send_op(
        &mut self,
        op: u32,
        event_mask: Option<u32>,
        what: &'static str,
    ) -> Result<(), ConnectorError> {
        self.seq = self.seq.wrapping_add(1);
        let msg = match event_mask {
            None => subscribe_message(op, self.seq, self.port).to_vec(),
            Some(mask) => proc_input_message(op, mask, self.seq, self.port).to_vec(),
        };
        match self.socket.send_to(&msg, &SocketAddr::new(0, 0), 0) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                Err(ConnectorError::NotHostNetns)
            }
            Err(error) => Err(ConnectorError::Send { what, error }),
        }
    }

    fn wait_ack(&mut self, timeout: Duration) -> Result<(), ConnectorError> {
        let deadline = Instant::now() + timeout;
        // The kernel overwrites the seq of the ACK with its per-CPU event counter; the ack field
        // (ours + 1) is what identifies it.
        let want_ack = self.port.wrapping_add(1);
        while Instant::now() < deadline {
            let datagram = match self.recv()? {
                Received::Datagram(d) => d,
                // Events for other listeners may already flow; the ACK is still in order.
                Received::Timeout | Received::Overrun => continue,
            };
            for message in decode(datagram) {
                if let Message::Ack { ack, err, .. } = message? {
                    if ack != want_ack {
                        continue;
                    }
                    return match err {
                        0 => Ok(()),
                        e if e == libc::EPERM as u32 => Err(ConnectorError::NotPermitted),
                        errno => Err(ConnectorError::Refused {
                            errno,
                            text: io::Error::from_raw_os_error(errno as i32).to_string(),
                        }),
                    };
                }
            }
        }
        Err(ConnectorError::NoAck(timeout))
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        if let Err(e) = self.unsubscribe() {
            log::warn!("{e}");
        }
    }
}

/// SO_RCVBUFFORCE (needs CAP_NET_ADMIN, ignores rmem_max), else SO_RCVBUF with a warning.
/// Returns the size the kernel reports.
fn set_recv_buffer(socket: &Socket, bytes: usize) -> Result<usize, ConnectorError> {
    let size = bytes.min(i32::MAX as usize) as libc::c_int;
    if let Err(e) = setsockopt(socket, libc::SO_RCVBUFFORCE, &size, "SO_RCVBUFFORCE") {
        log::warn!(
            "{e}; falling back to SO_RCVBUF, which the kernel caps at net.core.rmem_max: events \
             may be lost under load"
        );
        setsockopt(socket, libc::SO_RCVBUF, &size, "SO_RCVBUF")?;
    }
    let mut got: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `got` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut got as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(ConnectorError::SocketOption {
            option: "SO_RCVBUF (read)",
            error: io::Error::last_os_error(),
        });
    }
    Ok(got.max(0) as usize)
}

fn setsockopt<T>(
    socket: &Socket,
    option: libc::c_int,
    value: &T,
    name: &'static str,
) -> Result<(), ConnectorError> {
    // SAFETY: `value` points to a live T of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(ConnectorError::SocketOption {
            option: name,
            error: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether the running kernel's release is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| parse_release(&r))
        .is_some_and(|v| v >= (major, minor))
}

/// `6.18.44-fc` → (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::parse_release;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0"), Some((5, 4)));
        assert_eq!(parse_release("x"), None);
    }
}
