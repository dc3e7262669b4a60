#![doc = include_str!("../README.md")]
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod error;
mod fault;
mod ids;
mod region;
mod response;

pub use error::{DecodeError, RegionError};
pub use fault::{
    FAULT_TYPE_PAGE_REQUEST, FAULT_TYPE_UNRECOVERABLE, Fault, FaultReason, FaultRecord,
    PageRequest, Perm, UnrecoverableFault, page_request_flags, unrecoverable_flags,
};
pub use ids::{Cookie, PageAddr, Pasid, PrgIndex};
pub use region::{
    ENTRIES_OFFSET, FLAG_NEED_WAKEUP, HOST_FLAG_LIVE, HOST_FLAGS_ALL, HOST_PAGE_OFFSET,
    HostPageHeader, INDEX_OFFSET, MARK_VALID, MAX_ENTRIES, MIN_ENTRIES, PAGE_SIZE, QueueGeometry,
    QueueKind, REGION_MAGIC, REGION_VERSION, VMM_ABI, VMM_FLAGS_ALL, VMM_PAGE_OFFSET,
    VmmPageHeader, mark,
};
pub use response::{
    PageResponse, RESPONSE_PASID_VALID, RESPONSE_VERSION, ResponseCode, ResponseRecord,
};

/// Nanoseconds on a monotonic clock: the one time unit of iopf (response deadlines in the fault
/// core, latencies in the models and the simulation).
pub type Nanos = u64;
