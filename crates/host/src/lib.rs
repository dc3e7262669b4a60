#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod config_space;
pub mod fault_regions;
pub mod metrics;
pub mod reactor;
pub mod socket;

#[cfg(test)]
#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
#[cfg(test)]
mod test_support;

pub use config_space::{ConfigSpace, ConfigSpaceBuilder, ConfigSpaceError};
pub use fault_regions::{FaultPort, FaultRegions, FaultRegionsError};
pub use socket::{BindError, SocketGuard};
