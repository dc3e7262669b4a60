//! Conformance: the rust-vmm `vfio_user` crate's `Client` (0.1.x, written by others) against
//! our server. It completes version negotiation, device info, every region's info (the
//! fault regions with their type capability, BAR 0 with a sparse mmap capability), IRQ info,
//! `SET_IRQS` with an eventfd, region reads and writes, DMA map/unmap and reset.
//!
//! Its known limits (`docs/PROTOCOL.md` §5): it ignores short reads, drops
//! `VFIO_REGION_INFO_CAP_TYPE` (so this test tells the fault regions apart by the `kind` in
//! their mapped host page), and blocks for ever on an error reply to IRQ info or region I/O. A
//! watchdog turns a hang into a failure instead of a stuck CI run.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use common::{BAR0_SIZE, start_listening};
use iopf_abi::{QueueKind, VMM_ABI};
use iopf_queue::{Doorbell, QueueRegion, SharedMemory};
use iopf_vfio_user::Disconnect;
use iopf_vfio_user::device::{
    DMA_FAULT_IRQ_INDEX, DMA_FAULT_REGION_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX,
    RESPONSE_PROD_OFFSET, VFIO_PCI_CONFIG_REGION_INDEX, VMM_ABI_OFFSET,
};

const WATCHDOG: Duration = Duration::from_secs(15);

/// `VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER`.
const SET_EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);

#[test]
fn rust_vmm_client_completes_version_info_irqs_and_region_io() {
    let (path, server, server_stream) = start_listening("rust-vmm");
    let fault_irq = Doorbell::new().unwrap();
    let fault_irq_fd = fault_irq.as_fd().try_clone_to_owned().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        drive_rust_vmm_client(&path, fault_irq_fd);
        done_tx.send(()).unwrap();
    });
    match done_rx.recv_timeout(WATCHDOG) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The worker panicked: report its panic.
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // Unblock the client's read so its thread ends, then fail.
            if let Ok(stream) = server_stream.try_recv() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            panic!("the rust-vmm client hung for {WATCHDOG:?}");
        }
    }
    let (mut device, result) = server.join().unwrap();
    assert!(matches!(result, Ok(Disconnect::Closed)), "{result:?}");
    // What it did reached the device.
    assert_eq!(device.log.resets, 1);
    assert_eq!(device.fault.snapshot().1.abi.get(), VMM_ABI);
    assert_eq!(device.response_doorbell.drain().unwrap(), 1);
    assert!(device.log.mappings.is_empty());
    let eventfd = device
        .log
        .eventfds
        .remove(&(DMA_FAULT_IRQ_INDEX, 0))
        .unwrap();
    Doorbell::from_fd(eventfd).unwrap().ring().unwrap();
    assert!(fault_irq.wait(Some(Duration::from_secs(1))).unwrap());
}

fn drive_rust_vmm_client(path: &std::path::Path, fault_irq: OwnedFd) {
    // Version negotiation, device info and every region's info happen in `new`.
    let mut client = vfio_user::Client::new(path).expect("rust-vmm client connects");

    // The fault regions: mmap-able through their fd, ABI v2 queue regions of the right kind.
    for (index, kind) in [
        (DMA_FAULT_REGION_INDEX, QueueKind::Fault),
        (DMA_FAULT_RESPONSE_REGION_INDEX, QueueKind::Response),
    ] {
        let region = client.region(index).expect("fault region listed");
        assert_eq!(region.flags, 0b1111, "READ | WRITE | MMAP | CAPS");
        let file_offset = region.file_offset.as_ref().expect("region fd");
        assert_eq!(file_offset.start(), 0);
        let fd = OwnedFd::from(file_offset.file().try_clone().unwrap());
        let mapped = QueueRegion::attach(fd, kind).expect("an ABI v2 queue region");
        assert_eq!(mapped.snapshot().0.kind.get(), kind as u16);
        assert_eq!(region.size, 8192 + 64 * u64::from(kind.entry_size()));
    }
    // BAR 0's sparse mmap capability survives its parser.
    let bar0 = client.region(0).unwrap();
    assert_eq!(bar0.size, BAR0_SIZE);
    assert_eq!(bar0.sparse_areas.len(), 1);
    assert_eq!(
        (bar0.sparse_areas[0].offset, bar0.sparse_areas[0].size),
        (4096, 4096)
    );

    let irq = client.get_irq_info(DMA_FAULT_IRQ_INDEX).unwrap();
    assert_eq!(
        (irq.index, irq.flags, irq.count),
        (DMA_FAULT_IRQ_INDEX, 1, 1)
    );
    client
        .set_irqs(
            DMA_FAULT_IRQ_INDEX,
            SET_EVENTFD_TRIGGER,
            0,
            1,
            &[fault_irq.as_raw_fd()],
        )
        .unwrap();

    let mut id = [0u8; 4];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(id, [0xf4, 0x1a, 0x10, 0x10]);
    client
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x40, &[5, 6])
        .unwrap();
    let mut back = [0u8; 2];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0x40, &mut back)
        .unwrap();
    assert_eq!(back, [5, 6]);
    // The VMM's abi and the response doorbell's fallback, through the socket.
    client
        .region_write(
            DMA_FAULT_REGION_INDEX,
            VMM_ABI_OFFSET,
            &VMM_ABI.to_le_bytes(),
        )
        .unwrap();
    client
        .region_write(
            DMA_FAULT_RESPONSE_REGION_INDEX,
            RESPONSE_PROD_OFFSET,
            &0u32.to_le_bytes(),
        )
        .unwrap();

    let guest = SharedMemory::create("rust-vmm-guest", 65536).unwrap();
    client
        .dma_map(0, 0x10_0000, 65536, guest.fd().as_raw_fd())
        .unwrap();
    client.dma_unmap(0x10_0000, 65536).unwrap();
    client.reset().unwrap();
    client.shutdown().unwrap();
}
