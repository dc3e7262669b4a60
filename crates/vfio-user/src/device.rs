//! The iopf device as vfio-user shows it: the DMA fault region, the DMA fault response region
//! and the DMA fault IRQ (`docs/DESIGN.md` §6; every value is listed in `docs/PROTOCOL.md`).
//!
//! Where Eric Auger's never-merged VFIO series "SMMUv3 Nested Stage Setup" fixed a value, we
//! use it, so that its consumers would recognise the device: region type
//! [`VFIO_REGION_TYPE_NESTED`] = 4 (its v12/v13 value), subtypes `DMA_FAULT` = 1 and
//! `DMA_FAULT_RESPONSE` = 2, and the fault IRQ at index 5, right after the five standard PCI
//! IRQ indices (its v8 value). The regions' contents are ABI v2 queue regions (`docs/ABI.md`),
//! not the series' layouts.
//!
//! Region indices: the nine standard PCI regions come first (BARs 0-5, ROM, config space,
//! VGA), so the fault regions are the device-specific regions [`DMA_FAULT_REGION_INDEX`] (9)
//! and [`DMA_FAULT_RESPONSE_REGION_INDEX`] (10). A client should still find them by their type
//! capability ([`crate::Client::find_region_by_type`]), as the specification intends for
//! device-specific regions.

use std::mem::offset_of;

use iopf_abi::{QueueKind, VMM_PAGE_OFFSET, VmmPageHeader};

use crate::info::{IoFd, IoFdKind, IrqFlags, IrqInfo, RegionCapability, RegionFlags, RegionInfo};

/// Region type of the fault regions (`VFIO_REGION_TYPE_NESTED`, v12/v13 of the seed series;
/// upstream `<linux/vfio.h>` has 1-3 taken).
pub const VFIO_REGION_TYPE_NESTED: u32 = 4;
/// Subtype of the DMA fault region: the fault queue (host produces, VMM consumes).
pub const VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT: u32 = 1;
/// Subtype of the DMA fault response region: the response queue (VMM produces, host
/// consumes).
pub const VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE: u32 = 2;

/// PCI region index of BAR 0 (BARs 0-5 are indices 0-5).
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// PCI region index of BAR 1.
pub const VFIO_PCI_BAR1_REGION_INDEX: u32 = 1;
/// PCI region index of BAR 2.
pub const VFIO_PCI_BAR2_REGION_INDEX: u32 = 2;
/// PCI region index of BAR 3.
pub const VFIO_PCI_BAR3_REGION_INDEX: u32 = 3;
/// PCI region index of BAR 4.
pub const VFIO_PCI_BAR4_REGION_INDEX: u32 = 4;
/// PCI region index of BAR 5.
pub const VFIO_PCI_BAR5_REGION_INDEX: u32 = 5;
/// PCI region index of the expansion ROM.
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
/// PCI region index of configuration space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// PCI region index of the VGA ranges.
pub const VFIO_PCI_VGA_REGION_INDEX: u32 = 8;
/// Number of standard PCI regions; device-specific regions follow.
pub const VFIO_PCI_NUM_REGIONS: u32 = 9;

// The registers of an iopf device's BAR0 (`docs/PROTOCOL.md` §4.6), the same for the host
// that serves them and the VMM that uses them.

/// BAR0 register: guest-physical address of the PASID directory (u64, read-write).
pub const REG_DIRECTORY_BASE: u64 = 0x00;
/// BAR0 register: slots in the PASID directory (u64, read-write). Writing it makes the
/// directory effective.
pub const REG_DIRECTORY_ENTRIES: u64 = 0x08;
/// BAR0 register: the host's number for this device (u32, read-only).
pub const REG_DEVICE_ID: u64 = 0x10;
/// BAR0 register: host state (u32, read-only): bit 0 set once the host has finished, so a
/// VMM that sees `LIVE` cleared knows to leave rather than attach again.
pub const REG_HOST_STATE: u64 = 0x18;
/// `REG_HOST_STATE` bit: the host has finished.
pub const HOST_STATE_FINISHED: u32 = 1 << 0;

/// Region index of the DMA fault region (the fault queue).
pub const DMA_FAULT_REGION_INDEX: u32 = VFIO_PCI_NUM_REGIONS;
/// Region index of the DMA fault response region (the response queue).
pub const DMA_FAULT_RESPONSE_REGION_INDEX: u32 = VFIO_PCI_NUM_REGIONS + 1;
/// Number of regions of the iopf device (`num_regions` in its device info).
pub const NUM_REGIONS: u32 = VFIO_PCI_NUM_REGIONS + 2;

/// PCI IRQ index of `INTx`.
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
/// PCI IRQ index of MSI.
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
/// PCI IRQ index of MSI-X.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
/// PCI IRQ index of the error interrupt.
pub const VFIO_PCI_ERR_IRQ_INDEX: u32 = 3;
/// PCI IRQ index of the device request interrupt.
pub const VFIO_PCI_REQ_IRQ_INDEX: u32 = 4;
/// Number of standard PCI IRQ indices.
pub const VFIO_PCI_NUM_IRQS: u32 = 5;

/// IRQ index of the DMA fault IRQ: its one eventfd (given with `SET_IRQS`) is the fault
/// queue's doorbell.
pub const DMA_FAULT_IRQ_INDEX: u32 = VFIO_PCI_NUM_IRQS;
/// Number of IRQ indices of the iopf device (`num_irqs` in its device info).
pub const NUM_IRQS: u32 = VFIO_PCI_NUM_IRQS + 1;

/// Offset of the VMM page's `abi` field in either region, where the VMM writes
/// [`iopf_abi::VMM_ABI`] once it has attached.
pub const VMM_ABI_OFFSET: u64 = VMM_PAGE_OFFSET as u64 + offset_of!(VmmPageHeader, abi) as u64;

/// Offset of the response region's doorbell word (the VMM page's `index`, which the ring does
/// not read in a response queue: an ABI v2 producer publishes no index): the ioeventfd of
/// `GET_REGION_IO_FDS` watches it, and a 4-byte region write there is the doorbell's
/// fallback.
pub const RESPONSE_PROD_OFFSET: u64 =
    VMM_PAGE_OFFSET as u64 + offset_of!(VmmPageHeader, index) as u64;

/// The region subtype that carries a queue of `kind`.
pub const fn region_subtype(kind: QueueKind) -> u32 {
    match kind {
        QueueKind::Fault => VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
        QueueKind::Response => VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE,
    }
}

/// The region index of the queue of `kind`.
pub const fn region_index(kind: QueueKind) -> u32 {
    match kind {
        QueueKind::Fault => DMA_FAULT_REGION_INDEX,
        QueueKind::Response => DMA_FAULT_RESPONSE_REGION_INDEX,
    }
}

/// The region info of a queue region of `kind` and `size` bytes (its memfd's length):
/// readable, writable, mmap-able from offset 0 of its fd, with its type capability.
pub fn queue_region_info(kind: QueueKind, size: u64) -> RegionInfo {
    RegionInfo {
        flags: RegionFlags::READ | RegionFlags::WRITE | RegionFlags::MMAP,
        size,
        mmap_offset: 0,
        caps: vec![RegionCapability::Type {
            region_type: VFIO_REGION_TYPE_NESTED,
            subtype: region_subtype(kind),
        }],
    }
}

/// The info of a region the device does not have (size 0, no access): the BARs, ROM and VGA.
pub fn absent_region_info() -> RegionInfo {
    RegionInfo::default()
}

/// The DMA fault IRQ: one interrupt, signalled through an eventfd.
pub fn dma_fault_irq_info() -> IrqInfo {
    IrqInfo {
        flags: IrqFlags::EVENTFD,
        count: 1,
    }
}

/// An IRQ index the device does not have (count 0): `INTx`, MSI, MSI-X, ERR, REQ.
pub fn absent_irq_info() -> IrqInfo {
    IrqInfo {
        flags: IrqFlags::empty(),
        count: 0,
    }
}

/// The response doorbell as a sub-region of the response region: an ioeventfd on its 4-byte
/// `prod` field, any value.
pub fn response_doorbell_io_fd() -> IoFd {
    IoFd {
        offset: RESPONSE_PROD_OFFSET,
        size: 4,
        kind: IoFdKind::IoEventFd,
        flags: 0,
        data: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_those_of_the_protocol_document() {
        assert_eq!(VFIO_REGION_TYPE_NESTED, 4);
        assert_eq!(
            (
                VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
                VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE
            ),
            (1, 2)
        );
        assert_eq!(
            (DMA_FAULT_REGION_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX),
            (9, 10)
        );
        assert_eq!((NUM_REGIONS, DMA_FAULT_IRQ_INDEX, NUM_IRQS), (11, 5, 6));
        assert_eq!((VMM_ABI_OFFSET, RESPONSE_PROD_OFFSET), (4096, 4160));
    }

    #[test]
    fn each_queue_has_its_region() {
        assert_eq!(region_index(QueueKind::Fault), DMA_FAULT_REGION_INDEX);
        assert_eq!(
            region_index(QueueKind::Response),
            DMA_FAULT_RESPONSE_REGION_INDEX
        );
    }
}
