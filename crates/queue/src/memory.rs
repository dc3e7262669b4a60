//! Typed views of a queue region's memory, and the trait every backing store implements.
//!
//! A region's memory is shared with a process we do not trust, so we only ever touch it through
//! atomics: every access is a single, well-defined load or store whatever the peer does at the
//! same moment, and a torn or garbage value is just a value, to be validated before use.
//! Relaxed atomic loads and stores compile to plain `mov`s, so this costs nothing on x86-64.

use iopf_abi::{HostPageHeader, QueueGeometry, VmmPageHeader};

use crate::sync::{AtomicU16, AtomicU32, AtomicU64, Ordering};

/// The host page (offset 0) as the running code sees it: `HostPageHeader`'s layout, in atomics.
///
/// Only the host writes it; a VMM can still scribble on it (the mapping is shared and
/// writable), so the host never reads its own page back to make a decision. The fields are
/// public because they are shared memory that any mapper can write anyway: the rings keep their
/// own copies of the indices and never trust these.
#[repr(C)]
#[derive(Debug)]
pub struct HostPage {
    /// `magic`.
    pub magic: AtomicU32,
    /// `version`.
    pub version: AtomicU16,
    /// `kind`.
    pub kind: AtomicU16,
    /// `entry_size`.
    pub entry_size: AtomicU32,
    /// `nb_entries`.
    pub nb_entries: AtomicU32,
    /// `offset`.
    pub offset: AtomicU32,
    /// `flags`.
    pub flags: AtomicU32,
    /// `lost`.
    pub lost: AtomicU64,
    /// `rejected`.
    pub rejected: AtomicU64,
    /// `reserved`.
    pub reserved: [AtomicU32; 6],
    /// `index` (second cache line): the response queue's `cons`; unused in a fault queue.
    pub index: AtomicU32,
    /// `pad`.
    pub pad: AtomicU32,
}

/// The VMM page (offset 4096) as the running code sees it: `VmmPageHeader`'s layout, in atomics.
#[repr(C)]
#[derive(Debug)]
pub struct VmmPage {
    /// `abi`.
    pub abi: AtomicU32,
    /// `flags`.
    pub flags: AtomicU32,
    /// `reserved`.
    pub reserved: [AtomicU32; 14],
    /// `index` (second cache line): the fault queue's `cons`; unused in a response queue.
    pub index: AtomicU32,
}

#[cfg(not(loom))]
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    // The atomic views must lie exactly over the ABI's byte layout (`docs/DESIGN.md` §3.1).
    // The VMM page's view may be longer than its header by its alignment padding, never
    // shorter.
    assert!(size_of::<HostPage>() == size_of::<HostPageHeader>());
    assert!(offset_of!(HostPage, pad) == offset_of!(HostPageHeader, pad));
    assert!(offset_of!(HostPage, version) == offset_of!(HostPageHeader, version));
    assert!(offset_of!(HostPage, kind) == offset_of!(HostPageHeader, kind));
    assert!(offset_of!(HostPage, entry_size) == offset_of!(HostPageHeader, entry_size));
    assert!(offset_of!(HostPage, nb_entries) == offset_of!(HostPageHeader, nb_entries));
    assert!(offset_of!(HostPage, offset) == offset_of!(HostPageHeader, offset));
    assert!(offset_of!(HostPage, flags) == offset_of!(HostPageHeader, flags));
    assert!(offset_of!(HostPage, index) == offset_of!(HostPageHeader, index));
    assert!(offset_of!(HostPage, lost) == offset_of!(HostPageHeader, lost));
    assert!(offset_of!(HostPage, rejected) == offset_of!(HostPageHeader, rejected));
    assert!(offset_of!(HostPage, reserved) == offset_of!(HostPageHeader, reserved));
    assert!(align_of::<HostPage>() <= 4096);
    assert!(offset_of!(VmmPage, index) + 4 == size_of::<VmmPageHeader>());
    assert!(size_of::<VmmPage>() <= 4096);
    assert!(offset_of!(VmmPage, flags) == offset_of!(VmmPageHeader, flags));
    assert!(offset_of!(VmmPage, reserved) == offset_of!(VmmPageHeader, reserved));
    assert!(offset_of!(VmmPage, index) == offset_of!(VmmPageHeader, index));
};

impl HostPage {
    /// Writes a fresh header for `geometry` (host side, at creation).
    pub(crate) fn init(&self, geometry: &QueueGeometry) {
        let h = geometry.host_header();
        self.version.store(h.version.get(), Ordering::Relaxed);
        self.kind.store(h.kind.get(), Ordering::Relaxed);
        self.entry_size.store(h.entry_size.get(), Ordering::Relaxed);
        self.nb_entries.store(h.nb_entries.get(), Ordering::Relaxed);
        self.offset.store(h.offset.get(), Ordering::Relaxed);
        self.flags.store(0, Ordering::Relaxed);
        self.lost.store(0, Ordering::Relaxed);
        self.rejected.store(0, Ordering::Relaxed);
        for word in &self.reserved {
            word.store(0, Ordering::Relaxed);
        }
        self.index.store(0, Ordering::Relaxed);
        self.pad.store(0, Ordering::Relaxed);
        // Magic last: a reader that sees it sees a complete header (the fd crosses to the
        // other process through a syscall, which orders this anyway).
        self.magic.store(h.magic.get(), Ordering::Release);
    }

    /// A copy of the header as it is now (any values: validate before use).
    pub fn snapshot(&self) -> HostPageHeader {
        HostPageHeader {
            magic: self.magic.load(Ordering::Acquire).into(),
            version: self.version.load(Ordering::Relaxed).into(),
            kind: self.kind.load(Ordering::Relaxed).into(),
            entry_size: self.entry_size.load(Ordering::Relaxed).into(),
            nb_entries: self.nb_entries.load(Ordering::Relaxed).into(),
            offset: self.offset.load(Ordering::Relaxed).into(),
            flags: self.flags.load(Ordering::Relaxed).into(),
            lost: self.lost.load(Ordering::Relaxed).into(),
            rejected: self.rejected.load(Ordering::Relaxed).into(),
            reserved: core::array::from_fn(|i| self.reserved[i].load(Ordering::Relaxed).into()),
            index: self.index.load(Ordering::Relaxed).into(),
            pad: self.pad.load(Ordering::Relaxed).into(),
        }
    }
}

impl VmmPage {
    /// A copy of the page as it is now (any values: validate before use).
    pub fn snapshot(&self) -> VmmPageHeader {
        VmmPageHeader {
            abi: self.abi.load(Ordering::Relaxed).into(),
            flags: self.flags.load(Ordering::Relaxed).into(),
            reserved: core::array::from_fn(|i| self.reserved[i].load(Ordering::Relaxed).into()),
            index: self.index.load(Ordering::Relaxed).into(),
        }
    }
}

/// Memory that holds one queue region: its two pages and its entries, as atomics.
///
/// Implemented by [`QueueRegion`](crate::QueueRegion) (a shared memfd mapping) and by
/// [`HeapMemory`] (private memory, for single-process use and for the loom model).
pub trait QueueMemory {
    /// The region's shape, as the side holding this memory knows it (never re-read from the
    /// shared pages).
    fn geometry(&self) -> QueueGeometry;
    /// The host page.
    fn host_page(&self) -> &HostPage;
    /// The VMM page.
    fn vmm_page(&self) -> &VmmPage;
    /// The entries, as `nb_entries * entry_size / 8` little-endian 64-bit words.
    fn entry_words(&self) -> &[AtomicU64];
}

macro_rules! impl_for_arc {
    ($arc:ident) => {
        impl<M: QueueMemory + ?Sized> QueueMemory for $arc<M> {
            #[inline]
            fn geometry(&self) -> QueueGeometry {
                (**self).geometry()
            }
            #[inline]
            fn host_page(&self) -> &HostPage {
                (**self).host_page()
            }
            #[inline]
            fn vmm_page(&self) -> &VmmPage {
                (**self).vmm_page()
            }
            #[inline]
            fn entry_words(&self) -> &[AtomicU64] {
                (**self).entry_words()
            }
        }
    };
}

use std::sync::Arc;
impl_for_arc!(Arc);

#[cfg(loom)]
mod loom_arc {
    use super::*;
    use loom::sync::Arc as LoomArc;
    impl_for_arc!(LoomArc);
}

/// A queue region in private memory: both ends in one process (tests, the loom model, a host
/// that runs its consumer in-process).
#[derive(Debug)]
pub struct HeapMemory {
    geometry: QueueGeometry,
    host: HostPage,
    vmm: VmmPage,
    entries: Box<[AtomicU64]>,
}

impl HeapMemory {
    /// A fresh region with an initialised host page and a zeroed VMM page.
    pub fn new(geometry: QueueGeometry) -> Self {
        let words = (geometry.nb_entries() * geometry.entry_size() / 8) as usize;
        let memory = Self {
            geometry,
            host: HostPage {
                magic: AtomicU32::new(0),
                version: AtomicU16::new(0),
                kind: AtomicU16::new(0),
                entry_size: AtomicU32::new(0),
                nb_entries: AtomicU32::new(0),
                offset: AtomicU32::new(0),
                flags: AtomicU32::new(0),
                lost: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                reserved: core::array::from_fn(|_| AtomicU32::new(0)),
                index: AtomicU32::new(0),
                pad: AtomicU32::new(0),
            },
            vmm: VmmPage {
                abi: AtomicU32::new(0),
                flags: AtomicU32::new(0),
                reserved: core::array::from_fn(|_| AtomicU32::new(0)),
                index: AtomicU32::new(0),
            },
            entries: (0..words).map(|_| AtomicU64::new(0)).collect(),
        };
        memory.host.init(&geometry);
        memory
    }
}

impl QueueMemory for HeapMemory {
    #[inline]
    fn geometry(&self) -> QueueGeometry {
        self.geometry
    }
    #[inline]
    fn host_page(&self) -> &HostPage {
        &self.host
    }
    #[inline]
    fn vmm_page(&self) -> &VmmPage {
        &self.vmm
    }
    #[inline]
    fn entry_words(&self) -> &[AtomicU64] {
        &self.entries
    }
}
