#![doc = include_str!("../README.md")]
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
