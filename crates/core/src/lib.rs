#![doc = include_str!("../README.md")]
//!
//! ## Guarantees
//!
//! The guarantees, each tested in `tests/`:
//!
//! 1. every page request group gets exactly one response: from the guest, or from the host
//!    (no handler, no consumer, queue full, too many pending, unregister, VMM gone, broken
//!    queue, timeout, device reset);
//! 2. a response reaches a device only if its cookie was issued for that device and is still
//!    pending; cookies come from a per-device monotonic counter that survives unregister and
//!    register, so a response from an earlier life never matches, even for a reused PRG index;
//! 3. [`FaultCore::unregister`] never fails and never waits on the VMM;
//! 4. page requests are never dropped silently; unrecoverable faults may be, and are counted.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod chain;
mod clock;
mod counters;
mod device;
mod fault_core;
mod handler;
mod pending;
mod ratelimit;
mod types;

pub use chain::ErrorChain;
pub use clock::{Clock, ManualClock, MonotonicClock, Nanos};
pub use counters::{AutoResponses, CodeCounts, DeviceCounters, Refusals, Responses};
pub use fault_core::{CoreError, FaultCore};
pub use handler::{FaultHandler, QueueHandler, StageError, Wake};
pub use types::{
    AutoReason, DeviceConfig, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, DeviceSink,
    Refusal, ResponseSource,
};
