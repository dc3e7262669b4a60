#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod engine;
pub mod host;
pub mod pci;

pub use host::{DeviceSummary, Host, HostConfig, HostReport};
pub use iopf_host::socket::BindError;
