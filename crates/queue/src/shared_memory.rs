//! Plain shared memory: a sealed memfd of any size (or a page-aligned range of one), mapped,
//! seen as 64-bit atomic words. Used for guest memory that a device model writes by DMA and
//! another process may check.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags};

use crate::mapping::WordMapping;
use crate::region::{REQUIRED_SEALS, RegionAttachError};
use crate::sync::AtomicU64;

/// The one seal guest memory from another process needs: `F_SEAL_SHRINK`. A file that can
/// shrink under a mapping makes every access past its new end raise `SIGBUS` in the process
/// that maps it; with the seal the file never ends before `offset + len`, which is checked
/// when it is mapped. Growing the file, or adding seals later, cannot hurt the mapping
/// (`F_SEAL_WRITE` cannot be added while a shared writable mapping exists), so neither
/// `F_SEAL_GROW` nor `F_SEAL_SEAL` is required.
pub const GUEST_MEMORY_SEALS: SealFlags = SealFlags::SHRINK;

/// A sealed memfd mapping of `len` bytes (a multiple of 4096), from a page-aligned offset of
/// the file.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    mapping: WordMapping,
    offset: u64,
    words: usize,
}

fn io_err(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> RegionAttachError {
    move |e| RegionAttachError::Io {
        op,
        source: e.into(),
    }
}

impl SharedMemory {
    /// Creates zeroed shared memory of at least `len` bytes (rounded up to whole pages, and to
    /// two pages at least).
    pub fn create(name: &str, len: u64) -> Result<Self, RegionAttachError> {
        let len = len.max(8192).div_ceil(4096) * 4096;
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(io_err("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len).map_err(io_err("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS).map_err(io_err("F_ADD_SEALS"))?;
        Self::map(fd, 0, len)
    }

    /// Maps shared memory received from elsewhere, refusing an fd that is not a sealed memfd
    /// or whose size is not a page multiple in 8 KiB ..= `max_len`.
    pub fn attach(fd: OwnedFd, max_len: u64) -> Result<Self, RegionAttachError> {
        let found = rustix::fs::fcntl_get_seals(&fd).unwrap_or(SealFlags::empty());
        if !found.contains(REQUIRED_SEALS) {
            return Err(RegionAttachError::NotSealed { found });
        }
        let len = rustix::fs::fstat(&fd).map_err(io_err("fstat"))?.st_size;
        let len = u64::try_from(len).unwrap_or(0);
        if len < 8192 || len > max_len || !len.is_multiple_of(4096) {
            return Err(RegionAttachError::SizeMismatch {
                len,
                expected: max_len,
            });
        }
        Self::map(fd, 0, len)
    }

    /// Maps `len` bytes of a memfd received from elsewhere, from byte `offset` of the file
    /// (guest memory a VMM shares with `DMA_MAP`). Refuses an fd that is not a memfd sealed
    /// with [`GUEST_MEMORY_SEALS`], an offset or length that is not a whole number of pages,
    /// a zero length, and a range the file does not cover.
    pub fn attach_range(fd: OwnedFd, offset: u64, len: u64) -> Result<Self, RegionAttachError> {
        let found = rustix::fs::fcntl_get_seals(&fd).unwrap_or(SealFlags::empty());
        if !found.contains(GUEST_MEMORY_SEALS) {
            return Err(RegionAttachError::NotShrinkSealed { found });
        }
        let file_len = rustix::fs::fstat(&fd).map_err(io_err("fstat"))?.st_size;
        let file_len = u64::try_from(file_len).unwrap_or(0);
        let end = offset.checked_add(len);
        if len == 0
            || !len.is_multiple_of(4096)
            || !offset.is_multiple_of(4096)
            || end.is_none_or(|end| end > file_len)
        {
            return Err(RegionAttachError::RangeOutside {
                offset,
                len,
                file_len,
            });
        }
        Self::map(fd, offset, len)
    }

    fn map(fd: OwnedFd, offset: u64, len: u64) -> Result<Self, RegionAttachError> {
        let len = usize::try_from(len).map_err(|_| RegionAttachError::SizeMismatch {
            len,
            expected: usize::MAX as u64,
        })?;
        let mapping = WordMapping::new(fd.as_fd(), offset, len)
            .map_err(|source| RegionAttachError::Io { op: "mmap", source })?;
        Ok(Self {
            fd,
            mapping,
            offset,
            words: len / 8,
        })
    }

    /// Where the mapping starts in the file, in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The memory's length in bytes.
    pub fn len(&self) -> u64 {
        self.words as u64 * 8
    }

    /// Always false: shared memory is at least 8 KiB.
    pub fn is_empty(&self) -> bool {
        self.words == 0
    }

    /// The whole memory as little-endian 64-bit words.
    pub fn words(&self) -> &[AtomicU64] {
        self.mapping.words()
    }

    /// Whether `other` maps the same file (the same memfd, through any fd).
    pub fn same_file(&self, other: &SharedMemory) -> bool {
        match (rustix::fs::fstat(&self.fd), rustix::fs::fstat(&other.fd)) {
            (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
            _ => false,
        }
    }

    /// The memfd, to hand to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Ordering;

    #[test]
    fn writes_through_one_mapping_are_seen_through_another() {
        let a = SharedMemory::create("test", 10_000).unwrap();
        assert_eq!(a.len(), 12_288);
        let b = SharedMemory::attach(a.fd().try_clone_to_owned().unwrap(), 1 << 20).unwrap();
        a.words()[1000].store(0xdead_beef, Ordering::Relaxed);
        assert_eq!(b.words()[1000].load(Ordering::Relaxed), 0xdead_beef);
    }

    #[test]
    fn a_range_maps_those_bytes_of_the_file_and_needs_only_the_shrink_seal() {
        let fd =
            rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, 4 * 4096).unwrap();
        let clone = || fd.try_clone().unwrap();
        assert!(matches!(
            SharedMemory::attach_range(clone(), 0, 4096),
            Err(RegionAttachError::NotShrinkSealed { .. })
        ));
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK).unwrap();
        let m = SharedMemory::attach_range(clone(), 2 * 4096, 4096).unwrap();
        assert_eq!((m.offset(), m.len()), (8192, 4096));
        m.words()[1].store(0x55, Ordering::Relaxed);
        let mut byte = [0u8; 1];
        rustix::io::pread(&fd, &mut byte, 2 * 4096 + 8).unwrap();
        assert_eq!(byte[0], 0x55);
        for (offset, len) in [(3 * 4096, 2 * 4096), (100, 4096), (0, 100), (0, 0)] {
            assert!(
                matches!(
                    SharedMemory::attach_range(clone(), offset, len),
                    Err(RegionAttachError::RangeOutside { .. })
                ),
                "{offset} {len}"
            );
        }
        // Growing the file later does not matter; shrinking is refused by the kernel.
        rustix::fs::ftruncate(&fd, 8 * 4096).unwrap();
        assert!(rustix::fs::ftruncate(&fd, 4096).is_err());
    }

    #[test]
    fn attach_takes_two_pages_up_to_the_limit_exactly_and_refuses_one_page() {
        let two = SharedMemory::create("two-pages", 8192).unwrap();
        let m = SharedMemory::attach(two.fd().try_clone_to_owned().unwrap(), 8192).unwrap();
        assert_eq!(m.len(), 8192);
        assert!(!m.is_empty());
        let fd =
            rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS).unwrap();
        assert!(matches!(
            SharedMemory::attach(fd, 1 << 20),
            Err(RegionAttachError::SizeMismatch { len: 4096, .. })
        ));
    }

    #[test]
    fn a_range_may_end_exactly_where_the_file_ends() {
        let whole = SharedMemory::create("whole", 4 * 4096).unwrap();
        let fd = whole.fd().try_clone_to_owned().unwrap();
        let tail = SharedMemory::attach_range(fd, 3 * 4096, 4096).unwrap();
        assert_eq!((tail.offset(), tail.len()), (3 * 4096, 4096));
        whole.words()[3 * 512].store(7, Ordering::Relaxed);
        assert_eq!(tail.words()[0].load(Ordering::Relaxed), 7);
    }

    #[test]
    fn same_file_tells_mappings_of_one_memfd_from_those_of_another() {
        let a = SharedMemory::create("a", 8192).unwrap();
        let also_a = SharedMemory::attach(a.fd().try_clone_to_owned().unwrap(), 8192).unwrap();
        let b = SharedMemory::create("b", 8192).unwrap();
        assert!(a.same_file(&also_a));
        assert!(!a.same_file(&b));
    }

    #[test]
    fn attach_refuses_unsealed_and_oversized_memory() {
        let fd = rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        assert!(matches!(
            SharedMemory::attach(fd, 1 << 20),
            Err(RegionAttachError::NotSealed { .. })
        ));
        let big = SharedMemory::create("big", 1 << 16).unwrap();
        assert!(matches!(
            SharedMemory::attach(big.fd().try_clone_to_owned().unwrap(), 1 << 15),
            Err(RegionAttachError::SizeMismatch { .. })
        ));
    }
}
