//! `VFIO_USER_DMA_MAP` and `DMA_UNMAP` against `iopf host`'s device (the `Host` library
//! in-process, a real socket, real memfds), driven by the crate's vfio-user `Client`: the
//! mapping rules of `docs/PROTOCOL.md` §4.6, each refusal with its errno.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use iopf_core::DeviceConfig;
use iopf_host::engine::Workload;
use iopf_host::pci::{MAX_DMA_MAPPING_SIZE, MAX_DMA_MAPPINGS};
use iopf_host::{Host, HostConfig};
use iopf_models::endpoint::EndpointConfig;
use iopf_models::workload::{Pattern, Stream};
use iopf_vfio_user::{Client, DmaProt, Errno};
use rustix::fs::{MemfdFlags, SealFlags};

const RW: DmaProt = DmaProt::READ.union(DmaProt::WRITE);

fn socket(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iopf-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("host.sock")
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
