//! An in-memory [`MapBackend`] whose maps are hash maps: for replay, which writes them hundreds
//! of thousands of times and reads them only by key at the end. [`crate::MemoryBackend`] keeps
//! them sorted, for tests and dumps that list them.

use rustc_hash::FxHashMap;

use crate::backend::{MapBackend, MapBatch};
use crate::layout::{CgroupInfo, PodAddr, Settings};
use crate::ProgramError;
use watcher::CgroupId;

/// The maps, in memory, hashed. Listed ([`MapBackend::cgroup_entries`],
/// [`MapBackend::addr_entries`]) sorted by key, as [`crate::MemoryBackend`] lists them, so that
/// a programmer over either does the same.
#[derive(Debug, Default, Clone)]
pub struct HashedMemoryBackend {
    pub cgroups: FxHashMap<CgroupId, CgroupInfo>,
    pub addrs: FxHashMap<PodAddr, u32>,
    pub settings: Settings,
    /// How many batches were applied (replay's statistics).
    pub batches: u64,
}

impl MapBackend for HashedMemoryBackend {
    fn apply(&mut self, batch: &MapBatch) -> Result<(), ProgramError> {
        for id in &batch.cgroup_deletes {
            self.cgroups.remove(id);
        }
        for (id, info) in &batch.cgroup_upserts {
            self.cgroups.insert(*id, *info);
        }
        for addr in &batch.addr_deletes {
            self.addrs.remove(addr);
        }
        for (addr, flags) in &batch.addr_upserts {
            self.addrs.insert(*addr, *flags);
        }
        if let Some(settings) = batch.settings_after(&self.settings) {
            self.settings = settings;
        }
        self.batches += 1;
        Ok(())
    }

    fn cgroup_entries(&self) -> Result<Vec<(CgroupId, CgroupInfo)>, ProgramError> {
        let mut entries: Vec<_> = self.cgroups.iter().map(|(k, v)| (*k, *v)).collect();
        entries.sort_unstable_by_key(|(id, _)| *id);
        Ok(entries)
    }

    fn addr_entries(&self) -> Result<Vec<(PodAddr, u32)>, ProgramError> {
        let mut entries: Vec<_> = self.addrs.iter().map(|(k, v)| (*k, *v)).collect();
        entries.sort_unstable_by_key(|(addr, _)| *addr);
        Ok(entries)
    }

    fn settings(&self) -> Result<Settings, ProgramError> {
        Ok(self.settings)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::MemoryBackend;

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
        let mut settings = Settings::default();
        settings.flags = 3;
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
