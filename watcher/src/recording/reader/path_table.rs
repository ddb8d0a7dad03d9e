//! The cgroup paths a recording names, each kept once: most exec records name a cgroup that an
//! earlier record named, and the reader hands out the path it already holds for that cgroup
//! (a reference count) instead of a new copy of it.
//!
//! Besides the allocation, this keeps a copy from being freed by another thread than the one
//! that made it: replay reads on one thread and resolves on another, and the resolver drops
//! the path of every exec into a cgroup it already knows.

use std::collections::HashMap;
use std::sync::Arc;

use crate::CgroupId;

/// Swept when it holds this many paths, or twice as many as the last sweep kept.
const SWEEP_FROM: usize = 4096;

/// Each cgroup's path, by id, as last read.
#[derive(Debug, Default)]
pub(super) struct PathTable {
    paths: HashMap<CgroupId, Arc<str>>,
    /// How many paths the last sweep kept.
    kept: usize,
}

impl PathTable {
    /// The path of cgroup `id` as read on this line: the one held for it when it is the same
    /// text (a recording may name one id by two paths: each is passed on as written).
    pub(super) fn path(&mut self, id: CgroupId, text: &str) -> Arc<str> {
        if let Some(held) = self.paths.get(&id) {
            if **held == *text {
                return Arc::clone(held);
            }
        }
        if self.paths.len() >= (2 * self.kept).max(SWEEP_FROM) {
            self.sweep();
        }
        let path: Arc<str> = Arc::from(text);
        self.paths.insert(id, Arc::clone(&path));
        path
    }

    /// Drops the paths that nobody else holds any more (the records that named them have been
    /// used and dropped), so that the table holds about what its reader's user holds.
    fn sweep(&mut self) {
        self.paths.retain(|_, path| Arc::strong_count(path) > 1);
        self.kept = self.paths.len();
        self.paths.shrink_to(2 * self.kept);
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
    fn a_path_read_again_is_the_one_held() {
        let mut table = PathTable::default();
        let first = table.path(CgroupId(7), "/a/b");
        let again = table.path(CgroupId(7), "/a/b");
        assert!(Arc::ptr_eq(&first, &again));
        // Another path for the same id is passed on as written, and held from then on.
        let other = table.path(CgroupId(7), "/a/c");
        assert_eq!(&*other, "/a/c");
        assert!(Arc::ptr_eq(&other, &table.path(CgroupId(7), "/a/c")));
        assert_eq!(&*first, "/a/b");
        // Another id with the same path is another cgroup.
        let eight = table.path(CgroupId(8), "/a/c");
        assert!(!Arc::ptr_eq(&other, &eight));
    }

    #[test]
    fn paths_nobody_holds_are_dropped_and_held_ones_kept() {
        let mut table = PathTable::default();
        let held: Vec<Arc<str>> = (0..100)
            .map(|i| table.path(CgroupId(i), &format!("/held/{i}")))
            .collect();
        for i in 100..SWEEP_FROM as u64 {
            drop(table.path(CgroupId(i), &format!("/gone/{i}")));
        }
        assert_eq!(table.len(), SWEEP_FROM);
        // The next new path sweeps: the 100 held paths stay, the others go.
        let next = table.path(CgroupId(1 << 40), "/next");
        assert_eq!(table.len(), 101);
        for (i, path) in held.iter().enumerate() {
            assert!(Arc::ptr_eq(
                path,
                &table.path(CgroupId(i as u64), &format!("/held/{i}"))
            ));
        }
        assert!(Arc::ptr_eq(&next, &table.path(CgroupId(1 << 40), "/next")));
        // Bounded by twice what a sweep kept (or SWEEP_FROM), however many cgroups pass.
        for i in 0..100_000u64 {
            drop(table.path(CgroupId(2_000_000 + i), "/churn"));
            assert!(table.len() <= SWEEP_FROM + 1);
        }
    }
}
