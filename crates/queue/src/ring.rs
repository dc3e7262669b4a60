//! The single-producer single-consumer ring protocol of ABI v1 (`docs/DESIGN.md` §3.2), with
//! no I/O.
//!
//! Each side keeps its own index, and its copy of the peer's, in private memory; shared memory
//! is written with stores of those private values and read only to learn the peer's progress.
//! Every index read from the peer is checked before use, so a peer that writes garbage can make
//! the ring [`RingError`] (broken, sticky), never make this side touch a slot it does not
//! own. Slot positions are always `index & (nb_entries - 1)`, in bounds whatever the index.
//!
//! Sync points (each Release store pairs with the Acquire load of the same cell on the other
//! side):
//! - **P1** producer stores `prod` (Release) after writing the slots; the consumer's load of
//!   `prod` (Acquire) makes those slot writes visible before it reads them.
//! - **C1** consumer stores `cons` (Release) after reading the slots; the producer's load of
//!   `cons` (Acquire) orders those reads before its next writes to the same slots, so a record
//!   is never overwritten while it is read (no torn record).
//! - **W** wake-up suppression, a store-fence-load pair on each side (Dekker): the consumer
//!   stores `NEED_WAKEUP`, fences (SeqCst), re-reads `prod`; the producer stores `prod`, fences
//!   (SeqCst), reads `NEED_WAKEUP`. The two SeqCst fences are totally ordered, so at least one
//!   side sees the other's store: either the producer kicks, or the consumer finds the record
//!   and does not sleep. Without the fences both loads may read old values (store buffering),
//!   and the consumer sleeps on a record nobody will kick for (the lost wake-up `io_uring` fixed
//!   in its `need_wakeup`).

use core::marker::PhantomData;

use iopf_abi::{FLAG_NEED_WAKEUP, QueueKind};
use thiserror::Error;

use crate::entry::Entry;
use crate::memory::QueueMemory;
use crate::sync::{AtomicU32, AtomicU64, Ordering, fence};

/// The peer broke the ring protocol. The ring stops; the region is to be torn down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RingError {
    /// The consumer's index moved backwards or past the producer's.
    #[error("consumer index {found} is outside [{low}, {high}]")]
    ConsumerIndex {
        /// The index read from shared memory.
        found: u32,
        /// The consumer's last valid index.
        low: u32,
        /// The producer's published index.
        high: u32,
    },
    /// The producer's index moved backwards or more than a ring ahead of the consumer.
    #[error("producer index {found} is outside [{low}, {high}]")]
    ProducerIndex {
        /// The index read from shared memory.
        found: u32,
        /// The producer's last valid index.
        low: u32,
        /// The consumer's index plus the ring size.
        high: u32,
    },
}

/// Why a record could not be staged.
///
/// Exhaustive on purpose: a push either finds no room or finds the ring broken, and callers
/// (the fault core's handlers among them) match both without a catch-all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PushError {
    /// Not enough free slots (the consumer is behind).
    #[error("ring full")]
    Full,
    /// The ring is broken.
    #[error(transparent)]
    Broken(#[from] RingError),
}

/// `lo <= x <= hi` on the circle of free-running `u32` indices, given `lo <= hi` there.
#[inline]
fn within(x: u32, lo: u32, hi: u32) -> bool {
    x.wrapping_sub(lo) <= hi.wrapping_sub(lo)
}

/// Which shared cells hold the producer index, the consumer index and the consumer's flags.
struct Cells;

impl Cells {
    fn prod<M: QueueMemory>(kind: QueueKind, m: &M) -> &AtomicU32 {
        match kind {
            QueueKind::Fault => &m.host_page().index,
            QueueKind::Response => &m.vmm_page().index,
        }
    }
    fn cons<M: QueueMemory>(kind: QueueKind, m: &M) -> &AtomicU32 {
        match kind {
            QueueKind::Fault => &m.vmm_page().index,
            QueueKind::Response => &m.host_page().index,
        }
    }
    fn consumer_flags<M: QueueMemory>(kind: QueueKind, m: &M) -> &AtomicU32 {
        match kind {
            QueueKind::Fault => &m.vmm_page().flags,
            QueueKind::Response => &m.host_page().flags,
        }
    }
}

fn slot<E: Entry>(words: &[AtomicU64], mask: u32, index: u32) -> &[AtomicU64] {
    let start = (index & mask) as usize * E::WORDS;
    // In bounds by construction: the memory holds `nb_entries * WORDS` words and
    // `index & mask < nb_entries`. `get` keeps even a broken invariant from panicking.
    words.get(start..start + E::WORDS).unwrap_or(&[])
}

/// What [`RingProducer::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Published {
    /// Records made visible by this call.
    pub records: u32,
    /// The consumer was asleep (or about to be): ring its doorbell.
    pub kick: bool,
}

/// The producing end of a ring: stages records into free slots, publishes them in batches.
#[derive(Debug)]
pub struct RingProducer<E, M> {
    memory: M,
    kind: QueueKind,
    mask: u32,
    nb_entries: u32,
    /// Next slot to write.
    prod: u32,
    /// Last index stored to shared memory.
    published: u32,
    /// Last validated consumer index.
    cons: u32,
    broken: Option<RingError>,
    _entry: PhantomData<E>,
}

impl<E: Entry, M: QueueMemory> RingProducer<E, M> {
    /// A producer over a fresh ring (both indices 0).
    pub fn new(memory: M) -> Self {
        let nb_entries = memory.geometry().nb_entries();
        debug_assert_eq!(memory.geometry().kind(), E::KIND);
        Self {
            memory,
            kind: E::KIND,
            mask: nb_entries - 1,
            nb_entries,
            prod: 0,
            published: 0,
            cons: 0,
            broken: None,
            _entry: PhantomData,
        }
    }

    /// A producer resuming a ring whose producer index is `prod` and consumer index `cons`.
    pub fn with_indices(memory: M, prod: u32, cons: u32) -> Result<Self, RingError> {
        let mut ring = Self::new(memory);
        if prod.wrapping_sub(cons) > ring.nb_entries {
            return Err(RingError::ConsumerIndex {
                found: cons,
                low: prod.wrapping_sub(ring.nb_entries),
                high: prod,
            });
        }
        (ring.prod, ring.published, ring.cons) = (prod, prod, cons);
        Ok(ring)
    }

    /// The memory under the ring.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The ring's error, if the peer broke it.
    pub fn broken(&self) -> Option<RingError> {
        self.broken
    }

    /// The private producer index (staged records included).
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Records staged but not yet published.
    pub fn staged(&self) -> u32 {
        self.prod.wrapping_sub(self.published)
    }

    /// Entries of the ring.
    pub fn nb_entries(&self) -> u32 {
        self.nb_entries
    }

    /// Records published and not consumed yet, by the consumer's index as it is now; `None`
    /// when that index is out of range. For watching only: it reads the index and changes
    /// nothing (a bad index breaks the ring at the next [`refresh`](Self::refresh), not here).
    pub fn fill(&self) -> Option<u32> {
        let found = Cells::cons(self.kind, &self.memory).load(Ordering::Acquire);
        within(found, self.cons, self.published).then(|| self.published.wrapping_sub(found))
    }

    fn check(&self) -> Result<(), RingError> {
        match self.broken {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Re-reads the consumer's index and returns the free slots.
    pub fn refresh(&mut self) -> Result<u32, RingError> {
        self.check()?;
        // SYNC C1 (acquire): the consumer's slot reads happen before we reuse the slots.
        let found = Cells::cons(self.kind, &self.memory).load(Ordering::Acquire);
        // The consumer can only have read what we published, and never moves backwards.
        if !within(found, self.cons, self.published) {
            let e = RingError::ConsumerIndex {
                found,
                low: self.cons,
                high: self.published,
            };
            self.broken = Some(e);
            return Err(e);
        }
        self.cons = found;
        Ok(self.free())
    }

    fn free(&self) -> u32 {
        self.nb_entries - self.prod.wrapping_sub(self.cons)
    }

    /// Ensures `n` free slots, re-reading the consumer's index only when the cached one says
    /// there is no room.
    fn reserve(&mut self, n: usize) -> Result<(), PushError> {
        self.check()?;
        let n = u32::try_from(n).map_err(|_| PushError::Full)?;
        if self.free() < n && self.refresh()? < n {
            return Err(PushError::Full);
        }
        Ok(())
    }

    fn write(&mut self, entry: &E) {
        let words = self.memory.entry_words();
        entry.store(slot::<E>(words, self.mask, self.prod));
        self.prod = self.prod.wrapping_add(1);
    }

    /// Writes one record into the next free slot; it becomes visible at the next
    /// [`publish`](Self::publish).
    pub fn stage(&mut self, entry: &E) -> Result<(), PushError> {
        self.reserve(1)?;
        self.write(entry);
        Ok(())
    }

    /// Writes all of `entries`, or none of them if they do not all fit.
    pub fn stage_all(&mut self, entries: &[E]) -> Result<(), PushError> {
        self.stage_exact(entries.iter().copied())
    }

    /// Writes every record `entries` yields, or none of them if they do not all fit (the
    /// iterator's length is trusted only as far as the records it really yields).
    pub fn stage_exact<I>(&mut self, entries: I) -> Result<(), PushError>
    where
        I: IntoIterator<Item = E>,
        I::IntoIter: ExactSizeIterator,
    {
        let entries = entries.into_iter();
        let n = entries.len();
        self.reserve(n)?;
        for entry in entries.take(n) {
            self.write(&entry);
        }
        Ok(())
    }

    /// Writes as many of `entries` as fit, returns how many.
    pub fn stage_some(&mut self, entries: &[E]) -> Result<usize, RingError> {
        self.check()?;
        let mut free = self.free();
        if (free as usize) < entries.len() {
            free = self.refresh()?;
        }
        let n = entries.len().min(free as usize);
        for entry in &entries[..n] {
            self.write(entry);
        }
        Ok(n)
    }

    /// Makes every staged record visible to the consumer with one index store, and says
    /// whether the consumer must be woken.
    pub fn publish(&mut self) -> Result<Published, RingError> {
        self.check()?;
        let records = self.staged();
        if records == 0 {
            return Ok(Published::default());
        }
        // SYNC P1 (release): the slot writes above happen before the consumer sees `prod`.
        Cells::prod(self.kind, &self.memory).store(self.prod, Ordering::Release);
        self.published = self.prod;
        // SYNC W (producer half): order the `prod` store before the `NEED_WAKEUP` load; pairs
        // with the consumer's fence in `RingConsumer::prepare_to_sleep`.
        fence(Ordering::SeqCst);
        let flags = Cells::consumer_flags(self.kind, &self.memory).load(Ordering::Relaxed);
        Ok(Published {
            records,
            kick: flags & FLAG_NEED_WAKEUP != 0,
        })
    }
}

/// The consuming end of a ring: drains published records in batches and returns their slots.
#[derive(Debug)]
pub struct RingConsumer<E, M> {
    memory: M,
    kind: QueueKind,
    mask: u32,
    nb_entries: u32,
    /// Next slot to read.
    cons: u32,
    /// Last validated producer index.
    prod: u32,
    /// The consumer's flags word, less `NEED_WAKEUP` (the host keeps `LIVE` here).
    flags: u32,
    /// Between `prepare_to_sleep` (returning true) and `woke`.
    sleeping: bool,
    broken: Option<RingError>,
    _entry: PhantomData<E>,
}

impl<E: Entry, M: QueueMemory> RingConsumer<E, M> {
    /// A consumer over a fresh ring (both indices 0).
    pub fn new(memory: M) -> Self {
        let nb_entries = memory.geometry().nb_entries();
        debug_assert_eq!(memory.geometry().kind(), E::KIND);
        Self {
            memory,
            kind: E::KIND,
            mask: nb_entries - 1,
            nb_entries,
            cons: 0,
            prod: 0,
            flags: 0,
            sleeping: false,
            broken: None,
            _entry: PhantomData,
        }
    }

    /// A consumer resuming a ring whose consumer index is `cons` and producer index `prod`.
    pub fn with_indices(memory: M, cons: u32, prod: u32) -> Result<Self, RingError> {
        let mut ring = Self::new(memory);
        if prod.wrapping_sub(cons) > ring.nb_entries {
            return Err(RingError::ProducerIndex {
                found: prod,
                low: cons,
                high: cons.wrapping_add(ring.nb_entries),
            });
        }
        (ring.cons, ring.prod) = (cons, prod);
        Ok(ring)
    }

    /// The memory under the ring.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The ring's error, if the peer broke it.
    pub fn broken(&self) -> Option<RingError> {
        self.broken
    }

    /// The private consumer index.
    pub fn cons(&self) -> u32 {
        self.cons
    }

    /// Sets the consumer's flags word (other than `NEED_WAKEUP`) and stores it. A consumer
    /// between [`prepare_to_sleep`](Self::prepare_to_sleep) and [`woke`](Self::woke) keeps
    /// `NEED_WAKEUP` set, so changing flags then cannot lose its wake-up.
    pub fn set_flags(&mut self, flags: u32) {
        self.flags = flags & !FLAG_NEED_WAKEUP;
        let wakeup = if self.sleeping { FLAG_NEED_WAKEUP } else { 0 };
        Cells::consumer_flags(self.kind, &self.memory)
            .store(self.flags | wakeup, Ordering::Relaxed);
    }

    fn check(&self) -> Result<(), RingError> {
        match self.broken {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Re-reads the producer's index and returns the records ready to read.
    pub fn refresh(&mut self) -> Result<u32, RingError> {
        self.check()?;
        // SYNC P1 (acquire): the producer's slot writes before `prod` are visible below.
        let found = Cells::prod(self.kind, &self.memory).load(Ordering::Acquire);
        // The producer never moves backwards and never runs more than a ring ahead of us.
        let high = self.cons.wrapping_add(self.nb_entries);
        if !within(found, self.prod, high) {
            let e = RingError::ProducerIndex {
                found,
                low: self.prod,
                high,
            };
            self.broken = Some(e);
            return Err(e);
        }
        self.prod = found;
        Ok(self.available())
    }

    fn available(&self) -> u32 {
        self.prod.wrapping_sub(self.cons)
    }

    /// Reads up to `max` records (refreshing the producer's index once), hands each to `f` in
    /// order, then returns their slots with one index store. Returns how many were read.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(E)) -> Result<usize, RingError> {
        let available = self.refresh()?;
        let n = (available as usize).min(max);
        if n == 0 {
            return Ok(0);
        }
        let words = self.memory.entry_words();
        for _ in 0..n {
            f(E::load(slot::<E>(words, self.mask, self.cons)));
            self.cons = self.cons.wrapping_add(1);
        }
        // SYNC C1 (release): our slot reads happen before the producer may overwrite them.
        Cells::cons(self.kind, &self.memory).store(self.cons, Ordering::Release);
        Ok(n)
    }

    /// Announces that this consumer is about to sleep on its doorbell. Returns `true` if it
    /// must sleep (the ring is still empty after the announcement), `false` if records arrived
    /// meanwhile (the flag is cleared again). After sleeping, call [`woke`](Self::woke).
    pub fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
        self.check()?;
        Cells::consumer_flags(self.kind, &self.memory)
            .store(self.flags | FLAG_NEED_WAKEUP, Ordering::Relaxed);
        // SYNC W (consumer half): order the flag store before the `prod` re-read; pairs with
        // the producer's fence in `RingProducer::publish`.
        fence(Ordering::SeqCst);
        match self.refresh() {
            Ok(0) => {
                self.sleeping = true;
                Ok(true)
            }
            other => {
                self.woke();
                other.map(|_| false)
            }
        }
    }

    /// Clears `NEED_WAKEUP` after a sleep (whether or not a kick came).
    pub fn woke(&mut self) {
        self.sleeping = false;
        Cells::consumer_flags(self.kind, &self.memory).store(self.flags, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;

    use iopf_abi::{QueueGeometry, ResponseRecord};
    use proptest::prelude::*;

    use super::*;
    use crate::memory::HeapMemory;

    type Memory = Arc<HeapMemory>;

    fn ring(
        nb_entries: u32,
    ) -> (
        RingProducer<ResponseRecord, Memory>,
        RingConsumer<ResponseRecord, Memory>,
    ) {
        let memory = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Response, nb_entries).unwrap(),
        ));
        (RingProducer::new(memory.clone()), RingConsumer::new(memory))
    }

    fn record(n: u32) -> ResponseRecord {
        ResponseRecord {
            cookie: n.into(),
            reserved: u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15).into(),
            ..Default::default()
        }
    }

    fn drain_all(c: &mut RingConsumer<ResponseRecord, Memory>) -> Vec<u32> {
        let mut out = Vec::new();
        c.drain(usize::MAX, |r| out.push(r.cookie.get())).unwrap();
        out
    }

    #[test]
    fn staged_records_are_invisible_until_published() {
        let (mut p, mut c) = ring(4);
        p.stage(&record(1)).unwrap();
        assert_eq!(c.refresh(), Ok(0));
        assert_eq!(p.publish().unwrap().records, 1);
        assert_eq!(drain_all(&mut c), vec![1]);
    }

    #[test]
    fn full_ring_refuses_until_consumer_frees_slots() {
        let (mut p, mut c) = ring(2);
        p.stage_all(&[record(1), record(2)]).unwrap();
        assert_eq!(p.stage(&record(3)), Err(PushError::Full));
        p.publish().unwrap();
        assert_eq!(drain_all(&mut c), vec![1, 2]);
        p.stage(&record(3)).unwrap();
        p.publish().unwrap();
        assert_eq!(drain_all(&mut c), vec![3]);
    }

    #[test]
    fn stage_all_is_all_or_nothing() {
        let (mut p, mut c) = ring(4);
        p.stage(&record(1)).unwrap();
        assert_eq!(
            p.stage_all(&[record(2), record(3), record(4), record(5)]),
            Err(PushError::Full)
        );
        assert_eq!(p.staged(), 1);
        p.publish().unwrap();
        assert_eq!(drain_all(&mut c), vec![1]);
    }

    #[test]
    fn indices_wrap_around_u32() {
        let memory = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Response, 4).unwrap(),
        ));
        let start = u32::MAX - 2;
        let mut p: RingProducer<ResponseRecord, _> =
            RingProducer::with_indices(memory.clone(), start, start).unwrap();
        let mut c = RingConsumer::with_indices(memory, start, start).unwrap();
        for round in 0..5u32 {
            p.stage_all(&[record(round * 2), record(round * 2 + 1)])
                .unwrap();
            p.publish().unwrap();
            assert_eq!(drain_all(&mut c), vec![round * 2, round * 2 + 1]);
        }
        assert_eq!(c.cons(), start.wrapping_add(10));
    }

    #[test]
    fn consumer_index_past_prod_breaks_the_ring() {
        let (mut p, _c) = ring(4);
        p.stage(&record(1)).unwrap();
        p.publish().unwrap();
        p.memory().host_page().index.store(2, Ordering::Relaxed);
        let expected = RingError::ConsumerIndex {
            found: 2,
            low: 0,
            high: 1,
        };
        assert_eq!(p.refresh(), Err(expected));
        // Sticky: even a good index later does not revive it.
        p.memory().host_page().index.store(1, Ordering::Relaxed);
        assert_eq!(p.stage(&record(2)), Err(PushError::Broken(expected)));
        assert_eq!(p.publish(), Err(expected));
    }

    #[test]
    fn consumer_index_moving_backwards_breaks_the_ring() {
        let (mut p, mut c) = ring(4);
        p.stage_all(&[record(1), record(2)]).unwrap();
        p.publish().unwrap();
        drain_all(&mut c);
        assert_eq!(p.refresh(), Ok(4));
        p.memory().host_page().index.store(1, Ordering::Relaxed);
        assert!(matches!(
            p.refresh(),
            Err(RingError::ConsumerIndex { found: 1, .. })
        ));
    }

    #[test]
    fn producer_index_more_than_a_ring_ahead_breaks_the_ring() {
        let (p, mut c) = ring(4);
        p.memory().vmm_page().index.store(5, Ordering::Relaxed);
        assert_eq!(
            c.refresh(),
            Err(RingError::ProducerIndex {
                found: 5,
                low: 0,
                high: 4
            })
        );
        let mut seen = 0;
        assert!(c.drain(usize::MAX, |_| seen += 1).is_err());
        assert_eq!(seen, 0);
    }

    #[test]
    fn producer_index_moving_backwards_breaks_the_ring() {
        let (p, mut c) = ring(4);
        p.memory().vmm_page().index.store(3, Ordering::Relaxed);
        assert_eq!(c.refresh(), Ok(3));
        p.memory().vmm_page().index.store(2, Ordering::Relaxed);
        assert!(matches!(
            c.refresh(),
            Err(RingError::ProducerIndex { found: 2, .. })
        ));
    }

    #[test]
    fn publish_asks_for_a_kick_only_when_consumer_sleeps() {
        let (mut p, mut c) = ring(4);
        p.stage(&record(1)).unwrap();
        assert!(!p.publish().unwrap().kick);
        drain_all(&mut c);
        assert_eq!(c.prepare_to_sleep(), Ok(true));
        p.stage(&record(2)).unwrap();
        assert!(p.publish().unwrap().kick);
        c.woke();
        p.stage(&record(3)).unwrap();
        assert!(!p.publish().unwrap().kick);
    }

    #[test]
    fn prepare_to_sleep_declines_when_records_are_waiting() {
        let (mut p, mut c) = ring(4);
        p.stage(&record(1)).unwrap();
        p.publish().unwrap();
        assert_eq!(c.prepare_to_sleep(), Ok(false));
        // The flag was cleared again: the producer is not asked to kick.
        p.stage(&record(2)).unwrap();
        assert!(!p.publish().unwrap().kick);
    }

    #[test]
    fn consumer_flags_keep_live_across_sleeps() {
        let (_p, mut c) = ring(4);
        c.set_flags(iopf_abi::HOST_FLAG_LIVE);
        assert_eq!(c.prepare_to_sleep(), Ok(true));
        let flags = c.memory().host_page().flags.load(Ordering::Relaxed);
        assert_eq!(flags, iopf_abi::HOST_FLAG_LIVE | FLAG_NEED_WAKEUP);
        c.woke();
        let flags = c.memory().host_page().flags.load(Ordering::Relaxed);
        assert_eq!(flags, iopf_abi::HOST_FLAG_LIVE);
    }

    #[test]
    fn changing_flags_while_asleep_keeps_need_wakeup() {
        let (mut p, mut c) = ring(4);
        assert_eq!(c.prepare_to_sleep(), Ok(true));
        c.set_flags(iopf_abi::HOST_FLAG_LIVE);
        p.stage(&record(1)).unwrap();
        assert!(p.publish().unwrap().kick, "the sleeper must still be woken");
        c.woke();
        c.set_flags(0);
        p.stage(&record(2)).unwrap();
        assert!(!p.publish().unwrap().kick);
    }

    #[test]
    fn resuming_with_inconsistent_indices_is_refused() {
        let memory = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Response, 4).unwrap(),
        ));
        assert!(RingProducer::<ResponseRecord, _>::with_indices(memory.clone(), 5, 0).is_err());
        assert!(RingConsumer::<ResponseRecord, _>::with_indices(memory, 0, 5).is_err());
    }

    proptest! {
        /// Whatever a hostile peer stores in its index, between any operations, the honest
        /// side never panics, never yields a record it was not given, and once it reports the
        /// ring broken it stays broken.
        #[test]
        fn garbage_peer_indices_never_panic_or_leak(
            ops in proptest::collection::vec((0u8..4, any::<u32>()), 1..64),
            nb_log in 1u32..5,
        ) {
            let (mut p, mut c) = ring(1 << nb_log);
            let mut next = 0u32;
            for (op, value) in ops {
                match op {
                    0 => { let _ = p.stage(&record(next)); next += 1; }
                    1 => { let _ = p.publish(); }
                    2 => p.memory().host_page().index.store(value, Ordering::Relaxed),
                    _ => p.memory().vmm_page().index.store(value, Ordering::Relaxed),
                }
                let was_broken = c.broken();
                let _ = c.drain(usize::MAX, |r| assert!(r.cookie.get() < next.max(1) || r == ResponseRecord::default()));
                if was_broken.is_some() {
                    prop_assert_eq!(c.broken(), was_broken);
                }
            }
        }

        /// An honest producer and consumer deliver every record once, in order, for any
        /// interleaving of batch sizes.
        #[test]
        fn honest_peers_deliver_everything_in_order(
            batches in proptest::collection::vec((0usize..9, 0usize..9), 1..50),
            nb_log in 1u32..4,
        ) {
            let (mut p, mut c) = ring(1 << nb_log);
            let (mut sent, mut got) = (0u32, Vec::new());
            for (push, pull) in batches {
                for _ in 0..push {
                    if p.stage(&record(sent)).is_ok() { sent += 1; }
                }
                p.publish().unwrap();
                c.drain(pull, |r| got.push(r.cookie.get())).unwrap();
            }
            c.drain(usize::MAX, |r| got.push(r.cookie.get())).unwrap();
            prop_assert_eq!(got, (0..sent).collect::<Vec<_>>());
        }
    }
}
