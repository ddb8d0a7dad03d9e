//! The live event source: the proc connector plus the facts of each exec, with rescans after
//! loss.
//!
//! The facts of an exec come from the exec tap (a BPF program, [`crate::exec_tap`]) when it is
//! loaded: its record gives the cgroup id and the network namespace without a /proc read, the
//! cgroup's path comes from a cache by id (read from `/proc/PID/cgroup` once per cgroup), the
//! addresses from [`ProcReader`]'s cache by namespace. Without the tap, or for an exec whose
//! record is missing, they are read from /proc ([`ProcReader`]). The counters say which. The
//! tap's doorbell, which rings for the first exec in a cgroup, ends the connector's coalescing
//! window early, so that a new pod's enrolment does not wait for it.
//!
//! Order of a run: subscribe (checked by the kernel's ACK), then one scan of /proc (a
//! [`ProcEvent::Scan`]), then the events. When the kernel drops events (ENOBUFS) the source
//! emits [`ProcEvent::Lost`], scans again and goes on reading: it is never deaf after a loss.
//!
//! Events still queued in the socket from before a scan started are superseded by that scan
//! (their follow-ups may be among the dropped ones), so they are discarded by their kernel
//! timestamp and counted. Timestamps never decrease: an event stamped (on another CPU) a
//! little before the previous record is given the previous record's time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::cgroup_paths::CgroupPaths;
use crate::connector::{
    decode, Connector, ConnectorConfig, ConnectorError, KernelEvent, Message, ReceiveStats,
    Received,
};
use crate::event::{CgroupRef, Pid, ProcEvent, ProcFacts, Record, TimedRecord};
use crate::exec_tap::{ExecMatcher, ExecTap, TapRecord};
use crate::procfs::{MountError, ProcReader};
use crate::{EventSource, SourceError};

/// Why the live source could not start.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error(transparent)]
    Mount(#[from] MountError),
}

/// Configuration of the live source.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    pub connector: ConnectorConfig,
    /// Where the cgroup2 hierarchy is mounted (cgroup ids are the inodes of directories below
    /// it). `None`: the first cgroup2 mount of `/proc/self/mountinfo`.
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Read `/proc/PID/comm` for exec events too (informative only: it costs one more open and
    /// read per exec, so the agent leaves it out; `zbridge record` keeps it for the person who
    /// reads the recording). Scans always carry it.
    pub exec_comm: bool,
    /// Take the facts of execs from the exec tap (a BPF program on the `sched_process_exec`
    /// tracepoint) instead of reading /proc for each. If it cannot be loaded (no CAP_BPF and
    /// CAP_PERFMON, no BTF, ...) the source logs why and reads /proc. Default: true.
    pub exec_tap: bool,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            connector: ConnectorConfig::default(),
            cgroup_root: None,
            exec_comm: false,
            exec_tap: true,
        }
    }
}

/// Asks a [`LiveSource`] to stop: its `next_record` then returns `Ok(None)` within the
/// connector's receive timeout plus its coalescing window (0.2 s + 500 µs by default).
/// Cloneable, usable from any thread.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The flag itself, for a signal handler to set (e.g. `signal_hook::flag::register`).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}

/// Counters of a live source, readable from any thread for metrics.
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub forks: AtomicU64,
    pub execs: AtomicU64,
    pub exits: AtomicU64,
    /// Overruns (ENOBUFS): each one is a `Lost` record followed by a scan.
    pub lost: AtomicU64,
    pub scans: AtomicU64,
    /// Exec events whose process was gone before its cgroup could be read.
    pub execs_without_facts: AtomicU64,
    /// Proc event types this code does not know (a newer kernel).
    pub unknown: AtomicU64,
    /// Proc event types zbridge does not use (uid, gid, comm, ...), before the event mask.
    pub unused: AtomicU64,
    /// Netlink messages that were not proc connector events (ACKs, control messages).
    pub not_proc: AtomicU64,
    /// Datagrams (or their rest) that could not be decoded.
    pub malformed: AtomicU64,
    /// Events older than the latest scan, discarded because the scan supersedes them.
    pub superseded: AtomicU64,
    /// Exec events whose facts came from the exec tap's record (no /proc read but, once per
    /// cgroup, its path).
    pub execs_from_tap: AtomicU64,
    /// Exec events whose facts were read from /proc: the tap is not loaded, or it had no
    /// record for the exec (see `tap_dropped`).
    pub execs_from_proc: AtomicU64,
    /// Records the exec tap could not write because its ring was full (as last read from the
    /// program's counter, about once a second).
    pub tap_dropped: AtomicU64,
    /// Tap records thrown away without their exec event (its event lost or superseded by a
    /// rescan, or handled from /proc before the record could be read).
    pub tap_unmatched: AtomicU64,
    /// Coalescing windows the connector's reader slept under a storm (as of its last receive).
    pub coalescing_windows: AtomicU64,
    /// Of those, the windows the exec tap's doorbell ended early: a first exec in a cgroup came.
    pub windows_ended_by_doorbell: AtomicU64,
}

/// A copy of [`LiveCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub forks: u64,
    pub execs: u64,
    pub exits: u64,
    pub lost: u64,
    pub scans: u64,
    pub execs_without_facts: u64,
    pub unknown: u64,
    pub unused: u64,
    pub not_proc: u64,
    pub malformed: u64,
    pub superseded: u64,
    pub execs_from_tap: u64,
    pub execs_from_proc: u64,
    pub tap_dropped: u64,
    pub tap_unmatched: u64,
    pub coalescing_windows: u64,
    pub windows_ended_by_doorbell: u64,
}

impl LiveCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            forks: get(&self.forks),
            execs: get(&self.execs),
            exits: get(&self.exits),
            lost: get(&self.lost),
            scans: get(&self.scans),
            execs_without_facts: get(&self.execs_without_facts),
            unknown: get(&self.unknown),
            unused: get(&self.unused),
            not_proc: get(&self.not_proc),
            malformed: get(&self.malformed),
            superseded: get(&self.superseded),
            execs_from_tap: get(&self.execs_from_tap),
            execs_from_proc: get(&self.execs_from_proc),
            tap_dropped: get(&self.tap_dropped),
            tap_unmatched: get(&self.tap_unmatched),
            coalescing_windows: get(&self.coalescing_windows),
            windows_ended_by_doorbell: get(&self.windows_ended_by_doorbell),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// How often the tap's count of dropped records is read (a syscall), in event time.
const TAP_DROPPED_CHECK_NS: u64 = 1_000_000_000;

/// The exec tap, with the records waiting for their events.
struct Tap {
    tap: ExecTap,
    matcher: ExecMatcher,
    /// When (event time) to read the tap's dropped count next.
    next_check_ns: u64,
}

/// Where the facts of processes come from: the tap's records and the caches, else /proc.
struct Facts {
    reader: ProcReader,
    tap: Option<Tap>,
    /// Cgroup v2 id -> path, as `/proc/PID/cgroup` gave it for a process whose tap record had
    /// that id.
    cgroup_paths: CgroupPaths,
    /// [`LiveConfig::exec_comm`].
    exec_comm: bool,
}

impl Facts {
    /// The facts of the process `tgid` whose exec event is stamped `event_ns`.
    fn of_exec(&mut self, tgid: Pid, event_ns: u64, counters: &LiveCounters) -> ProcFacts {
        if let Some(tap) = self.tap.as_mut() {
            let matcher = &mut tap.matcher;
            tap.tap.drain(|record| {
                matcher.push(record);
            });
            if event_ns >= tap.next_check_ns {
                tap.next_check_ns = event_ns.saturating_add(TAP_DROPPED_CHECK_NS);
                tap.check_dropped(counters);
            }
            let record = tap.matcher.take(tgid, event_ns);
            counters
                .tap_unmatched
                .store(tap.matcher.unmatched(), Ordering::Relaxed);
            if let Some(facts) = record.and_then(|r| self.of_tap_record(tgid, r)) {
                bump(&counters.execs_from_tap);
                return facts;
            }
        }
        bump(&counters.execs_from_proc);
        // Read right away: the process may be gone a moment later.
        if self.exec_comm {
            self.reader.read_facts(tgid)
        } else {
            self.reader.read_facts_without_comm(tgid)
        }
    }

    /// The facts of an exec from its tap record: the same as /proc would give, with /proc read
    /// only for a cgroup path not cached yet (and `comm` if asked). `None` (read /proc) when
    /// the record has no network namespace, or when the cgroup cannot be read of a process
    /// that is still there.
    fn of_tap_record(&mut self, tgid: Pid, record: TapRecord) -> Option<ProcFacts> {
        let netns = record.netns?;
        let cgroup = match self.cgroup_paths.get(record.cgroup) {
            Some(path) => CgroupRef {
                path: Arc::clone(path),
                id: record.cgroup,
            },
            None => {
                let Some(read) = self.reader.read_cgroup(tgid) else {
                    // Gone already: no facts, as /proc would give, without asking /proc a
                    // second time (short processes of a spawn storm are often gone).
                    if !self.reader.process_exists(tgid) {
                        return Some(ProcFacts::default());
                    }
                    return None;
                };
                if read.id == record.cgroup {
                    let reader = &mut self.reader;
                    self.cgroup_paths
                        .insert(read.id, Arc::clone(&read.path), |id, path| {
                            reader.cgroup_id(path) == Some(id)
                        });
                }
                // Otherwise the process moved after its exec (or the cgroup root given is not
                // the kernel's cgroup2 mount): /proc's path and id belong together, the tap's
                // id is not cached under that path.
                read
            }
        };
        let comm = if self.exec_comm {
            self.reader.read_comm(tgid)
        } else {
            None
        };
        let ips = self.reader.netns_addresses(tgid, netns);
        Some(ProcFacts {
            cgroup: Some(cgroup),
            netns: Some(netns),
            ips,
            comm,
        })
    }

    /// A rescan starts at `started`: records of execs before it are superseded with their
    /// events.
    fn rescan_started(&mut self, started: u64) {
        if let Some(tap) = self.tap.as_mut() {
            tap.matcher.reset(started);
        }
    }

    /// The process `tgid` exited.
    fn exited(&mut self, tgid: Pid) {
        if let Some(tap) = self.tap.as_mut() {
            tap.matcher.forget(tgid);
        }
    }
}

impl Tap {
    /// Copies the tap's dropped count into the counters, with a warning when it grew.
    fn check_dropped(&mut self, counters: &LiveCounters) {
        match self.tap.dropped() {
            Ok(dropped) => {
                let before = counters.tap_dropped.swap(dropped, Ordering::Relaxed);
                if dropped > before {
                    log::warn!(
                        "exec tap: {} records dropped (ring full); those execs' facts are read                          from /proc",
                        dropped - before
                    );
                }
            }
            Err(e) => log::debug!("{e}"),
        }
    }
}

/// The kernel's process events with /proc facts, as an [`EventSource`].
pub struct LiveSource {
    connector: Connector,
    facts: Facts,
    pending: VecDeque<TimedRecord>,
    stop: StopHandle,
    counters: Arc<LiveCounters>,
    /// Events stamped before this (the start of the latest scan) are superseded by the scan.
    discard_before: u64,
    last_ts: u64,
    finished: bool,
}

impl LiveSource {
    /// Loads the exec tap (if asked), subscribes to the proc connector (checking the kernel's
    /// ACK), then scans /proc; the scan is the first record.
    pub fn start(config: &LiveConfig) -> Result<LiveSource, LiveError> {
        let reader = match &config.cgroup_root {
            Some(dir) => ProcReader::with_cgroup_root(dir),
            None => ProcReader::new()?,
        };
        // Before the subscribe: every exec event received then has its record in the ring.
        let mut tap = if config.exec_tap {
            match ExecTap::load() {
                Ok(tap) => {
                    log::info!("exec tap: attached to sched_process_exec; exec facts come from it");
                    Some(Tap {
                        tap,
                        matcher: ExecMatcher::default(),
                        next_check_ns: 0,
                    })
                }
                Err(e) => {
                    log::warn!("{e}; exec facts are read from /proc instead");
                    None
                }
            }
        } else {
            None
        };
        let mut connector = Connector::subscribe(&config.connector)?;
        if let Some(doorbell) = tap.as_mut().and_then(|t| t.tap.take_doorbell()) {
            connector.set_doorbell(Box::new(doorbell));
        }
        log::info!(
            "proc connector: subscribed (receive buffer {} bytes, event mask {}, coalescing \
             window {:?})",
            connector.recv_buffer_bytes(),
            if connector.event_mask_active() {
                "fork|exec|exit"
            } else {
                "none: all events"
            },
            connector.coalesce_window()
        );
        let mut source = LiveSource {
            connector,
            facts: Facts {
                reader,
                tap,
                cgroup_paths: CgroupPaths::default(),
                exec_comm: config.exec_comm,
            },
            pending: VecDeque::new(),
            stop: StopHandle::default(),
            counters: Arc::new(LiveCounters::default()),
            discard_before: 0,
            last_ts: 0,
            finished: false,
        };
        source.push_scan();
        Ok(source)
    }

    /// A handle that makes `next_record` return `Ok(None)`.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The counters, shared (they keep counting).
    pub fn counters(&self) -> Arc<LiveCounters> {
        Arc::clone(&self.counters)
    }

    /// Where the cgroup2 hierarchy is mounted (cgroup ids are inodes below it).
    pub fn cgroup_root(&self) -> &std::path::Path {
        self.facts.reader.cgroup_root()
    }

    /// The exec tap, when it is loaded (for its run-time statistics).
    pub fn exec_tap(&self) -> Option<&ExecTap> {
        self.facts.tap.as_ref().map(|t| &t.tap)
    }

    /// The receive buffer the kernel granted.
    pub fn recv_buffer_bytes(&self) -> usize {
        self.connector.recv_buffer_bytes()
    }

    /// How the connector's receives went (batches, wake-ups, coalescing windows).
    pub fn receive_stats(&self) -> ReceiveStats {
        self.connector.receive_stats()
    }

    fn stamp(&mut self, ts: u64) -> u64 {
        self.last_ts = self.last_ts.max(ts);
        self.last_ts
    }

    fn push_scan(&mut self) {
        let started = monotonic_now_ns();
        self.discard_before = started;
        self.facts.rescan_started(started);
        let processes = self.facts.reader.scan();
        bump(&self.counters.scans);
        let ts = self.stamp(started);
        self.pending.push_back(TimedRecord {
            ts,
            record: Record::Proc(ProcEvent::Scan { processes }),
        });
    }

    fn push_lost_and_rescan(&mut self) {
        bump(&self.counters.lost);
        log::warn!("proc connector: the kernel dropped events (ENOBUFS); rescanning /proc");
        let ts = self.stamp(monotonic_now_ns());
        self.pending.push_back(TimedRecord {
            ts,
            record: Record::Proc(ProcEvent::Lost),
        });
        self.push_scan();
    }

    /// Unsubscribes and ends the source.
    fn finish(&mut self) {
        self.finished = true;
        self.pending.clear();
        if let Err(e) = self.connector.unsubscribe() {
            log::warn!("{e}");
        }
    }
}

impl EventSource for LiveSource {
    fn next_record(&mut self) -> Result<Option<TimedRecord>, SourceError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            if self.stop.is_stopped() {
                self.finish();
                return Ok(None);
            }
            // Before the records of the last receive are handed out, so that its window counts.
            let stats = self.connector.receive_stats();
            let counters = &self.counters;
            counters
                .coalescing_windows
                .store(stats.windows, Ordering::Relaxed);
            counters
                .windows_ended_by_doorbell
                .store(stats.doorbell_rings, Ordering::Relaxed);
            if let Some(record) = self.pending.pop_front() {
                return Ok(Some(record));
            }
            let datagram = match self.connector.recv()? {
                Received::Timeout => {
                    // Idle: a good moment to refresh the tap's dropped count.
                    if let Some(tap) = self.facts.tap.as_mut() {
                        tap.check_dropped(&self.counters);
                    }
                    continue;
                }
                Received::Overrun => {
                    self.push_lost_and_rescan();
                    continue;
                }
                Received::Datagram(d) => d,
            };
            let counters = &self.counters;
            for message in decode(datagram) {
                let (ts, event) = match message {
                    Ok(Message::Event { ts_ns, event }) => (ts_ns, event),
                    Ok(Message::Ack { .. }) | Ok(Message::NotProc { .. }) => {
                        bump(&counters.not_proc);
                        continue;
                    }
                    Ok(Message::Unused { .. }) => {
                        bump(&counters.unused);
                        continue;
                    }
                    Ok(Message::Unknown { what }) => {
                        bump(&counters.unknown);
                        log::debug!("proc connector: unknown event type {what:#x} skipped");
                        continue;
                    }
                    Err(e) => {
                        bump(&counters.malformed);
                        log::warn!("proc connector: {e}; rest of the datagram skipped");
                        continue;
                    }
                };
                if ts < self.discard_before {
                    bump(&counters.superseded);
                    continue;
                }
                let event = match event {
                    KernelEvent::Fork {
                        parent_pid,
                        parent_tgid,
                        child_pid,
                        child_tgid,
                    } => {
                        bump(&counters.forks);
                        ProcEvent::Fork {
                            parent_pid,
                            parent_tgid,
                            child_pid,
                            child_tgid,
                        }
                    }
                    KernelEvent::Exec { pid, tgid } => {
                        bump(&counters.execs);
                        let facts = self.facts.of_exec(tgid, ts, counters);
                        if facts.cgroup.is_none() {
                            bump(&counters.execs_without_facts);
                        }
                        ProcEvent::Exec { pid, tgid, facts }
                    }
                    KernelEvent::Exit {
                        pid,
                        tgid,
                        exit_code,
                    } => {
                        bump(&counters.exits);
                        if pid == tgid {
                            self.facts.exited(tgid);
                        }
                        ProcEvent::Exit {
                            pid,
                            tgid,
                            exit_code,
                        }
                    }
                };
                self.last_ts = self.last_ts.max(ts);
                self.pending.push_back(TimedRecord {
                    ts: self.last_ts,
                    record: Record::Proc(event),
                });
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel's event timestamps.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
