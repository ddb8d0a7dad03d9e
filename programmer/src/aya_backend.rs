//! The kernel's maps as a [`MapBackend`]: the maps pinned by the [`crate::loader`], written
//! with `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` (one syscall per list), falling back
//! to one syscall per entry where the kernel refuses batches.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use watcher::CgroupId;

use crate::backend::{MapBackend, MapBatch};
use crate::layout::{self, CgroupInfo, PodAddr, Settings};
use crate::sys::{self, Plain};
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

/// The pinned `cgroup_info_map`, `pod_addr_map` and `settings`.
#[derive(Debug)]
pub struct AyaBackend {
    cgroup_info: OwnedFd,
    pod_addr: OwnedFd,
    settings: OwnedFd,
    mode: BatchMode,
    /// The kernel refused a batch call (EINVAL / ENOTSUPP): single operations from then on.
    batch_unsupported: bool,
    stats: BackendStats,
}

/// `ENOTSUPP` (kernel-internal, leaks to user space from some map types).
const ENOTSUPP: i32 = 524;

fn batch_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP)
    )
}

impl AyaBackend {
    /// Opens the maps pinned under `pin_dir` (the base directory, as given to the loader;
    /// the layout version's subdirectory is added here).
    pub fn open(pin_dir: &Path) -> Result<Self, ProgramError> {
        Ok(AyaBackend {
            cgroup_info: crate::loader::open_pinned_map(pin_dir, layout::CGROUP_INFO_MAP)?,
            pod_addr: crate::loader::open_pinned_map(pin_dir, layout::POD_ADDR_MAP)?,
            settings: crate::loader::open_pinned_map(pin_dir, layout::SETTINGS_MAP)?,
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

    pub fn stats(&self) -> BackendStats {
        self.stats
    }

    fn use_batches(&self) -> bool {
        self.mode == BatchMode::Auto && !self.batch_unsupported
    }

    /// Creates or replaces every entry.
    fn upsert_all<K: Plain, V: Plain>(
        map: &'static str,
        fd: BorrowedFd<'_>,
        entries: &[(K, V)],
        batches: bool,
        stats: &mut BackendStats,
    ) -> Result<bool, ProgramError> {
        let mut start = 0;
        let mut refused = false;
        if batches && !entries.is_empty() {
            let keys: Vec<u8> = entries
                .iter()
                .flat_map(|(k, _)| sys::bytes_of(k).iter().copied())
                .collect();
            let values: Vec<u8> = entries
                .iter()
                .flat_map(|(_, v)| sys::bytes_of(v).iter().copied())
                .collect();
            let (done, result) = sys::update_batch(fd, &keys, &values, entries.len());
            stats.batch_calls += 1;
            start = done;
            match result {
                Ok(()) => {}
                // The kernel cannot batch this map: the rest goes one by one below.
                Err(e) if batch_refused(&e) => {
                    log::warn!(
                        "map `{map}`: BPF_MAP_UPDATE_BATCH refused ({e}); \
                         using one update per entry"
                    );
                    refused = true;
                }
                Err(e) => {
                    return Err(ProgramError::Map {
                        map,
                        op: "update batch",
                        source: e,
                    })
                }
            }
        }
        for (key, value) in &entries[start..] {
            stats.single_ops += 1;
            sys::update_elem(fd, sys::bytes_of(key), sys::bytes_of(value), sys::BPF_ANY).map_err(
                |e| ProgramError::Map {
                    map,
                    op: "update",
                    source: e,
                },
            )?;
        }
        Ok(refused)
    }

    /// Deletes every key; keys already absent are not an error (reconciliation may delete
    /// what another run removed).
    fn delete_all<K: Plain>(
        map: &'static str,
        fd: BorrowedFd<'_>,
        keys: &[K],
        batches: bool,
        stats: &mut BackendStats,
    ) -> Result<bool, ProgramError> {
        let mut start = 0;
        let mut refused = false;
        if batches && !keys.is_empty() {
            let bytes: Vec<u8> = keys
                .iter()
                .flat_map(|k| sys::bytes_of(k).iter().copied())
                .collect();
            let ks = size_of::<K>();
            while start < keys.len() {
                let (done, result) =
                    sys::delete_batch(fd, &bytes[start * ks..], keys.len() - start);
                stats.batch_calls += 1;
                start += done;
                match result {
                    Ok(()) => break,
                    // The key at `start` was absent: skip it and go on with the rest.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => start += 1,
                    Err(e) if batch_refused(&e) => {
                        log::warn!(
                            "map `{map}`: BPF_MAP_DELETE_BATCH refused ({e}); \
                             using one delete per entry"
                        );
                        refused = true;
                        break;
                    }
                    Err(e) => {
                        return Err(ProgramError::Map {
                            map,
                            op: "delete batch",
                            source: e,
                        })
                    }
                }
            }
        }
        for key in &keys[start.min(keys.len())..] {
            stats.single_ops += 1;
            sys::delete_elem(fd, sys::bytes_of(key)).map_err(|e| ProgramError::Map {
                map,
                op: "delete",
                source: e,
            })?;
        }
        Ok(refused)
    }
}

/// Every entry of a hash map, in the kernel's iteration order.
pub fn read_entries<K: Plain, V: Plain>(
    map: &'static str,
    fd: BorrowedFd<'_>,
) -> Result<Vec<(K, V)>, ProgramError> {
    let err = |op, source| ProgramError::Map { map, op, source };
    let mut out = Vec::new();
    let mut key = vec![0u8; size_of::<K>()];
    let mut next = vec![0u8; size_of::<K>()];
    let mut value = vec![0u8; size_of::<V>()];
    let mut first = true;
    while sys::get_next_key(fd, (!first).then_some(&key[..]), &mut next)
        .map_err(|e| err("get next key", e))?
    {
        first = false;
        std::mem::swap(&mut key, &mut next);
        // The entry may be deleted between the two calls: then it is simply not listed.
        if sys::lookup_elem(fd, &key, &mut value).map_err(|e| err("lookup", e))? {
            out.push((sys::from_bytes::<K>(&key), sys::from_bytes::<V>(&value)));
        }
    }
    Ok(out)
}

impl MapBackend for AyaBackend {
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
            self.cgroup_info.as_fd(),
            &deletes,
            batches,
            stats,
        )?;
        refused |= Self::upsert_all(
            layout::CGROUP_INFO_MAP,
            self.cgroup_info.as_fd(),
            &upserts,
            batches && !refused,
            stats,
        )?;
        refused |= Self::delete_all(
            layout::POD_ADDR_MAP,
            self.pod_addr.as_fd(),
            &batch.addr_deletes,
            batches && !refused,
            stats,
        )?;
        refused |= Self::upsert_all(
            layout::POD_ADDR_MAP,
            self.pod_addr.as_fd(),
            &batch.addr_upserts,
            batches && !refused,
            stats,
        )?;
        // Last, after the entries it vouches for: the generation that tells the programs
        // their cached entries are stale.
        if let Some(settings) = batch.settings_after(&current_settings) {
            stats.settings_writes += 1;
            sys::update_elem(
                self.settings.as_fd(),
                sys::bytes_of(&0u32),
                sys::bytes_of(&settings),
                sys::BPF_ANY,
            )
            .map_err(|e| ProgramError::Map {
                map: layout::SETTINGS_MAP,
                op: "update",
                source: e,
            })?;
        }
        self.batch_unsupported |= refused;
        Ok(())
    }

    fn cgroup_entries(&self) -> Result<Vec<(CgroupId, CgroupInfo)>, ProgramError> {
        let mut entries =
            read_entries::<u64, CgroupInfo>(layout::CGROUP_INFO_MAP, self.cgroup_info.as_fd())?;
        entries.sort_by_key(|(id, _)| *id);
        Ok(entries
            .into_iter()
            .map(|(id, info)| (CgroupId(id), info))
            .collect())
    }

    fn addr_entries(&self) -> Result<Vec<(PodAddr, u32)>, ProgramError> {
        let mut entries =
            read_entries::<PodAddr, u32>(layout::POD_ADDR_MAP, self.pod_addr.as_fd())?;
        entries.sort();
        Ok(entries)
    }

    fn settings(&self) -> Result<Settings, ProgramError> {
        let mut value = [0u8; size_of::<Settings>()];
        sys::lookup_elem(self.settings.as_fd(), sys::bytes_of(&0u32), &mut value).map_err(|e| {
            ProgramError::Map {
                map: layout::SETTINGS_MAP,
                op: "lookup",
                source: e,
            }
        })?;
        Ok(sys::from_bytes(&value))
    }
}
