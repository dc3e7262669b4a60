//! A small iopf-like device for the tests: the two fault regions (real ABI v2 queue regions in
//! sealed memfds), a memfd-backed BAR 0 with a sparse mmap capability, a config space without
//! an fd, `INTx` and the DMA fault IRQ, DMA map/unmap bookkeeping and reset.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use iopf_abi::{QueueGeometry, QueueKind};
use iopf_queue::{Doorbell, QueueRegion, SharedMemory};
use iopf_vfio_user::device::{
    self, DMA_FAULT_IRQ_INDEX, DMA_FAULT_REGION_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX, NUM_IRQS,
    NUM_REGIONS, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
};
use iopf_vfio_user::{
    DeviceFlags, DeviceInfo, Disconnect, DmaMap, DmaProt, DmaUnmap, Errno, IoFd, IrqAction,
    IrqData, IrqFlags, IrqInfo, RegionCapability, RegionFlags, RegionInfo, Server, ServerConfig,
    ServerError, SetIrqs, SparseMmapArea, VfioUserDevice,
};

pub const BAR0_SIZE: u64 = 8192;
pub const CONFIG_SIZE: usize = 256;
pub const RING_ENTRIES: u32 = 64;

/// A DMA mapping the device holds.
#[derive(Debug)]
pub struct Mapping {
    pub iova: u64,
    pub size: u64,
    pub offset: u64,
    pub prot: DmaProt,
    pub fd: Option<OwnedFd>,
}

/// A `SET_IRQS` without eventfds: index, start, count, action, and the `DATA_BOOL` data.
pub type IrqActionLog = (u32, u32, u32, IrqAction, Option<Vec<bool>>);

/// What the device saw, for the tests to check after the connection.
#[derive(Debug, Default)]
pub struct Log {
    /// Eventfds by (IRQ index, sub-index).
    pub eventfds: BTreeMap<(u32, u32), OwnedFd>,
    /// `SET_IRQS` without eventfds.
    pub irq_actions: Vec<IrqActionLog>,
    pub mappings: Vec<Mapping>,
    pub resets: u32,
    pub region_writes: Vec<(u32, u64, Vec<u8>)>,
}

#[derive(Debug)]
pub struct TestDevice {
    pub bar0: SharedMemory,
    pub config: Vec<u8>,
    pub fault: QueueRegion,
    pub response: QueueRegion,
    /// The response doorbell, offered as an ioeventfd on the response region's `prod`.
    pub response_doorbell: Doorbell,
    pub log: Log,
}

impl TestDevice {
    pub fn new() -> Self {
        let mut config = vec![0u8; CONFIG_SIZE];
        // Vendor and device id, so a read has something to see.
        config[..4].copy_from_slice(&[0xf4, 0x1a, 0x10, 0x10]);
        Self {
            bar0: SharedMemory::create("test-bar0", BAR0_SIZE).unwrap(),
            config,
            fault: QueueRegion::create(QueueGeometry::new(QueueKind::Fault, RING_ENTRIES).unwrap())
                .unwrap(),
            response: QueueRegion::create(
                QueueGeometry::new(QueueKind::Response, RING_ENTRIES).unwrap(),
            )
            .unwrap(),
            response_doorbell: Doorbell::new().unwrap(),
            log: Log::default(),
        }
    }

    fn backing(&self, index: u32) -> Option<BorrowedFd<'_>> {
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => Some(self.bar0.fd()),
            DMA_FAULT_REGION_INDEX => Some(self.fault.fd()),
            DMA_FAULT_RESPONSE_REGION_INDEX => Some(self.response.fd()),
            _ => None,
        }
    }
}

fn region_len(region: &QueueRegion) -> u64 {
    rustix::fs::fstat(region.fd()).unwrap().st_size as u64
}

impl VfioUserDevice for TestDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: DeviceFlags::PCI | DeviceFlags::RESET,
            num_regions: NUM_REGIONS,
            num_irqs: NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        Some(match index {
            VFIO_PCI_BAR0_REGION_INDEX => RegionInfo {
                flags: RegionFlags::READ | RegionFlags::WRITE | RegionFlags::MMAP,
                size: BAR0_SIZE,
                mmap_offset: 0,
                caps: vec![RegionCapability::SparseMmap(vec![SparseMmapArea {
                    offset: 4096,
                    size: 4096,
                }])],
            },
            VFIO_PCI_CONFIG_REGION_INDEX => RegionInfo {
                flags: RegionFlags::READ | RegionFlags::WRITE,
                size: CONFIG_SIZE as u64,
                mmap_offset: 0,
                caps: Vec::new(),
            },
            DMA_FAULT_REGION_INDEX => {
                device::queue_region_info(QueueKind::Fault, region_len(&self.fault))
            }
            DMA_FAULT_RESPONSE_REGION_INDEX => {
                device::queue_region_info(QueueKind::Response, region_len(&self.response))
            }
            i if i < NUM_REGIONS => device::absent_region_info(),
            _ => return None,
        })
    }

    fn region_fd(&self, index: u32) -> Option<BorrowedFd<'_>> {
        self.backing(index)
    }

    fn region_io_fds(&self, index: u32) -> Result<Vec<(IoFd, BorrowedFd<'_>)>, Errno> {
        if index == DMA_FAULT_RESPONSE_REGION_INDEX {
            Ok(vec![(
                device::response_doorbell_io_fd(),
                self.response_doorbell.as_fd(),
            )])
        } else {
            Ok(Vec::new())
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        Some(match index {
            VFIO_PCI_INTX_IRQ_INDEX => IrqInfo {
                flags: IrqFlags::EVENTFD | IrqFlags::MASKABLE | IrqFlags::AUTOMASKED,
                count: 1,
            },
            DMA_FAULT_IRQ_INDEX => device::dma_fault_irq_info(),
            i if i < NUM_IRQS => device::absent_irq_info(),
            _ => return None,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            let start = offset as usize;
            data.copy_from_slice(&self.config[start..start + data.len()]);
            return Ok(());
        }
        let fd = self.backing(index).ok_or(Errno::EINVAL)?;
        let mut done = 0;
        while done < data.len() {
            let n = rustix::io::pread(fd, &mut data[done..], offset + done as u64)
                .map_err(|e| Errno(e.raw_os_error() as u32))?;
            if n == 0 {
                return Err(Errno::EIO);
            }
            done += n;
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.log.region_writes.push((index, offset, data.to_vec()));
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            let start = offset as usize;
            self.config[start..start + data.len()].copy_from_slice(data);
            return Ok(());
        }
        if index == DMA_FAULT_RESPONSE_REGION_INDEX && offset == device::RESPONSE_PROD_OFFSET {
            // The region-write fallback of the response doorbell.
            self.response_doorbell.ring().map_err(Errno::from)?;
        }
        let fd = self.backing(index).ok_or(Errno::EINVAL)?;
        let mut done = 0;
        while done < data.len() {
            let n = rustix::io::pwrite(fd, &data[done..], offset + done as u64)
                .map_err(|e| Errno(e.raw_os_error() as u32))?;
            done += n;
        }
        Ok(())
    }

    fn set_irqs(&mut self, request: SetIrqs) -> Result<(), Errno> {
        let SetIrqs {
            index,
            start,
            count,
            action,
            data,
        } = request;
        match data {
            IrqData::Eventfds(fds) if fds.is_empty() => {
                for sub in start..start + count {
                    self.log.eventfds.remove(&(index, sub));
                }
            }
            IrqData::Eventfds(fds) => {
                for (sub, fd) in (start..).zip(fds) {
                    self.log.eventfds.insert((index, sub), fd);
                }
            }
            IrqData::None => {
                if count == 0 && action == IrqAction::Trigger {
                    self.log.eventfds.retain(|&(i, _), _| i != index);
                }
                self.log
                    .irq_actions
                    .push((index, start, count, action, None));
            }
            IrqData::Bool(bools) => {
                self.log
                    .irq_actions
                    .push((index, start, count, action, Some(bools)));
            }
        }
        Ok(())
    }

    fn dma_map(&mut self, map: DmaMap) -> Result<(), Errno> {
        let end = map.iova + map.size;
        if self
            .log
            .mappings
            .iter()
            .any(|m| map.iova < m.iova + m.size && m.iova < end)
        {
            return Err(Errno::EEXIST);
        }
        self.log.mappings.push(Mapping {
            iova: map.iova,
            size: map.size,
            offset: map.offset,
            prot: map.prot,
            fd: map.fd,
        });
        Ok(())
    }

    fn dma_unmap(&mut self, unmap: DmaUnmap) -> Result<(), Errno> {
        if unmap.all {
            self.log.mappings.clear();
            return Ok(());
        }
        let found = self
            .log
            .mappings
            .iter()
            .position(|m| m.iova == unmap.iova && m.size == unmap.size)
            .ok_or(Errno::ENOENT)?;
        self.log.mappings.remove(found);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.log.resets += 1;
        Ok(())
    }
}

pub type ServerThread = JoinHandle<(TestDevice, Result<Disconnect, ServerError>)>;

/// The server's side of the tests: message timeout short, so a stalled peer ends quickly.
pub fn test_config() -> ServerConfig {
    ServerConfig {
        message_timeout: Some(Duration::from_millis(500)),
        ..ServerConfig::default()
    }
}

/// Serves a fresh [`TestDevice`] on one end of a socket pair; returns the other end.
pub fn start() -> (UnixStream, ServerThread) {
    let (client, server) = UnixStream::pair().unwrap();
    let thread = std::thread::spawn(move || {
        let mut device = TestDevice::new();
        let result = Server::new(test_config()).serve(server, &mut device);
        (device, result)
    });
    (client, thread)
}

/// A fresh socket path in the temporary directory.
pub fn socket_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "iopf-vfio-user-{name}-{}-{n}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    path
}

/// Listens on a fresh path and serves one connection there. Returns the path and, to stop a
/// hung peer, a handle on the server's end of the connection once it is accepted.
pub fn start_listening(
    name: &str,
) -> (PathBuf, ServerThread, std::sync::mpsc::Receiver<UnixStream>) {
    let path = socket_path(name);
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let cleanup = path.clone();
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let _ = std::fs::remove_file(&cleanup);
        tx.send(stream.try_clone().unwrap()).unwrap();
        let mut device = TestDevice::new();
        let result = Server::new(test_config()).serve(stream, &mut device);
        (device, result)
    });
    (path, thread, rx)
}
