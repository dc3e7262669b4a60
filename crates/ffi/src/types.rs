//! The C types and constants of `iopf.h`: plain structs the caller's buffers hold, and the
//! numbers a C VMM needs (answer codes, flags, and the vfio-user side of the protocol).

#![forbid(unsafe_code)]
// The C names are the header's names.
#![allow(non_camel_case_types)]

use iopf_abi::{PageRequest, UnrecoverableFault};
use iopf_vfio_user::device as vu;

/// The handle of an attached device. Never 0; a handle is never reused, so a call with a
/// detached device's handle fails with `-EBADF`.
pub type iopf_device = u64;

/// No device: what the attach calls leave in `*device` when they fail.
pub const IOPF_NO_DEVICE: iopf_device = 0;

/// Answer code: the page is mapped now, the device retries the access.
pub const IOPF_ANSWER_SUCCESS: u32 = 0;
/// Answer code: the request cannot be satisfied, the device fails that access.
pub const IOPF_ANSWER_INVALID: u32 = 1;
/// Answer code: the device stops issuing page requests until PRI is reset (almost never the
/// right answer; an iopf host refuses it unless configured to allow it).
pub const IOPF_ANSWER_FAILURE: u32 = 2;

/// Access permission bit of a faulting access: read.
pub const IOPF_PERM_READ: u32 = 1 << 0;
/// Access permission bit of a faulting access: write.
pub const IOPF_PERM_WRITE: u32 = 1 << 1;
/// Access permission bit of a faulting access: instruction fetch.
pub const IOPF_PERM_EXEC: u32 = 1 << 2;
/// Access permission bit of a faulting access: privileged (supervisor).
pub const IOPF_PERM_PRIV: u32 = 1 << 3;

/// `iopf_group.flags`: `pasid` is valid (the group's requests carried a PASID).
pub const IOPF_GROUP_PASID_VALID: u32 = 1 << 0;

/// `iopf_page_request.flags`: the last request of its group.
pub const IOPF_REQUEST_LAST: u32 = 1 << 0;
/// `iopf_page_request.flags`: `private_data` is valid.
pub const IOPF_REQUEST_PRIV_DATA_VALID: u32 = 1 << 1;

/// `iopf_unrecoverable.flags`: `pasid` is valid.
pub const IOPF_UNRECOVERABLE_PASID_VALID: u32 = 1 << 0;
/// `iopf_unrecoverable.flags`: `addr` is valid.
pub const IOPF_UNRECOVERABLE_ADDR_VALID: u32 = 1 << 1;
/// `iopf_unrecoverable.flags`: `fetch_addr` is valid.
pub const IOPF_UNRECOVERABLE_FETCH_ADDR_VALID: u32 = 1 << 2;

/// `iopf_unrecoverable.reason`: no reason given.
pub const IOPF_REASON_UNKNOWN: u32 = 0;
/// `iopf_unrecoverable.reason`: could not fetch the PASID table entry.
pub const IOPF_REASON_PASID_FETCH: u32 = 1;
/// `iopf_unrecoverable.reason`: the PASID table entry is invalid or malformed.
pub const IOPF_REASON_BAD_PASID_ENTRY: u32 = 2;
/// `iopf_unrecoverable.reason`: the PASID is out of range or disabled.
pub const IOPF_REASON_PASID_INVALID: u32 = 3;
/// `iopf_unrecoverable.reason`: external abort during the page table walk.
pub const IOPF_REASON_WALK_EXTERNAL_ABORT: u32 = 4;
/// `iopf_unrecoverable.reason`: could not fetch a page table entry.
pub const IOPF_REASON_PTE_FETCH: u32 = 5;
/// `iopf_unrecoverable.reason`: the translation exists but forbids the access.
pub const IOPF_REASON_PERMISSION: u32 = 6;
/// `iopf_unrecoverable.reason`: access flag fault.
pub const IOPF_REASON_ACCESS: u32 = 7;
/// `iopf_unrecoverable.reason`: the address is outside the translatable range.
pub const IOPF_REASON_OUT_OF_RANGE_ADDRESS: u32 = 8;

/// The most requests one group has: a request buffer of this many entries always takes the
/// next group (longer groups are answered Invalid by the library and never handed out).
pub const IOPF_MAX_GROUP_REQUESTS: u32 = 512;

/// While `iopf_backlog` is not 0 (answers wait for room in the response ring, and the host
/// rings no doorbell when it frees some), sleep at most this many milliseconds.
pub const IOPF_BACKLOG_RETRY_MS: u32 = 1;

/// `iopf_dma_map` access: the device may read.
pub const IOPF_DMA_READ: u32 = 1 << 0;
/// `iopf_dma_map` access: the device may write.
pub const IOPF_DMA_WRITE: u32 = 1 << 1;

/// vfio-user: the region type of both queue regions (`VFIO_REGION_TYPE_NESTED`).
pub const IOPF_VFIO_REGION_TYPE_NESTED: u32 = 4;
/// vfio-user: the region subtype of the DMA fault region (the fault queue).
pub const IOPF_VFIO_REGION_SUBTYPE_DMA_FAULT: u32 = 1;
/// vfio-user: the region subtype of the DMA fault response region (the response queue).
pub const IOPF_VFIO_REGION_SUBTYPE_DMA_FAULT_RESPONSE: u32 = 2;
/// vfio-user: the region index of the DMA fault region.
pub const IOPF_VFIO_DMA_FAULT_REGION_INDEX: u32 = 9;
/// vfio-user: the region index of the DMA fault response region (`GET_REGION_IO_FDS` of it
/// gives the response doorbell).
pub const IOPF_VFIO_DMA_FAULT_RESPONSE_REGION_INDEX: u32 = 10;
/// vfio-user: the IRQ index of the fault doorbell (`DEVICE_SET_IRQS` with one eventfd).
pub const IOPF_VFIO_DMA_FAULT_IRQ_INDEX: u32 = 5;
/// vfio-user: the offset in the response region that the response doorbell watches (the VMM
/// page's `index` word, which a response queue's ring does not read); a 4-byte region write
/// there is the doorbell's fallback.
pub const IOPF_VFIO_RESPONSE_DOORBELL_OFFSET: u64 = 4160;
/// vfio-user: the region index of BAR0, the device's registers.
pub const IOPF_VFIO_BAR0_REGION_INDEX: u32 = 0;
/// BAR0 register (8 bytes, write): guest-physical address of the PASID directory.
pub const IOPF_BAR0_DIRECTORY_BASE: u64 = 0x00;
/// BAR0 register (8 bytes, write): entries of the PASID directory.
pub const IOPF_BAR0_DIRECTORY_ENTRIES: u64 = 0x08;
/// BAR0 register (4 bytes, read): the host's number for the device.
pub const IOPF_BAR0_DEVICE_ID: u64 = 0x10;
/// BAR0 register (4 bytes, read): the host's state (`IOPF_HOST_STATE_FINISHED`).
pub const IOPF_BAR0_HOST_STATE: u64 = 0x18;
/// `IOPF_BAR0_HOST_STATE` bit: the host has finished; a VMM whose device is no longer live
/// leaves instead of attaching again.
pub const IOPF_HOST_STATE_FINISHED: u32 = 1 << 0;

// The numbers above are the Rust crates' own: a change there fails the build here, and the
// header is regenerated.
const _: () = {
    assert!(IOPF_VFIO_REGION_TYPE_NESTED == vu::VFIO_REGION_TYPE_NESTED);
    assert!(IOPF_VFIO_REGION_SUBTYPE_DMA_FAULT == vu::VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT);
    assert!(
        IOPF_VFIO_REGION_SUBTYPE_DMA_FAULT_RESPONSE
            == vu::VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE
    );
    assert!(IOPF_VFIO_DMA_FAULT_REGION_INDEX == vu::DMA_FAULT_REGION_INDEX);
    assert!(IOPF_VFIO_DMA_FAULT_RESPONSE_REGION_INDEX == vu::DMA_FAULT_RESPONSE_REGION_INDEX);
    assert!(IOPF_VFIO_DMA_FAULT_IRQ_INDEX == vu::DMA_FAULT_IRQ_INDEX);
    assert!(IOPF_VFIO_RESPONSE_DOORBELL_OFFSET == vu::RESPONSE_PROD_OFFSET);
    assert!(IOPF_VFIO_BAR0_REGION_INDEX == vu::VFIO_PCI_BAR0_REGION_INDEX);
    assert!(IOPF_BAR0_DIRECTORY_BASE == vu::REG_DIRECTORY_BASE);
    assert!(IOPF_BAR0_DIRECTORY_ENTRIES == vu::REG_DIRECTORY_ENTRIES);
    assert!(IOPF_BAR0_DEVICE_ID == vu::REG_DEVICE_ID);
    assert!(IOPF_BAR0_HOST_STATE == vu::REG_HOST_STATE);
    assert!(IOPF_HOST_STATE_FINISHED == vu::HOST_STATE_FINISHED);
    assert!(IOPF_DMA_READ == iopf_vfio_user::DmaProt::READ.bits());
    assert!(IOPF_DMA_WRITE == iopf_vfio_user::DmaProt::WRITE.bits());
    assert!(IOPF_PERM_READ == iopf_abi::Perm::READ.bits());
    assert!(IOPF_PERM_WRITE == iopf_abi::Perm::WRITE.bits());
    assert!(IOPF_PERM_EXEC == iopf_abi::Perm::EXEC.bits());
    assert!(IOPF_PERM_PRIV == iopf_abi::Perm::PRIV.bits());
    assert!(IOPF_MAX_GROUP_REQUESTS as usize == iopf_vmm::GroupAssembler::DEFAULT_LIMIT);
    assert!(IOPF_BACKLOG_RETRY_MS as u128 == iopf_vmm::BACKLOG_RETRY.as_millis());
    assert!(IOPF_ANSWER_SUCCESS == iopf_abi::ResponseCode::Success as u32);
    assert!(IOPF_ANSWER_INVALID == iopf_abi::ResponseCode::Invalid as u32);
    assert!(IOPF_ANSWER_FAILURE == iopf_abi::ResponseCode::Failure as u32);
    assert!(IOPF_REASON_OUT_OF_RANGE_ADDRESS == iopf_abi::FaultReason::OutOfRangeAddress as u32);
};

/// A whole page request group, as `iopf_drain_groups` hands it out. Its requests are
/// `requests[first .. first + count]` of the request buffer passed with it, in order; the last
/// one has `IOPF_REQUEST_LAST` set.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct iopf_group {
    /// What to answer the group with (`iopf_answer`); never 0, never reused by this handle.
    pub cookie: u64,
    /// The host's number for the device the group came from.
    pub device: u32,
    /// `IOPF_GROUP_PASID_VALID` if `pasid` is valid.
    pub flags: u32,
    /// The group's PASID (the address space), if `flags` says so; else 0.
    pub pasid: u32,
    /// The device's PRG index for the group (9 bits).
    pub grpid: u32,
    /// Index of the group's first request in the request buffer.
    pub first: u32,
    /// Requests in the group (1 to `IOPF_MAX_GROUP_REQUESTS`).
    pub count: u32,
}

/// One page request of a group.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct iopf_page_request {
    /// The page the device asks for (page-aligned).
    pub addr: u64,
    /// Device-specific data, if `flags` has `IOPF_REQUEST_PRIV_DATA_VALID`; else 0.
    pub private_data: [u64; 2],
    /// The access that faulted: `IOPF_PERM_*` bits.
    pub perm: u32,
    /// `IOPF_REQUEST_LAST`, `IOPF_REQUEST_PRIV_DATA_VALID`.
    pub flags: u32,
}

/// An unrecoverable fault: reported, never answered.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct iopf_unrecoverable {
    /// The host's number for the device that faulted.
    pub device: u32,
    /// Why the translation failed: `IOPF_REASON_*`.
    pub reason: u32,
    /// `IOPF_UNRECOVERABLE_*_VALID` bits: which of `pasid`, `addr`, `fetch_addr` are valid.
    pub flags: u32,
    /// The address space, if valid; else 0.
    pub pasid: u32,
    /// The access that faulted: `IOPF_PERM_*` bits.
    pub perm: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// The faulting address, if valid; else 0.
    pub addr: u64,
    /// The address of the table entry whose fetch failed, if valid; else 0.
    pub fetch_addr: u64,
}

/// What a device counts (`iopf_stats`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct iopf_stats {
    /// Page requests read.
    pub requests: u64,
    /// Whole groups read.
    pub groups: u64,
    /// Unrecoverable faults read.
    pub unrecoverable: u64,
    /// Records that did not decode (an honest host writes none).
    pub malformed: u64,
    /// Answers the response ring took.
    pub responses: u64,
    /// Answers refused because too many waited already (the host does not read them).
    pub outbox_full: u64,
    /// Partial groups dropped (too long, or interrupted by another group).
    pub partial_groups_dropped: u64,
    /// Of those, groups too long whose last request arrived: answered Invalid by the library.
    pub oversized_answered: u64,
    /// Groups handed out and not answered yet.
    pub awaiting_answer: u64,
    /// Groups answered Invalid by the library because too many awaited an answer already.
    pub overflow_answered: u64,
    /// Answers queued and not yet taken by the response ring (`iopf_backlog`).
    pub backlog: u64,
}

impl iopf_page_request {
    pub(crate) fn from_request(r: &PageRequest) -> Self {
        let mut flags = 0;
        if r.last {
            flags |= IOPF_REQUEST_LAST;
        }
        if r.private_data.is_some() {
            flags |= IOPF_REQUEST_PRIV_DATA_VALID;
        }
        Self {
            addr: r.addr.get(),
            private_data: r.private_data.unwrap_or_default(),
            perm: r.perm.bits(),
            flags,
        }
    }
}

impl iopf_unrecoverable {
    pub(crate) fn from_fault(device: u32, f: &UnrecoverableFault) -> Self {
        let mut flags = 0;
        if f.pasid.is_some() {
            flags |= IOPF_UNRECOVERABLE_PASID_VALID;
        }
        if f.addr.is_some() {
            flags |= IOPF_UNRECOVERABLE_ADDR_VALID;
        }
        if f.fetch_addr.is_some() {
            flags |= IOPF_UNRECOVERABLE_FETCH_ADDR_VALID;
        }
        Self {
            device,
            reason: f.reason as u32,
            flags,
            pasid: f.pasid.map_or(0, |p| p.get()),
            perm: f.perm.bits(),
            reserved: 0,
            addr: f.addr.unwrap_or(0),
            fetch_addr: f.fetch_addr.unwrap_or(0),
        }
    }
}
