//! A hostile peer: whatever the VMM writes into a queue region, does to its memfd, or sends over
//! the socket, the host never panics, touches nothing out of bounds, and reports a broken
//! region with a typed error. And whatever region a VMM is handed, it attaches only a sealed,
//! well-formed one.
//!
//! The peer here is played by the test itself, through the memfd: `pwrite` on the region's fd
//! lands in the same pages as the host's shared mapping, so no `unsafe` is needed to scribble
//! on them.
#![cfg(not(loom))]

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use iopf_abi::{
    Cookie, DecodeError, ENTRIES_OFFSET, Fault, FaultReason, FaultRecord, HostPageHeader,
    MAX_ENTRIES, PageAddr, PageRequest, PageResponse, Pasid, Perm, PrgIndex, QueueGeometry,
    QueueKind, REGION_MAGIC, RegionError, ResponseCode, ResponseRecord, UnrecoverableFault,
    VMM_PAGE_OFFSET, mark, page_request_flags,
};
use iopf_queue::fdpass::{MAX_FDS, recv_with_fds, send_with_fds};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, PushError, QueueError, QueueMemory,
    QueueRegion, REQUIRED_SEALS, RegionAttachError, ResponseQueueConsumer, ResponseQueueProducer,
    RingError, Staged,
};
use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use zerocopy::{FromBytes, IntoBytes};

// ---------------------------------------------------------------------------------------------
// Helpers: the peer's tools, and records to send.
// ---------------------------------------------------------------------------------------------

/// Offset of the VMM page's `index` (fault queue: `cons`; unused in a response queue).
const VMM_INDEX: u64 = VMM_PAGE_OFFSET as u64 + 64;
/// Offset of the VMM page's `flags`.
const VMM_FLAGS: u64 = VMM_PAGE_OFFSET as u64 + 4;
/// Offset of the VMM page's `abi`.
const VMM_ABI: u64 = VMM_PAGE_OFFSET as u64;
/// Offset of the host page's `index` (response queue: `cons`).
const HOST_INDEX: u64 = 64;
/// Offset of the host page's `rejected`.
const HOST_REJECTED: u64 = 32;

fn pwrite_at(fd: impl AsFd, offset: u64, bytes: &[u8]) {
    let written = rustix::io::pwrite(fd, bytes, offset).expect("pwrite into the region");
    assert_eq!(written, bytes.len());
}

fn pread_at(fd: impl AsFd, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let read = rustix::io::pread(fd, &mut buf[..], offset).expect("pread from the region");
    assert_eq!(read, len);
    buf
}

fn pread_u32(fd: impl AsFd, offset: u64) -> u32 {
    u32::from_le_bytes(pread_at(fd, offset, 4).try_into().unwrap())
}

fn pread_u64(fd: impl AsFd, offset: u64) -> u64 {
    u64::from_le_bytes(pread_at(fd, offset, 8).try_into().unwrap())
}

/// The peer stores `value` as the VMM page's index.
fn write_vmm_index(fd: impl AsFd, value: u32) {
    pwrite_at(fd, VMM_INDEX, &value.to_le_bytes());
}

/// Offset of the slot of record `index` in a region of `nb` entries of `size` bytes.
fn slot_at(size: u64, nb: u32, index: u32) -> u64 {
    u64::from(ENTRIES_OFFSET) + u64::from(index & (nb - 1)) * size
}

/// The peer stores `value` as the mark of response record `index` (ring of `nb`).
fn write_response_mark(fd: impl AsFd, nb: u32, index: u32, value: u64) {
    pwrite_at(fd, slot_at(32, nb, index) + 24, &value.to_le_bytes());
}

/// The peer writes the body of response record `index` (ring of `nb`), not its mark.
fn write_response_body(fd: impl AsFd, nb: u32, index: u32, record: &ResponseRecord) {
    pwrite_at(fd, slot_at(32, nb, index), &record.as_bytes()[..24]);
}

fn file_len(fd: impl AsFd) -> u64 {
    u64::try_from(rustix::fs::fstat(fd).unwrap().st_size).unwrap()
}

/// A small deterministic PRNG (xorshift64*), so that every run scribbles the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn unrecoverable(n: u32) -> UnrecoverableFault {
    UnrecoverableFault {
        reason: FaultReason::PteFetch,
        pasid: Some(Pasid::new(n & Pasid::MAX).unwrap()),
        perm: Perm::READ,
        addr: Some(u64::from(n) << 12),
        fetch_addr: None,
    }
}

/// Page `page` of the group with cookie `cookie`.
fn page_request(cookie: u32, page: u32, last: bool) -> PageRequest {
    PageRequest {
        cookie: Cookie::new(cookie).unwrap(),
        pasid: Some(Pasid::new(7).unwrap()),
        grpid: PrgIndex::new(cookie % 512).unwrap(),
        perm: Perm::READ | Perm::WRITE,
        addr: PageAddr::new(u64::from(cookie) << 20 | u64::from(page) << 12).unwrap(),
        last,
        private_data: None,
    }
}

/// A whole group of `pages` pages with cookie `cookie`.
fn group(cookie: u32, pages: u32) -> Vec<PageRequest> {
    (0..pages)
        .map(|p| page_request(cookie, p, p + 1 == pages))
        .collect()
}

fn response(cookie: u32) -> PageResponse {
    PageResponse {
        cookie: Cookie::new(cookie).unwrap(),
        pasid: Some(Pasid::new(7).unwrap()),
        grpid: PrgIndex::new(cookie % 512).unwrap(),
        code: ResponseCode::Success,
    }
}

/// An honest VMM on the other end of `host`'s fault queue (a second mapping of its memfd).
fn vmm_consumer(host: &FaultQueueProducer) -> FaultQueueConsumer {
    let fd = host.memory().fd().try_clone_to_owned().unwrap();
    FaultQueueConsumer::attach(fd, Doorbell::new().unwrap()).unwrap()
}

/// An honest VMM on the other end of `host`'s response queue.
fn vmm_producer(host: &ResponseQueueConsumer) -> ResponseQueueProducer {
    let fd = host.memory().fd().try_clone_to_owned().unwrap();
    ResponseQueueProducer::attach(fd, None).unwrap()
}

fn drain_faults(vmm: &mut FaultQueueConsumer) -> Vec<Result<Fault, DecodeError>> {
    let mut out = Vec::new();
    vmm.drain_faults(usize::MAX, |f| out.push(f)).unwrap();
    out
}

// ---------------------------------------------------------------------------------------------
// Garbage indices in the VMM page.
// ---------------------------------------------------------------------------------------------

#[test]
fn garbage_vmm_consumer_index_breaks_the_host_fault_producer_for_good() {
    let mut host = FaultQueueProducer::create(8).unwrap();
    for n in 1..=8 {
        assert_eq!(
            host.stage_unrecoverable(&unrecoverable(n)),
            Ok(Staged::Queued)
        );
    }
    assert_eq!(host.publish().unwrap().records, 8);

    // The ring is full, so the next stage must read the VMM's index: garbage.
    write_vmm_index(host.memory().fd(), 0xdead_beef);
    let expected = RingError::ConsumerIndex {
        found: 0xdead_beef,
        low: 0,
        high: 8,
    };
    assert_eq!(
        host.stage_group(&group(1, 1)),
        Err(PushError::Broken(expected))
    );
    assert_eq!(host.broken(), Some(expected));

    // It stays broken, whatever the VMM writes afterwards, and every operation says so.
    write_vmm_index(host.memory().fd(), 8);
    assert_eq!(
        host.stage_group(&group(2, 1)),
        Err(PushError::Broken(expected))
    );
    assert_eq!(host.stage_unrecoverable(&unrecoverable(9)), Err(expected));
    assert!(matches!(host.publish(), Err(QueueError::Broken(e)) if e == expected));
    assert_eq!(host.broken(), Some(expected));
    // Nothing was dropped-and-counted on a broken ring.
    assert_eq!(host.lost(), 0);
}

#[test]
fn vmm_consumer_index_past_the_published_records_breaks_the_host_fault_producer() {
    let mut host = FaultQueueProducer::create(8).unwrap();
    host.stage_group(&group(1, 2)).unwrap();
    host.publish().unwrap();
    // Claims to have read 5 records when only 2 were published (5 is inside the ring, so only
    // the comparison with what was published catches it).
    write_vmm_index(host.memory().fd(), 5);
    for cookie in 2..=7 {
        host.stage_group(&group(cookie, 1)).unwrap(); // Fits the ring as the host knows it.
    }
    let expected = RingError::ConsumerIndex {
        found: 5,
        low: 0,
        high: 2,
    };
    assert_eq!(
        host.stage_group(&group(8, 1)),
        Err(PushError::Broken(expected))
    );
    assert!(matches!(host.publish(), Err(QueueError::Broken(e)) if e == expected));
}

#[test]
fn vmm_consumer_index_moving_backwards_breaks_the_host_fault_producer() {
    let mut host = FaultQueueProducer::create(4).unwrap();
    let mut vmm = vmm_consumer(&host);
    host.stage_group(&group(1, 4)).unwrap();
    host.publish().unwrap();
    assert_eq!(drain_faults(&mut vmm).len(), 4);
    host.stage_group(&group(2, 4)).unwrap(); // Reads cons = 4.
    host.publish().unwrap();
    write_vmm_index(host.memory().fd(), 2); // "Un-reads" two records.
    let expected = RingError::ConsumerIndex {
        found: 2,
        low: 4,
        high: 8,
    };
    assert_eq!(
        host.stage_group(&group(3, 1)),
        Err(PushError::Broken(expected))
    );
    assert_eq!(host.broken(), Some(expected));
}

#[test]
fn random_vmm_page_garbage_never_panics_the_host_and_what_breaks_stays_broken() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for round in 0..200 {
        let mut host = FaultQueueProducer::create(1 << (1 + round % 4)).unwrap();
        let fd = host.memory().fd().try_clone_to_owned().unwrap();
        let mut published = 0u32;
        let mut cookie = 1u32;
        let mut first_error: Option<RingError> = None;
        for _ in 0..200 {
            match rng.below(6) {
                0 => {
                    // Mostly plausible values (a consumer catching up), sometimes garbage.
                    let value = match rng.below(3) {
                        0 => published,
                        1 => published.wrapping_sub(rng.below(4) as u32),
                        _ => rng.next() as u32,
                    };
                    write_vmm_index(&fd, value);
                }
                1 => pwrite_at(&fd, VMM_FLAGS, &(rng.next() as u32).to_le_bytes()),
                2 => {
                    let _ = host.stage_unrecoverable(&unrecoverable(cookie));
                }
                3 => {
                    let pages = 1 + rng.below(3) as u32;
                    let _ = host.stage_group(&group(cookie, pages));
                    cookie += 1;
                }
                _ => {
                    if let Ok(p) = host.publish() {
                        published = published.wrapping_add(p.records);
                    }
                }
            }
            match (first_error, host.broken()) {
                (None, Some(e)) => {
                    assert!(matches!(e, RingError::ConsumerIndex { .. }), "{e:?}");
                    first_error = Some(e);
                }
                (Some(first), now) => assert_eq!(now, Some(first), "a broken ring revived"),
                (None, None) => {}
            }
            if let Some(e) = first_error {
                assert_eq!(host.stage_group(&group(1, 1)), Err(PushError::Broken(e)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Marks that lie, in the response queue (the VMM produces, the host consumes).
// ---------------------------------------------------------------------------------------------

#[test]
fn a_skipped_mark_breaks_the_host_response_consumer_without_yielding_records() {
    let mut host = ResponseQueueConsumer::create(8, Doorbell::new().unwrap()).unwrap();
    let fd = host.memory().fd().try_clone_to_owned().unwrap();
    // A well-formed response in slot 0, marked as record 1: record 0 was skipped.
    write_response_body(&fd, 8, 0, &ResponseRecord::from(&response(1)));
    write_response_mark(&fd, 8, 0, mark(1));
    let expected = RingError::Mark {
        index: 0,
        found: mark(1),
    };
    let mut handed_out = 0;
    assert_eq!(host.drain(usize::MAX, |_| handed_out += 1), Err(expected));
    assert_eq!(handed_out, 0);
    // Sticky: the right mark later does not revive it, and waiting says so too.
    write_response_mark(&fd, 8, 0, mark(0));
    assert_eq!(host.drain(usize::MAX, |_| handed_out += 1), Err(expected));
    assert_eq!(handed_out, 0);
    assert!(matches!(
        host.wait(Some(Duration::from_millis(10))),
        Err(QueueError::Broken(e)) if e == expected
    ));
    assert_eq!(host.broken(), Some(expected));
}

#[test]
fn a_stale_mark_from_two_passes_ago_breaks_the_host_response_consumer() {
    let mut host = ResponseQueueConsumer::create(8, Doorbell::new().unwrap()).unwrap();
    let mut vmm = vmm_producer(&host);
    for cookie in 1..=16 {
        vmm.stage(&response(cookie)).unwrap();
        vmm.publish().unwrap();
        assert_eq!(host.drain(usize::MAX, |_| ()), Ok(1));
    }
    // Slot 0 holds record 8 (the previous pass of record 16): "not yet", no error.
    assert_eq!(host.drain(usize::MAX, |_| panic!("no record")), Ok(0));
    // The VMM replays record 0's slot as it was two passes ago.
    let fd = host.memory().fd();
    write_response_body(fd, 8, 0, &ResponseRecord::from(&response(1)));
    write_response_mark(fd, 8, 0, mark(0));
    let expected = RingError::Mark {
        index: 16,
        found: mark(0),
    };
    assert_eq!(
        host.drain(usize::MAX, |_| panic!("no record")),
        Err(expected)
    );
    assert_eq!(host.broken(), Some(expected));
}

#[test]
fn a_replay_of_the_previous_pass_is_not_a_record() {
    let mut host = ResponseQueueConsumer::create(8, Doorbell::new().unwrap()).unwrap();
    let mut vmm = vmm_producer(&host);
    for cookie in 1..=8 {
        vmm.stage(&response(cookie)).unwrap();
    }
    vmm.publish().unwrap();
    assert_eq!(host.drain(usize::MAX, |_| ()), Ok(8));
    // Rewriting slot 0 exactly as it is (record 0, one pass ago) hands nothing over.
    let fd = host.memory().fd();
    write_response_body(fd, 8, 0, &ResponseRecord::from(&response(1)));
    write_response_mark(fd, 8, 0, mark(0));
    assert_eq!(host.drain(usize::MAX, |_| panic!("no record")), Ok(0));
    assert_eq!(host.broken(), None);
}

#[test]
fn a_mark_written_before_the_body_hands_over_only_a_record_that_is_refused() {
    let mut host = ResponseQueueConsumer::create(8, Doorbell::new().unwrap()).unwrap();
    let fd = host.memory().fd().try_clone_to_owned().unwrap();
    // The mark of record 0 lands before any of its body: the host reads the zeroed body,
    // which does not decode.
    write_response_mark(&fd, 8, 0, mark(0));
    let mut got = Vec::new();
    assert_eq!(host.drain(usize::MAX, |r| got.push(r.decode())), Ok(1));
    assert_eq!(got, vec![Err(DecodeError::UnsupportedResponseVersion(0))]);
    // The body arrives after the host has read the slot: too late, the slot is consumed and
    // nothing is handed over again (record 1's slot is still unmarked).
    write_response_body(&fd, 8, 0, &ResponseRecord::from(&response(1)));
    assert_eq!(host.drain(usize::MAX, |_| panic!("no record")), Ok(0));
    assert_eq!(host.broken(), None);
}

#[test]
fn garbage_marks_anywhere_never_panic_the_host_and_what_breaks_stays_broken() {
    let mut rng = Rng(0x0bad_5eed_0bad_5eed);
    for round in 0..100 {
        let nb = 1 << (1 + round % 4);
        let mut host = ResponseQueueConsumer::create(nb, Doorbell::new().unwrap()).unwrap();
        let fd = host.memory().fd().try_clone_to_owned().unwrap();
        let mut vmm = vmm_producer(&host);
        let mut first_error = None;
        for step in 0..100u32 {
            match rng.below(4) {
                0 => {
                    let index = rng.next() as u32;
                    let value = match rng.below(3) {
                        0 => mark(index),
                        1 => mark(index.wrapping_add(rng.below(3) as u32)),
                        _ => rng.next(),
                    };
                    write_response_mark(&fd, nb, index, value);
                }
                1 => {
                    if vmm.stage(&response(1 + step)).is_ok() {
                        let _ = vmm.publish();
                    }
                }
                _ => {
                    let _ = host.drain(usize::MAX, |r| {
                        // Whatever is handed over is a record the host then validates.
                        let _ = r.decode();
                    });
                }
            }
            match (first_error, host.broken()) {
                (None, Some(e)) => {
                    assert!(matches!(e, RingError::Mark { .. }), "{e:?}");
                    first_error = Some(e);
                }
                (Some(first), now) => assert_eq!(now, Some(first), "a broken ring revived"),
                (None, None) => {}
            }
        }
    }
}

#[test]
fn garbage_vmm_flags_and_abi_only_cost_spurious_kicks() {
    let mut host = FaultQueueProducer::create(8).unwrap();
    let vmm_doorbell = Doorbell::new().unwrap();
    let peer_end = Doorbell::from_fd(rustix::io::dup(vmm_doorbell.as_fd()).unwrap()).unwrap();
    host.set_doorbell(Some(vmm_doorbell));
    pwrite_at(host.memory().fd(), VMM_FLAGS, &u32::MAX.to_le_bytes());
    pwrite_at(host.memory().fd(), VMM_ABI, &0xbad_ab1u32.to_le_bytes());
    assert!(!host.consumer_attached());
    for cookie in 1..=3 {
        host.stage_group(&group(cookie, 1)).unwrap();
        let published = host.publish().unwrap();
        assert!(published.kick, "NEED_WAKEUP is among the garbage bits");
    }
    assert_eq!(host.kicks(), 3);
    // Rings coalesce: while a wake-up is pending (counter non-zero) no more is written.
    assert_eq!(peer_end.drain().unwrap(), 1);
    assert_eq!(host.broken(), None);
}

// ---------------------------------------------------------------------------------------------
// The memfd itself: seals, holes.
// ---------------------------------------------------------------------------------------------

/// Everything a peer holding the region's fd might try, to change its size or its seals.
fn peer_cannot_resize(fd: BorrowedFd<'_>) {
    let peer = fd.try_clone_to_owned().unwrap();
    let len = file_len(&peer);
    for size in [
        0,
        1,
        ENTRIES_OFFSET.into(),
        len - 1,
        len + 1,
        len + 4096,
        1 << 40,
    ] {
        assert_eq!(
            rustix::fs::ftruncate(&peer, size),
            Err(Errno::PERM),
            "ftruncate to {size}"
        );
    }
    // Growing by writing or allocating past the end.
    assert_eq!(rustix::io::pwrite(&peer, b"x", len), Err(Errno::PERM));
    assert_eq!(
        rustix::fs::fallocate(&peer, FallocateFlags::empty(), len, 4096),
        Err(Errno::PERM)
    );
    // Reopening through /proc with O_TRUNC.
    let reopened = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(format!("/proc/self/fd/{}", peer.as_raw_fd()));
    assert!(reopened.is_err(), "O_TRUNC reopen succeeded");
    // Changing the seals (F_SEAL_SEAL forbids it; a write seal would make the host's stores
    // fault).
    for seals in [
        SealFlags::WRITE,
        SealFlags::FUTURE_WRITE,
        SealFlags::empty(),
    ] {
        assert_eq!(
            rustix::fs::fcntl_add_seals(&peer, seals),
            Err(Errno::PERM),
            "{seals:?}"
        );
    }
    assert_eq!(file_len(&peer), len);
    assert_eq!(rustix::fs::fcntl_get_seals(&peer), Ok(REQUIRED_SEALS));
}

#[test]
fn peer_cannot_truncate_or_grow_the_fault_region_and_the_host_keeps_working() {
    let mut host = FaultQueueProducer::create(16).unwrap();
    let mut vmm = vmm_consumer(&host);
    peer_cannot_resize(host.memory().fd());
    host.stage_group(&group(1, 3)).unwrap();
    host.stage_unrecoverable(&unrecoverable(2)).unwrap();
    assert_eq!(host.publish().unwrap().records, 4);
    let faults = drain_faults(&mut vmm);
    assert_eq!(faults.len(), 4);
    assert!(faults.iter().all(Result::is_ok));
    assert_eq!(host.broken(), None);
}

#[test]
fn peer_cannot_truncate_or_grow_the_response_region_and_the_host_keeps_working() {
    let mut host = ResponseQueueConsumer::create(16, Doorbell::new().unwrap()).unwrap();
    let mut vmm = vmm_producer(&host);
    peer_cannot_resize(host.memory().fd());
    vmm.stage(&response(5)).unwrap();
    vmm.publish().unwrap();
    let mut got = Vec::new();
    assert_eq!(host.drain(usize::MAX, |r| got.push(r.decode())), Ok(1));
    assert_eq!(got, vec![Ok(response(5))]);
}

#[test]
fn punching_a_hole_in_the_region_zeroes_it_and_the_host_reports_the_rewound_index() {
    // Punching holes needs no seal beyond the write seal, which a region cannot carry: the
    // pages read back as zeros (no SIGBUS, the size is unchanged), like a peer that scribbled
    // zeros everywhere.
    let mut host = FaultQueueProducer::create(4).unwrap();
    let mut vmm = vmm_consumer(&host);
    for n in 1..=4 {
        host.stage_unrecoverable(&unrecoverable(n)).unwrap();
    }
    host.publish().unwrap();
    assert_eq!(drain_faults(&mut vmm).len(), 4);
    host.stage_unrecoverable(&unrecoverable(5)).unwrap(); // Reads cons = 4.
    host.publish().unwrap();

    let len = file_len(host.memory().fd());
    rustix::fs::fallocate(
        host.memory().fd(),
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        len,
    )
    .unwrap();
    assert_eq!(file_len(host.memory().fd()), len);
    assert!(
        pread_at(host.memory().fd(), 0, len as usize)
            .iter()
            .all(|&b| b == 0)
    );

    // The host writes from its private indices and does not notice until it needs room...
    for n in 6..=8 {
        host.stage_unrecoverable(&unrecoverable(n)).unwrap();
    }
    assert_eq!(host.publish().unwrap().records, 3);
    // ...then the VMM's index reads 0: it went backwards.
    let expected = RingError::ConsumerIndex {
        found: 0,
        low: 4,
        high: 8,
    };
    assert_eq!(
        host.stage_group(&group(9, 1)),
        Err(PushError::Broken(expected))
    );
    // The VMM, for its part, finds the slot of record 4 zeroed, unmarked: it has nothing to
    // read, and it stalls only its own ring.
    assert_eq!(drain_faults(&mut vmm), vec![]);
    assert_eq!(vmm.broken(), None);
}

// ---------------------------------------------------------------------------------------------
// Scribbles over the host page and the entries.
// ---------------------------------------------------------------------------------------------

#[test]
fn scribbled_host_page_does_not_disturb_the_host_fault_producer() {
    let mut host = FaultQueueProducer::create(8).unwrap();
    host.set_live(true);
    let mut vmm = vmm_consumer(&host);
    let mut rng = Rng(0x5eed);
    let mut cookie = 1;
    for round in 0..20 {
        // The VMM scribbles over the whole host page; the host never reads it back.
        pwrite_at(host.memory().fd(), 0, &rng.bytes(4096));
        let groups: Vec<_> = (0..3)
            .map(|i| {
                cookie += 1;
                group(cookie, 1 + (round + i) % 2)
            })
            .collect();
        for g in &groups {
            host.stage_group(g).unwrap();
        }
        let published = host.publish().unwrap();
        assert_eq!(host.broken(), None);
        let records: u32 = groups.iter().map(|g| g.len() as u32).sum();
        assert_eq!(published.records, records);
        let want: Vec<_> = groups
            .iter()
            .flatten()
            .map(|r| Ok(Fault::PageRequest(*r)))
            .collect();
        assert_eq!(drain_faults(&mut vmm), want);
    }
    assert_eq!(host.lost(), 0);
}

/// A fault record with one defect each, and the error it must decode to.
fn defective_fault_records() -> Vec<(FaultRecord, DecodeError)> {
    let good = FaultRecord::from(&page_request(3, 0, true));
    let unrec = FaultRecord::from(&unrecoverable(3));
    let with = |f: &dyn Fn(&mut FaultRecord)| {
        let mut r = good;
        f(&mut r);
        r
    };
    vec![
        (
            with(&|r| r.fault_type = 3.into()),
            DecodeError::UnknownFaultType(3),
        ),
        (with(&|r| r.cookie = 0.into()), DecodeError::ZeroCookie),
        (
            with(&|r| r.word4 = 600.into()),
            DecodeError::PrgIndexOutOfRange(600),
        ),
        (
            with(&|r| r.addr = 0x1234.into()),
            DecodeError::UnalignedPageAddress(0x1234),
        ),
        (
            with(&|r| r.word3 = (1 << 20).into()),
            DecodeError::PasidOutOfRange(1 << 20),
        ),
        (
            with(&|r| r.word2 = (page_request_flags::ALL + 1).into()),
            DecodeError::UnknownBits {
                field: "flags",
                bits: page_request_flags::ALL + 1,
            },
        ),
        (
            with(&|r| r.perm = 0x10.into()),
            DecodeError::UnknownBits {
                field: "perm",
                bits: 0x10,
            },
        ),
        (
            {
                let mut r = unrec;
                r.word2 = 9.into();
                r
            },
            DecodeError::UnknownReason(9),
        ),
    ]
}

#[test]
fn scribbled_fault_entries_reach_the_vmm_as_decode_errors() {
    let mut host = FaultQueueProducer::create(16).unwrap();
    let mut vmm = vmm_consumer(&host);
    // Random bytes over published slots.
    for n in 1..=16 {
        host.stage_unrecoverable(&unrecoverable(n)).unwrap();
    }
    host.publish().unwrap();
    // Random bytes over every body (the marks stay).
    let mut rng = Rng(42);
    for slot in 0..16 {
        pwrite_at(host.memory().fd(), slot_at(64, 16, slot), &rng.bytes(56));
    }
    let faults = drain_faults(&mut vmm);
    assert_eq!(faults.len(), 16);
    for (i, f) in faults.iter().enumerate() {
        assert!(f.is_err(), "random slot {i} decoded to {f:?}");
    }
    // One defect per record: each one its own error, in order.
    let defective = defective_fault_records();
    for i in 0..defective.len() {
        host.stage_unrecoverable(&unrecoverable(100 + i as u32))
            .unwrap();
    }
    host.publish().unwrap();
    for (i, (record, _)) in defective.iter().enumerate() {
        let slot = slot_at(64, 16, 16 + i as u32);
        pwrite_at(host.memory().fd(), slot, &record.as_bytes()[..56]);
    }
    let want: Vec<_> = defective.iter().map(|(_, e)| Err(*e)).collect();
    assert_eq!(drain_faults(&mut vmm), want);
    // The host never noticed: its ring is fine.
    assert_eq!(host.broken(), None);
    host.stage_group(&group(1, 2)).unwrap();
    host.publish().unwrap();
    assert_eq!(drain_faults(&mut vmm).len(), 2);
    // Random bytes over a whole slot, mark included: the VMM's ring breaks, typed.
    host.stage_group(&group(2, 1)).unwrap();
    host.publish().unwrap();
    let slot = slot_at(64, 16, 16 + defective.len() as u32 + 2);
    pwrite_at(host.memory().fd(), slot, &Rng(43).bytes(64));
    assert!(matches!(
        vmm.drain_faults(usize::MAX, |_| ()),
        Err(RingError::Mark { .. })
    ));
}

#[test]
fn scribbled_response_entries_reach_the_host_as_decode_errors_and_are_counted() {
    let mut host = ResponseQueueConsumer::create(8, Doorbell::new().unwrap()).unwrap();
    let mut vmm = vmm_producer(&host);
    let good = ResponseRecord::from(&response(9));
    let with = |f: &dyn Fn(&mut ResponseRecord)| {
        let mut r = good;
        f(&mut r);
        r
    };
    let defective = [
        (
            with(&|r| r.version = 2.into()),
            DecodeError::UnsupportedResponseVersion(2),
        ),
        (
            with(&|r| r.code = 3.into()),
            DecodeError::UnknownResponseCode(3),
        ),
        (with(&|r| r.cookie = 0.into()), DecodeError::ZeroCookie),
        (
            with(&|r| r.flags = 2.into()),
            DecodeError::UnknownBits {
                field: "flags",
                bits: 2,
            },
        ),
        (
            with(&|r| r.grpid = 512.into()),
            DecodeError::PrgIndexOutOfRange(512),
        ),
    ];
    for (record, _) in &defective {
        vmm.stage_record(record).unwrap();
    }
    // And two bodies of random bytes, written after publishing (the marks stay).
    vmm.stage(&response(1)).unwrap();
    vmm.stage(&response(2)).unwrap();
    vmm.publish().unwrap();
    let mut rng = Rng(7);
    for index in 5..7 {
        pwrite_at(host.memory().fd(), slot_at(32, 8, index), &rng.bytes(24));
    }
    let mut got = Vec::new();
    assert_eq!(host.drain(usize::MAX, |r| got.push(r.decode())), Ok(7));
    let want: Vec<_> = defective.iter().map(|(_, e)| Err(*e)).collect();
    assert_eq!(got[..5], want);
    assert!(got[5..].iter().all(Result::is_err), "{got:?}");
    host.count_rejected(7);
    assert_eq!(host.rejected(), 7);
    assert_eq!(pread_u64(host.memory().fd(), HOST_REJECTED), 7);
    assert_eq!(host.broken(), None);
}

// ---------------------------------------------------------------------------------------------
// Attaching: only a sealed, well-formed region.
// ---------------------------------------------------------------------------------------------

fn memfd(flags: MemfdFlags) -> OwnedFd {
    rustix::fs::memfd_create("iopf-test-region", MemfdFlags::CLOEXEC | flags).unwrap()
}

/// A hand-made region file: `len` bytes, `header` at offset 0, then `seals`.
fn region_file(len: u64, header: Option<&HostPageHeader>, seals: SealFlags) -> OwnedFd {
    let fd = memfd(MemfdFlags::ALLOW_SEALING);
    rustix::fs::ftruncate(&fd, len).unwrap();
    if let Some(header) = header {
        pwrite_at(&fd, 0, header.as_bytes());
    }
    if !seals.is_empty() {
        rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
    }
    fd
}

fn header(kind: QueueKind, nb_entries: u32) -> HostPageHeader {
    QueueGeometry::new(kind, nb_entries).unwrap().host_header()
}

fn len_of(kind: QueueKind, nb_entries: u32) -> u64 {
    QueueGeometry::new(kind, nb_entries).unwrap().region_len()
}

/// A sealed fault region of `nb_entries` entries whose header `edit` changed.
fn fault_region_with(nb_entries: u32, edit: impl FnOnce(&mut HostPageHeader)) -> OwnedFd {
    let mut h = header(QueueKind::Fault, nb_entries);
    edit(&mut h);
    region_file(
        len_of(QueueKind::Fault, nb_entries),
        Some(&h),
        REQUIRED_SEALS,
    )
}

fn attach_fault(fd: OwnedFd) -> RegionAttachError {
    QueueRegion::attach(fd, QueueKind::Fault).unwrap_err()
}

#[test]
fn attach_accepts_a_well_formed_hand_made_region() {
    // The control for every refusal below: the same builder, unaltered, is accepted.
    let region = QueueRegion::attach(fault_region_with(8, |_| ()), QueueKind::Fault).unwrap();
    assert_eq!(
        region.geometry(),
        QueueGeometry::new(QueueKind::Fault, 8).unwrap()
    );
    let fd = region_file(
        len_of(QueueKind::Response, 4),
        Some(&header(QueueKind::Response, 4)),
        REQUIRED_SEALS,
    );
    assert!(ResponseQueueProducer::attach(fd, None).is_ok());
    // Extra seals beyond the required ones are fine (a write seal is not: mmap refuses it).
    let fd = region_file(
        len_of(QueueKind::Fault, 2),
        Some(&header(QueueKind::Fault, 2)),
        REQUIRED_SEALS | SealFlags::WRITE,
    );
    assert!(matches!(
        attach_fault(fd),
        RegionAttachError::Io { op: "mmap", .. }
    ));
}

#[test]
fn attach_refuses_a_memfd_without_seals() {
    let fd = region_file(
        len_of(QueueKind::Fault, 8),
        Some(&header(QueueKind::Fault, 8)),
        SealFlags::empty(),
    );
    let err = attach_fault(fd);
    assert!(
        matches!(err, RegionAttachError::NotSealed { found } if found.is_empty()),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_a_memfd_created_without_sealing() {
    // Without MFD_ALLOW_SEALING a memfd carries F_SEAL_SEAL alone: it can never be sealed.
    let fd = memfd(MemfdFlags::empty());
    rustix::fs::ftruncate(&fd, len_of(QueueKind::Fault, 8)).unwrap();
    pwrite_at(&fd, 0, header(QueueKind::Fault, 8).as_bytes());
    let err = attach_fault(fd);
    assert!(
        matches!(err, RegionAttachError::NotSealed { found } if found == SealFlags::SEAL),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_a_memfd_with_only_some_seals() {
    for seals in [
        SealFlags::SHRINK,
        SealFlags::GROW,
        SealFlags::SHRINK | SealFlags::GROW,
        SealFlags::SHRINK | SealFlags::SEAL,
        SealFlags::GROW | SealFlags::SEAL,
        SealFlags::SEAL,
    ] {
        let fd = region_file(
            len_of(QueueKind::Fault, 8),
            Some(&header(QueueKind::Fault, 8)),
            seals,
        );
        let err = attach_fault(fd);
        assert!(
            matches!(err, RegionAttachError::NotSealed { found } if found == seals),
            "{seals:?}: {err:?}"
        );
    }
}

#[test]
fn attach_refuses_a_pipe() {
    let (read, _write) = rustix::pipe::pipe().unwrap();
    let err = attach_fault(read);
    assert!(
        matches!(err, RegionAttachError::NotSealed { found } if found.is_empty()),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_regular_files() {
    static UNIQUE: AtomicU32 = AtomicU32::new(0);
    // A file on the temp directory's file system, and one on tmpfs if there is one (tmpfs
    // files answer F_GET_SEALS, with F_SEAL_SEAL alone).
    for dir in [std::env::temp_dir(), "/dev/shm".into()] {
        if !dir.is_dir() {
            continue;
        }
        let path = dir.join(format!(
            "iopf-attach-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(len_of(QueueKind::Fault, 8)).unwrap();
        pwrite_at(&file, 0, header(QueueKind::Fault, 8).as_bytes());
        let err = attach_fault(file.into());
        assert!(
            matches!(err, RegionAttachError::NotSealed { found } if !found.contains(REQUIRED_SEALS)),
            "{}: {err:?}",
            dir.display()
        );
    }
}

#[test]
fn attach_refuses_a_region_smaller_than_its_header_pages() {
    for len in [0, 72, 4096, u64::from(ENTRIES_OFFSET) - 1] {
        let header = header(QueueKind::Fault, 2);
        let fd = region_file(len, (len >= 72).then_some(&header), REQUIRED_SEALS);
        let err = attach_fault(fd);
        assert!(
            matches!(
                err,
                RegionAttachError::Region(RegionError::TooSmall { needed: 8192, len: l }) if l == len
            ),
            "{len}: {err:?}"
        );
    }
}

#[test]
fn attach_refuses_a_region_too_small_for_its_entries() {
    let fd = region_file(
        len_of(QueueKind::Fault, 4),
        Some(&header(QueueKind::Fault, 8)),
        REQUIRED_SEALS,
    );
    let err = attach_fault(fd);
    assert!(
        matches!(
            err,
            RegionAttachError::Region(RegionError::TooSmall { needed, len })
                if needed == len_of(QueueKind::Fault, 8) && len == len_of(QueueKind::Fault, 4)
        ),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_a_region_larger_than_the_largest_ring() {
    for kind in [QueueKind::Fault, QueueKind::Response] {
        let max = len_of(kind, MAX_ENTRIES);
        for len in [max + 1, max + 4096, 1 << 32] {
            let fd = region_file(len, Some(&header(kind, MAX_ENTRIES)), REQUIRED_SEALS);
            let err = QueueRegion::attach(fd, kind).unwrap_err();
            assert!(
                matches!(err, RegionAttachError::SizeMismatch { len: l, expected } if l == len && expected == max),
                "{kind} {len}: {err:?}"
            );
        }
    }
}

#[test]
fn attach_refuses_a_region_larger_than_its_header_says() {
    let fd = region_file(
        len_of(QueueKind::Fault, 8),
        Some(&header(QueueKind::Fault, 4)),
        REQUIRED_SEALS,
    );
    let err = attach_fault(fd);
    assert!(
        matches!(
            err,
            RegionAttachError::SizeMismatch { len, expected }
                if len == len_of(QueueKind::Fault, 8) && expected == len_of(QueueKind::Fault, 4)
        ),
        "{err:?}"
    );
    // One stray byte is enough.
    let fd = region_file(
        len_of(QueueKind::Fault, 4) + 1,
        Some(&header(QueueKind::Fault, 4)),
        REQUIRED_SEALS,
    );
    assert!(matches!(
        attach_fault(fd),
        RegionAttachError::SizeMismatch { .. }
    ));
}

#[test]
fn attach_refuses_bad_magic() {
    let fd = fault_region_with(8, |h| h.magic = 0x4650_4F48.into());
    let err = attach_fault(fd);
    assert!(
        matches!(
            err,
            RegionAttachError::Region(RegionError::BadMagic(0x4650_4F48))
        ),
        "{err:?}"
    );
    // An all-zero region (a host that never wrote its header).
    let fd = region_file(len_of(QueueKind::Fault, 8), None, REQUIRED_SEALS);
    assert!(matches!(
        attach_fault(fd),
        RegionAttachError::Region(RegionError::BadMagic(0))
    ));
    assert_eq!(REGION_MAGIC.to_le_bytes(), *b"IOPF");
}

#[test]
fn attach_refuses_a_region_of_abi_v1_or_a_future_version() {
    for version in [1, 3] {
        let fd = fault_region_with(8, |h| h.version = version.into());
        let err = attach_fault(fd);
        assert!(
            matches!(
                err,
                RegionAttachError::Region(RegionError::UnsupportedVersion(v)) if v == version
            ),
            "{err:?}"
        );
        let shown = std::error::Error::source(&err).map_or(err.to_string(), |e| e.to_string());
        assert!(
            shown.contains(&format!("version {version}")) && shown.contains("ABI v2"),
            "{shown}"
        );
    }
}

#[test]
fn attach_refuses_a_fault_region_as_a_response_queue_and_back() {
    let faults = FaultQueueProducer::create(16).unwrap();
    let fd = faults.memory().fd().try_clone_to_owned().unwrap();
    let err = ResponseQueueProducer::attach(fd, None).unwrap_err();
    assert!(
        matches!(
            err,
            RegionAttachError::Region(RegionError::WrongKind {
                expected: QueueKind::Response,
                found: QueueKind::Fault
            })
        ),
        "{err:?}"
    );
    let responses = ResponseQueueConsumer::create(16, Doorbell::new().unwrap()).unwrap();
    let fd = responses.memory().fd().try_clone_to_owned().unwrap();
    let err = FaultQueueConsumer::attach(fd, Doorbell::new().unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            RegionAttachError::Region(RegionError::WrongKind {
                expected: QueueKind::Fault,
                found: QueueKind::Response
            })
        ),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_an_unknown_kind() {
    let fd = fault_region_with(8, |h| h.kind = 3.into());
    let err = attach_fault(fd);
    assert!(
        matches!(err, RegionAttachError::Region(RegionError::UnknownKind(3))),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_a_bad_entry_size() {
    for size in [0, 32, 63, 128] {
        let fd = fault_region_with(8, |h| h.entry_size = size.into());
        let err = attach_fault(fd);
        assert!(
            matches!(
                err,
                RegionAttachError::Region(RegionError::BadEntrySize {
                    kind: QueueKind::Fault,
                    expected: 64,
                    found
                }) if found == size
            ),
            "{size}: {err:?}"
        );
    }
}

#[test]
fn attach_refuses_an_entry_count_that_is_not_a_power_of_two_in_range() {
    for count in [0, 1, 3, 6, 12, MAX_ENTRIES * 2, u32::MAX] {
        let fd = fault_region_with(8, |h| h.nb_entries = count.into());
        let err = attach_fault(fd);
        assert!(
            matches!(err, RegionAttachError::Region(RegionError::BadEntryCount(c)) if c == count),
            "{count}: {err:?}"
        );
    }
}

#[test]
fn attach_refuses_a_bad_entry_offset() {
    let fd = fault_region_with(8, |h| h.offset = 4096.into());
    let err = attach_fault(fd);
    assert!(
        matches!(err, RegionAttachError::Region(RegionError::BadOffset(4096))),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_undefined_host_flags() {
    let fd = fault_region_with(8, |h| h.flags = 0x8000_0001.into());
    let err = attach_fault(fd);
    assert!(
        matches!(
            err,
            RegionAttachError::Region(RegionError::UnknownFlags(0x8000_0000))
        ),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_a_non_zero_reserved_word() {
    let fd = fault_region_with(8, |h| h.reserved[2] = 5.into());
    let err = attach_fault(fd);
    assert!(
        matches!(
            err,
            RegionAttachError::Region(RegionError::ReservedNonZero(5))
        ),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_a_response_region_whose_marks_lie() {
    // A response producer resumes after the last marked record; a slot whose mark is neither
    // a record's nor an empty slot's is refused.
    let h = header(QueueKind::Response, 8);
    let fd = region_file(len_of(QueueKind::Response, 8), Some(&h), REQUIRED_SEALS);
    write_response_mark(&fd, 8, 0, mark(0));
    write_response_mark(&fd, 8, 1, 0xdead_beef);
    let err = ResponseQueueProducer::attach(fd, None).unwrap_err();
    assert!(
        matches!(
            err,
            RegionAttachError::Ring(RingError::Mark {
                index: 1,
                found: 0xdead_beef
            })
        ),
        "{err:?}"
    );
}

#[test]
fn a_response_producer_resumes_after_the_last_marked_record() {
    let mut host = ResponseQueueConsumer::create(8, Doorbell::new().unwrap()).unwrap();
    let mut vmm = vmm_producer(&host);
    for cookie in 1..=3 {
        vmm.stage(&response(cookie)).unwrap();
    }
    vmm.publish().unwrap();
    assert_eq!(host.drain(1, |_| ()), Ok(1));
    // The host's consumer index, in its page's second line, is what the new producer reads.
    assert_eq!(pread_u32(host.memory().fd(), HOST_INDEX), 1);
    drop(vmm);
    let mut vmm = vmm_producer(&host);
    vmm.stage(&response(4)).unwrap();
    vmm.publish().unwrap();
    let mut got = Vec::new();
    assert_eq!(host.drain(usize::MAX, |r| got.push(r.decode())), Ok(3));
    assert_eq!(got, (2..=4).map(|c| Ok(response(c))).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// Doorbells and fd passing.
// ---------------------------------------------------------------------------------------------

#[test]
fn doorbell_from_fd_refuses_anything_but_an_eventfd() {
    let (read, write) = rustix::pipe::pipe().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    let region = FaultQueueProducer::create(2).unwrap();
    let candidates: Vec<(&str, OwnedFd)> = vec![
        ("pipe read end", read),
        ("pipe write end", write),
        ("memfd", memfd(MemfdFlags::empty())),
        (
            "queue region",
            region.memory().fd().try_clone_to_owned().unwrap(),
        ),
        ("socket", a.into()),
        (
            "regular file",
            std::fs::File::open("/proc/self/status").unwrap().into(),
        ),
    ];
    for (what, fd) in candidates {
        let err = Doorbell::from_fd(fd).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::InvalidInput,
            "{what}: {err}"
        );
    }
    // The control: an eventfd is accepted, and it works.
    let doorbell = Doorbell::new().unwrap();
    let other_end = Doorbell::from_fd(rustix::io::dup(doorbell.as_fd()).unwrap()).unwrap();
    doorbell.ring().unwrap();
    assert_eq!(other_end.drain().unwrap(), 1);
}

/// Runs `f` on another thread and returns its result, or `None` if it is still blocked after
/// `limit` (then `unblock` runs, so that the thread can finish and the test can report).
fn finishes_within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
    unblock: impl FnOnce(),
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let result = rx.recv_timeout(limit).ok();
    if result.is_none() {
        unblock();
    }
    thread.join().unwrap();
    result
}

#[test]
fn peer_clearing_o_nonblock_cannot_block_the_host_in_a_doorbell_ring() {
    // The VMM holds the host's doorbell fds, and an fd passed with SCM_RIGHTS shares its open
    // file description, so O_NONBLOCK (a file status flag) is the peer's to clear. With it
    // cleared and the eventfd counter filled to its maximum, a write of 1 blocks until the
    // peer reads: the host's kick must not wait on the VMM (`docs/DESIGN.md` §4.3).
    let mut host = FaultQueueProducer::create(8).unwrap();
    let doorbell = Doorbell::new().unwrap();
    let peer = rustix::io::dup(doorbell.as_fd()).unwrap();
    host.set_doorbell(Some(doorbell));
    pwrite_at(
        host.memory().fd(),
        VMM_FLAGS,
        &iopf_abi::FLAG_NEED_WAKEUP.to_le_bytes(),
    );
    rustix::fs::fcntl_setfl(&peer, rustix::fs::OFlags::empty()).unwrap();
    rustix::io::write(&peer, &(u64::MAX - 1).to_ne_bytes()).unwrap();
    let published = finishes_within(
        Duration::from_secs(3),
        move || {
            host.stage_group(&group(1, 1)).unwrap();
            host.publish().map(|p| p.records)
        },
        || {
            let mut buf = [0u8; 8];
            rustix::io::read(&peer, &mut buf).unwrap();
        },
    );
    assert!(
        published.is_some(),
        "BUG: FaultQueueProducer::publish blocked in Doorbell::ring, because the VMM cleared \
         O_NONBLOCK on the shared eventfd and filled its counter"
    );
}

#[test]
fn peer_clearing_o_nonblock_cannot_block_the_host_in_a_doorbell_drain() {
    // `Doorbell::drain` promises not to block; the host's response doorbell is shared with the
    // VMM, which can clear O_NONBLOCK on it (and, racing `wait`'s poll and read, make even a
    // `wait` block until it rings again).
    let responses = ResponseQueueConsumer::create(8, Doorbell::new().unwrap()).unwrap();
    let peer = rustix::io::dup(responses.doorbell().as_fd()).unwrap();
    rustix::fs::fcntl_setfl(&peer, rustix::fs::OFlags::empty()).unwrap();
    let drained = finishes_within(
        Duration::from_secs(3),
        move || responses.doorbell().drain().map_err(|e| e.kind()),
        || {
            rustix::io::write(&peer, &1u64.to_ne_bytes()).unwrap();
        },
    );
    assert!(
        drained.is_some(),
        "BUG: Doorbell::drain (\"without blocking\") blocked on the host's response doorbell, \
         because the VMM cleared O_NONBLOCK on the shared eventfd"
    );
}

/// How many of this process's fds point at the memfd named `name`.
fn open_fds_to(name: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|link| link.to_string_lossy().contains(name))
        .count()
}

/// Sends one byte with `count` fds (dups of a memfd named `name`) attached, bypassing
/// `send_with_fds`' own limit, then closes the sender's copies: afterwards the only references
/// are in flight in the socket.
fn send_raw_fds(socket: &UnixStream, name: &str, count: usize) {
    let probe = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC).unwrap();
    let dups: Vec<OwnedFd> = (0..count).map(|_| probe.try_clone().unwrap()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = dups.iter().map(AsFd::as_fd).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(count))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(b"x")],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    assert_eq!(sent, 1);
}

#[test]
fn recv_with_fds_refuses_more_than_16_fds_and_leaks_none() {
    static UNIQUE: AtomicU32 = AtomicU32::new(0);
    let (tx, rx) = UnixStream::pair().unwrap();
    let mut accepted = Vec::new();
    // Just past the limit, past the slack the aligned control buffer may have, and SCM_MAX_FD.
    for count in [MAX_FDS + 1, MAX_FDS + 2, MAX_FDS + 3, 64, 253] {
        let name = format!(
            "iopf-leak-probe-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        );
        send_raw_fds(&tx, &name, count);
        assert_eq!(open_fds_to(&name), 0, "the sender kept copies");
        let mut buf = [0u8; 8];
        match recv_with_fds(&rx, &mut buf) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{count}: {e}"),
            Ok((_, fds)) => accepted.push(format!("{count} sent, {} returned", fds.len())),
        }
        // Refused or not, once the result is dropped no fd of that message is left open.
        let leaked = open_fds_to(&name);
        assert_eq!(leaked, 0, "{count} fds sent: {leaked} left open");
        // The socket still works for the next, honest message.
        let honest = Doorbell::new().unwrap();
        send_with_fds(&tx, b"ok", &[honest.as_fd()]).unwrap();
        let (n, fds) = recv_with_fds(&rx, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"ok"[..], 1));
    }
    assert!(
        accepted.is_empty(),
        "recv_with_fds accepted messages with more than MAX_FDS = {MAX_FDS} fds: {accepted:?}"
    );
}

#[test]
fn fd_passing_carries_up_to_16_fds_and_send_refuses_more() {
    let (tx, rx) = UnixStream::pair().unwrap();
    let doorbells: Vec<Doorbell> = (0..=MAX_FDS).map(|_| Doorbell::new().unwrap()).collect();
    let fds: Vec<BorrowedFd<'_>> = doorbells.iter().map(AsFd::as_fd).collect();
    let err = send_with_fds(&tx, b"too many", &fds).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    send_with_fds(&tx, b"sixteen", &fds[..MAX_FDS]).unwrap();
    let mut buf = [0u8; 16];
    let (n, received) = recv_with_fds(&rx, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"sixteen");
    assert_eq!(received.len(), MAX_FDS);
    // Each received fd is the same eventfd as the one sent, in order.
    for (i, fd) in received.into_iter().enumerate() {
        let doorbell = Doorbell::from_fd(fd).unwrap();
        doorbells[i].ring().unwrap();
        assert_eq!(doorbell.drain().unwrap(), 1, "fd {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// A full fault queue.
// ---------------------------------------------------------------------------------------------

#[test]
fn unrecoverable_faults_that_do_not_fit_are_dropped_and_counted_in_lost() {
    let mut host = FaultQueueProducer::create(4).unwrap();
    let mut vmm = vmm_consumer(&host);
    for n in 1..=4 {
        assert_eq!(
            host.stage_unrecoverable(&unrecoverable(n)),
            Ok(Staged::Queued)
        );
    }
    for n in 5..=7 {
        assert_eq!(
            host.stage_unrecoverable(&unrecoverable(n)),
            Ok(Staged::Lost)
        );
    }
    assert_eq!(host.lost(), 3);
    assert_eq!(host.publish().unwrap().records, 4);
    assert_eq!(vmm.lost(), 3);
    let want: Vec<_> = (1..=4)
        .map(|n| Ok(Fault::Unrecoverable(unrecoverable(n))))
        .collect();
    assert_eq!(drain_faults(&mut vmm), want);
    // Room again: queued, and the count stays.
    assert_eq!(
        host.stage_unrecoverable(&unrecoverable(8)),
        Ok(Staged::Queued)
    );
    host.publish().unwrap();
    assert_eq!(
        drain_faults(&mut vmm),
        vec![Ok(Fault::Unrecoverable(unrecoverable(8)))]
    );
    assert_eq!((host.lost(), vmm.lost()), (3, 3));
}

#[test]
fn a_page_request_group_that_does_not_fit_is_refused_whole() {
    let mut host = FaultQueueProducer::create(8).unwrap();
    let mut vmm = vmm_consumer(&host);
    host.stage_group(&group(1, 3)).unwrap();
    host.stage_group(&group(2, 3)).unwrap();
    // Two slots left: a group of three is refused, none of it staged.
    assert_eq!(host.stage_group(&group(3, 3)), Err(PushError::Full));
    assert_eq!(
        host.lost(),
        0,
        "a page request must never be dropped silently"
    );
    // A group larger than the whole ring can never fit.
    assert_eq!(host.stage_group(&group(4, 9)), Err(PushError::Full));
    assert_eq!(host.publish().unwrap().records, 6);
    let want: Vec<_> = group(1, 3)
        .into_iter()
        .chain(group(2, 3))
        .map(|r| Ok(Fault::PageRequest(r)))
        .collect();
    assert_eq!(drain_faults(&mut vmm), want);
    // Once the VMM made room, the refused group goes in whole, and so does a full-ring group.
    host.stage_group(&group(3, 3)).unwrap();
    host.publish().unwrap();
    let want: Vec<_> = group(3, 3)
        .into_iter()
        .map(|r| Ok(Fault::PageRequest(r)))
        .collect();
    assert_eq!(drain_faults(&mut vmm), want);
    host.stage_group(&group(5, 8)).unwrap();
    assert_eq!(host.publish().unwrap().records, 8);
    let got = drain_faults(&mut vmm);
    assert_eq!(got.len(), 8);
    assert!(matches!(
        got[7],
        Ok(Fault::PageRequest(PageRequest { last: true, .. }))
    ));
}

#[test]
fn record_bytes_round_trip_through_the_region_file() {
    // What the VMM reads through its mapping is exactly what pread sees in the file: the tests
    // above rely on the file and the mapping being the same pages.
    let mut host = FaultQueueProducer::create(2).unwrap();
    let request = page_request(77, 1, true);
    host.stage_group(&[request]).unwrap();
    host.publish().unwrap();
    let bytes = pread_at(host.memory().fd(), ENTRIES_OFFSET.into(), 64);
    let record = FaultRecord::read_from_bytes(&bytes).unwrap();
    assert_eq!(record.decode(), Ok(Fault::PageRequest(request)));
    assert_eq!(record.mark.get(), mark(0));
}

// ---------------------------------------------------------------------------------------------
// The fill a watcher reads.
// ---------------------------------------------------------------------------------------------

#[test]
fn the_fault_queue_fill_follows_the_vmm_index_and_never_breaks_the_ring() {
    let mut host = FaultQueueProducer::create(8).unwrap();
    assert_eq!(host.fill(), Some((0, 8)));
    host.stage_group(&group(1, 3)).unwrap();
    // Staged is not published: nothing for the VMM yet.
    assert_eq!(host.fill(), Some((0, 8)));
    host.publish().unwrap();
    assert_eq!(host.fill(), Some((3, 8)));
    let mut vmm = vmm_consumer(&host);
    assert_eq!(drain_faults(&mut vmm).len(), 3);
    assert_eq!(host.fill(), Some((0, 8)));
    // A garbage index shows as no fill, and breaks nothing by being looked at.
    write_vmm_index(host.memory().fd(), 0xdead_beef);
    assert_eq!(host.fill(), None);
    assert_eq!(host.broken(), None);
}
