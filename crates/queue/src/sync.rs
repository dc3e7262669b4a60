//! The atomics the rings use, in one place, so that the same ring code runs on `std`'s atomics
//! and, built with `--cfg loom`, under the loom model checker (which explores every
//! interleaving and every weak-memory outcome the C++20 model allows).

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering, fence};

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering, fence};
