//! Where map operations land: the kernel's maps (aya) or memory (replay, unit tests).

use crate::layout::{CgroupInfo, PodAddr, Settings};
use watcher::CgroupId;

/// One batch of map operations, already coalesced: a key appears at most once per list.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MapBatch {
    pub cgroup_upserts: Vec<(CgroupId, CgroupInfo)>,
    pub cgroup_deletes: Vec<CgroupId>,
    pub addr_upserts: Vec<(PodAddr, u32)>,
    pub addr_deletes: Vec<PodAddr>,
    /// The new `settings` value, when it changed.
    pub settings: Option<Settings>,
}

impl MapBatch {
    pub fn is_empty(&self) -> bool {
        self.cgroup_upserts.is_empty()
            && self.cgroup_deletes.is_empty()
            && self.addr_upserts.is_empty()
            && self.addr_deletes.is_empty()
            && self.settings.is_none()
    }
}

/// The maps the programs read. Implementations apply a whole batch or report what failed.
pub trait MapBackend {
    /// Applies a batch of operations.
    fn apply(&mut self, batch: &MapBatch) -> Result<(), crate::ProgramError>;
    /// Every entry of `cgroup_info_map` (for reconciliation and dumps).
    fn cgroup_entries(&self) -> Result<Vec<(CgroupId, CgroupInfo)>, crate::ProgramError>;
    /// Every key of `pod_addr_map`.
    fn addr_entries(&self) -> Result<Vec<(PodAddr, u32)>, crate::ProgramError>;
    /// The current `settings` value.
    fn settings(&self) -> Result<Settings, crate::ProgramError>;
}
