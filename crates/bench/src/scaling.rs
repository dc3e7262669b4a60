//! Cost per fault as the fault core's tables grow (`docs/DESIGN.md` §4.7: O(1) in devices,
//! PASIDs and pending groups), in one process: the real core, in-process queues over `HeapMemory`, and an
//! in-process VMM that drains each fault queue and answers through its response queue.
//!
//! One step reports [`GROUPS_PER_STEP`] two-page groups to one device in one `report_batch`
//! (the first pages of all of them, then their `LAST_PAGE` requests, so the partial-group table
//! holds [`GROUPS_PER_STEP`] groups keyed by PASID and PRG index), lets the VMM drain them and
//! answer the oldest groups it holds beyond the pending target, and lets the core take the
//! responses (`process_responses`). Devices are served round robin; the cost is the wall time
//! of the timed steps divided by the groups they reported.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use iopf_abi::{
    Fault, PageAddr, PageResponse, Pasid, Perm, PrgIndex, QueueGeometry, QueueKind, ResponseCode,
};
use iopf_core::{
    DeviceConfig, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, DeviceSink, FaultCore,
    MonotonicClock, QueueHandler, ResponseSource,
};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, HeapMemory, RegionAttachError,
    ResponseQueueConsumer, ResponseQueueProducer,
};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::error::{BenchError, Result};

/// Groups reported per `report_batch`.
pub(crate) const GROUPS_PER_STEP: u64 = 16;
/// Entries per in-process queue (a step needs `2 * GROUPS_PER_STEP` fault slots).
const ENTRIES: u32 = 256;

type Memory = Arc<HeapMemory>;

/// Counts what devices are answered, by whom.
#[derive(Debug, Default)]
struct Sink {
    guest: AtomicU64,
    auto: AtomicU64,
}

impl DeviceSink for Sink {
    fn page_response(&self, _device: DeviceId, response: DeviceResponse) {
        match response.source {
            ResponseSource::Guest => self.guest.fetch_add(1, Ordering::Relaxed),
            ResponseSource::Auto(_) => self.auto.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The VMM's ends of one device's queues, and the answers it holds back.
struct Vmm {
    faults: FaultQueueConsumer<Memory>,
    responses: ResponseQueueProducer<Memory>,
    held: VecDeque<PageResponse>,
}

/// One configuration: `devices` devices, `pasids` PASIDs in use per device, and `pending`
/// groups held unanswered by each device's VMM.
struct Rig {
    core: FaultCore,
    sink: Arc<Sink>,
    vmms: Vec<Vmm>,
    pasids: u64,
    pending: usize,
    seq: u64,
    batch: Vec<DeviceFault>,
}

fn memory(kind: QueueKind) -> Result<Memory> {
    let geometry = QueueGeometry::new(kind, ENTRIES).map_err(RegionAttachError::from)?;
    Ok(Arc::new(HeapMemory::new(geometry)))
}

fn invalid(e: impl std::fmt::Display) -> BenchError {
    BenchError::Invalid(format!("scaling: {e}"))
}

impl Rig {
    fn new(devices: usize, pasids: u64, pending: usize) -> Result<Self> {
        // Two eventfds per device (the in-process consumers' doorbells).
        raise_fd_limit(2 * devices as u64 + 256);
        let core = FaultCore::new(Arc::new(MonotonicClock::new()));
        let sink = Arc::new(Sink::default());
        let config = DeviceConfig {
            max_pending_groups: pending + 4 * GROUPS_PER_STEP as usize + 64,
            max_partial_groups: 4 * GROUPS_PER_STEP as usize,
            ..DeviceConfig::default()
        };
        let mut vmms = Vec::with_capacity(devices);
        for d in 0..devices {
            let id = DeviceId(d as u32);
            let (faults, responses) = (memory(QueueKind::Fault)?, memory(QueueKind::Response)?);
            let doorbell = || Doorbell::new().map_err(BenchError::io("eventfd"));
            let handler = QueueHandler {
                faults: FaultQueueProducer::new(faults.clone()),
                responses: ResponseQueueConsumer::new(responses.clone(), doorbell()?),
            };
            vmms.push(Vmm {
                faults: FaultQueueConsumer::new(faults, doorbell()?),
                responses: ResponseQueueProducer::new(responses, None),
                held: VecDeque::with_capacity(pending + 2 * GROUPS_PER_STEP as usize),
            });
            core.add_device(id, config, sink.clone())?;
            core.register(id, Box::new(handler))?;
        }
        Ok(Self {
            core,
            sink,
            vmms,
            pasids: pasids.max(1),
            pending,
            seq: 0,
            batch: Vec::with_capacity(2 * GROUPS_PER_STEP as usize),
        })
    }

    fn request(&self, seq: u64, last: bool) -> Result<DeviceFault> {
        Ok(DeviceFault::PageRequest(DevicePageRequest {
            pasid: Some(Pasid::new(1 + (seq % self.pasids) as u32).map_err(invalid)?),
            grpid: PrgIndex::new((seq % 512) as u32).map_err(invalid)?,
            perm: Perm::READ,
            addr: PageAddr::containing((seq << 13) | u64::from(last) << 12),
            last,
            private_data: None,
        }))
    }

    /// One step for device `d`.
    fn step(&mut self, d: usize) -> Result<()> {
        let id = DeviceId(d as u32);
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        for last in [false, true] {
            for g in 0..GROUPS_PER_STEP {
                batch.push(self.request(self.seq + g, last)?);
            }
        }
        self.seq += GROUPS_PER_STEP;
        self.core.report_batch(id, &batch)?;
        self.batch = batch;
        let vmm = self
            .vmms
            .get_mut(d)
            .ok_or_else(|| invalid("no such device"))?;
        let mut malformed = 0;
        let held = &mut vmm.held;
        vmm.faults.drain_faults(usize::MAX, |fault| match fault {
            Ok(Fault::PageRequest(r)) if r.last => {
                held.push_back(PageResponse::answering(&r, ResponseCode::Success))
            }
            Ok(_) => {}
            Err(_) => malformed += 1,
        })?;
        if malformed > 0 {
            return Err(invalid(format!("{malformed} malformed fault records")));
        }
        while vmm.held.len() > self.pending {
            let Some(answer) = vmm.held.pop_front() else {
                break;
            };
            vmm.responses.stage(&answer)?;
        }
        vmm.responses.publish()?;
        self.core.process_responses(id)?;
        Ok(())
    }

    /// Brings every device's VMM to its pending target (and touches every device once).
    fn fill(&mut self) -> Result<()> {
        for d in 0..self.vmms.len() {
            self.step(d)?;
            while self.vmms[d].held.len() < self.pending {
                self.step(d)?;
            }
        }
        Ok(())
    }

    /// Times `steps` steps, devices round robin; nanoseconds per group.
    fn measure(&mut self, steps: u64) -> Result<f64> {
        let devices = self.vmms.len();
        let start = Instant::now();
        for s in 0..steps {
            self.step((s % devices as u64) as usize)?;
        }
        let elapsed = start.elapsed();
        if self.sink.auto.load(Ordering::Relaxed) != 0 {
            return Err(invalid(format!(
                "{} groups answered by the host itself (limits too small?)",
                self.sink.auto.load(Ordering::Relaxed)
            )));
        }
        Ok(elapsed.as_nanos() as f64 / (steps.max(1) * GROUPS_PER_STEP) as f64)
    }
}

/// Best effort: lets this process hold `needed` fds if the hard limit allows.
pub(crate) fn raise_fd_limit(needed: u64) {
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|c| c < needed) {
        let raised = Rlimit {
            current: Some(limit.maximum.map_or(needed, |m| m.min(needed))),
            maximum: limit.maximum,
        };
        // Best effort: if the limit cannot be raised, the figure's fd allocation fails later
        // with its own error, which names the step.
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

/// Nanoseconds per reported group with `devices` devices, `pasids` PASIDs per device and
/// `pending` groups pending per device, over `groups` timed groups (at least one step per
/// device, after a warm-up step per device).
pub(crate) fn cost(devices: usize, pasids: u64, pending: usize, groups: u64) -> Result<f64> {
    let mut rig = Rig::new(devices.max(1), pasids, pending)?;
    rig.fill()?;
    let steps = (groups / GROUPS_PER_STEP).max(devices as u64).max(1);
    let warm = (steps / 10).max(1);
    rig.measure(warm)?;
    rig.measure(steps)
}
