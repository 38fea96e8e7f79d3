//! The server's deadlines, one per object: an ordered set of `(deadline, key)` and the
//! deadline queued for each key, so that a key is never queued twice however its deadline
//! moves, and a cancelled key leaves nothing behind.
//!
//! Deadlines that move later (every refresh of an allocation, permission or channel) cost
//! nothing here: the entry already queued comes due first and the server schedules it again
//! at the object's current deadline ([`Timers::schedule`] is lazy upwards). A deadline that
//! moves earlier (a Refresh lowering the lifetime) replaces the queued entry.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Instant;

/// Deadlines keyed by `K`, at most one per key.
#[derive(Debug)]
pub(crate) struct Timers<K> {
    /// Every queued deadline, earliest first.
    queue: BTreeSet<(Instant, K)>,
    /// The deadline queued for each key: the same entries, by key.
    queued: HashMap<K, Instant>,
}

impl<K: Copy + Eq + Hash + Ord> Timers<K> {
    pub(crate) fn new() -> Self {
        Self {
            queue: BTreeSet::new(),
            queued: HashMap::new(),
        }
    }

    /// Makes `key` come due no later than `deadline`. A key queued at or before `deadline`
    /// keeps its entry: when it comes due the caller finds the later deadline and schedules
    /// again.
    pub(crate) fn schedule(&mut self, key: K, deadline: Instant) {
        match self.queued.entry(key) {
            Entry::Occupied(queued) if *queued.get() <= deadline => {}
            Entry::Occupied(mut queued) => {
                let earlier = queued.insert(deadline);
                self.queue.remove(&(earlier, key));
                self.queue.insert((deadline, key));
            }
            Entry::Vacant(vacant) => {
                vacant.insert(deadline);
                self.queue.insert((deadline, key));
            }
        }
    }

    /// Forgets `key`'s deadline: its object is gone.
    pub(crate) fn cancel(&mut self, key: K) {
        if let Some(deadline) = self.queued.remove(&key) {
            self.queue.remove(&(deadline, key));
        }
    }

    /// The earliest entry.
    pub(crate) fn peek(&self) -> Option<(Instant, K)> {
        self.queue.first().copied()
    }

    /// Removes and returns the earliest entry.
    pub(crate) fn pop(&mut self) -> Option<(Instant, K)> {
        let (deadline, key) = self.queue.pop_first()?;
        self.queued.remove(&key);
        Some((deadline, key))
    }

    /// Entries queued: one per key.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.queued.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn later_deadlines_keep_the_entry_and_earlier_ones_replace_it() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut timers = Timers::new();
        timers.schedule(1u32, t0 + s(600));
        timers.schedule(1, t0 + s(900));
        assert_eq!(timers.peek(), Some((t0 + s(600), 1)));
        timers.schedule(1, t0 + s(60));
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.pop(), Some((t0 + s(60), 1)));
        assert_eq!(timers.pop(), None);
        assert_eq!(timers.queued.len(), 0);
    }

    #[test]
    fn cancelled_keys_leave_nothing_and_may_come_back() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut timers = Timers::new();
        timers.schedule(1u32, t0 + s(10));
        timers.schedule(2, t0 + s(20));
        timers.cancel(1);
        timers.cancel(3);
        assert_eq!(timers.len(), 1);
        timers.schedule(1, t0 + s(30));
        assert_eq!(timers.pop(), Some((t0 + s(20), 2)));
        assert_eq!(timers.pop(), Some((t0 + s(30), 1)));
        assert_eq!(timers.pop(), None);
    }

    #[test]
    fn one_entry_per_key_whatever_the_deadlines() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        for round in 0..10_000u64 {
            for key in 0..10u64 {
                // Later (kept), then ever earlier (replaced).
                let secs = if round % 2 == 0 {
                    2_000_000
                } else {
                    1_000_000 - round
                };
                timers.schedule(key, t0 + Duration::from_secs(secs + key));
            }
            assert_eq!(timers.len(), 10);
            assert_eq!(timers.queued.len(), 10);
        }
    }
}
