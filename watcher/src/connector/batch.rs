//! Receiving: datagrams read in batches, with wake-ups coalesced under a storm.
//!
//! The kernel sends one message per datagram and wakes a blocked reader for each, and every
//! wake-up costs the reader a context switch, which costs more than the datagram itself. So
//! [`Connector::recv`] reads in batches: `recvmmsg` with `MSG_WAITFORONE` blocks for the first
//! datagram and takes every one already queued with it, then later reads do not block until one
//! finds the socket empty.
//!
//! Under a storm it also coalesces wake-ups, like a network card's interrupt moderation: when
//! [`STORM_AFTER`] blocking waits in a row each returned within [`FAST_WAKEUP`] (events keep
//! arriving faster than one per millisecond) the reader, instead of blocking again on an empty
//! socket, sleeps [`ConnectorConfig::coalesce_window`] and then takes everything that came
//! meanwhile in one read. It keeps doing so while each window brings something, and goes back
//! to blocking waits (no added latency) after the first empty one. The window delays an event
//! by at most its length (plus the timer's slack). A window is a timer wake-up, which is no
//! cheaper than an event's, so it pays only when it brings several events: hence the default
//! window is not shorter (BENCHMARKS.md, "Watcher", has the figures).

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::ConnectorError;
#[cfg(doc)]
use super::{Connector, ConnectorConfig};

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
/// socket empty, which costs a timer wake-up and delays the next event (measured under light
/// load: BENCHMARKS.md, "What was tried").
pub const STORM_AFTER: u32 = 3;
/// The longest coalescing window used: a longer one is cut to this, so that a stop request
/// (looked at between receives) is still honoured within the window plus the receive timeout.
pub const MAX_COALESCE_WINDOW: Duration = Duration::from_millis(100);
/// The default coalescing window: at the storms of BENCHMARKS.md ("Watcher") it brings several
/// events per wake-up for a delay well under a millisecond.
pub const DEFAULT_COALESCE_WINDOW: Duration = Duration::from_micros(500);

/// What one receive returned.
#[derive(Debug)]
pub enum Received<'a> {
    /// A datagram: one or more netlink messages, for [`decode`](super::decode).
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

/// The receive side of a [`Connector`]: the batch of datagrams last read and
/// the state of the coalescing.
pub(super) struct BatchReader {
    /// [`BATCH`] slots of [`SLOT_LEN`] bytes: the datagrams of the last read.
    buf: Vec<u8>,
    /// The length of each datagram of the batch.
    lens: [usize; BATCH],
    /// Datagrams in the batch, and the next one to hand out.
    filled: usize,
    next: usize,
    /// The last read filled the batch: more may be queued.
    batch_was_full: bool,
    /// The coalescing window, capped; zero (off) until the subscribe is acknowledged.
    coalesce_window: Duration,
    /// Blocking waits in a row that returned within [`FAST_WAKEUP`].
    fast_wakeups: u32,
    /// Events are arriving fast: an empty socket is waited on with the window.
    storm: bool,
    stats: ReceiveStats,
}

impl BatchReader {
    pub(super) fn new() -> BatchReader {
        BatchReader {
            buf: vec![0; BATCH * SLOT_LEN],
            lens: [0; BATCH],
            filled: 0,
            next: 0,
            batch_was_full: false,
            coalesce_window: Duration::ZERO,
            fast_wakeups: 0,
            storm: false,
            stats: ReceiveStats::default(),
        }
    }

    /// Turns coalescing on with `window` (zero: off), capped at [`MAX_COALESCE_WINDOW`].
    pub(super) fn set_coalesce_window(&mut self, window: Duration) {
        self.coalesce_window = window.min(MAX_COALESCE_WINDOW);
    }

    pub(super) fn coalesce_window(&self) -> Duration {
        self.coalesce_window
    }

    pub(super) fn stats(&self) -> ReceiveStats {
        self.stats
    }

    /// One datagram from socket `fd`, see [`Connector::recv`].
    pub(super) fn recv(&mut self, fd: RawFd) -> Result<Received<'_>, ConnectorError> {
        if self.next == self.filled {
            match self.refill(fd)? {
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

    /// Reads the next batch (see [`BatchReader::recv`]).
    fn refill(&mut self, fd: RawFd) -> Result<Read, ConnectorError> {
        if std::mem::take(&mut self.batch_was_full) {
            match self.read(fd, libc::MSG_DONTWAIT)? {
                Read::Empty => {}
                other => return Ok(other),
            }
        }
        if self.storm {
            std::thread::sleep(self.coalesce_window);
            self.stats.windows += 1;
            match self.read(fd, libc::MSG_DONTWAIT)? {
                Read::Empty => {
                    self.stats.empty_windows += 1;
                    self.storm = false;
                }
                other => return Ok(other),
            }
        }
        let waited_since = Instant::now();
        let read = self.read(fd, libc::MSG_WAITFORONE)?;
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
    fn read(&mut self, fd: RawFd, flags: libc::c_int) -> Result<Read, ConnectorError> {
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
                fd,
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
}
