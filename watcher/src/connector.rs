//! The kernel's proc connector (NETLINK_CONNECTOR, CN_IDX_PROC): subscribe, decode, unsubscribe.
//!
//! Wire layout (all fields in host byte order, from the kernel's uapi headers
//! `linux/netlink.h`, `linux/connector.h` and `linux/cn_proc.h`):
//!
//! ```text
//! nlmsghdr  (16): len u32, type u16, flags u16, seq u32, pid u32
//! cn_msg    (20): idx u32, val u32, seq u32, ack u32, len u16, flags u16
//! payload       : subscribe: op u32 (or struct proc_input {op u32, event_mask u32}, 6.6+)
//!                 event: struct proc_event {what u32, cpu u32, timestamp_ns u64, union ...}
//! ```
//!
//! Receiving: the kernel sends one message per datagram and wakes a blocked reader for each,
//! and every wake-up costs the reader a context switch, which costs more than the datagram
//! itself (on the benchmark VM 4 µs on an idle CPU, up to 19 µs on a busy one). So [`Connector::recv`] reads in batches: `recvmmsg` with
//! `MSG_WAITFORONE` blocks for the first datagram and takes every one already queued with it,
//! then later reads do not block until one finds the socket empty. Under a storm it also
//! coalesces wake-ups, like a network card's interrupt moderation: when [`STORM_AFTER`]
//! blocking waits in a row each returned within [`FAST_WAKEUP`] (events keep arriving faster
//! than one per millisecond) the reader, instead of blocking again on an empty socket, sleeps
//! [`ConnectorConfig::coalesce_window`] and then takes everything that came meanwhile in one
//! read. It keeps doing so while each window
//! brings something, and goes back to blocking waits (no added latency) after the first empty
//! one. The window delays an event by at most its length (plus the timer's slack). A window
//! is a timer wake-up, which is no cheaper than an event's (13 to 26 µs of the reader's CPU
//! on the benchmark VM), so it pays only when it brings several events: hence a window of
//! 500 µs by default, not less (BENCHMARKS.md, "Watcher").

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_CONNECTOR, Socket, SocketAddr};

/// `CN_IDX_PROC` / `CN_VAL_PROC` (linux/connector.h): the proc connector's callback id, which
/// is also its multicast group.
pub const CN_IDX_PROC: u32 = 1;
pub const CN_VAL_PROC: u32 = 1;
/// `enum proc_cn_mcast_op`.
pub const PROC_CN_MCAST_LISTEN: u32 = 1;
pub const PROC_CN_MCAST_IGNORE: u32 = 2;
/// `enum proc_cn_event` values zbridge uses.
pub const PROC_EVENT_NONE: u32 = 0;
pub const PROC_EVENT_FORK: u32 = 0x0000_0001;
pub const PROC_EVENT_EXEC: u32 = 0x0000_0002;
pub const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// Event types the kernel defines that zbridge does not use (uid, gid, sid, ptrace, comm,
/// non-zero exit (mask only), coredump).
const PROC_EVENTS_KNOWN_UNUSED: [u32; 7] = [
    0x0000_0004,
    0x0000_0040,
    0x0000_0080,
    0x0000_0100,
    0x0000_0200,
    0x2000_0000,
    0x4000_0000,
];

/// `NLMSG_DONE`: the connector sends (and expects) its messages with this type.
const NLMSG_DONE: u16 = 3;
const NLMSGHDR_LEN: usize = 16;
const CN_MSG_LEN: usize = 20;
/// `what`, `cpu`, `timestamp_ns` of `struct proc_event`.
const PROC_EVENT_HEADER_LEN: usize = 16;
/// The length of the subscribe message: nlmsghdr + cn_msg + the u32 op.
pub const SUBSCRIBE_LEN: usize = NLMSGHDR_LEN + CN_MSG_LEN + 4;

/// Datagrams one `recvmmsg` can take.
const BATCH: usize = 32;
/// Room for one datagram of a batch. A proc connector datagram is 76 bytes (nlmsghdr, cn_msg,
/// `struct proc_event`); a longer one would be cut (MSG_TRUNC), decoded as far as it goes
/// (its last message then fails to decode) and counted in [`ReceiveStats::truncated`].
const SLOT_LEN: usize = 4096;
/// A blocking wait that returned a datagram within this saw events arriving fast: the next
/// wait on an empty socket is the coalescing window instead (see [`Connector::recv`]).
pub const FAST_WAKEUP: Duration = Duration::from_millis(1);
/// Blocking waits in a row that must each return within [`FAST_WAKEUP`] before the reader
/// starts sleeping windows. One is not enough: a single process's fork and exit, or exec and
/// exit, come within a millisecond under light load too, and a window after them finds the
/// socket empty, which costs a timer wake-up and delays the next event (measured at 400
/// events/s: twice the CPU per event and 2.5 times the p99 latency with one).
pub const STORM_AFTER: u32 = 3;
/// The longest coalescing window used: a longer one is cut to this, so that a stop request
/// (looked at between receives) is still honoured within the window plus the receive timeout.
pub const MAX_COALESCE_WINDOW: Duration = Duration::from_millis(100);
/// The default coalescing window: at the storms of BENCHMARKS.md ("Watcher", 6,000 to 12,000
/// events/s) it brings 4 to 7 events per wake-up, and delays events by 0.4 ms at the median.
pub const DEFAULT_COALESCE_WINDOW: Duration = Duration::from_micros(500);

/// Errors of the proc connector.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("proc connector: cannot open a NETLINK_CONNECTOR socket: {0}")]
    Socket(#[source] io::Error),
    #[error(
        "proc connector: bind to multicast group CN_IDX_PROC refused: {0} (zbridge must run as \
         root or with CAP_NET_ADMIN)"
    )]
    Bind(#[source] io::Error),
    #[error("proc connector: setsockopt {option} failed: {source}")]
    SocketOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "proc connector: subscribe refused with ECONNREFUSED: the connector exists only in the \
         host network namespace (run with hostNetwork)"
    )]
    NotHostNetns,
    #[error("proc connector: sending the {what} message failed: {source}")]
    Send {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "proc connector: subscribe refused by the kernel with EPERM: zbridge must run as root or \
         with CAP_NET_ADMIN in the host user namespace"
    )]
    NotPermitted,
    #[error("proc connector: subscribe refused by the kernel with error {errno} ({text})")]
    Refused { errno: u32, text: String },
    #[error(
        "proc connector: no acknowledgement of the subscribe within {0:?}: the kernel silently \
         ignores subscribers outside the host PID (and user) namespace (run with hostPID)"
    )]
    NoAck(Duration),
    #[error("proc connector: receive failed: {0}")]
    Recv(#[source] io::Error),
    #[error("proc connector: malformed datagram: {0}")]
    Decode(#[from] DecodeError),
}

/// How to open the connector.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// Socket receive buffer. A starved reader with the default buffer (about 200 KiB) loses
    /// events under a spawn storm; several MiB do not.
    pub recv_buffer_bytes: usize,
    /// How long to wait for the kernel's acknowledgement of the subscribe.
    pub ack_timeout: Duration,
    /// The receive timeout: how often a blocked reader wakes up to look at a stop request.
    pub recv_timeout: Duration,
    /// On kernels from 6.6, ask the kernel for fork, exec and exit only.
    pub event_mask: bool,
    /// Receive coalescing (interrupt moderation): while events keep arriving faster than one
    /// per [`FAST_WAKEUP`] (see [`STORM_AFTER`]), the reader sleeps this long instead of blocking on an empty socket,
    /// then reads everything that came meanwhile in one batch, so that a storm costs one
    /// wake-up per window instead of nearly one per event. Each event of a storm is delivered
    /// up to this much later (plus the timer's slack, 50 µs by default); under light load
    /// nothing changes. Zero turns it off; at most [`MAX_COALESCE_WINDOW`] is used.
    pub coalesce_window: Duration,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        ConnectorConfig {
            recv_buffer_bytes: 8 << 20,
            ack_timeout: Duration::from_secs(2),
            recv_timeout: Duration::from_millis(200),
            event_mask: true,
            coalesce_window: DEFAULT_COALESCE_WINDOW,
        }
    }
}

/// What one receive returned.
#[derive(Debug)]
pub enum Received<'a> {
    /// A datagram: one or more netlink messages, for [`decode`].
    Datagram(&'a [u8]),
    /// Nothing arrived within the receive timeout.
    Timeout,
    /// The socket buffer overflowed (ENOBUFS): the kernel dropped events.
    Overrun,
}

/// How the receives of a [`Connector`] went, counted since the subscribe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Datagrams received.
    pub datagrams: u64,
    /// `recvmmsg` calls that returned datagrams (each took one batch).
    pub reads: u64,
    /// Blocking waits that ended with a datagram: the wake-ups by the kernel.
    pub wakeups: u64,
    /// Coalescing windows slept.
    pub windows: u64,
    /// Windows after which the socket was still empty (the storm was over: back to blocking).
    pub empty_windows: u64,
    /// Datagrams longer than a batch slot, cut (never seen from the proc connector).
    pub truncated: u64,
}

impl ReceiveStats {
    /// The counts since `earlier` (a copy taken from the same connector before).
    pub fn since(&self, earlier: &ReceiveStats) -> ReceiveStats {
        ReceiveStats {
            datagrams: self.datagrams - earlier.datagrams,
            reads: self.reads - earlier.reads,
            wakeups: self.wakeups - earlier.wakeups,
            windows: self.windows - earlier.windows,
            empty_windows: self.empty_windows - earlier.empty_windows,
            truncated: self.truncated - earlier.truncated,
        }
    }
}

/// What one `recvmmsg` gave.
enum Read {
    /// One or more datagrams, now in the batch.
    Got,
    /// Nothing queued (non-blocking), or nothing within the receive timeout, or a signal.
    Empty,
    /// ENOBUFS: the kernel dropped events.
    Overrun,
}

/// A subscribed proc connector socket. Unsubscribes on drop.
pub struct Connector {
    socket: Socket,
    port: u32,
    seq: u32,
    subscribed: bool,
    event_mask_active: bool,
    recv_buffer_bytes: usize,
    /// [`BATCH`] slots of [`SLOT_LEN`] bytes: the datagrams of the last read.
    buf: Vec<u8>,
    /// The length of each datagram of the batch.
    lens: [usize; BATCH],
    /// Datagrams in the batch, and the next one to hand out.
    filled: usize,
    next: usize,
    /// The last read filled the batch: more may be queued.
    batch_was_full: bool,
    /// [`ConnectorConfig::coalesce_window`], capped; zero until the subscribe is acknowledged.
    coalesce_window: Duration,
    /// Blocking waits in a row that returned within [`FAST_WAKEUP`].
    fast_wakeups: u32,
    /// Events are arriving fast: an empty socket is waited on with the window.
    storm: bool,
    stats: ReceiveStats,
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
            buf: vec![0; BATCH * SLOT_LEN],
            lens: [0; BATCH],
            filled: 0,
            next: 0,
            batch_was_full: false,
            coalesce_window: Duration::ZERO,
            fast_wakeups: 0,
            storm: false,
            stats: ReceiveStats::default(),
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
        connector.coalesce_window = config.coalesce_window.min(MAX_COALESCE_WINDOW);
        Ok(connector)
    }

    /// The coalescing window in use (zero: off).
    pub fn coalesce_window(&self) -> Duration {
        self.coalesce_window
    }

    /// How the receives went so far.
    pub fn receive_stats(&self) -> ReceiveStats {
        self.stats
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
        if self.next == self.filled {
            match self.refill()? {
                Read::Got => {}
                Read::Empty => return Ok(Received::Timeout),
                Read::Overrun => return Ok(Received::Overrun),
            }
        }
        let i = self.next;
        self.next += 1;
        let start = i * SLOT_LEN;
        Ok(Received::Datagram(&self.buf[start..start + self.lens[i]]))
    }

    /// Reads the next batch (see [`Connector::recv`]).
    fn refill(&mut self) -> Result<Read, ConnectorError> {
        if std::mem::take(&mut self.batch_was_full) {
            match self.read(libc::MSG_DONTWAIT)? {
                Read::Empty => {}
                other => return Ok(other),
            }
        }
        if self.storm {
            std::thread::sleep(self.coalesce_window);
            self.stats.windows += 1;
            match self.read(libc::MSG_DONTWAIT)? {
                Read::Empty => {
                    self.stats.empty_windows += 1;
                    self.storm = false;
                }
                other => return Ok(other),
            }
        }
        let waited_since = Instant::now();
        let read = self.read(libc::MSG_WAITFORONE)?;
        if matches!(read, Read::Got) {
            self.stats.wakeups += 1;
            if waited_since.elapsed() < FAST_WAKEUP {
                self.fast_wakeups = self.fast_wakeups.saturating_add(1);
            } else {
                self.fast_wakeups = 0;
            }
        } else {
            self.fast_wakeups = 0;
        }
        self.storm = !self.coalesce_window.is_zero() && self.fast_wakeups >= STORM_AFTER;
        Ok(read)
    }

    /// One `recvmmsg` into the batch slots, with `flags` (MSG_DONTWAIT: never block;
    /// MSG_WAITFORONE: block for the first datagram, up to the receive timeout, not for the
    /// rest).
    fn read(&mut self, flags: libc::c_int) -> Result<Read, ConnectorError> {
        self.filled = 0;
        self.next = 0;
        // SAFETY: all-zero iovec and mmsghdr are valid values (null pointers, zero lengths).
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let base = self.buf.as_mut_ptr();
        for (i, (iov, msg)) in iov.iter_mut().zip(msgs.iter_mut()).enumerate() {
            // SAFETY: slot i lies within `self.buf` (BATCH * SLOT_LEN bytes).
            iov.iov_base = unsafe { base.add(i * SLOT_LEN) }.cast();
            iov.iov_len = SLOT_LEN;
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` describes BATCH iovecs into `self.buf`, all of which outlive the
        // call; no timeout pointer (the socket's SO_RCVTIMEO bounds a blocking wait).
        let n = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Read::Empty),
                Some(libc::ENOBUFS) => {
                    // The queue is likely full behind the error: read on without blocking.
                    self.batch_was_full = true;
                    Ok(Read::Overrun)
                }
                _ => Err(ConnectorError::Recv(err)),
            };
        }
        let n = n as usize;
        if n == 0 {
            return Ok(Read::Empty);
        }
        for (len, msg) in self.lens.iter_mut().zip(&msgs[..n]) {
            *len = (msg.msg_len as usize).min(SLOT_LEN);
            if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.stats.truncated += 1;
            }
        }
        self.filled = n;
        self.batch_was_full = n == BATCH;
        self.stats.reads += 1;
        self.stats.datagrams += n as u64;
        Ok(Read::Got)
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
            Err(source) => Err(ConnectorError::Send { what, source }),
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
            source: io::Error::last_os_error(),
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
            source: io::Error::last_os_error(),
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

fn put_headers(msg: &mut [u8], seq: u32, port: u32, payload_len: u16) {
    let total = msg.len() as u32;
    msg[0..4].copy_from_slice(&total.to_ne_bytes());
    msg[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
    msg[6..8].copy_from_slice(&0u16.to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    msg[12..16].copy_from_slice(&port.to_ne_bytes());
    msg[16..20].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg[20..24].copy_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg[24..28].copy_from_slice(&seq.to_ne_bytes());
    // The kernel multicasts its ACK (cn ack = our ack + 1) to every listener: our port number
    // in the ack field tells our ACK from another subscriber's.
    msg[28..32].copy_from_slice(&port.to_ne_bytes());
    msg[32..34].copy_from_slice(&payload_len.to_ne_bytes());
    msg[34..36].copy_from_slice(&0u16.to_ne_bytes());
}

/// The 40-byte (un)subscribe message: nlmsghdr + cn_msg + `enum proc_cn_mcast_op`.
pub fn subscribe_message(op: u32, seq: u32, port: u32) -> [u8; SUBSCRIBE_LEN] {
    let mut msg = [0u8; SUBSCRIBE_LEN];
    put_headers(&mut msg, seq, port, 4);
    msg[36..40].copy_from_slice(&op.to_ne_bytes());
    msg
}

/// The 44-byte subscribe message with a `struct proc_input` (kernels 6.6 and later).
pub fn proc_input_message(op: u32, event_mask: u32, seq: u32, port: u32) -> [u8; 44] {
    let mut msg = [0u8; 44];
    put_headers(&mut msg, seq, port, 8);
    msg[36..40].copy_from_slice(&op.to_ne_bytes());
    msg[40..44].copy_from_slice(&event_mask.to_ne_bytes());
    msg
}

/// A process event as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    Fork {
        parent_pid: u32,
        parent_tgid: u32,
        child_pid: u32,
        child_tgid: u32,
    },
    Exec {
        pid: u32,
        tgid: u32,
    },
    /// `exit_code` is the kernel's `task->exit_code` (a wait status: code << 8 | signal).
    Exit {
        pid: u32,
        tgid: u32,
        exit_code: u32,
    },
}

/// One decoded netlink message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A fork, exec or exit, with the kernel's CLOCK_MONOTONIC timestamp.
    Event { ts_ns: u64, event: KernelEvent },
    /// The answer to a (un)subscribe: `err` is 0 or a positive errno.
    Ack { seq: u32, ack: u32, err: u32 },
    /// A proc event type the kernel defines but zbridge does not use (uid, gid, comm, ...).
    Unused { what: u32 },
    /// A proc event type this code does not know (a newer kernel).
    Unknown { what: u32 },
    /// A netlink message that is not a proc connector message (a control message, or another
    /// connector callback id).
    NotProc { nlmsg_type: u16 },
}

/// A datagram that cannot be decoded. The rest of the datagram is skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message at byte {offset}: {available} bytes left, a netlink header needs 16")]
    TruncatedHeader { offset: usize, available: usize },
    #[error(
        "message at byte {offset}: nlmsg_len {nlmsg_len} does not fit (minimum 16, {available} \
         bytes left)"
    )]
    BadLength {
        offset: usize,
        nlmsg_len: u32,
        available: usize,
    },
    #[error("message at byte {offset}: {what} needs {needed} bytes, the message has {available}")]
    Truncated {
        offset: usize,
        what: &'static str,
        needed: usize,
        available: usize,
    },
}

/// Decodes a datagram of one or more netlink messages. Never panics: a malformed message
/// yields one error and ends the iteration.
pub fn decode(buf: &[u8]) -> Messages<'_> {
    Messages { buf, offset: 0 }
}

/// The messages of a datagram, see [`decode`].
pub struct Messages<'a> {
    buf: &'a [u8],
    offset: usize,
}

impl Iterator for Messages<'_> {
    type Item = Result<Message, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.offset..)?;
        if rest.is_empty() {
            return None;
        }
        let offset = self.offset;
        match decode_one(rest, offset) {
            Ok((message, len)) => {
                // NLMSG_ALIGN: messages start at multiples of 4.
                self.offset = offset.saturating_add((len + 3) & !3);
                Some(Ok(message))
            }
            Err(e) => {
                self.offset = self.buf.len();
                Some(Err(e))
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(v)
}

/// Decodes the message at the start of `b`; returns it and its unaligned length.
fn decode_one(b: &[u8], offset: usize) -> Result<(Message, usize), DecodeError> {
    if b.len() < NLMSGHDR_LEN {
        return Err(DecodeError::TruncatedHeader {
            offset,
            available: b.len(),
        });
    }
    let nlmsg_len = u32_at(b, 0);
    let len = nlmsg_len as usize;
    if len < NLMSGHDR_LEN || len > b.len() {
        return Err(DecodeError::BadLength {
            offset,
            nlmsg_len,
            available: b.len(),
        });
    }
    let msg = &b[..len];
    let nlmsg_type = u16_at(msg, 4);
    if nlmsg_type != NLMSG_DONE {
        return Ok((Message::NotProc { nlmsg_type }, len));
    }
    let truncated = |what, needed| DecodeError::Truncated {
        offset,
        what,
        needed,
        available: len,
    };
    if len < NLMSGHDR_LEN + CN_MSG_LEN {
        return Err(truncated("a connector header", NLMSGHDR_LEN + CN_MSG_LEN));
    }
    let cn = &msg[NLMSGHDR_LEN..];
    if u32_at(cn, 0) != CN_IDX_PROC || u32_at(cn, 4) != CN_VAL_PROC {
        return Ok((Message::NotProc { nlmsg_type }, len));
    }
    let cn_seq = u32_at(cn, 8);
    let cn_ack = u32_at(cn, 12);
    let data_len = u16_at(cn, 16) as usize;
    let data_start = NLMSGHDR_LEN + CN_MSG_LEN;
    if data_start + data_len > len {
        return Err(truncated("the connector payload", data_start + data_len));
    }
    let data = &msg[data_start..data_start + data_len];
    let need = |n: usize, what| {
        if data.len() < n {
            Err(truncated(what, data_start + n))
        } else {
            Ok(())
        }
    };
    need(PROC_EVENT_HEADER_LEN, "a proc event header")?;
    let what = u32_at(data, 0);
    let ts_ns = u64_at(data, 8);
    let body = PROC_EVENT_HEADER_LEN;
    let message = match what {
        PROC_EVENT_NONE => {
            need(body + 4, "an ack")?;
            Message::Ack {
                seq: cn_seq,
                ack: cn_ack,
                err: u32_at(data, body),
            }
        }
        PROC_EVENT_FORK => {
            need(body + 16, "a fork event")?;
            Message::Event {
                ts_ns,
                event: KernelEvent::Fork {
                    parent_pid: u32_at(data, body),
                    parent_tgid: u32_at(data, body + 4),
                    child_pid: u32_at(data, body + 8),
                    child_tgid: u32_at(data, body + 12),
                },
            }
        }
        PROC_EVENT_EXEC => {
            need(body + 8, "an exec event")?;
            Message::Event {
                ts_ns,
                event: KernelEvent::Exec {
                    pid: u32_at(data, body),
                    tgid: u32_at(data, body + 4),
                },
            }
        }
        PROC_EVENT_EXIT => {
            need(body + 12, "an exit event")?;
            Message::Event {
                ts_ns,
                event: KernelEvent::Exit {
                    pid: u32_at(data, body),
                    tgid: u32_at(data, body + 4),
                    exit_code: u32_at(data, body + 8),
                },
            }
        }
        w if PROC_EVENTS_KNOWN_UNUSED.contains(&w) => Message::Unused { what: w },
        w => Message::Unknown { what: w },
    };
    Ok((message, len))
}

/// Builders of kernel-shaped messages, for tests and benchmarks of the decoder.
pub mod wire {
    use super::*;

    /// A proc event message as the kernel sends it (`struct proc_event` of 40 bytes).
    pub fn event_message(what: u32, ts_ns: u64, body: &[u32]) -> Vec<u8> {
        let mut event = [0u8; 40];
        event[0..4].copy_from_slice(&what.to_ne_bytes());
        event[8..16].copy_from_slice(&ts_ns.to_ne_bytes());
        for (i, v) in body.iter().take(6).enumerate() {
            let at = PROC_EVENT_HEADER_LEN + 4 * i;
            event[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        }
        let mut msg = vec![0u8; NLMSGHDR_LEN + CN_MSG_LEN];
        put_headers(&mut msg, 0, 0, event.len() as u16);
        msg.extend_from_slice(&event);
        let total = msg.len() as u32;
        msg[0..4].copy_from_slice(&total.to_ne_bytes());
        msg
    }

    pub fn fork(
        ts_ns: u64,
        parent_pid: u32,
        parent_tgid: u32,
        child_pid: u32,
        child_tgid: u32,
    ) -> Vec<u8> {
        event_message(
            PROC_EVENT_FORK,
            ts_ns,
            &[parent_pid, parent_tgid, child_pid, child_tgid],
        )
    }

    pub fn exec(ts_ns: u64, pid: u32, tgid: u32) -> Vec<u8> {
        event_message(PROC_EVENT_EXEC, ts_ns, &[pid, tgid])
    }

    pub fn exit(ts_ns: u64, pid: u32, tgid: u32, exit_code: u32) -> Vec<u8> {
        event_message(PROC_EVENT_EXIT, ts_ns, &[pid, tgid, exit_code, 17, 1, 1])
    }
}

#[cfg(test)]
mod tests {
    use super::wire;
    use super::*;

    fn all(buf: &[u8]) -> Vec<Result<Message, DecodeError>> {
        decode(buf).collect()
    }

    #[test]
    fn subscribe_message_is_byte_exact() {
        let msg = subscribe_message(PROC_CN_MCAST_LISTEN, 7, 4242);
        let mut want = Vec::new();
        want.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
        want.extend_from_slice(&3u16.to_ne_bytes()); // NLMSG_DONE
        want.extend_from_slice(&0u16.to_ne_bytes()); // flags
        want.extend_from_slice(&7u32.to_ne_bytes()); // seq
        want.extend_from_slice(&4242u32.to_ne_bytes()); // port
        want.extend_from_slice(&1u32.to_ne_bytes()); // CN_IDX_PROC
        want.extend_from_slice(&1u32.to_ne_bytes()); // CN_VAL_PROC
        want.extend_from_slice(&7u32.to_ne_bytes()); // cn seq
        want.extend_from_slice(&4242u32.to_ne_bytes()); // cn ack: our port, echoed + 1
        want.extend_from_slice(&4u16.to_ne_bytes()); // cn len
        want.extend_from_slice(&0u16.to_ne_bytes()); // cn flags
        want.extend_from_slice(&1u32.to_ne_bytes()); // PROC_CN_MCAST_LISTEN
        assert_eq!(msg.len(), 40);
        assert_eq!(msg.to_vec(), want);
    }

    #[test]
    fn proc_input_message_carries_the_mask() {
        let msg = proc_input_message(PROC_CN_MCAST_LISTEN, 0x8000_0003, 2, 9);
        assert_eq!(u32_at(&msg, 0), 44);
        assert_eq!(u16_at(&msg, 32), 8);
        assert_eq!(u32_at(&msg, 36), 1);
        assert_eq!(u32_at(&msg, 40), 0x8000_0003);
    }

    #[test]
    fn decodes_fork() {
        let msg = wire::fork(123, 10, 10, 11, 11);
        assert_eq!(msg.len(), 16 + 20 + 40);
        assert_eq!(
            all(&msg),
            vec![Ok(Message::Event {
                ts_ns: 123,
                event: KernelEvent::Fork {
                    parent_pid: 10,
                    parent_tgid: 10,
                    child_pid: 11,
                    child_tgid: 11
                }
            })]
        );
    }

    #[test]
    fn decodes_exec() {
        assert_eq!(
            all(&wire::exec(5, 77, 76)),
            vec![Ok(Message::Event {
                ts_ns: 5,
                event: KernelEvent::Exec { pid: 77, tgid: 76 }
            })]
        );
    }

    #[test]
    fn decodes_exit() {
        assert_eq!(
            all(&wire::exit(9, 78, 76, 256)),
            vec![Ok(Message::Event {
                ts_ns: 9,
                event: KernelEvent::Exit {
                    pid: 78,
                    tgid: 76,
                    exit_code: 256
                }
            })]
        );
    }

    #[test]
    fn decodes_ack() {
        let mut msg = wire::event_message(PROC_EVENT_NONE, 0, &[1]);
        msg[24..28].copy_from_slice(&5u32.to_ne_bytes()); // cn seq
        msg[28..32].copy_from_slice(&1u32.to_ne_bytes()); // cn ack
        assert_eq!(
            all(&msg),
            vec![Ok(Message::Ack {
                seq: 5,
                ack: 1,
                err: 1
            })]
        );
    }

    #[test]
    fn decodes_two_messages_in_one_datagram() {
        let mut datagram = wire::exec(1, 100, 100);
        datagram.extend_from_slice(&wire::exit(2, 100, 100, 0));
        assert_eq!(
            all(&datagram),
            vec![
                Ok(Message::Event {
                    ts_ns: 1,
                    event: KernelEvent::Exec {
                        pid: 100,
                        tgid: 100
                    }
                }),
                Ok(Message::Event {
                    ts_ns: 2,
                    event: KernelEvent::Exit {
                        pid: 100,
                        tgid: 100,
                        exit_code: 0
                    }
                }),
            ]
        );
    }

    #[test]
    fn unaligned_message_is_followed_at_the_aligned_offset() {
        // An exec whose payload is 2 bytes longer than needed: nlmsg_len 78, next at 80.
        let mut first = wire::exec(1, 1, 1);
        first.extend_from_slice(&[0xaa, 0xbb]);
        let total = first.len() as u32;
        first[0..4].copy_from_slice(&total.to_ne_bytes());
        first[32..34].copy_from_slice(&42u16.to_ne_bytes());
        first.extend_from_slice(&[0, 0]); // padding to 4
        first.extend_from_slice(&wire::exec(2, 2, 2));
        let got = all(&first);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Ok(Message::Event {
                ts_ns: 2,
                event: KernelEvent::Exec { pid: 2, tgid: 2 }
            })
        );
    }

    #[test]
    fn unknown_and_unused_types_are_reported_not_decoded() {
        let mut datagram = wire::event_message(0x0100_0000, 1, &[]);
        datagram.extend_from_slice(&wire::event_message(0x200, 1, &[])); // PROC_EVENT_COMM
        assert_eq!(
            all(&datagram),
            vec![
                Ok(Message::Unknown { what: 0x0100_0000 }),
                Ok(Message::Unused { what: 0x200 })
            ]
        );
    }

    #[test]
    fn other_connector_ids_and_control_messages_are_not_proc() {
        let mut other = wire::exec(1, 1, 1);
        other[16..20].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(all(&other), vec![Ok(Message::NotProc { nlmsg_type: 3 })]);
        let mut noop = wire::exec(1, 1, 1);
        noop[4..6].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(all(&noop), vec![Ok(Message::NotProc { nlmsg_type: 1 })]);
    }

    #[test]
    fn truncated_datagrams_are_errors() {
        let msg = wire::exit(1, 1, 1, 0);
        // Cut inside the netlink header.
        assert_eq!(
            all(&msg[..10]),
            vec![Err(DecodeError::TruncatedHeader {
                offset: 0,
                available: 10
            })]
        );
        // Cut inside the event: nlmsg_len now claims more than the datagram holds.
        assert!(matches!(
            all(&msg[..50])[..],
            [Err(DecodeError::BadLength { nlmsg_len: 76, .. })]
        ));
        // A consistent nlmsg_len but a cn_msg.len too short for an exit event.
        let mut short = msg[..16 + 20 + 24].to_vec();
        short[0..4].copy_from_slice(&60u32.to_ne_bytes());
        short[32..34].copy_from_slice(&24u16.to_ne_bytes());
        assert!(matches!(
            all(&short)[..],
            [Err(DecodeError::Truncated {
                what: "an exit event",
                ..
            })]
        ));
        // A good message followed by a fragment: the good one, then an error.
        let mut two = wire::exec(1, 3, 3);
        two.extend_from_slice(&msg[..20]);
        let got = all(&two);
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        assert!(matches!(got[1], Err(DecodeError::BadLength { .. })));
    }

    #[test]
    fn oversized_lengths_are_errors() {
        let mut msg = wire::exec(1, 1, 1);
        msg[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            all(&msg)[..],
            [Err(DecodeError::BadLength { .. })]
        ));
        let mut msg = wire::exec(1, 1, 1);
        msg[32..34].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert!(matches!(
            all(&msg)[..],
            [Err(DecodeError::Truncated {
                what: "the connector payload",
                ..
            })]
        ));
        let mut msg = wire::exec(1, 1, 1);
        msg[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(matches!(
            all(&msg)[..],
            [Err(DecodeError::BadLength { .. })]
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random sweep over lengths and contents.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode(&bytes).count();
            // Also with a plausible header, so decoding goes deeper.
            let mut framed = wire::exec(1, 1, 1);
            framed.truncate(36);
            framed.extend_from_slice(&bytes);
            let total = framed.len() as u32;
            framed[0..4].copy_from_slice(&total.to_ne_bytes());
            let _ = decode(&framed).count();
        }
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0"), Some((5, 4)));
        assert_eq!(parse_release("x"), None);
    }
}
