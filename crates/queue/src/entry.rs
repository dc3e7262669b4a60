//! The records a ring carries, and how they move between a record and its slot's words.

use iopf_abi::{FaultRecord, QueueKind, ResponseRecord};
use zerocopy::little_endian::U64;

use crate::sync::{AtomicU64, Ordering};

/// Keeps [`Entry`] sealed: only the ABI's two record types live in a ring slot.
mod sealed {
    /// The private supertrait of [`Entry`](super::Entry); nothing outside this crate can name
    /// it, so nothing outside can implement `Entry`.
    pub trait Sealed {}
}

/// A record type that lives in a ring slot.
///
/// The trait is sealed: it is implemented for [`FaultRecord`] and [`ResponseRecord`] only, the
/// two record types whose layout `docs/ABI.md` fixes.
///
/// Slots are written and read one 64-bit little-endian word at a time with relaxed atomic
/// accesses. The last word of a slot is the record's mark (`iopf_abi::mark`): [`store`] and
/// [`load`] leave it alone (`load` returns it zeroed), and the ring writes it with a release
/// store after the body and acquires it before reading the body.
///
/// Storing straight into the slot matters: building a record on the stack and copying it in
/// costs store-forwarding stalls that make a copy loop about 3x slower (`docs/PERFORMANCE.md`,
/// reference figures).
///
/// [`store`]: Entry::store
/// [`load`]: Entry::load
pub trait Entry: sealed::Sealed + Copy + Sized {
    /// The queue kind that carries this record.
    const KIND: QueueKind;
    /// Words per slot, the mark word (the last) included.
    const WORDS: usize;
    /// Stores the record's body (every word but the mark) into `slot` (exactly `WORDS` words).
    fn store(&self, slot: &[AtomicU64]);
    /// Loads a record's body from `slot` (exactly `WORDS` words), with its mark zeroed. Any
    /// bits make a record.
    fn load(slot: &[AtomicU64]) -> Self;
}

macro_rules! impl_entry {
    ($t:ty, $kind:expr, $words:literal) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $words * 8);

        impl sealed::Sealed for $t {}

        impl Entry for $t {
            const KIND: QueueKind = $kind;
            const WORDS: usize = $words;

            #[inline]
            fn store(&self, slot: &[AtomicU64]) {
                let words: [U64; $words] = zerocopy::transmute!(*self);
                for (cell, word) in slot.iter().zip(words).take($words - 1) {
                    cell.store(word.get(), Ordering::Relaxed);
                }
            }

            #[inline]
            fn load(slot: &[AtomicU64]) -> Self {
                let mut words = [U64::ZERO; $words];
                for (word, cell) in words.iter_mut().zip(slot).take($words - 1) {
                    *word = U64::new(cell.load(Ordering::Relaxed));
                }
                zerocopy::transmute!(words)
            }
        }
    };
}

impl_entry!(FaultRecord, QueueKind::Fault, 8);
impl_entry!(ResponseRecord, QueueKind::Response, 4);
