//! The two ioctls no crate wraps, fenced here: `IOMMU_FAULT_QUEUE_ALLOC` and the self-test
//! `IOMMU_TEST_CMD` (only with the `selftest` feature), and the borrow of the fd inside an
//! `iommufd-ioctls` handle. This is the only module of the crate with `unsafe`.
//!
//! It depends on no other module of the crate but `test_cmd` (the self-test command's layout,
//! with the `selftest` feature), so nothing imports back into it.
//!
//! Both ioctls are `_IO(';', nr)` ioctls on `/dev/iommu` whose argument is a struct starting with its
//! own `size`, as every iommufd ioctl (the kernel's `copy_struct_from_user` accepts a larger
//! struct if the tail is zero, a smaller one down to the field it needs last).

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::io::AsRawFd;

use iommufd_bindings::iommufd::{IOMMUFD_CMD_FAULT_QUEUE_ALLOC, IOMMUFD_TYPE, iommu_fault_alloc};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use iommufd_ioctls::IommuFd;

#[cfg(feature = "selftest")]
use crate::test_cmd::{IOMMU_TEST_CMD_NR, TestCmd};

ioctl_io_nr!(
    IOMMU_FAULT_QUEUE_ALLOC,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_FAULT_QUEUE_ALLOC
);
#[cfg(feature = "selftest")]
ioctl_io_nr!(IOMMU_TEST_CMD, IOMMUFD_TYPE as u32, IOMMU_TEST_CMD_NR);

/// `IOMMU_FAULT_QUEUE_ALLOC` on `iommufd`: a new fault object's id and its file.
pub(crate) fn fault_queue_alloc(iommufd: &impl AsRawFd) -> io::Result<(u32, OwnedFd)> {
    let mut alloc = iommu_fault_alloc {
        size: size_of::<iommu_fault_alloc>() as u32,
        flags: 0,
        out_fault_id: 0,
        out_fault_fd: 0,
    };
    // SAFETY:
    // 1. `iommufd` is an open `/dev/iommu` (borrowed for the call), so the fd is valid.
    // 2. `alloc` is an initialised `struct iommu_fault_alloc` (bindgen's layout, checked at
    //    compile time by iommufd-bindings) whose `size` says how many bytes the kernel may
    //    read and write; it lives on our stack for the whole call and nothing else aliases it.
    // 3. The return value is checked before any output field is used.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_FAULT_QUEUE_ALLOC(), &mut alloc) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(alloc.out_fault_fd)
        .map_err(|_| io::Error::other("the kernel returned a fault fd out of range"))?;
    if fd < 0 || fd == iommufd.as_raw_fd() {
        return Err(io::Error::other(
            "the kernel returned an impossible fault fd",
        ));
    }
    // SAFETY:
    // 1. On success the kernel installed a new file at `out_fault_fd` in our fd table
    //    (`iommufd_fault_alloc` does `fd_install` after `get_unused_fd_flags`), so the fd is
    //    open and nothing else in this process owns it: we take the only ownership.
    // 2. It was checked to be non-negative and distinct from the iommufd above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((alloc.out_fault_id, fd))
}

/// The fd of an `iommufd-ioctls` handle, borrowed for as long as the handle is (that crate
/// implements only `AsRawFd`).
pub(crate) fn borrow_ioctls_fd(ioctls: &IommuFd) -> BorrowedFd<'_> {
    // SAFETY:
    // 1. `IommuFd` owns an open `File` for its whole life and never closes or replaces it
    //    before it is dropped (it has no method that does), so the raw fd is open.
    // 2. The returned borrow lives no longer than `&IommuFd`, so the handle (and with it the
    //    file) cannot be dropped while the borrow is in use.
    unsafe { BorrowedFd::borrow_raw(ioctls.as_raw_fd()) }
}

/// `IOMMU_TEST_CMD` on `iommufd` (a kernel built with `CONFIG_IOMMUFD_TEST`); the kernel writes
/// its outputs into `cmd`.
#[cfg(feature = "selftest")]
pub(crate) fn test_cmd(iommufd: &impl AsRawFd, cmd: &mut TestCmd) -> io::Result<()> {
    // SAFETY:
    // 1. `iommufd` is an open `/dev/iommu` (borrowed for the call), so the fd is valid.
    // 2. `cmd` is an initialised `#[repr(C)]` `struct iommu_test_cmd` whose layout is checked
    //    against the 6.12 header by the size and offset tests of `selftest`; its `size` field
    //    is `size_of::<TestCmd>()`, so the kernel reads and writes within it. It is borrowed
    //    mutably for the whole call, so nothing aliases it.
    // 3. No operation we issue passes user pointers (the union carries only ids and values).
    // 4. The return value is checked.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_TEST_CMD(), cmd) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
