//! The simulated guest as a VMM's vIOMMU: one implementation of [`iopf_vmm::Viommu`], the one
//! `iopf vmm` runs. Each device has guest memory shared with the host (a sealed memfd), the
//! guest's page tables in it (nested translation: the device walks them through the PASID
//! directory), and a guest that maps each page a group asks for and answers after its latency.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use iopf_abi::{Pasid, ResponseRecord};
use iopf_queue::SharedMemoryChannel;
use iopf_vfio_user::{Client, ClientError, ClientOptions, DmaProt};
use iopf_vmm::{
    AttachError, Device, GroupToken, PageRequestGroup, RespondError, Responder, Viommu, VmmError,
};
use thiserror::Error;

use iopf_models::guest::{Guest, GuestConfig};
use iopf_models::iommu::MapError;
use iopf_models::memory::GuestMemory;
use iopf_models::nested::GuestTables;
use iopf_models::rng::Rng;

/// Why a simulated guest could not be set up or attached.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GuestError {
    /// Guest memory could not be created.
    #[error("cannot create guest memory")]
    Memory(#[source] iopf_queue::RegionAttachError),
    /// Guest memory has no room for the PASID directory.
    #[error("guest memory has no room for the PASID directory")]
    NoRoomForTables,
    /// An address space could not be created in the guest's page tables (its PASID does not
    /// fit the PASID directory, or guest memory has no page left for its table).
    #[error("cannot create the address space of {}", match .pasid { Some(p) => format!("PASID {}", p.get()), None => "requests without PASID".to_owned() })]
    AddressSpace {
        /// The PASID (`None`: requests without PASID).
        pasid: Option<Pasid>,
        /// Why the tables refused it.
        #[source]
        source: MapError,
    },
    /// A PASID to serve is beyond the 20-bit PASID space.
    #[error("PASID {0} is beyond the 20-bit PASID space")]
    PasidOutOfRange(u32),
    /// Attaching over vfio-user failed.
    #[error("cannot attach the device")]
    Attach(#[from] AttachError),
    /// Connecting failed.
    #[error("cannot connect to the host")]
    Connect(#[source] ClientError),
    /// The host handed over another device than the one to attach again.
    #[error("the host handed over device {found}, not {expected}")]
    OtherDevice {
        /// The device expected.
        expected: u32,
        /// The device handed over.
        found: u32,
    },
    /// The device's loop could not be set up.
    #[error("cannot set up the device")]
    Device(#[source] VmmError),
}

impl GuestError {
    /// Whether the host did not answer (or take) a vfio-user command in time: retrying at
    /// once would only wait again.
    pub fn timed_out(&self) -> bool {
        match self {
            GuestError::Connect(e) => e.is_timeout(),
            GuestError::Attach(iopf_vmm::AttachError::Client(e)) => e.is_timeout(),
            _ => false,
        }
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

/// One device's guest: memory, page tables and the guest model.
#[derive(Debug)]
pub struct GuestDevice {
    memory: GuestMemory,
    tables: GuestTables,
    guest: Guest,
}

impl GuestDevice {
    /// The guest of a device, with its memory and page tables in it; creates the address
    /// spaces of requests without PASID and of PASIDs `0..pasids`.
    ///
    /// # Errors
    ///
    /// [`GuestError::AddressSpace`] when an address space does not fit the tables' PASID
    /// directory (PASID `p` takes slot `p + 1`) or guest memory has no page for its table.
    pub fn new(
        mut memory: GuestMemory,
        tables: GuestTables,
        guest: Guest,
        pasids: u32,
    ) -> Result<Self, GuestError> {
        tables
            .add_space(&mut memory, None)
            .map_err(|source| GuestError::AddressSpace {
                pasid: None,
                source,
            })?;
        for p in 0..pasids {
            let pasid = Pasid::new(p).map_err(|_| GuestError::PasidOutOfRange(p))?;
            tables
                .add_space(&mut memory, Some(pasid))
                .map_err(|source| GuestError::AddressSpace {
                    pasid: Some(pasid),
                    source,
                })?;
        }
        Ok(Self {
            memory,
            tables,
            guest,
        })
    }

    /// The guest of device `device` as `setup` says: new memory, tables, and a guest seeded
    /// with the setup's seed and the device number.
    pub fn from_setup(device: u32, setup: &GuestSetup) -> Result<Self, GuestError> {
        let mut memory = GuestMemory::new(setup.pages).map_err(GuestError::Memory)?;
        // Slot 0 of the PASID directory serves requests without PASID, slot p + 1 PASID p.
        let tables = GuestTables::new(&mut memory, u64::from(setup.pasids) + 1)
            .ok_or(GuestError::NoRoomForTables)?;
        let guest = Guest::new(setup.guest, Rng::new(setup.seed ^ u64::from(device)));
        Self::new(memory, tables, guest, setup.pasids)
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The guest's page tables.
    pub fn tables(&self) -> GuestTables {
        self.tables
    }

    /// The guest model (its counters).
    pub fn guest(&self) -> &Guest {
        &self.guest
    }
}

/// Registers guest memory (`DMA_MAP` of its memfd at guest-physical 0) and the guest's PASID
/// directory (the BAR0 directory registers) with the device.
pub fn register_memory(
    client: &mut Client,
    memory: &GuestMemory,
    tables: &GuestTables,
) -> Result<(), AttachError> {
    let len = memory.shared().len();
    client
        .dma_map(
            Some(memory.shared().fd()),
            0,
            0,
            len,
            DmaProt::READ | DmaProt::WRITE,
        )
        .map_err(|source| AttachError::DmaMap {
            gpa: 0,
            len,
            source,
        })?;
    let directory = tables.directory();
    iopf_vmm::set_pasid_directory(client, directory.base, directory.entries)
}

/// A device attached over vfio-user, with its guest.
#[derive(Debug)]
pub struct Attached {
    /// The connection (closing it is unregister).
    pub client: Client,
    /// The device's fault channel, served.
    pub device: Device,
    /// The device's guest (registered with the host).
    pub guest: GuestDevice,
    /// The host's number for the device.
    pub device_id: u32,
}

/// Connects to the host at `socket`, attaches one device, creates its guest and registers the
/// guest's memory and PASID directory.
pub fn attach(
    socket: &Path,
    setup: &GuestSetup,
    options: ClientOptions,
) -> Result<Attached, GuestError> {
    let span = tracing::info_span!("attach", device = tracing::field::Empty).entered();
    let mut client = Client::connect_with(socket, options).map_err(GuestError::Connect)?;
    let channel = iopf_vmm::attach_channel(&mut client)?;
    let device_id = channel.device();
    span.record("device", device_id);
    // Creating the address spaces fills the directory before the device is told about it.
    let guest = GuestDevice::from_setup(device_id, setup)?;
    register_memory(&mut client, guest.memory(), &guest.tables())?;
    tracing::debug!(pasids = setup.pasids, pages = setup.pages, "attached");
    Ok(Attached {
        client,
        device: Device::new(channel).map_err(GuestError::Device)?,
        guest,
        device_id,
    })
}

/// Attaches device `device_id` again after the host unregistered its handler: a new
/// connection, the new life's channel, the same guest memory and page tables registered
/// again. Fails if the host hands over another device (or none). The caller gives the channel
/// to the device ([`iopf_vmm::EventLoop::replace_channel`] or
/// [`Device::replace_channel`]).
pub fn reattach(
    socket: &Path,
    device_id: u32,
    guest: &GuestDevice,
    options: ClientOptions,
) -> Result<(Client, SharedMemoryChannel), GuestError> {
    let _span = tracing::info_span!("reattach", device = device_id).entered();
    let mut client = Client::connect_with(socket, options).map_err(GuestError::Connect)?;
    let found = iopf_vmm::device_number(&mut client)?;
    if found != device_id {
        return Err(GuestError::OtherDevice {
            expected: device_id,
            found,
        });
    }
    let channel = iopf_vmm::attach_channel(&mut client)?;
    register_memory(&mut client, guest.memory(), &guest.tables())?;
    tracing::debug!("attached to a new handler life");
    Ok((client, channel))
}

/// An answer waiting for its time.
#[derive(Debug)]
struct Due {
    at: Instant,
    seq: u64,
    device: u32,
    token: GroupToken,
    record: ResponseRecord,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Debug)]
struct Served {
    guest: GuestDevice,
    responder: Responder,
    /// Its answers wait (the device is between handler lives).
    paused: bool,
}

/// What the simulated guest counts beyond the guest model's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimulatedGuestStats {
    /// Groups of a device the guest was not given.
    pub unknown_device: u64,
    /// Answers of an earlier handler life, sent anyway (see [`SimulatedGuest::send_due`]).
    pub sent_across_lives: u64,
    /// Answers the responder refused (device gone, outbox full).
    pub refused: u64,
}

/// The simulated guests of any number of devices, as one vIOMMU.
///
/// Answers fall due after the guest's latency: drive them with [`send_due`](Self::send_due)
/// whenever [`next_due`](Self::next_due) has passed (an event loop's timeout).
#[derive(Debug)]
pub struct SimulatedGuest {
    devices: HashMap<u32, Served>,
    started: Instant,
    due: BinaryHeap<Reverse<Due>>,
    /// Answers due while their device is paused.
    held: Vec<Due>,
    seq: u64,
    stats: SimulatedGuestStats,
}

impl Default for SimulatedGuest {
    fn default() -> Self {
        Self::new()
    }
}

impl SimulatedGuest {
    /// No device yet.
    pub fn new() -> Self {
        Self {
            devices: HashMap::new(),
            started: Instant::now(),
            due: BinaryHeap::new(),
            held: Vec::new(),
            seq: 0,
            stats: SimulatedGuestStats::default(),
        }
    }

    /// Serves the groups of device `device` with `guest`, answering through `responder`.
    pub fn add_device(&mut self, device: u32, responder: Responder, guest: GuestDevice) {
        self.devices.insert(
            device,
            Served {
                guest,
                responder,
                paused: false,
            },
        );
    }

    /// Holds the answers of `device` back while it is between handler lives (`true`), or
    /// lets them go again (`false`): they fall due into the new life, as a guest's would.
    pub fn pause(&mut self, device: u32, paused: bool) {
        if let Some(served) = self.devices.get_mut(&device) {
            served.paused = paused;
        }
        if !paused {
            let (go, keep): (Vec<Due>, Vec<Due>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|d| d.device == device);
            self.held = keep;
            self.due.extend(go.into_iter().map(Reverse));
        }
    }

    /// The guest of a device.
    pub fn device(&self, device: u32) -> Option<&GuestDevice> {
        self.devices.get(&device).map(|s| &s.guest)
    }

    /// Counters.
    pub fn stats(&self) -> SimulatedGuestStats {
        self.stats
    }

    /// When the next answer falls due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse(d)| d.at)
    }

    /// How long until the next answer falls due, at most `max`.
    pub fn timeout(&self, max: Duration) -> Duration {
        self.next_due().map_or(max, |at| {
            at.saturating_duration_since(Instant::now()).min(max)
        })
    }

    /// Hands every answer that is due to its device's responder; returns how many. The
    /// device sends them at its next poll (its loop is woken).
    ///
    /// An answer whose group came in an earlier handler life is sent anyway, unchecked, into
    /// the new life: the simulated guest models a VMM whose answers straddle an unregister, so
    /// that the host's refusal of earlier-life cookies stays exercised
    /// (`scenarios/unregister.toml`). A VMM built on the library lets it drop them.
    pub fn send_due(&mut self) -> usize {
        let now = Instant::now();
        let mut sent = 0;
        while self.due.peek().is_some_and(|Reverse(d)| d.at <= now) {
            let Some(Reverse(due)) = self.due.pop() else {
                break;
            };
            if self.devices.get(&due.device).is_some_and(|s| s.paused) {
                self.held.push(due);
                continue;
            }
            sent += usize::from(self.answer(&due));
        }
        sent
    }

    fn answer(&mut self, due: &Due) -> bool {
        let Some(served) = self.devices.get(&due.device) else {
            return false;
        };
        let result = match served.responder.respond_record(due.token, due.record) {
            Err(RespondError::StaleLife) => {
                self.stats.sent_across_lives += 1;
                served.responder.respond_unchecked(due.record)
            }
            other => other,
        };
        match result {
            Ok(()) => true,
            // Queued; the device sends it at its next poll, which its loop's timeout brings.
            Err(RespondError::Wake(_)) => true,
            Err(_) => {
                self.stats.refused += 1;
                false
            }
        }
    }
}

impl Viommu for SimulatedGuest {
    fn page_request_group(&mut self, group: PageRequestGroup) {
        let device = group.device();
        let Some(served) = self.devices.get_mut(&device) else {
            self.stats.unknown_device += 1;
            return;
        };
        let now = Instant::now();
        let now_ns = u64::try_from(now.duration_since(self.started).as_nanos()).unwrap_or(u64::MAX);
        let token = group.token();
        let GuestDevice {
            memory,
            tables,
            guest,
        } = &mut served.guest;
        let answers = guest.on_group(device, group.requests(), 0, tables, memory, now_ns);
        for answer in answers {
            self.seq += 1;
            let due = Due {
                at: self.started + Duration::from_nanos(answer.at),
                seq: self.seq,
                device,
                token,
                record: answer.record,
            };
            if due.at <= now {
                // Due already: queued inside the poll, sent when it ends.
                self.answer(&due);
            } else {
                self.due.push(Reverse(due));
            }
        }
    }
}
