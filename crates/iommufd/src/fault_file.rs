//! A kernel fault queue's file, with the kernel's own semantics and nothing added.
//!
//! - `read` returns whole groups of 40-byte `struct iommu_hwpt_pgfault` records, 0 bytes when
//!   none is queued (it never blocks), and `EINVAL` when the buffer cannot hold the first
//!   group; a count that is not a multiple of 40 is `ESPIPE`.
//! - `write` takes 8-byte `struct iommu_hwpt_page_response` records and stops at the first it
//!   refuses (unknown cookie or a code other than SUCCESS/INVALID: `EINVAL`), returning the
//!   bytes it accepted before it, or the error if it accepted none.
//! - `poll` is readable while a group is queued.
//!
//! Records are decoded field by field at the offsets of `iommufd-bindings`' structs (whose
//! layout that crate asserts at compile time), so no byte of the kernel's output is
//! reinterpreted in place.

use std::io;
use std::mem::offset_of;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use iommufd_bindings::iommufd::{iommu_hwpt_page_response, iommu_hwpt_pgfault};
use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::error::KernelError;
use crate::viommu::Object;

/// A kernel fault record (`struct iommu_hwpt_pgfault`).
pub type KernelFault = iommu_hwpt_pgfault;
/// A kernel page response (`struct iommu_hwpt_page_response`).
pub type KernelResponse = iommu_hwpt_page_response;

/// Bytes of one fault record.
pub const FAULT_RECORD_SIZE: usize = size_of::<KernelFault>();
/// Bytes of one page response.
pub const RESPONSE_SIZE: usize = size_of::<KernelResponse>();

const _: () = assert!(FAULT_RECORD_SIZE == 40);
const _: () = assert!(RESPONSE_SIZE == 8);

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_ne_bytes(b)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_ne_bytes(b)
}

/// Decodes one record from exactly [`FAULT_RECORD_SIZE`] bytes.
pub(crate) fn decode_fault(bytes: &[u8; FAULT_RECORD_SIZE]) -> KernelFault {
    KernelFault {
        flags: u32_at(bytes, offset_of!(KernelFault, flags)),
        dev_id: u32_at(bytes, offset_of!(KernelFault, dev_id)),
        pasid: u32_at(bytes, offset_of!(KernelFault, pasid)),
        grpid: u32_at(bytes, offset_of!(KernelFault, grpid)),
        perm: u32_at(bytes, offset_of!(KernelFault, perm)),
        __reserved: u32_at(bytes, offset_of!(KernelFault, __reserved)),
        addr: u64_at(bytes, offset_of!(KernelFault, addr)),
        length: u32_at(bytes, offset_of!(KernelFault, length)),
        cookie: u32_at(bytes, offset_of!(KernelFault, cookie)),
    }
}

/// Encodes one response into its [`RESPONSE_SIZE`] bytes.
pub(crate) fn encode_response(response: &KernelResponse, out: &mut [u8]) {
    let cookie = offset_of!(KernelResponse, cookie);
    let code = offset_of!(KernelResponse, code);
    out[cookie..cookie + 4].copy_from_slice(&response.cookie.to_ne_bytes());
    out[code..code + 4].copy_from_slice(&response.code.to_ne_bytes());
}

/// A fault queue's file (`[iommufd-pgfault]`).
#[derive(Debug)]
pub struct FaultFile {
    // Declared first: closed before the fault object is released (the file holds a reference
    // on it, so the object can only be destroyed after the file is closed).
    fd: OwnedFd,
    /// The fault object, when this crate owns it ([`alloc_fault_object`](crate::alloc_fault_object)).
    _owner: Option<Arc<Object>>,
}

impl FaultFile {
    /// Wraps the fd `IOMMU_FAULT_QUEUE_ALLOC` returned.
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd, _owner: None }
    }

    /// The file of a fault object this crate owns: the object is destroyed once the file is
    /// closed and every other holder let go.
    pub(crate) fn owning(fd: OwnedFd, owner: Arc<Object>) -> Self {
        Self {
            fd,
            _owner: Some(owner),
        }
    }

    /// One `read` into `buf` (whose length must be a multiple of [`FAULT_RECORD_SIZE`]),
    /// decoding the records it returned into `out` (cleared first). Returns how many; 0 when
    /// nothing is queued.
    pub fn read_into(&self, buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize> {
        out.clear();
        let n = rustix::io::read(&self.fd, &mut *buf)?;
        if !n.is_multiple_of(FAULT_RECORD_SIZE) {
            return Err(io::Error::other(format!(
                "the kernel returned {n} bytes, not whole fault records"
            )));
        }
        for chunk in buf[..n].chunks_exact(FAULT_RECORD_SIZE) {
            let mut record = [0u8; FAULT_RECORD_SIZE];
            record.copy_from_slice(chunk);
            out.push(decode_fault(&record));
        }
        Ok(out.len())
    }

    /// One `write` of `responses`. Returns how many the kernel accepted: fewer than given means
    /// it refused the next one (write that one alone to learn why).
    pub fn write(&self, responses: &[KernelResponse]) -> io::Result<usize> {
        if responses.is_empty() {
            return Ok(0);
        }
        let mut bytes = vec![0u8; responses.len() * RESPONSE_SIZE];
        for (response, out) in responses.iter().zip(bytes.chunks_exact_mut(RESPONSE_SIZE)) {
            encode_response(response, out);
        }
        let n = rustix::io::write(&self.fd, &bytes)?;
        Ok(n / RESPONSE_SIZE)
    }

    /// Waits until a group is queued or `timeout` passes (`None`: no limit). Returns whether
    /// the file is readable.
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool, KernelError> {
        poll_readable(self.fd.as_fd(), timeout)
    }
}

/// Waits until `fd` is readable or `timeout` passes (`None`: no limit).
pub(crate) fn poll_readable(
    fd: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> Result<bool, KernelError> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let timeout = timeout.map(|t| Timespec {
        tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    loop {
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(fds[0].revents().contains(PollFlags::IN)),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(KernelError::Poll(e.into())),
        }
    }
}

impl AsFd for FaultFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_at_the_uapi_offsets() {
        let mut bytes = [0u8; FAULT_RECORD_SIZE];
        for (i, v) in [3u32, 7, 0x11, 0x1ff, 3, 0].iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
        }
        bytes[24..32].copy_from_slice(&0xdead_b000u64.to_ne_bytes());
        bytes[32..36].copy_from_slice(&0u32.to_ne_bytes());
        bytes[36..40].copy_from_slice(&42u32.to_ne_bytes());
        let f = decode_fault(&bytes);
        assert_eq!(
            (f.flags, f.dev_id, f.pasid, f.grpid, f.perm),
            (3, 7, 0x11, 0x1ff, 3)
        );
        assert_eq!((f.addr, f.length, f.cookie), (0xdead_b000, 0, 42));
    }

    #[test]
    fn responses_encode_cookie_then_code() {
        let mut out = [0u8; RESPONSE_SIZE];
        encode_response(&KernelResponse { cookie: 5, code: 1 }, &mut out);
        assert_eq!(out, [5, 0, 0, 0, 1, 0, 0, 0]);
    }
}
