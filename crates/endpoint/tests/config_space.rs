//! What a VMM looking for a PRI-capable device finds in `iopf host`'s device's config space,
//! through a socket and the crate's vfio-user `Client`: the 4 KiB extended space, the
//! PCI Express capability, the ATS, PASID and PRI extended capabilities chained from 0x100,
//! and PRI registers that take the writes software makes and show the device's state.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use iopf_core::{DeviceConfig, DeviceId, FaultCore, MonotonicClock};
use iopf_endpoint::engine::DeviceSlot;
use iopf_endpoint::pci::{FaultPciDevice, PRI_CAPACITY, VENDOR_ID};
use iopf_host::FaultPort;
use iopf_host::config_space::{express, ext_cap, header, pri};
use iopf_vfio_user::Client;
use iopf_vfio_user::device::VFIO_PCI_CONFIG_REGION_INDEX;

/// The device served on one end of a socket pair, as a host serves a connection; the client
/// on the other end.
fn connect() -> (Client, std::thread::JoinHandle<()>) {
    let core = Arc::new(FaultCore::new(Arc::new(MonotonicClock::new())));
    let port = FaultPort::add(core, DeviceId(1), DeviceConfig::default()).unwrap();
    let slot = Arc::new(DeviceSlot::new(port));
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut device = FaultPciDevice::new(slot, 64).unwrap();
        iopf_vfio_user::serve(theirs, &mut device).unwrap();
        device.detach();
    });
    (Client::from_stream(ours).unwrap(), server)
}

fn read(client: &mut Client, offset: u16, len: usize) -> u32 {
    let mut bytes = [0u8; 4];
    client
        .region_read(
            VFIO_PCI_CONFIG_REGION_INDEX,
            u64::from(offset),
            &mut bytes[..len],
        )
        .unwrap();
    u32::from_le_bytes(bytes)
}

fn write16(client: &mut Client, offset: u16, value: u16) {
    client
        .region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            u64::from(offset),
            &value.to_le_bytes(),
        )
        .unwrap();
}

// Catches: a device whose config space hides PRI from a VMM (256 bytes, no capability, a
// broken chain), or whose PRI registers ignore the VMM or lie about the device.
#[test]
fn a_vmm_finds_and_drives_the_pri_capability() {
    let (mut client, server) = connect();
    assert_eq!(
        client
            .region_info(VFIO_PCI_CONFIG_REGION_INDEX)
            .unwrap()
            .info
            .size,
        4096
    );
    assert_eq!(read(&mut client, 0, 2), u32::from(VENDOR_ID));
    // The capability list: the PCI Express capability.
    assert_ne!(
        read(&mut client, header::STATUS, 2) & u32::from(header::STATUS_CAP_LIST),
        0
    );
    let cap = read(&mut client, header::CAP_POINTER, 1) as u16;
    assert_eq!(read(&mut client, cap, 1), u32::from(express::ID));
    // The extended chain, walked as a VMM walks it.
    let (mut at, mut found) = (0x100u16, Vec::new());
    while at != 0 && found.len() < 16 {
        let h = read(&mut client, at, 4);
        found.push(((h & 0xffff) as u16, at));
        at = (h >> 20) as u16;
    }
    let ids: Vec<u16> = found.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [ext_cap::ATS, ext_cap::PASID, ext_cap::PRI]);
    let pri_at = found[2].1;
    assert_eq!(read(&mut client, pri_at + pri::CAPACITY, 4), PRI_CAPACITY);
    // Disabled: Stopped, and PRG responses need the PASID.
    let status = read(&mut client, pri_at + pri::STATUS, 2) as u16;
    assert_eq!(status, pri::STATUS_STOPPED | pri::STATUS_PASID_REQUIRED);
    // The VMM grants 32 requests and enables PRI: the device, served, is no longer stopped.
    client
        .region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            u64::from(pri_at + pri::ALLOCATION),
            &32u32.to_le_bytes(),
        )
        .unwrap();
    write16(&mut client, pri_at + pri::CONTROL, pri::CONTROL_ENABLE);
    assert_eq!(read(&mut client, pri_at + pri::ALLOCATION, 4), 32);
    assert_eq!(
        read(&mut client, pri_at + pri::CONTROL, 2) as u16,
        pri::CONTROL_ENABLE
    );
    let status = read(&mut client, pri_at + pri::STATUS, 2) as u16;
    assert_eq!(status & pri::STATUS_STOPPED, 0, "{status:#x}");
    // Capacity is read-only.
    write16(&mut client, pri_at + pri::CAPACITY, 1);
    assert_eq!(read(&mut client, pri_at + pri::CAPACITY, 4), PRI_CAPACITY);
    // A device reset disables PRI again.
    client.reset().unwrap();
    assert_eq!(read(&mut client, pri_at + pri::CONTROL, 2), 0);
    client.close();
    server.join().unwrap();
}
