//! One copy of each string that many pods share (namespace, node, label values, service
//! account), per thread: what replay's reading thread hands the resolver in a pod's facts.
//!
//! A pod's facts are made by the thread that reads the recording and dropped, when the pod
//! changes, by the thread that resolves. A string allocated on one thread and freed on the
//! other takes a lock on the first thread's heap that both then wait for; a shared copy is
//! never freed while the table holds it, and costs no allocation per record. The table is swept
//! of strings nobody else holds whenever it has doubled since the last sweep, so it stays
//! bounded by the strings in use, whatever the input.

use std::cell::RefCell;
use std::sync::Arc;

use rustc_hash::FxHashSet;

/// The table's size below which it is never swept.
const SWEEP_FROM: usize = 1024;

thread_local! {
    static STRINGS: RefCell<SharedStrings> = RefCell::new(SharedStrings::default());
}

/// This thread's copy of `text`.
pub fn shared(text: &str) -> Arc<str> {
    STRINGS.with(|strings| strings.borrow_mut().get(text))
}

#[derive(Debug, Default)]
struct SharedStrings {
    set: FxHashSet<Arc<str>>,
    /// The size at which the next sweep runs.
    sweep_at: usize,
}

impl SharedStrings {
    fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(copy) = self.set.get(text) {
            return Arc::clone(copy);
        }
        if self.set.len() >= self.sweep_at.max(SWEEP_FROM) {
            self.set.retain(|copy| Arc::strong_count(copy) > 1);
            self.sweep_at = self.set.len() * 2;
        }
        let copy: Arc<str> = Arc::from(text);
        self.set.insert(Arc::clone(&copy));
        copy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_text() {
        let a = shared("shop");
        let b = shared("shop");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*shared("other"), "other");
    }

    #[test]
    fn strings_nobody_holds_are_swept_and_held_ones_kept() {
        let mut strings = SharedStrings::default();
        let held = strings.get("held");
        for i in 0..10 * SWEEP_FROM {
            strings.get(&format!("ns{i}"));
        }
        // Bounded: each sweep leaves only what is held, and the next runs at twice that.
        assert!(strings.set.len() <= SWEEP_FROM, "{}", strings.set.len());
        assert!(Arc::ptr_eq(&held, &strings.get("held")));
    }
}
