#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod engine;
pub mod host;
pub mod metrics;
pub mod pci;
pub mod socket;

pub use host::{DeviceSummary, Host, HostConfig, HostReport};
pub use socket::{BindError, SocketGuard};
