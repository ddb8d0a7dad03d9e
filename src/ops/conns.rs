//! Which connections the ops endpoint holds, and which one it closes when a new one does not
//! fit.
//!
//! The endpoint exists for the kubelet's probes: a probe must get an answer however many
//! other clients are connected. Refusing the newest connection at a cap (what the endpoint
//! once did) lets whoever connected first keep every slot, and clients that never finish a
//! request connected first. So no connection is refused here: when the table is full, the
//! newest connection is kept and the oldest one that has not sent a complete request head yet
//! is closed. A probe sends its head as soon as it connects and is answered at once, so it is
//! never the oldest unfinished connection for long; a client that trickles its head, or sends
//! nothing, is. Every connection also has a whole-request deadline (in `http`), so even
//! without newcomers a slow client lets go of its slot.
//!
//! Connections with a complete head being answered are counted apart, under a smaller cap:
//! answering costs a response in memory, and a complete request is answered at once unless the
//! client does not read its answer. When that cap is reached the oldest connection being
//! answered is closed for the new one, so clients that do not read cannot hold it either.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A warning that may repeat once per client (one per closed connection) is logged at most
/// once per period, with how many were suppressed since the previous line: a flood must not
/// flood the log too.
pub(super) struct WarnLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    pub(super) fn new(every: Duration) -> WarnLimiter {
        WarnLimiter {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// One more occurrence at `now`: `Some(n)` when it is to be logged (`n` occurrences were
    /// suppressed since the previous line), `None` when it is suppressed.
    pub(super) fn hit(&mut self, now: Instant) -> Option<u64> {
        let due = match self.last {
            None => true,
            Some(last) => now.saturating_duration_since(last) >= self.every,
        };
        if due {
            self.last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// One open connection. Dropping `_close` (removing the entry) tells its task to close it.
struct Entry {
    answering: bool,
    _close: oneshot::Sender<()>,
}

struct Table {
    /// Ids grow with each accepted connection: the first entry is the oldest.
    next_id: u64,
    entries: BTreeMap<u64, Entry>,
    answering: usize,
    closed_for_room: WarnLimiter,
}

impl Table {
    /// Removes `id` (its task sees its close signal); `false` when it was gone already.
    fn remove(&mut self, id: u64) -> bool {
        match self.entries.remove(&id) {
            Some(entry) => {
                if entry.answering {
                    self.answering -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// The oldest connection for which `pick` holds.
    fn oldest(&self, pick: impl Fn(u64, &Entry) -> bool) -> Option<u64> {
        self.entries
            .iter()
            .find(|(id, entry)| pick(**id, entry))
            .map(|(id, _)| *id)
    }

    /// Closes `victim` to make room, and says so (rate-limited).
    fn close_for_room(&mut self, victim: u64, why: &str) {
        self.remove(victim);
        if let Some(suppressed) = self.closed_for_room.hit(Instant::now()) {
            log::warn!(
                "ops endpoint: {why}; closed the oldest to make room \
                 ({suppressed} more closed for room since the previous warning)"
            );
        }
    }
}

/// The open connections of one endpoint, shared by the accepting loop and the connections'
/// tasks.
pub(super) struct Conns {
    max_open: usize,
    max_answering: usize,
    table: Mutex<Table>,
}

impl Conns {
    pub(super) fn new(max_open: usize, max_answering: usize, warn_every: Duration) -> Conns {
        Conns {
            max_open,
            max_answering,
            table: Mutex::new(Table {
                next_id: 0,
                entries: BTreeMap::new(),
                answering: 0,
                closed_for_room: WarnLimiter::new(warn_every),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent whatever panicked while it was held (every change is
        // one step), so a poisoned lock is used as it is.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a new connection, closing the oldest one still reading its request head
    /// (or, when every one is being answered, the oldest) if the table is full. The receiver
    /// resolves when the connection is to be closed.
    pub(super) fn open(self: &Arc<Self>) -> (Slot, oneshot::Receiver<()>) {
        let mut table = self.lock();
        if table.entries.len() >= self.max_open {
            let victim = table
                .oldest(|_, entry| !entry.answering)
                .or_else(|| table.oldest(|_, _| true));
            if let Some(victim) = victim {
                let why = format!("{} connections open", self.max_open);
                table.close_for_room(victim, &why);
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let (close, closed) = oneshot::channel();
        table.entries.insert(
            id,
            Entry {
                answering: false,
                _close: close,
            },
        );
        let slot = Slot {
            id,
            conns: Arc::clone(self),
        };
        (slot, closed)
    }

    /// How many connections are open and how many of them are being answered.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let table = self.lock();
        (table.entries.len(), table.answering)
    }

    #[cfg(test)]
    fn is_open(&self, id: u64) -> bool {
        self.lock().entries.contains_key(&id)
    }
}

/// A connection's place in the table; dropping it (the connection is done) frees it.
pub(super) struct Slot {
    id: u64,
    conns: Arc<Conns>,
}

impl Slot {
    /// The connection's request head is complete: it is answered now, under the answering
    /// cap (closing the oldest connection being answered when the cap is reached).
    pub(super) fn answering(&self) {
        let mut table = self.conns.lock();
        let Some(entry) = table.entries.get(&self.id) else {
            return; // closed for room already: its task ends at its next poll
        };
        if entry.answering {
            return;
        }
        if table.answering >= self.conns.max_answering {
            let victim = table.oldest(|id, entry| entry.answering && id != self.id);
            if let Some(victim) = victim {
                let why = format!("{} connections being answered", self.conns.max_answering);
                table.close_for_room(victim, &why);
            }
        }
        if let Some(entry) = table.entries.get_mut(&self.id) {
            entry.answering = true;
            table.answering += 1;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns(max_open: usize, max_answering: usize) -> Arc<Conns> {
        Arc::new(Conns::new(max_open, max_answering, Duration::from_secs(10)))
    }

    #[test]
    fn a_full_table_closes_the_oldest_unfinished_connection_not_the_newest() {
        let conns = conns(3, 2);
        let (first, mut first_closed) = conns.open();
        let (second, mut second_closed) = conns.open();
        let (third, _third_closed) = conns.open();
        // The first has a complete head: it is being answered, not closed for room.
        first.answering();
        let (fourth, _fourth_closed) = conns.open();
        assert!(first_closed.try_recv().is_err(), "first still open");
        assert!(second_closed
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
        assert!(!conns.is_open(second.id));
        assert!(conns.is_open(third.id) && conns.is_open(fourth.id));
        assert_eq!(conns.counts(), (3, 1));
        // Dropping a closed connection's slot changes nothing more.
        drop(second);
        assert_eq!(conns.counts(), (3, 1));
        drop(first);
        assert_eq!(conns.counts(), (2, 0));
    }

    #[test]
    fn when_every_connection_is_answered_the_oldest_is_closed() {
        let conns = conns(2, 2);
        let (first, _a) = conns.open();
        let (second, _b) = conns.open();
        first.answering();
        second.answering();
        let (third, _c) = conns.open();
        assert!(!conns.is_open(first.id));
        assert!(conns.is_open(second.id) && conns.is_open(third.id));
        assert_eq!(conns.counts(), (2, 1));
    }

    #[test]
    fn the_answering_cap_closes_the_oldest_answered_connection() {
        let conns = conns(10, 2);
        let slots: Vec<_> = (0..4).map(|_| conns.open()).collect();
        slots[0].0.answering();
        slots[1].0.answering();
        slots[2].0.answering();
        assert!(!conns.is_open(slots[0].0.id));
        assert!(conns.is_open(slots[1].0.id) && conns.is_open(slots[2].0.id));
        // Counted once however often hyper calls it.
        slots[2].0.answering();
        assert_eq!(conns.counts(), (3, 2));
    }

    #[test]
    fn a_repeated_warning_is_logged_once_per_period_with_the_count_suppressed() {
        let mut limiter = WarnLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(limiter.hit(start), Some(0));
        let mut logged = Vec::new();
        for ms in (100..25_000).step_by(100) {
            if let Some(n) = limiter.hit(start + Duration::from_millis(ms)) {
                logged.push((ms, n));
            }
        }
        assert_eq!(logged, vec![(10_000, 99), (20_000, 99)]);
    }
}
