//! What makes the faults real without hardware (`docs/DESIGN.md` §5): a software IOMMU with per
//! (device, PASID) page tables, a PCIe endpoint with ATS/PRI doing DMA into guest memory that
//! is checked byte by byte, a guest that answers page requests, and a deterministic world that
//! runs them with the real fault core and rings, driven by one seed.
#![deny(missing_docs)]

pub mod endpoint;
pub mod guest;
pub mod iommu;
pub mod memory;
pub mod nested;
pub mod rng;
pub mod vmm_guest;
pub mod workload;
pub mod world;

pub use world::{Chaos, ChaosEvent, DeviceSpec, SimConfig, SimError, SimReport, run};

/// The page size of the models (4 KiB, as page requests use).
pub const PAGE_SIZE: u64 = 4096;
