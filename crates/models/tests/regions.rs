//! Guest memory as several regions at their guest-physical addresses (what a VMM gives with
//! `DMA_MAP`): DMA and the page table walker resolve each address to its region and need its
//! permission; the second stage fails what no page request can fix; direct mode translates
//! one to one once a page request was answered `Success`.

use std::sync::Arc;

use iopf_abi::{FaultReason, Pasid, Perm, PrgIndex, ResponseCode};
use iopf_models::PAGE_SIZE;
use iopf_models::endpoint::{DmaAccess, Endpoint, EndpointConfig, Upstream};
use iopf_models::iommu::{Translate, Translation};
use iopf_models::memory::{GuestMemory, MemoryMap, MemoryMapError, MemoryVerdict, Region};
use iopf_models::nested::{DirectIommu, Directory, GuestTables, NestedIommu};
use iopf_queue::SharedMemory;

const DEV: u32 = 5;

/// A region of `pages` pages (at least 2: shared memory is at least 8 KiB).
fn region(gpa: u64, pages: u64, perm: Perm) -> Region {
    assert!(pages >= 2);
    Region {
        gpa,
        memory: Arc::new(SharedMemory::create("region", pages * PAGE_SIZE).unwrap()),
        perm,
    }
}

/// Three regions: read-write at 1 MiB (4 pages), read-only at 2 MiB (2 pages), write-only at
/// 3 MiB (2 pages).
fn three() -> MemoryMap {
    let mut map = MemoryMap::new();
    map.insert(region(0x10_0000, 4, Perm::READ | Perm::WRITE))
        .unwrap();
    map.insert(region(0x20_0000, 2, Perm::READ)).unwrap();
    map.insert(region(0x30_0000, 2, Perm::WRITE)).unwrap();
    map
}

/// Catches: overlapping regions accepted, adjacent ones refused, a region without access or
/// unaligned accepted, and lookups that find a region for a byte outside it.
#[test]
fn a_map_holds_disjoint_regions_and_finds_each_byte_in_its_own() {
    let mut map = three();
    let rw = Perm::READ | Perm::WRITE;
    assert_eq!(
        map.insert(region(0x10_3000, 2, rw)),
        Err(MemoryMapError::Overlap(0x10_3000))
    );
    assert_eq!(
        map.insert(region(0x0f_f000, 2, rw)),
        Err(MemoryMapError::Overlap(0x0f_f000))
    );
    assert_eq!(
        map.insert(region(0x40_0800, 2, rw)),
        Err(MemoryMapError::Placement(0x40_0800))
    );
    assert_eq!(
        map.insert(region(0x40_0000, 2, Perm::EXEC)),
        Err(MemoryMapError::NoAccess(0x40_0000))
    );
    map.insert(region(0x0f_e000, 2, rw)).unwrap();
    map.insert(region(0x10_4000, 2, rw)).unwrap();
    assert_eq!(map.find(0x10_3ff8).unwrap().gpa, 0x10_0000);
    assert_eq!(map.find(0x10_5ff8).unwrap().gpa, 0x10_4000);
    assert!(map.find(0x10_6000).is_none());
    assert!(map.find(0x20_2000).is_none());
    assert!(map.find(0).is_none());
    // A run never crosses a region's end, even into an adjacent region.
    assert!(map.words(0x10_3ff8, 2, Perm::READ).is_none());
    assert!(map.allows(0x20_0000, Perm::READ) && !map.allows(0x20_0000, Perm::WRITE));
    assert!(map.remove(0x10_4000).is_some() && map.remove(0x10_4000).is_none());
}

/// Catches: a DMA write that reaches a read-only region or a read that reaches a write-only
/// one, a run that spills past its region, refusals not counted, and a verdict that stops
/// checking a region the device wrote.
#[test]
fn dma_needs_the_permission_of_its_region_and_touches_nothing_otherwise() {
    let mut memory = GuestMemory::from_map(three()).unwrap();
    assert!(memory.dma_write(0x10_0008, 0x1111));
    assert!(memory.dma_write(0x30_0010, 0x3333));
    assert_eq!(memory.dma_read(0x10_0008), Some(0x1111));
    assert_eq!(memory.dma_read(0x20_0000), Some(0));
    assert_eq!(memory.refused(), 0);
    // Refused: write to read-only, read of write-only, nothing there, past a region's end.
    assert!(!memory.dma_write(0x20_0000, 0x2222));
    assert_eq!(memory.dma_read(0x30_0010), None);
    assert!(!memory.dma_write(0x50_0000, 1));
    assert_eq!(memory.dma_write_run(0x10_3ff8, &[1, 2]), 0);
    assert_eq!(memory.refused(), 4);
    // Nothing was written where it was refused (the guest's CPU sees every region).
    assert_eq!(memory.cpu_read(0x20_0000), Some(0));
    assert_eq!(memory.cpu_read(0x10_4000), None);
    assert_eq!(
        memory.verify(),
        MemoryVerdict {
            bytes_verified: 2 * PAGE_SIZE,
            bytes_mismatched: 0,
            read_mismatches: 0
        }
    );
    memory.corrupt_for_test(0x30_0010);
    assert_eq!(memory.verify().bytes_mismatched, 1);
}

/// Catches: a region unmapped with its shadow dropped unchecked, and a region mapped again
/// (the same file at the same place) whose shadow is forgotten, so that reading back what DMA
/// wrote before would count as a mismatch.
#[test]
fn replacing_the_map_checks_what_left_and_keeps_what_stayed() {
    let map = three();
    let mut memory = GuestMemory::from_map(map.clone()).unwrap();
    assert!(memory.dma_write(0x10_0000, 7));
    assert!(memory.dma_write(0x30_0000, 9));
    // The same file mapped again (another mapping of it) at the same place: kept.
    let rw = &map.regions()[0];
    let again =
        SharedMemory::attach(rw.memory.fd().try_clone_to_owned().unwrap(), 1 << 20).unwrap();
    let mut next = MemoryMap::new();
    next.insert(Region {
        gpa: rw.gpa,
        memory: Arc::new(again),
        perm: rw.perm,
    })
    .unwrap();
    let gone = memory.set_map(next).unwrap();
    assert_eq!(gone.bytes_verified, PAGE_SIZE, "the write-only region left");
    assert_eq!(gone.bytes_mismatched, 0);
    assert_eq!(memory.dma_read(0x10_0000), Some(7));
    assert_eq!(memory.verify().read_mismatches, 0);
    assert_eq!(memory.verify().bytes_verified, PAGE_SIZE);
    assert!(
        memory.set_map(MemoryMap::new()).is_none(),
        "empty: unchanged"
    );
}

/// Catches: a walker that reads tables from memory the device may not read, and a stage-1 hit
/// outside guest memory or against its region's permission that is not a second-stage fault.
#[test]
fn the_nested_walker_reads_only_readable_regions_and_stage_two_checks_the_result() {
    // Read-write memory at 0 for the tables, a read-only region at 64 MiB.
    let mut guest = GuestMemory::new(64).unwrap();
    let tables = GuestTables::new(&mut guest, 4).unwrap();
    let pasid = Pasid::new(1).ok();
    tables.add_space(&mut guest, pasid).unwrap();
    let mut map = MemoryMap::new();
    let whole =
        SharedMemory::attach(guest.shared().fd().try_clone_to_owned().unwrap(), 1 << 30).unwrap();
    map.insert(Region {
        gpa: 0,
        memory: Arc::new(whole),
        perm: Perm::READ | Perm::WRITE,
    })
    .unwrap();
    map.insert(region(0x400_0000, 2, Perm::READ)).unwrap();
    let rw = Perm::READ | Perm::WRITE;
    let frame = guest.allocate_page().unwrap();
    tables.map(&mut guest, pasid, 0x1000, frame, rw).unwrap();
    tables
        .map(&mut guest, pasid, 0x2000, 0x400_0000, rw)
        .unwrap();
    tables
        .map(&mut guest, pasid, 0x3000, 0x800_0000, rw)
        .unwrap();
    let mut iommu = NestedIommu::over(map);
    iommu.set_directory(DEV, tables.directory());
    let space = (DEV, pasid);
    assert!(matches!(
        iommu.translate(space, 0x1008, Perm::WRITE),
        Translation::Hit(_)
    ));
    assert!(matches!(
        iommu.translate(space, 0x2008, Perm::READ),
        Translation::Hit(0x400_0008)
    ));
    assert_eq!(
        iommu.translate(space, 0x2008, Perm::WRITE),
        Translation::Stage2Fault(FaultReason::Permission)
    );
    assert_eq!(
        iommu.translate(space, 0x3000, Perm::READ),
        Translation::Stage2Fault(FaultReason::OutOfRangeAddress)
    );
    // A directory in a region the device may not read (write-only): every walk is malformed.
    let mut wo = MemoryMap::new();
    wo.insert(region(0, 4, Perm::WRITE)).unwrap();
    let mut blind = NestedIommu::over(wo);
    blind.set_directory(
        DEV,
        Directory {
            base: 0,
            entries: 4,
        },
    );
    assert_eq!(
        blind.translate(space, 0x1000, Perm::READ),
        Translation::Miss
    );
    assert_eq!(blind.malformed, 1);
}

fn grpid(n: u32) -> PrgIndex {
    PrgIndex::new(n).unwrap()
}

/// Catches: direct mode that translates before the page was asked for and answered, keeps a
/// page after `Invalid`, unmap or reset, gives an address space to requests with a PASID, or
/// lets a `Success` for memory outside every region, or a write to a read-only region, through.
#[test]
fn direct_mode_translates_one_to_one_once_a_request_was_answered_success() {
    let mut iommu = DirectIommu::new(DEV, three());
    let space = (DEV, None);
    assert_eq!(
        iommu.translate(space, 0x10_1008, Perm::WRITE),
        Translation::Miss
    );
    iommu.page_requested(None, grpid(1), 0x10_1000);
    iommu.page_requested(None, grpid(1), 0x20_0000);
    iommu.page_requested(None, grpid(2), 0x10_2000);
    iommu.page_requested(None, grpid(3), 0x90_0000);
    iommu.page_response(None, grpid(1), ResponseCode::Success);
    iommu.page_response(None, grpid(2), ResponseCode::Invalid);
    iommu.page_response(None, grpid(3), ResponseCode::Success);
    assert_eq!(
        iommu.translate(space, 0x10_1008, Perm::WRITE),
        Translation::Hit(0x10_1008)
    );
    assert_eq!(
        iommu.translate(space, 0x20_0010, Perm::READ),
        Translation::Hit(0x20_0010)
    );
    assert_eq!(
        iommu.translate(space, 0x20_0010, Perm::WRITE),
        Translation::Stage2Fault(FaultReason::Permission)
    );
    assert_eq!(
        iommu.translate(space, 0x10_2000, Perm::READ),
        Translation::Miss,
        "answered Invalid"
    );
    assert_eq!(
        iommu.translate(space, 0x90_0000, Perm::READ),
        Translation::Stage2Fault(FaultReason::OutOfRangeAddress)
    );
    assert_eq!(
        iommu.translate((DEV, Pasid::new(0).ok()), 0x10_1000, Perm::READ),
        Translation::NoAddressSpace
    );
    assert_eq!(
        iommu.translate((DEV + 1, None), 0x10_1000, Perm::READ),
        Translation::NoAddressSpace
    );
    iommu.unmap(0x10_0000, 4 * PAGE_SIZE);
    assert_eq!(
        iommu.translate(space, 0x10_1008, Perm::READ),
        Translation::Miss
    );
    assert_eq!(iommu.present(), 2);
    iommu.reset();
    assert_eq!(iommu.present(), 0);
}

/// Catches: an endpoint that asks the guest again for a page the second stage refuses (a loop
/// no answer ends), that moves bytes for such an access, or that reports no fault for it.
#[test]
fn the_endpoint_fails_a_second_stage_fault_unrecoverably_and_moves_nothing() {
    let map = three();
    let mut memory = GuestMemory::from_map(map.clone()).unwrap();
    let mut iommu = DirectIommu::new(DEV, map);
    let mut endpoint = Endpoint::new(DEV, EndpointConfig::default());
    endpoint.submit(DmaAccess {
        id: 1,
        pasid: None,
        iova: 0x20_0000,
        len: 64,
        write: true,
        data_seed: 3,
    });
    let mut out = Vec::new();
    endpoint.step(&mut iommu, &mut memory, &mut out);
    let Some(Upstream::PageRequest(r)) = out.first().copied() else {
        panic!("a page request first: {out:?}");
    };
    iommu.page_requested(r.pasid, r.grpid, r.addr.get());
    iommu.page_response(r.pasid, r.grpid, ResponseCode::Success);
    endpoint.on_response(r.pasid, r.grpid, ResponseCode::Success);
    out.clear();
    endpoint.step(&mut iommu, &mut memory, &mut out);
    let [Upstream::Unrecoverable(fault)] = out.as_slice() else {
        panic!("one unrecoverable fault: {out:?}");
    };
    assert_eq!(fault.reason, FaultReason::Permission);
    assert_eq!(fault.addr, Some(0x20_0000));
    let c = endpoint.counters();
    assert_eq!((c.failed_stage2, c.completed, c.bytes_written), (1, 0, 0));
    assert!(endpoint.idle());
    assert_eq!(memory.cpu_read(0x20_0000), Some(0));
}
