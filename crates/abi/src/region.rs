//! The queue region: a host page, a VMM page, then the entries.

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{FaultRecord, RegionError, ResponseRecord};

/// `magic`: the bytes "IOPF" read as a little-endian `u32`.
pub const REGION_MAGIC: u32 = 0x4650_4F49;
/// The region layout version this crate speaks.
pub const REGION_VERSION: u16 = 2;
/// Size of each header page.
pub const PAGE_SIZE: u32 = 4096;
/// Offset of the host page.
pub const HOST_PAGE_OFFSET: u32 = 0;
/// Offset of the VMM page.
pub const VMM_PAGE_OFFSET: u32 = PAGE_SIZE;
/// Offset of entry 0.
pub const ENTRIES_OFFSET: u32 = 2 * PAGE_SIZE;
/// Smallest ring.
pub const MIN_ENTRIES: u32 = 2;
/// Largest ring.
pub const MAX_ENTRIES: u32 = 65536;

/// Host page `flags` bit 0: a fault handler is registered.
pub const HOST_FLAG_LIVE: u32 = 1 << 0;
/// `flags` bit 1 (either page): the consumer of this queue is about to sleep on its doorbell.
pub const FLAG_NEED_WAKEUP: u32 = 1 << 1;
/// Host page flags ABI v2 defines.
pub const HOST_FLAGS_ALL: u32 = HOST_FLAG_LIVE | FLAG_NEED_WAKEUP;
/// VMM page flags ABI v2 defines.
pub const VMM_FLAGS_ALL: u32 = FLAG_NEED_WAKEUP;

/// VMM page `abi` value of a VMM that speaks ABI v2 (the only ABI; 0 = not attached).
pub const VMM_ABI: u32 = 2;

/// Offset of the consumer index (`index`) in either header page: alone in the page's second
/// cache line, so that the consumer's stores to it never evict the line its peer polls
/// (`flags`, `abi`).
pub const INDEX_OFFSET: u32 = 64;

/// The high half of every valid record mark (bit 32): a zeroed slot is never a valid mark.
pub const MARK_VALID: u64 = 1 << 32;

/// The mark of the record at free-running index `index`: [`MARK_VALID`] `| index`.
///
/// A producer writes it into the last 8 bytes of the record (`FaultRecord::mark`,
/// `ResponseRecord::mark`) with a single release store after the rest of the record; the
/// consumer of index `i` acquires it and reads the record only if it equals `mark(i)`. The
/// mark of the previous pass, `mark(i - nb_entries)`, or 0 (a slot never written) means "not
/// yet"; any other value is a protocol error (a stale, skipped or forged mark).
#[inline]
pub const fn mark(index: u32) -> u64 {
    MARK_VALID | index as u64
}

/// Which way records flow through a queue region.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u16)]
pub enum QueueKind {
    /// Host produces 64-byte fault records, the VMM consumes them.
    Fault = 1,
    /// The VMM produces 32-byte response records, the host consumes them.
    Response = 2,
}

impl QueueKind {
    /// The kind for its ABI value.
    pub const fn from_raw(raw: u16) -> Result<Self, RegionError> {
        match raw {
            1 => Ok(Self::Fault),
            2 => Ok(Self::Response),
            other => Err(RegionError::UnknownKind(other)),
        }
    }

    /// Bytes per entry: 64 for faults, 32 for responses.
    pub const fn entry_size(self) -> u32 {
        match self {
            Self::Fault => core::mem::size_of::<FaultRecord>() as u32,
            Self::Response => core::mem::size_of::<ResponseRecord>() as u32,
        }
    }
}

impl fmt::Display for QueueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fault => "fault",
            Self::Response => "response",
        })
    }
}

/// The host page's header (offset 0), as bytes in the region. Written only by the host.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Debug,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct HostPageHeader {
    /// Offset 0: [`REGION_MAGIC`].
    pub magic: U32,
    /// Offset 4: [`REGION_VERSION`].
    pub version: U16,
    /// Offset 6: [`QueueKind`].
    pub kind: U16,
    /// Offset 8: bytes per entry.
    pub entry_size: U32,
    /// Offset 12: entries in the ring (power of two).
    pub nb_entries: U32,
    /// Offset 16: offset of entry 0 ([`ENTRIES_OFFSET`]).
    pub offset: U32,
    /// Offset 20: [`HOST_FLAG_LIVE`], [`FLAG_NEED_WAKEUP`].
    pub flags: U32,
    /// Offset 24: fault queue: records dropped because the ring was full.
    pub lost: U64,
    /// Offset 32: response queue: responses refused.
    pub rejected: U64,
    /// Offset 40: 0, to the end of the first cache line.
    pub reserved: [U32; 6],
    /// Offset 64 ([`INDEX_OFFSET`]): response queue `cons` (the host's consumer index);
    /// fault queue: 0 (a producer publishes no index in ABI v2).
    pub index: U32,
    /// Offset 68: 0 (the C structure's size is a multiple of its 8-byte alignment).
    pub pad: U32,
}

const _: () = assert!(core::mem::size_of::<HostPageHeader>() == 72);
const _: () = assert!(core::mem::offset_of!(HostPageHeader, index) == INDEX_OFFSET as usize);

/// The VMM page's header (offset 4096), as bytes in the region. Written only by the VMM.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Debug,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct VmmPageHeader {
    /// Offset 0: ABI version the VMM speaks; 0 = not attached.
    pub abi: U32,
    /// Offset 4: [`FLAG_NEED_WAKEUP`] (fault queue only).
    pub flags: U32,
    /// Offset 8: 0, to the end of the first cache line.
    pub reserved: [U32; 14],
    /// Offset 64 ([`INDEX_OFFSET`]): fault queue `cons` (the VMM's consumer index); response
    /// queue: not read by the ring (a producer publishes no index in ABI v2).
    pub index: U32,
}

const _: () = assert!(core::mem::size_of::<VmmPageHeader>() == 68);
const _: () = assert!(core::mem::offset_of!(VmmPageHeader, index) == INDEX_OFFSET as usize);

/// The shape of a queue region: its kind and ring size, from which every offset follows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct QueueGeometry {
    kind: QueueKind,
    nb_entries: u32,
}

impl QueueGeometry {
    /// A geometry, or an error unless `nb_entries` is a power of two in 2..=65536.
    pub const fn new(kind: QueueKind, nb_entries: u32) -> Result<Self, RegionError> {
        if nb_entries < MIN_ENTRIES || nb_entries > MAX_ENTRIES || !nb_entries.is_power_of_two() {
            return Err(RegionError::BadEntryCount(nb_entries));
        }
        Ok(Self { kind, nb_entries })
    }

    /// Reads and checks a host page header found in a region of `region_len` bytes: magic,
    /// version, kind (which must be `expected`), entry size, entry count, offset, flags, the
    /// reserved word, and that the entries fit in the region.
    pub fn from_host_header(
        header: &HostPageHeader,
        expected: QueueKind,
        region_len: u64,
    ) -> Result<Self, RegionError> {
        let header_len = u64::from(ENTRIES_OFFSET);
        if region_len < header_len {
            return Err(RegionError::TooSmall {
                needed: header_len,
                len: region_len,
            });
        }
        if header.magic.get() != REGION_MAGIC {
            return Err(RegionError::BadMagic(header.magic.get()));
        }
        if header.version.get() != REGION_VERSION {
            return Err(RegionError::UnsupportedVersion(header.version.get()));
        }
        let kind = QueueKind::from_raw(header.kind.get())?;
        if kind != expected {
            return Err(RegionError::WrongKind {
                expected,
                found: kind,
            });
        }
        if header.entry_size.get() != kind.entry_size() {
            return Err(RegionError::BadEntrySize {
                kind,
                expected: kind.entry_size(),
                found: header.entry_size.get(),
            });
        }
        let geometry = Self::new(kind, header.nb_entries.get())?;
        if header.offset.get() != ENTRIES_OFFSET {
            return Err(RegionError::BadOffset(header.offset.get()));
        }
        // `NEED_WAKEUP` in the host page belongs to the host consumer of a response queue.
        let allowed = match kind {
            QueueKind::Fault => HOST_FLAG_LIVE,
            QueueKind::Response => HOST_FLAGS_ALL,
        };
        let flags = header.flags.get();
        if flags & !allowed != 0 {
            return Err(RegionError::UnknownFlags(flags & !allowed));
        }
        if let Some(word) = header
            .reserved
            .iter()
            .chain([&header.pad])
            .find(|w| w.get() != 0)
        {
            return Err(RegionError::ReservedNonZero(word.get()));
        }
        if region_len < geometry.region_len() {
            return Err(RegionError::TooSmall {
                needed: geometry.region_len(),
                len: region_len,
            });
        }
        Ok(geometry)
    }

    /// The queue's kind.
    pub const fn kind(&self) -> QueueKind {
        self.kind
    }

    /// Entries in the ring.
    pub const fn nb_entries(&self) -> u32 {
        self.nb_entries
    }

    /// Bytes per entry.
    pub const fn entry_size(&self) -> u32 {
        self.kind.entry_size()
    }

    /// Offset of entry 0 in the region.
    pub const fn offset(&self) -> u32 {
        ENTRIES_OFFSET
    }

    /// Offset of the entry that free-running index `index` names.
    pub const fn entry_offset(&self, index: u32) -> u64 {
        ENTRIES_OFFSET as u64 + (index & (self.nb_entries - 1)) as u64 * self.entry_size() as u64
    }

    /// Bytes the region needs: both pages and every entry (at most 8 KiB + 4 MiB).
    pub const fn region_len(&self) -> u64 {
        ENTRIES_OFFSET as u64 + self.nb_entries as u64 * self.entry_size() as u64
    }

    /// The host page header a host writes when it creates the region.
    pub fn host_header(&self) -> HostPageHeader {
        HostPageHeader {
            magic: REGION_MAGIC.into(),
            version: REGION_VERSION.into(),
            kind: (self.kind as u16).into(),
            entry_size: self.entry_size().into(),
            nb_entries: self.nb_entries.into(),
            offset: ENTRIES_OFFSET.into(),
            ..HostPageHeader::default()
        }
    }
}
