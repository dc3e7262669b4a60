//! The C entry points under hostile use, called exactly as C calls them (the `extern "C"`
//! functions), against an in-process host over real memfd queues and eventfds: forged, stale
//! and detached handles, null and misaligned pointers, lengths out of range, unknown cookies
//! and codes, and random call orders. Each call must return the errno a C caller is promised,
//! never crash, and every answer a call accepted must reach the host exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc;

use iopf::*;
use iopf_abi::{
    Cookie, FaultReason, PageAddr, PageRequest, PageResponse, Perm, PrgIndex, ResponseCode,
    UnrecoverableFault,
};
use iopf_queue::{Doorbell, FaultQueueProducer, ResponseQueueConsumer};
use proptest::prelude::*;
use rustix::io::Errno;

const EBADF: i32 = -Errno::BADF.raw_os_error();
const EINVAL: i32 = -Errno::INVAL.raw_os_error();
const ENOENT: i32 = -Errno::NOENT.raw_os_error();
const ENOSPC: i32 = -Errno::NOSPC.raw_os_error();
const ENOTSUP: i32 = -Errno::NOTSUP.raw_os_error();
const EPROTO: i32 = -Errno::PROTO.raw_os_error();

/// The host's end of one device's queues.
struct Host {
    faults: FaultQueueProducer,
    responses: ResponseQueueConsumer,
    /// The fault IRQ: the VMM holds a duplicate.
    _irq: Doorbell,
    next_cookie: u32,
}

impl Host {
    /// A host with rings of `entries` entries, and the VMM's handle to it (attached from fds).
    fn new(device: u32, entries: u32) -> (Self, iopf_device) {
        let mut faults = FaultQueueProducer::create(entries).unwrap();
        let irq = Doorbell::new().unwrap();
        faults.set_doorbell(Some(irq.try_clone().unwrap()));
        faults.set_live(true);
        let responses = ResponseQueueConsumer::create(entries, Doorbell::new().unwrap()).unwrap();
        let mut handle = 7;
        // SAFETY: `handle` is a local u64 the call may write.
        let rc = unsafe {
            iopf_attach_fds(
                device,
                faults.memory().fd().as_raw_fd(),
                responses.memory().fd().as_raw_fd(),
                irq.as_fd().as_raw_fd(),
                -1,
                &mut handle,
            )
        };
        assert_eq!(rc, 0, "{}", last_error());
        assert_ne!(handle, IOPF_NO_DEVICE);
        let host = Self {
            faults,
            responses,
            _irq: irq,
            next_cookie: 1,
        };
        (host, handle)
    }

    /// Publishes a group of `pages` requests, each at `cookie * 1 MiB + i * 4 KiB` (so the VMM's
    /// group names the host's cookie); returns its cookie, or `None` if the ring is full.
    fn publish_group(&mut self, pages: u64) -> Option<u32> {
        let cookie = self.next_cookie;
        let group: Vec<PageRequest> = (0..pages)
            .map(|i| PageRequest {
                cookie: Cookie::new(cookie).unwrap(),
                pasid: None,
                grpid: PrgIndex::new(cookie % 512).unwrap(),
                perm: Perm::READ,
                addr: PageAddr::containing((u64::from(cookie) << 20) + i * 4096),
                last: i + 1 == pages,
                private_data: None,
            })
            .collect();
        self.faults.stage_group(&group).ok()?;
        self.faults.publish().unwrap();
        self.next_cookie += 1;
        Some(cookie)
    }

    fn publish_unrecoverable(&mut self) -> bool {
        let fault = UnrecoverableFault {
            reason: FaultReason::Permission,
            pasid: None,
            perm: Perm::WRITE,
            addr: Some(0xdead_0000),
            fetch_addr: None,
        };
        if self.faults.stage_unrecoverable(&fault).is_err() {
            return false;
        }
        self.faults.publish().unwrap();
        true
    }

    /// The answers published so far: (cookie, code).
    fn answers(&mut self) -> Vec<(u32, ResponseCode)> {
        let mut out = Vec::new();
        self.responses
            .drain(usize::MAX, |r| {
                let r: PageResponse = r.decode().unwrap();
                out.push((r.cookie.get(), r.code));
            })
            .unwrap();
        out
    }
}

fn last_error() -> String {
    // SAFETY: `iopf_last_error` returns a NUL-terminated string valid until the next failing
    // call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(iopf_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Drains whole groups into buffers of the given sizes; `Err(rc)` on failure.
fn drain(
    handle: iopf_device,
    max_groups: usize,
    max_requests: usize,
) -> Result<Vec<(iopf_group, Vec<iopf_page_request>)>, i32> {
    let mut groups = vec![iopf_group::default(); max_groups];
    let mut requests = vec![iopf_page_request::default(); max_requests];
    // SAFETY: both buffers are writable for the lengths given.
    let n = unsafe {
        iopf_drain_groups(
            handle,
            groups.as_mut_ptr(),
            max_groups,
            requests.as_mut_ptr(),
            max_requests,
        )
    };
    if n < 0 {
        return Err(n);
    }
    let n = usize::try_from(n).unwrap();
    assert!(n <= max_groups);
    Ok(groups[..n]
        .iter()
        .map(|g| {
            let (first, count) = (g.first as usize, g.count as usize);
            assert!(first + count <= max_requests, "a group outside the buffer");
            (*g, requests[first..first + count].to_vec())
        })
        .collect())
}

fn stats(handle: iopf_device) -> Result<iopf_stats, i32> {
    let mut stats = iopf_stats::default();
    // SAFETY: `stats` is a local `iopf_stats`, its size given.
    let rc = unsafe { iopf_stats(handle, &mut stats, size_of::<iopf_stats>()) };
    if rc < 0 { Err(rc) } else { Ok(stats) }
}

/// Every entry point that takes a handle, called with `handle`: each return value.
fn every_call(handle: iopf_device) -> Vec<(&'static str, i32)> {
    let mut number = 0u32;
    let mut group = iopf_group::default();
    let mut request = iopf_page_request::default();
    let mut fault = iopf_unrecoverable::default();
    let mut counters = iopf_stats::default();
    // SAFETY: `number` is a writable local u32.
    let device_number = unsafe { iopf_device_number(handle, &mut number) };
    // SAFETY: `group` and `request` are writable locals, one entry each.
    let drain_groups = unsafe { iopf_drain_groups(handle, &mut group, 1, &mut request, 1) };
    // SAFETY: `fault` is a writable local, one entry.
    let drain_unrecoverable = unsafe { iopf_drain_unrecoverable(handle, &mut fault, 1) };
    // SAFETY: `counters` is a writable local `iopf_stats`, its size given.
    let stats = unsafe { iopf_stats(handle, &mut counters, size_of::<iopf_stats>()) };
    vec![
        ("detach", iopf_detach(handle)),
        ("device_number", device_number),
        ("fd", iopf_fd(handle)),
        ("poll", iopf_poll(handle)),
        ("flush", iopf_flush(handle)),
        ("prepare_to_sleep", iopf_prepare_to_sleep(handle)),
        ("woke", iopf_woke(handle)),
        ("backlog", iopf_backlog(handle)),
        ("live", iopf_live(handle)),
        ("drain_groups", drain_groups),
        ("drain_unrecoverable", drain_unrecoverable),
        ("answer", iopf_answer(handle, 1, IOPF_ANSWER_SUCCESS)),
        ("stats", stats),
        (
            "dma_map",
            iopf_dma_map(handle, 0, 0, 0, 4096, IOPF_DMA_READ),
        ),
        ("dma_unmap", iopf_dma_unmap(handle, 0, 4096)),
        (
            "set_pasid_directory",
            iopf_set_pasid_directory(handle, 0, 1),
        ),
        ("host_finished", iopf_host_finished(handle)),
        ("reset", iopf_reset(handle)),
    ]
}

#[test]
fn a_detached_handle_is_refused_by_every_call_and_never_reused() {
    let (_host, handle) = Host::new(1, 8);
    assert_eq!(iopf_detach(handle), 0);
    for (call, rc) in every_call(handle) {
        assert_eq!(rc, EBADF, "{call} with a detached handle");
        assert!(
            last_error().contains("not the handle"),
            "{call}: {}",
            last_error()
        );
    }
    let (_other, next) = Host::new(2, 8);
    assert_ne!(next, handle, "a handle was reused");
    assert_eq!(iopf_detach(next), 0);
}

#[test]
fn null_pointers_and_lengths_out_of_range_are_refused() {
    let (mut host, handle) = Host::new(1, 8);
    host.publish_group(3).unwrap();
    assert_eq!(iopf_poll(handle), 3);
    let mut group = iopf_group::default();
    let mut requests = [iopf_page_request::default(); 8];
    let mut fault = iopf_unrecoverable::default();
    let mut out = 0u64;
    let path = CString::new("/nonexistent/iopf.sock").unwrap();
    let (null_groups, null_requests) = (std::ptr::null_mut(), std::ptr::null_mut());
    let groups_ptr: *mut iopf_group = &mut group;
    let requests_ptr = requests.as_mut_ptr();
    // One byte into the caller's buffer: misaligned.
    let misaligned = requests_ptr
        .cast::<u8>()
        .wrapping_add(1)
        .cast::<iopf_page_request>();
    // SAFETY: a null path; `out` is a writable local.
    let rc = unsafe { iopf_attach_socket(std::ptr::null(), &mut out) };
    assert_eq!(rc, EINVAL);
    assert_eq!(out, IOPF_NO_DEVICE);
    // SAFETY: `path` is NUL-terminated; the null `device` is what is tested.
    let rc = unsafe { iopf_attach_socket(path.as_ptr(), std::ptr::null_mut()) };
    assert_eq!(rc, EINVAL);
    // SAFETY: `path` is NUL-terminated; `out` is a writable local.
    let rc = unsafe { iopf_attach_socket(path.as_ptr(), &mut out) };
    assert_eq!(rc, ENOENT);
    assert!(
        last_error().contains("/nonexistent/iopf.sock"),
        "{}",
        last_error()
    );
    // SAFETY: `out` is a writable local; negative fds are what is tested.
    let rc = unsafe { iopf_attach_fds(1, -1, -1, -1, -1, &mut out) };
    assert_eq!(rc, EINVAL);
    // SAFETY: `out` is a writable local; fds that are not open are what is tested.
    let rc = unsafe { iopf_attach_fds(1, 100_000, 100_001, 100_002, -1, &mut out) };
    assert_eq!(rc, EBADF);
    // A doorbell that is not an eventfd; a region that is not sealed.
    let memfd = rustix::fs::memfd_create("not-a-region", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&memfd, 1 << 16).unwrap();
    let fault_fd = host.faults.memory().fd().as_raw_fd();
    let response_fd = host.responses.memory().fd().as_raw_fd();
    let irq = Doorbell::new().unwrap();
    // SAFETY: `out` is a writable local; the fds are open.
    let rc = unsafe { iopf_attach_fds(9, fault_fd, response_fd, memfd.as_raw_fd(), -1, &mut out) };
    assert_eq!(rc, EINVAL, "{}", last_error());
    assert!(last_error().contains("not an eventfd"), "{}", last_error());
    // SAFETY: `out` is a writable local; the fds are open.
    let rc = unsafe {
        iopf_attach_fds(
            9,
            memfd.as_raw_fd(),
            response_fd,
            irq.as_fd().as_raw_fd(),
            -1,
            &mut out,
        )
    };
    assert_eq!(rc, EPROTO, "{}", last_error());
    assert_eq!(out, IOPF_NO_DEVICE);
    // SAFETY: the null `number` is what is tested.
    let rc = unsafe { iopf_device_number(handle, std::ptr::null_mut()) };
    assert_eq!(rc, EINVAL);
    let drain_raw = |groups, max_groups, requests, max_requests| {
        // SAFETY: each pointer passed below is null, misaligned (both refused before any
        // access), or a local buffer writable for at least the length given, unless the
        // length is out of range (refused before any access too).
        unsafe { iopf_drain_groups(handle, groups, max_groups, requests, max_requests) }
    };
    assert_eq!(drain_raw(null_groups, 1, requests_ptr, 8), EINVAL);
    assert_eq!(drain_raw(groups_ptr, 1, null_requests, 8), EINVAL);
    assert_eq!(drain_raw(groups_ptr, 0, requests_ptr, 8), EINVAL);
    assert_eq!(drain_raw(groups_ptr, usize::MAX, requests_ptr, 8), EINVAL);
    assert_eq!(drain_raw(groups_ptr, 1, requests_ptr, usize::MAX), EINVAL);
    assert_eq!(drain_raw(groups_ptr, 1, misaligned, 4), EINVAL);
    // SAFETY: the null buffer is what is tested.
    let rc = unsafe { iopf_drain_unrecoverable(handle, std::ptr::null_mut(), 1) };
    assert_eq!(rc, EINVAL);
    // SAFETY: `fault` is a writable local; the length 0 is what is tested.
    let rc = unsafe { iopf_drain_unrecoverable(handle, &mut fault, 0) };
    assert_eq!(rc, EINVAL);
    let mut counters = iopf_stats::default();
    // SAFETY: `counters` is writable for more than the 8 bytes said (refused anyway).
    let rc = unsafe { iopf_stats(handle, &mut counters, 8) };
    assert_eq!(rc, EINVAL);
    // SAFETY: the null buffer is what is tested.
    let rc = unsafe { iopf_stats(handle, std::ptr::null_mut(), size_of::<iopf_stats>()) };
    assert_eq!(rc, EINVAL);
    // The group of 3 is still there, whole: a buffer of 2 requests does not split it.
    assert_eq!(drain(handle, 4, 2).unwrap_err(), ENOSPC);
    let groups = drain(handle, 4, 3).unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].1.len(), 3);
    assert_eq!(groups[0].1[2].flags & IOPF_REQUEST_LAST, IOPF_REQUEST_LAST);
    // Codes and cookies.
    let cookie = groups[0].0.cookie;
    assert_eq!(iopf_answer(handle, cookie, 3), EINVAL);
    assert_eq!(iopf_answer(handle, cookie + 1, IOPF_ANSWER_SUCCESS), ENOENT);
    assert_eq!(iopf_answer(handle, cookie, IOPF_ANSWER_SUCCESS), 0);
    assert_eq!(
        iopf_answer(handle, cookie, IOPF_ANSWER_SUCCESS),
        ENOENT,
        "answered twice"
    );
    assert_eq!(iopf_flush(handle), 1);
    assert_eq!(host.answers(), vec![(1, ResponseCode::Success)]);
    // A handle attached from fds has no vfio-user connection.
    assert_eq!(iopf_reset(handle), ENOTSUP);
    assert_eq!(iopf_host_finished(handle), ENOTSUP);
    assert_eq!(iopf_set_pasid_directory(handle, 0, 1), ENOTSUP);
    assert_eq!(iopf_dma_unmap(handle, 0, 4096), ENOTSUP);
    assert_eq!(iopf_dma_map(handle, -1, 0, 0, 4096, IOPF_DMA_READ), EINVAL);
    assert_eq!(
        iopf_dma_map(
            handle,
            host.faults.memory().fd().as_raw_fd(),
            0,
            0,
            4096,
            0x80
        ),
        EINVAL
    );
    assert_eq!(iopf_detach(handle), 0);
}

#[test]
fn an_answer_from_another_thread_wakes_the_fd_and_reaches_the_host() {
    let (mut host, handle) = Host::new(1, 64);
    let cookies: Vec<u32> = (0..20).map(|_| host.publish_group(2).unwrap()).collect();
    assert_eq!(iopf_poll(handle), 40);
    let groups = drain(handle, 64, 64 * 2).unwrap();
    assert_eq!(groups.len(), 20);
    assert_eq!(iopf_prepare_to_sleep(handle), 1);
    let (tx, rx) = mpsc::channel();
    let answering = std::thread::spawn(move || {
        for (group, _) in groups {
            assert_eq!(iopf_answer(handle, group.cookie, IOPF_ANSWER_INVALID), 0);
        }
        tx.send(()).unwrap();
    });
    rx.recv().unwrap();
    answering.join().unwrap();
    // The answers given outside `iopf_poll` made the fd readable.
    let fd = iopf_fd(handle);
    assert!(fd >= 0);
    // SAFETY: `fd` is the library's epoll fd, open until `iopf_detach` below.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    assert_eq!(rustix::event::poll(&mut fds, Some(&timeout)).unwrap(), 1);
    assert_eq!(iopf_woke(handle), 0);
    assert_eq!(iopf_poll(handle), 0);
    let answered: Vec<u32> = host.answers().into_iter().map(|(c, _)| c).collect();
    assert_eq!(answered, cookies);
    assert_eq!(stats(handle).unwrap().awaiting_answer, 0);
    assert_eq!(iopf_detach(handle), 0);
}

#[test]
fn detaching_while_another_thread_polls_ends_its_calls_with_ebadf() {
    let (mut host, handle) = Host::new(1, 64);
    let polling = std::thread::spawn(move || {
        loop {
            let rc = iopf_poll(handle);
            if rc < 0 {
                return rc;
            }
            let mut group = iopf_group::default();
            let mut requests = [iopf_page_request::default(); 8];
            // SAFETY: `group` and `requests` are writable locals of the lengths given.
            let rc = unsafe { iopf_drain_groups(handle, &mut group, 1, requests.as_mut_ptr(), 8) };
            if rc < 0 {
                return rc;
            }
        }
    });
    for _ in 0..10 {
        host.publish_group(2).unwrap();
    }
    assert_eq!(iopf_detach(handle), 0);
    assert_eq!(polling.join().unwrap(), EBADF);
}

#[test]
fn the_version_is_the_crate_version() {
    // SAFETY: `iopf_version` returns a static NUL-terminated string.
    let version = unsafe { CStr::from_ptr(iopf_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

/// One step of a hostile caller (or of the host).
#[derive(Debug, Clone)]
enum Op {
    PublishGroup(u64),
    PublishUnrecoverable,
    Poll,
    Flush,
    PrepareToSleep,
    Woke,
    Drain {
        groups: usize,
        requests: usize,
    },
    DrainUnrecoverable(usize),
    /// Answer the n-th cookie handed out so far (answered or not) with `code`.
    Answer {
        nth: usize,
        code: u32,
    },
    AnswerForged(u64),
    Stats(usize),
    ForgedHandle(u64),
    NoConnection,
    HostReads,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..6).prop_map(Op::PublishGroup),
        1 => Just(Op::PublishUnrecoverable),
        3 => Just(Op::Poll),
        1 => Just(Op::Flush),
        1 => Just(Op::PrepareToSleep),
        1 => Just(Op::Woke),
        3 => (0usize..4, 0usize..12).prop_map(|(groups, requests)| Op::Drain { groups, requests }),
        1 => (0usize..3).prop_map(Op::DrainUnrecoverable),
        4 => (0usize..40, 0u32..5).prop_map(|(nth, code)| Op::Answer { nth, code }),
        1 => any::<u64>().prop_map(Op::AnswerForged),
        1 => prop_oneof![Just(size_of::<iopf_stats>()), 0usize..200].prop_map(Op::Stats),
        1 => any::<u64>().prop_map(Op::ForgedHandle),
        1 => Just(Op::NoConnection),
        1 => Just(Op::HostReads),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random call orders with random arguments: every call returns what it promises, and the
    /// host receives exactly the answers the library accepted, each once, with its code.
    #[test]
    fn hostile_call_orders_keep_every_promise(ops in proptest::collection::vec(op(), 1..80)) {
        let (mut host, handle) = Host::new(3, 16);
        // Host cookies published, in order; the VMM's cookie -> (host cookie, pages).
        let mut published = Vec::new();
        let mut handed_out: Vec<(u64, u32)> = Vec::new();
        let mut answered: BTreeMap<u32, ResponseCode> = BTreeMap::new();
        let mut received: BTreeMap<u32, ResponseCode> = BTreeMap::new();
        let mut unrecoverable_published = 0u64;
        let mut unrecoverable_drained = 0u64;
        for op in ops {
            match op {
                Op::PublishGroup(pages) => published.extend(host.publish_group(pages)),
                Op::PublishUnrecoverable => {
                    unrecoverable_published += u64::from(host.publish_unrecoverable());
                }
                Op::Poll => prop_assert!(iopf_poll(handle) >= 0, "{}", last_error()),
                Op::Flush => prop_assert!(iopf_flush(handle) >= 0, "{}", last_error()),
                Op::PrepareToSleep => {
                    let rc = iopf_prepare_to_sleep(handle);
                    prop_assert!(rc == 0 || rc == 1, "{rc}");
                }
                Op::Woke => prop_assert_eq!(iopf_woke(handle), 0),
                Op::Drain { groups, requests } => match drain(handle, groups, requests) {
                    Ok(drained) => {
                        for (group, reqs) in drained {
                            let host_cookie = u32::try_from(reqs[0].addr >> 20).unwrap();
                            prop_assert_eq!(group.device, 3);
                            prop_assert_eq!(reqs.len(), group.count as usize);
                            prop_assert!(reqs.iter().take(reqs.len() - 1)
                                .all(|r| r.flags & IOPF_REQUEST_LAST == 0));
                            prop_assert_eq!(reqs[reqs.len() - 1].flags & IOPF_REQUEST_LAST,
                                IOPF_REQUEST_LAST);
                            prop_assert!(!handed_out.iter().any(|(c, _)| *c == group.cookie),
                                "cookie {} handed out twice", group.cookie);
                            handed_out.push((group.cookie, host_cookie));
                        }
                    }
                    Err(rc) if groups == 0 => prop_assert_eq!(rc, EINVAL),
                    Err(rc) => prop_assert_eq!(rc, ENOSPC, "{}", last_error()),
                },
                Op::DrainUnrecoverable(max) => {
                    let mut faults = vec![iopf_unrecoverable::default(); max];
                    // SAFETY: `faults` is writable for `max` entries.
                    let n = unsafe { iopf_drain_unrecoverable(handle, faults.as_mut_ptr(), max) };
                    if max == 0 {
                        prop_assert_eq!(n, EINVAL);
                    } else {
                        prop_assert!(n >= 0);
                        for fault in &faults[..n as usize] {
                            prop_assert_eq!(fault.reason, IOPF_REASON_PERMISSION);
                            prop_assert_eq!(fault.addr, 0xdead_0000);
                            prop_assert_eq!(fault.flags, IOPF_UNRECOVERABLE_ADDR_VALID);
                        }
                        unrecoverable_drained += n as u64;
                    }
                }
                Op::Answer { nth, code } => {
                    let Some(&(cookie, host_cookie)) = handed_out.get(nth) else {
                        continue;
                    };
                    let rc = iopf_answer(handle, cookie, code);
                    if code > 2 {
                        prop_assert_eq!(rc, EINVAL);
                    } else if let std::collections::btree_map::Entry::Vacant(entry) =
                        answered.entry(host_cookie)
                    {
                        prop_assert_eq!(rc, 0, "{}", last_error());
                        entry.insert(ResponseCode::from_raw(code).unwrap());
                    } else {
                        prop_assert_eq!(rc, ENOENT, "answered twice");
                    }
                }
                Op::AnswerForged(cookie) => {
                    if !handed_out.iter().any(|(c, _)| *c == cookie) {
                        prop_assert_eq!(iopf_answer(handle, cookie, IOPF_ANSWER_SUCCESS), ENOENT);
                    }
                }
                Op::Stats(size) => {
                    let mut counters = iopf_stats::default();
                    let size = size.min(size_of::<iopf_stats>());
                    // SAFETY: `counters` is writable for `size` bytes (at most its size).
                    let rc = unsafe { iopf_stats(handle, &mut counters, size) };
                    if size == size_of::<iopf_stats>() {
                        prop_assert_eq!(rc, 0);
                        let awaiting = handed_out.len() - answered.len();
                        prop_assert_eq!(counters.awaiting_answer, awaiting as u64);
                    } else {
                        prop_assert_eq!(rc, EINVAL);
                    }
                }
                Op::ForgedHandle(forged) => {
                    if forged != handle {
                        for (call, rc) in every_call(forged) {
                            prop_assert_eq!(rc, EBADF, "{} with handle {:#x}", call, forged);
                        }
                    }
                }
                Op::NoConnection => {
                    prop_assert_eq!(iopf_reset(handle), ENOTSUP);
                    prop_assert_eq!(iopf_host_finished(handle), ENOTSUP);
                }
                Op::HostReads => {
                    for (cookie, code) in host.answers() {
                        prop_assert!(received.insert(cookie, code).is_none(),
                            "the host got cookie {} twice", cookie);
                    }
                }
            }
        }
        // Everything the library accepted reaches the host, once, with its code, and nothing
        // else does.
        // (The response ring holds 16: the host reads while the library sends the rest.)
        for _ in 0..100 {
            prop_assert!(iopf_flush(handle) >= 0);
            for (cookie, code) in host.answers() {
                prop_assert!(received.insert(cookie, code).is_none(), "cookie {} twice", cookie);
            }
            if iopf_backlog(handle) == 0 {
                break;
            }
        }
        prop_assert_eq!(iopf_backlog(handle), 0);
        prop_assert_eq!(&received, &answered);
        let groups: BTreeSet<u32> = handed_out.iter().map(|(_, h)| *h).collect();
        prop_assert!(groups.iter().all(|c| published.contains(c)), "a group never published");
        prop_assert!(unrecoverable_drained <= unrecoverable_published);
        prop_assert_eq!(iopf_detach(handle), 0);
        prop_assert_eq!(iopf_detach(handle), EBADF);
    }
}
