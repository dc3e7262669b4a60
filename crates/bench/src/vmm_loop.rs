//! The VMM's cost per page request group as one thread serves more devices: the `iopf-vmm`
//! library's [`EventLoop`] on a thread of its own, over real shared-memory queues (memfds,
//! eventfd doorbells) built in this process as the library's quick start builds them.
//!
//! The host side is this thread: it publishes one-page groups to the devices round robin,
//! keeping [`WINDOW`] groups in flight over all devices (whatever their number, so that every
//! point offers the VMM the same load), and drains the answers. The VMM thread runs
//! [`EventLoop::run_once`] with a vIOMMU that answers every group `Success` at once. The cost
//! is the VMM thread's CPU time over the timed groups divided by their number.

use std::sync::atomic::{AtomicU8, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use iopf_abi::{Cookie, PageAddr, PageRequest, Perm, PrgIndex, ResponseCode};
use iopf_queue::{Doorbell, FaultQueueProducer, ResponseQueueConsumer, SharedMemoryChannel};
use iopf_vmm::{Device, EventLoop, PageRequestGroup, Responder, Viommu};
use rustix::time::{ClockId, clock_gettime};

use crate::error::{BenchError, Result};
use crate::scaling::raise_fd_limit;
use crate::spin;

/// Groups in flight over all devices (the PRI credits of the end-to-end figure).
pub(crate) const WINDOW: u64 = 64;
/// Entries per queue: room for the whole window on one device.
const ENTRIES: u32 = 2 * WINDOW as u32;
/// How long the VMM's loop sleeps at most (it then looks at the phase again).
const LOOP_TIMEOUT: Duration = Duration::from_millis(2);
/// How long the host side sleeps at most in one wait for an answer.
const ANSWER_WAIT: Duration = Duration::from_millis(10);
/// How long the host side waits for one answer before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

/// Phases the host side announces to the VMM thread, and the VMM thread's failure.
const WARM: u8 = 0;
const TIMED: u8 = 1;
const DONE: u8 = 2;
const FAILED: u8 = 3;

/// One point: the VMM's cost with `devices` devices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    /// VMM thread CPU time per group, nanoseconds.
    pub(crate) cpu_ns_per_group: f64,
    /// Wall time per group seen by the host side, nanoseconds.
    pub(crate) wall_ns_per_group: f64,
    /// `EventLoop::run_once` calls per group.
    pub(crate) loop_rounds_per_group: f64,
    /// Fault doorbell rings per group (the VMM was asleep on that device's queue).
    pub(crate) kicks_per_group: f64,
}

fn invalid(e: impl std::fmt::Display) -> BenchError {
    BenchError::Invalid(format!("vmm loop: {e}"))
}

/// The calling thread's CPU time, nanoseconds.
fn thread_cpu_ns() -> u64 {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// A vIOMMU whose guest has every page mapped: it answers each group `Success` at once.
struct AlwaysMapped {
    /// By device number.
    responders: Vec<Responder>,
    refused: u64,
}

impl Viommu for AlwaysMapped {
    fn page_request_group(&mut self, group: PageRequestGroup) {
        let answered = self
            .responders
            .get(group.device() as usize)
            .is_some_and(|r| r.respond(group.token(), ResponseCode::Success).is_ok());
        if !answered {
            self.refused += 1;
        }
    }
}

/// The host's ends of one device's queues.
struct HostEnd {
    faults: FaultQueueProducer,
    responses: ResponseQueueConsumer,
    answered: u64,
}

impl HostEnd {
    /// Takes the answers that are there; counts them, and those that are not `Success`.
    fn drain(&mut self, bad: &mut u64) -> Result<usize> {
        let n = self.responses.drain(usize::MAX, |r| {
            if r.decode().map(|r| r.code) != Ok(ResponseCode::Success) {
                *bad += 1;
            }
        })?;
        self.answered += n as u64;
        Ok(n)
    }
}

/// What the VMM thread measured.
struct Served {
    cpu_ns: u64,
    loop_rounds: u64,
    refused: u64,
}

/// The VMM thread: serves every device from one [`EventLoop`] until the host side says done.
fn vmm(
    mut events: EventLoop,
    mut viommu: AlwaysMapped,
    phase: &AtomicU8,
    cpu: Option<usize>,
) -> Result<Served> {
    spin::pin(cpu)?;
    let mut start: Option<(u64, u64)> = None;
    let mut loop_rounds = 0u64;
    loop {
        match phase.load(Ordering::Acquire) {
            TIMED if start.is_none() => start = Some((thread_cpu_ns(), loop_rounds)),
            DONE | FAILED => break,
            _ => {}
        }
        let round = events.run_once(&mut viommu, Some(LOOP_TIMEOUT))?;
        loop_rounds += 1;
        if let Some(failed) = round.failed.into_iter().next() {
            return Err(invalid(format!(
                "device {:?} failed: {}",
                failed.key,
                iopf_core::ErrorChain(&failed.error)
            )));
        }
    }
    let (cpu0, rounds0) = start.ok_or_else(|| invalid("the timed phase never started"))?;
    Ok(Served {
        cpu_ns: thread_cpu_ns().saturating_sub(cpu0),
        loop_rounds: loop_rounds - rounds0,
        refused: viommu.refused,
    })
}

/// Builds the host ends and the VMM's loop for `devices` devices.
fn rig(devices: usize) -> Result<(Vec<HostEnd>, EventLoop, AlwaysMapped)> {
    // Per device: two memfds and their clones, two doorbells and their clones, the device's
    // wake fd; and the epoll set.
    raise_fd_limit(10 * devices as u64 + 256);
    let mut hosts = Vec::with_capacity(devices);
    let mut events = EventLoop::new()?;
    let mut viommu = AlwaysMapped {
        responders: Vec::with_capacity(devices),
        refused: 0,
    };
    let eventfd = || Doorbell::new().map_err(BenchError::io("eventfd"));
    let clone = |d: &Doorbell| d.try_clone().map_err(BenchError::io("dup of an eventfd"));
    for d in 0..devices {
        let mut faults = FaultQueueProducer::create(ENTRIES)?;
        let fault_irq = eventfd()?;
        faults.set_doorbell(Some(clone(&fault_irq)?));
        faults.set_live(true);
        let mut responses = ResponseQueueConsumer::create(ENTRIES, eventfd()?)?;
        responses.set_live(true);
        let response_bell = clone(responses.doorbell())?;
        let region = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(BenchError::io("dup of a queue region's memfd"))
        };
        let channel = SharedMemoryChannel::from_fds(
            u32::try_from(d).map_err(invalid)?,
            region(faults.memory().fd())?,
            region(responses.memory().fd())?,
            fault_irq,
            Some(response_bell),
        )?;
        let device = Device::new(channel)?;
        viommu.responders.push(device.responder());
        events.add(device)?;
        hosts.push(HostEnd {
            faults,
            responses,
            answered: 0,
        });
    }
    Ok((hosts, events, viommu))
}

/// What the host side measured over the timed groups.
struct Published {
    wall: Duration,
    kicks: u64,
}

fn kicks(hosts: &[HostEnd]) -> u64 {
    hosts.iter().map(|h| h.faults.kicks()).sum()
}

/// The host side: `warm` groups, then `timed` groups, round robin over the devices with
/// [`WINDOW`] in flight.
fn host(hosts: &mut [HostEnd], phase: &AtomicU8, warm: u64, timed: u64) -> Result<Published> {
    let n = hosts.len() as u64;
    let mut bad = 0u64;
    let mut start = None;
    let total = warm + timed;
    // Waits until `host`'s answers reach `count`.
    let wait_for = |host: &mut HostEnd, count: u64, bad: &mut u64| -> Result<()> {
        let mut deadline = None;
        while host.answered < count {
            if host.drain(bad)? > 0 {
                continue;
            }
            if phase.load(Ordering::Acquire) == FAILED {
                return Err(invalid("the VMM thread stopped"));
            }
            host.responses.wait(Some(ANSWER_WAIT))?;
            let now = Instant::now();
            match deadline {
                None => deadline = Some(now + PATIENCE),
                Some(d) if now > d => return Err(BenchError::Timeout("the VMM's answers")),
                Some(_) => {}
            }
        }
        Ok(())
    };
    for g in 0..total {
        if g == warm {
            phase.store(TIMED, Ordering::Release);
            start = Some((Instant::now(), kicks(hosts)));
        }
        if g >= WINDOW {
            // The oldest group in flight, and its device's count once it is answered.
            let oldest = g - WINDOW;
            let d = (oldest % n) as usize;
            wait_for(&mut hosts[d], oldest / n + 1, &mut bad)?;
        }
        let d = (g % n) as usize;
        hosts[d].faults.stage_group(&[PageRequest {
            cookie: Cookie::new((g % u64::from(u32::MAX)) as u32 + 1).map_err(invalid)?,
            pasid: None,
            grpid: PrgIndex::new((g % 512) as u32).map_err(invalid)?,
            perm: Perm::READ | Perm::WRITE,
            addr: PageAddr::containing(g << 12),
            last: true,
            private_data: None,
        }])?;
        hosts[d].faults.publish()?;
    }
    for (d, host) in hosts.iter_mut().enumerate() {
        let sent = total / n + u64::from((d as u64) < total % n);
        wait_for(host, sent, &mut bad)?;
    }
    let (started, kicks0) = start.ok_or_else(|| invalid("no timed groups"))?;
    let wall = started.elapsed();
    if bad > 0 {
        return Err(invalid(format!("{bad} answers were not Success")));
    }
    Ok(Published {
        wall,
        kicks: kicks(hosts) - kicks0,
    })
}

/// The VMM's cost per group with `devices` devices served by one thread (pinned to
/// `vmm_cpu`), over `groups` timed groups (at least one per device) after a warm-up of a
/// tenth of that (at least one per device).
pub(crate) fn cost(devices: usize, groups: u64, vmm_cpu: Option<usize>) -> Result<Point> {
    let devices = devices.max(1);
    let timed = groups.max(devices as u64).max(1);
    let warm = (timed / 10).max(devices as u64);
    let (mut hosts, events, viommu) = rig(devices)?;
    let phase = AtomicU8::new(WARM);
    let (served, published) = thread::scope(|s| {
        let vmm = thread::Builder::new()
            .name("iopf-bench-vmm".into())
            .spawn_scoped(s, || {
                let served = vmm(events, viommu, &phase, vmm_cpu);
                if served.is_err() {
                    phase.store(FAILED, Ordering::Release);
                }
                served
            })
            .map_err(BenchError::io("spawn the VMM thread"))?;
        let published = host(&mut hosts, &phase, warm, timed);
        if phase.load(Ordering::Acquire) != FAILED {
            phase.store(DONE, Ordering::Release);
        }
        let served = vmm.join().map_err(|_| invalid("the VMM thread panicked"))?;
        // The VMM's failure explains the host side's, so it comes first.
        Ok::<_, BenchError>((served?, published?))
    })?;
    if served.refused > 0 {
        return Err(invalid(format!(
            "{} answers refused by the library",
            served.refused
        )));
    }
    let g = timed as f64;
    Ok(Point {
        cpu_ns_per_group: served.cpu_ns as f64 / g,
        wall_ns_per_group: published.wall.as_nanos() as f64 / g,
        loop_rounds_per_group: served.loop_rounds as f64 / g,
        kicks_per_group: published.kicks as f64 / g,
    })
}
