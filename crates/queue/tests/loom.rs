//! Loom model checks of the ring protocol of ABI v2 (`crates/queue/src/ring.rs`,
//! `docs/ABI.md` §3, §4): records marked in their last word, no producer index.
//!
//! Loom runs each model under every interleaving of its threads (up to a preemption bound) and,
//! for every relaxed or acquire load, every value the C++20 memory model lets it return, so a
//! missing release/acquire shows up as a stale or torn record, and a missing fence as a lost
//! wake-up (a thread blocked forever, which loom reports as a deadlock).
//!
//! The rings are tiny on purpose (2 slots, 1 to 4 records): a ring of 2 with 3 or more
//! records makes the producer reuse a slot, which is where the consumer-side sync point matters.
//!
//! Sync points checked (named as in `ring.rs`):
//! - **P1** a record's mark, Release store / Acquire load: the body is visible before the
//!   mark, and a batch's first mark (stored last) shows the whole batch.
//! - **C1** `cons` Release store / Acquire load: slot reads finish before the slot is reused.
//!   Loom checks C1's index logic in every interleaving (the producer never writes a slot the
//!   consumer has not returned: storing `cons` before the reads, or a producer that counts one
//!   free slot too many, is caught as a torn record), but not its memory ordering: loom does
//!   not model load buffering (a load returning a store that comes later in the interleaving),
//!   so with `cons` stored or loaded Relaxed these models still pass.
//! - **T** the consumer's re-read of the mark after the body (Acquire fence, load): a producer
//!   that rewrites a slot under the consumer is caught, never handed over as a mixed record.
//! - **W** the store-fence-load pairs of wake-up suppression (`NEED_WAKEUP` and the mark of
//!   the consumer's next slot).
//!
//! The two `checker_finds_*` tests are negative controls: loom must fail a local copy of the
//! protocol with its P1 ordering or its W fences removed. Their expected panics are printed.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p iopf-queue --release
//! --test loom`. `LOOM_MAX_PREEMPTIONS` overrides the bound set in [`model`].
#![cfg(loom)]

use iopf_abi::{FaultRecord, QueueGeometry, QueueKind, ResponseRecord};
use iopf_queue::{
    Entry, HeapMemory, PushError, QueueMemory, RingConsumer, RingError, RingProducer,
};
use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

type Memory = Arc<HeapMemory>;

/// Explore every interleaving: the models of two slots and up to three records are small
/// enough (a few seconds each in release mode).
const EXHAUSTIVE: Option<usize> = None;

/// Preemption bound for the larger models (four records, or a wake-up model whose ring fills
/// up), whose exhaustive run takes from minutes to hours. The hazards these models look for
/// need one or two preemptions (a store-buffering pair, or one thread stopped between two slot
/// accesses while the other laps it), so four leaves a margin.
const LARGE: Option<usize> = Some(4);

/// Checks `f` under loom with preemption bound `bound` (`None`: exhaustive), unless
/// `LOOM_MAX_PREEMPTIONS` is set, which wins. Prints how many executions were explored.
fn model<F: Fn() + Sync + Send + 'static>(bound: Option<usize>, f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = bound;
    }
    // Counted outside loom (std atomics are invisible to it).
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    eprintln!(
        "{}: {} executions",
        std::thread::current().name().unwrap_or("model"),
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}

fn memory(kind: QueueKind, nb_entries: u32) -> Memory {
    Arc::new(HeapMemory::new(
        QueueGeometry::new(kind, nb_entries).unwrap(),
    ))
}

/// Field `field` of record `seq`: never 0, different for every (record, field), so a record
/// whose words come from two records (torn), or from a slot never written, is caught. (The
/// mark word is the ring's: records are handed over with it zeroed.)
fn field32(seq: u32, field: u32) -> u32 {
    ((seq + 1) << 8) | field
}

fn field64(seq: u32, field: u32) -> u64 {
    (u64::from(seq + 1) << 40) | (u64::from(field) << 32) | u64::from(!field32(seq, field))
}

/// A record whose every word is derived from its sequence number.
trait Numbered: Entry + PartialEq + core::fmt::Debug + Send + 'static {
    fn numbered(seq: u32) -> Self;
}

impl Numbered for ResponseRecord {
    fn numbered(seq: u32) -> Self {
        Self {
            version: field32(seq, 0).into(),
            flags: field32(seq, 1).into(),
            pasid: field32(seq, 2).into(),
            grpid: field32(seq, 3).into(),
            code: field32(seq, 4).into(),
            cookie: field32(seq, 5).into(),
            mark: 0.into(),
        }
    }
}

impl Numbered for FaultRecord {
    fn numbered(seq: u32) -> Self {
        Self {
            fault_type: field32(seq, 0).into(),
            cookie: field32(seq, 1).into(),
            word2: field32(seq, 2).into(),
            word3: field32(seq, 3).into(),
            word4: field32(seq, 4).into(),
            perm: field32(seq, 5).into(),
            addr: field64(seq, 6).into(),
            data0: field64(seq, 7).into(),
            data1: field64(seq, 8).into(),
            reserved: field64(seq, 9).into(),
            mark: 0.into(),
        }
    }
}

/// Asserts that the `expected`-th record the consumer got is exactly record `expected`: not
/// torn, not stale (a slot's previous record or a never-written slot), not skipped, not
/// duplicated, not out of order.
fn assert_is_record<E: Numbered>(got: &E, expected: u32) {
    assert_eq!(
        *got,
        E::numbered(expected),
        "record {expected} is torn, stale, missing or out of order"
    );
}

/// Stages records `seqs` as one batch, spinning (with a loom yield) while the ring is full.
fn stage_batch<E: Numbered>(p: &mut RingProducer<E, Memory>, seqs: core::ops::Range<u32>) {
    loop {
        match p.stage_exact(seqs.clone().map(E::numbered)) {
            Ok(()) => return,
            Err(PushError::Full) => thread::yield_now(),
            Err(e) => panic!("honest consumer broke the ring: {e}"),
        }
    }
}

/// Producer publishes `total` records in batches of `batch` into a ring of 2, consumer drains up
/// to `max` at a time, both spinning (yielding) on a full or empty ring; the consumer checks
/// every record.
fn transfer<E: Numbered>(
    bound: Option<usize>,
    kind: QueueKind,
    total: u32,
    batch: u32,
    max: usize,
) {
    model(bound, move || {
        let memory = memory(kind, 2);
        let mut p = RingProducer::<E, _>::new(memory.clone());
        let mut c = RingConsumer::<E, _>::new(memory);

        let producer = thread::spawn(move || {
            let mut seq = 0;
            while seq < total {
                let end = (seq + batch).min(total);
                stage_batch(&mut p, seq..end);
                assert_eq!(p.publish().unwrap().records, end - seq);
                seq = end;
            }
        });

        let mut next = 0;
        while next < total {
            let n = c
                .drain(max, |r| {
                    assert_is_record(&r, next);
                    next += 1;
                })
                .unwrap();
            if n == 0 {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
        // Nothing beyond the last record: the consumer never ran ahead of `prod`.
        assert_eq!(c.refresh(), Ok(0));
        assert_eq!(c.cons(), total);
    });
}

/// Hazard: the consumer reads a slot whose words are only partly written, or still hold the
/// slot's previous record, because it saw the mark before the slot writes; or the producer
/// rewrites a slot the consumer is still reading because it saw `cons` move before the reads
/// finished. Three records through two slots, one publication per record: record 2 reuses slot
/// 0, so both directions of the handshake are exercised.
///
/// Proves **P1** (every record read after an Acquire of its mark is whole and current, against
/// every stale value a relaxed slot load may return; see
/// `checker_finds_a_stale_slot_without_release_acquire`) and **C1**'s index logic (the
/// producer's reuse of slot 0 never lands in the consumer's read of record 0, in any
/// interleaving; C1's ordering is beyond loom, see the file's header).
#[test]
fn published_records_are_never_torn() {
    transfer::<ResponseRecord>(EXHAUSTIVE, QueueKind::Response, 3, 1, usize::MAX);
}

/// As [`published_records_are_never_torn`], four records: two full laps, so both slots are
/// reused, each while the consumer may still be reading the other. Proves **P1** and **C1**
/// with the indices wrapping the ring twice (preemption-bounded: 4).
#[test]
fn published_records_are_never_torn_over_two_laps() {
    transfer::<ResponseRecord>(LARGE, QueueKind::Response, 4, 1, usize::MAX);
}

/// Hazard: with a batch publication (two marks, the first stored last) and a consumer that
/// returns one slot at a time, the consumer could read a slot whose mark is not there yet, or
/// the producer, refilling slot 0 as soon as `cons` moves past it, could overwrite slot 1 while
/// the consumer still reads it. 64-byte records (8 words) give the producer the most room to
/// be caught mid-slot.
///
/// Proves **P1** for a multi-record publication, **C1**'s index logic per returned slot (ring
/// full: the third record waits for exactly one freed slot), and that the consumer never reads
/// a record before its mark (it would find a zeroed or stale slot).
#[test]
fn batched_records_are_never_read_past_prod_or_while_rewritten() {
    transfer::<FaultRecord>(EXHAUSTIVE, QueueKind::Fault, 3, 2, 1);
}

/// Hazard: a hostile producer rewrites a slot it has published while the consumer reads it
/// (the torn slot an honest producer never makes, C1). The rewrite is what a peer on x86 does
/// in effect: a new mark, then the new body, in order (modelled as a Release fence between
/// them). The consumer must hand over record 0 whole, or nothing and a typed error
/// ([`RingError::Torn`], or [`RingError::Mark`] if it saw the new mark first); never a record
/// mixing the two bodies.
///
/// Proves **T** (the Acquire fence and the second mark load after the body).
#[test]
fn a_slot_rewritten_under_the_consumer_is_refused_never_mixed() {
    model(EXHAUSTIVE, || {
        let memory = memory(QueueKind::Response, 2);
        let mut p = RingProducer::<ResponseRecord, _>::new(memory.clone());
        let mut c = RingConsumer::<ResponseRecord, _>::new(memory.clone());
        p.stage(&ResponseRecord::numbered(0)).unwrap();
        p.publish().unwrap();

        let liar = thread::spawn(move || {
            let words = memory.entry_words();
            let forged = ResponseRecord::numbered(1);
            let body: [u64; 4] = zerocopy::transmute!(forged);
            words[3].store(0xbad, Ordering::Relaxed);
            fence(Ordering::Release);
            for (cell, word) in words.iter().zip(body).take(3) {
                cell.store(word, Ordering::Relaxed);
            }
        });

        let mut got = None;
        match c.drain(1, |r| got = Some(r)) {
            Ok(1) => assert_is_record(&got.unwrap(), 0),
            Ok(n) => panic!("drained {n} records from one slot"),
            Err(
                RingError::Torn {
                    index: 0,
                    found: 0xbad,
                }
                | RingError::Mark {
                    index: 0,
                    found: 0xbad,
                },
            ) => {
                assert!(got.is_none(), "a refused record was handed over");
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        liar.join().unwrap();
    });
}

/// The eventfd doorbell: `ring` adds to the count and notifies; `wait` blocks while it is 0,
/// then resets it (a blocking `read` of an eventfd).
struct Doorbell {
    count: Mutex<u64>,
    rung: Condvar,
}

impl Doorbell {
    fn new() -> Self {
        Self {
            count: Mutex::new(0),
            rung: Condvar::new(),
        }
    }

    fn ring(&self) {
        *self.count.lock().unwrap() += 1;
        self.rung.notify_one();
    }

    fn wait(&self) {
        let mut count = self.count.lock().unwrap();
        while *count == 0 {
            count = self.rung.wait(count).unwrap();
        }
        *count = 0;
    }
}

/// The real producer and consumer with a doorbell: the consumer drains, and sleeps on the
/// doorbell when `prepare_to_sleep` says so; the producer publishes `total` records in batches
/// of `batch` and rings the doorbell only when `publish` says `kick`. A lost wake-up leaves
/// the consumer blocked forever, which loom reports as a deadlock. Fails too if no execution
/// put the consumer to sleep (a model that never sleeps proves nothing about wake-ups).
fn wakeup<E: Numbered>(bound: Option<usize>, kind: QueueKind, total: u32, batch: u32) {
    // Executions in which the consumer blocked on the doorbell (std atomic: outside the model).
    let slept = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slept_in_model = slept.clone();
    model(bound, move || {
        let memory = memory(kind, 2);
        let mut p = RingProducer::<E, _>::new(memory.clone());
        let mut c = RingConsumer::<E, _>::new(memory);
        let bell = Arc::new(Doorbell::new());

        let producer = {
            let bell = bell.clone();
            thread::spawn(move || {
                let mut seq = 0;
                while seq < total {
                    let end = (seq + batch).min(total);
                    stage_batch(&mut p, seq..end);
                    if p.publish().unwrap().kick {
                        bell.ring();
                    }
                    seq = end;
                }
            })
        };

        let mut next = 0;
        loop {
            c.drain(usize::MAX, |r| {
                assert_is_record(&r, next);
                next += 1;
            })
            .unwrap();
            if next == total {
                break;
            }
            if c.prepare_to_sleep().unwrap() {
                slept_in_model.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                bell.wait();
                c.woke();
            }
        }
        producer.join().unwrap();
    });
    assert!(
        slept.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no execution put the consumer to sleep"
    );
}

/// Hazard: the lost wake-up (store buffering). The consumer stores `NEED_WAKEUP` and re-reads
/// its next slot's mark while the producer stores that mark and reads `NEED_WAKEUP`; if both
/// loads could return
/// the old values, the consumer would sleep on a record nobody kicks for.
///
/// Proves **W** on the response queue (consumer flags in the host page), one record.
#[test]
fn no_lost_wakeup_one_record() {
    wakeup::<ResponseRecord>(EXHAUSTIVE, QueueKind::Response, 1, 1);
}

/// As [`no_lost_wakeup_one_record`], on the fault queue (consumer flags in the VMM page), two
/// publications: the consumer may sleep before either, and a kick for the first may be
/// consumed by a sleep that the second must then end. Proves **W** across repeated
/// sleep/wake rounds, and that `woke` clearing the flag never hides the next kick.
#[test]
fn no_lost_wakeup_two_records() {
    wakeup::<FaultRecord>(EXHAUSTIVE, QueueKind::Fault, 2, 1);
}

/// As [`no_lost_wakeup_one_record`], two records in one publication (two marks, the polled one
/// last, one kick decision). Proves **W** for a batch.
#[test]
fn no_lost_wakeup_batch() {
    wakeup::<ResponseRecord>(EXHAUSTIVE, QueueKind::Response, 2, 2);
}

/// As [`no_lost_wakeup_two_records`], three records through two slots: the producer fills the
/// ring and waits for a slot (spinning) while the consumer drains, sleeps and wakes. Proves
/// **W** when publications interleave with slot reuse, and that a producer waiting for room
/// never strands a sleeping consumer (preemption-bounded: 4).
#[test]
fn no_lost_wakeup_with_a_full_ring() {
    wakeup::<ResponseRecord>(LARGE, QueueKind::Response, 3, 1);
}

/// A copy of the W handshake, one record, with or without its two SeqCst fences: the consumer
/// checks the mark, stores the flag, (fence), re-checks the mark, then sleeps; the producer
/// stores the mark (Release), (fence), loads the flag and kicks if it is set.
fn handshake_copy(fenced: bool) {
    model(EXHAUSTIVE, move || {
        let mark = Arc::new(AtomicU64::new(0));
        let flag = Arc::new(AtomicU32::new(0));
        let bell = Arc::new(Doorbell::new());

        let producer = {
            let (mark, flag, bell) = (mark.clone(), flag.clone(), bell.clone());
            thread::spawn(move || {
                mark.store(iopf_abi::mark(0), Ordering::Release);
                if fenced {
                    fence(Ordering::SeqCst);
                }
                if flag.load(Ordering::Relaxed) != 0 {
                    bell.ring();
                }
            })
        };

        while mark.load(Ordering::Acquire) == 0 {
            flag.store(1, Ordering::Relaxed);
            if fenced {
                fence(Ordering::SeqCst);
            }
            if mark.load(Ordering::Acquire) == 0 {
                bell.wait();
            }
            flag.store(0, Ordering::Relaxed);
        }
        producer.join().unwrap();
    });
}

/// Control for the negative control below: the copy of the handshake, fences in, passes, so
/// the copy is faithful and only the fences differ.
#[test]
fn fenced_copy_of_the_wakeup_handshake_never_loses_a_wakeup() {
    handshake_copy(true);
}

/// Negative control for **W**: the same handshake without the fences loses the wake-up
/// (both loads read the old value, store buffering), and loom must say so (deadlock). This
/// shows the `no_lost_wakeup_*` models would catch a missing fence in `ring.rs`.
#[test]
fn checker_finds_the_lost_wakeup_without_fences() {
    let found = std::panic::catch_unwind(|| handshake_copy(false));
    let payload = found.expect_err("loom missed the lost wake-up of the fence-less handshake");
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert!(
        message.contains("deadlock"),
        "unexpected failure: {message}"
    );
}

/// Negative control for **P1**: a one-slot copy of the publication with the mark stored and
/// loaded Relaxed. Loom must find the consumer reading a slot word that is still 0 after it
/// saw the mark, the stale read `published_records_are_never_torn` would catch.
#[test]
fn checker_finds_a_stale_slot_without_release_acquire() {
    let found = std::panic::catch_unwind(|| {
        model(EXHAUSTIVE, || {
            let slot = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
            let producer = {
                let slot = slot.clone();
                thread::spawn(move || {
                    slot[0].store(field64(0, 0), Ordering::Relaxed);
                    slot[1].store(field64(0, 1), Ordering::Relaxed);
                    slot[2].store(iopf_abi::mark(0), Ordering::Relaxed);
                })
            };
            if slot[2].load(Ordering::Relaxed) == iopf_abi::mark(0) {
                let words = [
                    slot[0].load(Ordering::Relaxed),
                    slot[1].load(Ordering::Relaxed),
                ];
                assert_eq!(words, [field64(0, 0), field64(0, 1)], "stale slot");
            }
            producer.join().unwrap();
        });
    });
    let payload = found.expect_err("loom missed the stale slot of the relaxed publication");
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .unwrap_or_default();
    assert!(
        message.contains("stale slot"),
        "unexpected failure: {message}"
    );
}
