//! The event queue.
//!
//! A min-heap of events keyed by `(time, sequence number)`. The sequence number is a counter
//! stamped on every push, so two events due at the same instant leave the queue in the order
//! they were scheduled: the order is total and depends only on the order of pushes, never on
//! the events' contents or on memory addresses. That, a seeded RNG and ordered maps are what
//! make a run reproducible.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::time::SimTime;

/// Events ordered by due time, ties broken by scheduling order.
#[derive(Debug)]
pub struct EventQueue<E> {
    heap: BinaryHeap<Entry<E>>,
    next_seq: u64,
}

#[derive(Debug)]
struct Entry<E> {
    at: SimTime,
    seq: u64,
    event: E,
}

impl<E> Entry<E> {
    fn key(&self) -> (SimTime, u64) {
        (self.at, self.seq)
    }
}

// `BinaryHeap` is a max-heap: order entries by reversed key so the earliest pops first. The key
// is unique (the sequence number never repeats), so this is a total order and equality means
// the same entry.
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl<E> Eq for Entry<E> {}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            next_seq: 0,
        }
    }
}

impl<E> EventQueue<E> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `event` at `at`, after every event already scheduled at the same instant.
    pub fn push(&mut self, at: SimTime, event: E) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Entry { at, seq, event });
    }

    /// Removes and returns the earliest event (the first scheduled among equals).
    pub fn pop(&mut self) -> Option<(SimTime, E)> {
        self.heap.pop().map(|e| (e.at, e.event))
    }

    /// When the next event is due.
    pub fn peek_time(&self) -> Option<SimTime> {
        self.heap.peek().map(|e| e.at)
    }

    /// How many events are waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no event is waiting.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// How many events have ever been pushed.
    pub fn pushed(&self) -> u64 {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_ties_in_scheduling_order() {
        let mut q = EventQueue::new();
        q.push(SimTime::from_micros(20), "c");
        q.push(SimTime::from_micros(10), "a");
        q.push(SimTime::from_micros(20), "d");
        q.push(SimTime::from_micros(10), "b");
        q.push(SimTime::from_micros(5), "first");
        q.push(SimTime::from_micros(20), "e");
        assert_eq!(q.len(), 6);
        assert_eq!(q.peek_time(), Some(SimTime::from_micros(5)));
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).map(|(_, e)| e).collect();
        assert_eq!(order, ["first", "a", "b", "c", "d", "e"]);
        assert!(q.is_empty());
        assert_eq!(q.pushed(), 6);
    }

    #[test]
    fn many_ties_keep_insertion_order() {
        // A heap alone does not keep equal keys in order; the sequence number must.
        let mut q = EventQueue::new();
        for i in 0..1_000u32 {
            q.push(SimTime::from_micros(u64::from(i % 3)), i);
        }
        let mut last: Option<(SimTime, u32)> = None;
        while let Some((at, i)) = q.pop() {
            if let Some((prev_at, prev_i)) = last {
                assert!(
                    at > prev_at || (at == prev_at && i > prev_i),
                    "{prev_at:?}/{prev_i} then {at:?}/{i}"
                );
            }
            last = Some((at, i));
        }
    }
}
