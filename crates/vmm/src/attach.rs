//! Attaching a device over a vfio-user connection the VMM owns (docs/PROTOCOL.md's attach
//! sequence): find the fault regions by type, give the fault IRQ its eventfd, map the regions
//! from their fds; and telling the device where guest memory and the PASID directory are.

use std::os::fd::{AsFd, OwnedFd};

use iopf_queue::{Doorbell, SharedMemoryChannel};
use iopf_vfio_user::device::{
    DMA_FAULT_IRQ_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE,
    VFIO_REGION_TYPE_NESTED,
};
use iopf_vfio_user::{Client, ClientError, DmaProt};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use iopf_vfio_user::device::{
    HOST_STATE_FINISHED, REG_DEVICE_ID, REG_DIRECTORY_BASE, REG_DIRECTORY_ENTRIES, REG_HOST_STATE,
};

/// Why a device could not be attached, or told about guest memory.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AttachError {
    /// A vfio-user exchange failed.
    #[error("vfio-user exchange")]
    Client(#[from] ClientError),
    /// The device lacks a region or fd the protocol promises.
    #[error("the device has no {0}")]
    Missing(&'static str),
    /// A region or doorbell failed its checks.
    #[error("cannot attach a queue region")]
    Queue(#[from] iopf_queue::RegionAttachError),
    /// The fault doorbell's eventfd could not be created, or the response doorbell is not an
    /// eventfd.
    #[error("doorbell eventfd")]
    Doorbell(#[source] std::io::Error),
    /// A guest memory region has no file: the device maps guest memory from a shared fd.
    #[error(
        "guest memory at {gpa:#x} ({len} bytes) has no file; the device needs it backed by a shared fd"
    )]
    NoFile {
        /// Its guest-physical address.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// `DMA_MAP` of a guest memory region failed.
    #[error("DMA_MAP of guest memory at {gpa:#x} ({len} bytes)")]
    DmaMap {
        /// Its guest-physical address.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Why.
        #[source]
        source: ClientError,
    },
}

fn region_fd(
    client: &mut Client,
    subtype: u32,
    what: &'static str,
) -> Result<OwnedFd, AttachError> {
    client
        .find_region_by_type(VFIO_REGION_TYPE_NESTED, subtype)?
        .and_then(|region| region.fd)
        .ok_or(AttachError::Missing(what))
}

/// The host's number for the device on `client` (BAR0 `DEVICE_ID`).
pub fn device_number(client: &mut Client) -> Result<u32, AttachError> {
    client.device_info()?;
    let mut id = [0u8; 4];
    client.region_read(VFIO_PCI_BAR0_REGION_INDEX, REG_DEVICE_ID, &mut id)?;
    Ok(u32::from_le_bytes(id))
}

/// Attaches the device's fault channel over `client`, a connection the VMM keeps (closing it
/// is unregistering): reads the device number from BAR0, finds the fault and response regions
/// by type, takes the response doorbell from `GET_REGION_IO_FDS`, gives the fault IRQ a new
/// eventfd before the regions are attached (so the host can wake the VMM from the first fault
/// on), and maps both regions.
pub fn attach_channel(client: &mut Client) -> Result<SharedMemoryChannel, AttachError> {
    let device = device_number(client)?;
    let fault_fd = region_fd(
        client,
        VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
        "DMA fault region",
    )?;
    let response_fd = region_fd(
        client,
        VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE,
        "DMA fault response region",
    )?;
    let mut io_fds = client.region_io_fds(DMA_FAULT_RESPONSE_REGION_INDEX)?;
    let response_doorbell = match io_fds.fds.len() {
        0 => None,
        _ => Some(Doorbell::from_fd(io_fds.fds.remove(0)).map_err(AttachError::Doorbell)?),
    };
    let fault_doorbell = Doorbell::new().map_err(AttachError::Doorbell)?;
    client.set_irqs(DMA_FAULT_IRQ_INDEX, &[fault_doorbell.as_fd()])?;
    tracing::debug!(device, "fault channel attached");
    Ok(SharedMemoryChannel::from_fds(
        device,
        fault_fd,
        response_fd,
        fault_doorbell,
        response_doorbell,
    )?)
}

/// Tells the device where the guest's PASID directory is (BAR0 `DIRECTORY_BASE` and
/// `DIRECTORY_ENTRIES`): `entries` 8-byte entries at guest-physical `base`.
pub fn set_pasid_directory(
    client: &mut Client,
    base: u64,
    entries: u64,
) -> Result<(), AttachError> {
    client.region_write(
        VFIO_PCI_BAR0_REGION_INDEX,
        REG_DIRECTORY_BASE,
        &base.to_le_bytes(),
    )?;
    client.region_write(
        VFIO_PCI_BAR0_REGION_INDEX,
        REG_DIRECTORY_ENTRIES,
        &entries.to_le_bytes(),
    )?;
    Ok(())
}

/// Gives the device guest memory the rust-vmm way: one `DMA_MAP` per region of `memory`, at
/// its guest-physical address (IOVA = GPA), of its whole length, from its file at its file
/// offset, with the access `prot` gives it. Returns how many regions were mapped.
///
/// Every region must be backed by a file the host can map (a memfd, say): a region without
/// one is refused with [`AttachError::NoFile`] before anything is sent.
pub fn map_guest_memory<M: GuestMemoryBackend>(
    client: &mut Client,
    memory: &M,
    prot: impl Fn(&M::R) -> DmaProt,
) -> Result<usize, AttachError> {
    if let Some(region) = memory.iter().find(|r| r.file_offset().is_none()) {
        return Err(AttachError::NoFile {
            gpa: region.start_addr().0,
            len: region.len(),
        });
    }
    let mut mapped = 0;
    for region in memory.iter() {
        let (gpa, len) = (region.start_addr().0, region.len());
        let Some(file) = region.file_offset() else {
            return Err(AttachError::NoFile { gpa, len });
        };
        client
            .dma_map(
                Some(file.file().as_fd()),
                file.start(),
                gpa,
                len,
                prot(region),
            )
            .map_err(|source| AttachError::DmaMap { gpa, len, source })?;
        mapped += 1;
    }
    Ok(mapped)
}

/// Whether the host says it has finished (BAR0 host state bit 0): a VMM whose channel is no
/// longer [`live`](iopf_queue::FaultChannel::live) then leaves instead of attaching again.
pub fn host_finished(client: &mut Client) -> Result<bool, AttachError> {
    let mut state = [0u8; 4];
    client.region_read(VFIO_PCI_BAR0_REGION_INDEX, REG_HOST_STATE, &mut state)?;
    Ok(u32::from_le_bytes(state) & HOST_STATE_FINISHED != 0)
}
