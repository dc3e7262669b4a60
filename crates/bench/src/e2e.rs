//! End to end between two processes, as `iopf demo` runs it (fds passed over a UNIX socket,
//! not the vfio-user control plane, which is not on the fault path): a device reports a page
//! request to the real fault core, which gives its group a cookie and publishes it on the fault
//! queue; the VMM process drains it, its guest answers `Success`, and the response comes back
//! through the response queue; the core checks the cookie and answers the device. Both sides
//! wait the library's way: poll a while, then sleep on the eventfd with `NEED_WAKEUP`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use iopf_abi::{Fault, PageAddr, PageResponse, Pasid, Perm, PrgIndex, ResponseCode};
use iopf_abi::{PageRequest, ResponseRecord, UnrecoverableFault};
use iopf_core::{
    DeviceConfig, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, DeviceSink, FaultCore,
    FaultHandler, MonotonicClock, QueueHandler, ResponseSource, StageError, Wake,
};
use iopf_queue::{
    DEFAULT_SPIN, Doorbell, FaultQueueProducer, QueueError, ResponseQueueConsumer, RingError,
    Staged,
};

use crate::control::{Control, Peer, PeerStats, Task};
use crate::error::{BenchError, Result};
use crate::queue::attach_vmm;
use crate::spin::Waiter;

const DEVICE: DeviceId = DeviceId(1);
/// Entries per queue (as `iopf demo`'s default).
const ENTRIES: u32 = 256;
/// Groups the device may have outstanding in the sustained run (its PRI credits, as `iopf
/// demo`'s default).
pub(crate) const CREDITS: u64 = 64;
const NAP: Duration = Duration::from_millis(100);

/// The end-to-end round trip, one group in flight at a time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Latency {
    /// Percentiles and maximum, nanoseconds.
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
    /// Sleeps of both sides per round trip.
    pub(crate) sleeps_per_group: f64,
}

/// The sustained rate with [`CREDITS`] groups outstanding.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sustained {
    /// Groups per second.
    pub(crate) groups_per_s: f64,
    /// Doorbell rings per group, both directions.
    pub(crate) kicks_per_group: f64,
    /// Sleeps of both sides per group.
    pub(crate) sleeps_per_group: f64,
}

/// The device model: counts the answers it gets, by whom.
#[derive(Debug, Default)]
struct Device {
    guest: AtomicU64,
    auto: AtomicU64,
}

impl DeviceSink for Device {
    fn page_response(&self, _device: DeviceId, response: DeviceResponse) {
        match response.source {
            ResponseSource::Guest => self.guest.fetch_add(1, Ordering::Release),
            ResponseSource::Auto(_) => self.auto.fetch_add(1, Ordering::Release),
        };
    }
}

impl Device {
    fn answered(&self) -> u64 {
        self.guest.load(Ordering::Acquire) + self.auto.load(Ordering::Acquire)
    }
}

/// The real handler, which also shows how often it has rung the VMM's doorbell (the core keeps
/// its handler out of reach, and counts no kicks itself).
#[derive(Debug)]
struct Counted {
    inner: QueueHandler,
    kicks: Arc<AtomicU64>,
}

impl FaultHandler for Counted {
    fn consumer_attached(&self) -> bool {
        self.inner.consumer_attached()
    }
    fn stage_group(&mut self, group: &[PageRequest]) -> Result<(), StageError> {
        self.inner.stage_group(group)
    }
    fn stage_unrecoverable(&mut self, fault: &UnrecoverableFault) -> Result<Staged, RingError> {
        self.inner.stage_unrecoverable(fault)
    }
    fn publish(&mut self) -> Result<Option<Wake>, QueueError> {
        let published = self.inner.publish();
        self.kicks
            .store(self.inner.faults.kicks(), Ordering::Relaxed);
        published
    }
    fn drain_responses(
        &mut self,
        max: usize,
        out: &mut Vec<ResponseRecord>,
    ) -> Result<usize, RingError> {
        self.inner.drain_responses(max, out)
    }
    fn count_rejected(&mut self, n: u64) {
        self.inner.count_rejected(n);
    }
    fn set_live(&mut self, live: bool) {
        self.inner.set_live(live);
    }
    fn kick(&mut self) -> Option<Wake> {
        self.inner.kick()
    }
    fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
        self.inner.prepare_to_sleep()
    }
    fn woke(&mut self) {
        self.inner.woke();
    }
    fn set_fault_doorbell(&mut self, doorbell: Option<Doorbell>) {
        self.inner.set_fault_doorbell(doorbell);
    }
}

fn page_request(seq: u64) -> Result<DeviceFault> {
    let bad = |e| BenchError::Invalid(format!("page request: {e}"));
    Ok(DeviceFault::PageRequest(DevicePageRequest {
        pasid: Some(Pasid::new(1).map_err(bad)?),
        grpid: PrgIndex::new((seq % 512) as u32).map_err(bad)?,
        perm: Perm::READ | Perm::WRITE,
        addr: PageAddr::containing(seq << 12),
        last: true,
        private_data: None,
    }))
}

/// The host's event loop between two looks at the device's answers: poll the response queue
/// [`DEFAULT_SPIN`] times, then ask for a doorbell ring and sleep.
struct HostWait<'a> {
    core: &'a FaultCore,
    wake: Doorbell,
    waiter: Waiter,
    polls: u32,
    sleeps: u64,
    deadline: Instant,
}

impl HostWait<'_> {
    fn idle(&mut self) -> Result<()> {
        self.polls += 1;
        if self.polls <= DEFAULT_SPIN {
            return self.waiter.relax();
        }
        self.polls = 0;
        if self.core.prepare_to_sleep(DEVICE)? {
            self.sleeps += 1;
            self.wake
                .wait(Some(NAP))
                .map_err(BenchError::io("response doorbell"))?;
        }
        self.core.woke(DEVICE)?;
        if !self.core.is_registered(DEVICE)? {
            return Err(BenchError::Invalid("the VMM broke a queue".into()));
        }
        if Instant::now() > self.deadline {
            return Err(BenchError::Timeout("page responses"));
        }
        Ok(())
    }
}

/// A host with one device whose handler is registered for a VMM in the peer process.
struct Session<'p> {
    peer: &'p Peer,
    core: FaultCore,
    device: Arc<Device>,
    wake: Doorbell,
    kick: Doorbell,
    host_kicks: Arc<AtomicU64>,
}

impl<'p> Session<'p> {
    fn open(peer: &'p Peer) -> Result<Self> {
        let core = FaultCore::new(Arc::new(MonotonicClock::new()));
        let device = Arc::new(Device::default());
        core.add_device(DEVICE, DeviceConfig::default(), device.clone())?;
        let mut faults = FaultQueueProducer::create(ENTRIES)?;
        let fault_doorbell = Doorbell::new().map_err(BenchError::io("eventfd"))?;
        let response_doorbell = Doorbell::new().map_err(BenchError::io("eventfd"))?;
        let wake = response_doorbell
            .try_clone()
            .map_err(BenchError::io("eventfd"))?;
        let responses = ResponseQueueConsumer::create(ENTRIES, response_doorbell)?;
        peer.start(
            &Task::Vmm,
            &[
                faults.memory().fd(),
                fault_doorbell.as_fd(),
                responses.memory().fd(),
                responses.doorbell().as_fd(),
            ],
        )?;
        let kick = fault_doorbell
            .try_clone()
            .map_err(BenchError::io("eventfd"))?;
        faults.set_doorbell(Some(fault_doorbell));
        if !faults.consumer_attached() {
            return Err(BenchError::Peer(
                "the VMM said Ready before attaching".into(),
            ));
        }
        let host_kicks = Arc::new(AtomicU64::new(0));
        let handler = Counted {
            inner: QueueHandler { faults, responses },
            kicks: host_kicks.clone(),
        };
        core.register(DEVICE, Box::new(handler))?;
        Ok(Self {
            peer,
            core,
            device,
            wake,
            kick,
            host_kicks,
        })
    }

    fn waiter(&self) -> Result<HostWait<'_>> {
        Ok(HostWait {
            core: &self.core,
            wake: self.wake.try_clone().map_err(BenchError::io("eventfd"))?,
            waiter: Waiter::new("page responses"),
            polls: 0,
            sleeps: 0,
            deadline: Instant::now() + Duration::from_secs(120),
        })
    }

    /// Unregisters (clears `LIVE`), wakes the VMM so it sees that, and checks that every
    /// group was answered by the guest. Returns the VMM's counts.
    fn close(self, issued: u64) -> Result<PeerStats> {
        self.core.unregister(DEVICE);
        self.kick.ring().map_err(BenchError::io("fault doorbell"))?;
        let vmm = self.peer.finish()?;
        let auto = self.device.auto.load(Ordering::Acquire);
        if auto != 0 {
            return Err(BenchError::Invalid(format!(
                "the host answered {auto} groups itself"
            )));
        }
        if vmm.records != issued || self.device.answered() != issued {
            return Err(BenchError::Invalid(format!(
                "the VMM answered {} groups and the device got {} answers; it issued {issued}",
                vmm.records,
                self.device.answered()
            )));
        }
        Ok(vmm)
    }
}

/// `samples` round trips with one group in flight (after a tenth as many to warm up):
/// device, core, fault queue, VMM process, guest, response queue, core, device.
pub(crate) fn latency(peer: &Peer, samples: u64) -> Result<Latency> {
    let session = Session::open(peer)?;
    let mut wait = session.waiter()?;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| BenchError::Invalid(format!("histogram: {e}")))?;
    let warm = samples / 10 + 1;
    let mut seq = 0u64;
    for i in 0..warm + samples {
        let fault = page_request(seq)?;
        seq += 1;
        let start = Instant::now();
        session.core.report(DEVICE, &fault)?;
        loop {
            session.core.process_responses(DEVICE)?;
            if session.device.answered() == seq {
                break;
            }
            wait.idle()?;
        }
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if i >= warm {
            histogram.saturating_record(ns.max(1));
        }
    }
    let host_sleeps = wait.sleeps;
    drop(wait);
    let vmm = session.close(seq)?;
    Ok(Latency {
        p50: histogram.value_at_quantile(0.5) as f64,
        p99: histogram.value_at_quantile(0.99) as f64,
        p999: histogram.value_at_quantile(0.999) as f64,
        max: histogram.max() as f64,
        sleeps_per_group: (host_sleeps + vmm.sleeps) as f64 / seq.max(1) as f64,
    })
}

/// `groups` groups with the device keeping [`CREDITS`] outstanding, reported in batches as
/// credits come back. Groups per second.
pub(crate) fn sustained(peer: &Peer, groups: u64) -> Result<Sustained> {
    let session = Session::open(peer)?;
    let mut wait = session.waiter()?;
    let (core, device) = (&session.core, &session.device);
    let mut batch: Vec<DeviceFault> = Vec::with_capacity(CREDITS as usize);
    let mut seq = 0u64;
    let start = Instant::now();
    loop {
        batch.clear();
        let answered = device.answered();
        while seq < groups && seq - answered < CREDITS {
            batch.push(page_request(seq)?);
            seq += 1;
        }
        if !batch.is_empty() {
            core.report_batch(DEVICE, &batch)?;
        }
        if core.process_responses(DEVICE)? == 0 {
            if device.answered() == groups {
                break;
            }
            wait.idle()?;
        }
    }
    let elapsed = start.elapsed();
    let host_sleeps = wait.sleeps;
    drop(wait);
    let host_kicks = session.host_kicks.load(Ordering::Relaxed);
    let vmm = session.close(groups)?;
    let per = |n: u64| n as f64 / groups.max(1) as f64;
    Ok(Sustained {
        groups_per_s: groups as f64 / elapsed.as_secs_f64().max(1e-9),
        kicks_per_group: per(host_kicks + vmm.kicks),
        sleeps_per_group: per(host_sleeps + vmm.sleeps),
    })
}

/// The VMM: answers every page request group `Success` until the host clears `LIVE`.
pub(crate) fn vmm_peer(control: &Control, fds: Vec<OwnedFd>) -> Result<PeerStats> {
    let (mut faults, mut responses) = attach_vmm(fds)?;
    control.ready()?;
    let mut answers: Vec<PageResponse> = Vec::with_capacity(ENTRIES as usize);
    let mut groups = 0u64;
    let mut malformed = 0u64;
    let mut seen_live = false;
    let mut waiter = Waiter::new("the host to take responses");
    loop {
        let ready = faults.wait(Some(NAP))?;
        seen_live |= faults.live();
        if ready == 0 {
            if seen_live && !faults.live() {
                break;
            }
            continue;
        }
        faults.drain_faults(usize::MAX, |fault| match fault {
            Ok(Fault::PageRequest(r)) if r.last => {
                answers.push(PageResponse::answering(&r, ResponseCode::Success))
            }
            Ok(_) => {}
            Err(_) => malformed += 1,
        })?;
        let mut sent = 0;
        while sent < answers.len() {
            sent += responses.stage_some(&answers[sent..])?;
            responses.publish()?;
            if sent < answers.len() {
                waiter.relax()?;
            }
        }
        groups += answers.len() as u64;
        answers.clear();
    }
    if malformed != 0 {
        return Err(BenchError::Invalid(format!(
            "{malformed} malformed fault records"
        )));
    }
    Ok(PeerStats {
        records: groups,
        sleeps: faults.sleeps(),
        kicks: responses.kicks(),
        checksum: 0,
    })
}
