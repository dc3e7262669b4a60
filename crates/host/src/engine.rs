//! One device's life in real time: its endpoint model issues DMA, translates through the
//! guest's own page tables (`NestedIommu`) or, for a VMM that keeps none, one to one through
//! its DMA mappings (`DirectIommu`), reports faults to the fault core, sleeps on the response
//! doorbell, and takes the core's responses back.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use iopf_core::{DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, DeviceSink, FaultCore};
use iopf_models::endpoint::{Endpoint, EndpointConfig, EndpointCounters, Upstream};
use iopf_models::iommu::{SpaceId, Translate, Translation};
use iopf_models::memory::{GuestMemory, MemoryMap, MemoryVerdict};
use iopf_models::nested::{DirectIommu, Directory, NestedIommu};
use iopf_models::rng::Rng;
use iopf_models::workload::Stream;
use iopf_queue::{Doorbell, SharedMemory};
use serde::Serialize;

/// What a device runs.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The endpoint's PRI configuration.
    pub endpoint: EndpointConfig,
    /// Its DMA streams.
    pub streams: Vec<Stream>,
    /// Seed of its random choices (access placement, data).
    pub seed: u64,
}

/// What the VMM has told the device so far, through vfio-user (DMA map, register writes).
#[derive(Debug, Default)]
pub struct Attachment {
    /// Guest memory given whole, read-write from guest-physical 0 (for in-process callers;
    /// used only while `mappings` is empty).
    pub memory: Option<SharedMemory>,
    /// The VMM's DMA mappings, at their guest-physical addresses (IOVA = GPA).
    pub mappings: MemoryMap,
    /// The guest's PASID directory.
    pub directory: Option<Directory>,
    /// The VMM wrote the directory register since it connected: the device translates through
    /// the guest's tables (nested), and waits for a directory after a reset. Otherwise it
    /// translates one to one through `mappings` (direct mode).
    pub nested: bool,
    /// Device resets so far (a reset takes every page of direct mode away).
    pub resets: u64,
    /// A handle on the current handler's response doorbell, to sleep on.
    pub wake: Option<Doorbell>,
    /// Bumped whenever the above change (a new VMM, say).
    pub generation: u64,
}

/// State shared between a device's engine and the connection serving it.
#[derive(Debug)]
pub struct DeviceSlot {
    /// The device.
    pub id: DeviceId,
    /// What the VMM provided.
    pub attachment: Mutex<Attachment>,
    inbox: Mutex<VecDeque<DeviceResponse>>,
    /// After a host-side unregister, no VMM may attach before this time.
    pub closed_until: Mutex<Option<Instant>>,
    /// The host has finished: a VMM that sees `LIVE` cleared should leave, not reattach.
    pub finished: std::sync::atomic::AtomicBool,
}

impl DeviceSlot {
    /// An empty slot.
    pub fn new(id: DeviceId) -> Self {
        Self {
            id,
            attachment: Mutex::new(Attachment::default()),
            inbox: Mutex::new(VecDeque::new()),
            closed_until: Mutex::new(None),
            finished: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Locks the attachment.
    pub fn attachment(&self) -> std::sync::MutexGuard<'_, Attachment> {
        self.attachment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The core delivers each response into its device's inbox; the engine takes it from there.
#[derive(Debug, Default)]
pub struct SlotSink {
    slots: Mutex<BTreeMap<DeviceId, Arc<DeviceSlot>>>,
}

impl SlotSink {
    /// Routes responses for `slot.id` to `slot`.
    pub fn add(&self, slot: Arc<DeviceSlot>) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(slot.id, slot);
    }
}

impl DeviceSink for SlotSink {
    fn page_response(&self, device: DeviceId, response: DeviceResponse) {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&device)
            .cloned();
        if let Some(slot) = slot {
            slot.inbox
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back(response);
        }
    }
}

/// What a device's run did.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    /// The device.
    pub device: u32,
    /// The endpoint's counters.
    pub endpoint: EndpointCounters,
    /// Guest memory against what DMA wrote (every guest memory the device was given).
    pub memory: MemoryVerdict,
    /// Page table walks that met malformed guest tables.
    pub malformed_walks: u64,
    /// Page request round trips (group sent to response received), nanoseconds.
    #[serde(skip)]
    pub latency: Histogram<u64>,
    /// Wall time of the run.
    pub elapsed_ns: u64,
    /// Calls into the fault core or the doorbell that failed (each logged; must stay 0).
    pub errors: u64,
}

/// Counts and logs a failed step of the engine's loop. The loop goes on: the fault core
/// answers what a failed step leaves pending, and the run reports `errors` as a failure.
fn failed<T, E: std::fmt::Display>(errors: &mut u64, step: &str, result: Result<T, E>) {
    if let Err(e) = result {
        *errors += 1;
        tracing::error!(error = %e, "device engine: cannot {step}");
    }
}

/// Progress a watcher can read while the engine runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Accesses ended (completed or failed).
    pub accesses_done: std::sync::atomic::AtomicU64,
    /// Groups answered.
    pub groups_answered: std::sync::atomic::AtomicU64,
    /// Page request round trips so far, for a watcher (`crate::metrics`).
    pub latency: crate::metrics::LatencyBuckets,
}

/// Another mapping of guest memory given whole (`Attachment::memory`).
fn view(memory: &SharedMemory) -> Option<SharedMemory> {
    let fd = memory.fd().try_clone_to_owned().ok()?;
    SharedMemory::attach(fd, memory.len()).ok()
}

/// The regions the device may reach now: the VMM's DMA mappings, or guest memory given whole
/// (reusing `current`'s mapping of the same file).
fn desired_map(attachment: &Attachment, current: &MemoryMap) -> MemoryMap {
    if !attachment.mappings.is_empty() {
        return attachment.mappings.clone();
    }
    let Some(shared) = &attachment.memory else {
        return MemoryMap::new();
    };
    match current.regions() {
        [r] if r.gpa == 0 && r.memory.len() == shared.len() && r.memory.same_file(shared) => {
            current.clone()
        }
        _ => view(shared).map_or_else(MemoryMap::new, MemoryMap::whole),
    }
}

/// How long a device given DMA mappings and no PASID directory waits before it starts in
/// direct mode: a VMM that keeps page tables writes its directory right after mapping its
/// memory, and the device must not take its first accesses for direct ones.
pub const DIRECT_SETTLE: Duration = Duration::from_millis(250);

/// The device's IOMMU in its current mode.
#[derive(Debug)]
enum Mmu {
    /// Through the guest's tables, then the mappings.
    Nested(NestedIommu),
    /// One to one through the mappings, pages present once a page request was answered.
    Direct(DirectIommu),
}

impl Translate for Mmu {
    fn translate(&mut self, space: SpaceId, iova: u64, access: iopf_abi::Perm) -> Translation {
        match self {
            Mmu::Nested(n) => n.translate(space, iova, access),
            Mmu::Direct(d) => d.translate(space, iova, access),
        }
    }
}

/// In rounds ([`run_until`]), how far a stream may fall behind its rate before it forgets
/// the accesses it owes.
const ROUND_SLACK: Duration = Duration::from_millis(10);

/// In rounds, the most accesses a device keeps queued or in flight.
const ROUND_BACKLOG: u64 = 1024;

/// Runs the device's workload to its end: every access completed or failed, nothing in flight.
/// `stop` ends the run early.
pub fn run(
    core: &FaultCore,
    slot: &DeviceSlot,
    workload: &Workload,
    progress: &Progress,
    stop: &std::sync::atomic::AtomicBool,
) -> EngineReport {
    run_until(core, slot, workload, progress, stop, None)
}

/// Like [`run`], but with `drain` the workload runs in rounds: each stream starts over (a new
/// round, its random choices going on) when it has issued its accesses, until `drain` is set.
/// Then the device issues nothing more, and the run ends once nothing is in flight.
pub fn run_until(
    core: &FaultCore,
    slot: &DeviceSlot,
    workload: &Workload,
    progress: &Progress,
    stop: &std::sync::atomic::AtomicBool,
    drain: Option<&std::sync::atomic::AtomicBool>,
) -> EngineReport {
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    let mut endpoint = Endpoint::new(slot.id.0, workload.endpoint);
    let mut rng = Rng::new(workload.seed);
    let mut issued = vec![0u32; workload.streams.len()];
    let mut next_issue = vec![started; workload.streams.len()];
    let mut next_id = 0u64;
    let mut generation = u64::MAX;
    // The walker of the current attachment, and the guest memory DMA writes with its shadow.
    // The memory outlives a VMM's connection: if the VMM comes back with the same memfd (a new
    // handler life), its shadow still holds what DMA wrote before.
    let mut iommu: Option<NestedIommu> = None;
    // Direct mode's IOMMU lives across attachment changes: its pages stay present until their
    // mapping goes or the device is reset. It runs once `direct_from` has passed.
    let mut direct: Option<DirectIommu> = None;
    let mut direct_from: Option<Instant> = None;
    let mut resets = 0;
    let mut map = MemoryMap::new();
    let mut guest: Option<GuestMemory> = None;
    let mut wake: Option<Doorbell> = None;
    let mut verdict = MemoryVerdict::default();
    let mut malformed = 0;
    let mut errors = 0;
    let mut latency =
        Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"));
    let mut sent_at: BTreeMap<u16, Instant> = BTreeMap::new();
    let mut upstream = Vec::new();
    let mut faults = Vec::new();
    // Accesses ended (completed or failed) at the end of the previous iteration.
    let mut ended_before = 0;
    loop {
        // Whether the endpoint stopped for its budget with accesses it could still run.
        let mut more = false;
        if stop.load(Relaxed) {
            break;
        }
        // Pick up new guest memory or a directory (a VMM attached, mapped, or a new one did).
        {
            let attachment = slot.attachment();
            if attachment.generation != generation {
                generation = attachment.generation;
                wake = attachment.wake.as_ref().and_then(|d| d.try_clone().ok());
                if let Some(old) = iommu.take() {
                    malformed += old.malformed;
                }
                let next = desired_map(&attachment, &map);
                // Direct mode forgets the pages of every mapping that went away.
                if let Some(d) = direct.as_mut() {
                    for r in map.regions() {
                        let kept = next.regions().iter().any(|n| {
                            n.gpa == r.gpa && std::sync::Arc::ptr_eq(&n.memory, &r.memory)
                        });
                        if !kept {
                            d.unmap(r.gpa, r.memory.len());
                        }
                    }
                    d.set_map(next.clone());
                    if attachment.resets != resets {
                        d.reset();
                    }
                }
                resets = attachment.resets;
                map = next;
                match guest.as_mut() {
                    Some(g) => {
                        if let Some(v) = g.set_map(map.clone()) {
                            add_verdict(&mut verdict, &v);
                        }
                    }
                    None => guest = GuestMemory::from_map(map.clone()),
                }
                direct_from = None;
                if !map.is_empty() {
                    // A directory set by an in-process caller counts as written.
                    if attachment.nested || attachment.directory.is_some() {
                        if let Some(directory) = attachment.directory {
                            let mut walk = NestedIommu::over(map.clone());
                            walk.set_directory(slot.id.0, directory);
                            iommu = Some(walk);
                        }
                    } else {
                        direct_from = Some(Instant::now() + DIRECT_SETTLE);
                        direct.get_or_insert_with(|| DirectIommu::new(slot.id.0, map.clone()));
                    }
                }
            }
        }
        let now = Instant::now();
        let mut mmu = match (iommu.take(), direct_from) {
            (Some(n), _) => Some(Mmu::Nested(n)),
            (None, Some(from)) if now >= from => direct.take().map(Mmu::Direct),
            _ => None,
        };
        // The device runs while a handler is registered and the VMM has given it memory and a
        // directory. It does not look at the VMM's `abi` (a device cannot): the fault core
        // answers its page requests `Invalid` (`not_attached`) while either region lacks it.
        let ready =
            mmu.is_some() && guest.is_some() && core.is_registered(slot.id).unwrap_or(false);
        let draining = drain.is_some_and(|d| d.load(Relaxed));
        // In rounds, a device that cannot keep up with its streams' rates keeps a bounded
        // backlog: it issues nothing more while this many accesses wait or are in flight.
        let mut room = match drain {
            Some(_) => ROUND_BACKLOG.saturating_sub(outstanding(&endpoint.counters())),
            None => u64::MAX,
        };
        if ready && !draining {
            for (i, stream) in workload.streams.iter().enumerate() {
                if drain.is_some() {
                    if issued[i] >= stream.accesses {
                        // Rounds: this stream starts over.
                        issued[i] = 0;
                    }
                    // A device that runs for hours and cannot keep up with its stream's rate
                    // (or waited for a VMM) forgets what it owes beyond a short slack, so
                    // the queue of accesses stays bounded.
                    if let Some(floor) = now.checked_sub(ROUND_SLACK) {
                        next_issue[i] = next_issue[i].max(floor);
                    }
                }
                while issued[i] < stream.accesses && next_issue[i] <= now && room > 0 {
                    room -= 1;
                    next_id += 1;
                    endpoint.submit(stream.access(issued[i], next_id, &mut rng));
                    issued[i] += 1;
                    next_issue[i] += Duration::from_nanos(stream.interval_ns);
                }
            }
        }
        // Responses first: they free credits and PRG indices.
        let responses: Vec<DeviceResponse> = slot
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for response in &responses {
            if let Some(at) = sent_at.remove(&response.grpid.get()) {
                let ns = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                // The histogram resizes itself: recording fails only if it cannot grow.
                failed(&mut errors, "record a round trip", latency.record(ns));
                progress.latency.record(ns);
            }
            if let Some(Mmu::Direct(d)) = mmu.as_mut() {
                d.page_response(response.pasid, response.grpid, response.code);
            }
            endpoint.on_response(response.pasid, response.grpid, response.code);
        }
        progress
            .groups_answered
            .fetch_add(responses.len() as u64, Relaxed);
        // A device reset may have taken the directory away since the top of the loop, and its
        // responses (just taken) freed credits: step only through the tables still current.
        let current = ready && slot.attachment().generation == generation;
        if let (Some(mmu), Some(memory), true) = (mmu.as_mut(), guest.as_mut(), current) {
            upstream.clear();
            more = endpoint.step_some(mmu, memory, &mut upstream, STEP_BUDGET);
            faults.clear();
            for u in &upstream {
                faults.push(match *u {
                    Upstream::PageRequest(r) => {
                        if let Mmu::Direct(d) = mmu {
                            d.page_requested(r.pasid, r.grpid, r.addr.get());
                        }
                        if r.last {
                            sent_at.insert(r.grpid.get(), Instant::now());
                        }
                        DeviceFault::PageRequest(DevicePageRequest {
                            pasid: r.pasid,
                            grpid: r.grpid,
                            perm: r.perm,
                            addr: r.addr,
                            last: r.last,
                            private_data: None,
                        })
                    }
                    Upstream::Unrecoverable(f) => DeviceFault::Unrecoverable(f),
                });
            }
            if !faults.is_empty() {
                failed(
                    &mut errors,
                    "report faults",
                    core.report_batch(slot.id, &faults),
                );
            }
        }
        match mmu {
            Some(Mmu::Nested(n)) => iommu = Some(n),
            Some(Mmu::Direct(d)) => direct = Some(d),
            None => {}
        }
        let c = endpoint.counters();
        let ended = c.accesses - outstanding(&c);
        progress.accesses_done.store(ended, Relaxed);
        // Whether this iteration moved anything: a response taken, a fault sent, an access
        // ended. A device behind its streams' schedule but stalled (every credit out, waiting
        // for page responses) cannot move until a response comes: it must sleep on the
        // response doorbell then, not spin, or it takes the CPU the VMM needs to answer.
        let moved = more || !responses.is_empty() || !upstream.is_empty() || ended != ended_before;
        ended_before = ended;
        let all_issued = match drain {
            Some(drain) => drain.load(Relaxed),
            None => issued
                .iter()
                .zip(&workload.streams)
                .all(|(n, s)| *n >= s.accesses),
        };
        if all_issued && endpoint.idle() {
            break;
        }
        failed(
            &mut errors,
            "process responses",
            core.process_responses(slot.id),
        );
        core.expire();
        if !slot
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
        {
            continue;
        }
        // Nothing to do right now: sleep until a response, the next access, or a short tick.
        let next = next_issue
            .iter()
            .zip(issued.iter().zip(&workload.streams))
            .filter(|(_, (n, s))| {
                !draining && s.accesses > 0 && (drain.is_some() || **n < s.accesses)
            })
            .map(|(t, _)| *t)
            .min();
        let tick = Duration::from_millis(if ready { 2 } else { 10 });
        let timeout = match next {
            // Queued accesses are runnable right now: no sleep.
            _ if more => Duration::ZERO,
            // Stalled: only a response (which rings the doorbell) or the tick can change that.
            Some(_) if !moved => tick,
            Some(t) => t.saturating_duration_since(Instant::now()).min(tick),
            None => tick,
        };
        if !timeout.is_zero() {
            match &wake {
                Some(wake) if core.prepare_to_sleep(slot.id).unwrap_or(false) => {
                    failed(
                        &mut errors,
                        "wait on the response doorbell",
                        wake.wait(Some(timeout)),
                    );
                }
                Some(_) => {}
                None => std::thread::sleep(timeout),
            }
        }
        failed(&mut errors, "leave the sleep", core.woke(slot.id));
    }
    if let Some(memory) = guest.take() {
        add_verdict(&mut verdict, &memory.verify());
    }
    if let Some(walk) = iommu.take() {
        malformed += walk.malformed;
    }
    EngineReport {
        device: slot.id.0,
        endpoint: endpoint.counters(),
        memory: verdict,
        malformed_walks: malformed,
        latency,
        elapsed_ns: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        errors,
    }
}

/// Queued accesses the endpoint handles per turn of the engine's loop. A device with thousands
/// of accesses queued (behind its schedule after a stall, or when its VMM attaches late) would
/// otherwise do all their DMA, milliseconds of it, before it looks at the page responses that
/// arrived meanwhile, and every group's measured latency would include that.
const STEP_BUDGET: usize = 32;

/// Accesses submitted and not ended yet (queued or waiting for a page response).
fn outstanding(c: &EndpointCounters) -> u64 {
    let failed = c.failed_invalid
        + c.failed_no_pri
        + c.failed_retries
        + c.failed_too_large
        + c.failed_halted
        + c.failed_stage2;
    c.accesses.saturating_sub(c.completed + failed)
}

fn add_verdict(total: &mut MemoryVerdict, v: &MemoryVerdict) {
    total.bytes_verified += v.bytes_verified;
    total.bytes_mismatched += v.bytes_mismatched;
    total.read_mismatches += v.read_mismatches;
}
