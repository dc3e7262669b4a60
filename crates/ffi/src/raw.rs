//! The C entry points: every `#[unsafe(no_mangle)]` function and every raw pointer or fd from
//! C is here, and only here. Each entry point checks its pointers and lengths, turns them into
//! Rust values, and calls the safe implementation in `api.rs` inside `error::guard` (no panic
//! crosses the boundary).

#![allow(unsafe_code)]

use std::ffi::{CStr, OsStr, c_char, c_int};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::api::{self, BUFFER_LIMIT};
use crate::error::{FfiError, guard, last_error};
use crate::types::{
    IOPF_NO_DEVICE, iopf_device, iopf_group, iopf_page_request, iopf_stats, iopf_unrecoverable,
};

const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(version) => version,
        Err(_) => panic!("the package version has a NUL byte"),
    };

fn null(what: &str) -> FfiError {
    FfiError::Argument(format!("{what} is a null pointer"))
}

/// `ptr` as one writable, possibly uninitialized `T`.
///
/// # Safety
///
/// A non-null `ptr` must point to memory writable as a `T` for the call, not used by anything
/// else meanwhile.
unsafe fn out<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut MaybeUninit<T>, FfiError> {
    if ptr.is_null() {
        return Err(null(what));
    }
    if !ptr.is_aligned() {
        return Err(FfiError::Argument(format!("{what} is misaligned")));
    }
    // SAFETY: non-null and aligned (checked above); valid for writes of one `T` and not
    // aliased during the call (this function's contract). `MaybeUninit` makes no claim that
    // the caller's memory is initialized.
    Ok(unsafe { &mut *ptr.cast::<MaybeUninit<T>>() })
}

/// `len` writable, possibly uninitialized `T`s at `ptr`.
///
/// # Safety
///
/// A non-null `ptr` must point to memory writable as `len` consecutive `T`s for the call, not
/// used by anything else meanwhile.
unsafe fn buffer<'a, T>(
    ptr: *mut T,
    len: usize,
    what: &str,
) -> Result<&'a mut [MaybeUninit<T>], FfiError> {
    if ptr.is_null() {
        return Err(null(what));
    }
    if !ptr.is_aligned() {
        return Err(FfiError::Argument(format!("{what} is misaligned")));
    }
    if len > BUFFER_LIMIT {
        return Err(FfiError::Argument(format!(
            "{what}: a length of {len} entries is beyond the limit of {BUFFER_LIMIT}"
        )));
    }
    // SAFETY: non-null and aligned (checked above); `len` is at most `BUFFER_LIMIT`, so the
    // byte size of the small structs here fits an `isize`; valid for writes of `len` `T`s and
    // not aliased during the call (this function's contract); `MaybeUninit` makes no claim
    // that the memory is initialized.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.cast::<MaybeUninit<T>>(), len) })
}

/// A duplicate (close-on-exec) of the caller's fd `fd`; the caller keeps its own.
fn dup(fd: RawFd, what: &str) -> Result<OwnedFd, FfiError> {
    if fd < 0 {
        return Err(FfiError::Argument(format!("{what}: {fd} is not an fd")));
    }
    // SAFETY: `fd` is not negative (checked above, so not -1). The borrow lives only for the
    // `fcntl(F_DUPFD_CLOEXEC)` below: if the number is not an open fd of the caller's, that
    // call fails with EBADF, and no fd owned by Rust code is closed or kept.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_dupfd_cloexec(borrowed, 0).map_err(|e| FfiError::Dup {
        what: what.to_owned(),
        source: e.into(),
    })
}

/// The library's version, "MAJOR.MINOR.PATCH" (a static string).
#[unsafe(no_mangle)]
pub extern "C" fn iopf_version() -> *const c_char {
    VERSION.as_ptr()
}

/// The message of the last call that failed on this thread (its cause chain joined by ": "),
/// or "" if none has. The string stays valid until the next failing call on this thread.
/// Successful calls leave it as it is.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_last_error() -> *const c_char {
    last_error()
}

/// Attaches the device served on the vfio-user socket `path` (an iopf host): connects, reads
/// the device number, finds both queue regions by type, takes the response doorbell, gives
/// the fault IRQ a new eventfd, and maps the regions. On success `*device` is the new handle;
/// on failure it is `IOPF_NO_DEVICE`. The connection stays open until `iopf_detach` (closing
/// it unregisters the device). Blocks on the socket.
///
/// Returns 0, or -errno: -ENOENT / -ECONNREFUSED (no host there), -ECONNRESET (the host
/// refused the connection: every device is taken), -ENODEV (a region is missing), -EPROTO
/// (a region fails its checks), -EINVAL (a null pointer).
///
/// # Safety
///
/// `path` is NULL or a NUL-terminated string; `device` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iopf_attach_socket(
    path: *const c_char,
    device: *mut iopf_device,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract: `device` is NULL (refused) or writable.
        let device = unsafe { out(device, "device") }?;
        device.write(IOPF_NO_DEVICE);
        if path.is_null() {
            return Err(null("path"));
        }
        // SAFETY: non-null (checked above) and NUL-terminated (the caller's contract); the
        // bytes are only read during this call.
        let path = unsafe { CStr::from_ptr(path) };
        let path = Path::new(OsStr::from_bytes(path.to_bytes()));
        device.write(api::attach_socket(path)?);
        Ok(0)
    })
}

/// Attaches a device from fds the VMM already holds (its own vfio-user client, or fds passed
/// by a management process): `fault_region_fd` and `response_region_fd` (the memfds of the
/// DMA fault region and the DMA fault response region), `fault_irq_fd` (the eventfd the VMM
/// gave `DEVICE_SET_IRQS` of `IOPF_VFIO_DMA_FAULT_IRQ_INDEX`, before this call) and
/// `response_doorbell_fd` (the eventfd `GET_REGION_IO_FDS` of
/// `IOPF_VFIO_DMA_FAULT_RESPONSE_REGION_INDEX` gave, or -1). Each region is checked (seals,
/// size, magic, version, kind, geometry) before it is mapped. The fds are duplicated: the
/// caller keeps and closes its own. Such a handle has no vfio-user connection: `iopf_dma_map`,
/// `iopf_reset`, `iopf_host_finished` and the like return -ENOTSUP; use your own client.
///
/// Returns 0, or -errno: -EBADF (an fd is not open), -EINVAL (a negative fd, a doorbell fd
/// that is not an eventfd, a region fd that is not a memfd, a null pointer), -EPROTO (a
/// region fails its checks: seals, size, magic, version, kind, geometry).
///
/// # Safety
///
/// `device` is NULL or writable; the fds, if not negative, are the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iopf_attach_fds(
    device_number: u32,
    fault_region_fd: c_int,
    response_region_fd: c_int,
    fault_irq_fd: c_int,
    response_doorbell_fd: c_int,
    device: *mut iopf_device,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract: `device` is NULL (refused) or writable.
        let device = unsafe { out(device, "device") }?;
        device.write(IOPF_NO_DEVICE);
        let fault_region = dup(fault_region_fd, "fault_region_fd")?;
        let response_region = dup(response_region_fd, "response_region_fd")?;
        let fault_irq = dup(fault_irq_fd, "fault_irq_fd")?;
        let response_doorbell = match response_doorbell_fd {
            -1 => None,
            fd => Some(dup(fd, "response_doorbell_fd")?),
        };
        device.write(api::attach_fds(
            device_number,
            fault_region,
            response_region,
            fault_irq,
            response_doorbell,
        )?);
        Ok(0)
    })
}

/// Detaches the device: closes its connection (the host unregisters it and answers its
/// pending groups Invalid) and its fds, including the one `iopf_fd` returned. The handle is
/// never valid again, whichever thread uses it. Returns 0, or -EBADF.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_detach(device: iopf_device) -> c_int {
    guard(|| api::detach(device))
}

/// The host's number for the device (what `iopf_group.device` says), into `*number`.
/// Returns 0, or -EBADF, -EINVAL.
///
/// # Safety
///
/// `number` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iopf_device_number(device: iopf_device, number: *mut u32) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract: `number` is NULL (refused) or writable.
        let number = unsafe { out(number, "number") }?;
        number.write(api::device_number(device)?);
        Ok(0)
    })
}

/// The fd to watch (readable: faults may be ready, or an answer was given from another
/// thread). Level-triggered: `iopf_woke` makes it unreadable again. Owned by the library,
/// valid until `iopf_detach`; do not close it. Returns the fd (>= 0), or -EBADF.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_fd(device: iopf_device) -> c_int {
    guard(|| api::fd(device))
}

/// Reads the faults that are ready (at most 1024 records), assembles whole groups for
/// `iopf_drain_groups` and unrecoverable faults for `iopf_drain_unrecoverable`, then sends the
/// answers queued so far. Never blocks. Returns the records read (>= 0), or -errno: -EPROTO
/// (the host broke a queue: detach), -ENOBUFS (65,536 faults wait to be drained; answers were
/// still sent).
#[unsafe(no_mangle)]
pub extern "C" fn iopf_poll(device: iopf_device) -> c_int {
    guard(|| api::poll(device))
}

/// Sends the answers queued, as far as the response ring takes them (the rest wait, in
/// order: see `iopf_backlog`). Returns how many were sent, or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_flush(device: iopf_device) -> c_int {
    guard(|| api::flush(device))
}

/// Before sleeping on `iopf_fd`: asks the host for a wake-up, then looks at the ring once
/// more. Returns 1 if it is safe to sleep, 0 if faults arrived meanwhile (poll again instead
/// of sleeping), or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_prepare_to_sleep(device: iopf_device) -> c_int {
    guard(|| api::prepare_to_sleep(device))
}

/// After sleeping (whether `iopf_fd` fired or the wait timed out): withdraws the wake-up
/// request and drains the device's eventfds. Returns 0, or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_woke(device: iopf_device) -> c_int {
    guard(|| api::woke(device))
}

/// Answers waiting for room in the response ring. While it is not 0, sleep at most
/// `IOPF_BACKLOG_RETRY_MS` (the host rings no doorbell when it frees room). Returns the count,
/// or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_backlog(device: iopf_device) -> c_int {
    guard(|| api::backlog(device))
}

/// Whether the host says faults may still come: 1, or 0 once the host has stopped serving
/// the device (then `iopf_host_finished` says whether it finished for good). Returns -errno on
/// error.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_live(device: iopf_device) -> c_int {
    guard(|| api::live(device))
}

/// Moves whole page request groups read by `iopf_poll` into `groups` (room for `max_groups`)
/// and their requests into `requests` (room for `max_requests`): group `g` has requests
/// `requests[g.first .. g.first + g.count]`. A group is never split: draining stops before a
/// group whose requests do not fit. Answer each group exactly once, with `iopf_answer` and
/// its cookie.
///
/// Returns the groups written (0: none waits), or -errno: -ENOSPC (the next group alone has
/// more requests than `max_requests`; a buffer of `IOPF_MAX_GROUP_REQUESTS` never gets it),
/// -EINVAL (a null or misaligned pointer, `max_groups` 0, a length above 2^24).
///
/// # Safety
///
/// `groups` is NULL or writable for `max_groups` entries; `requests` is NULL or writable for
/// `max_requests` entries; neither is used by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iopf_drain_groups(
    device: iopf_device,
    groups: *mut iopf_group,
    max_groups: usize,
    requests: *mut iopf_page_request,
    max_requests: usize,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract: NULL (refused) or writable for `max_groups`.
        let groups = unsafe { buffer(groups, max_groups, "groups") }?;
        // SAFETY: the caller's contract: NULL (refused) or writable for `max_requests`.
        let requests = unsafe { buffer(requests, max_requests, "requests") }?;
        api::drain_groups(device, groups, requests)
    })
}

/// Moves unrecoverable faults read by `iopf_poll` into `faults` (room for `max_faults`).
/// Returns how many (0: none waits), or -errno (-EINVAL: a null or misaligned pointer,
/// `max_faults` 0 or above 2^24).
///
/// # Safety
///
/// `faults` is NULL or writable for `max_faults` entries, not used by another thread during
/// the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iopf_drain_unrecoverable(
    device: iopf_device,
    faults: *mut iopf_unrecoverable,
    max_faults: usize,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract: NULL (refused) or writable for `max_faults`.
        let faults = unsafe { buffer(faults, max_faults, "faults") }?;
        api::drain_unrecoverable(device, faults)
    })
}

/// Answers the group drained under `cookie` with `code` (`IOPF_ANSWER_SUCCESS`, `_INVALID`
/// or `_FAILURE`). Callable from any thread, also while another thread polls. The answer is
/// queued and sent by the next `iopf_poll` or `iopf_flush`; given outside `iopf_poll`, it
/// makes `iopf_fd` readable so the loop wakes to send it. Never blocks on the host.
///
/// Returns 0, or -errno: -ENOENT (no group waits under that cookie: answered already, never
/// drained, or forgotten by `iopf_reset`), -EINVAL (an unknown code), -EAGAIN (65,536 answers
/// wait already: the host reads none; the group still waits, answer it again later).
#[unsafe(no_mangle)]
pub extern "C" fn iopf_answer(device: iopf_device, cookie: u64, code: u32) -> c_int {
    guard(|| api::answer(device, cookie, code))
}

/// The device's counters, into `*stats`; `size` is `sizeof(struct iopf_stats)` (a caller
/// built against another layout gets -EINVAL, not a short write). Returns 0, or -errno.
///
/// # Safety
///
/// `stats` is NULL or writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iopf_stats(
    device: iopf_device,
    stats: *mut iopf_stats,
    size: usize,
) -> c_int {
    guard(|| {
        if size != size_of::<iopf_stats>() {
            return Err(FfiError::Argument(format!(
                "size {size} is not sizeof(struct iopf_stats), {}",
                size_of::<iopf_stats>()
            )));
        }
        // SAFETY: the caller's contract: NULL (refused) or writable for `size` bytes, which
        // is one `iopf_stats` (checked above).
        let stats = unsafe { out(stats, "stats") }?;
        stats.write(api::stats(device)?);
        Ok(0)
    })
}

/// Gives the device guest memory: `VFIO_USER_DMA_MAP` of `len` bytes of `fd` from `offset`, at
/// IOVA `iova` (in direct mode, the guest-physical address), with access `prot`
/// (`IOPF_DMA_READ | IOPF_DMA_WRITE`). `fd` must be a memfd sealed with `F_SEAL_SHRINK`, at
/// least `offset + len` long; it is duplicated for the call, the caller keeps its own. Map
/// all memory right after attaching: the device starts 250 ms after the last `DMA_MAP`. Blocks
/// on the socket. Returns 0, or -errno (-ENOTSUP: attached from fds; the host's errno when it
/// refuses).
#[unsafe(no_mangle)]
pub extern "C" fn iopf_dma_map(
    device: iopf_device,
    fd: c_int,
    offset: u64,
    iova: u64,
    len: u64,
    prot: u32,
) -> c_int {
    guard(|| api::dma_map(device, dup(fd, "fd")?, offset, iova, len, prot))
}

/// `VFIO_USER_DMA_UNMAP` of the mapping at `iova` of `len` bytes. Blocks on the socket.
/// Returns 0, or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_dma_unmap(device: iopf_device, iova: u64, len: u64) -> c_int {
    guard(|| api::dma_unmap(device, iova, len))
}

/// Nested mode: tells the device where the guest's PASID directory is (`entries` 8-byte
/// entries at guest-physical `base`), through the BAR0 registers. Without it the device runs
/// in direct mode. Blocks on the socket. Returns 0, or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_set_pasid_directory(device: iopf_device, base: u64, entries: u64) -> c_int {
    guard(|| api::set_pasid_directory(device, base, entries))
}

/// Whether the host says it has finished (BAR0 host state): 1 or 0, or -errno. A VMM whose
/// device is no longer live (`iopf_live` 0) and whose host has finished detaches and leaves.
/// Blocks on the socket.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_host_finished(device: iopf_device) -> c_int {
    guard(|| api::host_finished(device))
}

/// Resets the device (`VFIO_USER_DEVICE_RESET`, e.g. on the guest's function-level reset):
/// the host applies the answers already sent and answers every other pending group Invalid.
/// The groups drained or read before it are forgotten here: their cookies return -ENOENT.
/// Same handle, same fd afterwards. Blocks on the socket. Returns 0, or -errno.
#[unsafe(no_mangle)]
pub extern "C" fn iopf_reset(device: iopf_device) -> c_int {
    guard(|| api::reset(device))
}
