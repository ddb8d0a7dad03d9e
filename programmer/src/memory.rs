//! The in-memory [`MapBackend`]s: the maps as plain collections, sorted for tests and dumps
//! ([`MemoryBackend`]), hashed for replay ([`HashedMemoryBackend`], which writes them hundreds
//! of thousands of times and reads them only by key at the end). Both list their entries
//! sorted by key, so that a programmer over either does the same.

use std::collections::BTreeMap;
use std::hash::Hash;

use rustc_hash::FxHashMap;

use crate::backend::{MapBackend, MapBatch};
use crate::layout::{CgroupInfo, PodAddr, Settings};
use crate::ProgramError;
use watcher::CgroupId;

/// The maps, in memory: `C` holds the cgroup entries and `A` the address entries.
#[derive(Debug, Default, Clone)]
pub struct InMemory<C, A> {
    pub cgroups: C,
    pub addrs: A,
    pub settings: Settings,
    /// How many batches were applied (for tests and replay statistics).
    pub batches: u64,
}

/// The maps, sorted, so that what is printed from them is deterministic.
pub type MemoryBackend = InMemory<BTreeMap<CgroupId, CgroupInfo>, BTreeMap<PodAddr, u32>>;

/// The maps, hashed: written faster, listed sorted all the same.
pub type HashedMemoryBackend = InMemory<FxHashMap<CgroupId, CgroupInfo>, FxHashMap<PodAddr, u32>>;

/// A collection that can hold one in-memory map.
pub trait EntryTable<K, V> {
    fn put(&mut self, key: K, value: V);
    fn drop_key(&mut self, key: &K);
    /// The entries, sorted by key.
    fn sorted(&self) -> Vec<(K, V)>;
}

impl<K: Ord + Copy, V: Copy> EntryTable<K, V> for BTreeMap<K, V> {
    fn put(&mut self, key: K, value: V) {
        self.insert(key, value);
    }

    fn drop_key(&mut self, key: &K) {
        self.remove(key);
    }

    fn sorted(&self) -> Vec<(K, V)> {
        self.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

impl<K: Ord + Hash + Copy, V: Copy> EntryTable<K, V> for FxHashMap<K, V> {
    fn put(&mut self, key: K, value: V) {
        self.insert(key, value);
    }

    fn drop_key(&mut self, key: &K) {
        self.remove(key);
    }

    fn sorted(&self) -> Vec<(K, V)> {
        let mut entries: Vec<_> = self.iter().map(|(k, v)| (*k, *v)).collect();
        entries.sort_unstable_by_key(|(key, _)| *key);
        entries
    }
}

impl<C, A> MapBackend for InMemory<C, A>
where
    C: EntryTable<CgroupId, CgroupInfo>,
    A: EntryTable<PodAddr, u32>,
{
    fn apply(&mut self, batch: &MapBatch) -> Result<(), ProgramError> {
        for id in &batch.cgroup_deletes {
            self.cgroups.drop_key(id);
        }
        for (id, info) in &batch.cgroup_upserts {
            self.cgroups.put(*id, *info);
        }
        for addr in &batch.addr_deletes {
            self.addrs.drop_key(addr);
        }
        for (addr, flags) in &batch.addr_upserts {
            self.addrs.put(*addr, *flags);
        }
        if let Some(settings) = batch.settings_after(&self.settings) {
            self.settings = settings;
        }
        self.batches += 1;
        Ok(())
    }

    fn cgroup_entries(&self) -> Result<Vec<(CgroupId, CgroupInfo)>, ProgramError> {
        Ok(self.cgroups.sorted())
    }

    fn addr_entries(&self) -> Result<Vec<(PodAddr, u32)>, ProgramError> {
        Ok(self.addrs.sorted())
    }

    fn settings(&self) -> Result<Settings, ProgramError> {
        Ok(self.settings)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn info(flags: u32) -> CgroupInfo {
        CgroupInfo {
            flags,
            ..CgroupInfo::default()
        }
    }

    fn addr(text: &str) -> PodAddr {
        PodAddr::from(text.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn holds_and_lists_what_the_sorted_backend_holds_and_lists() {
        let settings = Settings {
            flags: 3,
            ..Settings::default()
        };
        let batches = [
            MapBatch {
                cgroup_upserts: vec![(CgroupId(9), info(1)), (CgroupId(2), info(2))],
                addr_upserts: vec![(addr("10.0.0.2"), 1), (addr("fd00::1"), 1)],
                ..MapBatch::default()
            },
            MapBatch {
                cgroup_deletes: vec![CgroupId(9), CgroupId(5)],
                cgroup_upserts: vec![(CgroupId(2), info(4)), (CgroupId(7), info(1))],
                addr_deletes: vec![addr("10.0.0.2")],
                addr_upserts: vec![(addr("10.0.0.1"), 1)],
                settings: Some(settings),
            },
            MapBatch {
                addr_upserts: vec![(addr("10.0.0.3"), 1)],
                ..MapBatch::default()
            },
        ];
        let mut sorted = MemoryBackend::default();
        let mut hashed = HashedMemoryBackend::default();
        for batch in &batches {
            sorted.apply(batch).unwrap();
            hashed.apply(batch).unwrap();
            assert_eq!(
                hashed.cgroup_entries().unwrap(),
                sorted.cgroup_entries().unwrap()
            );
            assert_eq!(
                hashed.addr_entries().unwrap(),
                sorted.addr_entries().unwrap()
            );
            assert_eq!(hashed.settings().unwrap(), sorted.settings().unwrap());
            assert_eq!(hashed.batches, sorted.batches);
        }
        assert_eq!(
            hashed.cgroup_entries().unwrap(),
            vec![(CgroupId(2), info(4)), (CgroupId(7), info(1))]
        );
        assert_eq!(hashed.addr_entries().unwrap().len(), 3);
        assert_eq!(hashed.settings.flags, 3);
        // Moved by the two batches that changed cgroups or settings, not by the third.
        assert_eq!(hashed.settings.generation, 2);
    }
}
