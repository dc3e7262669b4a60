//! The iommufd backend checked against a real Linux kernel built with `CONFIG_IOMMUFD_TEST`.
//!
//! Built statically and packed as `/init` of an initramfs, it boots under QEMU
//! (`tests/real_kernel.rs`, `docs/KERNEL.md`): it mounts devtmpfs, runs every check through
//! the backend (never raw ioctls), prints one line per check, and powers the machine off. It
//! also runs as an ordinary program on any machine whose kernel has the self-test driver.
//!
//! Output, one line each: `iopf-kernel-check: <check> ok <details>`,
//! `iopf-kernel-check: <check> FAIL <why>` or `iopf-kernel-check: <check> skip <why>` (not
//! applicable on this kernel: the vIOMMU checks on 6.12), then
//! `iopf-kernel-check: done passed=N failed=M skipped=K`.
#![forbid(unsafe_code)]

mod viommu;

use std::sync::Arc;
use std::time::{Duration, Instant};

use iopf_abi::{Fault, PageRequest, PageResponse, Perm, ResponseCode, ResponseRecord};
use iopf_iommufd::iommufd_ioctls::{IommuFd, IommufdIoas};
use iopf_iommufd::selftest::{MockDevice, TriggerIopf};
use iopf_iommufd::{FaultFile, Iommufd, KernelFault, KernelFaultQueue, KernelResponse};
use iopf_models::guest::{Guest, GuestConfig};
use iopf_models::memory::GuestMemory;
use iopf_models::nested::GuestTables;
use iopf_models::rng::Rng;
use iopf_queue::FaultChannel;
use iopf_sim::vmm_guest::{GuestDevice, SimulatedGuest};
use iopf_vmm::Device;

const PREFIX: &str = "iopf-kernel-check:";
const EINVAL: i32 = 22;
const ENOENT: i32 = 2;
const PERM_RW: u32 = 3;

type Check = Result<String, String>;

/// The kernel objects of one mock device with a fault-capable nested page table.
struct Rig {
    /// The VMM's IOAS, allocated on the VMM's own handle (dropping it destroys it there).
    vmm_ioas: IommufdIoas,
    /// The backend, built on a duplicate of the VMM's iommufd fd.
    iommufd: Iommufd,
    device: MockDevice,
    /// The nested page table whose faults go to the backend's queue.
    fault_hwpt: u32,
    /// One whose faults go to a second queue, read raw.
    raw_hwpt: u32,
}

impl Rig {
    fn trigger(&self, grpid: u32, addr: u64) -> Result<(), String> {
        self.device
            .trigger_iopf(
                &self.iommufd,
                TriggerIopf {
                    pasid: 1,
                    grpid,
                    perm: PERM_RW,
                    addr,
                },
            )
            .map_err(|e| e.to_string())
    }
}

/// Reads everything ready through the channel trait, the way a VMM does.
fn read_requests(channel: &mut dyn FaultChannel) -> Result<Vec<(u32, PageRequest)>, String> {
    let mut got = Vec::new();
    let mut bad = None;
    channel
        .read(usize::MAX, &mut |f| match f.fault {
            Ok(Fault::PageRequest(r)) => got.push((f.device, r)),
            other => bad = Some(format!("{other:?}")),
        })
        .map_err(|e| e.to_string())?;
    match bad {
        Some(b) => Err(format!("unexpected fault {b}")),
        None => Ok(got),
    }
}

/// Waits (poll) for `n` requests and reads them.
fn wait_for(channel: &mut dyn FaultChannel, n: usize) -> Result<Vec<(u32, PageRequest)>, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        if Instant::now() > deadline {
            return Err(format!("only {} of {n} faults arrived", got.len()));
        }
        channel
            .wait(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        got.extend(read_requests(channel)?);
    }
    Ok(got)
}

fn answer(request: &PageRequest, code: ResponseCode) -> ResponseRecord {
    ResponseRecord::from(&PageResponse::answering(request, code))
}

fn raw_read(file: &FaultFile) -> Result<Vec<KernelFault>, String> {
    let mut buf = vec![0u8; 64 * iopf_iommufd::FAULT_RECORD_SIZE];
    let mut out = Vec::new();
    file.read_into(&mut buf, &mut out)
        .map_err(|e| format!("read: {e}"))?;
    Ok(out)
}

/// Builds the rig the way a VMM would: the VMM opens `/dev/iommu` itself (as Cloud Hypervisor
/// does, through `iommufd-ioctls`) and allocates its IOAS there; the backend is built on a
/// duplicate of that fd and attaches the device to the VMM's IOAS, which only the same
/// iommufd context knows. Returns the rig, the backend's queue, the raw queue's file, and
/// what the setup line reports.
fn setup() -> Result<(Rig, KernelFaultQueue, FaultFile, String), String> {
    let vmm = Arc::new(IommuFd::new().map_err(|e| format!("VMM's open of /dev/iommu: {e}"))?);
    let vmm_ioas = IommufdIoas::new(Arc::clone(&vmm)).map_err(|e| format!("VMM's IOAS: {e}"))?;
    let iommufd = Iommufd::dup_from_ioctls(&vmm).map_err(|e| e.to_string())?;
    // A /dev/iommu opened separately is another context: the VMM's IOAS id means nothing there.
    let other = Iommufd::open().map_err(|e| e.to_string())?;
    let other_errno = match MockDevice::on_ioas(&other, vmm_ioas.id()) {
        Ok(_) => return Err("a separately opened /dev/iommu accepted the VMM's IOAS".into()),
        Err(e) => e.errno().unwrap_or(0),
    };
    // There, a backend that opened /dev/iommu itself allocates its own IOAS and attaches.
    let first_ioas = other.alloc_ioas().map_err(|e| e.to_string())?;
    let own = MockDevice::new(&other)
        .map_err(|e| format!("mock device on a separate open's own IOAS: {e}"))?;
    let own_ioas = own.ioas_id;
    if own_ioas == first_ioas {
        return Err(format!("two IOAS allocations both returned id {own_ioas}"));
    }
    drop(other);
    let device = MockDevice::on_ioas(&iommufd, vmm_ioas.id())
        .map_err(|e| format!("mock device on the VMM's IOAS: {e}"))?;
    let (fault_id, file) = iommufd.alloc_fault_queue().map_err(|e| e.to_string())?;
    let fault_hwpt = device
        .alloc_fault_hwpt(&iommufd, fault_id)
        .map_err(|e| e.to_string())?;
    device
        .replace(&iommufd, fault_hwpt)
        .map_err(|e| e.to_string())?;
    // A second queue on the same device's page table is not possible; the raw checks use a
    // second fault object and its own page table, swapped in when needed.
    let (raw_id, raw_file) = iommufd.alloc_fault_queue().map_err(|e| e.to_string())?;
    let raw_hwpt = device
        .alloc_fault_hwpt(&iommufd, raw_id)
        .map_err(|e| e.to_string())?;
    let detail = format!(
        "backend on the VMM's fd (dup), device on the VMM's IOAS {}, \
         separate open refused it errno={other_errno} and attached to its own IOAS {own_ioas}; \
         fault queue, nested page table",
        vmm_ioas.id()
    );
    let rig = Rig {
        vmm_ioas,
        iommufd,
        device,
        fault_hwpt,
        raw_hwpt,
    };
    Ok((rig, KernelFaultQueue::new(fault_id, file), raw_file, detail))
}

/// A fault read, converted and answered through the channel trait. Poll stays quiet while
/// nothing is queued, and the answer reaches the kernel: it frees the group's cookie and gives
/// it to the next group.
fn round_trip(rig: &Rig, q: &mut KernelFaultQueue) -> Check {
    if q.wait(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?
    {
        return Err("poll woke on an empty fault queue".into());
    }
    // Above 4 GiB, so both halves of the address travel.
    rig.trigger(2, 0x7_dead_b000)?;
    if !q
        .wait(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?
    {
        return Err("poll did not wake for a queued fault".into());
    }
    let got = wait_for(q, 1)?;
    let (device, r) = got[0];
    if device != rig.device.idev_id
        || r.pasid.map(|p| p.get()) != Some(1)
        || r.grpid.get() != 2
        || r.perm != Perm::READ | Perm::WRITE
        || r.addr.get() != 0x7_dead_b000
        || !r.last
    {
        return Err(format!("converted wrongly: device {device} {r:?}"));
    }
    let kernel_cookie = q.kernel_cookie(r.cookie);
    let before = q.stats().written;
    q.respond(&[answer(&r, ResponseCode::Success)])
        .map_err(|e| e.to_string())?;
    if q.stats().written != before + 1 || q.pending() != 0 {
        return Err(format!("response not accepted: {:?}", q.stats()));
    }
    rig.trigger(2, 0x7_dead_b000)?;
    let (_, next) = wait_for(q, 1)?[0];
    let next_kernel_cookie = q.kernel_cookie(next.cookie);
    q.respond(&[answer(&next, ResponseCode::Success)])
        .map_err(|e| e.to_string())?;
    if kernel_cookie.is_none() || next_kernel_cookie != kernel_cookie {
        return Err(format!(
            "the kernel did not free the answered group's cookie {kernel_cookie:?}: the next \
             group got {next_kernel_cookie:?}"
        ));
    }
    Ok(format!(
        "dev_id={device} cookie={} kernel_cookie={} freed by the answer",
        r.cookie.get(),
        kernel_cookie.unwrap_or(0)
    ))
}

/// The kernel itself refuses a forged cookie and the code FAILURE with EINVAL; the group stays
/// pending until a valid answer.
fn kernel_refusals(rig: &Rig, raw: &FaultFile) -> Check {
    rig.device
        .replace(&rig.iommufd, rig.raw_hwpt)
        .map_err(|e| e.to_string())?;
    let result = (|| {
        rig.trigger(3, 0x4000)?;
        let records = raw_read(raw)?;
        let [record] = records[..] else {
            return Err(format!("expected one record, got {}", records.len()));
        };
        let forged = raw.write(&[KernelResponse {
            cookie: record.cookie.wrapping_add(1000),
            code: 0,
        }]);
        let failure = raw.write(&[KernelResponse {
            cookie: record.cookie,
            code: 2,
        }]);
        let valid = raw.write(&[KernelResponse {
            cookie: record.cookie,
            code: 0,
        }]);
        let errno = |r: &std::io::Result<usize>| match r {
            Ok(n) => format!("accepted {n}"),
            Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
        };
        match (&forged, &failure, &valid) {
            (Err(f), Err(g), Ok(1))
                if f.raw_os_error() == Some(EINVAL) && g.raw_os_error() == Some(EINVAL) =>
            {
                Ok(format!(
                    "forged=EINVAL failure=EINVAL then valid=accepted cookie={}",
                    record.cookie
                ))
            }
            _ => Err(format!(
                "forged: {}, failure: {}, valid: {}",
                errno(&forged),
                errno(&failure),
                errno(&valid)
            )),
        }
    })();
    rig.device
        .replace(&rig.iommufd, rig.fault_hwpt)
        .map_err(|e| e.to_string())?;
    result
}

/// After a detach the kernel gives the same cookie to the next group; the backend refuses the
/// late answer to the first, which would otherwise have answered the second.
fn stale_after_reuse(rig: &Rig, q: &mut KernelFaultQueue) -> Check {
    rig.trigger(5, 0x5000)?;
    let (_, first) = wait_for(q, 1)?[0];
    let first_kernel = q.kernel_cookie(first.cookie);
    q.detach_with(rig.device.idev_id, || {
        rig.device.replace(&rig.iommufd, rig.device.parent_hwpt_id)
    })
    .map_err(|e| e.to_string())?;
    rig.device
        .replace(&rig.iommufd, rig.fault_hwpt)
        .map_err(|e| e.to_string())?;
    rig.trigger(5, 0x5000)?;
    let (_, second) = wait_for(q, 1)?[0];
    let second_kernel = q.kernel_cookie(second.cookie);
    let before = q.stats();
    q.respond(&[answer(&first, ResponseCode::Invalid)])
        .map_err(|e| e.to_string())?;
    let after_stale = q.stats();
    q.respond(&[answer(&second, ResponseCode::Success)])
        .map_err(|e| e.to_string())?;
    let after = q.stats();
    let reused = first_kernel.is_some() && first_kernel == second_kernel;
    if after_stale.refused_stale != before.refused_stale + 1
        || after_stale.written != before.written
        || after.written != before.written + 1
        || first.cookie == second.cookie
    {
        return Err(format!(
            "stale answer not refused or new group not answered: {before:?} -> {after:?}"
        ));
    }
    Ok(format!(
        "kernel_cookie_reused={reused} kernel_cookie={} ours={}->{}",
        second_kernel.unwrap_or(0),
        first.cookie.get(),
        second.cookie.get()
    ))
}

/// Detaching with groups pending: the kernel answers them all, the backend retires them, and
/// the kernel has forgotten their cookies.
fn detach_auto_answers(rig: &Rig, q: &mut KernelFaultQueue) -> Check {
    const N: u32 = 8;
    for i in 0..N {
        rig.trigger(10 + i, 0x10_0000 + u64::from(i) * 0x1000)?;
    }
    let got = wait_for(q, N as usize)?;
    let kernel: Vec<u32> = got
        .iter()
        .filter_map(|(_, r)| q.kernel_cookie(r.cookie))
        .collect();
    // Two more that stay unread in the kernel's queue.
    rig.trigger(30, 0x30_0000)?;
    rig.trigger(31, 0x31_0000)?;
    let retired_before = q.stats().retired;
    q.detach_with(rig.device.idev_id, || {
        rig.device.replace(&rig.iommufd, rig.device.parent_hwpt_id)
    })
    .map_err(|e| e.to_string())?;
    let retired = q.stats().retired - retired_before;
    let pending = q.pending();
    let unread = read_requests(q)?.len();
    // The kernel no longer knows any of the cookies: writing one raw is EINVAL.
    let refused = kernel
        .iter()
        .filter(|&&cookie| {
            matches!(q.file().write(&[KernelResponse { cookie, code: 0 }]),
                Err(ref e) if e.raw_os_error() == Some(EINVAL))
        })
        .count();
    rig.device
        .replace(&rig.iommufd, rig.fault_hwpt)
        .map_err(|e| e.to_string())?;
    let late_refused_before = q.stats().refused_stale;
    let late: Vec<ResponseRecord> = got
        .iter()
        .map(|(_, r)| answer(r, ResponseCode::Success))
        .collect();
    q.respond(&late).map_err(|e| e.to_string())?;
    let late_refused = q.stats().refused_stale - late_refused_before;
    if retired != u64::from(N)
        || pending != 0
        || unread != 0
        || refused != N as usize
        || late_refused != u64::from(N)
    {
        return Err(format!(
            "retired={retired} pending={pending} unread={unread} kernel_refused={refused} late_refused={late_refused}"
        ));
    }
    Ok(format!(
        "pending={N} unread=2 retired={retired} kernel_forgot={refused} late_refused={late_refused}"
    ))
}

/// The VMM library's device loop (`Device` with the simulated guest, the code `iopf vmm` runs
/// over shared memory) serves the kernel's queue unchanged: the guest maps each page in its
/// own page tables and answers; every group gets exactly one answer the kernel accepts.
fn vmm_device(rig: &Rig) -> Check {
    const N: u32 = 64;
    let (fault_id, file) = rig.iommufd.alloc_fault_queue().map_err(|e| e.to_string())?;
    let hwpt = rig
        .device
        .alloc_fault_hwpt(&rig.iommufd, fault_id)
        .map_err(|e| e.to_string())?;
    rig.device
        .replace(&rig.iommufd, hwpt)
        .map_err(|e| e.to_string())?;
    let result = (|| {
        let mut memory = GuestMemory::new(1024).map_err(|e| e.to_string())?;
        let tables = GuestTables::new(&mut memory, 16).ok_or("no memory for page tables")?;
        let guest = Guest::new(
            GuestConfig {
                refuse_rate: 0.0,
                ..GuestConfig::default()
            },
            Rng::new(7),
        );
        let channel = KernelFaultQueue::new(fault_id, file);
        let guest = GuestDevice::new(memory, tables, guest, 2)
            .map_err(|e| format!("address spaces: {e}"))?;
        let mut vmm = Device::new(channel).map_err(|e| e.to_string())?;
        let mut sim = SimulatedGuest::new();
        sim.add_device(rig.device.idev_id, vmm.responder(), guest);
        for i in 0..N {
            rig.trigger(i, 0x80_0000 + u64::from(i) * 0x1000)?;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while vmm.channel().stats().written < u64::from(N) {
            if Instant::now() > deadline {
                return Err(format!(
                    "timed out: vmm {:?}, queue {:?}",
                    vmm.stats(),
                    vmm.channel().stats()
                ));
            }
            vmm.poll(&mut sim).map_err(|e| e.to_string())?;
            sim.send_due();
            vmm.flush().map_err(|e| e.to_string())?;
            vmm.wait(sim.timeout(Duration::from_millis(5)))
                .map_err(|e| e.to_string())?;
        }
        let (v, k) = (vmm.stats(), vmm.channel().stats());
        if v.groups != u64::from(N) || v.responses != u64::from(N) || v.malformed != 0 {
            return Err(format!("vmm {v:?}"));
        }
        if k.written != u64::from(N) || vmm.channel().refused() != 0 || vmm.channel().pending() != 0
        {
            return Err(format!("queue {k:?}"));
        }
        Ok(format!(
            "groups={} responses={} kernel_accepted={} guest_mapped={}",
            v.groups,
            v.responses,
            k.written,
            sim.device(rig.device.idev_id)
                .map_or(0, |g| g.guest().counters().mapped)
        ))
    })();
    rig.device
        .replace(&rig.iommufd, rig.fault_hwpt)
        .map_err(|e| e.to_string())?;
    rig.iommufd
        .destroy(hwpt)
        .map_err(|e| format!("page table {hwpt}: {e}"))?;
    result
}

/// Tears the rig down as a VMM does when the device goes: the backend destroys the device and
/// the page tables it allocated over the VMM's IOAS; then the VMM drops its IOAS, destroyed
/// through the VMM's own handle, and the backend no longer finds it (same context again).
fn teardown(rig: Rig) -> Check {
    let Rig {
        vmm_ioas,
        iommufd,
        device,
        fault_hwpt,
        raw_hwpt,
    } = rig;
    let objects = [
        ("mock device", device.stdev_id),
        ("fault page table", fault_hwpt),
        ("raw page table", raw_hwpt),
        ("parent page table", device.parent_hwpt_id),
    ];
    for (what, id) in objects {
        iommufd
            .destroy(id)
            .map_err(|e| format!("{what} {id}: {e}"))?;
    }
    let ioas_id = vmm_ioas.id();
    drop(vmm_ioas);
    match iommufd.destroy(ioas_id) {
        Err(e) if e.errno() == Some(ENOENT) => {
            Ok(format!("destroyed={} vmm_ioas_gone=true", objects.len()))
        }
        Ok(()) => Err(format!("the VMM's IOAS {ioas_id} outlived the VMM's drop")),
        Err(e) => Err(format!(
            "the VMM's IOAS {ioas_id} after the VMM's drop: {e}"
        )),
    }
}

/// N trigger/read/respond round trips (under QEMU's TCG these are emulated instructions, not
/// a machine's speed).
fn timing(rig: &Rig, q: &mut KernelFaultQueue, n: u32) -> Check {
    let mut ns = Vec::with_capacity(n as usize);
    for i in 0..n {
        let start = Instant::now();
        rig.trigger(i % 512, 0x40_0000 + u64::from(i % 512) * 0x1000)?;
        let (_, r) = wait_for(q, 1)?[0];
        q.respond(&[answer(&r, ResponseCode::Success)])
            .map_err(|e| e.to_string())?;
        ns.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    ns.sort_unstable();
    let mean = ns.iter().sum::<u64>() / u64::from(n.max(1));
    let at = |p: usize| ns[(ns.len() * p / 100).min(ns.len() - 1)];
    if q.pending() != 0 {
        return Err(format!("{} groups left pending", q.pending()));
    }
    Ok(format!(
        "n={n} mean_ns={mean} p50_ns={} p99_ns={} max_ns={}",
        at(50),
        at(99),
        ns[ns.len() - 1]
    ))
}

fn report(name: &str, result: Check, passed: &mut u32, failed: &mut u32) {
    match result {
        Ok(detail) => {
            *passed += 1;
            println!("{PREFIX} {name} ok {detail}");
        }
        Err(why) => {
            *failed += 1;
            println!("{PREFIX} {name} FAIL {why}");
        }
    }
}

/// The vIOMMU checks, in order.
const VIOMMU_CHECKS: [&str; 6] = [
    "viommu_setup",
    "vevent_delivery",
    "vevent_ordering",
    "vevent_overflow",
    "viommu_page_requests",
    "viommu_teardown_orders",
];

/// Runs the vIOMMU checks on a second mock device on the VMM's IOAS; all skipped on a kernel
/// without vIOMMUs. Returns how many were skipped.
fn run_viommu(rig: &Rig, passed: &mut u32, failed: &mut u32) -> u32 {
    let (mut vrig, detail) = match viommu::setup(&rig.iommufd, rig.vmm_ioas.id()) {
        Ok(r) => r,
        Err(outcome) => {
            let (why, skip) = match outcome {
                viommu::Outcome::Skip(why) => (why, true),
                viommu::Outcome::Fail(why) => (why, false),
            };
            if skip {
                for name in VIOMMU_CHECKS {
                    println!("{PREFIX} {name} skip {why}");
                }
                return VIOMMU_CHECKS.len() as u32;
            }
            report("viommu_setup", Err(why), passed, failed);
            return 0;
        }
    };
    report("viommu_setup", Ok(detail), passed, failed);
    report("vevent_delivery", vrig.delivery(), passed, failed);
    report("vevent_ordering", vrig.ordering(), passed, failed);
    report("vevent_overflow", vrig.overflow(), passed, failed);
    report("viommu_page_requests", vrig.page_requests(), passed, failed);
    report(
        "viommu_teardown_orders",
        vrig.teardown_orders(),
        passed,
        failed,
    );
    0
}

fn run() -> u32 {
    let (mut passed, mut failed) = (0, 0);
    let release = rustix::system::uname();
    println!(
        "{PREFIX} kernel release={}",
        release.release().to_string_lossy()
    );
    let (rig, mut q, raw) = match setup() {
        Ok((rig, q, raw, detail)) => {
            report("setup", Ok(detail), &mut passed, &mut failed);
            (rig, q, raw)
        }
        Err(e) => {
            report("setup", Err(e), &mut passed, &mut failed);
            println!("{PREFIX} done passed={passed} failed={failed} skipped=0");
            return failed;
        }
    };
    let n: u32 = std::env::var("IOPF_KERNEL_ROUND_TRIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    report(
        "round_trip",
        round_trip(&rig, &mut q),
        &mut passed,
        &mut failed,
    );
    report(
        "kernel_refusals",
        kernel_refusals(&rig, &raw),
        &mut passed,
        &mut failed,
    );
    report(
        "stale_after_reuse",
        stale_after_reuse(&rig, &mut q),
        &mut passed,
        &mut failed,
    );
    report(
        "detach_auto_answers",
        detach_auto_answers(&rig, &mut q),
        &mut passed,
        &mut failed,
    );
    report("vmm_device", vmm_device(&rig), &mut passed, &mut failed);
    report("timing", timing(&rig, &mut q, n), &mut passed, &mut failed);
    let skipped = run_viommu(&rig, &mut passed, &mut failed);
    report("teardown", teardown(rig), &mut passed, &mut failed);
    println!("{PREFIX} stats {:?}", q.stats());
    println!("{PREFIX} done passed={passed} failed={failed} skipped={skipped}");
    failed
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let init = std::process::id() == 1;
    if init {
        let _ = std::fs::create_dir_all("/dev");
        if let Err(e) = rustix::mount::mount(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        ) {
            println!("{PREFIX} mount FAIL devtmpfs: {e}");
        }
    }
    let failed = run();
    if init {
        // Power off: QEMU exits. (If that fails, pid 1 exiting panics the kernel, and
        // `panic=-1` with `-no-reboot` ends QEMU too.)
        let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    }
    std::process::exit(i32::from(failed > 0));
}
