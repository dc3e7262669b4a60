//! Queue regions in shared memory: a sealed memfd, mapped by both sides.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use iopf_abi::{
    ENTRIES_OFFSET, HostPageHeader, MAX_ENTRIES, QueueGeometry, QueueKind, RegionError,
    VmmPageHeader,
};
use rustix::fs::{MemfdFlags, SealFlags};
use thiserror::Error;

use crate::mapping::Mapping;
use crate::memory::{HostPage, QueueMemory, VmmPage};
use crate::sync::AtomicU64;

/// The seals every queue region carries: nobody can shrink it (which would make the other side
/// fault on its mapping), grow it, or change its seals.
pub const REQUIRED_SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// Why a queue region could not be created or attached.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RegionAttachError {
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The fd is not a memfd sealed against shrinking, growing and resealing.
    #[error("region fd is not a sealed memfd (seals {found:?}, need {REQUIRED_SEALS:?})")]
    NotSealed {
        /// The seals it has (empty if it is not a memfd at all).
        found: SealFlags,
    },
    /// Guest memory's fd is not a memfd sealed against shrinking.
    #[error("guest memory fd is not a memfd sealed with F_SEAL_SHRINK (seals {found:?})")]
    NotShrinkSealed {
        /// The seals it has (empty if it is not a memfd at all).
        found: SealFlags,
    },
    /// A range of guest memory is empty, not whole pages, or not inside its file.
    #[error(
        "range of {len} bytes at offset {offset} is not whole pages inside the {file_len}-byte file"
    )]
    RangeOutside {
        /// Where the range starts in the file.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's size.
        file_len: u64,
    },
    /// The region's header or size does not describe a valid ABI v2 queue.
    #[error("invalid queue region")]
    Region(#[from] RegionError),
    /// The indices in the region's pages are inconsistent.
    #[error("inconsistent ring indices")]
    Ring(#[from] crate::ring::RingError),
    /// The region is larger than its header says: a consistent region is exactly its length.
    #[error("region is {len} bytes but its header describes {expected}")]
    SizeMismatch {
        /// The fd's size.
        len: u64,
        /// The size the header implies.
        expected: u64,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> RegionAttachError {
    move |e| RegionAttachError::Io {
        op,
        source: e.into(),
    }
}

/// One queue region, mapped: the memfd and its shared mapping.
#[derive(Debug)]
pub struct QueueRegion {
    fd: OwnedFd,
    mapping: Mapping,
    geometry: QueueGeometry,
    words: usize,
}

impl QueueRegion {
    /// Creates a region (host side): a memfd of exactly the region's length, sealed, mapped,
    /// with its host page written.
    pub fn create(geometry: QueueGeometry) -> Result<Self, RegionAttachError> {
        let name = match geometry.kind() {
            QueueKind::Fault => "iopf-fault-queue",
            QueueKind::Response => "iopf-response-queue",
        };
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(io_err("memfd_create"))?;
        rustix::fs::ftruncate(&fd, geometry.region_len()).map_err(io_err("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS).map_err(io_err("F_ADD_SEALS"))?;
        let region = Self::map(fd, geometry)?;
        region.host_page().init(&geometry);
        Ok(region)
    }

    /// Attaches to a region from its fd alone (VMM side, or anyone who received the fd): checks
    /// the seals, the size, and every field of the host page (magic, version, kind, geometry),
    /// and refuses anything inconsistent.
    pub fn attach(fd: OwnedFd, expected: QueueKind) -> Result<Self, RegionAttachError> {
        let found = rustix::fs::fcntl_get_seals(&fd).unwrap_or(SealFlags::empty());
        if !found.contains(REQUIRED_SEALS) {
            return Err(RegionAttachError::NotSealed { found });
        }
        let len = rustix::fs::fstat(&fd).map_err(io_err("fstat"))?.st_size;
        let len = u64::try_from(len).unwrap_or(0);
        let max = QueueGeometry::new(expected, MAX_ENTRIES)?.region_len();
        if len < u64::from(ENTRIES_OFFSET) || len > max {
            // Refuse before mapping anything: too small to hold a header, or larger than any
            // valid region of this kind.
            return Err(if len > max {
                RegionAttachError::SizeMismatch { len, expected: max }
            } else {
                RegionError::TooSmall {
                    needed: ENTRIES_OFFSET.into(),
                    len,
                }
                .into()
            });
        }
        // Map the header pages alone first, so the geometry comes from the header and the file
        // size together, and is validated before the full mapping exists.
        let header = {
            let pages = Mapping::new(fd.as_fd(), ENTRIES_OFFSET as usize)
                .map_err(|source| RegionAttachError::Io { op: "mmap", source })?;
            pages.host_page().snapshot()
        };
        let geometry = QueueGeometry::from_host_header(&header, expected, len)?;
        if len != geometry.region_len() {
            return Err(RegionAttachError::SizeMismatch {
                len,
                expected: geometry.region_len(),
            });
        }
        Self::map(fd, geometry)
    }

    fn map(fd: OwnedFd, geometry: QueueGeometry) -> Result<Self, RegionAttachError> {
        let len = usize::try_from(geometry.region_len()).unwrap_or(usize::MAX);
        let mapping = Mapping::new(fd.as_fd(), len)
            .map_err(|source| RegionAttachError::Io { op: "mmap", source })?;
        let words = (geometry.nb_entries() * geometry.entry_size() / 8) as usize;
        if mapping.entry_words(words).is_none() {
            return Err(RegionError::TooSmall {
                needed: geometry.region_len(),
                len: mapping.len() as u64,
            }
            .into());
        }
        Ok(Self {
            fd,
            mapping,
            geometry,
            words,
        })
    }

    /// The region's memfd, to hand to the other side.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Both header pages as they are now (for inspection; values are not validated).
    pub fn snapshot(&self) -> (HostPageHeader, VmmPageHeader) {
        (self.host_page().snapshot(), self.vmm_page().snapshot())
    }
}

impl QueueMemory for QueueRegion {
    #[inline]
    fn geometry(&self) -> QueueGeometry {
        self.geometry
    }
    #[inline]
    fn host_page(&self) -> &HostPage {
        self.mapping.host_page()
    }
    #[inline]
    fn vmm_page(&self) -> &VmmPage {
        self.mapping.vmm_page()
    }
    #[inline]
    fn entry_words(&self) -> &[AtomicU64] {
        // Checked in `map`: the words fit the mapping.
        self.mapping.entry_words(self.words).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use iopf_abi::{REGION_MAGIC, VMM_ABI};

    use super::*;
    use crate::sync::Ordering;

    /// A memfd of `len` zero bytes with the seals of a region.
    fn sealed_memfd(len: u64) -> OwnedFd {
        let fd =
            rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS).unwrap();
        fd
    }

    fn largest(kind: QueueKind) -> QueueGeometry {
        QueueGeometry::new(kind, MAX_ENTRIES).unwrap()
    }

    #[test]
    fn attach_takes_a_queue_of_the_largest_size() {
        let host = QueueRegion::create(largest(QueueKind::Fault)).unwrap();
        let vmm =
            QueueRegion::attach(host.fd().try_clone_to_owned().unwrap(), QueueKind::Fault).unwrap();
        assert_eq!(vmm.geometry(), largest(QueueKind::Fault));
    }

    #[test]
    fn attach_refuses_a_region_larger_than_any_queue_before_reading_its_header() {
        let max = largest(QueueKind::Response).region_len();
        let error = QueueRegion::attach(sealed_memfd(max + 4096), QueueKind::Response).unwrap_err();
        assert!(
            matches!(error, RegionAttachError::SizeMismatch { len, expected } if len == max + 4096 && expected == max),
            "{error:?}"
        );
    }

    #[test]
    fn attach_reads_the_header_of_a_region_as_small_as_its_header_pages_and_refuses_a_smaller_one()
    {
        // Header-sized: big enough to look at, and refused for what its header says.
        let error =
            QueueRegion::attach(sealed_memfd(ENTRIES_OFFSET.into()), QueueKind::Fault).unwrap_err();
        assert!(
            matches!(error, RegionAttachError::Region(RegionError::BadMagic(0))),
            "{error:?}"
        );
        let error = QueueRegion::attach(sealed_memfd(4096), QueueKind::Fault).unwrap_err();
        assert!(
            matches!(
                error,
                RegionAttachError::Region(RegionError::TooSmall {
                    needed: 8192,
                    len: 4096
                })
            ),
            "{error:?}"
        );
    }

    #[test]
    fn a_snapshot_shows_both_header_pages_as_they_are() {
        let region =
            QueueRegion::create(QueueGeometry::new(QueueKind::Response, 8).unwrap()).unwrap();
        region.vmm_page().abi.store(VMM_ABI, Ordering::Release);
        let (host, vmm) = region.snapshot();
        assert_eq!(host.magic.get(), REGION_MAGIC);
        assert_eq!(host.nb_entries.get(), 8);
        assert_eq!(vmm.abi.get(), VMM_ABI);
    }
}
