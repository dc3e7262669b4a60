//! Conformance: the rust-vmm `vfio_user` crate's `Client` against `iopf host`'s own device
//! (not a test device): version, device info, every region's info (the fault regions mapped
//! from their fds as ABI v2 queue regions), the fault IRQ's info and `SET_IRQS`, region reads
//! and writes of config space and the BAR0 registers, and `DEVICE_RESET`. A watchdog turns a hang (the client
//! blocks for ever on some error replies) into a failure.

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use iopf_abi::QueueKind;
use iopf_endpoint::engine::Workload;
use iopf_endpoint::{Host, HostConfig};
use iopf_models::endpoint::EndpointConfig;
use iopf_queue::{Doorbell, QueueRegion};
use iopf_vfio_user::device::{
    DMA_FAULT_IRQ_INDEX, DMA_FAULT_REGION_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
};

/// `VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER`.
const SET_EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);

#[test]
fn rust_vmm_client_talks_to_the_iopf_host_device() {
    let socket = TempPath::new("conformance", "host.sock");
    let config = HostConfig {
        // No accesses: the device's engine is done at once; only the control plane is tested.
        workloads: vec![Workload {
            endpoint: EndpointConfig::default(),
            streams: Vec::new(),
            seed: 1,
        }],
        ring_entries: 64,
        device: iopf_core::DeviceConfig::default(),
        repeat: false,
        threads: 2,
    };
    let host = Host::bind(config, &socket).unwrap();
    let fault_irq = Doorbell::new().unwrap();
    let irq_fd = fault_irq.as_fd().try_clone_to_owned().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let path = socket.to_path_buf();
    let worker = std::thread::spawn(move || {
        drive(&path, irq_fd);
        done_tx.send(()).unwrap();
    });
    match done_rx.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the rust-vmm client hung"),
    }
    let report = host.finish();
    assert_eq!(report.core.registrations, 1);
    assert_eq!(report.disconnects.len(), 1, "{:?}", report.disconnects);
}

fn drive(path: &std::path::Path, fault_irq: OwnedFd) {
    let mut client = vfio_user::Client::new(path).expect("rust-vmm client connects");
    for (index, kind) in [
        (DMA_FAULT_REGION_INDEX, QueueKind::Fault),
        (DMA_FAULT_RESPONSE_REGION_INDEX, QueueKind::Response),
    ] {
        let region = client.region(index).expect("fault region listed");
        let file_offset = region.file_offset.as_ref().expect("region fd");
        let fd = OwnedFd::from(file_offset.file().try_clone().unwrap());
        let mapped = QueueRegion::attach(fd, kind).expect("an ABI v2 queue region");
        assert_eq!(mapped.snapshot().0.kind.get(), kind as u16);
        assert_eq!(region.size, 8192 + 64 * u64::from(kind.entry_size()));
    }
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
    // Config space: vendor 0x1b36, device 0x10f0.
    let mut id = [0u8; 4];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(id, [0x36, 0x1b, 0xf0, 0x10]);
    // BAR0: the device's number, and the directory registers written then read back.
    let mut number = [0u8; 4];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x10, &mut number)
        .unwrap();
    assert_eq!(u32::from_le_bytes(number), 1);
    client
        .region_write(VFIO_PCI_BAR0_REGION_INDEX, 0x00, &0x7000u64.to_le_bytes())
        .unwrap();
    let mut base = [0u8; 8];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x00, &mut base)
        .unwrap();
    assert_eq!(u64::from_le_bytes(base), 0x7000);
    // Reset, as a VMM does at guest boot: the register the VMM wrote is back to 0. This client
    // ignores error replies to a reset, so the register is what shows the reset happened (a
    // device that answered ENOTSUP would still read 0x7000). Its `resettable()` is not asked:
    // 0.1.7 inverts the RESET flag (`flags & RESET != RESET`); `tests/reset.rs` checks the
    // flag with our own client.
    client.reset().unwrap();
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x00, &mut base)
        .unwrap();
    assert_eq!(u64::from_le_bytes(base), 0);
}
