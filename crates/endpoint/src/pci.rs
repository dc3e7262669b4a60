//! The PCI device a VMM sees over vfio-user: a small register BAR and config space (the
//! simulator's), and the DMA fault region, the DMA fault response region (with its
//! ioeventfd) and the DMA fault IRQ, which `iopf_host::FaultRegions` serves.
//! `docs/PROTOCOL.md` lists every value.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use iopf_abi::Perm;
use iopf_host::{FaultRegions, FaultRegionsError};
use iopf_models::memory::{MemoryMap, MemoryMapError, Region};
use iopf_models::nested::Directory;
use iopf_queue::SharedMemory;
use iopf_vfio_user::device::{
    self, NUM_IRQS, NUM_REGIONS, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
};
use iopf_vfio_user::{
    DeviceFlags, DeviceInfo, DmaMap, DmaProt, DmaUnmap, Errno, IoFd, IrqInfo, RegionFlags,
    RegionInfo, SetIrqs, VfioUserDevice,
};

use crate::engine::DeviceSlot;

pub use iopf_vfio_user::device::{
    HOST_STATE_FINISHED, REG_DEVICE_ID, REG_DIRECTORY_BASE, REG_DIRECTORY_ENTRIES, REG_HOST_STATE,
};
/// BAR0 size.
pub const BAR0_SIZE: u64 = 4096;
/// Config space size.
pub const CONFIG_SIZE: usize = 256;
/// PCI vendor id (Red Hat's, used by QEMU's own devices) and device id of the iopf device.
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device id of the iopf device.
pub const DEVICE_ID: u16 = 0x10f0;
/// Most `DMA_MAP` mappings a device holds at once.
pub const MAX_DMA_MAPPINGS: usize = 1024;
/// Largest single `DMA_MAP` mapping (64 GiB).
pub const MAX_DMA_MAPPING_SIZE: u64 = 64 << 30;
/// Largest total of a device's `DMA_MAP` mappings (1 TiB of the host's address space).
pub const MAX_DMA_TOTAL: u64 = 1 << 40;
/// The page size `DMA_MAP` and `DMA_UNMAP` work in: IOVA, offset and size are multiples of it.
pub const DMA_PAGE_SIZE: u64 = 4096;

/// One connection's view of a device: the fault regions of this handler life (the
/// component of [`iopf_host::fault_regions`]) and the simulator's registers and DMA mappings.
#[derive(Debug)]
pub struct FaultPciDevice {
    slot: Arc<DeviceSlot>,
    faults: FaultRegions,
    config: [u8; CONFIG_SIZE],
    directory_base: u64,
    directory_entries: u64,
    mappings: MemoryMap,
}

/// Why a device could not be set up for a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The fault regions could not be created or their handler registered.
    #[error("setting up the fault regions")]
    FaultRegions(#[from] FaultRegionsError),
    /// The response doorbell could not be duplicated for the engine.
    #[error("duplicating the response doorbell")]
    Io(#[from] std::io::Error),
}

impl FaultPciDevice {
    /// Creates this life's fault regions (their handler registered with the core: page
    /// requests are answered `Invalid` until the VMM attaches), and tells the engine about
    /// the response doorbell.
    pub fn new(slot: Arc<DeviceSlot>, ring_entries: u32) -> Result<Self, SetupError> {
        let faults = FaultRegions::attach(&slot.port, ring_entries)?;
        {
            let mut attachment = slot.attachment();
            attachment.wake = Some(faults.response_doorbell().try_clone()?);
            attachment.generation += 1;
        }
        let mut config = [0u8; CONFIG_SIZE];
        config[..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        config[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        Ok(Self {
            slot,
            faults,
            config,
            directory_base: 0,
            directory_entries: 0,
            mappings: MemoryMap::new(),
        })
    }

    /// The VMM is gone: its groups are answered, its memory forgotten.
    pub fn detach(self) {
        self.faults.detach();
        let mut attachment = self.slot.attachment();
        attachment.memory = None;
        attachment.mappings = MemoryMap::new();
        attachment.directory = None;
        attachment.nested = false;
        attachment.wake = None;
        attachment.generation += 1;
    }

    fn publish_mappings(&self) {
        let mut attachment = self.slot.attachment();
        attachment.mappings = self.mappings.clone();
        attachment.generation += 1;
    }

    fn publish_directory(&self) {
        let mut attachment = self.slot.attachment();
        attachment.directory = (self.directory_entries > 0).then_some(Directory {
            base: self.directory_base,
            entries: self.directory_entries,
        });
        attachment.generation += 1;
    }
}

/// The device access a `DMA_MAP` grants: `READ`, `WRITE` or both; neither is refused.
fn dma_perm(prot: DmaProt) -> Result<Perm, Errno> {
    let mut perm = Perm::empty();
    if prot.contains(DmaProt::READ) {
        perm |= Perm::READ;
    }
    if prot.contains(DmaProt::WRITE) {
        perm |= Perm::WRITE;
    }
    if perm.is_empty() {
        return Err(Errno::EINVAL);
    }
    Ok(perm)
}

fn le_u64(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.try_into().ok()?))
}

impl VfioUserDevice for FaultPciDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: DeviceFlags::PCI | DeviceFlags::RESET,
            num_regions: NUM_REGIONS,
            num_irqs: NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        if let Some(info) = self.faults.region_info(index) {
            return Some(info);
        }
        Some(match index {
            VFIO_PCI_BAR0_REGION_INDEX => RegionInfo {
                flags: RegionFlags::READ | RegionFlags::WRITE,
                size: BAR0_SIZE,
                mmap_offset: 0,
                caps: Vec::new(),
            },
            VFIO_PCI_CONFIG_REGION_INDEX => RegionInfo {
                flags: RegionFlags::READ | RegionFlags::WRITE,
                size: CONFIG_SIZE as u64,
                mmap_offset: 0,
                caps: Vec::new(),
            },
            i if i < NUM_REGIONS => device::absent_region_info(),
            _ => return None,
        })
    }

    fn region_fd(&self, index: u32) -> Option<BorrowedFd<'_>> {
        self.faults.region_fd(index)
    }

    fn region_io_fds(&self, index: u32) -> Result<Vec<(IoFd, BorrowedFd<'_>)>, Errno> {
        Ok(self.faults.region_io_fds(index).unwrap_or_default())
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.faults
            .irq_info(index)
            .or_else(|| (index < NUM_IRQS).then(device::absent_irq_info))
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        if let Some(result) = self.faults.region_read(index, offset, data) {
            return result;
        }
        match index {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let start = usize::try_from(offset).map_err(|_| Errno::EINVAL)?;
                let end = start.checked_add(data.len()).ok_or(Errno::EINVAL)?;
                let bytes = self.config.get(start..end).ok_or(Errno::EINVAL)?;
                data.copy_from_slice(bytes);
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                let value = match (offset, data.len()) {
                    (REG_DIRECTORY_BASE, 8) => self.directory_base,
                    (REG_DIRECTORY_ENTRIES, 8) => self.directory_entries,
                    (REG_DEVICE_ID, 4) => u64::from(self.slot.id.0),
                    (REG_HOST_STATE, 4) => {
                        let finished = self
                            .slot
                            .finished
                            .load(std::sync::atomic::Ordering::Relaxed);
                        u64::from(if finished { HOST_STATE_FINISHED } else { 0 })
                    }
                    _ => return Err(Errno::EINVAL),
                };
                data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
            }
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if let Some(result) = self.faults.region_write(index, offset, data) {
            return result;
        }
        match index {
            // Config space is read-only here; writes are accepted and ignored, as for an
            // unimplemented register.
            VFIO_PCI_CONFIG_REGION_INDEX => Ok(()),
            VFIO_PCI_BAR0_REGION_INDEX => {
                let value = le_u64(data).ok_or(Errno::EINVAL)?;
                match offset {
                    REG_DIRECTORY_BASE => self.directory_base = value,
                    REG_DIRECTORY_ENTRIES => {
                        self.directory_entries = value;
                        self.slot.attachment().nested = true;
                        self.publish_directory();
                    }
                    _ => return Err(Errno::EINVAL),
                }
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn set_irqs(&mut self, request: SetIrqs) -> Result<(), Errno> {
        self.faults.set_irqs(request)
    }

    /// A mapping of guest memory at its guest-physical address (`docs/PROTOCOL.md` §4.6): any
    /// page-aligned IOVA, offset and size, the fd's range honoured, `READ`/`WRITE` honoured;
    /// overlaps, bounds and bad fds refused with an errno.
    fn dma_map(&mut self, map: DmaMap) -> Result<(), Errno> {
        let perm = dma_perm(map.prot)?;
        let aligned = [map.iova, map.offset, map.size]
            .iter()
            .all(|v| v.is_multiple_of(DMA_PAGE_SIZE));
        let end = map.iova.checked_add(map.size);
        if !aligned || map.size == 0 || map.size > MAX_DMA_MAPPING_SIZE || end.is_none() {
            return Err(Errno::EINVAL);
        }
        let overlaps = self.mappings.regions().iter().any(|r| {
            r.gpa < map.iova.saturating_add(map.size) && map.iova < r.gpa + r.memory.len()
        });
        if overlaps {
            return Err(Errno::EEXIST);
        }
        let total: u64 = self.mappings.regions().iter().map(|r| r.memory.len()).sum();
        if self.mappings.regions().len() >= MAX_DMA_MAPPINGS
            || total.saturating_add(map.size) > MAX_DMA_TOTAL
        {
            return Err(Errno::ENOSPC);
        }
        let fd = map.fd.ok_or(Errno::EINVAL)?;
        let memory = SharedMemory::attach_range(fd, map.offset, map.size).map_err(|e| match e {
            iopf_queue::RegionAttachError::Io { source, .. } => {
                Errno(source.raw_os_error().map_or(Errno::EINVAL.0, |n| n as u32))
            }
            _ => Errno::EINVAL,
        })?;
        self.mappings
            .insert(Region {
                gpa: map.iova,
                memory: Arc::new(memory),
                perm,
            })
            .map_err(|e| match e {
                MemoryMapError::Overlap(_) => Errno::EEXIST,
                _ => Errno::EINVAL,
            })?;
        self.publish_mappings();
        Ok(())
    }

    /// Removes exactly one mapping (its IOVA and size), or every mapping with the unmap-all
    /// flag. A range that is no mapping but overlaps one is `EINVAL` (a mapping is not split);
    /// one that touches none is `ENOENT`.
    fn dma_unmap(&mut self, unmap: DmaUnmap) -> Result<(), Errno> {
        if unmap.all {
            self.mappings = MemoryMap::new();
        } else {
            let exact = self
                .mappings
                .regions()
                .iter()
                .any(|r| r.gpa == unmap.iova && r.memory.len() == unmap.size);
            if !exact {
                let end = unmap.iova.saturating_add(unmap.size);
                let touches = self
                    .mappings
                    .regions()
                    .iter()
                    .any(|r| r.gpa < end && unmap.iova < r.gpa + r.memory.len());
                return Err(if touches {
                    Errno::EINVAL
                } else {
                    Errno::ENOENT
                });
            }
            // Present: `exact` found it.
            self.mappings.remove(unmap.iova);
        }
        self.publish_mappings();
        Ok(())
    }

    /// A function-level reset as the VMM sees it (`docs/PROTOCOL.md` §4.6): the registers the
    /// VMM wrote go back to 0, so the device issues no DMA until the VMM writes the directory
    /// again; the fault core answers every pending group `Invalid` (`reset`). The handler, its
    /// queues, the fault IRQ's eventfd and the DMA mapping stay.
    fn reset(&mut self) -> Result<(), Errno> {
        // The directory first. The engine looks at the attachment before every step, so once
        // it has taken the responses below (which give the device its credits back), it no
        // longer steps through the guest's tables: no new group reaches a VMM that reset the
        // device until it writes the directory again.
        self.directory_base = 0;
        self.directory_entries = 0;
        self.slot.attachment().resets += 1;
        self.publish_directory();
        self.faults.reset().map_err(|_| Errno::EIO)?;
        Ok(())
    }
}
