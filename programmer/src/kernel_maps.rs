//! The kernel's maps as a [`MapBackend`]: the maps pinned by the [`crate::loader`], opened as
//! aya's typed maps, with lists written by `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH`
//! (one syscall per list, [`crate::sys`]), falling back to aya's one-entry operations where
//! the kernel refuses batches.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use aya::maps::{Array, HashMap, IterableMap, MapData, MapError};
use aya::Pod;
use watcher::CgroupId;

use crate::backend::{MapBackend, MapBatch};
use crate::layout::{self, CgroupInfo, PodAddr, Settings};
use crate::pins::{self, map_io_error};
use crate::sys;
use crate::ProgramError;

/// How the backend writes lists of entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchMode {
    /// Batch syscalls, falling back to single operations when the kernel refuses them.
    #[default]
    Auto,
    /// One syscall per entry (what the fallback does; selectable for tests and benchmarks).
    SingleOps,
}

/// How many syscalls the backend made, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// `BPF_MAP_UPDATE_BATCH` / `DELETE_BATCH` calls.
    pub batch_calls: u64,
    /// Entries written or deleted one syscall each (the fallback, or `SingleOps`).
    pub single_ops: u64,
    /// Writes of the single `settings` value (with each change of it or of
    /// `cgroup_info_map`: the generation moves).
    pub settings_writes: u64,
}

/// The pinned `cgroup_info_map`, `pod_addr_map` and `settings`, in the kernel.
pub struct KernelMaps {
    cgroup_info: HashMap<MapData, u64, CgroupInfo>,
    pod_addr: HashMap<MapData, PodAddr, u32>,
    settings: Array<MapData, Settings>,
    mode: BatchMode,
    /// The kernel refused a batch call (EINVAL / ENOTSUPP): single operations from then on.
    batch_unsupported: bool,
    stats: BackendStats,
}

impl std::fmt::Debug for KernelMaps {
    // aya's `Array` has no Debug; the maps are known by name anyway.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelMaps")
            .field("mode", &self.mode)
            .field("batch_unsupported", &self.batch_unsupported)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// `ENOTSUPP` (kernel-internal, leaks to user space from some map types).
const ENOTSUPP: i32 = 524;

fn batch_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP)
    )
}

impl KernelMaps {
    /// Opens the maps pinned under `pin_dir` (the base directory, as given to the loader;
    /// the layout version's subdirectory is added here).
    pub fn open(pin_dir: &Path) -> Result<Self, ProgramError> {
        Ok(KernelMaps {
            cgroup_info: pins::open_typed(pin_dir, layout::CGROUP_INFO_MAP)?,
            pod_addr: pins::open_typed(pin_dir, layout::POD_ADDR_MAP)?,
            settings: pins::open_typed(pin_dir, layout::SETTINGS_MAP)?,
            mode: BatchMode::Auto,
            batch_unsupported: false,
            stats: BackendStats::default(),
        })
    }

    pub fn set_mode(&mut self, mode: BatchMode) {
        self.mode = mode;
    }

    pub fn mode(&self) -> BatchMode {
        self.mode
    }

    /// Whether batch calls are in use (false after the kernel refused one).
    pub fn batches_supported(&self) -> bool {
        !self.batch_unsupported
    }

    /// The entry of one cgroup, if it has one: a single lookup, where
    /// [`MapBackend::cgroup_entries`] reads the whole map.
    pub fn cgroup_entry(&self, id: CgroupId) -> Result<Option<CgroupInfo>, ProgramError> {
        match self.cgroup_info.get(&id.0, 0) {
            Ok(info) => Ok(Some(info)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(ProgramError::Map {
                map: layout::CGROUP_INFO_MAP,
                op: "look up an entry",
                error: map_io_error(e),
            }),
        }
    }

    pub fn stats(&self) -> BackendStats {
        self.stats
    }

    fn use_batches(&self) -> bool {
        self.mode == BatchMode::Auto && !self.batch_unsupported
    }

    /// Creates or replaces every entry: one batch call, then one aya insert per entry the
    /// batch did not take (all of them when batches are off or refused).
    fn upsert_all<K: Pod, V: Pod>(
        map_name: &'static str,
        map: &mut HashMap<MapData, K, V>,
        entries: &[(K, V)],
        batches: bool,
        stats: &mut BackendStats,
    ) -> Result<bool, ProgramError> {
        let mut start = 0;
        let mut refused = false;
        if batches && !entries.is_empty() {
            let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
            let (done, result) = sys::update_batch(fd_of(map), &keys, &values);
            stats.batch_calls += 1;
            start = done;
            match result {
                Ok(()) => {}
                // The kernel cannot batch this map: the rest goes one by one below.
                Err(e) if batch_refused(&e) => {
                    log::warn!(
                        "map `{map_name}`: BPF_MAP_UPDATE_BATCH refused ({e}); \
                         using one update per entry"
                    );
                    refused = true;
                }
                Err(e) => {
                    return Err(ProgramError::Map {
                        map: map_name,
                        op: "update batch",
                        error: e,
                    })
                }
            }
        }
        for (key, value) in &entries[start..] {
            stats.single_ops += 1;
            map.insert(key, value, sys::BPF_ANY)
                .map_err(|e| ProgramError::Map {
                    map: map_name,
                    op: "update",
                    error: map_io_error(e),
                })?;
        }
        Ok(refused)
    }

    /// Deletes every key; keys already absent are not an error (reconciliation may delete
    /// what another run removed).
    fn delete_all<K: Pod, V: Pod>(
        map_name: &'static str,
        map: &mut HashMap<MapData, K, V>,
        keys: &[K],
        batches: bool,
        stats: &mut BackendStats,
    ) -> Result<bool, ProgramError> {
        let mut start = 0;
        let mut refused = false;
        if batches && !keys.is_empty() {
            while start < keys.len() {
                let (done, result) = sys::delete_batch(fd_of(map), &keys[start..]);
                stats.batch_calls += 1;
                start += done;
                match result {
                    Ok(()) => break,
                    // The key at `start` was absent: skip it and go on with the rest.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => start += 1,
                    Err(e) if batch_refused(&e) => {
                        log::warn!(
                            "map `{map_name}`: BPF_MAP_DELETE_BATCH refused ({e}); \
                             using one delete per entry"
                        );
                        refused = true;
                        break;
                    }
                    Err(e) => {
                        return Err(ProgramError::Map {
                            map: map_name,
                            op: "delete batch",
                            error: e,
                        })
                    }
                }
            }
        }
        for key in &keys[start.min(keys.len())..] {
            stats.single_ops += 1;
            match map.remove(key) {
                Ok(()) => {}
                Err(e) if is_absent(&e) => {}
                Err(e) => {
                    return Err(ProgramError::Map {
                        map: map_name,
                        op: "delete",
                        error: map_io_error(e),
                    })
                }
            }
        }
        Ok(refused)
    }
}

/// The map's fd, for the batch calls aya does not have.
fn fd_of<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> BorrowedFd<'_> {
    IterableMap::map(map).fd().as_fd()
}

/// aya's error for a key that is not in the map.
fn is_absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Every entry of a hash map, in the kernel's iteration order (an entry deleted while it is
/// read is left out).
pub fn read_entries<K: Pod, V: Pod>(
    map_name: &'static str,
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, ProgramError> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProgramError::Map {
            map: map_name,
            op: "read entries",
            error: map_io_error(e),
        })
}

impl MapBackend for KernelMaps {
    fn apply(&mut self, batch: &MapBatch) -> Result<(), ProgramError> {
        let batches = self.use_batches();
        // What `settings` holds now: the generation to count on from.
        let current_settings = self.settings()?;
        let stats = &mut self.stats;
        // Same order as the MemoryBackend: deletes before upserts of each map.
        let deletes: Vec<u64> = batch.cgroup_deletes.iter().map(|id| id.0).collect();
        let upserts: Vec<(u64, CgroupInfo)> = batch
            .cgroup_upserts
            .iter()
            .map(|(id, info)| (id.0, *info))
            .collect();
        let mut refused = Self::delete_all(
            layout::CGROUP_INFO_MAP,
            &mut self.cgroup_info,
            &deletes,
            batches,
            stats,
        )?;
        refused |= Self::upsert_all(
            layout::CGROUP_INFO_MAP,
            &mut self.cgroup_info,
            &upserts,
            batches && !refused,
            stats,
        )?;
        refused |= Self::delete_all(
            layout::POD_ADDR_MAP,
            &mut self.pod_addr,
            &batch.addr_deletes,
            batches && !refused,
            stats,
        )?;
        refused |= Self::upsert_all(
            layout::POD_ADDR_MAP,
            &mut self.pod_addr,
            &batch.addr_upserts,
            batches && !refused,
            stats,
        )?;
        // Last, after the entries it vouches for: the generation that tells the programs
        // their cached entries are stale.
        if let Some(settings) = batch.settings_after(&current_settings) {
            stats.settings_writes += 1;
            self.settings
                .set(0, settings, sys::BPF_ANY)
                .map_err(|e| ProgramError::Map {
                    map: layout::SETTINGS_MAP,
                    op: "update",
                    error: map_io_error(e),
                })?;
        }
        self.batch_unsupported |= refused;
        Ok(())
    }

    fn cgroup_entries(&self) -> Result<Vec<(CgroupId, CgroupInfo)>, ProgramError> {
        let mut entries = read_entries(layout::CGROUP_INFO_MAP, &self.cgroup_info)?;
        entries.sort_by_key(|(id, _)| *id);
        Ok(entries
            .into_iter()
            .map(|(id, info)| (CgroupId(id), info))
            .collect())
    }

    fn addr_entries(&self) -> Result<Vec<(PodAddr, u32)>, ProgramError> {
        let mut entries = read_entries(layout::POD_ADDR_MAP, &self.pod_addr)?;
        entries.sort();
        Ok(entries)
    }

    fn settings(&self) -> Result<Settings, ProgramError> {
        self.settings.get(&0, 0).map_err(|e| ProgramError::Map {
            map: layout::SETTINGS_MAP,
            op: "lookup",
            error: map_io_error(e),
        })
    }
}
