//! The ioctls this crate issues on a borrowed fd, fenced here: `IOMMU_FAULT_QUEUE_ALLOC`,
//! `IOMMU_VIOMMU_ALLOC`, `IOMMU_VDEVICE_ALLOC`, `IOMMU_VEVENTQ_ALLOC`, the self-test
//! `IOMMU_TEST_CMD` (only with the `selftest` feature), and the borrow of the fd inside an
//! `iommufd-ioctls` handle. This is the only module of the crate with `unsafe`.
//!
//! The vIOMMU ioctls are ours rather than `iommufd-ioctls`' because its wrappers need an
//! `IommuFd` (an owned `File`), and a VMM lends its iommufd as a `BorrowedFd`.
//!
//! It depends on no other module of the crate but `test_cmd` (the self-test command's layout,
//! with the `selftest` feature), so nothing imports back into it.
//!
//! Both ioctls are `_IO(';', nr)` ioctls on `/dev/iommu` whose argument is a struct starting with its
//! own `size`, as every iommufd ioctl (the kernel's `copy_struct_from_user` accepts a larger
//! struct if the tail is zero, a smaller one down to the field it needs last).

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::io::{AsRawFd, RawFd};

use iommufd_bindings::iommufd::{
    IOMMUFD_CMD_FAULT_QUEUE_ALLOC, IOMMUFD_CMD_VDEVICE_ALLOC, IOMMUFD_CMD_VEVENTQ_ALLOC,
    IOMMUFD_CMD_VIOMMU_ALLOC, IOMMUFD_TYPE, iommu_fault_alloc, iommu_vdevice_alloc,
    iommu_veventq_alloc, iommu_viommu_alloc,
};
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
ioctl_io_nr!(
    IOMMU_VIOMMU_ALLOC,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_VIOMMU_ALLOC
);
ioctl_io_nr!(
    IOMMU_VDEVICE_ALLOC,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_VDEVICE_ALLOC
);
ioctl_io_nr!(
    IOMMU_VEVENTQ_ALLOC,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_VEVENTQ_ALLOC
);
#[cfg(feature = "selftest")]
ioctl_io_nr!(IOMMU_TEST_CMD, IOMMUFD_TYPE as u32, IOMMU_TEST_CMD_NR);

/// The fd number the kernel wrote into an allocation's output (`out_fault_fd`,
/// `out_veventq_fd`), checked to be one it could have installed: non-negative (0 is possible
/// in a process that closed its stdin) and not `iommufd`'s own.
fn installed_fd(out: u32, iommufd: RawFd, what: &str) -> io::Result<RawFd> {
    match RawFd::try_from(out) {
        Ok(fd) if fd != iommufd => Ok(fd),
        _ => Err(io::Error::other(format!(
            "the kernel returned an impossible {what} fd ({out})"
        ))),
    }
}

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
    let fd = installed_fd(alloc.out_fault_fd, iommufd.as_raw_fd(), "fault")?;
    // SAFETY:
    // 1. On success the kernel installed a new file at `out_fault_fd` in our fd table
    //    (`iommufd_fault_alloc` does `fd_install` after `get_unused_fd_flags`), so the fd is
    //    open and nothing else in this process owns it: we take the only ownership.
    // 2. `installed_fd` checked it to be non-negative and distinct from the iommufd above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((alloc.out_fault_id, fd))
}

/// `IOMMU_VIOMMU_ALLOC` on `iommufd`: a vIOMMU of `viommu_type` backed by device `dev_id`'s
/// IOMMU over the nesting parent `hwpt_id`, with the type's data `data` (read and written by
/// the kernel). Returns the vIOMMU's id.
pub(crate) fn viommu_alloc(
    iommufd: &impl AsRawFd,
    viommu_type: u32,
    dev_id: u32,
    hwpt_id: u32,
    data: &mut [u8],
) -> io::Result<u32> {
    let data_len =
        u32::try_from(data.len()).map_err(|_| io::Error::other("vIOMMU data longer than 4 GiB"))?;
    let mut alloc = iommu_viommu_alloc {
        size: size_of::<iommu_viommu_alloc>() as u32,
        flags: 0,
        type_: viommu_type,
        dev_id,
        hwpt_id,
        out_viommu_id: 0,
        data_len,
        __reserved: 0,
        data_uptr: if data.is_empty() {
            0
        } else {
            data.as_mut_ptr() as u64
        },
    };
    // SAFETY:
    // 1. `iommufd` is an open `/dev/iommu` (borrowed for the call), so the fd is valid.
    // 2. `alloc` is an initialised `struct iommu_viommu_alloc` (bindgen's layout, checked at
    //    compile time by iommufd-bindings) whose `size` bounds what the kernel reads and
    //    writes; it lives on our stack for the whole call and nothing else aliases it.
    // 3. `data_uptr`/`data_len` describe `data`, borrowed mutably for the whole call, so the
    //    kernel reads and writes (the type's output fields) only within it; 0/0 when empty.
    // 4. The return value is checked before the output id is used.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_VIOMMU_ALLOC(), &mut alloc) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(alloc.out_viommu_id)
}

/// `IOMMU_VDEVICE_ALLOC` on `iommufd`: device `dev_id` on vIOMMU `viommu_id` under the guest's
/// `virt_id`. Returns the vDevice's id.
pub(crate) fn vdevice_alloc(
    iommufd: &impl AsRawFd,
    viommu_id: u32,
    dev_id: u32,
    virt_id: u64,
) -> io::Result<u32> {
    let mut alloc = iommu_vdevice_alloc {
        size: size_of::<iommu_vdevice_alloc>() as u32,
        viommu_id,
        dev_id,
        out_vdevice_id: 0,
        virt_id,
    };
    // SAFETY:
    // 1. `iommufd` is an open `/dev/iommu` (borrowed for the call), so the fd is valid.
    // 2. `alloc` is an initialised `struct iommu_vdevice_alloc` (bindgen's layout, checked at
    //    compile time) with `size` set, on our stack for the whole call, not aliased.
    // 3. It carries no user pointer. The return value is checked before the id is used.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_VDEVICE_ALLOC(), &mut alloc) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(alloc.out_vdevice_id)
}

/// `IOMMU_VEVENTQ_ALLOC` on `iommufd`: a vEVENTQ of `veventq_type` and `depth` on vIOMMU
/// `viommu_id`. Returns its id and its file.
pub(crate) fn veventq_alloc(
    iommufd: &impl AsRawFd,
    viommu_id: u32,
    veventq_type: u32,
    depth: u32,
) -> io::Result<(u32, OwnedFd)> {
    let mut alloc = iommu_veventq_alloc {
        size: size_of::<iommu_veventq_alloc>() as u32,
        flags: 0,
        viommu_id,
        type_: veventq_type,
        veventq_depth: depth,
        out_veventq_id: 0,
        out_veventq_fd: 0,
        __reserved: 0,
    };
    // SAFETY:
    // 1. `iommufd` is an open `/dev/iommu` (borrowed for the call), so the fd is valid.
    // 2. `alloc` is an initialised `struct iommu_veventq_alloc` (bindgen's layout, checked at
    //    compile time) with `size` set, on our stack for the whole call, not aliased.
    // 3. It carries no user pointer. The return value is checked before any output is used.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_VEVENTQ_ALLOC(), &mut alloc) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = installed_fd(alloc.out_veventq_fd, iommufd.as_raw_fd(), "vEVENTQ")?;
    // SAFETY:
    // 1. On success the kernel installed a new file at `out_veventq_fd` in our fd table
    //    (`iommufd_veventq_alloc` does `fd_install` after `get_unused_fd_flags`), so the fd is
    //    open and nothing else in this process owns it: we take the only ownership.
    // 2. `installed_fd` checked it to be non-negative and distinct from the iommufd above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((alloc.out_veventq_id, fd))
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

#[cfg(test)]
#[cfg(not(loom))]
mod tests {
    use super::*;

    #[test]
    fn an_installed_fd_is_any_non_negative_fd_but_the_iommufds_own() {
        assert_eq!(installed_fd(0, 3, "fault").unwrap(), 0);
        assert_eq!(installed_fd(7, 3, "fault").unwrap(), 7);
        let own = installed_fd(3, 3, "vEVENTQ").unwrap_err();
        assert_eq!(
            own.to_string(),
            "the kernel returned an impossible vEVENTQ fd (3)"
        );
        // Negative as an `int`, or beyond it.
        assert!(installed_fd(u32::MAX, 3, "fault").is_err());
        assert!(installed_fd(1 << 31, 3, "fault").is_err());
    }
}
