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
    /// The new `settings` value, when it changed. Its `generation` is not used: the backend
    /// counts it (see [`MapBatch::settings_after`]).
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

    /// The `settings` value a backend writes after this batch's other operations, given the
    /// value the map holds (`current`): the batch's new settings, or the current ones, with
    /// the next `generation`; `None` when neither `settings` nor `cgroup_info_map` changes.
    ///
    /// The programs cache a thread's cgroup entry under the generation they read before the
    /// walk (`struct connect_record` in bpf/zbridge.h), so the generation moves after every
    /// change of `cgroup_info_map`, and only forward: it is counted here from the map's own
    /// value, never from a copy a caller kept.
    pub fn settings_after(&self, current: &Settings) -> Option<Settings> {
        let cgroups_change = !self.cgroup_upserts.is_empty() || !self.cgroup_deletes.is_empty();
        if self.settings.is_none() && !cgroups_change {
            return None;
        }
        let mut next = self.settings.unwrap_or(*current);
        next.generation = current.generation.wrapping_add(1);
        Some(next)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The generation moves with every change of `cgroup_info_map` or of the settings, counted
    /// from the map's value (not the batch's), and not at all for a batch that touches
    /// neither (the programs' cached entries stay good).
    #[test]
    fn generation_moves_with_cgroup_or_settings_changes_only() {
        let current = Settings {
            generation: 41,
            outbound_port: 15001,
            ..Settings::default()
        };
        let addr_only = MapBatch {
            addr_deletes: vec![PodAddr::default()],
            ..MapBatch::default()
        };
        assert_eq!(addr_only.settings_after(&current), None);

        let upsert = MapBatch {
            cgroup_upserts: vec![(CgroupId(7), CgroupInfo::default())],
            ..MapBatch::default()
        };
        let next = upsert.settings_after(&current).unwrap();
        assert_eq!((next.generation, next.outbound_port), (42, 15001));

        let delete = MapBatch {
            cgroup_deletes: vec![CgroupId(7)],
            ..MapBatch::default()
        };
        assert_eq!(delete.settings_after(&current).unwrap().generation, 42);

        // New settings are written whole, with the generation counted from the map's.
        let new_settings = MapBatch {
            settings: Some(Settings {
                generation: 3,
                flags: 1,
                ..Settings::default()
            }),
            ..MapBatch::default()
        };
        let next = new_settings.settings_after(&current).unwrap();
        assert_eq!(
            (next.generation, next.flags, next.outbound_port),
            (42, 1, 0)
        );

        let wrapping = Settings {
            generation: u32::MAX,
            ..Settings::default()
        };
        assert_eq!(upsert.settings_after(&wrapping).unwrap().generation, 0);
    }
}
