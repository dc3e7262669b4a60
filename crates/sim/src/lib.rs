//! The deterministic world of iopf (`docs/DESIGN.md` §5): the models of `iopf-models`
//! (endpoints doing DMA through the IOMMU, guests answering page requests, guest memory checked
//! byte by byte) run with the real fault core and rings in one process, on a virtual clock,
//! driven by one seed, plus the preset configurations the tests and `iopf sim` use.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod vmm_guest;
pub mod world;

pub use world::{Chaos, ChaosEvent, DeviceSpec, SimConfig, SimError, SimReport, run};
