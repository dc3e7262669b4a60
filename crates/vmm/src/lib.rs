//! The VMM side of iopf, as a library a VMM author can embed: a device's fault queue and
//! response queue, the guest memory it registered with the host, the guest's page tables in
//! it, and the guest that answers page requests.
#![deny(missing_docs)]

mod attach;
mod device;

pub use attach::{
    AttachError, Attached, GuestSetup, attach, attach_with, host_finished, reattach, reattach_with,
    register_memory,
};
pub use device::{VmmDevice, VmmError, VmmStats};
