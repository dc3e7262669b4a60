//! The kernel's iommufd self-test interface (`CONFIG_IOMMUFD_TEST`): a mock IOMMU and mock
//! devices that raise page requests and vIOMMU events on demand. Defined here from Linux 6.12's
//! and 7.2's `drivers/iommu/iommufd/iommufd_test.h` (no crate carries it; the operations used
//! here have the same numbers and layouts in both), with layout tests.
//!
//! This is what lets the backend be proven against a real kernel without a PRI-capable device:
//! the real-kernel check (crate `iopf-kernel-check`) builds the mock's nested setup and
//! triggers faults with [`MockDevice::trigger_iopf`].
//!
//! Only built with the crate's `selftest` feature (off by default), so that a VMM linking the
//! backend carries no test ioctls. The kernel refuses them anyway (`ENOTTY`) unless it was
//! built with `CONFIG_IOMMUFD_TEST`, which no production kernel is.

use std::io;
use std::sync::Arc;

use iommufd_ioctls::AttachHwpt;
use zerocopy::{Immutable, IntoBytes};

use crate::Iommufd;
use crate::error::KernelError;
use crate::sys;
use crate::test_cmd::TestCmd;

/// `IOMMU_TEST_OP_MOCK_DOMAIN`: a mock device attached to an IOAS.
pub const IOMMU_TEST_OP_MOCK_DOMAIN: u32 = 2;
/// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE`: attach the mock device to another page table.
pub const IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: u32 = 10;
/// `IOMMU_TEST_OP_TRIGGER_IOPF`: the mock device raises a one-page page request group.
pub const IOMMU_TEST_OP_TRIGGER_IOPF: u32 = 15;
/// `IOMMU_TEST_OP_TRIGGER_VEVENT` (Linux 6.15 and later): the mock device's vIOMMU reports a
/// self-test event naming the device's virtual ID.
pub const IOMMU_TEST_OP_TRIGGER_VEVENT: u32 = 17;
/// `IOMMU_VIOMMU_TYPE_SELFTEST`: the mock IOMMU's vIOMMU type.
pub const IOMMU_VIOMMU_TYPE_SELFTEST: u32 = 0xdead_beef;
/// `IOMMU_HWPT_DATA_SELFTEST`: the data type of a mock nested page table.
pub const IOMMU_HWPT_DATA_SELFTEST: u32 = 0xdead;
/// `IOMMU_TEST_IOTLB_DEFAULT`: the mock nested page table's initial IOTLB value.
pub const IOMMU_TEST_IOTLB_DEFAULT: u32 = 0x0bad_beef;

/// What `IOMMU_TEST_OP_TRIGGER_IOPF` asks the mock device to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerIopf {
    /// PASID (0 is "no PASID": the record then has `PASID_VALID` clear).
    pub pasid: u32,
    /// The PRG index.
    pub grpid: u32,
    /// `IOMMU_PGFAULT_PERM_*` bits.
    pub perm: u32,
    /// The faulting address.
    pub addr: u64,
}

/// A mock device of the self-test driver, attached to an IOAS, with the nested page tables the
/// fault path needs: a nesting parent and a nested table that routes faults to a fault queue.
#[derive(Debug)]
pub struct MockDevice {
    /// The self-test device object (target of replace and trigger).
    pub stdev_id: u32,
    /// The iommufd device object id: the `dev_id` of the fault records.
    pub idev_id: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// The page table the device was first attached to (the IOAS's automatic domain).
    pub initial_hwpt_id: u32,
    /// The nesting parent page table.
    pub parent_hwpt_id: u32,
}

impl MockDevice {
    /// Allocates an IOAS and attaches a new mock device to it, then a nesting parent page
    /// table over the IOAS.
    pub fn new(iommufd: &Iommufd) -> Result<Self, KernelError> {
        let ioas_id = iommufd.alloc_ioas()?;
        Self::on_ioas(iommufd, ioas_id)
    }

    /// Attaches a new mock device to the existing IOAS `ioas_id` (one the VMM allocated on the
    /// same iommufd, for instance), then allocates a nesting parent page table over it.
    pub fn on_ioas(iommufd: &Iommufd, ioas_id: u32) -> Result<Self, KernelError> {
        let mut cmd = TestCmd::new(IOMMU_TEST_OP_MOCK_DOMAIN, ioas_id);
        sys::test_cmd(iommufd.ioctls(), &mut cmd).map_err(|source| KernelError::Ioctl {
            what: "IOMMU_TEST_OP_MOCK_DOMAIN",
            source,
        })?;
        let (stdev_id, initial_hwpt_id, idev_id) = (cmd.word(0), cmd.word(1), cmd.word(2));
        let parent_hwpt_id = iommufd.alloc_nest_parent_hwpt(idev_id, ioas_id)?;
        Ok(Self {
            stdev_id,
            idev_id,
            ioas_id,
            initial_hwpt_id,
            parent_hwpt_id,
        })
    }

    /// A nested page table on the parent whose faults go to the fault queue `fault_id`.
    pub fn alloc_fault_hwpt(&self, iommufd: &Iommufd, fault_id: u32) -> Result<u32, KernelError> {
        let data = HwptSelftest {
            iotlb: IOMMU_TEST_IOTLB_DEFAULT,
        };
        iommufd.alloc_nested_hwpt_with_faults(
            self.idev_id,
            self.parent_hwpt_id,
            fault_id,
            IOMMU_HWPT_DATA_SELFTEST,
            data.as_bytes(),
        )
    }

    /// Attaches the device to page table `hwpt_id` (`IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE`).
    /// Leaving a fault-capable page table makes the kernel answer `INVALID` to every group of
    /// the device still pending in its fault queue.
    pub fn replace(&self, iommufd: &Iommufd, hwpt_id: u32) -> Result<(), KernelError> {
        let mut cmd = TestCmd::new(IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, self.stdev_id);
        cmd.set_words(&[hwpt_id]);
        sys::test_cmd(iommufd.ioctls(), &mut cmd).map_err(|source| KernelError::Ioctl {
            what: "IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE",
            source,
        })
    }

    /// The self-test's stage-1 data of a nested page table (`struct iommu_hwpt_selftest`'s
    /// `iotlb`, which both 6.12 and 7.2 accept).
    pub fn nested_data() -> Vec<u8> {
        HwptSelftest {
            iotlb: IOMMU_TEST_IOTLB_DEFAULT,
        }
        .as_bytes()
        .to_vec()
    }

    /// The device as an [`AttachHwpt`] (what a VMM's VFIO device is): attach is
    /// `MOCK_DOMAIN_REPLACE` onto the page table, detach is `MOCK_DOMAIN_REPLACE` back onto
    /// the IOAS. It keeps a duplicate of `iommufd`'s fd (the same context).
    pub fn attacher(&self, iommufd: &Iommufd) -> Result<Arc<dyn AttachHwpt>, KernelError> {
        Ok(Arc::new(MockAttacher {
            iommufd: Iommufd::dup_from(iommufd)?,
            stdev_id: self.stdev_id,
            ioas_id: self.ioas_id,
        }))
    }

    /// Makes the mock device's vIOMMU report an event (`IOMMU_TEST_OP_TRIGGER_VEVENT`): the
    /// device must be attached to a nested page table of a vIOMMU on which it has a vDevice,
    /// and the vIOMMU must have a self-test vEVENTQ (else `ENOENT` or `EOPNOTSUPP`).
    pub fn trigger_vevent(&self, iommufd: &Iommufd) -> Result<(), KernelError> {
        let mut cmd = TestCmd::new(IOMMU_TEST_OP_TRIGGER_VEVENT, 0);
        cmd.set_words(&[self.idev_id]);
        sys::test_cmd(iommufd.ioctls(), &mut cmd).map_err(|source| KernelError::Ioctl {
            what: "IOMMU_TEST_OP_TRIGGER_VEVENT",
            source,
        })
    }

    /// Makes the mock device raise a page request (`IOMMU_TEST_OP_TRIGGER_IOPF`).
    pub fn trigger_iopf(&self, iommufd: &Iommufd, fault: TriggerIopf) -> Result<(), KernelError> {
        let mut cmd = TestCmd::new(IOMMU_TEST_OP_TRIGGER_IOPF, 0);
        let addr = fault.addr;
        cmd.set_words(&[
            self.idev_id,
            fault.pasid,
            fault.grpid,
            fault.perm,
            addr as u32,
            (addr >> 32) as u32,
        ]);
        sys::test_cmd(iommufd.ioctls(), &mut cmd).map_err(|source| KernelError::Ioctl {
            what: "IOMMU_TEST_OP_TRIGGER_IOPF",
            source,
        })
    }
}

/// A mock device as [`AttachHwpt`] (see [`MockDevice::attacher`]).
#[derive(Debug)]
struct MockAttacher {
    iommufd: Iommufd,
    stdev_id: u32,
    ioas_id: u32,
}

impl MockAttacher {
    fn replace(&self, pt_id: u32) -> io::Result<()> {
        let mut cmd = TestCmd::new(IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, self.stdev_id);
        cmd.set_words(&[pt_id]);
        sys::test_cmd(self.iommufd.ioctls(), &mut cmd)
    }
}

impl AttachHwpt for MockAttacher {
    fn attach_hwpt(&self, pt_id: u32) -> io::Result<()> {
        self.replace(pt_id)
    }

    fn detach_hwpt(&self) -> io::Result<()> {
        self.replace(self.ioas_id)
    }
}

/// The `IOMMU_HWPT_DATA_SELFTEST` payload of a mock nested page table
/// (`struct iommu_hwpt_selftest`).
#[repr(C)]
#[derive(Debug, Clone, Copy, IntoBytes, Immutable)]
pub(crate) struct HwptSelftest {
    pub iotlb: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `trigger_iopf` is `{u32 dev_id, pasid, grpid, perm; u64 addr}` at the union's start.
    #[test]
    fn trigger_iopf_payload_is_laid_out_as_the_kernel_reads_it() {
        let mut cmd = TestCmd::new(IOMMU_TEST_OP_TRIGGER_IOPF, 0);
        let addr: u64 = 0x1234_5678_9abc_d000;
        cmd.set_words(&[7, 1, 2, 3, addr as u32, (addr >> 32) as u32]);
        let bytes = cmd.as_bytes();
        let at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(at(0), 72);
        assert_eq!(at(4), IOMMU_TEST_OP_TRIGGER_IOPF);
        assert_eq!((at(16), at(20), at(24), at(28)), (7, 1, 2, 3));
        assert_eq!(u64::from_ne_bytes(bytes[32..40].try_into().unwrap()), addr);
        assert_eq!(cmd.word(4), addr as u32);
    }
}
