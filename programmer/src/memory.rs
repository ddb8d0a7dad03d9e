//! An in-memory [`MapBackend`]: the maps as plain collections, for replay and unit tests.

use std::collections::BTreeMap;

use crate::backend::{MapBackend, MapBatch};
use crate::layout::{CgroupInfo, PodAddr, Settings};
use crate::ProgramError;
use watcher::CgroupId;

/// The maps, in memory. Sorted, so that what is printed from it is deterministic.
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    pub cgroups: BTreeMap<CgroupId, CgroupInfo>,
    pub addrs: BTreeMap<PodAddr, u32>,
    pub settings: Settings,
    /// How many batches were applied (for tests and replay statistics).
    pub batches: u64,
}

impl MapBackend for MemoryBackend {
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
        Ok(self.cgroups.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn addr_entries(&self) -> Result<Vec<(PodAddr, u32)>, ProgramError> {
        Ok(self.addrs.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn settings(&self) -> Result<Settings, ProgramError> {
        Ok(self.settings)
    }
}
