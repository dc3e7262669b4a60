//! `VFIO_USER_DMA_MAP` and `DMA_UNMAP` against `iopf host`'s device (the `Host` library
//! in-process, a real socket, real memfds), driven by the crate's vfio-user `Client`: the
//! mapping rules of `docs/PROTOCOL.md` §4.6, each refusal with its errno.

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use std::os::fd::{AsFd, OwnedFd};

use iopf_core::DeviceConfig;
use iopf_endpoint::engine::Workload;
use iopf_endpoint::pci::{MAX_DMA_MAPPING_SIZE, MAX_DMA_MAPPINGS};
use iopf_endpoint::{Host, HostConfig};
use iopf_models::endpoint::EndpointConfig;
use iopf_models::workload::{Pattern, Stream};
use iopf_vfio_user::{Client, DmaProt, Errno};
use rustix::fs::{MemfdFlags, SealFlags};

const RW: DmaProt = DmaProt::READ.union(DmaProt::WRITE);

fn socket(name: &str) -> TempPath {
    TempPath::new(name, "host.sock")
}

/// A host with one device that issues no DMA, and a client connected to it.
fn host(name: &str) -> (Host, Client) {
    let path = socket(name);
    let config = HostConfig {
        workloads: vec![Workload {
            endpoint: EndpointConfig::default(),
            streams: vec![Stream {
                pasid: None,
                base: 0x10_0000,
                pages: 1,
                pattern: Pattern::Sequential,
                access_len: 8,
                write: false,
                accesses: 0,
                interval_ns: 0,
            }],
            seed: 1,
        }],
        ring_entries: 16,
        device: DeviceConfig::default(),
        repeat: false,
        threads: 2,
    };
    let host = Host::bind(config, &path).unwrap();
    let client = Client::connect(&path).unwrap();
    (host, client)
}

/// A memfd of `len` bytes with `seals`.
fn memfd(len: u64, seals: SealFlags) -> OwnedFd {
    let fd =
        rustix::fs::memfd_create("guest", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
    fd
}

fn errno(result: Result<(), iopf_vfio_user::ClientError>) -> Option<Errno> {
    result
        .err()
        .map(|e| e.errno().expect("an errno from the host"))
}

/// Catches: overlapping mappings accepted (two regions for one guest-physical byte), adjacent
/// ones refused, unaligned or empty fields accepted, a range the fd does not cover accepted
/// (the host would SIGBUS on it), a mapping with neither READ nor WRITE accepted, an fd
/// without `F_SEAL_SHRINK` accepted, and more seals demanded than `F_SEAL_SHRINK`.
#[test]
fn dma_map_accepts_regions_anywhere_and_refuses_overlaps_unaligned_and_bad_fds() {
    let (_host, mut c) = host("dma-map-rules");
    let fd = memfd(16 * 4096, SealFlags::SHRINK);
    let map = |c: &mut Client, offset, iova, size, prot| {
        errno(c.dma_map(Some(fd.as_fd()), offset, iova, size, prot))
    };
    // Only F_SEAL_SHRINK, an offset into the file, any page-aligned IOVA, read-only: accepted.
    assert_eq!(map(&mut c, 4096, 0x10_0000, 4 * 4096, RW), None);
    assert_eq!(map(&mut c, 0, 0x7_0000_0000, 4096, DmaProt::READ), None);
    assert_eq!(map(&mut c, 0, 0x20_0000, 4096, DmaProt::WRITE), None);
    // Overlaps, from either side or inside: EEXIST. Adjacent on both sides: accepted.
    for iova in [0x10_0000, 0x10_3000, 0x0f_f000, 0x10_1000] {
        assert_eq!(
            map(&mut c, 0, iova, 2 * 4096, RW),
            Some(Errno::EEXIST),
            "{iova:#x}"
        );
    }
    assert_eq!(map(&mut c, 0, 0x0f_f000, 4096, RW), None);
    assert_eq!(map(&mut c, 0, 0x10_4000, 4096, RW), None);
    // Unaligned IOVA, offset or size: EINVAL.
    assert_eq!(map(&mut c, 0, 0x30_0800, 4096, RW), Some(Errno::EINVAL));
    assert_eq!(map(&mut c, 512, 0x30_0000, 4096, RW), Some(Errno::EINVAL));
    assert_eq!(map(&mut c, 0, 0x30_0000, 100, RW), Some(Errno::EINVAL));
    // A range the file does not cover: EINVAL.
    assert_eq!(
        map(&mut c, 0, 0x30_0000, 17 * 4096, RW),
        Some(Errno::EINVAL)
    );
    assert_eq!(
        map(&mut c, 15 * 4096, 0x30_0000, 2 * 4096, RW),
        Some(Errno::EINVAL)
    );
    // Neither READ nor WRITE: EINVAL.
    assert_eq!(
        map(&mut c, 0, 0x30_0000, 4096, DmaProt::empty()),
        Some(Errno::EINVAL)
    );
    // Larger than one mapping may be: EINVAL (before the fd is looked at).
    assert_eq!(
        map(&mut c, 0, 0x100_0000_0000, MAX_DMA_MAPPING_SIZE + 4096, RW),
        Some(Errno::EINVAL)
    );
    // No fd, an unsealed memfd, or not a memfd at all: EINVAL.
    assert_eq!(
        errno(c.dma_map(None, 0, 0x30_0000, 4096, RW)),
        Some(Errno::EINVAL)
    );
    let unsealed = memfd(4096, SealFlags::empty());
    assert_eq!(
        errno(c.dma_map(Some(unsealed.as_fd()), 0, 0x30_0000, 4096, RW)),
        Some(Errno::EINVAL)
    );
    let grow_only = memfd(4096, SealFlags::GROW);
    assert_eq!(
        errno(c.dma_map(Some(grow_only.as_fd()), 0, 0x30_0000, 4096, RW)),
        Some(Errno::EINVAL)
    );
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    assert_eq!(
        errno(c.dma_map(Some(file.as_fd()), 0, 0x30_0000, 4096, DmaProt::READ)),
        Some(Errno::EINVAL)
    );
    // The refusals left nothing behind: the range is free.
    assert_eq!(map(&mut c, 0, 0x30_0000, 4096, RW), None);
}

/// Catches: an unmap that removes nothing yet succeeds, one that splits a mapping, one that
/// leaves the mapping in place (mapping it again would be EEXIST), and unmap-all that misses
/// some.
#[test]
fn dma_unmap_removes_exactly_a_mapping_and_unknown_ranges_are_enoent() {
    let (_host, mut c) = host("dma-unmap");
    let fd = memfd(8 * 4096, SealFlags::SHRINK | SealFlags::GROW);
    let map = |c: &mut Client, iova, size| errno(c.dma_map(Some(fd.as_fd()), 0, iova, size, RW));
    assert_eq!(map(&mut c, 0x1_0000, 4 * 4096), None);
    assert_eq!(map(&mut c, 0x2_0000, 4096), None);
    // Part of a mapping: EINVAL, and it stays.
    assert_eq!(errno(c.dma_unmap(0x1_0000, 4096)), Some(Errno::EINVAL));
    assert_eq!(errno(c.dma_unmap(0x1_1000, 4 * 4096)), Some(Errno::EINVAL));
    assert_eq!(map(&mut c, 0x1_0000, 4096), Some(Errno::EEXIST));
    // Nothing there: ENOENT.
    assert_eq!(errno(c.dma_unmap(0x5_0000, 4096)), Some(Errno::ENOENT));
    // Exactly the mapping: removed, so it maps again and a second unmap is ENOENT.
    assert_eq!(errno(c.dma_unmap(0x1_0000, 4 * 4096)), None);
    assert_eq!(errno(c.dma_unmap(0x1_0000, 4 * 4096)), Some(Errno::ENOENT));
    assert_eq!(map(&mut c, 0x1_0000, 4096), None);
    // Unmap all: every mapping goes.
    assert_eq!(errno(c.dma_unmap_all()), None);
    assert_eq!(errno(c.dma_unmap(0x2_0000, 4096)), Some(Errno::ENOENT));
    assert_eq!(map(&mut c, 0x2_0000, 4096), None);
    assert_eq!(map(&mut c, 0x1_0000, 4096), None);
}

/// Catches: a host that takes mappings without bound (each one is a mapping in the host's
/// address space), and a bound that is not given back by unmap.
#[test]
fn dma_map_holds_at_most_the_bound_of_mappings() {
    let (_host, mut c) = host("dma-map-bound");
    let fd = memfd(4096, SealFlags::SHRINK);
    let page = |i: usize| 0x100_0000 + 2 * 4096 * i as u64;
    for i in 0..MAX_DMA_MAPPINGS {
        assert_eq!(
            errno(c.dma_map(Some(fd.as_fd()), 0, page(i), 4096, RW)),
            None,
            "mapping {i}"
        );
    }
    let next = page(MAX_DMA_MAPPINGS);
    assert_eq!(
        errno(c.dma_map(Some(fd.as_fd()), 0, next, 4096, RW)),
        Some(Errno::ENOSPC)
    );
    assert_eq!(errno(c.dma_unmap(page(7), 4096)), None);
    assert_eq!(errno(c.dma_map(Some(fd.as_fd()), 0, next, 4096, RW)), None);
}

/// A VMM without page tables on one device: the queues, one read-write region, no directory.
struct DirectVmm {
    client: Client,
    faults: iopf_queue::FaultQueueConsumer,
    responses: iopf_queue::ResponseQueueProducer,
    memory: OwnedFd,
}

impl DirectVmm {
    fn attach(client: Client) -> Self {
        use iopf_vfio_user::device::{
            DMA_FAULT_IRQ_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX,
            VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE,
            VFIO_REGION_TYPE_NESTED,
        };
        let mut client = client;
        let mut fd = |subtype| {
            client
                .find_region_by_type(VFIO_REGION_TYPE_NESTED, subtype)
                .unwrap()
                .and_then(|r| r.fd)
                .unwrap()
        };
        let fault_fd = fd(VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT);
        let response_fd = fd(VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE);
        let mut io_fds = client
            .region_io_fds(DMA_FAULT_RESPONSE_REGION_INDEX)
            .unwrap();
        let response_doorbell = iopf_queue::Doorbell::from_fd(io_fds.fds.remove(0)).unwrap();
        let fault_doorbell = iopf_queue::Doorbell::new().unwrap();
        client
            .set_irqs(DMA_FAULT_IRQ_INDEX, &[fault_doorbell.as_fd()])
            .unwrap();
        let faults = iopf_queue::FaultQueueConsumer::attach(fault_fd, fault_doorbell).unwrap();
        let responses =
            iopf_queue::ResponseQueueProducer::attach(response_fd, Some(response_doorbell))
                .unwrap();
        let memory = memfd(DIRECT_SIZE, SealFlags::SHRINK);
        let mut vmm = Self {
            client,
            faults,
            responses,
            memory,
        };
        vmm.map();
        vmm
    }

    fn map(&mut self) {
        self.client
            .dma_map(Some(self.memory.as_fd()), 0, DIRECT_GPA, DIRECT_SIZE, RW)
            .unwrap();
    }

    /// Waits for the next group and answers it `Success`; returns its page.
    fn answer_one(&mut self) -> u64 {
        use iopf_abi::{Fault, PageResponse, ResponseCode, ResponseRecord};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            assert!(std::time::Instant::now() < deadline, "no page request came");
            self.faults
                .wait(Some(std::time::Duration::from_millis(10)))
                .unwrap();
            let mut last = None;
            self.faults
                .drain_faults(usize::MAX, |fault| match fault.unwrap() {
                    Fault::PageRequest(r) if r.last => last = Some(r),
                    other => panic!("one page per group, no fault: {other:?}"),
                })
                .unwrap();
            if let Some(r) = last {
                let answer = PageResponse::answering(&r, ResponseCode::Success);
                self.responses
                    .stage_record(&ResponseRecord::from(&answer))
                    .unwrap();
                self.responses.publish().unwrap();
                return r.addr.get();
            }
        }
    }
}

/// Waits (bounded) until the host's device has ended `n` accesses: a page answered `Success`
/// has been retried and used, so what the test does next cannot race the retry.
fn accesses_ended(host: &Host, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while host.progress()[0]
        .accesses_done
        .load(std::sync::atomic::Ordering::Relaxed)
        < n
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the device did not end {n} accesses"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

const DIRECT_GPA: u64 = 0x80_0000;
const DIRECT_SIZE: u64 = 16 * 4096;

/// Catches: direct mode that does not serve a VMM without tables at all, pages that stay
/// present across a device reset, or across a `DMA_UNMAP` and `DMA_MAP` of their region (the
/// device would reuse a translation the VMM took away, and send fewer page requests).
#[test]
fn direct_mode_pages_go_away_with_a_reset_and_with_an_unmap() {
    let path = socket("dma-direct");
    // Two pages, five accesses of 64 bytes 700 ms apart, on pages 0, 1, 0, 1, 0.
    let config = HostConfig {
        workloads: vec![Workload {
            endpoint: EndpointConfig::default(),
            streams: vec![Stream {
                pasid: None,
                base: DIRECT_GPA,
                pages: 2,
                pattern: Pattern::Strided { stride: 4096 },
                access_len: 64,
                write: true,
                accesses: 5,
                // Wide enough that a loaded CI machine still resets and unmaps between two accesses.
                interval_ns: 1_500_000_000,
            }],
            seed: 1,
        }],
        ring_entries: 16,
        device: DeviceConfig::default(),
        repeat: false,
        threads: 2,
    };
    let host = Host::bind(config, &path).unwrap();
    let mut vmm = DirectVmm::attach(Client::connect(&path).unwrap());
    assert_eq!(vmm.answer_one(), DIRECT_GPA);
    assert_eq!(vmm.answer_one(), DIRECT_GPA + 4096);
    // Both pages present once the second access has ended (its retry went through). A reset
    // takes them away: the third access asks for page 0 again.
    accesses_ended(&host, 2);
    vmm.client.reset().unwrap();
    assert_eq!(vmm.answer_one(), DIRECT_GPA);
    // Unmapping the region (and mapping it again) takes page 0 away too.
    accesses_ended(&host, 3);
    vmm.client.dma_unmap(DIRECT_GPA, DIRECT_SIZE).unwrap();
    vmm.map();
    assert_eq!(vmm.answer_one(), DIRECT_GPA + 4096);
    assert_eq!(vmm.answer_one(), DIRECT_GPA);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !host.finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the device did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The VMM leaves (closing the connection), keeping its memory.
    let DirectVmm { client, memory, .. } = vmm;
    drop(client);
    let report = host.finish();
    let e = &report.engines[0];
    assert_eq!(
        (
            e.endpoint.completed,
            e.endpoint.groups,
            e.endpoint.failed_stage2
        ),
        (5, 5, 0),
        "{:?}",
        e.endpoint
    );
    assert_eq!(e.memory.bytes_mismatched, 0);
    assert_eq!(e.memory.bytes_verified, 2 * 4096);
    // What DMA wrote is in the VMM's memfd.
    let mut page = [0u8; 4096];
    rustix::io::pread(&memory, &mut page, 0).unwrap();
    assert!(page.iter().any(|b| *b != 0));
}
