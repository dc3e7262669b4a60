//! Attaching a device over vfio-user (docs/PROTOCOL.md's attach sequence): find the fault
//! regions by type, map them from their fds, register guest memory and the guest's PASID
//! directory, and give the fault IRQ its eventfd.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use iopf_models::guest::{Guest, GuestConfig};
use iopf_models::memory::GuestMemory;
use iopf_models::nested::GuestTables;
use iopf_models::rng::Rng;
use iopf_queue::{Doorbell, FaultQueueConsumer, ResponseQueueProducer, SharedMemoryChannel};
use iopf_vfio_user::device::{
    DMA_FAULT_IRQ_INDEX, VFIO_PCI_BAR0_REGION_INDEX, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
    VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE, VFIO_REGION_TYPE_NESTED,
};
use iopf_vfio_user::{Client, ClientError, ClientOptions, DmaProt};
use thiserror::Error;

use crate::VmmDevice;

/// BAR0 register offsets of the iopf device (`docs/PROTOCOL.md`).
const REG_DIRECTORY_BASE: u64 = 0x00;
const REG_DIRECTORY_ENTRIES: u64 = 0x08;
const REG_DEVICE_ID: u64 = 0x10;
const REG_HOST_STATE: u64 = 0x18;

/// Why a device could not be attached.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The vfio-user exchange failed.
    #[error("vfio-user: {0}")]
    Client(#[from] ClientError),
    /// The device lacks a region or fd the protocol promises.
    #[error("the device has no {0}")]
    Missing(&'static str),
    /// A region or doorbell failed its checks.
    #[error("queue: {0}")]
    Queue(#[from] iopf_queue::AttachError),
    /// An eventfd failed.
    #[error("eventfd: {0}")]
    Io(#[from] std::io::Error),
    /// The guest's address spaces could not be set up.
    #[error("cannot set up the guest's address spaces")]
    Guest(#[source] crate::device::VmmError),
}

impl From<crate::device::VmmError> for AttachError {
    fn from(e: crate::device::VmmError) -> Self {
        Self::Guest(e)
    }
}

impl AttachError {
    /// Whether the host did not answer (or take) a vfio-user command in time: retrying at
    /// once would only wait again.
    pub fn timed_out(&self) -> bool {
        matches!(self, AttachError::Client(e) if e.is_timeout())
    }
}

/// How the VMM's guest behaves for a device.
#[derive(Debug, Clone, Copy)]
pub struct GuestSetup {
    /// The guest model.
    pub guest: GuestConfig,
    /// Guest memory, in 4 KiB pages.
    pub pages: u64,
    /// Address spaces to create: requests without PASID, and PASIDs `0..pasids`.
    pub pasids: u32,
    /// Seed of the guest's random choices.
    pub seed: u64,
}

/// A device attached over vfio-user.
#[derive(Debug)]
pub struct Attached {
    /// The connection (closing it is unregister).
    pub client: Client,
    /// The device's queues, memory, tables and guest.
    pub device: VmmDevice,
    /// The host's number for the device.
    pub device_id: u32,
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

/// A device's queues, attached over `client`: regions found by type, the response doorbell
/// from `GET_REGION_IO_FDS`, and the fault IRQ given its eventfd before the regions are
/// attached (so the host can wake the VMM from the first fault on).
fn attach_queues(client: &mut Client, device: u32) -> Result<SharedMemoryChannel, AttachError> {
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
    let mut io_fds =
        client.region_io_fds(iopf_vfio_user::device::DMA_FAULT_RESPONSE_REGION_INDEX)?;
    let response_doorbell = match io_fds.fds.len() {
        0 => None,
        _ => Some(Doorbell::from_fd(io_fds.fds.remove(0))?),
    };
    let fault_doorbell = Doorbell::new()?;
    client.set_irqs(DMA_FAULT_IRQ_INDEX, &[fault_doorbell.as_fd()])?;
    let faults = FaultQueueConsumer::attach(fault_fd, fault_doorbell)?;
    let responses = ResponseQueueProducer::attach(response_fd, response_doorbell)?;
    Ok(SharedMemoryChannel::new(device, faults, responses))
}

/// Registers guest memory (`DMA_MAP` of its memfd at guest-physical 0) and the guest's PASID
/// directory (the BAR0 directory registers) with the device.
pub fn register_memory(
    client: &mut Client,
    memory: &GuestMemory,
    tables: &GuestTables,
) -> Result<(), AttachError> {
    client.dma_map(
        Some(memory.shared().fd()),
        0,
        0,
        memory.shared().len(),
        DmaProt::READ | DmaProt::WRITE,
    )?;
    let directory = tables.directory();
    client.region_write(
        VFIO_PCI_BAR0_REGION_INDEX,
        REG_DIRECTORY_BASE,
        &directory.base.to_le_bytes(),
    )?;
    client.region_write(
        VFIO_PCI_BAR0_REGION_INDEX,
        REG_DIRECTORY_ENTRIES,
        &directory.entries.to_le_bytes(),
    )?;
    Ok(())
}

fn device_id(client: &mut Client) -> Result<u32, AttachError> {
    client.device_info()?;
    let mut id = [0u8; 4];
    client.region_read(VFIO_PCI_BAR0_REGION_INDEX, REG_DEVICE_ID, &mut id)?;
    Ok(u32::from_le_bytes(id))
}

/// Connects to the host at `socket` and attaches one device, waiting for the host as
/// [`ClientOptions::default`] says.
pub fn attach(socket: &Path, setup: GuestSetup) -> Result<Attached, AttachError> {
    attach_with(socket, setup, ClientOptions::default())
}

/// Connects to the host at `socket` and attaches one device, waiting for the host's replies
/// as `options` says (a host that accepts and never answers costs at most those waits).
pub fn attach_with(
    socket: &Path,
    setup: GuestSetup,
    options: ClientOptions,
) -> Result<Attached, AttachError> {
    let span = tracing::info_span!("attach", device = tracing::field::Empty).entered();
    let mut client = Client::connect_with(socket, options)?;
    let device_id = device_id(&mut client)?;
    span.record("device", device_id);
    let channel = attach_queues(&mut client, device_id)?;
    let mut memory = GuestMemory::new(setup.pages)?;
    // Slot 0 of the PASID directory serves requests without PASID, slot p + 1 PASID p.
    let tables = GuestTables::new(&mut memory, u64::from(setup.pasids) + 1)
        .ok_or(AttachError::Missing("guest memory for tables"))?;
    let guest = Guest::new(setup.guest, Rng::new(setup.seed ^ u64::from(device_id)));
    // Creating the address spaces fills the directory before the device is told about it.
    let device = VmmDevice::new(device_id, channel, memory, tables, guest, setup.pasids)?;
    register_memory(&mut client, device.memory(), &device.tables())?;
    tracing::debug!(pasids = setup.pasids, pages = setup.pages, "attached");
    Ok(Attached {
        client,
        device,
        device_id,
    })
}

/// Attaches `device` again after the host unregistered its handler: a new connection, the new
/// life's regions, the same guest memory and page tables. Fails if the host hands over another
/// device (or none).
pub fn reattach(socket: &Path, device: &mut VmmDevice) -> Result<Client, AttachError> {
    reattach_with(socket, device, ClientOptions::default())
}

/// [`reattach`], waiting for the host's replies as `options` says.
pub fn reattach_with(
    socket: &Path,
    device: &mut VmmDevice,
    options: ClientOptions,
) -> Result<Client, AttachError> {
    let _span = tracing::info_span!("reattach", device = device.device_id()).entered();
    let mut client = Client::connect_with(socket, options)?;
    if device_id(&mut client)? != device.device_id() {
        return Err(AttachError::Missing("the same device"));
    }
    let channel = attach_queues(&mut client, device.device_id())?;
    device.replace_channel(channel);
    register_memory(&mut client, device.memory(), &device.tables())?;
    tracing::debug!("attached to a new handler life");
    Ok(client)
}

/// Whether the host says it has finished (BAR0 host state bit 0): a VMM that sees `LIVE`
/// cleared then leaves instead of attaching again.
pub fn host_finished(client: &mut Client) -> Result<bool, AttachError> {
    let mut state = [0u8; 4];
    client.region_read(VFIO_PCI_BAR0_REGION_INDEX, REG_HOST_STATE, &mut state)?;
    Ok(u32::from_le_bytes(state) & 1 != 0)
}
