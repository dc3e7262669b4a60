//! A device's pending page request groups: delivered to the VMM, not yet answered.
//!
//! Lookup by cookie is by position in a window: cookies are issued in order (the core's
//! counter is monotonic), so the pending groups of a device mostly sit in a short run of
//! consecutive cookies, kept in a `VecDeque` where the oldest are answered at the front and new
//! ones pushed at the back. Both ends stay in cache whatever the number pending, where a hash
//! map of 100,000 groups misses on nearly every lookup (`docs/PERFORMANCE.md`). A cookie that
//! does not extend the window (after the counter wraps, or a straggler the window dropped
//! because it was mostly holes) lives in a hash map beside it; the window is kept at most
//! about twice as long as the groups in it, so memory stays O(pending). Timeouts need no heap: every group of a device gets the
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
    /// The cookie of `window[0]`.
    base: u32,
    /// Slot `i` holds the group of cookie `base + i` (wrapping), if it is pending. Never starts
    /// or ends with a hole.
    window: VecDeque<Option<PendingGroup>>,
    /// Groups in `window`.
    in_window: usize,
    /// Pending groups whose cookies are not in the window.
    overflow: HashMap<u32, PendingGroup, FixedHasher>,
    timers: VecDeque<(Nanos, u32)>,
}

/// Slack of the window beyond twice the groups it holds, so a few holes cost no moves.
const WINDOW_SLACK: usize = 64;

impl PendingTable {
    pub(crate) fn len(&self) -> usize {
        self.in_window + self.overflow.len()
    }

    pub(crate) fn contains(&self, cookie: u32) -> bool {
        self.lookup(cookie).is_some()
    }

    pub(crate) fn get(&self, cookie: Cookie) -> Option<&PendingGroup> {
        self.lookup(cookie.get())
    }

    /// The slot of `cookie` in the window, if the window covers it.
    fn slot(&self, cookie: u32) -> Option<usize> {
        let offset = cookie.wrapping_sub(self.base) as usize;
        (offset < self.window.len()).then_some(offset)
    }

    fn lookup(&self, cookie: u32) -> Option<&PendingGroup> {
        // A cookie inside the window's range can still live beside it (it was inserted before
        // the window grew over it), so a hole falls back to the map.
        match self.slot(cookie).and_then(|i| self.window[i].as_ref()) {
            Some(group) => Some(group),
            None => self.overflow.get(&cookie),
        }
    }

    /// Removes the group of `cookie`, keeping the window free of holes at its ends.
    fn take(&mut self, cookie: u32) -> Option<PendingGroup> {
        let Some(i) = self.slot(cookie).filter(|&i| self.window[i].is_some()) else {
            return self.overflow.remove(&cookie);
        };
        let group = self.window[i].take()?;
        self.in_window -= 1;
        while self.window.front().is_some_and(Option::is_none) {
            self.window.pop_front();
            self.base = self.base.wrapping_add(1);
        }
        while self.window.back().is_some_and(Option::is_none) {
            self.window.pop_back();
        }
        Some(group)
    }

    pub(crate) fn insert(&mut self, group: PendingGroup) {
        let cookie = group.cookie.get();
        if let Some(deadline) = group.deadline {
            self.timers.push_back((deadline, cookie));
        }
        if self.window.is_empty() {
            self.base = cookie;
        }
        // The next cookie after the window's last (or up to a few holes past it) extends the
        // window; anything else goes beside it.
        let gap = cookie.wrapping_sub(self.base) as usize;
        let extends = gap >= self.window.len() && gap - self.window.len() <= WINDOW_SLACK;
        if !extends || self.overflow.contains_key(&cookie) {
            self.overflow.insert(cookie, group);
            return;
        }
        self.window.resize(gap, None);
        self.window.push_back(Some(group));
        self.in_window += 1;
        // A window mostly of holes (an old group never answered, say): move its oldest groups
        // beside it until it is dense again, so its length stays O(pending).
        while self.window.len() > 2 * self.in_window + WINDOW_SLACK {
            if let Some(Some(g)) = self.window.pop_front() {
                self.in_window -= 1;
                self.overflow.insert(g.cookie.get(), g);
            }
            self.base = self.base.wrapping_add(1);
            while self.window.front().is_some_and(Option::is_none) {
                self.window.pop_front();
                self.base = self.base.wrapping_add(1);
            }
        }
    }

    pub(crate) fn remove(&mut self, cookie: Cookie) -> Option<PendingGroup> {
        let group = self.take(cookie.get());
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
        if self.timers.len() > 2 * self.len() + 64 {
            let mut timers = std::mem::take(&mut self.timers);
            timers.retain(|&(deadline, c)| {
                self.lookup(c).is_some_and(|g| g.deadline == Some(deadline))
            });
            self.timers = timers;
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
                .lookup(cookie)
                .is_some_and(|g| g.deadline == Some(deadline));
            if live {
                return self.take(cookie);
            }
        }
        None
    }

    /// The earliest deadline that may still fire.
    pub(crate) fn next_deadline(&mut self) -> Option<Nanos> {
        while let Some(&(deadline, cookie)) = self.timers.front() {
            if self
                .lookup(cookie)
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
        self.in_window = 0;
        let mut all: Vec<_> = self.window.drain(..).flatten().collect();
        all.extend(self.overflow.drain().map(|(_, g)| g));
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
    fn groups_issued_in_cookie_order_stay_in_the_window() {
        // The common case (one cookie after another, a few skipped) takes the window's O(1)
        // path, not the map's.
        let mut t = PendingTable::default();
        for c in (1..=200u32).chain(210..=300) {
            t.insert(group(c, None));
        }
        assert_eq!(t.len(), 291);
        assert!(
            t.overflow.is_empty(),
            "{} groups in the map",
            t.overflow.len()
        );
        assert_eq!(t.window.len(), 300);
    }

    #[test]
    fn a_window_at_most_half_holes_is_kept() {
        // 200 groups, every other one answered: 100 pending in a window of 200, under twice
        // the groups plus the slack, so every group stays on the window's path.
        let mut t = PendingTable::default();
        for c in 1..=200u32 {
            t.insert(group(c, None));
        }
        for c in (2..=200u32).step_by(2) {
            assert!(t.remove(Cookie::new(c).unwrap()).is_some());
        }
        t.insert(group(201, None));
        assert_eq!(t.len(), 101);
        assert!(
            t.overflow.is_empty(),
            "{} groups in the map",
            t.overflow.len()
        );
    }

    #[test]
    fn window_stays_proportional_to_pending_groups() {
        // 100 groups, the 98 in the middle answered, one more issued: the window, mostly
        // holes, is trimmed to at most twice the groups plus its slack; the oldest group moves
        // to the map and is still found.
        let mut t = PendingTable::default();
        for c in 1..=100u32 {
            t.insert(group(c, None));
        }
        for c in 2..=99u32 {
            assert!(t.remove(Cookie::new(c).unwrap()).is_some());
        }
        t.insert(group(101, None));
        assert_eq!(t.len(), 3);
        assert!(
            t.window.len() <= 2 * t.len() + WINDOW_SLACK,
            "window of {}",
            t.window.len()
        );
        for c in [1, 100, 101] {
            assert!(t.contains(c), "cookie {c}");
        }
    }

    #[test]
    fn answering_a_group_leaves_the_timer_of_another_with_the_same_deadline() {
        let mut t = PendingTable::default();
        t.insert(group(1, Some(10)));
        t.insert(group(2, Some(10)));
        assert!(t.remove(Cookie::new(2).unwrap()).is_some());
        assert_eq!(t.next_deadline(), Some(10));
        assert_eq!(t.pop_expired(10).map(|g| g.cookie.get()), Some(1));
    }

    #[test]
    fn timer_queue_stays_proportional_behind_a_group_that_never_answers() {
        // Group 1 is never answered, so its timer stays at the front and no other answer
        // finds its own timer there: the queue is compacted instead, and stays within twice
        // the pending groups plus 64.
        let mut t = PendingTable::default();
        t.insert(group(1, Some(u64::MAX)));
        for c in 2..=10_000u32 {
            t.insert(group(c, Some(u64::from(c))));
            t.remove(Cookie::new(c).unwrap());
            assert!(
                t.timer_entries() <= 2 * t.len() + 64,
                "{} timers for {} groups",
                t.timer_entries(),
                t.len()
            );
        }
        assert_eq!(t.next_deadline(), Some(u64::MAX));
    }

    #[test]
    fn timer_queue_shrinks_with_the_pending_groups_behind_one_that_never_answers() {
        // 999 groups answered one by one behind group 1: the bound falls by two at each
        // answer, and the queue follows it down.
        let mut t = PendingTable::default();
        t.insert(group(1, Some(u64::MAX)));
        for c in 2..=1000u32 {
            t.insert(group(c, Some(u64::from(c))));
        }
        for c in 2..=1000u32 {
            t.remove(Cookie::new(c).unwrap());
            assert!(
                t.timer_entries() <= 2 * t.len() + 64,
                "{} timers for {} groups",
                t.timer_entries(),
                t.len()
            );
        }
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

    /// The table against a map: any sequence of inserts (mostly the next cookie, sometimes a
    /// jump ahead, back, or across the wrap), removes (of pending and of unknown cookies) and
    /// expiries gives the same groups, and the window stays O(pending).
    #[test]
    fn behaves_as_a_map_whatever_the_cookie_order() {
        use proptest::prelude::*;
        use std::collections::BTreeMap;
        #[derive(Debug, Clone)]
        enum Op {
            Insert(u32),
            Remove(u32),
            Expire(u64),
        }
        let op = prop_oneof![
            6 => (0..5u32).prop_map(Op::Insert),
            1 => any::<u32>().prop_map(Op::Insert),
            5 => (0..400u32).prop_map(Op::Remove),
            1 => (0..2000u64).prop_map(Op::Expire),
        ];
        proptest!(ProptestConfig::with_cases(512), |(ops in proptest::collection::vec(op, 1..400))| {
            let mut t = PendingTable::default();
            let mut model: BTreeMap<u32, PendingGroup> = BTreeMap::new();
            let mut next = u32::MAX - 100; // crosses the wrap early
            let mut seq = 0u64;
            let mut issued: Vec<u32> = Vec::new();
            #[derive(Clone, Copy)]
            enum Kind { Insert, Other }
            for op in ops {
                let op_kind = if matches!(op, Op::Insert(_)) { Kind::Insert } else { Kind::Other };
                match op {
                    Op::Insert(jump) => {
                        // Jump 0: the next cookie; 1: skip a few; 2: far ahead; 3 and 4:
                        // behind (into the window's holes, or before it); anything else: that
                        // value (the counter after a wrap, say).
                        let c = match jump {
                            0 => next,
                            1 => next.wrapping_add(3),
                            2 => next.wrapping_add(200),
                            3 => next.wrapping_sub(5),
                            4 => next.wrapping_sub(300),
                            v => v,
                        };
                        let c = if c == 0 { 1 } else { c };
                        if model.contains_key(&c) { continue; }
                        next = c.wrapping_add(1);
                        seq += 1;
                        let g = PendingGroup { seq, deadline: Some(seq), ..group(c, None) };
                        t.insert(g);
                        model.insert(c, g);
                        issued.push(c);
                    }
                    Op::Remove(i) => {
                        let c = issued.get(i as usize % issued.len().max(1)).copied().unwrap_or(1);
                        let c = if i % 7 == 0 { c.wrapping_add(1).max(1) } else { c };
                        prop_assert_eq!(t.remove(Cookie::new(c).unwrap()), model.remove(&c));
                    }
                    Op::Expire(now) => {
                        while let Some(g) = t.pop_expired(now) {
                            prop_assert_eq!(model.remove(&g.cookie.get()), Some(g));
                        }
                        prop_assert!(model.values().all(|g| g.deadline.unwrap() > now));
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                for (&c, g) in &model {
                    prop_assert_eq!(t.get(Cookie::new(c).unwrap()), Some(g));
                    prop_assert!(t.contains(c));
                }
                // Inserts keep the window dense (removes only shrink it, or leave holes for the
                // next insert to clear).
                if matches!(op_kind, Kind::Insert) {
                    prop_assert!(t.window.len() <= 2 * t.in_window + WINDOW_SLACK + 1);
                }
            }
            let all = t.take_all();
            let mut want: Vec<PendingGroup> = model.into_values().collect();
            want.sort_unstable_by_key(|g| g.seq);
            prop_assert_eq!(all, want);
            prop_assert_eq!(t.len(), 0);
        });
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
