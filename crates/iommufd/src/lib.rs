#![doc = include_str!("../README.md")]
//!
//! # On the VMM's iommufd
//!
//! A VMM already holds an iommufd: it has the IOAS and the devices bound to it, and object ids
//! are only meaningful on that file. So the backend is built on the same file, not on a new
//! `/dev/iommu`:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use iopf_iommufd::iommufd_ioctls::{IommuFd, IommufdIoas};
//! use iopf_iommufd::{Iommufd, KernelFaultQueue};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The VMM's own handle (Cloud Hypervisor opens it this way) and an IOAS on it.
//! let vmm = Arc::new(IommuFd::new()?);
//! let ioas = IommufdIoas::new(Arc::clone(&vmm))?;
//!
//! // The backend on the same iommufd (a duplicate of the VMM's fd: same objects).
//! let iommufd = Iommufd::dup_from_ioctls(&vmm)?;
//! # let dev_id = 1; // from VFIO_DEVICE_BIND_IOMMUFD
//! # let (stage1_type, stage1): (u32, &[u8]) = (0, &[]); // the guest's stage-1 table
//! let parent = iommufd.alloc_nest_parent_hwpt(dev_id, ioas.id())?;
//! let (fault_id, file) = iommufd.alloc_fault_queue()?;
//! let hwpt = iommufd.alloc_nested_hwpt_with_faults(dev_id, parent, fault_id, stage1_type, stage1)?;
//! // ... attach the device to `hwpt` (VFIO_DEVICE_ATTACH_IOMMUFD_PT) ...
//! let faults = KernelFaultQueue::new(fault_id, file);
//! // `faults` is the VMM's FaultChannel: poll `faults.file()`, read, respond.
//! # let _ = (hwpt, faults);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
// `unsafe` only in `sys` (the ioctls), which exists for it; every other module is denied it.
#![deny(unsafe_code)]

mod error;
mod fault_file;
mod queue;
#[cfg(feature = "selftest")]
pub mod selftest;
#[allow(unsafe_code)]
mod sys;
#[cfg(feature = "selftest")]
mod test_cmd;
mod vevent;
mod viommu;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use iommufd_bindings::iommufd::{
    iommu_hwpt_alloc, iommu_ioas_alloc, iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID,
};
use iommufd_ioctls::IommuFd;

pub use error::KernelError;
pub use fault_file::{FAULT_RECORD_SIZE, FaultFile, KernelFault, KernelResponse, RESPONSE_SIZE};
/// The `iommufd-ioctls` crate this one is built on (Cloud Hypervisor's wrappers of
/// `/dev/iommu`), so that a VMM can hand over its [`IommuFd`] handle with a matching version.
pub use iommufd_ioctls;
pub use queue::{
    DetachNotifier, FaultFileOps, KernelFaultQueue, KernelQueueStats, MAX_GROUP_RECORDS,
};
pub use vevent::{
    SEQUENCE_MAX, VEVENT_HEADER_SIZE, VEVENTQ_FLAG_LOST_EVENTS, VeventCounts, VeventEntry,
    VeventParseError, VeventParser, VeventType,
};
pub use viommu::{
    Attachment, FaultObject, NestedHwpt, VDevice, VeventQueue, VeventQueueStats, Viommu,
    alloc_fault_object,
};

/// The major number of misc character devices (`MISC_MAJOR`), which `/dev/iommu` is one of.
const MISC_MAJOR: u32 = 10;

/// An open `/dev/iommu`: one iommufd context, whose object ids (IOAS, devices, page tables,
/// fault queues) are meaningful only on this file and its duplicates.
///
/// A VMM builds it on the iommufd it already has ([`from_fd`](Self::from_fd),
/// [`dup_from`](Self::dup_from), [`from_ioctls`](Self::from_ioctls),
/// [`dup_from_ioctls`](Self::dup_from_ioctls)); [`open`](Self::open) opens a new context.
/// It lends its fd through [`AsFd`].
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

    /// Takes over `fd`, an open `/dev/iommu` (the VMM's iommufd, or one received over a
    /// socket). The fd is closed when the `Iommufd` is dropped.
    ///
    /// The fd must be a misc character device, as `/dev/iommu` is; anything else (a regular
    /// file, a socket, `/dev/null`) is refused with [`KernelError::NotIommufd`]. Other misc
    /// devices (`/dev/kvm`, `/dev/fuse`) cannot be told apart without an ioctl and pass; the
    /// first iommufd ioctl on them fails instead.
    ///
    /// ```
    /// use iopf_iommufd::{Iommufd, KernelError};
    ///
    /// let null = std::fs::File::open("/dev/null").unwrap();
    /// let refused = Iommufd::from_fd(null.into()).unwrap_err();
    /// assert!(matches!(refused, KernelError::NotIommufd(_)));
    /// ```
    pub fn from_fd(fd: OwnedFd) -> Result<Self, KernelError> {
        check_iommufd(fd.as_fd())?;
        Ok(Self {
            ioctls: IommuFd::new_from_fd(File::from(fd)),
        })
    }

    /// A backend on the iommufd `fd` refers to, which the caller keeps: `fd` is duplicated
    /// (`F_DUPFD_CLOEXEC`), so both refer to the same context and see the same objects.
    pub fn dup_from(fd: impl AsFd) -> Result<Self, KernelError> {
        let fd = fd.as_fd();
        check_iommufd(fd)?;
        let dup = rustix::io::fcntl_dupfd_cloexec(fd, 0)
            .map_err(|e| KernelError::Dup(io::Error::from(e)))?;
        Ok(Self {
            ioctls: IommuFd::new_from_fd(File::from(dup)),
        })
    }

    /// Takes over an `iommufd-ioctls` handle (which opened `/dev/iommu` or was given its fd).
    pub fn from_ioctls(ioctls: IommuFd) -> Self {
        Self { ioctls }
    }

    /// A backend on the iommufd of an `iommufd-ioctls` handle the VMM keeps (often as
    /// `Arc<IommuFd>`, shared with its `IommufdIoas`): its fd is duplicated, as in
    /// [`dup_from`](Self::dup_from).
    pub fn dup_from_ioctls(ioctls: &IommuFd) -> Result<Self, KernelError> {
        Self::dup_from(sys::borrow_ioctls_fd(ioctls))
    }

    /// The `iommufd-ioctls` handle (IOAS, page tables, vIOMMU).
    pub fn ioctls(&self) -> &IommuFd {
        &self.ioctls
    }

    /// Allocates a fault queue (`IOMMU_FAULT_QUEUE_ALLOC`, Linux 6.11 and later): returns the
    /// fault object's id and its file.
    ///
    /// Name the id as `fault_id` when allocating the device's nested page table
    /// ([`alloc_nested_hwpt_with_faults`](Self::alloc_nested_hwpt_with_faults)); the page
    /// requests of every device attached to that table then queue on the file. Read and
    /// answer them through [`KernelFaultQueue::new`]`(fault_id, file)`, which keeps the
    /// kernel's reusable cookies away from the VMM; the raw [`FaultFile`] is for tools and
    /// checks.
    ///
    /// ```no_run
    /// use iopf_iommufd::{Iommufd, KernelFaultQueue};
    /// use iopf_queue::FaultChannel;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let iommufd = Iommufd::open()?;
    /// let (fault_id, file) = iommufd.alloc_fault_queue()?;
    /// let mut faults = KernelFaultQueue::new(fault_id, file);
    /// // ... a nested page table with `fault_id`, a device attached to it ...
    /// faults.wait(None)?;
    /// faults.read(usize::MAX, &mut |fault| println!("{fault:?}"))?;
    /// # Ok(())
    /// # }
    /// ```
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

impl AsFd for Iommufd {
    /// The iommufd's fd, for the VMM's own ioctls (VFIO binding, IOAS mapping) or epoll.
    fn as_fd(&self) -> BorrowedFd<'_> {
        sys::borrow_ioctls_fd(&self.ioctls)
    }
}

/// Refuses an fd that cannot be `/dev/iommu`: not a misc character device.
fn check_iommufd(fd: BorrowedFd<'_>) -> Result<(), KernelError> {
    let stat = rustix::fs::fstat(fd).map_err(|e| KernelError::NotIommufd(io::Error::from(e)))?;
    let file_type = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    if file_type != rustix::fs::FileType::CharacterDevice {
        return Err(KernelError::NotIommufd(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a {file_type:?}, not a character device"),
        )));
    }
    let major = rustix::fs::major(stat.st_rdev);
    if major != MISC_MAJOR {
        return Err(KernelError::NotIommufd(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("character device of major {major}, not a misc device ({MISC_MAJOR})"),
        )));
    }
    Ok(())
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

    fn refusal(result: Result<Iommufd, KernelError>) -> String {
        match result {
            Err(KernelError::NotIommufd(e)) => e.to_string(),
            other => panic!("expected NotIommufd, got {other:?}"),
        }
    }

    #[test]
    fn an_fd_that_cannot_be_dev_iommu_is_refused_with_what_it_is() {
        let regular = File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
        assert!(refusal(Iommufd::from_fd(regular.into())).contains("not a character device"));
        let null = File::open("/dev/null").unwrap();
        assert!(refusal(Iommufd::from_fd(null.into())).contains("major 1,"));
        let (reader, _writer) = rustix::pipe::pipe().unwrap();
        assert!(refusal(Iommufd::from_fd(reader)).contains("Fifo"));
    }

    /// Each ioctl wrapper returns the kernel's error, and never an id or an fd, when the file is
    /// not `/dev/iommu` (the kernel refuses the command with `ENOTTY`).
    #[test]
    fn every_ioctl_on_a_file_that_is_not_dev_iommu_returns_the_kernels_error() {
        let null = File::open("/dev/null").unwrap();
        let enotty =
            |e: std::io::Error| e.raw_os_error() == Some(rustix::io::Errno::NOTTY.raw_os_error());
        assert!(sys::fault_queue_alloc(&null).is_err_and(enotty));
        assert!(sys::viommu_alloc(&null, 1, 1, 1, &mut [0; 8]).is_err_and(enotty));
        assert!(sys::vdevice_alloc(&null, 1, 1, 1).is_err_and(enotty));
        assert!(sys::veventq_alloc(&null, 1, 1, 8).is_err_and(enotty));
        #[cfg(feature = "selftest")]
        {
            let mut cmd = test_cmd::TestCmd::default();
            assert!(sys::test_cmd(&null, &mut cmd).is_err_and(enotty));
        }
        // /dev/null is still open and still the caller's.
        assert!(rustix::fs::fstat(&null).is_ok());
    }

    #[test]
    fn dup_from_checks_the_fd_and_leaves_the_callers_open() {
        let null = File::open("/dev/null").unwrap();
        assert!(refusal(Iommufd::dup_from(&null)).contains("major 1,"));
        // The caller's file is still open and usable.
        assert!(rustix::fs::fstat(&null).is_ok());
    }

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
