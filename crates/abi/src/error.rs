//! Why a record or a region header was refused.

use thiserror::Error;

/// A fault or response record that does not follow ABI v2.
///
/// Decoders are strict: a field that the record's flags say is absent must be zero, and every
/// reserved byte must be zero, so that each accepted record has exactly one encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// `type` is neither 1 (unrecoverable) nor 2 (page request).
    #[error("unknown fault type {0} (expected 1 or 2)")]
    UnknownFaultType(u32),
    /// A reserved field, or a field the record's flags mark absent, is not zero.
    #[error("field `{field}` must be zero here, found {value:#x}")]
    NonZero {
        /// The field, as named in the ABI.
        field: &'static str,
        /// What it held.
        value: u64,
    },
    /// A flags or permission field has bits ABI v2 does not define.
    #[error("field `{field}` has undefined bits {bits:#x}")]
    UnknownBits {
        /// The field, as named in the ABI.
        field: &'static str,
        /// The undefined bits that were set.
        bits: u32,
    },
    /// A page request or response carries cookie 0.
    #[error("cookie 0 is reserved")]
    ZeroCookie,
    /// A PASID wider than 20 bits.
    #[error("PASID {0:#x} does not fit in 20 bits")]
    PasidOutOfRange(u32),
    /// A PRG index wider than 9 bits.
    #[error("PRG index {0} does not fit in 9 bits")]
    PrgIndexOutOfRange(u32),
    /// An unrecoverable fault's reason is not one of 0..=8.
    #[error("unknown unrecoverable fault reason {0} (expected 0..=8)")]
    UnknownReason(u32),
    /// A response code other than 0 (success), 1 (invalid), 2 (failure).
    #[error("unknown response code {0} (expected 0, 1 or 2)")]
    UnknownResponseCode(u32),
    /// A response record whose version is not 1.
    #[error("response version {0} is not supported (expected 1)")]
    UnsupportedResponseVersion(u32),
    /// A page request address that is not 4 KiB aligned.
    #[error("page request address {0:#x} is not 4 KiB aligned")]
    UnalignedPageAddress(u64),
    /// A page request whose device, PASID or PRG index differ from those of the first request
    /// of its group (a backend that delivers whole groups checks this).
    #[error("page request does not belong to its group: {field} differs")]
    InconsistentGroup {
        /// The field that differs, as named in the ABI.
        field: &'static str,
    },
}

/// A queue region whose header or size is inconsistent with ABI v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RegionError {
    /// The region is smaller than its header pages, or than its header says.
    #[error("region is {len} bytes, needs at least {needed}")]
    TooSmall {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        len: u64,
    },
    /// `magic` is not "IOPF".
    #[error("bad magic {0:#010x} (expected 0x46504f49, \"IOPF\")")]
    BadMagic(u32),
    /// `version` is not one this build speaks.
    #[error("unsupported region version {0} (this build speaks ABI v2 only)")]
    UnsupportedVersion(u16),
    /// `kind` is neither 1 (fault queue) nor 2 (response queue).
    #[error("unknown queue kind {0} (expected 1 or 2)")]
    UnknownKind(u16),
    /// The region is a valid queue of the other kind.
    #[error("region is a {found} queue, expected a {expected} queue")]
    WrongKind {
        /// The kind the caller asked for.
        expected: crate::QueueKind,
        /// The kind the header names.
        found: crate::QueueKind,
    },
    /// `entry_size` does not match the kind (64 for faults, 32 for responses).
    #[error("entry size {found} does not match a {kind} queue (expected {expected})")]
    BadEntrySize {
        /// The queue's kind.
        kind: crate::QueueKind,
        /// The size the kind requires.
        expected: u32,
        /// The size the header names.
        found: u32,
    },
    /// `nb_entries` is not a power of two in 2..=65536.
    #[error("entry count {0} is not a power of two in 2..=65536")]
    BadEntryCount(u32),
    /// `offset` is not 8192.
    #[error("entry offset {0} is not 8192")]
    BadOffset(u32),
    /// `flags` has bits ABI v2 does not define for this page.
    #[error("header flags have undefined bits {0:#x}")]
    UnknownFlags(u32),
    /// A reserved word of the header is not zero.
    #[error("header reserved word is {0:#x}, expected 0")]
    ReservedNonZero(u32),
}
