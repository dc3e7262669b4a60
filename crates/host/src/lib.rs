#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod engine;
pub mod host;
pub mod metrics;
pub mod pci;
pub mod reactor;
pub mod socket;

#[cfg(test)]
#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;

pub use host::{DeviceSummary, Host, HostConfig, HostReport};
pub use socket::{BindError, SocketGuard};
