#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod endpoint;
pub mod guest;
pub mod iommu;
pub mod memory;
pub mod nested;
pub mod rng;
pub mod workload;

/// The page size of the models (4 KiB, as page requests use).
pub const PAGE_SIZE: u64 = 4096;
