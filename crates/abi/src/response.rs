//! The 32-byte response record: the seed's `struct iommu_page_response` v1, plus the cookie.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{Cookie, DecodeError, Pasid, PrgIndex};

/// The only response record version ABI v2 defines.
pub const RESPONSE_VERSION: u32 = 1;

/// Response `flags`: the `pasid` field is valid (`IOMMU_PAGE_RESP_PASID_VALID`).
pub const RESPONSE_PASID_VALID: u32 = 1 << 0;

/// A response record exactly as it lies in a response queue slot (32 bytes, little-endian).
///
/// It comes from the VMM, so nothing in it is trusted: [`ResponseRecord::decode`] checks every
/// field the ABI fixes. Whether the cookie names a pending group is the fault core's question.
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
pub struct ResponseRecord {
    /// Offset 0: 1.
    pub version: U32,
    /// Offset 4: `PASID_VALID` (bit 0).
    pub flags: U32,
    /// Offset 8: the group's PASID.
    pub pasid: U32,
    /// Offset 12: the group's PRG index.
    pub grpid: U32,
    /// Offset 16: 0 success, 1 invalid, 2 failure.
    pub code: U32,
    /// Offset 20: the group's cookie.
    pub cookie: U32,
    /// Offset 24: the ring's mark ([`mark`](crate::mark) of the record's index), written last
    /// by the producer with a release store. Not part of the response:
    /// [`decode`](Self::decode) ignores it, and a ring hands records over with it zeroed.
    pub mark: U64,
}

const _: () = assert!(core::mem::size_of::<ResponseRecord>() == 32);

/// The answer to a page request group (`enum iommu_page_response_code`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum ResponseCode {
    /// The page is mapped now: the device retries the translation.
    Success = 0,
    /// The request cannot be satisfied: the device fails that access ("Invalid Request").
    Invalid = 1,
    /// Catastrophic error: the device stops issuing page requests ("Response Failure").
    Failure = 2,
}

impl ResponseCode {
    /// The code for its ABI value, or an error for anything but 0, 1, 2.
    pub const fn from_raw(raw: u32) -> Result<Self, DecodeError> {
        Ok(match raw {
            0 => Self::Success,
            1 => Self::Invalid,
            2 => Self::Failure,
            other => return Err(DecodeError::UnknownResponseCode(other)),
        })
    }
}

/// A decoded page response: the guest's answer to one page request group.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PageResponse {
    /// The cookie of the group it answers.
    pub cookie: Cookie,
    /// The group's PASID, if the group had one.
    pub pasid: Option<Pasid>,
    /// The group's PRG index.
    pub grpid: PrgIndex,
    /// The answer.
    pub code: ResponseCode,
}

impl PageResponse {
    /// The response to `request`'s group with `code`: its cookie, PASID and PRG index.
    #[inline]
    pub fn answering(request: &crate::PageRequest, code: ResponseCode) -> Self {
        Self {
            cookie: request.cookie,
            pasid: request.pasid,
            grpid: request.grpid,
            code,
        }
    }
}

impl ResponseRecord {
    /// Validates the record against ABI v2 and returns the response it carries.
    #[inline]
    pub fn decode(&self) -> Result<PageResponse, DecodeError> {
        let version = self.version.get();
        if version != RESPONSE_VERSION {
            return Err(DecodeError::UnsupportedResponseVersion(version));
        }
        let flags = self.flags.get();
        if flags & !RESPONSE_PASID_VALID != 0 {
            return Err(DecodeError::UnknownBits {
                field: "flags",
                bits: flags & !RESPONSE_PASID_VALID,
            });
        }
        let raw_pasid = self.pasid.get();
        let pasid = if flags & RESPONSE_PASID_VALID != 0 {
            Some(Pasid::new(raw_pasid)?)
        } else if raw_pasid != 0 {
            return Err(DecodeError::NonZero {
                field: "pasid",
                value: raw_pasid.into(),
            });
        } else {
            None
        };
        Ok(PageResponse {
            cookie: Cookie::new(self.cookie.get())?,
            pasid,
            grpid: PrgIndex::new(self.grpid.get())?,
            code: ResponseCode::from_raw(self.code.get())?,
        })
    }
}

impl From<&PageResponse> for ResponseRecord {
    #[inline]
    fn from(r: &PageResponse) -> Self {
        ResponseRecord {
            version: RESPONSE_VERSION.into(),
            flags: if r.pasid.is_some() {
                RESPONSE_PASID_VALID
            } else {
                0
            }
            .into(),
            pasid: r.pasid.map_or(0, Pasid::get).into(),
            grpid: u32::from(r.grpid.get()).into(),
            code: (r.code as u32).into(),
            cookie: r.cookie.get().into(),
            mark: 0.into(),
        }
    }
}
