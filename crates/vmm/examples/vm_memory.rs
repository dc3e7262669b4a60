//! A VMM whose guest memory is three `vm-memory` regions from memfds, at different
//! guest-physical addresses, one at a nonzero offset in its file and one the device may only
//! read; it answers every group `Success` (the `minimal` example's vIOMMU) and, when the host
//! has finished, checks through its own mapping that DMA wrote the read-write regions and
//! never the read-only one.
//!
//! ```text
//! iopf host --socket /tmp/iopf.sock --scenario scenarios/three-regions.toml &
//! cargo run --release -p iopf-vmm --example vm_memory -- --socket /tmp/iopf.sock
//! ```

use std::os::unix::fs::FileExt;

use iopf_vfio_user::DmaProt;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

// The vIOMMU, the attach and the loop are the minimal example's.
#[allow(dead_code)]
#[path = "minimal.rs"]
mod minimal;

use minimal::{Result, Vmm};

const MIB: u64 = 1 << 20;
/// Read-write, from its own memfd.
const RW1: (u64, u64) = (0x100_0000, MIB);
/// Read-write, from the second MiB of a 2 MiB memfd.
const RW2: (u64, u64) = (0x200_0000, MIB);
const RW2_OFFSET: u64 = MIB;
/// Read-only for the device (a ROM, say): the VMM fills it, the device may only read it.
const RO: (u64, u64) = (0x300_0000, MIB / 4);
const RO_FILL: u8 = 0xa5;

/// One device's guest memory.
fn guest_memory() -> Result<GuestMemoryMmap> {
    let region = |(gpa, len): (u64, u64), file, offset| -> Result<_> {
        let len = usize::try_from(len)?;
        Ok((GuestAddress(gpa), len, Some(FileOffset::new(file, offset))))
    };
    let memory = GuestMemoryMmap::from_ranges_with_files([
        region(RW1, minimal::memfd(RW1.1)?, 0)?,
        region(RW2, minimal::memfd(RW2_OFFSET + RW2.1)?, RW2_OFFSET)?,
        region(RO, minimal::memfd(RO.1)?, 0)?,
    ])?;
    memory.write_slice(&vec![RO_FILL; usize::try_from(RO.1)?], GuestAddress(RO.0))?;
    Ok(memory)
}

fn prot(region: &GuestRegionMmap) -> DmaProt {
    if region.start_addr() == GuestAddress(RO.0) {
        DmaProt::READ
    } else {
        DmaProt::READ | DmaProt::WRITE
    }
}

/// The bytes at `gpa`, read through the VMM's own mapping.
fn bytes(memory: &GuestMemoryMmap, (gpa, len): (u64, u64)) -> Result<Vec<u8>> {
    let mut out = vec![0; usize::try_from(len)?];
    memory.read_slice(&mut out, GuestAddress(gpa))?;
    Ok(out)
}

fn main() -> Result<()> {
    minimal::log();
    let (socket, devices) = minimal::args()?;
    let mut vmm = Vmm::new()?;
    minimal::attach_all(&mut vmm, &socket, devices, guest_memory, prot)?;
    let accounts = vmm.run()?;
    let mut wrong = Vec::new();
    for account in &accounts {
        println!("{account}");
        let memory = &vmm.viommu.guests[&account.device].memory;
        let device = account.device;
        if bytes(memory, RO)?.iter().any(|b| *b != RO_FILL) {
            wrong.push(format!("device {device}: the read-only region was written"));
        }
        for (name, region) in [("first", RW1), ("second", RW2)] {
            if bytes(memory, region)?.iter().all(|b| *b == 0) {
                wrong.push(format!("device {device}: no DMA data in the {name} region"));
            }
        }
        // The second region's file, before the region's offset: the host honoured the offset.
        let rw2 = memory
            .find_region(GuestAddress(RW2.0))
            .and_then(|r| r.file_offset());
        let mut before = vec![0; usize::try_from(RW2_OFFSET)?];
        rw2.ok_or("the second region has no file")?
            .file()
            .read_exact_at(&mut before, 0)?;
        if before.iter().any(|b| *b != 0) {
            wrong.push(format!(
                "device {device}: DMA landed before the second region's file offset"
            ));
        }
    }
    if !wrong.is_empty() {
        return Err(wrong.join("; ").into());
    }
    println!("read-only region unchanged, both read-write regions hold DMA data");
    Ok(())
}
