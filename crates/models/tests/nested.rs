//! Page tables in guest memory: written by the guest, walked by the host's IOMMU through its
//! own mapping of the same memfd, and never trusted.

use std::os::fd::AsFd;

use iopf_abi::{Pasid, Perm, ResponseCode};
use iopf_models::PAGE_SIZE;
use iopf_models::endpoint::{DmaAccess, Endpoint, EndpointConfig, Upstream};
use iopf_models::iommu::Translation;
use iopf_models::memory::GuestMemory;
use iopf_models::nested::{Directory, GuestTables, NestedIommu, PRESENT};
use iopf_queue::SharedMemory;
use proptest::prelude::*;

const DEV: u32 = 3;

fn pasid(p: u32) -> Option<Pasid> {
    Some(Pasid::new(p).unwrap())
}

/// Guest memory, the guest's tables, and the host's IOMMU over a second mapping of it.
fn setup(pages: u64) -> (GuestMemory, GuestTables, NestedIommu) {
    let mut memory = GuestMemory::new(pages).unwrap();
    let tables = GuestTables::new(&mut memory, 8).unwrap();
    let fd = memory.shared().fd().as_fd().try_clone_to_owned().unwrap();
    let host_view = SharedMemory::attach(fd, 1 << 30).unwrap();
    let mut iommu = NestedIommu::new(host_view);
    iommu.set_directory(DEV, tables.directory());
    (memory, tables, iommu)
}

#[test]
fn the_host_walks_what_the_guest_mapped() {
    let (mut memory, tables, mut iommu) = setup(64);
    tables.add_space(&mut memory, pasid(2)).unwrap();
    let frame = memory.allocate_page().unwrap();
    let iova = 0x4000_3000;
    assert_eq!(
        iommu.translate((DEV, pasid(2)), iova + 8, Perm::READ),
        Translation::Miss
    );
    tables
        .map(&mut memory, pasid(2), iova, frame, Perm::READ)
        .unwrap();
    assert_eq!(
        iommu.translate((DEV, pasid(2)), iova + 8, Perm::READ),
        Translation::Hit(frame + 8)
    );
    assert_eq!(
        iommu.translate((DEV, pasid(2)), iova, Perm::WRITE),
        Translation::PermissionFault
    );
    assert_eq!(
        iommu.translate((DEV, pasid(2)), iova + PAGE_SIZE, Perm::READ),
        Translation::Miss
    );
    assert_eq!(
        iommu.translate((DEV, pasid(1)), iova, Perm::READ),
        Translation::NoAddressSpace
    );
    assert_eq!(
        iommu.translate((DEV, pasid(99)), iova, Perm::READ),
        Translation::NoAddressSpace
    );
    assert_eq!(
        iommu.translate((DEV + 1, pasid(2)), iova, Perm::READ),
        Translation::NoAddressSpace
    );
    assert_eq!(
        iommu.translate((DEV, pasid(2)), 1 << 39, Perm::READ),
        Translation::Miss
    );
    assert_eq!(iommu.malformed, 0);
    assert_eq!(
        tables.lookup(&mut memory, pasid(2), iova).map(|p| p.gpa),
        Some(frame)
    );
}

#[test]
fn an_endpoint_faults_and_completes_its_dma_through_guest_owned_tables() {
    let (mut memory, mut tables, mut iommu) = setup(64);
    tables.add_space(&mut memory, pasid(1)).unwrap();
    let mut endpoint = Endpoint::new(DEV, EndpointConfig::default());
    endpoint.submit(DmaAccess {
        id: 1,
        pasid: pasid(1),
        iova: 0x8000,
        len: 2 * 4096,
        write: true,
        data_seed: 5,
    });
    let mut out = Vec::new();
    endpoint.step(&mut iommu, &mut memory, &mut out);
    let requests: Vec<_> = out
        .iter()
        .map(|u| match u {
            Upstream::PageRequest(r) => *r,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(requests.len(), 2);
    // The guest maps both pages in its own tables, then answers Success.
    for r in &requests {
        let frame = memory.allocate_page().unwrap();
        iopf_models::iommu::PageTables::map(
            &mut tables,
            &mut memory,
            (DEV, r.pasid),
            r.addr.get(),
            frame,
            Perm::READ | Perm::WRITE,
        )
        .unwrap();
    }
    endpoint.on_response(pasid(1), requests[0].grpid, ResponseCode::Success);
    out.clear();
    endpoint.step(&mut iommu, &mut memory, &mut out);
    assert!(out.is_empty());
    assert_eq!(endpoint.counters().completed, 1);
    let verdict = memory.verify();
    assert_eq!(
        (verdict.bytes_verified, verdict.bytes_mismatched),
        (2 * 4096, 0)
    );
}

#[test]
fn hostile_directories_and_entries_fail_the_walk_without_reading_out_of_bounds() {
    let (mut memory, tables, mut iommu) = setup(16);
    tables.add_space(&mut memory, pasid(0)).unwrap();
    // A directory outside guest memory.
    iommu.set_directory(
        7,
        Directory {
            base: 1 << 40,
            entries: 8,
        },
    );
    assert_eq!(
        iommu.translate((7, pasid(0)), 0, Perm::READ),
        Translation::Miss
    );
    // An unaligned directory.
    iommu.set_directory(
        8,
        Directory {
            base: 4,
            entries: 8,
        },
    );
    assert_eq!(
        iommu.translate((8, pasid(0)), 0, Perm::READ),
        Translation::Miss
    );
    // A directory slot pointing outside memory, and one with reserved bits.
    let base = tables.directory().base;
    memory.cpu_write(base + 2 * 8, (1 << 45) | PRESENT);
    assert_eq!(
        iommu.translate((DEV, pasid(1)), 0, Perm::READ),
        Translation::Miss
    );
    memory.cpu_write(base + 3 * 8, 0x7000 | 0x40 | PRESENT);
    assert_eq!(
        iommu.translate((DEV, pasid(2)), 0, Perm::READ),
        Translation::Miss
    );
    // A table pointing to itself: the walk has a fixed depth, so it ends.
    memory.cpu_write(base + 4 * 8, base | PRESENT);
    memory.cpu_write(base, base | PRESENT);
    let _ = iommu.translate((DEV, pasid(3)), 0, Perm::READ);
    assert!(iommu.malformed >= 4, "{}", iommu.malformed);
}

proptest! {
    /// Whatever guest memory holds and wherever the directory is said to be, a walk ends with
    /// an outcome and never panics.
    #[test]
    fn any_guest_memory_is_walked_safely(
        words in proptest::collection::vec((0u64..4096, any::<u64>()), 0..200),
        base in prop_oneof![Just(0u64), 0u64..(1 << 20), any::<u64>()],
        entries in 0u64..600,
        iova in any::<u64>(),
        pasid_raw in 0u32..16,
    ) {
        let (memory, _tables, mut iommu) = setup(4);
        for (index, value) in words {
            memory.cpu_write(index * 8, value);
        }
        iommu.set_directory(9, Directory { base, entries });
        let _ = iommu.translate((9, Pasid::new(pasid_raw).ok()), iova, Perm::READ);
        let _ = iommu.translate((DEV, None), iova, Perm::WRITE);
    }
}
