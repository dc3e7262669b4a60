//! The shared-memory fault and response queues of iopf (ABI v1, `docs/ABI.md`).
//!
//! A queue region is a sealed memfd holding a host page, a VMM page and a ring of entries.
//! The host creates the regions and hands their fds to the VMM, which attaches
//! [from the fd alone](QueueRegion::attach). Records flow through a single-producer
//! single-consumer ring ([`ring`]) published with release/acquire ordering; a consumer that
//! sleeps says so with `NEED_WAKEUP`, and the producer rings its eventfd [`Doorbell`] only
//! then.
//!
//! | queue | producer | consumer |
//! |---|---|---|
//! | fault | [`FaultQueueProducer`] (host) | [`FaultQueueConsumer`] (VMM) |
//! | response | [`ResponseQueueProducer`] (VMM) | [`ResponseQueueConsumer`] (host) |
//!
//! A VMM reads faults and sends responses through the [`FaultChannel`] trait, which these
//! queues implement ([`SharedMemoryChannel`]) as does the kernel's iommufd fault queue
//! (crate `iopf-iommufd`).
//!
//! Each side keeps its indices in private memory and validates every index it reads from the
//! other side: a peer that writes garbage breaks its own queue ([`RingError`]), and
//! nothing else.
//!
//! The only `unsafe` code is the shared mapping of a region (module `mapping`); every other
//! module is denied it.
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

#[cfg(not(loom))]
pub use channel::{ChannelError, ChannelFault, FaultChannel, SharedMemoryChannel};
#[cfg(not(loom))]
pub use doorbell::Doorbell;
#[cfg(not(loom))]
pub use endpoint::{DEFAULT_SPIN, QueueError, Receiver, Sender};
#[cfg(not(loom))]
pub use fault_queue::{FaultQueueConsumer, FaultQueueProducer, Staged};
#[cfg(not(loom))]
pub use region::{AttachError, QueueRegion, REQUIRED_SEALS};
#[cfg(not(loom))]
pub use response_queue::{ResponseQueueConsumer, ResponseQueueProducer};
#[cfg(not(loom))]
pub use shared_memory::{GUEST_MEMORY_SEALS, SharedMemory};
