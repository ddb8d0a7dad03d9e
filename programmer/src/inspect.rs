//! Reading the maps the programs write for themselves (counters, original destinations), for
//! `zbridge dump`, the ops endpoint and tests. The programmer never writes them.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{HashMap, MapData, PerCpuArray};

use crate::layout::{self, Counters};
use crate::pins::{self, map_io_error};
use crate::sys;
use crate::ProgramError;

/// Reads the pinned per-CPU `counters` and sums each over the CPUs.
pub fn read_counters(pin_dir: &Path) -> Result<Counters, ProgramError> {
    let sums = sum_per_cpu::<{ layout::COUNTER_COUNT }>(pin_dir, layout::COUNTERS_MAP)?;
    Ok(Counters::from_values(&sums))
}

/// The in-pod inbound program's counters (`inbound_counters`, pinned with the other maps once
/// an in-pod agent ran), summed over CPUs; `Ok(None)` when it is not pinned (node mode).
pub fn read_inbound_counters(
    pin_dir: &Path,
) -> Result<Option<crate::inbound::InboundCounters>, ProgramError> {
    let map = crate::inbound::COUNTER_MAP;
    if !pins::maps_dir(pin_dir).join(map).exists() {
        return Ok(None);
    }
    let sums = sum_per_cpu::<{ crate::inbound::COUNTER_COUNT }>(pin_dir, map)?;
    Ok(Some(crate::inbound::InboundCounters::from_values(&sums)))
}

/// The first `N` slots of a pinned per-CPU array of counters, each summed over the CPUs.
fn sum_per_cpu<const N: usize>(
    pin_dir: &Path,
    map: &'static str,
) -> Result<[u64; N], ProgramError> {
    let counters: PerCpuArray<MapData, u64> = pins::open_typed(pin_dir, map)?;
    let mut sums = [0u64; N];
    for (index, sum) in sums.iter_mut().enumerate() {
        let per_cpu = counters
            .get(&(index as u32), 0)
            .map_err(|e| ProgramError::Map {
                map,
                op: "lookup",
                error: map_io_error(e),
            })?;
        *sum = per_cpu.iter().sum();
    }
    Ok(sums)
}

/// One record of `orig_dst_by_tuple`: a redirected connection ztunnel has not asked about
/// yet, and where it was going (answered records are deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TupleRecord {
    pub tuple: layout::ConnTuple,
    pub dst: layout::OrigDst,
}

impl TupleRecord {
    /// The connection's client: its address and source port.
    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(
            layout::PodAddr {
                addr: self.tuple.src,
            }
            .ip(),
            u16::from_be(self.tuple.sport),
        )
    }

    /// Where the client was going.
    pub fn orig_dst(&self) -> SocketAddr {
        SocketAddr::new(
            layout::PodAddr {
                addr: self.dst.addr,
            }
            .ip(),
            u16::from_be(self.dst.port),
        )
    }
}

/// Reads every record of the pinned `orig_dst_by_tuple`, sorted by tuple. Records come and
/// go while it is read (the programs store and delete them): one deleted meanwhile is left
/// out, and the kernel's walk, which starts over when the key it stands on is deleted, may
/// meet one twice (kept once).
pub fn read_tuple_records(pin_dir: &Path) -> Result<Vec<TupleRecord>, ProgramError> {
    let map = layout::ORIG_DST_BY_TUPLE_MAP;
    let records: HashMap<MapData, layout::ConnTuple, layout::OrigDst> =
        pins::open_typed(pin_dir, map)?;
    let mut out = records
        .iter()
        .map(|item| item.map(|(tuple, dst)| TupleRecord { tuple, dst }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProgramError::Map {
            map,
            op: "read entries",
            error: map_io_error(e),
        })?;
    let key = |r: &TupleRecord| (r.tuple.src, r.tuple.dst, r.tuple.sport, r.tuple.dport);
    out.sort_by_key(key);
    out.dedup_by_key(|r| key(r));
    Ok(out)
}

/// The record the programs keep in the storage of process `pid`'s main thread
/// (`orig_dst_by_task`), or `None` when it has none (it never connected from an enrolled
/// cgroup). Other threads are not reachable this way (see [`crate::sys::pidfd_open`]).
pub fn read_thread_record(
    pin_dir: &Path,
    pid: u32,
) -> Result<Option<layout::ConnectRecord>, ProgramError> {
    let map = layout::ORIG_DST_BY_TASK_MAP;
    let task_storage = pins::open_pinned_map_data(pin_dir, map)?;
    let err = |op, source| ProgramError::Map {
        map,
        op,
        error: source,
    };
    // Task storage is keyed by a pidfd from user space.
    let pidfd = sys::pidfd_open(pid).map_err(|e| err("pidfd_open", e))?;
    sys::lookup_elem(task_storage.fd().as_fd(), &pidfd.as_raw_fd()).map_err(|e| err("lookup", e))
}
