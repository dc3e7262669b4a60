//! The Linux kernel's iommufd fault queue as an iopf fault channel (`docs/DESIGN.md` §7).
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

use iommufd_bindings::iommufd::{
    iommu_hwpt_alloc, iommu_ioas_alloc, iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID,
};
use iommufd_ioctls::IommuFd;

pub use error::KernelError;
pub use fault_file::{FAULT_RECORD_SIZE, FaultFile, KernelFault, KernelResponse, RESPONSE_SIZE};
pub use queue::{FaultFileOps, KernelFaultQueue, KernelQueueStats, MAX_GROUP_RECORDS};

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

    /// Allocates an I/O address space (`IOMMU_IOAS_ALLOC`); returns its id.
    pub fn alloc_ioas(&self) -> Result<u32, KernelError> {
        let mut ioas = iommu_ioas_alloc {
            size: size_of::<iommu_ioas_alloc>() as u32,
            flags: 0,
            out_ioas_id: 0,
        };
        self.ioctls
            .alloc_iommu_ioas(&mut ioas)
            .map_err(|e| KernelError::Ioctl {
                what: "IOMMU_IOAS_ALLOC",
                source: sys_error(e),
            })?;
        Ok(ioas.out_ioas_id)
    }

    /// Allocates a page table over IOAS `ioas_id` for device `dev_id` that can be the parent
    /// of nested page tables (`IOMMU_HWPT_ALLOC_NEST_PARENT`); returns its id.
    pub fn alloc_nest_parent_hwpt(&self, dev_id: u32, ioas_id: u32) -> Result<u32, KernelError> {
        self.alloc_hwpt_with(hwpt_request(
            dev_id,
            ioas_id,
            iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT,
            0,
            None,
            0,
        ))
    }

    /// Allocates a nested page table on `parent_id` for device `dev_id` whose faults go to the
    /// fault queue `fault_id` (`IOMMU_HWPT_FAULT_ID_VALID`). `data_type` and `data` are the
    /// IOMMU-specific stage-1 description (`enum iommu_hwpt_data_type`: VT-d, SMMUv3, or the
    /// self-test's). Returns the page table's id.
    pub fn alloc_nested_hwpt_with_faults(
        &self,
        dev_id: u32,
        parent_id: u32,
        fault_id: u32,
        data_type: u32,
        data: &[u8],
    ) -> Result<u32, KernelError> {
        // `data` outlives the ioctl: it is borrowed for this whole call.
        self.alloc_hwpt_with(hwpt_request(
            dev_id,
            parent_id,
            iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID,
            fault_id,
            Some(data),
            data_type,
        ))
    }

    /// `IOMMU_HWPT_ALLOC` of a filled-in request; returns the new page table's id.
    fn alloc_hwpt_with(&self, mut alloc: iommu_hwpt_alloc) -> Result<u32, KernelError> {
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

/// An `IOMMU_HWPT_ALLOC` request. `data`, if any, must stay alive until the ioctl returns
/// (the kernel reads it through `data_uptr`).
fn hwpt_request(
    dev_id: u32,
    pt_id: u32,
    flags: u32,
    fault_id: u32,
    data: Option<&[u8]>,
    data_type: u32,
) -> iommu_hwpt_alloc {
    let (data_type, data_len, data_uptr) = match data {
        Some(d) => (
            data_type,
            u32::try_from(d.len()).unwrap_or(u32::MAX),
            d.as_ptr() as u64,
        ),
        None => (0, 0, 0),
    };
    iommu_hwpt_alloc {
        size: size_of::<iommu_hwpt_alloc>() as u32,
        flags,
        dev_id,
        pt_id,
        out_hwpt_id: 0,
        __reserved: 0,
        data_type,
        data_len,
        data_uptr,
        fault_id,
        __reserved2: 0,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nested_hwpt_request_carries_the_fault_id_and_the_stage1_data() {
        let data = 0x0bad_beefu32.to_ne_bytes();
        let a = hwpt_request(3, 4, 4, 9, Some(&data), 0xdead);
        assert_eq!(a.size, 48);
        assert_eq!((a.dev_id, a.pt_id, a.flags, a.fault_id), (3, 4, 4, 9));
        assert_eq!((a.data_type, a.data_len), (0xdead, 4));
        assert_eq!(a.data_uptr, data.as_ptr() as u64);
        let parent = hwpt_request(3, 1, 1, 0, None, 0xdead);
        assert_eq!(
            (parent.data_type, parent.data_len, parent.data_uptr),
            (0, 0, 0)
        );
    }
}
