//! The one place that maps memory: a shared, writable mapping of a sealed memfd, and the typed
//! views of it the rings use. Everything above this module is safe code over atomics.

use core::ptr::NonNull;
use std::io;
use std::os::fd::BorrowedFd;

use iopf_abi::{ENTRIES_OFFSET, HOST_PAGE_OFFSET, VMM_PAGE_OFFSET};
use rustix::mm::{MapFlags, ProtFlags};

use crate::memory::{HostPage, VmmPage};
use crate::sync::AtomicU64;

/// A `MAP_SHARED` read-write mapping of a whole queue region.
///
/// Invariants, established by [`Mapping::new`] and relied on by every view:
/// 1. `ptr..ptr + len` is mapped for as long as `self` lives (unmapped only when its `RawMapping` drops);
/// 2. `ptr` is page-aligned and `len >= ENTRIES_OFFSET`, so both header pages lie inside it;
/// 3. the file under it cannot shrink (the caller checked `F_SEAL_SHRINK`), so no access inside
///    `len` can raise `SIGBUS`.
#[derive(Debug)]
pub(crate) struct Mapping {
    raw: RawMapping,
}

// SAFETY: `Mapping` owns a plain memory mapping; the views it hands out are atomics, which are
// `Sync`, so sharing or sending the owner across threads creates no unsynchronised access.
unsafe impl Send for Mapping {}
// SAFETY: as above: every access through `&Mapping` goes through atomic views.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `fd`.
    ///
    /// The caller must have checked that `fd` is a memfd sealed with `F_SEAL_SHRINK` and at
    /// least `len` bytes long (invariant 3); `len < ENTRIES_OFFSET` is refused here.
    pub(crate) fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        if len < ENTRIES_OFFSET as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mapping smaller than the region's header pages",
            ));
        }
        Ok(Self {
            raw: RawMapping::new(fd, 0, len)?,
        })
    }

    /// The mapping's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.raw.len
    }

    /// The host page at offset 0.
    #[inline]
    pub(crate) fn host_page(&self) -> &HostPage {
        let page = self
            .raw
            .ptr
            .as_ptr()
            .wrapping_add(HOST_PAGE_OFFSET as usize);
        // SAFETY: the host page lies at offset 0 of a page-aligned mapping at least
        // `ENTRIES_OFFSET` long (invariant 2), so `HostPage` (72 bytes, align 8) is in bounds
        // and aligned; its fields are atomics, valid for every bit pattern and for concurrent
        // access from the peer; the memory outlives `&self` (invariant 1) and cannot vanish
        // under us (invariant 3).
        unsafe { &*page.cast::<HostPage>() }
    }

    /// The VMM page at offset 4096.
    #[inline]
    pub(crate) fn vmm_page(&self) -> &VmmPage {
        let page = self.raw.ptr.as_ptr().wrapping_add(VMM_PAGE_OFFSET as usize);
        // SAFETY: as for `host_page`: offset 4096 of the mapping is page-aligned and the 68
        // bytes of `VmmPage` end before `ENTRIES_OFFSET <= len`.
        unsafe { &*page.cast::<VmmPage>() }
    }

    /// `count` 64-bit words from `ENTRIES_OFFSET`, or `None` if they do not fit the mapping.
    #[inline]
    pub(crate) fn entry_words(&self, count: usize) -> Option<&[AtomicU64]> {
        self.words_at(ENTRIES_OFFSET as usize, count)
    }

    /// `count` 64-bit words from byte `offset`, or `None` unless `offset` is 8-aligned and the
    /// words end inside the mapping.
    #[inline]
    pub(crate) fn words_at(&self, offset: usize, count: usize) -> Option<&[AtomicU64]> {
        let end = count.checked_mul(8)?.checked_add(offset)?;
        if end > self.raw.len || !offset.is_multiple_of(8) {
            return None;
        }
        let words = self.raw.ptr.as_ptr().wrapping_add(offset);
        // SAFETY: `offset` is 8-aligned in a page-aligned mapping, the `count` words end inside
        // it (checked just above), `AtomicU64` is valid for every bit pattern and for concurrent
        // access, and the memory outlives `&self` (invariants 1 and 3).
        Some(unsafe { core::slice::from_raw_parts(words.cast::<AtomicU64>(), count) })
    }
}

/// A `MAP_SHARED` read-write mapping of `len` bytes of a sealed memfd from a page-aligned file
/// offset, seen only as 64-bit words (guest memory: no header pages, any whole number of pages).
///
/// Invariants, established by [`WordMapping::new`] and relied on by [`WordMapping::words`]:
/// 1. `ptr..ptr + len` is mapped for as long as `self` lives (unmapped only when its `RawMapping` drops);
/// 2. `ptr` is page-aligned and `len` a non-zero multiple of 8;
/// 3. the file under it cannot shrink below `offset + len` (the caller checked `F_SEAL_SHRINK`
///    and the file's size), so no access inside `len` can raise `SIGBUS`.
#[derive(Debug)]
pub(crate) struct WordMapping {
    raw: RawMapping,
}

// SAFETY: as for `Mapping`: the only view is a slice of atomics.
unsafe impl Send for WordMapping {}
// SAFETY: as above.
unsafe impl Sync for WordMapping {}

impl WordMapping {
    /// Maps `len` bytes of `fd` from file offset `offset`.
    ///
    /// The caller must have checked that `fd` is a memfd sealed with `F_SEAL_SHRINK` and at
    /// least `offset + len` bytes long (invariant 3); a zero `len`, one not a multiple of 8 or
    /// an offset not page-aligned is refused here.
    pub(crate) fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(8) || !offset.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty or unaligned guest memory mapping",
            ));
        }
        Ok(Self {
            raw: RawMapping::new(fd, offset, len)?,
        })
    }

    /// The whole mapping as 64-bit words.
    #[inline]
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` is page-aligned and `len` a multiple of 8 (invariant 2), so the
        // `len / 8` words are in bounds and aligned; `AtomicU64` is valid for every bit pattern
        // and for concurrent access; the memory outlives `&self` (invariants 1 and 3).
        unsafe {
            core::slice::from_raw_parts(self.raw.ptr.as_ptr().cast::<AtomicU64>(), self.raw.len / 8)
        }
    }
}

/// The one `mmap` of this module and its `munmap`: `len` bytes of `fd` from file offset
/// `offset`, shared and read-write, unmapped once, when dropped. [`Mapping`] and
/// [`WordMapping`] are the typed views over it.
#[derive(Debug)]
struct RawMapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl RawMapping {
    /// Maps `len` bytes of `fd` from `offset`. The callers check what makes accesses safe
    /// (seals, file size, alignment of their views); `len == 0` and an offset that is not
    /// page-aligned are refused here, as `mmap` requires.
    fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        if len == 0 || !offset.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty mapping or offset not page-aligned",
            ));
        }
        // SAFETY:
        // 1. A null hint lets the kernel choose the address, so no existing mapping is replaced.
        // 2. `MAP_SHARED` of a file we hold an fd for; `len` is non-zero and `offset` is
        //    page-aligned (checked above), as `mmap` requires.
        // 3. The returned pointer is used only through `RawMapping` and the views that own it,
        //    and unmapped once, in `Drop`.
        let ptr = unsafe {
            rustix::mm::mmap(
                core::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is the mapping `new` created and nothing else unmaps it; the
        // views that own this value hand out no reference that outlives them, so none
        // survives this call.
        let result = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert!(
            result.is_ok(),
            "munmap of our own mapping failed: {result:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use rustix::fs::MemfdFlags;

    use super::*;
    use crate::sync::Ordering;

    fn memfd(name: &str, len: u64) -> OwnedFd {
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        fd
    }

    /// How many of this process's mappings are of the memfd called `name`.
    fn mappings_of(name: &str) -> usize {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let needle = format!("/memfd:{name} ");
        maps.lines().filter(|line| line.contains(&needle)).count()
    }

    #[test]
    fn a_mapping_hands_out_only_aligned_words_inside_it() {
        let fd = memfd("iopf-mapping-bounds", 3 * 4096);
        let mapping = Mapping::new(fd.as_fd(), 3 * 4096).unwrap();
        assert_eq!(mapping.len(), 3 * 4096);
        let entries = 4096 / 8;
        assert_eq!(mapping.entry_words(1).map(<[_]>::len), Some(1));
        assert_eq!(mapping.entry_words(entries).map(<[_]>::len), Some(entries));
        assert!(
            mapping.entry_words(entries + 1).is_none(),
            "one word past the end"
        );
        assert!(mapping.words_at(8196, 1).is_none(), "not 8-aligned");
        assert!(mapping.words_at(usize::MAX, 1).is_none(), "overflows");
    }

    #[test]
    fn a_word_mapping_is_its_range_of_the_file_word_by_word() {
        let fd = memfd("iopf-word-mapping", 3 * 4096);
        let mapping = WordMapping::new(fd.as_fd(), 4096, 2 * 4096).unwrap();
        let words = mapping.words();
        assert_eq!(words.len(), 2 * 4096 / 8);
        words[words.len() - 1].store(0x1122_3344_5566_7788, Ordering::Relaxed);
        let mut bytes = [0u8; 8];
        rustix::io::pread(&fd, &mut bytes, 3 * 4096 - 8).unwrap();
        assert_eq!(u64::from_le_bytes(bytes), 0x1122_3344_5566_7788);
    }

    #[test]
    fn dropping_a_mapping_unmaps_it() {
        let name = "iopf-mapping-unmapped-on-drop";
        let fd = memfd(name, 3 * 4096);
        let mapping = Mapping::new(fd.as_fd(), 3 * 4096).unwrap();
        let words = WordMapping::new(fd.as_fd(), 0, 4096).unwrap();
        assert_eq!(mappings_of(name), 2);
        drop(mapping);
        assert_eq!(mappings_of(name), 1);
        drop(words);
        assert_eq!(mappings_of(name), 0);
    }
}
