//! The smallest VMM on `iopf-vmm`: it attaches to every device of an `iopf host`, gives each
//! its own guest memory, answers every page request group from its own vIOMMU, serves all the
//! devices from one thread, and leaves when the host has finished.
//!
//! ```text
//! iopf host --socket /tmp/iopf.sock --scenario scenarios/direct.toml &
//! cargo run --release -p iopf-vmm --example minimal -- --socket /tmp/iopf.sock
//! ```
//!
//! It keeps no page tables for its devices (direct mode, `docs/PROTOCOL.md` §4.6): it maps
//! guest memory and writes no PASID directory, so a request without PASID reaches the page at
//! that guest-physical address once the vIOMMU has answered it `Success`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iopf_abi::{ResponseCode, UnrecoverableFault};
use iopf_vfio_user::device::VFIO_PCI_CONFIG_REGION_INDEX;
use iopf_vfio_user::{Client, ClientError, DmaProt};
use iopf_vmm::{
    DeviceKey, EventLoop, PageRequestGroup, Responder, Viommu, attach_channel, host_finished,
    map_guest_memory,
};
use rustix::fs::{MemfdFlags, SealFlags};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Guest memory per device: 64 MiB at guest-physical 0 (`scenarios/direct.toml`'s buffers lie
/// below 34 MiB). A memfd is sparse: only the pages DMA touches cost memory.
pub const GUEST_MEMORY: u64 = 64 << 20;

/// A memfd of `len` bytes the host accepts: sealable, sized, sealed against shrinking.
pub fn memfd(len: u64) -> Result<File> {
    let fd = rustix::fs::memfd_create("guest", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, len)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK)?;
    Ok(File::from(fd))
}

/// One region of `GUEST_MEMORY` bytes at guest-physical 0, from a memfd.
pub fn guest_memory() -> Result<GuestMemoryMmap> {
    let file = FileOffset::new(memfd(GUEST_MEMORY)?, 0);
    let len = usize::try_from(GUEST_MEMORY)?;
    Ok(GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(file),
    )])?)
}

/// A device as the vIOMMU knows it, and what it answered.
#[derive(Debug)]
pub struct Guest {
    pub memory: GuestMemoryMmap,
    responder: Responder,
    pub success: u64,
    pub invalid: u64,
    pub unrecoverable: u64,
    /// Answers the library did not queue (an honest host never causes one).
    pub dropped: u64,
}

/// The vIOMMU: a group is `Success` when all its pages are in its device's guest memory (and
/// it has no PASID: this VMM keeps no address spaces), `Invalid` otherwise.
#[derive(Debug, Default)]
pub struct DirectViommu {
    pub guests: BTreeMap<u32, Guest>,
}

impl Viommu for DirectViommu {
    fn page_request_group(&mut self, group: PageRequestGroup) {
        let Some(guest) = self.guests.get_mut(&group.device()) else {
            eprintln!("a group of device {}, which is not ours", group.device());
            return;
        };
        let memory = &guest.memory;
        let mapped = group.pasid().is_none()
            && (group.requests().iter())
                .all(|r| memory.address_in_range(GuestAddress(r.addr.get())));
        let code = if mapped {
            guest.success += 1;
            ResponseCode::Success
        } else {
            guest.invalid += 1;
            ResponseCode::Invalid
        };
        // A real vIOMMU injects the group into the guest and answers later, from any thread.
        if let Err(e) = guest.responder.respond(group.token(), code) {
            guest.dropped += 1;
            eprintln!("device {}: answer dropped: {e}", group.device());
        }
    }

    fn unrecoverable(&mut self, device: u32, _fault: UnrecoverableFault) {
        if let Some(guest) = self.guests.get_mut(&device) {
            guest.unrecoverable += 1;
        }
    }
}

/// What one device did, once the host has finished.
#[derive(Debug)]
pub struct Account {
    pub device: u32,
    pub requests: u64,
    pub groups: u64,
    pub responses: u64,
    pub success: u64,
    pub invalid: u64,
    pub unrecoverable: u64,
    pub dropped: u64,
}

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {}: {} page requests in {} groups, answered {} success {} invalid \
             ({} responses sent, {} dropped), {} unrecoverable faults",
            self.device,
            self.requests,
            self.groups,
            self.success,
            self.invalid,
            self.responses,
            self.dropped,
            self.unrecoverable
        )
    }
}

/// Every device on one thread: the loop, the vIOMMU, and each device's connection (closing it
/// detaches the device).
#[derive(Debug)]
pub struct Vmm {
    pub events: EventLoop,
    pub viommu: DirectViommu,
    clients: BTreeMap<DeviceKey, (u32, Client)>,
}

impl Vmm {
    pub fn new() -> Result<Self> {
        let (viommu, clients) = (DirectViommu::default(), BTreeMap::new());
        Ok(Self {
            events: EventLoop::new()?,
            viommu,
            clients,
        })
    }

    /// Attaches the next free device of the host on `socket` and gives it `memory`, each
    /// region with the access `prot` says. `None`: the host refused the connection (it closes
    /// one that finds every device taken).
    pub fn attach(
        &mut self,
        socket: &Path,
        memory: GuestMemoryMmap,
        prot: impl Fn(&GuestRegionMmap) -> DmaProt,
    ) -> Result<Option<u32>> {
        let mut client = match Client::connect(socket) {
            Ok(client) => client,
            // The host closes it unread: the handshake sees a reset (or an end of stream).
            Err(ClientError::Closed | ClientError::Connection(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let channel = attach_channel(&mut client)?;
        let id = channel.device();
        enable_pri(&mut client)?;
        // No PASID directory follows: the device starts in direct mode once memory is mapped.
        map_guest_memory(&mut client, &memory, prot)?;
        let device = iopf_vmm::Device::new(channel)?;
        let responder = device.responder();
        let key = self.events.add(device)?;
        self.clients.insert(key, (id, client));
        let (success, invalid, unrecoverable, dropped) = (0, 0, 0, 0);
        let guest = Guest {
            memory,
            responder,
            success,
            invalid,
            unrecoverable,
            dropped,
        };
        self.viommu.guests.insert(id, guest);
        // Serve the devices attached so far while the others attach.
        self.events
            .run_once(&mut self.viommu, Some(Duration::ZERO))?;
        Ok(Some(id))
    }

    /// Serves every device until its channel is no longer live and the host says it has
    /// finished. Returns each device's account.
    pub fn run(&mut self) -> Result<Vec<Account>> {
        let events = &mut self.events;
        let mut accounts = Vec::new();
        while !events.is_empty() {
            let round = events.run_once(&mut self.viommu, Some(Duration::from_millis(100)))?;
            if let Some(failed) = round.failed.into_iter().next() {
                return Err(format!("device {:?}: {}", failed.key, failed.error).into());
            }
            let left: Vec<_> = events
                .devices()
                .filter(|(_, d)| !d.live())
                .map(|(k, _)| k)
                .collect();
            for key in left {
                let (id, mut client) =
                    self.clients.remove(&key).ok_or("a device without client")?;
                if !host_finished(&mut client)? {
                    return Err(format!("device {id}: unregistered by a host that runs on").into());
                }
                let stats = events.remove(key).ok_or("a device left the loop")?.stats();
                let guest = &self.viommu.guests[&id];
                accounts.push(Account {
                    device: id,
                    requests: stats.requests,
                    groups: stats.groups,
                    responses: stats.responses,
                    success: guest.success,
                    invalid: guest.invalid,
                    unrecoverable: guest.unrecoverable,
                    dropped: guest.dropped,
                });
            }
        }
        Ok(accounts)
    }
}

/// What a guest's driver does for a PRI-capable device before it may send page requests:
/// Bus Master on, and PRI enabled with an Outstanding Page Request Allocation of its Capacity
/// (at most 256). Found by walking the extended capabilities from 0x100; a device without a
/// PRI capability, or without the 4 KiB extended config space, is left as it is.
pub fn enable_pri(client: &mut Client) -> Result<()> {
    const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
    const PRI: u32 = 0x13;
    if client.region_info(CONFIG)?.info.size < 4096 {
        return Ok(());
    }
    let read32 = |client: &mut Client, at: u64| -> Result<u32> {
        let mut word = [0u8; 4];
        client.region_read(CONFIG, at, &mut word)?;
        Ok(u32::from_le_bytes(word))
    };
    // A chain longer than the extended space's 960 headers is a loop.
    let (mut at, mut hops) = (0x100, 0);
    while (0x100..4096).contains(&at) && hops < 960 {
        let header = read32(client, at)?;
        if header & 0xffff == PRI {
            let allocation = read32(client, at + 0x08)?.min(256);
            client.region_write(CONFIG, at + 0x0c, &allocation.to_le_bytes())?;
            client.region_write(CONFIG, at + 0x04, &1u16.to_le_bytes())?; // Enable
            let command = read32(client, 0x04)? as u16 | 1 << 2; // Bus Master
            client.region_write(CONFIG, 0x04, &command.to_le_bytes())?;
            return Ok(());
        }
        (at, hops) = (u64::from(header >> 20), hops + 1);
    }
    Ok(())
}

/// Attaches `devices` devices, or every device the host has (until it refuses a connection),
/// each with guest memory from `memory`, mapped with the access `prot` gives each region.
pub fn attach_all(
    vmm: &mut Vmm,
    socket: &Path,
    devices: Option<u32>,
    mut memory: impl FnMut() -> Result<GuestMemoryMmap>,
    prot: impl Fn(&GuestRegionMmap) -> DmaProt,
) -> Result<()> {
    while devices.is_none_or(|n| vmm.viommu.guests.len() < n as usize) {
        match vmm.attach(socket, memory()?, &prot)? {
            Some(_) => {}
            None if devices.is_none() && !vmm.viommu.guests.is_empty() => break,
            None => return Err("the host refused the connection: no free device".into()),
        }
    }
    Ok(())
}

/// `--socket PATH [--devices N]`, with std only.
pub fn args() -> Result<(PathBuf, Option<u32>)> {
    let (mut socket, mut devices) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--socket" => socket = Some(PathBuf::from(value)),
            "--devices" => devices = Some(value.parse()?),
            _ => {
                return Err(
                    format!("unknown argument {arg}; usage: --socket PATH [--devices N]").into(),
                );
            }
        }
    }
    Ok((socket.ok_or("--socket PATH is required")?, devices))
}

/// Logs the library's events to stderr, filtered by `RUST_LOG` (`debug`: attach, each device's
/// number).
pub fn log() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> Result<()> {
    log();
    let (socket, devices) = args()?;
    let mut vmm = Vmm::new()?;
    let rw = |_: &GuestRegionMmap| DmaProt::READ | DmaProt::WRITE;
    attach_all(&mut vmm, &socket, devices, guest_memory, rw)?;
    for account in vmm.run()? {
        println!("{account}");
    }
    Ok(())
}
