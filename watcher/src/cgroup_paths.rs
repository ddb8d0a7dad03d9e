//! The live source's cache of cgroup paths by id: an exec's tap record names its cgroup by id,
//! and the path is read from `/proc/PID/cgroup` only for an id not seen before.
//!
//! A cgroup id is never reused within a boot (64-bit kernfs ids) and a v2 cgroup cannot be
//! renamed, so an entry never names another directory; but an entry outlives its cgroup, and
//! a node that makes and removes cgroups all day (pods, jobs, sessions) would fill the cache
//! with the dead. So the cache is swept: when it has doubled since the last sweep, the entries
//! whose cgroup is gone are dropped. It then holds about the live cgroups that ran an exec,
//! at most twice that, and the sweeps cost a look per entry, amortised over as many misses.

use std::collections::HashMap;
use std::sync::Arc;

use crate::event::CgroupId;

/// Below this many entries the cache is not swept.
const SWEEP_FROM: usize = 1024;
/// More live cgroups than half this: the cache is emptied rather than swept at every miss.
const MAX: usize = 16 * 1024;

#[derive(Debug, Default)]
pub(crate) struct CgroupPaths {
    paths: HashMap<CgroupId, Arc<str>>,
    /// How many entries the last sweep kept.
    kept: usize,
}

impl CgroupPaths {
    pub(crate) fn get(&self, id: CgroupId) -> Option<&Arc<str>> {
        self.paths.get(&id)
    }

    /// Remembers the path of cgroup `id`, first sweeping the cache if it has doubled since
    /// the last sweep: an entry stays if `exists(id, path)`, i.e. the directory at `path` is
    /// still the cgroup `id`.
    pub(crate) fn insert(
        &mut self,
        id: CgroupId,
        path: Arc<str>,
        mut exists: impl FnMut(CgroupId, &str) -> bool,
    ) {
        if self.paths.len() >= (2 * self.kept).clamp(SWEEP_FROM, MAX) {
            self.paths.retain(|id, path| exists(*id, path));
            if 2 * self.paths.len() > MAX {
                self.paths.clear();
            }
            // The table keeps the size it grew to otherwise.
            self.paths.shrink_to_fit();
            self.kept = self.paths.len();
        }
        self.paths.insert(id, path);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.paths.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_made_and_removed_do_not_pile_up() {
        // Churn: a new cgroup each time (a new id at one of 100 paths), 50 of them live.
        let mut cache = CgroupPaths::default();
        let live = 50;
        let mut largest = 0;
        for n in 0..100_000u64 {
            let path = format!("/churn/s{}", n % 100);
            cache.insert(CgroupId(n), path.into(), |id, _| id.0 + live > n);
            largest = largest.max(cache.len());
        }
        assert!(largest <= SWEEP_FROM, "{largest} entries held");
        for n in 100_000 - live..100_000 {
            assert!(cache.get(CgroupId(n)).is_some(), "live cgroup {n} kept");
        }
    }

    #[test]
    fn live_cgroups_are_kept_and_a_large_node_bounded() {
        let mut cache = CgroupPaths::default();
        // 3,000 live cgroups: all stay cached across sweeps.
        for n in 0..3_000u64 {
            cache.insert(CgroupId(n), format!("/k/{n}").into(), |_, _| true);
        }
        assert!((0..3_000).all(|n| cache.get(CgroupId(n)).is_some()));
        // More live cgroups than the cache takes: it never holds more than its bound.
        let mut largest = 0;
        for n in 3_000..100_000u64 {
            cache.insert(CgroupId(n), format!("/k/{n}").into(), |_, _| true);
            largest = largest.max(cache.len());
        }
        assert!(largest <= MAX, "{largest} entries held");
    }
}
