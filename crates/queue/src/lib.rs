#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![deny(missing_docs)]

// The protocol core: pure code over atomics, also built under `--cfg loom`.
mod entry;
mod memory;
pub mod ring;
mod sync;

pub use entry::Entry;
pub use memory::{HeapMemory, HostPage, QueueMemory, VmmPage};
pub use ring::{Published, PushError, RingConsumer, RingError, RingProducer};

// The OS side (memfd, mmap, eventfd, SCM_RIGHTS) and the queues built on it: real memory and
// real syscalls, which the loom model has no use for.
#[cfg(not(loom))]
mod channel;
#[cfg(not(loom))]
mod doorbell;
#[cfg(not(loom))]
mod endpoint;
#[cfg(not(loom))]
mod fault_queue;
#[cfg(not(loom))]
pub mod fdpass;
// The shared mapping of a region: `mmap`, `munmap` and the views of the mapped pages.
#[cfg(not(loom))]
#[allow(unsafe_code)]
mod mapping;
#[cfg(not(loom))]
mod region;
#[cfg(not(loom))]
mod response_queue;
#[cfg(not(loom))]
mod shared_memory;

#[cfg(test)]
#[cfg(not(loom))]
mod test_support;

#[cfg(not(loom))]
pub use channel::{ChannelError, ChannelFault, FaultChannel, SharedMemoryChannel};
#[cfg(not(loom))]
pub use doorbell::Doorbell;
#[cfg(not(loom))]
pub use endpoint::{DEFAULT_SPIN, QueueError, Receiver, Sender};
#[cfg(not(loom))]
pub use fault_queue::{FaultQueueConsumer, FaultQueueProducer, Staged};
#[cfg(not(loom))]
pub use region::{QueueRegion, REQUIRED_SEALS, RegionAttachError};
#[cfg(not(loom))]
pub use response_queue::{ResponseQueueConsumer, ResponseQueueProducer};
#[cfg(not(loom))]
pub use shared_memory::{GUEST_MEMORY_SEALS, SharedMemory};
