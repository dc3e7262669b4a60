//! A device's pending page request groups: delivered to the VMM, not yet answered.
//!
//! Lookup by cookie is a hash map. Timeouts need no heap: every group of a device gets the
//! same timeout, so deadlines are issued in order and a FIFO queue of `(deadline, cookie)` is
//! already sorted. Answered groups leave their timer entry behind; expiry skips entries whose
//! group is gone (or was re-issued with another deadline), and the queue is compacted whenever
//! stale entries outnumber live ones, so memory stays O(pending) and each operation amortised
//! O(1), whatever the number of pending groups.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use iopf_abi::{Cookie, Pasid, PrgIndex};

use crate::clock::Nanos;

/// Cookies are ours, not the peer's, so a fixed hasher opens no collision attack, and it keeps
/// iteration order reproducible for deterministic runs.
type FixedHasher = BuildHasherDefault<std::hash::DefaultHasher>;

/// A group delivered to the VMM and waiting for its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingGroup {
    pub(crate) cookie: Cookie,
    pub(crate) pasid: Option<Pasid>,
    pub(crate) grpid: PrgIndex,
    /// When it times out, if the device has a timeout.
    pub(crate) deadline: Option<Nanos>,
    /// Issue order, to answer groups in the order they came when many are answered at once.
    pub(crate) seq: u64,
}

#[derive(Debug, Default)]
pub(crate) struct PendingTable {
    groups: HashMap<u32, PendingGroup, FixedHasher>,
    timers: VecDeque<(Nanos, u32)>,
}

impl PendingTable {
    pub(crate) fn len(&self) -> usize {
        self.groups.len()
    }

    pub(crate) fn contains(&self, cookie: u32) -> bool {
        self.groups.contains_key(&cookie)
    }

    pub(crate) fn get(&self, cookie: Cookie) -> Option<&PendingGroup> {
        self.groups.get(&cookie.get())
    }

    pub(crate) fn insert(&mut self, group: PendingGroup) {
        if let Some(deadline) = group.deadline {
            self.timers.push_back((deadline, group.cookie.get()));
        }
        self.groups.insert(group.cookie.get(), group);
    }

    pub(crate) fn remove(&mut self, cookie: Cookie) -> Option<PendingGroup> {
        let group = self.groups.remove(&cookie.get());
        // Groups are mostly answered in the order they were issued: drop the answered group's
        // timer entry at once when it is the oldest, so compaction is rarely needed.
        if let Some(g) = &group
            && self
                .timers
                .front()
                .is_some_and(|&(d, c)| c == cookie.get() && Some(d) == g.deadline)
        {
            self.timers.pop_front();
        }
        if self.timers.len() > 2 * self.groups.len() + 64 {
            let groups = &self.groups;
            self.timers.retain(|&(deadline, c)| {
                groups.get(&c).is_some_and(|g| g.deadline == Some(deadline))
            });
        }
        group
    }

    /// Removes and returns the next group whose deadline is at or before `now`.
    pub(crate) fn pop_expired(&mut self, now: Nanos) -> Option<PendingGroup> {
        while let Some(&(deadline, cookie)) = self.timers.front() {
            if deadline > now {
                return None;
            }
            self.timers.pop_front();
            let live = self
                .groups
                .get(&cookie)
                .is_some_and(|g| g.deadline == Some(deadline));
            if live {
                return self.groups.remove(&cookie);
            }
        }
        None
    }

    /// The earliest deadline that may still fire.
    pub(crate) fn next_deadline(&mut self) -> Option<Nanos> {
        while let Some(&(deadline, cookie)) = self.timers.front() {
            if self
                .groups
                .get(&cookie)
                .is_some_and(|g| g.deadline == Some(deadline))
            {
                return Some(deadline);
            }
            self.timers.pop_front();
        }
        None
    }

    /// Removes every group, in the order they were issued.
    pub(crate) fn take_all(&mut self) -> Vec<PendingGroup> {
        self.timers.clear();
        let mut all: Vec<_> = self.groups.drain().map(|(_, g)| g).collect();
        all.sort_unstable_by_key(|g| g.seq);
        all
    }

    #[cfg(test)]
    pub(crate) fn timer_entries(&self) -> usize {
        self.timers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(cookie: u32, deadline: Option<Nanos>) -> PendingGroup {
        PendingGroup {
            cookie: Cookie::new(cookie).unwrap(),
            pasid: None,
            grpid: PrgIndex::new(cookie % 512).unwrap(),
            deadline,
            seq: u64::from(cookie),
        }
    }

    #[test]
    fn groups_expire_in_deadline_order_and_only_once() {
        let mut t = PendingTable::default();
        t.insert(group(1, Some(10)));
        t.insert(group(2, Some(20)));
        t.insert(group(3, Some(30)));
        assert_eq!(t.pop_expired(5), None);
        assert_eq!(t.pop_expired(20).map(|g| g.cookie.get()), Some(1));
        assert_eq!(t.pop_expired(20).map(|g| g.cookie.get()), Some(2));
        assert_eq!(t.pop_expired(20), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn answered_groups_never_expire() {
        let mut t = PendingTable::default();
        t.insert(group(1, Some(10)));
        t.insert(group(2, Some(20)));
        assert!(t.remove(Cookie::new(1).unwrap()).is_some());
        assert_eq!(t.next_deadline(), Some(20));
        assert_eq!(t.pop_expired(100).map(|g| g.cookie.get()), Some(2));
        assert_eq!(t.pop_expired(100), None);
    }

    #[test]
    fn timer_queue_stays_proportional_to_pending_groups() {
        let mut t = PendingTable::default();
        for c in 1..=100_000u32 {
            t.insert(group(c, Some(u64::from(c))));
            t.remove(Cookie::new(c).unwrap());
        }
        assert_eq!(t.len(), 0);
        assert!(t.timer_entries() <= 64 + 1, "{}", t.timer_entries());
    }

    #[test]
    fn take_all_returns_groups_in_issue_order() {
        let mut t = PendingTable::default();
        for c in [5u32, 3, 9, 1] {
            t.insert(group(c, None));
        }
        let order: Vec<u32> = t.take_all().iter().map(|g| g.cookie.get()).collect();
        assert_eq!(order, vec![1, 3, 5, 9]);
        assert_eq!(t.len(), 0);
    }
}
