//! The iopf host: each simulated PCIe endpoint runs in real time against the fault core and is
//! served over vfio-user to a VMM process that owns its guest memory and page tables.
//!
//! | module | job |
//! |---|---|
//! | [`engine`] | one device's endpoint model in real time, with the guest-owned IOMMU tables |
//! | [`pci`] | the PCI device a VMM sees: registers, config space, fault regions, fault IRQ |
//! | [`host`] | the devices, the socket, one thread per VMM connection |
//! | [`metrics`] | what an operator watches: OpenMetrics over HTTP, a JSON stats socket |
//! | [`socket`] | binding the host's socket without removing what is not ours, and removing it |
#![deny(missing_docs)]

pub mod engine;
pub mod host;
pub mod metrics;
pub mod pci;
pub mod socket;

pub use host::{DeviceSummary, Host, HostConfig, HostReport};
pub use socket::{BindError, SocketGuard};
