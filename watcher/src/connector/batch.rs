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
//!
//! Not every event may wait for the window: the first exec in a new cgroup is the one a pod's
//! enrolment waits for. A [`Doorbell`] (the exec tap's, which rings for exactly those execs)
//! ends the window as soon as it rings; the other events of the storm still wait for it.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
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

/// Rings when an event that must not wait for a coalescing window is coming (the exec tap's
/// doorbell rings for the first exec in a cgroup): a window ends as soon as it has rung.
pub trait Doorbell: Send {
    /// Polls readable (`POLLIN`) while it has rung since the last [`Doorbell::drain`].
    fn fd(&self) -> BorrowedFd<'_>;
    /// Forgets the rings so far, and says whether there were any (called before each window:
    /// a ring from before it skips the window, one during it ends it).
    fn drain(&mut self) -> bool;
}

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
    /// Windows ended early by the [`Doorbell`] (counted in `windows` too).
    pub doorbell_rings: u64,
    /// Of those, the windows not slept at all: the doorbell had rung before the window began.
    pub doorbell_skips: u64,
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
            doorbell_rings: self.doorbell_rings - earlier.doorbell_rings,
            doorbell_skips: self.doorbell_skips - earlier.doorbell_skips,
            truncated: self.truncated - earlier.truncated,
        }
    }
}

/// Waits until `fd` is readable (true) or `timeout` has passed (false; a signal counts as
/// that: the window is only shorter).
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool, ConnectorError> {
    let mut poll = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLIN,
        revents: 0,
    };
    // ppoll, not poll: its timeout is in nanoseconds, and windows are shorter than a millisecond.
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    let n = unsafe { libc::ppoll(&mut poll, 1, &timeout, std::ptr::null()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EINTR) => Ok(false),
            _ => Err(ConnectorError::Doorbell(err)),
        };
    }
    Ok(n > 0 && poll.revents & libc::POLLIN != 0)
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
    /// Ends a window early, if there is one.
    doorbell: Option<Box<dyn Doorbell>>,
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
            doorbell: None,
            stats: ReceiveStats::default(),
        }
    }

    /// Windows end as soon as `doorbell` rings (see [`Doorbell`]).
    pub(super) fn set_doorbell(&mut self, doorbell: Box<dyn Doorbell>) {
        self.doorbell = Some(doorbell);
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
            self.sleep_window()?;
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

    /// Sleeps the coalescing window, or less if the doorbell rings meanwhile; not at all if it
    /// rang since the last window.
    fn sleep_window(&mut self) -> Result<(), ConnectorError> {
        self.stats.windows += 1;
        let Some(doorbell) = self.doorbell.as_mut() else {
            std::thread::sleep(self.coalesce_window);
            return Ok(());
        };
        // A ring from before this window may be for an event not read yet: the kernel runs the
        // exec tap before the proc connector sends the exec's event, so the ring can come
        // between the last read and now, its event after. Such an event must not wait either;
        // the cost of a ring whose event was read already is one window not slept.
        if doorbell.drain() {
            self.stats.doorbell_rings += 1;
            self.stats.doorbell_skips += 1;
        } else if wait_readable(doorbell.fd(), self.coalesce_window)? {
            self.stats.doorbell_rings += 1;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

    use super::*;

    /// A datagram socket pair: the reader's end and the sender's (the test's "kernel").
    fn socket_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two new descriptors into `fds`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
        // A receive timeout on the reader's end, as the connector has: a datagram that never
        // comes fails the test (a Timeout) instead of hanging it. A hang guard, not a timing.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval of the size given, on a descriptor just made.
        let rc = unsafe {
            libc::setsockopt(
                fds[0],
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        // SAFETY: both are new descriptors owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, bytes: &[u8]) {
        // SAFETY: a valid buffer of `bytes.len()` bytes.
        let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        assert_eq!(
            n,
            bytes.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// A doorbell the test rings (an eventfd). While the reader drains it before a window, the
    /// "kernel" sends a datagram, and rings the doorbell if `ring_with_it`: an event that comes
    /// during the window, with or without the ring the exec tap gives a cgroup's first exec.
    struct TestBell {
        bell: OwnedFd,
        kernel: OwnedFd,
        ring_with_it: bool,
    }

    impl TestBell {
        fn new(kernel: OwnedFd, ring_with_it: bool) -> TestBell {
            // SAFETY: eventfd returns a new descriptor or -1.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
            TestBell {
                // SAFETY: a new descriptor owned by nobody else.
                bell: unsafe { OwnedFd::from_raw_fd(fd) },
                kernel,
                ring_with_it,
            }
        }

        fn ring(&self) {
            let one = 1u64;
            // SAFETY: an eventfd takes an 8-byte count.
            let n = unsafe { libc::write(self.bell.as_raw_fd(), (&one as *const u64).cast(), 8) };
            assert_eq!(n, 8, "eventfd write: {}", io::Error::last_os_error());
        }
    }

    impl Doorbell for TestBell {
        fn fd(&self) -> BorrowedFd<'_> {
            self.bell.as_fd()
        }

        fn drain(&mut self) -> bool {
            let mut count = 0u64;
            // SAFETY: an 8-byte buffer; non-blocking, so EAGAIN (and `count` 0) when it has
            // not rung.
            unsafe { libc::read(self.bell.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
            send(&self.kernel, b"during the window");
            if self.ring_with_it {
                self.ring();
            }
            count > 0
        }
    }

    /// A reader in a storm: [`STORM_AFTER`] blocking waits each found a datagram at once.
    fn reader_in_a_storm(fd: &OwnedFd, kernel: &OwnedFd, window: Duration) -> BatchReader {
        let mut reader = BatchReader::new();
        reader.set_coalesce_window(window);
        for _ in 0..STORM_AFTER {
            send(kernel, b"storm");
            assert!(matches!(
                reader.recv(fd.as_raw_fd()),
                Ok(Received::Datagram(b"storm"))
            ));
        }
        assert!(reader.storm, "{STORM_AFTER} fast wake-ups make a storm");
        reader
    }

    #[test]
    fn a_ring_during_the_window_ends_it() {
        let (fd, kernel) = socket_pair();
        let mut reader = reader_in_a_storm(&fd, &kernel, MAX_COALESCE_WINDOW);
        let before = reader.stats();
        reader.set_doorbell(Box::new(TestBell::new(kernel, true)));
        assert!(matches!(
            reader.recv(fd.as_raw_fd()),
            Ok(Received::Datagram(b"during the window"))
        ));
        let stats = reader.stats().since(&before);
        assert_eq!(
            (stats.windows, stats.doorbell_rings, stats.doorbell_skips),
            (1, 1, 0)
        );
    }

    #[test]
    fn without_a_ring_the_window_is_slept_whole() {
        let (fd, kernel) = socket_pair();
        let mut reader = reader_in_a_storm(&fd, &kernel, Duration::from_millis(1));
        let before = reader.stats();
        reader.set_doorbell(Box::new(TestBell::new(kernel, false)));
        assert!(matches!(
            reader.recv(fd.as_raw_fd()),
            Ok(Received::Datagram(b"during the window"))
        ));
        let stats = reader.stats().since(&before);
        assert_eq!(
            (stats.windows, stats.doorbell_rings, stats.doorbell_skips),
            (1, 0, 0)
        );
    }

    #[test]
    fn a_ring_before_the_window_ends_it_at_once() {
        let (fd, kernel) = socket_pair();
        // A window long enough that the test hangs (until the socket's hang guard) if slept.
        let mut reader = reader_in_a_storm(&fd, &kernel, MAX_COALESCE_WINDOW);
        let before = reader.stats();
        let bell = TestBell::new(kernel, false);
        // An exec rang it after the last read, and its event was not read (the kernel runs the
        // tap before the connector sends): the window must not hold it back.
        bell.ring();
        reader.set_doorbell(Box::new(bell));
        assert!(matches!(
            reader.recv(fd.as_raw_fd()),
            Ok(Received::Datagram(b"during the window"))
        ));
        let stats = reader.stats().since(&before);
        assert_eq!(
            (stats.windows, stats.doorbell_rings, stats.doorbell_skips),
            (1, 1, 1)
        );
    }
}
