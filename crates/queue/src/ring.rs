//! The single-producer single-consumer ring protocol of ABI v2 (`docs/ABI.md` §3, §4), with
//! no I/O.
//!
//! Every record carries a mark in its last word, [`iopf_abi::mark`] of its free-running index,
//! which the producer stores last. The consumer polls the slot it will read next and acquires
//! its mark; it never reads a producer index (there is none). The producer learns the
//! consumer's progress from the consumer index, which the consumer stores once per drain and
//! the producer reads only when its cached copy says there is no room. So in the steady state
//! each record crosses between the cores as one cache line, and the index line stays with its
//! writer.
//!
//! Nothing read from the peer is trusted: the consumer index is checked against what was
//! published, a mark is accepted only if it is exactly the one expected, and slot positions are
//! always `index & (nb_entries - 1)`, in bounds whatever the peer writes. A peer that writes
//! garbage makes the ring [`RingError`] (broken, sticky), never makes this side touch a slot it
//! does not own.
//!
//! Sync points (each Release store pairs with the Acquire load of the same cell on the other
//! side):
//! - **P1** the producer writes a record's body, then stores its mark (Release); the consumer's
//!   load of the mark (Acquire) makes the body visible before it reads it. A batch's marks are
//!   stored first-record-last, so the consumer sees the batch (a page request group) whole.
//! - **C1** the consumer stores `cons` (Release) after reading the slots below it; the
//!   producer's load of `cons` (Acquire) orders those reads before its next writes to the same
//!   slots, so a record is never overwritten while it is read (no torn record).
//! - **T** after copying a body, the consumer re-reads the mark (Acquire fence, then a load): a
//!   mark that changed means the producer rewrote the slot under it, which an honest producer
//!   never does (C1), and the record is refused ([`RingError::Torn`]).
//! - **W** wake-up suppression, a store-fence-load pair on each side (Dekker): the consumer
//!   stores `NEED_WAKEUP`, fences (SeqCst), re-reads the mark of its next slot; the producer
//!   stores the batch's last mark, fences (SeqCst), reads `NEED_WAKEUP`. The two SeqCst fences
//!   are totally ordered, so at least one side sees the other's store: either the producer
//!   kicks, or the consumer finds the record and does not sleep. Without the fences both loads
//!   may read old values (store buffering), and the consumer sleeps on a record nobody will kick
//!   for (the lost wake-up `io_uring` fixed in its `need_wakeup`).

use core::marker::PhantomData;

use iopf_abi::{FLAG_NEED_WAKEUP, QueueKind, mark};
use thiserror::Error;

use crate::entry::Entry;
use crate::memory::QueueMemory;
use crate::sync::{AtomicU32, AtomicU64, Ordering, fence};

/// The peer broke the ring protocol. The ring stops; the region is to be torn down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RingError {
    /// The consumer's index moved backwards or past the records published.
    #[error("consumer index {found} is outside [{low}, {high}]")]
    ConsumerIndex {
        /// The index read from shared memory.
        found: u32,
        /// The consumer's last valid index.
        low: u32,
        /// The producer's published index.
        high: u32,
    },
    /// A slot's mark is neither the one of the record expected there, nor the previous pass's,
    /// nor 0: a stale (replayed), skipped or forged mark.
    #[error("slot of record {index} has mark {found:#x}, expected {:#x}", mark(*index))]
    Mark {
        /// The free-running index of the record expected in the slot.
        index: u32,
        /// The mark read from the slot.
        found: u64,
    },
    /// A slot's mark changed while its record was being read: the producer rewrote a slot it
    /// had published and the consumer had not freed.
    #[error("slot of record {index} was rewritten while it was read (mark now {found:#x})")]
    Torn {
        /// The free-running index of the record being read.
        index: u32,
        /// The mark read again after the record.
        found: u64,
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

/// Which shared cells hold the consumer index and the consumer's flags.
struct Cells;

impl Cells {
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

/// The mark word of the slot of record `index` (`None` only if the memory is short, which
/// the geometry rules out).
#[inline]
fn mark_cell<E: Entry>(words: &[AtomicU64], mask: u32, index: u32) -> Option<&AtomicU64> {
    words.get((index & mask) as usize * E::WORDS + E::WORDS - 1)
}

/// What a slot's mark says about record `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The record is there.
    Ready(u64),
    /// Not yet: the slot still holds the previous pass's record, or was never written.
    Empty,
}

/// Classifies the mark `found` in the slot of record `index` of a ring of `nb_entries`.
#[inline]
fn classify(found: u64, index: u32, nb_entries: u32) -> Result<Slot, RingError> {
    if found == mark(index) {
        Ok(Slot::Ready(found))
    } else if found == mark(index.wrapping_sub(nb_entries)) || found == 0 {
        Ok(Slot::Empty)
    } else {
        Err(RingError::Mark { index, found })
    }
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
    /// First record not yet marked.
    published: u32,
    /// Last validated consumer index.
    cons: u32,
    /// The first record of the batch being staged (record `published`), kept here until
    /// [`publish`](Self::publish) writes it: its slot is the one the consumer polls, so
    /// writing it in one burst with its mark, after the rest of the batch, takes the line
    /// from the polling consumer once instead of once per word.
    first: Option<E>,
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
            first: None,
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

    /// A producer taking over a ring from an earlier one (a VMM that attaches again): reads
    /// the consumer index, then finds where the earlier producer stopped by following the
    /// marks from there (at most one pass around the ring). A mark that is neither the next
    /// record's nor an empty slot's is refused.
    pub fn resume(memory: M) -> Result<Self, RingError> {
        let mut ring = Self::new(memory);
        // SYNC C1 (acquire): the consumer's reads are done before we reuse its slots.
        let cons = Cells::cons(ring.kind, &ring.memory).load(Ordering::Acquire);
        let words = ring.memory.entry_words();
        let mut prod = cons;
        while prod.wrapping_sub(cons) < ring.nb_entries {
            // SYNC P1 (acquire): whatever we found marked is complete.
            let found =
                mark_cell::<E>(words, ring.mask, prod).map_or(0, |c| c.load(Ordering::Acquire));
            match classify(found, prod, ring.nb_entries)? {
                Slot::Ready(_) => prod = prod.wrapping_add(1),
                Slot::Empty => break,
            }
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
    /// The consumer stores its index once per drain, so this may count records it is reading.
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
            #[cfg(feature = "mutant-trust-consumer-index")]
            if let Some(cons) = self.mutant_trusted_index(found) {
                self.cons = cons;
                return Ok(self.free());
            }
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

    /// Test-only mutant (feature `mutant-trust-consumer-index`, never on by default): a
    /// lenient producer that takes a consumer index ahead of what it published to mean "read
    /// everything", and so reuses slots the consumer has not read.
    #[cfg(feature = "mutant-trust-consumer-index")]
    fn mutant_trusted_index(&self, found: u32) -> Option<u32> {
        (found.wrapping_sub(self.published) < 1 << 31).then_some(self.published)
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
        if self.prod == self.published {
            self.first = Some(*entry);
        } else {
            let words = self.memory.entry_words();
            entry.store(slot::<E>(words, self.mask, self.prod));
        }
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

    /// Makes every staged record visible to the consumer by storing their marks, the first
    /// record's last (so the batch appears whole), and says whether the consumer must be woken.
    pub fn publish(&mut self) -> Result<Published, RingError> {
        self.check()?;
        let records = self.staged();
        if records == 0 {
            return Ok(Published::default());
        }
        let words = self.memory.entry_words();
        let first = self.published;
        let mut index = first.wrapping_add(1);
        while index != self.prod {
            if let Some(cell) = mark_cell::<E>(words, self.mask, index) {
                // SYNC P1 (release): this record's body is written before its mark.
                cell.store(mark(index), Ordering::Release);
            }
            index = index.wrapping_add(1);
        }
        if let Some(entry) = self.first.take() {
            entry.store(slot::<E>(words, self.mask, first));
        }
        if let Some(cell) = mark_cell::<E>(words, self.mask, first) {
            // SYNC P1 (release): the batch's bodies and other marks come before this mark,
            // the one the consumer polls.
            cell.store(mark(first), Ordering::Release);
        }
        self.published = self.prod;
        // SYNC W (producer half): order the mark store before the `NEED_WAKEUP` load; pairs
        // with the consumer's fence in `RingConsumer::prepare_to_sleep`.
        fence(Ordering::SeqCst);
        let flags = Cells::consumer_flags(self.kind, &self.memory).load(Ordering::Relaxed);
        Ok(Published {
            records,
            kick: flags & FLAG_NEED_WAKEUP != 0,
        })
    }
}

/// The consuming end of a ring: drains marked records in batches and returns their slots.
#[derive(Debug)]
pub struct RingConsumer<E, M> {
    memory: M,
    kind: QueueKind,
    mask: u32,
    nb_entries: u32,
    /// Next slot to read.
    cons: u32,
    /// The consumer's flags word, less `NEED_WAKEUP` (the host keeps `LIVE` here).
    flags: u32,
    /// Between `prepare_to_sleep` (returning true) and `woke`.
    sleeping: bool,
    broken: Option<RingError>,
    _entry: PhantomData<E>,
}

impl<E: Entry, M: QueueMemory> RingConsumer<E, M> {
    /// A consumer over a fresh ring (index 0).
    pub fn new(memory: M) -> Self {
        let nb_entries = memory.geometry().nb_entries();
        debug_assert_eq!(memory.geometry().kind(), E::KIND);
        Self {
            memory,
            kind: E::KIND,
            mask: nb_entries - 1,
            nb_entries,
            cons: 0,
            flags: 0,
            sleeping: false,
            broken: None,
            _entry: PhantomData,
        }
    }

    /// A consumer resuming a ring at consumer index `cons` (its next read is record `cons`,
    /// whose mark it checks like any other).
    pub fn with_index(memory: M, cons: u32) -> Self {
        let mut ring = Self::new(memory);
        ring.cons = cons;
        ring
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

    fn fail(&mut self, e: RingError) -> RingError {
        self.broken = Some(e);
        e
    }

    /// What the slot of record `index` holds (SYNC P1, acquire).
    #[inline]
    fn peek(&mut self, index: u32) -> Result<Slot, RingError> {
        let words = self.memory.entry_words();
        let found =
            mark_cell::<E>(words, self.mask, index).map_or(0, |c| c.load(Ordering::Acquire));
        classify(found, index, self.nb_entries).map_err(|e| self.fail(e))
    }

    /// Whether the next record is ready (one look at its slot's mark; the poll of a spinning
    /// consumer).
    pub fn poll(&mut self) -> Result<bool, RingError> {
        self.check()?;
        Ok(matches!(self.peek(self.cons)?, Slot::Ready(_)))
    }

    /// Counts the records ready to read, following the marks from the next one (at most one
    /// pass around the ring).
    pub fn refresh(&mut self) -> Result<u32, RingError> {
        self.check()?;
        let mut n = 0;
        while n < self.nb_entries {
            match self.peek(self.cons.wrapping_add(n))? {
                Slot::Ready(_) => n += 1,
                Slot::Empty => break,
            }
        }
        Ok(n)
    }

    /// Reads up to `max` records, in order, handing each to `f` as it is read, then returns
    /// their slots with one index store (and one more every sixteenth of the ring on the
    /// way). Stops at the first slot not yet marked. Returns how many were read.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(E)) -> Result<usize, RingError> {
        self.check()?;
        let max = max.min(self.nb_entries as usize);
        let (mask, nb_entries) = (self.mask, self.nb_entries);
        let progress_every = (nb_entries as usize / 16).max(1);
        let mut cons = self.cons;
        let mut n = 0;
        let mut error = None;
        let words = self.memory.entry_words();
        while n < max {
            let cells = slot::<E>(words, mask, cons);
            let Some(mark_word) = cells.last() else {
                break;
            };
            // SYNC P1 (acquire): the record's body, written before its mark, is visible below.
            let found = mark_word.load(Ordering::Acquire);
            let expected = mark(cons);
            if found != expected {
                // Not there yet, or a mark that lies.
                error = classify(found, cons, nb_entries).err();
                break;
            }
            let record = E::load(cells);
            // SYNC T: the body loads above happen before the mark's second load.
            fence(Ordering::Acquire);
            let again = mark_word.load(Ordering::Relaxed);
            if again != expected {
                error = Some(RingError::Torn {
                    index: cons,
                    found: again,
                });
                break;
            }
            f(record);
            cons = cons.wrapping_add(1);
            n += 1;
            // A drain may chase a producer that keeps publishing: return slots every sixteenth
            // of the ring on the way, so that the producer is never starved of room.
            if n % progress_every == 0 {
                // SYNC C1 (release), as below.
                Cells::cons(self.kind, &self.memory).store(cons, Ordering::Release);
            }
        }
        if n > 0 {
            self.cons = cons;
            // SYNC C1 (release): our slot reads happen before the producer may overwrite them.
            Cells::cons(self.kind, &self.memory).store(cons, Ordering::Release);
        }
        match error {
            Some(e) => Err(self.fail(e)),
            None => Ok(n),
        }
    }

    /// Announces that this consumer is about to sleep on its doorbell. Returns `true` if it
    /// must sleep (the next slot is still unmarked after the announcement), `false` if a record
    /// arrived meanwhile (the flag is cleared again). After sleeping, call [`woke`](Self::woke).
    pub fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
        self.check()?;
        Cells::consumer_flags(self.kind, &self.memory)
            .store(self.flags | FLAG_NEED_WAKEUP, Ordering::Relaxed);
        // SYNC W (consumer half): order the flag store before the mark re-read; pairs with
        // the producer's fence in `RingProducer::publish`.
        fence(Ordering::SeqCst);
        match self.poll() {
            Ok(false) => {
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

// Two attributes rather than `all(test, not(loom))`: cargo-mutants recognises `#[cfg(test)]`
// and leaves the test helpers unmutated.
#[cfg(test)]
#[cfg(not(loom))]
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
            pasid: n.wrapping_mul(0x9e37_79b9).into(),
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
        let mut c = RingConsumer::with_index(memory, start);
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

    /// The mark word of the slot of response record `index` in a ring of `nb` entries.
    fn mark_word(m: &Memory, nb: u32, index: u32) -> &AtomicU64 {
        &m.entry_words()[((index & (nb - 1)) * 4 + 3) as usize]
    }

    #[test]
    fn records_carry_their_mark_and_are_handed_over_without_it() {
        let (mut p, mut c) = ring(4);
        p.stage(&record(7)).unwrap();
        assert_eq!(
            mark_word(p.memory(), 4, 0).load(Ordering::Relaxed),
            0,
            "unmarked until published"
        );
        p.publish().unwrap();
        assert_eq!(mark_word(p.memory(), 4, 0).load(Ordering::Relaxed), mark(0));
        let mut got = Vec::new();
        c.drain(usize::MAX, |r| got.push(r)).unwrap();
        assert_eq!(got, vec![record(7)]);
    }

    #[test]
    fn a_skipped_mark_breaks_the_ring() {
        let (p, mut c) = ring(4);
        mark_word(p.memory(), 4, 0).store(mark(1), Ordering::Release);
        let mut seen = 0;
        assert_eq!(
            c.drain(usize::MAX, |_| seen += 1),
            Err(RingError::Mark {
                index: 0,
                found: mark(1)
            })
        );
        assert_eq!(seen, 0);
        // Sticky.
        mark_word(p.memory(), 4, 0).store(mark(0), Ordering::Release);
        assert!(c.drain(usize::MAX, |_| seen += 1).is_err());
        assert_eq!(seen, 0);
    }

    #[test]
    fn a_mark_from_two_passes_ago_breaks_the_ring() {
        let (mut p, mut c) = ring(2);
        for n in 0..4 {
            p.stage(&record(n)).unwrap();
            p.publish().unwrap();
            assert_eq!(drain_all(&mut c), vec![n]);
        }
        // Slot 0 now holds record 2 (mark(2)), the previous pass of record 4: "not yet".
        assert_eq!(c.poll(), Ok(false));
        // A replay of record 0 (two passes ago) is refused.
        mark_word(p.memory(), 2, 0).store(mark(0), Ordering::Release);
        assert_eq!(
            c.poll(),
            Err(RingError::Mark {
                index: 4,
                found: mark(0)
            })
        );
    }

    #[test]
    fn the_previous_pass_and_a_zeroed_slot_read_as_empty() {
        let (mut p, mut c) = ring(2);
        assert_eq!(c.refresh(), Ok(0));
        p.stage_all(&[record(1), record(2)]).unwrap();
        p.publish().unwrap();
        assert_eq!(c.refresh(), Ok(2));
        assert_eq!(drain_all(&mut c), vec![1, 2]);
        assert_eq!(c.refresh(), Ok(0));
        // A zeroed mark (a peer clearing its slot) only stalls its own ring.
        mark_word(p.memory(), 2, 2).store(0, Ordering::Release);
        assert_eq!(c.refresh(), Ok(0));
        assert_eq!(c.broken(), None);
    }

    #[test]
    fn a_batch_becomes_visible_whole() {
        let (mut p, mut c) = ring(4);
        p.stage_all(&[record(1), record(2), record(3)]).unwrap();
        // Staged, unmarked: nothing to read, however the consumer looks.
        assert_eq!(c.refresh(), Ok(0));
        assert_eq!(p.publish().unwrap().records, 3);
        assert_eq!(drain_all(&mut c), vec![1, 2, 3]);
    }

    #[test]
    fn a_producer_resumes_after_the_last_marked_record() {
        let (mut p, mut c) = ring(4);
        p.stage_all(&[record(1), record(2), record(3)]).unwrap();
        p.publish().unwrap();
        c.drain(1, |_| ()).unwrap();
        let memory = p.memory().clone();
        drop(p);
        let mut p2 = RingProducer::<ResponseRecord, _>::resume(memory).unwrap();
        assert_eq!(p2.prod(), 3);
        p2.stage(&record(4)).unwrap();
        p2.publish().unwrap();
        assert_eq!(drain_all(&mut c), vec![2, 3, 4]);
    }

    #[test]
    fn a_producer_refuses_to_resume_over_a_forged_mark() {
        let (p, _c) = ring(4);
        mark_word(p.memory(), 4, 0).store(0xdead, Ordering::Release);
        assert_eq!(
            RingProducer::<ResponseRecord, _>::resume(p.memory().clone()).unwrap_err(),
            RingError::Mark {
                index: 0,
                found: 0xdead
            }
        );
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
        assert!(RingProducer::<ResponseRecord, _>::with_indices(memory, 5, 0).is_err());
    }

    #[test]
    fn with_indices_accepts_a_full_ring_and_refuses_one_more() {
        let memory = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Response, 4).unwrap(),
        ));
        memory.host_page().index.store(10, Ordering::Relaxed);
        let mut p =
            RingProducer::<ResponseRecord, _>::with_indices(memory.clone(), 14, 10).unwrap();
        assert_eq!(p.stage(&record(1)), Err(PushError::Full));
        assert_eq!(
            RingProducer::<ResponseRecord, _>::with_indices(memory, 15, 10).unwrap_err(),
            RingError::ConsumerIndex {
                found: 10,
                low: 11,
                high: 15
            }
        );
    }

    #[test]
    fn a_producer_resumes_a_completely_full_ring() {
        let (mut p, mut c) = ring(4);
        p.stage_all(&[record(1), record(2), record(3), record(4)])
            .unwrap();
        p.publish().unwrap();
        let mut p2 = RingProducer::<ResponseRecord, _>::resume(p.memory().clone()).unwrap();
        assert_eq!(p2.prod(), 4);
        assert_eq!(p2.stage(&record(5)), Err(PushError::Full));
        assert_eq!(c.refresh(), Ok(4));
        assert_eq!(drain_all(&mut c), vec![1, 2, 3, 4]);
    }

    #[test]
    fn stage_some_stages_what_fits_and_says_how_many() {
        let (mut p, mut c) = ring(4);
        p.stage(&record(0)).unwrap();
        let batch: Vec<_> = (1..=5).map(record).collect();
        assert_eq!(p.stage_some(&batch), Ok(3));
        assert_eq!(p.staged(), 4);
        p.publish().unwrap();
        assert_eq!(drain_all(&mut c), vec![0, 1, 2, 3]);
        // The cached consumer index says "full": stage_some must look again to find room.
        assert_eq!(p.stage_some(&batch[3..]), Ok(2));
        p.publish().unwrap();
        assert_eq!(drain_all(&mut c), vec![4, 5]);
    }

    #[test]
    fn stage_some_reads_the_consumer_index_only_when_short_of_room() {
        let (mut p, _c) = ring(4);
        // A bogus consumer index is noticed only when the producer needs to read it: a batch
        // that fits the cached room leaves the consumer's line alone.
        p.memory().host_page().index.store(9, Ordering::Relaxed);
        assert_eq!(
            p.stage_some(&[record(1), record(2), record(3), record(4)]),
            Ok(4)
        );
        assert_eq!(p.broken(), None);
        assert!(matches!(
            p.stage_some(&[record(5)]),
            Err(RingError::ConsumerIndex { found: 9, .. })
        ));
    }

    #[test]
    fn a_long_drain_returns_slots_every_sixteenth_of_the_ring() {
        let (mut p, mut c) = ring(64);
        let batch: Vec<_> = (0..64).map(record).collect();
        p.stage_all(&batch).unwrap();
        p.publish().unwrap();
        // While record k is handed over, the producer sees the slots of the records before
        // the last multiple of 4 (64 / 16) freed: room before the drain ends, and one index
        // store per sixteenth, not one per record.
        let mut seen = Vec::new();
        let n = c
            .drain(usize::MAX, |r| {
                seen.push((r.cookie.get(), p.refresh().unwrap()))
            })
            .unwrap();
        assert_eq!(n, 64);
        let expected: Vec<_> = (0..64).map(|k| (k, k / 4 * 4)).collect();
        assert_eq!(seen, expected);
        assert_eq!(p.refresh(), Ok(64));
    }

    #[test]
    fn an_empty_drain_stores_no_consumer_index() {
        let (_p, mut c) = ring(4);
        // A consumer spinning on an empty ring writes nothing the producer reads.
        c.memory()
            .host_page()
            .index
            .store(0xdead, Ordering::Relaxed);
        assert_eq!(c.drain(usize::MAX, |_| ()), Ok(0));
        assert_eq!(c.memory().host_page().index.load(Ordering::Relaxed), 0xdead);
    }

    proptest! {
        /// Whatever a hostile peer stores in its index or in a slot's mark, between any
        /// operations, the honest side never panics, never yields a record it was not given,
        /// and once it reports the ring broken it stays broken.
        #[test]
        fn garbage_peer_indices_and_marks_never_panic_or_leak(
            ops in proptest::collection::vec((0u8..5, any::<u32>()), 1..64),
            nb_log in 1u32..5,
        ) {
            let nb = 1 << nb_log;
            let (mut p, mut c) = ring(nb);
            let mut next = 0u32;
            for (op, value) in ops {
                match op {
                    0 => { let _ = p.stage(&record(next)); next += 1; }
                    1 => { let _ = p.publish(); }
                    2 => p.memory().host_page().index.store(value, Ordering::Relaxed),
                    3 => mark_word(p.memory(), nb, value).store(mark(value >> 8), Ordering::Release),
                    _ => mark_word(p.memory(), nb, value).store(u64::from(value), Ordering::Release),
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
