//! Guest memory the rust-vmm way: `map_guest_memory` sends one `DMA_MAP` per `vm-memory`
//! region (IOVA = guest-physical address, the region's file and offset), refuses regions
//! without a file, and, against a real `iopf host` (the `Host` library in-process, a real
//! socket), is all a VMM needs besides the library to serve a device to the end of its workload
//! with every DMA byte checked.

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use std::fs::File;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iopf_core::DeviceConfig;
use iopf_endpoint::engine::Workload;
use iopf_endpoint::{Host, HostConfig};
use iopf_models::endpoint::EndpointConfig;
use iopf_models::guest::{Guest, GuestConfig};
use iopf_models::memory::GuestMemory;
use iopf_models::nested::GuestTables;
use iopf_models::rng::Rng;
use iopf_models::workload::{Pattern, Stream};
use iopf_queue::SharedMemory;
use iopf_sim::vmm_guest::{GuestDevice, SimulatedGuest};
use iopf_vfio_user::{
    Client, DeviceFlags, DeviceInfo, DmaMap, DmaProt, Errno, IrqInfo, RegionInfo, SetIrqs,
    VfioUserDevice,
};
use iopf_vmm::{
    AttachError, Device, EventLoop, attach_channel, map_guest_memory, set_pasid_directory,
};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A `DMA_MAP` as the device got it: (iova, size, offset, prot, inode of the fd).
type Mapped = (u64, u64, u64, DmaProt, u64);

/// A vfio-user device that records the `DMA_MAP`s it gets.
#[derive(Default)]
struct Recorder {
    maps: Arc<Mutex<Vec<Mapped>>>,
}

impl VfioUserDevice for Recorder {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: DeviceFlags::PCI,
            num_regions: 9,
            num_irqs: 5,
        }
    }
    fn region_info(&self, _index: u32) -> Option<RegionInfo> {
        None
    }
    fn region_fd(&self, _index: u32) -> Option<BorrowedFd<'_>> {
        None
    }
    fn irq_info(&self, _index: u32) -> Option<IrqInfo> {
        None
    }
    fn region_read(&mut self, _index: u32, _offset: u64, _data: &mut [u8]) -> Result<(), Errno> {
        Err(Errno::EINVAL)
    }
    fn region_write(&mut self, _index: u32, _offset: u64, _data: &[u8]) -> Result<(), Errno> {
        Err(Errno::EINVAL)
    }
    fn set_irqs(&mut self, _request: SetIrqs) -> Result<(), Errno> {
        Err(Errno::EINVAL)
    }
    fn dma_map(&mut self, map: DmaMap) -> Result<(), Errno> {
        let fd = map.fd.ok_or(Errno::EINVAL)?;
        let inode = rustix::fs::fstat(&fd).map_err(|_| Errno::EINVAL)?.st_ino;
        self.maps
            .lock()
            .unwrap()
            .push((map.iova, map.size, map.offset, map.prot, inode));
        Ok(())
    }
}

fn recorder() -> (Client, Arc<Mutex<Vec<Mapped>>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut device = Recorder::default();
    let maps = Arc::clone(&device.maps);
    std::thread::spawn(move || iopf_vfio_user::serve(b, &mut device));
    (Client::from_stream(a).unwrap(), maps)
}

#[test]
fn each_region_is_mapped_at_its_guest_physical_address_from_its_file_and_offset() {
    let shared = SharedMemory::create("guest", 3 * 4096).unwrap();
    let file = || File::from(shared.fd().try_clone_to_owned().unwrap());
    let memory = GuestMemoryMmap::<()>::from_ranges_with_files([
        (GuestAddress(0), 4096, Some(FileOffset::new(file(), 0))),
        (
            GuestAddress(0x1_0000_0000),
            8192,
            Some(FileOffset::new(file(), 4096)),
        ),
    ])
    .unwrap();
    let (mut client, maps) = recorder();
    let mapped = map_guest_memory(&mut client, &memory, |r| {
        if r.start_addr().0 == 0 {
            DmaProt::READ
        } else {
            DmaProt::READ | DmaProt::WRITE
        }
    })
    .unwrap();
    assert_eq!(mapped, 2);
    let inode = rustix::fs::fstat(shared.fd()).unwrap().st_ino;
    assert_eq!(
        *maps.lock().unwrap(),
        vec![
            (0, 4096, 0, DmaProt::READ, inode),
            (
                0x1_0000_0000,
                8192,
                4096,
                DmaProt::READ | DmaProt::WRITE,
                inode
            ),
        ]
    );
}

#[test]
fn memory_without_a_file_is_refused_before_anything_is_sent() {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x8000), 4096)]).unwrap();
    let (mut client, maps) = recorder();
    let err = map_guest_memory(&mut client, &memory, |_| DmaProt::READ).unwrap_err();
    assert!(
        matches!(
            err,
            AttachError::NoFile {
                gpa: 0x8000,
                len: 4096
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("shared fd"), "{err}");
    assert!(maps.lock().unwrap().is_empty());
}

fn socket(name: &str) -> TempPath {
    TempPath::new(&format!("vmm-{name}"), "host.sock")
}

/// The host takes one region at guest-physical 0 today (multi-region is being added on its
/// side); with it, the library serves the device to the end of its workload.
#[test]
fn a_real_host_serves_a_workload_into_vm_memory_guest_memory() {
    const ACCESSES: u32 = 300;
    let path = socket("vm-memory");
    let config = HostConfig {
        workloads: vec![Workload {
            endpoint: EndpointConfig::default(),
            streams: vec![Stream {
                pasid: iopf_abi::Pasid::new(1).ok(),
                base: 0x4000_0000,
                pages: 64,
                pattern: Pattern::Random,
                access_len: 4096,
                write: true,
                accesses: ACCESSES,
                interval_ns: 10_000,
            }],
            seed: 5,
        }],
        ring_entries: 64,
        device: DeviceConfig::default(),
        repeat: false,
        threads: 2,
    };
    let host = Host::bind(config, &path).unwrap();

    // The guest's memory (a sealed memfd) and its page tables, as the VMM's vm-memory sees it.
    let mut memory = GuestMemory::new(1024).unwrap();
    let tables = GuestTables::new(&mut memory, 4).unwrap();
    let len = usize::try_from(memory.shared().len()).unwrap();
    let file = File::from(memory.shared().fd().try_clone_to_owned().unwrap());
    let vm = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    let guest = Guest::new(
        GuestConfig {
            refuse_rate: 0.0,
            ..GuestConfig::default()
        },
        Rng::new(3),
    );
    let guest = GuestDevice::new(memory, tables, guest, 2).unwrap();

    let mut client = Client::connect(&path).unwrap();
    let channel = attach_channel(&mut client).unwrap();
    let device_id = channel.device();
    assert_eq!(
        map_guest_memory(&mut client, &vm, |_| DmaProt::READ | DmaProt::WRITE).unwrap(),
        1
    );
    let directory = guest.tables().directory();
    set_pasid_directory(&mut client, directory.base, directory.entries).unwrap();

    let device = Device::new(channel).unwrap();
    let mut sim = SimulatedGuest::new();
    sim.add_device(device_id, device.responder(), guest);
    let mut events = EventLoop::new().unwrap();
    let key = events.add(device).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !host.finished() {
        assert!(Instant::now() < deadline, "the workload did not finish");
        let timeout = sim.timeout(Duration::from_millis(10));
        let round = events.run_once(&mut sim, Some(timeout)).unwrap();
        assert!(round.failed.is_empty());
        sim.send_due();
    }
    // The last answers out, then the host's report.
    events.run_once(&mut sim, Some(Duration::ZERO)).unwrap();
    let stats = events.device(key).unwrap().stats();
    let report = host.finish();
    drop(client);
    let _ = std::fs::remove_file(&path);
    let engine = &report.engines[0];
    assert_eq!(engine.endpoint.accesses, u64::from(ACCESSES));
    assert_eq!(engine.endpoint.completed, u64::from(ACCESSES), "{report:?}");
    assert_eq!(engine.memory.bytes_mismatched, 0);
    assert!(engine.memory.bytes_verified > 0);
    assert_eq!(stats.groups, report.core.groups_delivered);
    assert_eq!(stats.malformed, 0);
    assert!(vm.iter().count() == 1 && vm.iter().all(|r| r.len() as usize == len));
}
