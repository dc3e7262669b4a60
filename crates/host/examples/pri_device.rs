//! A toy PRI-capable PCIe device on `iopf-host`, for a device author to copy: it embeds
//! `FaultRegions`, shows the VMM a config space with the PCI Express, ATS, PASID and PRI
//! capabilities, and once the VMM has mapped guest memory and enabled Bus Master and PRI, it
//! writes a pattern into `--pages` pages of guest memory from 1 MiB on. It has no translation
//! of its own for a page until a page request for it was answered `Success` (an ATC that starts
//! empty, IOVA = guest-physical address), and keeps at most PRI's Allocation requests out.
//!
//! ```text
//! cargo run --release -p iopf-host --example pri_device -- --socket /tmp/dev.sock --pages 64 &
//! cargo run --release -p iopf-vmm --example minimal -- --socket /tmp/dev.sock
//! ```
//!
//! It serves one VMM. When every page is written it unregisters (the VMM sees `LIVE` cleared
//! and its BAR0 says the device has finished), prints what it did, and exits 0 if every page
//! request was answered `Success`.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use iopf_abi::{PageAddr, Perm, PrgIndex, ResponseCode};
use iopf_core::{DeviceConfig, DeviceFault, DeviceId, FaultCore, MonotonicClock};
use iopf_host::{ConfigSpace, ConfigSpaceBuilder, FaultPort, FaultRegions};
use iopf_queue::{Doorbell, SharedMemory};
use iopf_vfio_user::device::{self, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};
use iopf_vfio_user::{
    DeviceFlags, DeviceInfo, DmaMap, DmaProt, DmaUnmap, Errno, IoFd, IrqInfo, RegionFlags,
    RegionInfo, Server, ServerConfig, SetIrqs, VfioUserDevice,
};

/// Errors of the device's setup and engine.
pub type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Where the buffer starts (an IOVA: the guest-physical address, the VMM keeping no tables).
const BUFFER: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// BAR0 register (u64, read-only): pages written so far.
const REG_PAGES_DONE: u64 = 0x20;
/// How long the device waits for a VMM to map memory and enable PRI.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the device and its DMA engine (another thread) share.
#[derive(Debug)]
struct Shared {
    port: FaultPort,
    config: Mutex<ConfigSpace>,
    /// `DMA_MAP`s: IOVA → memory.
    memory: Mutex<BTreeMap<u64, SharedMemory>>,
    pages_done: AtomicU64,
    finished: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The device as the VMM's connection sees it: its registers and memory, and the component.
#[derive(Debug)]
struct PriDevice {
    shared: Arc<Shared>,
    faults: FaultRegions,
}

impl VfioUserDevice for PriDevice {
    fn device_info(&self) -> DeviceInfo {
        let (num_regions, num_irqs) = (FaultRegions::NUM_REGIONS, FaultRegions::NUM_IRQS);
        let flags = DeviceFlags::PCI | DeviceFlags::RESET;
        DeviceInfo {
            flags,
            num_regions,
            num_irqs,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = |size| RegionInfo {
            flags: RegionFlags::READ | RegionFlags::WRITE,
            size,
            mmap_offset: 0,
            caps: Vec::new(),
        };
        self.faults.region_info(index).or(match index {
            VFIO_PCI_BAR0_REGION_INDEX => Some(rw(PAGE)),
            VFIO_PCI_CONFIG_REGION_INDEX => Some(rw(lock(&self.shared.config).len())),
            i if i < FaultRegions::NUM_REGIONS => Some(device::absent_region_info()),
            _ => None,
        })
    }

    fn region_fd(&self, index: u32) -> Option<BorrowedFd<'_>> {
        self.faults.region_fd(index)
    }

    fn region_io_fds(&self, index: u32) -> Result<Vec<(IoFd, BorrowedFd<'_>)>, Errno> {
        Ok(self.faults.region_io_fds(index).unwrap_or_default())
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let absent = (index < FaultRegions::NUM_IRQS).then(device::absent_irq_info);
        self.faults.irq_info(index).or(absent)
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        if let Some(result) = self.faults.region_read(index, offset, data) {
            return result;
        }
        let shared = &self.shared;
        let value = match (index, offset, data.len()) {
            (VFIO_PCI_CONFIG_REGION_INDEX, ..) => return lock(&shared.config).read(offset, data),
            (VFIO_PCI_BAR0_REGION_INDEX, device::REG_DEVICE_ID, 4) => 1,
            (VFIO_PCI_BAR0_REGION_INDEX, device::REG_HOST_STATE, 4) => {
                u64::from(shared.finished.load(Relaxed)) * u64::from(device::HOST_STATE_FINISHED)
            }
            (VFIO_PCI_BAR0_REGION_INDEX, REG_PAGES_DONE, 8) => shared.pages_done.load(Relaxed),
            _ => return Err(Errno::EINVAL),
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if let Some(result) = self.faults.region_write(index, offset, data) {
            return result;
        }
        match index {
            VFIO_PCI_CONFIG_REGION_INDEX => lock(&self.shared.config).write(offset, data),
            _ => Err(Errno::EINVAL), // BAR0 has no writable register
        }
    }

    fn set_irqs(&mut self, request: SetIrqs) -> Result<(), Errno> {
        self.faults.set_irqs(request)
    }

    /// A toy's checks: page-aligned, writable, at most 64 mappings (a mapping at the same
    /// IOVA replaces the last; overlaps are the VMM's problem, not the device's safety).
    fn dma_map(&mut self, map: DmaMap) -> Result<(), Errno> {
        let aligned = [map.iova, map.offset, map.size]
            .iter()
            .all(|v| v % PAGE == 0);
        let mut memory = lock(&self.shared.memory);
        if !aligned || !map.prot.contains(DmaProt::WRITE) || memory.len() >= 64 {
            return Err(Errno::EINVAL);
        }
        let fd = map.fd.ok_or(Errno::EINVAL)?;
        let region =
            SharedMemory::attach_range(fd, map.offset, map.size).map_err(|_| Errno::EINVAL)?;
        memory.insert(map.iova, region);
        Ok(())
    }

    fn dma_unmap(&mut self, unmap: DmaUnmap) -> Result<(), Errno> {
        let mut memory = lock(&self.shared.memory);
        if unmap.all {
            memory.clear();
        } else if memory
            .get(&unmap.iova)
            .is_some_and(|m| m.len() == unmap.size)
        {
            memory.remove(&unmap.iova);
        } else {
            return Err(Errno::ENOENT);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        // Pending groups are answered `Invalid`; PRI and Bus Master go back to disabled.
        self.faults.reset().map_err(|_| Errno::EIO)?;
        lock(&self.shared.config).reset();
        Ok(())
    }
}

/// What the DMA engine did: page requests sent, pages written (answered `Success`), pages
/// answered `Invalid`.
#[derive(Debug, Default)]
pub struct Summary {
    pub requests: u64,
    pub success: u64,
    pub invalid: u64,
}

/// Writes word `w` of page `page` into guest memory, if a mapping covers it.
fn dma_write(shared: &Shared, page: u64, w: u64) -> bool {
    let iova = BUFFER + page * PAGE + w * 8;
    let memory = lock(&shared.memory);
    let Some((start, region)) = memory.range(..=iova).next_back() else {
        return false;
    };
    let index = usize::try_from((iova - start) / 8).unwrap_or(usize::MAX);
    let Some(word) = region.words().get(index) else {
        return false;
    };
    word.store(page << 32 | w, Relaxed);
    true
}

/// The DMA engine: waits for the VMM, then asks for each page and writes it once answered.
fn dma(shared: &Shared, pages: u64, doorbell: &Doorbell) -> Fallible<Summary> {
    let (port, started) = (&shared.port, Instant::now());
    let ready = || {
        let config = lock(&shared.config);
        let attached = port.core().consumer_attached(port.id()).unwrap_or(false);
        attached && config.pri_enabled() && config.bus_master() && !lock(&shared.memory).is_empty()
    };
    while !ready() {
        if started.elapsed() > READY_TIMEOUT || !port.is_registered() {
            return Err("no VMM mapped memory and enabled Bus Master and PRI".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // PRG indices are 9 bits: never more groups out than there are indices.
    let allocation = u64::from(lock(&shared.config).pri_allocation()).clamp(1, 512);
    let (mut summary, mut next, mut out) = (Summary::default(), 0, BTreeMap::new());
    let mut answers = Vec::new();
    while shared.pages_done.load(Relaxed) < pages {
        if !port.is_registered() {
            return Err("the VMM left before every page was written".into());
        }
        while next < pages && (out.len() as u64) < allocation && lock(&shared.config).pri_enabled()
        {
            let grpid = PrgIndex::new((next % 512) as u32)?;
            let addr = PageAddr::new(BUFFER + next * PAGE)?;
            port.report(&DeviceFault::page_request(
                None,
                grpid,
                Perm::WRITE,
                addr,
                true,
            ))?;
            out.insert(grpid, next);
            (summary.requests, next) = (summary.requests + 1, next + 1);
        }
        // The VMM rings the doorbell after publishing responses; the core reads them and
        // delivers each group's answer to the port.
        doorbell.wait(Some(Duration::from_millis(10)))?;
        port.process_responses()?;
        answers.clear();
        port.drain_responses(&mut answers);
        for answer in &answers {
            let Some(page) = out.remove(&answer.grpid) else {
                continue;
            };
            match answer.code {
                ResponseCode::Success if (0..PAGE / 8).all(|w| dma_write(shared, page, w)) => {
                    summary.success += 1
                }
                ResponseCode::Failure => return Err("Response Failure: PRI halted".into()),
                _ => summary.invalid += 1,
            }
            shared.pages_done.fetch_add(1, Relaxed);
        }
    }
    Ok(summary)
}

/// `--socket PATH [--pages N]`, with std only.
fn args() -> Fallible<(std::path::PathBuf, u64)> {
    let (mut socket, mut pages) = (None, 64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--socket" => socket = Some(value.into()),
            "--pages" if value.parse::<u64>().is_ok_and(|n| (1..=8192).contains(&n)) => {
                pages = value.parse()?
            }
            _ => {
                return Err(
                    format!("{arg} {value}? usage: --socket PATH [--pages 1..=8192]").into(),
                );
            }
        }
    }
    Ok((socket.ok_or("--socket PATH is required")?, pages))
}

/// Serves the device on `path` to one VMM until `pages` pages are written (or the VMM
/// leaves), and says what the DMA engine did.
pub fn run(path: &std::path::Path, pages: u64) -> Fallible<Summary> {
    let core = Arc::new(FaultCore::new(Arc::new(MonotonicClock::new())));
    let port = FaultPort::add(core, DeviceId(1), DeviceConfig::default())?;
    let mut config = ConfigSpaceBuilder::new(0x1b36, 0x10f1)
        .bar32(0, PAGE as u32)
        .express_endpoint()
        .ats(0, true)
        .pasid(20, false, false)
        .pri(32, false)
        .build()?;
    config.connect_pri(&port);
    let (memory, pages_done, finished) = (Mutex::default(), AtomicU64::new(0), false.into());
    let config = Mutex::new(config);
    let shared = Arc::new(Shared {
        port,
        config,
        memory,
        pages_done,
        finished,
    });
    // Removes the socket however the device ends.
    let (listener, _socket) = iopf_host::socket::bind(path)?;
    let (stream, _) = listener.accept()?;
    // One device, one VMM: later connections (a VMM looking for more devices) are closed.
    std::thread::spawn(move || listener.incoming().for_each(drop));
    let faults = FaultRegions::attach(&shared.port, 64)?;
    let doorbell = faults.response_doorbell().try_clone()?;
    let engine = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let result = dma(&shared, pages, &doorbell);
            // Done (or failed): `LIVE` cleared and BAR0 says finished, so the VMM leaves.
            shared.finished.store(true, Relaxed);
            shared.port.unregister();
            result
        })
    };
    let mut device = PriDevice { shared, faults };
    let end = Server::new(ServerConfig::default()).serve(stream, &mut device);
    // The VMM is gone: its groups are answered, and an engine still waiting stops.
    device.faults.detach();
    end?;
    engine.join().map_err(|_| "the DMA engine panicked")?
}

fn main() -> Fallible<()> {
    let (path, pages) = args()?;
    let summary = run(&path, pages)?;
    println!(
        "pri_device: {} of {pages} pages written, {} page requests, {} invalid",
        summary.success, summary.requests, summary.invalid
    );
    if summary.success != pages {
        return Err(format!("{} of {pages} pages written", summary.success).into());
    }
    Ok(())
}
