//! The exec tap: a BPF program that records, for every exec, the facts the watcher would
//! otherwise read from `/proc` (cgroup id, network namespace), and the matching of its records
//! with the proc connector's exec events.
//!
//! `bpf/exec_tap.bpf.c` runs on the `sched_process_exec` raw tracepoint and writes one
//! [`TapRecord`] to a BPF ring buffer. The kernel fires that tracepoint before it sends the
//! connector's exec event, from the same task, so when the watcher receives an exec event the
//! record is already in the ring; reading the ring costs memory reads, no syscall.
//!
//! [`ExecMatcher`] pairs records with events: records wait in a table keyed by process id
//! until the exec event of that process comes. A process can exec several times under one pid
//! (`sh -c 'exec x'`), so each pid holds its records in order, and an event takes the newest
//! record not newer than itself: the records after it are of later execs (whose events are
//! still queued in the socket), the ones before it are of execs whose events were handled
//! already (without them, e.g. from `/proc`) and are dropped. No record for an event (the ring
//! was full, the tap is absent) means the facts are read from `/proc` instead.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::RawTracePoint;
use aya::{Ebpf, EbpfLoader};

use crate::connector::Doorbell;
use crate::event::{CgroupId, Pid};

/// The object built from `bpf/exec_tap.bpf.c` by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/exec_tap.bpf.o"));

/// The program's name in the object (its function name).
pub const PROGRAM: &str = "exec_tap";
/// The raw tracepoint it attaches to.
pub const TRACEPOINT: &str = "sched_process_exec";
/// The ring buffer of records.
pub const RING_MAP: &str = "exec_tap_events";
/// The doorbell: a ring of the cgroup ids of first execs in a cgroup, each with a wakeup.
pub const NEW_CGROUPS_MAP: &str = "exec_tap_new_cgroups";
/// The per-CPU count of records the full ring could not take.
pub const DROPPED_MAP: &str = "exec_tap_dropped";
/// Bytes of one record in the ring (`struct exec_tap_record`).
pub const RECORD_LEN: usize = 24;

/// What a failed load of the tap says; each names the program or map and the cause.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    // aya's error and its causes are all in the message, none is this error's source: a chain
    // printer (anyhow's `{:#}`) would print them twice.
    #[error("exec tap: loading the BPF object (maps {RING_MAP}, {DROPPED_MAP}): {}{}", chain(.error), hint(.error))]
    Object { error: aya::EbpfError },
    #[error("exec tap: the object has no {what} `{name}`")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("exec tap: program `{PROGRAM}`: {action}: {}{}", chain(.error), hint(.error))]
    Program {
        action: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error("exec tap: map `{map}`: {}{}", chain(.error), hint(.error))]
    Map {
        map: &'static str,
        error: aya::maps::MapError,
    },
}

/// `error` and its causes, joined by `: ` (a cause whose text is already there is left out).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// A hint for the usual cause, found in the chain of sources: EPERM is missing capabilities.
fn hint(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    " (not permitted: the exec tap needs CAP_BPF and CAP_PERFMON, or \
                     CAP_SYS_ADMIN)"
                }
                _ => "",
            };
        }
        cause = e.source();
    }
    ""
}

/// One exec as the tap saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapRecord {
    /// `bpf_ktime_get_ns()` at the exec: CLOCK_MONOTONIC, the clock of the connector's
    /// timestamps, taken before the connector stamps its event.
    pub ktime_ns: u64,
    /// The process id (tgid), as the connector's exec event reports it.
    pub tgid: Pid,
    /// `bpf_get_current_cgroup_id()`: the cgroup v2 id (inode of the cgroup directory).
    pub cgroup: CgroupId,
    /// The inode of the process's network namespace; `None` if the program could not read it.
    pub netns: Option<u64>,
}

impl TapRecord {
    /// Decodes a record of the ring (`struct exec_tap_record`, native byte order); `None` for
    /// bytes of another length.
    pub fn decode(bytes: &[u8]) -> Option<TapRecord> {
        if bytes.len() != RECORD_LEN {
            return None;
        }
        let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        let netns = u32_at(20);
        Some(TapRecord {
            ktime_ns: u64_at(0),
            cgroup: CgroupId(u64_at(8)),
            tgid: u32_at(16),
            netns: (netns != 0).then_some(u64::from(netns)),
        })
    }
}

/// The loaded and attached tap. Dropping it detaches the program and frees the maps.
pub struct ExecTap {
    /// Owns the program and its link: they live as long as the tap.
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    dropped: PerCpuArray<MapData, u64>,
    /// Until [`ExecTap::take_doorbell`].
    doorbell: Option<NewCgroupDoorbell>,
}

/// The tap's doorbell (see [`Doorbell`]): it rings for an exec that is the first the tap has
/// seen in its cgroup, the exec a new pod's enrolment waits for, so that the watcher does not
/// hold it back for a coalescing window.
pub struct NewCgroupDoorbell {
    ring: RingBuf<MapData>,
}

impl NewCgroupDoorbell {
    /// Hands the cgroup of each ring since the last drain to `f`, in ring order, and frees
    /// their space.
    pub fn drain_cgroups(&mut self, mut f: impl FnMut(CgroupId)) {
        while let Some(item) = self.ring.next() {
            if let Ok(id) = <[u8; 8]>::try_from(&item[..]) {
                f(CgroupId(u64::from_ne_bytes(id)));
            }
        }
    }
}

impl Doorbell for NewCgroupDoorbell {
    fn fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    fn drain(&mut self) -> bool {
        // Only rings: the exec's facts are in its record of the main ring.
        let mut rang = false;
        self.drain_cgroups(|_| rang = true);
        rang
    }
}

impl ExecTap {
    /// Loads the embedded object (CO-RE relocated against the running kernel's BTF) and
    /// attaches the program to the `sched_process_exec` raw tracepoint.
    pub fn load() -> Result<ExecTap, TapError> {
        ExecTap::load_bytes(OBJECT)
    }

    /// [`ExecTap::load`] of another build of the object (tests).
    pub fn load_bytes(object: &[u8]) -> Result<ExecTap, TapError> {
        let mut ebpf = EbpfLoader::new()
            .load(object)
            .map_err(|error| TapError::Object { error })?;
        let program: &mut RawTracePoint = ebpf
            .program_mut(PROGRAM)
            .ok_or(TapError::Missing {
                what: "program",
                name: PROGRAM,
            })?
            .try_into()
            .map_err(|error| TapError::Program {
                action: "not a raw tracepoint program",
                error,
            })?;
        program.load().map_err(|error| TapError::Program {
            action: "load (BPF_PROG_LOAD)",
            error,
        })?;
        program
            .attach(TRACEPOINT)
            .map_err(|error| TapError::Program {
                action: "attach to raw tracepoint sched_process_exec (BPF_RAW_TRACEPOINT_OPEN)",
                error,
            })?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(TapError::Missing { what: "map", name })
        };
        let ring =
            RingBuf::try_from(take(&mut ebpf, RING_MAP)?).map_err(|error| TapError::Map {
                map: RING_MAP,
                error,
            })?;
        let dropped = PerCpuArray::try_from(take(&mut ebpf, DROPPED_MAP)?).map_err(|error| {
            TapError::Map {
                map: DROPPED_MAP,
                error,
            }
        })?;
        let doorbell = RingBuf::try_from(take(&mut ebpf, NEW_CGROUPS_MAP)?).map_err(|error| {
            TapError::Map {
                map: NEW_CGROUPS_MAP,
                error,
            }
        })?;
        Ok(ExecTap {
            ebpf,
            ring,
            dropped,
            doorbell: Some(NewCgroupDoorbell { ring: doorbell }),
        })
    }

    /// The doorbell, for the proc connector's reader (`None` once taken).
    pub fn take_doorbell(&mut self) -> Option<NewCgroupDoorbell> {
        self.doorbell.take()
    }

    /// Hands every record in the ring to `f`, in the ring's order, and frees their space.
    /// Returns how many there were. Bytes of an unexpected length are skipped (counted in the
    /// return value too: they can only come from a mismatched build).
    pub fn drain(&mut self, mut f: impl FnMut(TapRecord)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            n += 1;
            if let Some(record) = TapRecord::decode(&item) {
                f(record);
            }
        }
        n
    }

    /// Records the full ring could not take since the load, summed over CPUs (one syscall).
    pub fn dropped(&self) -> Result<u64, TapError> {
        let values = self.dropped.get(&0, 0).map_err(|error| TapError::Map {
            map: DROPPED_MAP,
            error,
        })?;
        Ok(values.iter().sum())
    }

    /// The program's runs and total run time so far, as the kernel counts them while
    /// `BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)` is on (both stay 0 otherwise).
    pub fn run_stats(&self) -> Result<(u64, Duration), TapError> {
        let program: &RawTracePoint = self
            .ebpf
            .program(PROGRAM)
            .ok_or(TapError::Missing {
                what: "program",
                name: PROGRAM,
            })?
            .try_into()
            .map_err(|error| TapError::Program {
                action: "not a raw tracepoint program",
                error,
            })?;
        let info = program.info().map_err(|error| TapError::Program {
            action: "program info (BPF_OBJ_GET_INFO_BY_FD)",
            error,
        })?;
        Ok((info.run_count(), info.run_time()))
    }
}

/// Records waiting for their exec event, by process id. Bounded: see [`ExecMatcher::new`].
#[derive(Debug)]
pub struct ExecMatcher {
    /// Each pid's records in ring order, which for one process is the order of its execs.
    pending: HashMap<Pid, Vec<TapRecord>>,
    /// Records in `pending`.
    len: usize,
    cap: usize,
    /// Records stamped before this are not kept: see [`ExecMatcher::reset`].
    ignore_before: u64,
    /// Records dropped without an event: over the cap, at their process's exit, at a reset,
    /// or passed over by a later exec of the same process.
    unmatched: u64,
}

/// Records kept at most: past this the table is cleared. Normally it holds a few records
/// (those of execs whose events are still in the socket), so this is only reached when events
/// went missing; every exec of the cleared records reads `/proc` instead.
pub const MATCHER_CAP: usize = 16 * 1024;

impl Default for ExecMatcher {
    fn default() -> Self {
        ExecMatcher::new(MATCHER_CAP)
    }
}

impl ExecMatcher {
    /// A table that holds at most `cap` records: records whose event never comes (the
    /// connector dropped it and the table was not reset, or the process's exit was missed)
    /// would otherwise pile up.
    pub fn new(cap: usize) -> ExecMatcher {
        ExecMatcher {
            pending: HashMap::new(),
            len: 0,
            cap: cap.max(1),
            ignore_before: 0,
            unmatched: 0,
        }
    }

    /// Adds a record from the ring. A record older than the last [`ExecMatcher::reset`] is
    /// ignored (returns false): its event, if still queued, is discarded as superseded too.
    pub fn push(&mut self, record: TapRecord) -> bool {
        if record.ktime_ns < self.ignore_before {
            self.unmatched += 1;
            return false;
        }
        if self.len >= self.cap {
            self.unmatched += self.len as u64;
            self.pending.clear();
            self.len = 0;
        }
        self.pending.entry(record.tgid).or_default().push(record);
        self.len += 1;
        true
    }

    /// The record of the exec event of `tgid` stamped `event_ns`: the newest of that pid's
    /// records not newer than the event. Older ones are dropped (their execs' events came
    /// before this one and were handled without them); newer ones stay for later events.
    pub fn take(&mut self, tgid: Pid, event_ns: u64) -> Option<TapRecord> {
        let records = self.pending.get_mut(&tgid)?;
        // Records of one process are in exec order, so their times increase.
        let newer = records.partition_point(|r| r.ktime_ns <= event_ns);
        if newer == 0 {
            return None;
        }
        let record = records[newer - 1];
        records.drain(..newer);
        self.unmatched += (newer - 1) as u64;
        self.len -= newer;
        if records.is_empty() {
            self.pending.remove(&tgid);
        }
        Some(record)
    }

    /// The process `tgid` exited: its pid may be reused, so records still waiting under it
    /// (whose events went unmatched) must not be taken by the next process of that pid.
    pub fn forget(&mut self, tgid: Pid) {
        if self.len == 0 {
            return;
        }
        if let Some(records) = self.pending.remove(&tgid) {
            self.len -= records.len();
            self.unmatched += records.len() as u64;
        }
    }

    /// Drops every record and ignores records stamped before `ignore_before` from now on: after
    /// a loss of connector events and the rescan that started at `ignore_before`, a waiting
    /// record may belong to a lost event.
    pub fn reset(&mut self, ignore_before: u64) {
        self.unmatched += self.len as u64;
        self.pending.clear();
        self.len = 0;
        self.ignore_before = ignore_before;
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records dropped without their event so far.
    pub fn unmatched(&self) -> u64 {
        self.unmatched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(tgid: Pid, ktime_ns: u64, cgroup: u64) -> TapRecord {
        TapRecord {
            ktime_ns,
            tgid,
            cgroup: CgroupId(cgroup),
            netns: Some(4026531840),
        }
    }

    #[test]
    fn decodes_the_c_layout() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&123u64.to_ne_bytes());
        bytes.extend_from_slice(&77u64.to_ne_bytes());
        bytes.extend_from_slice(&42u32.to_ne_bytes());
        bytes.extend_from_slice(&4026531840u32.to_ne_bytes());
        assert_eq!(TapRecord::decode(&bytes), Some(rec(42, 123, 77)));
        bytes[20..].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(TapRecord::decode(&bytes).unwrap().netns, None);
        assert_eq!(TapRecord::decode(&bytes[..20]), None);
    }

    #[test]
    fn an_event_takes_its_pids_record() {
        let mut m = ExecMatcher::default();
        m.push(rec(10, 100, 1));
        m.push(rec(11, 101, 2));
        assert_eq!(m.take(11, 150), Some(rec(11, 101, 2)));
        assert_eq!(m.take(11, 150), None, "taken once");
        assert_eq!(m.take(10, 150), Some(rec(10, 100, 1)));
        assert!(m.is_empty());
        assert_eq!(m.unmatched(), 0);
    }

    #[test]
    fn a_double_exec_under_one_pid_is_matched_in_order() {
        // `sh -c 'exec x'`: both records are in the ring before the first event is read.
        let mut m = ExecMatcher::default();
        m.push(rec(10, 100, 1));
        m.push(rec(10, 200, 2));
        assert_eq!(m.take(10, 110), Some(rec(10, 100, 1)));
        assert_eq!(m.take(10, 210), Some(rec(10, 200, 2)));
        assert!(m.is_empty());
    }

    #[test]
    fn a_record_newer_than_the_event_is_not_taken() {
        // The first exec's record was dropped (ring full): its event must not take the
        // second exec's record, which its own event takes later.
        let mut m = ExecMatcher::default();
        m.push(rec(10, 200, 2));
        assert_eq!(m.take(10, 110), None);
        assert_eq!(m.take(10, 210), Some(rec(10, 200, 2)));
    }

    #[test]
    fn a_missing_record_is_none() {
        let mut m = ExecMatcher::default();
        assert_eq!(m.take(10, 110), None);
        m.push(rec(11, 100, 1));
        assert_eq!(m.take(10, 110), None);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn older_records_of_the_pid_are_passed_over() {
        // A record whose event was handled without it (it came late) must not be taken by a
        // later exec of the same process.
        let mut m = ExecMatcher::default();
        m.push(rec(10, 100, 1));
        m.push(rec(10, 200, 2));
        assert_eq!(m.take(10, 210), Some(rec(10, 200, 2)));
        assert!(m.is_empty());
        assert_eq!(m.unmatched(), 1);
    }

    #[test]
    fn exit_forgets_the_pid() {
        let mut m = ExecMatcher::default();
        m.push(rec(10, 100, 1));
        m.forget(10);
        assert!(m.is_empty());
        // The next process of pid 10 does not take the dead one's record.
        assert_eq!(m.take(10, 300), None);
        assert_eq!(m.unmatched(), 1);
    }

    #[test]
    fn reset_drops_everything_and_ignores_older_records() {
        let mut m = ExecMatcher::default();
        m.push(rec(10, 100, 1));
        m.reset(150);
        assert!(m.is_empty());
        assert!(!m.push(rec(11, 140, 1)), "from before the rescan");
        assert!(m.push(rec(12, 160, 1)));
        assert_eq!(m.take(12, 170), Some(rec(12, 160, 1)));
        assert_eq!(m.unmatched(), 2);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut m = ExecMatcher::new(3);
        for pid in 0..3 {
            m.push(rec(pid, 100 + u64::from(pid), 1));
        }
        assert_eq!(m.len(), 3);
        m.push(rec(3, 200, 1));
        assert_eq!(m.len(), 1, "cleared when full, then the new record kept");
        assert_eq!(m.take(0, 300), None);
        assert_eq!(m.take(3, 300), Some(rec(3, 200, 1)));
        assert_eq!(m.unmatched(), 3);
    }
}
