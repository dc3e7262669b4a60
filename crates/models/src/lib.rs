//! The models that make the faults real without hardware (`docs/DESIGN.md` §5): a software
//! IOMMU with per (device, PASID) page tables (flat, or nested in guest memory), a PCIe
//! endpoint with ATS/PRI doing DMA into guest memory that is checked byte by byte, a guest that
//! answers page requests, DMA workloads, and the seeded randomness they draw from.
//!
//! They know nothing of the fault core; the deterministic world that runs them with it is
//! `iopf-sim`, and the live host and VMM processes use them directly.
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
