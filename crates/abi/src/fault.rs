//! The 64-byte fault record: the seed's `struct iommu_fault`, with the cookie in its padding.

use bitflags::bitflags;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{Cookie, DecodeError, PageAddr, Pasid, PrgIndex};

/// `type` of an unrecoverable fault (`IOMMU_FAULT_DMA_UNRECOV`).
pub const FAULT_TYPE_UNRECOVERABLE: u32 = 1;
/// `type` of a page request (`IOMMU_FAULT_PAGE_REQ`).
pub const FAULT_TYPE_PAGE_REQUEST: u32 = 2;

/// A fault record exactly as it lies in a fault queue slot (64 bytes, little-endian).
///
/// Every bit pattern is a `FaultRecord`; [`FaultRecord::decode`] says whether it is a valid
/// fault. The field names are the page request's; the unrecoverable fault uses the same words
/// for other fields (see the table in `docs/ABI.md` and the accessors of [`Fault`]).
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
pub struct FaultRecord {
    /// Offset 0: 1 unrecoverable, 2 page request.
    pub fault_type: U32,
    /// Offset 4: the group's cookie (page request), 0 (unrecoverable).
    pub cookie: U32,
    /// Offset 8: page request `flags`; unrecoverable `reason`.
    pub word2: U32,
    /// Offset 12: page request `pasid`; unrecoverable `flags`.
    pub word3: U32,
    /// Offset 16: page request `grpid`; unrecoverable `pasid`.
    pub word4: U32,
    /// Offset 20: `perm` in both.
    pub perm: U32,
    /// Offset 24: `addr` in both.
    pub addr: U64,
    /// Offset 32: page request `private_data[0]`; unrecoverable `fetch_addr`.
    pub data0: U64,
    /// Offset 40: page request `private_data[1]`; unrecoverable: 0.
    pub data1: U64,
    /// Offset 48: reserved, 0.
    pub reserved: U64,
    /// Offset 56: the ring's mark ([`mark`](crate::mark) of the record's index), written last
    /// by the producer with a release store. Not part of the fault: [`decode`](Self::decode)
    /// ignores it, and a ring hands records over with it zeroed.
    pub mark: U64,
}

const _: () = assert!(core::mem::size_of::<FaultRecord>() == 64);

bitflags! {
    /// Access permissions of a faulting access (`IOMMU_FAULT_PERM_*`).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct Perm: u32 {
        /// Read access.
        const READ = 1 << 0;
        /// Write access.
        const WRITE = 1 << 1;
        /// Instruction fetch.
        const EXEC = 1 << 2;
        /// Privileged (supervisor) access.
        const PRIV = 1 << 3;
    }
}

/// Page request `flags` (`IOMMU_FAULT_PAGE_REQUEST_*`).
pub mod page_request_flags {
    /// The `pasid` field is valid.
    pub const PASID_VALID: u32 = 1 << 0;
    /// Last request of its page request group.
    pub const LAST_PAGE: u32 = 1 << 1;
    /// `private_data` is valid.
    pub const PRIV_DATA: u32 = 1 << 2;
    /// Every flag ABI v2 defines.
    pub const ALL: u32 = PASID_VALID | LAST_PAGE | PRIV_DATA;
}

/// Unrecoverable fault `flags` (`IOMMU_FAULT_UNRECOV_*`).
pub mod unrecoverable_flags {
    /// The `pasid` field is valid.
    pub const PASID_VALID: u32 = 1 << 0;
    /// The `addr` field is valid.
    pub const ADDR_VALID: u32 = 1 << 1;
    /// The `fetch_addr` field is valid.
    pub const FETCH_ADDR_VALID: u32 = 1 << 2;
    /// Every flag ABI v2 defines.
    pub const ALL: u32 = PASID_VALID | ADDR_VALID | FETCH_ADDR_VALID;
}

/// Why an unrecoverable fault happened (`enum iommu_fault_reason`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum FaultReason {
    /// No reason given.
    Unknown = 0,
    /// Could not fetch the PASID table entry.
    PasidFetch = 1,
    /// The PASID table entry is invalid or malformed.
    BadPasidEntry = 2,
    /// The PASID is out of range or disabled.
    PasidInvalid = 3,
    /// External abort during the page table walk.
    WalkExternalAbort = 4,
    /// Could not fetch a page table entry.
    PteFetch = 5,
    /// The translation exists but forbids the access.
    Permission = 6,
    /// Access flag fault.
    Access = 7,
    /// The address is outside the translatable range.
    OutOfRangeAddress = 8,
}

impl FaultReason {
    /// The reason for its ABI value, or an error for anything outside 0..=8.
    pub const fn from_raw(raw: u32) -> Result<Self, DecodeError> {
        Ok(match raw {
            0 => Self::Unknown,
            1 => Self::PasidFetch,
            2 => Self::BadPasidEntry,
            3 => Self::PasidInvalid,
            4 => Self::WalkExternalAbort,
            5 => Self::PteFetch,
            6 => Self::Permission,
            7 => Self::Access,
            8 => Self::OutOfRangeAddress,
            other => return Err(DecodeError::UnknownReason(other)),
        })
    }
}

/// One page request of a page request group (PCIe PRI), as the VMM receives it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PageRequest {
    /// The group's cookie; a response must carry it.
    pub cookie: Cookie,
    /// The address space, if the request carried a PASID.
    pub pasid: Option<Pasid>,
    /// The device's PRG index for the group.
    pub grpid: PrgIndex,
    /// The access that faulted.
    pub perm: Perm,
    /// The page the device asks for.
    pub addr: PageAddr,
    /// This is the last request of its group.
    pub last: bool,
    /// Device-specific data, if the request carried some.
    pub private_data: Option<[u64; 2]>,
}

/// A fault the device cannot wait on: reported, never answered.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct UnrecoverableFault {
    /// Why the translation failed.
    pub reason: FaultReason,
    /// The address space, if known.
    pub pasid: Option<Pasid>,
    /// The access that faulted.
    pub perm: Perm,
    /// The faulting address, if known.
    pub addr: Option<u64>,
    /// The address of the table entry whose fetch failed, if known.
    pub fetch_addr: Option<u64>,
}

/// A decoded fault record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Fault {
    /// `type` 1.
    Unrecoverable(UnrecoverableFault),
    /// `type` 2.
    PageRequest(PageRequest),
}

fn zero(field: &'static str, value: u64) -> Result<(), DecodeError> {
    if value == 0 {
        Ok(())
    } else {
        Err(DecodeError::NonZero { field, value })
    }
}

fn known_bits(field: &'static str, value: u32, defined: u32) -> Result<(), DecodeError> {
    let bits = value & !defined;
    if bits == 0 {
        Ok(())
    } else {
        Err(DecodeError::UnknownBits { field, bits })
    }
}

fn perm(value: u32) -> Result<Perm, DecodeError> {
    Perm::from_bits(value).ok_or(DecodeError::UnknownBits {
        field: "perm",
        bits: value & !Perm::all().bits(),
    })
}

/// `Some(value)` when `present`, else checks that the field is zero.
fn optional<T>(
    present: bool,
    field: &'static str,
    raw: u64,
    make: impl FnOnce() -> Result<T, DecodeError>,
) -> Result<Option<T>, DecodeError> {
    if present {
        make().map(Some)
    } else {
        zero(field, raw).map(|()| None)
    }
}

impl FaultRecord {
    /// Validates the record against ABI v2 and returns the fault it carries.
    #[inline]
    pub fn decode(&self) -> Result<Fault, DecodeError> {
        zero("reserved", self.reserved.get())?;
        match self.fault_type.get() {
            FAULT_TYPE_PAGE_REQUEST => self.decode_page_request().map(Fault::PageRequest),
            FAULT_TYPE_UNRECOVERABLE => self.decode_unrecoverable().map(Fault::Unrecoverable),
            other => Err(DecodeError::UnknownFaultType(other)),
        }
    }

    fn decode_page_request(&self) -> Result<PageRequest, DecodeError> {
        use page_request_flags as f;
        let flags = self.word2.get();
        known_bits("flags", flags, f::ALL)?;
        let cookie = Cookie::new(self.cookie.get())?;
        let pasid = optional(
            flags & f::PASID_VALID != 0,
            "pasid",
            self.word3.get().into(),
            || Pasid::new(self.word3.get()),
        )?;
        let grpid = PrgIndex::new(self.word4.get())?;
        let perm = perm(self.perm.get())?;
        let addr = PageAddr::new(self.addr.get())?;
        let (d0, d1) = (self.data0.get(), self.data1.get());
        let private_data = if flags & f::PRIV_DATA != 0 {
            Some([d0, d1])
        } else {
            zero("private_data[0]", d0)?;
            zero("private_data[1]", d1)?;
            None
        };
        Ok(PageRequest {
            cookie,
            pasid,
            grpid,
            perm,
            addr,
            last: flags & f::LAST_PAGE != 0,
            private_data,
        })
    }

    fn decode_unrecoverable(&self) -> Result<UnrecoverableFault, DecodeError> {
        use unrecoverable_flags as f;
        zero("cookie", self.cookie.get().into())?;
        let reason = FaultReason::from_raw(self.word2.get())?;
        let flags = self.word3.get();
        known_bits("flags", flags, f::ALL)?;
        let raw_pasid = self.word4.get();
        let pasid = optional(
            flags & f::PASID_VALID != 0,
            "pasid",
            raw_pasid.into(),
            || Pasid::new(raw_pasid),
        )?;
        let perm = perm(self.perm.get())?;
        let raw_addr = self.addr.get();
        let addr = optional(flags & f::ADDR_VALID != 0, "addr", raw_addr, || {
            Ok(raw_addr)
        })?;
        let raw_fetch = self.data0.get();
        let fetch_addr = optional(
            flags & f::FETCH_ADDR_VALID != 0,
            "fetch_addr",
            raw_fetch,
            || Ok(raw_fetch),
        )?;
        zero("event.reserved[0]", self.data1.get())?;
        Ok(UnrecoverableFault {
            reason,
            pasid,
            perm,
            addr,
            fetch_addr,
        })
    }
}

impl From<&PageRequest> for FaultRecord {
    #[inline]
    fn from(r: &PageRequest) -> Self {
        use page_request_flags as f;
        let mut flags = 0;
        if r.pasid.is_some() {
            flags |= f::PASID_VALID;
        }
        if r.last {
            flags |= f::LAST_PAGE;
        }
        if r.private_data.is_some() {
            flags |= f::PRIV_DATA;
        }
        let [d0, d1] = r.private_data.unwrap_or([0, 0]);
        FaultRecord {
            fault_type: FAULT_TYPE_PAGE_REQUEST.into(),
            cookie: r.cookie.get().into(),
            word2: flags.into(),
            word3: r.pasid.map_or(0, Pasid::get).into(),
            word4: u32::from(r.grpid.get()).into(),
            perm: r.perm.bits().into(),
            addr: r.addr.get().into(),
            data0: d0.into(),
            data1: d1.into(),
            reserved: U64::ZERO,
            mark: U64::ZERO,
        }
    }
}

impl From<&UnrecoverableFault> for FaultRecord {
    #[inline]
    fn from(u: &UnrecoverableFault) -> Self {
        use unrecoverable_flags as f;
        let mut flags = 0;
        if u.pasid.is_some() {
            flags |= f::PASID_VALID;
        }
        if u.addr.is_some() {
            flags |= f::ADDR_VALID;
        }
        if u.fetch_addr.is_some() {
            flags |= f::FETCH_ADDR_VALID;
        }
        FaultRecord {
            fault_type: FAULT_TYPE_UNRECOVERABLE.into(),
            cookie: 0.into(),
            word2: (u.reason as u32).into(),
            word3: flags.into(),
            word4: u.pasid.map_or(0, Pasid::get).into(),
            perm: u.perm.bits().into(),
            addr: u.addr.unwrap_or(0).into(),
            data0: u.fetch_addr.unwrap_or(0).into(),
            data1: 0.into(),
            reserved: U64::ZERO,
            mark: U64::ZERO,
        }
    }
}

impl From<&Fault> for FaultRecord {
    #[inline]
    fn from(f: &Fault) -> Self {
        match f {
            Fault::Unrecoverable(u) => u.into(),
            Fault::PageRequest(r) => r.into(),
        }
    }
}
