//! The Linux kernel's iommufd fault queue as an iopf fault channel (DESIGN.md §7).
//!
//! On real hardware a VMM gets I/O page faults from the kernel: it allocates a fault queue
//! (`IOMMU_FAULT_QUEUE_ALLOC`), names it when it allocates a nested page table
//! (`IOMMU_HWPT_FAULT_ID_VALID`), reads whole groups of `struct iommu_hwpt_pgfault` from the
//! queue's file and writes `struct iommu_hwpt_page_response` back. This crate does that:
//!
//! - [`Iommufd`]: `/dev/iommu` (IOAS and page table allocation through `iommufd-ioctls`, the
//!   fault queue ioctl through our own [`sys`](crate) module);
//! - [`FaultFile`]: the queue's file with the kernel's exact semantics (whole groups per read,
//!   partial progress on write), for tools and for checking the kernel itself;
//! - [`KernelFaultQueue`]: the [`FaultChannel`](iopf_queue::FaultChannel) a VMM uses, the same
//!   trait as the shared-memory queue. It converts kernel records to ABI v1 and back, and
//!   closes the kernel's cookie weakness: the kernel reuses a cookie as soon as its group is
//!   answered, so a late answer could reach a new group. Here each group gets its own cookie,
//!   never reused while pending, and a response is written to the kernel only while the group
//!   it answers is still the one holding the kernel's cookie;
//! - [`selftest`]: the mock device of `CONFIG_IOMMUFD_TEST`, which raises faults on demand.
//!
//! The crate `iopf-kernel-check` proves it against a real kernel under QEMU; `docs/KERNEL.md`
//! says how to run it and what it proves.
#![deny(missing_docs)]

mod error;
mod fault_file;
mod queue;
pub mod selftest;
mod sys;

use std::io;
use std::os::fd::OwnedFd;

use iommufd_bindings::iommufd::iommu_hwpt_alloc;
use iommufd_ioctls::IommuFd;

pub use error::KernelError;
pub use fault_file::{FAULT_RECORD_SIZE, FaultFile, KernelFault, KernelResponse, RESPONSE_SIZE};
pub use queue::{KernelFaultQueue, KernelQueueStats, MAX_GROUP_RECORDS};

/// An open `/dev/iommu`.
pub struct Iommufd {
    ioctls: IommuFd,
}

impl std::fmt::Debug for Iommufd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::fd::AsRawFd;
        f.debug_struct("Iommufd")
            .field("fd", &self.ioctls.as_raw_fd())
            .finish()
    }
}

impl Iommufd {
    /// Opens `/dev/iommu`.
    pub fn open() -> Result<Self, KernelError> {
        let ioctls = IommuFd::new().map_err(|e| {
            KernelError::Open(match e {
                iommufd_ioctls::IommufdError::OpenIommufd(e) => e,
                other => io::Error::other(other.to_string()),
            })
        })?;
        Ok(Self { ioctls })
    }

    /// The `iommufd-ioctls` handle (IOAS, page tables, vIOMMU).
    pub fn ioctls(&self) -> &IommuFd {
        &self.ioctls
    }

    /// Allocates a fault queue (`IOMMU_FAULT_QUEUE_ALLOC`): its object id and its file.
    pub fn alloc_fault_queue(&self) -> Result<(u32, FaultFile), KernelError> {
        let (id, fd): (u32, OwnedFd) =
            sys::fault_queue_alloc(&self.ioctls).map_err(|source| KernelError::Ioctl {
                what: "IOMMU_FAULT_QUEUE_ALLOC",
                source,
            })?;
        Ok((id, FaultFile::new(fd)))
    }

    /// `IOMMU_HWPT_ALLOC` of a filled-in request; returns the new page table's id.
    pub(crate) fn alloc_hwpt_with(&self, mut alloc: iommu_hwpt_alloc) -> Result<u32, KernelError> {
        self.ioctls
            .alloc_iommu_hwpt(&mut alloc)
            .map_err(|e| KernelError::Ioctl {
                what: "IOMMU_HWPT_ALLOC",
                source: sys_error(e),
            })?;
        Ok(alloc.out_hwpt_id)
    }

    /// Destroys an iommufd object (`IOMMU_DESTROY`).
    pub fn destroy(&self, id: u32) -> Result<(), KernelError> {
        self.ioctls
            .destroy_iommu_object(id)
            .map_err(|e| KernelError::Ioctl {
                what: "IOMMU_DESTROY",
                source: sys_error(e),
            })
    }
}

/// The OS error inside an `iommufd-ioctls` error, so that callers can match on errno.
fn sys_error(e: iommufd_ioctls::IommufdError) -> io::Error {
    use iommufd_ioctls::IommufdError as E;
    match e {
        E::IommuDestroy(s) | E::IommuIoasAlloc(s) | E::IommuHwptAlloc(s) => {
            io::Error::from_raw_os_error(s.errno())
        }
        E::OpenIommufd(e) => e,
        other => io::Error::other(other.to_string()),
    }
}
