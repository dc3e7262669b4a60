//! The iopf host: each simulated PCIe endpoint runs in real time against the fault core, and
//! (with the vfio-user layer) is served to a VMM process that owns its guest memory and page
//! tables.
#![deny(missing_docs)]

pub mod engine;
