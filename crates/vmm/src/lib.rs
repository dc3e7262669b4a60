#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod attach;
mod device;
mod event_loop;
mod viommu;

/// The guide to embedding iopf in a VMM (`docs/EMBEDDING.md`); its examples are compiled here.
#[doc = include_str!("../../../docs/EMBEDDING.md")]
pub mod embedding {}

pub use attach::{
    AttachError, attach_channel, device_number, host_finished, map_guest_memory,
    set_pasid_directory,
};
pub use device::{
    BACKLOG_RETRY, Device, DeviceStats, OUTBOX_LIMIT, READ_BATCH, RespondError, Responder, VmmError,
};
pub use event_loop::{DeviceKey, EventLoop, EventLoopError, Failed, Round};
pub use viommu::{Assembled, GroupAssembler, GroupToken, PageRequestGroup, Viommu};
