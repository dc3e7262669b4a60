//! The C entry points that speak vfio-user, against a real iopf host (the `iopf-host` library
//! in-process, a real socket): attach by path, `DMA_MAP` from a memfd, the loop to the end of
//! the workload, `host_finished`, and a reset with a group drained and not answered.

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use iopf::*;
use iopf_core::DeviceConfig;
use iopf_endpoint::engine::Workload;
use iopf_endpoint::{Host, HostConfig, HostReport};
use iopf_models::endpoint::EndpointConfig;
use iopf_models::workload::{Pattern, Stream};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::Errno;

const ENOENT: i32 = -Errno::NOENT.raw_os_error();
const ECONNRESET: i32 = -Errno::CONNRESET.raw_os_error();

/// Guest memory: 4 MiB at guest-physical 0; the workload's pages lie at 1 MiB.
const GUEST_MEMORY: u64 = 4 << 20;
const ACCESSES: u32 = 200;

fn last_error() -> String {
    // SAFETY: a NUL-terminated string valid until the next failing call on this thread,
    // copied at once.
    unsafe { CStr::from_ptr(iopf_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A host serving one direct-mode device (no PASID) on a fresh socket.
fn host(name: &str) -> (Host, TempPath) {
    let path = TempPath::new(&format!("ffi-{name}"), "host.sock");
    let config = HostConfig {
        workloads: vec![Workload {
            endpoint: EndpointConfig::default(),
            streams: vec![Stream {
                pasid: None,
                base: 0x10_0000,
                pages: 64,
                pattern: Pattern::Random,
                access_len: 4096,
                write: true,
                accesses: ACCESSES,
                interval_ns: 20_000,
            }],
            seed: 11,
        }],
        ring_entries: 64,
        device: DeviceConfig::default(),
        repeat: false,
        threads: 1,
    };
    let host = Host::bind(config, &path).unwrap();
    (host, path)
}

/// Attaches by path and maps `GUEST_MEMORY` from a sealed memfd; returns the handle and the
/// memfd (the caller's own: the library duplicated it).
fn attach(path: &TempPath) -> (iopf_device, OwnedFd) {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut device = IOPF_NO_DEVICE;
    // SAFETY: `path` is NUL-terminated, `device` a writable local.
    let rc = unsafe { iopf_attach_socket(path.as_ptr(), &mut device) };
    assert_eq!(rc, 0, "{}", last_error());
    let memfd =
        rustix::fs::memfd_create("guest", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&memfd, GUEST_MEMORY).unwrap();
    rustix::fs::fcntl_add_seals(&memfd, SealFlags::SHRINK).unwrap();
    let prot = IOPF_DMA_READ | IOPF_DMA_WRITE;
    let rc = iopf_dma_map(device, memfd.as_raw_fd(), 0, 0, GUEST_MEMORY, prot);
    assert_eq!(rc, 0, "{}", last_error());
    (device, memfd)
}

/// Drains every whole group that waits: (cookie, first request's address).
fn drain(device: iopf_device) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut groups = [iopf_group::default(); 16];
    let mut requests = vec![iopf_page_request::default(); IOPF_MAX_GROUP_REQUESTS as usize];
    loop {
        // SAFETY: both buffers are writable for the lengths given.
        let n = unsafe {
            iopf_drain_groups(
                device,
                groups.as_mut_ptr(),
                groups.len(),
                requests.as_mut_ptr(),
                requests.len(),
            )
        };
        assert!(n >= 0, "{}", last_error());
        if n == 0 {
            return out;
        }
        for g in &groups[..n as usize] {
            out.push((g.cookie, requests[g.first as usize].addr));
        }
    }
}

/// The loop of docs/C-API.md: until the host stops serving the device (or `stop` says so),
/// answer every group `Success`. Returns the groups answered.
fn serve(device: iopf_device, deadline: Instant, stop: impl Fn() -> bool) -> u64 {
    let mut answered = 0;
    loop {
        assert!(iopf_poll(device) >= 0, "{}", last_error());
        for (cookie, addr) in drain(device) {
            assert!(addr < GUEST_MEMORY);
            assert_eq!(
                iopf_answer(device, cookie, IOPF_ANSWER_SUCCESS),
                0,
                "{}",
                last_error()
            );
            answered += 1;
        }
        assert!(iopf_flush(device) >= 0);
        if iopf_live(device) == 0 || stop() {
            return answered;
        }
        assert!(Instant::now() < deadline, "the workload did not finish");
        if iopf_prepare_to_sleep(device) == 1 {
            let fd = iopf_fd(device);
            assert!(fd >= 0);
            // SAFETY: the library's fd, open until `iopf_detach`.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let timeout = Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => panic!("poll: {e}"),
            }
        }
        assert_eq!(iopf_woke(device), 0);
    }
}

/// Serves the device until the host's workload is done, then as the host finishes (it
/// clears `LIVE`, then waits for the VMM to leave): until the device is no longer live. Then
/// the host must say it has finished; the VMM detaches; the host's report. Returns the groups
/// answered too.
fn serve_to_the_end(device: iopf_device, host: Host) -> (HostReport, iopf_stats, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answered = serve(device, deadline, || host.finished());
    let finishing = std::thread::spawn(move || host.finish());
    answered += serve(device, deadline, || false);
    assert_eq!(iopf_live(device), 0);
    assert_eq!(iopf_host_finished(device), 1, "{}", last_error());
    let mut stats = iopf_stats::default();
    // SAFETY: `stats` is a writable local, its size given.
    let rc = unsafe { iopf_stats(device, &mut stats, size_of::<iopf_stats>()) };
    assert_eq!(rc, 0);
    assert_eq!(iopf_detach(device), 0);
    (finishing.join().unwrap(), stats, answered)
}

#[test]
fn a_real_host_is_served_to_the_end_of_its_workload_through_the_c_api() {
    let (host, path) = host("serve");
    let (device, _memfd) = attach(&path);
    let mut number = u32::MAX;
    // SAFETY: `number` is a writable local.
    assert_eq!(unsafe { iopf_device_number(device, &mut number) }, 0);
    // The host's only device is taken: the next connection is refused.
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut second = IOPF_NO_DEVICE;
    // SAFETY: `c_path` is NUL-terminated, `second` a writable local.
    let rc = unsafe { iopf_attach_socket(c_path.as_ptr(), &mut second) };
    assert_eq!(rc, ECONNRESET, "{}", last_error());
    assert_eq!(second, IOPF_NO_DEVICE);

    let (report, stats, answered) = serve_to_the_end(device, host);
    let engine = &report.engines[0];
    assert_eq!(engine.device, number);
    assert_eq!(engine.endpoint.accesses, u64::from(ACCESSES));
    assert_eq!(engine.endpoint.completed, u64::from(ACCESSES), "{report:?}");
    assert_eq!(engine.memory.bytes_mismatched, 0);
    assert!(answered > 0);
    assert_eq!(stats.groups, answered);
    assert_eq!(stats.responses, answered);
    assert_eq!((stats.awaiting_answer, stats.backlog), (0, 0));
    assert_eq!(report.core.responses.guest.success, answered);
    assert_eq!(report.core.refused.unknown_cookie, 0);
}

#[test]
fn a_reset_answers_the_pending_group_and_forgets_its_cookie() {
    let (host, path) = host("reset");
    let (device, _memfd) = attach(&path);
    // Wait for a group; keep it unanswered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = loop {
        assert!(iopf_poll(device) >= 0);
        if let Some(&(cookie, _)) = drain(device).first() {
            break cookie;
        }
        assert!(Instant::now() < deadline, "no group came");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(iopf_reset(device), 0, "{}", last_error());
    assert_eq!(iopf_answer(device, pending, IOPF_ANSWER_SUCCESS), ENOENT);
    // Same handle afterwards: the workload goes on to its end.
    let (report, stats, _) = serve_to_the_end(device, host);
    assert!(report.core.responses.auto.reset >= 1, "{:?}", report.core);
    assert_eq!(stats.awaiting_answer, 0);
    assert_eq!(report.core.refused.unknown_cookie, 0);
}
