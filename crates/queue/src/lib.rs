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
//! Each side keeps its indices in private memory and validates every index it reads from the
//! other side: a peer that writes garbage breaks its own queue ([`ProtocolError`]), and
//! nothing else.
#![deny(missing_docs)]

mod doorbell;
mod endpoint;
mod entry;
mod fault_queue;
pub mod fdpass;
mod mapping;
mod memory;
mod region;
mod response_queue;
pub mod ring;
mod sync;

pub use doorbell::Doorbell;
pub use endpoint::{DEFAULT_SPIN, QueueError, Receiver, Sender};
pub use entry::Entry;
pub use fault_queue::{FaultQueueConsumer, FaultQueueProducer, Staged};
pub use memory::{HeapMemory, HostPage, QueueMemory, VmmPage};
pub use region::{AttachError, QueueRegion, REQUIRED_SEALS};
pub use response_queue::{ResponseQueueConsumer, ResponseQueueProducer};
pub use ring::{ProtocolError, Published, PushError, RingConsumer, RingProducer};
