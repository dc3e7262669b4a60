//! One device's life in real time: its endpoint model issues DMA, translates through the
//! guest's own page tables (`NestedIommu`) or, for a VMM that keeps none, one to one through
//! its DMA mappings (`DirectIommu`), reports faults to the fault core, sleeps on the response
//! doorbell, and takes the core's responses back.
//!
//! The engine moves in turns ([`Engine::turn`]); between two turns it waits for its response
//! doorbell or a deadline. [`run`] and [`run_until`] wait on the calling thread; a host serving
//! many devices registers an [`EngineSource`] per device with its reactor instead, and the
//! reactor's few threads run every device's turns.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use iopf_core::{DeviceFault, DeviceId, DeviceResponse, FaultCore};
use iopf_host::FaultPort;
use iopf_host::reactor::{Context, Handler, Next, Ready, Wait};
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
    /// The device on the fault core: the engine reports through it and takes its answers.
    pub port: FaultPort,
    /// What the VMM provided.
    pub attachment: Mutex<Attachment>,
    /// After a host-side unregister, no VMM may attach before this time.
    pub closed_until: Mutex<Option<Instant>>,
    /// The host has finished: a VMM that sees `LIVE` cleared should leave, not reattach.
    pub finished: std::sync::atomic::AtomicBool,
}

impl DeviceSlot {
    /// An empty slot for the device `port` stands for.
    pub fn new(port: FaultPort) -> Self {
        Self {
            id: port.id(),
            port,
            attachment: Mutex::new(Attachment::default()),
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
    /// The same round trips summed up, in microseconds (for a report that shows each device).
    pub round_trip_us: RoundTrips,
    /// Wall time of the run.
    pub elapsed_ns: u64,
    /// Calls into the fault core or the doorbell that failed (each logged; must stay 0).
    pub errors: u64,
}

/// A device's page request round trips summed up, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RoundTrips {
    /// Round trips measured.
    pub samples: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest.
    pub max: f64,
}

impl RoundTrips {
    fn of(latency: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            samples: latency.len(),
            p50: us(latency.value_at_quantile(0.5)),
            p99: us(latency.value_at_quantile(0.99)),
            max: us(latency.max()),
        }
    }
}

/// Counts and logs a failed step of the engine's loop. The loop goes on: the fault core
/// answers what a failed step leaves pending, and the run reports `errors` as a failure.
fn failed<T, E: std::fmt::Display>(errors: &mut u64, step: &str, result: Result<T, E>) {
    if let Err(e) = result {
        *errors += 1;
        tracing::error!(error = %e, "device engine: cannot {step}");
    }
}

pub use iopf_host::metrics::Progress;

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

/// Runs the device's workload to its end on the calling thread: every access completed or
/// failed, nothing in flight. `stop` ends the run early. `progress[index]` is the device's.
pub fn run(
    slot: &Arc<DeviceSlot>,
    workload: &Workload,
    progress: &Arc<Vec<Progress>>,
    index: usize,
    stop: &AtomicBool,
) -> EngineReport {
    run_until(slot, workload, progress, index, stop, None)
}

/// Like [`run`], but with `drain` the workload runs in rounds: each stream starts over (a new
/// round, its random choices going on) when it has issued its accesses, until `drain` is set.
/// Then the device issues nothing more, and the run ends once nothing is in flight.
pub fn run_until(
    slot: &Arc<DeviceSlot>,
    workload: &Workload,
    progress: &Arc<Vec<Progress>>,
    index: usize,
    stop: &AtomicBool,
    drain: Option<Arc<AtomicBool>>,
) -> EngineReport {
    let mut engine = Engine::new(
        slot.clone(),
        workload.clone(),
        progress.clone(),
        index,
        drain,
    );
    let mut retired = Vec::new();
    while !stop.load(Relaxed) {
        match engine.turn(&mut retired) {
            Step::Done => break,
            Step::Again => {}
            Step::Sleep { until, doorbell } => {
                let timeout = until.saturating_duration_since(Instant::now());
                match engine.wake.as_ref().filter(|_| doorbell) {
                    Some(wake) => failed(
                        &mut engine.errors,
                        "wait on the response doorbell",
                        wake.wait(Some(timeout)),
                    ),
                    None => std::thread::sleep(timeout),
                }
                engine.woke();
            }
        }
        // Doorbells of past handler lives: nothing waits on them any more.
        retired.clear();
    }
    engine.report()
}

/// What an engine's turn leaves to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The workload is done: every access ended, nothing in flight.
    Done,
    /// Turn again at once.
    Again,
    /// Nothing to do before `until`, unless the response doorbell rings (`doorbell`: the VMM
    /// was asked to ring it); then call [`Engine::woke`] and turn again.
    Sleep {
        /// When to turn again at the latest.
        until: Instant,
        /// Whether the response doorbell may end the sleep early.
        doorbell: bool,
    },
}

/// The longest an engine sleeping on its response doorbell waits for it in a reactor: the
/// doorbell wakes it for every response, so the deadline only bounds how late it notices a
/// response timeout or a new VMM (a thread per device could afford a shorter tick; a thousand
/// devices on two CPUs cannot).
pub const REACTOR_DOORBELL_TICK: Duration = Duration::from_millis(20);

/// The longest an engine waits in a reactor while its device is not ready (no VMM, no
/// memory, or settling): it looks for a VMM's attachment this often.
pub const REACTOR_IDLE_TICK: Duration = Duration::from_millis(20);

/// A device's engine as a reactor source: woken by its response doorbell (the fd changes with
/// each handler life) or by its deadline; at the end (workload done, or `stop` set), `done`
/// gets the report.
pub struct EngineSource {
    engine: Option<Engine>,
    stop: Arc<AtomicBool>,
    done: Option<Box<dyn FnOnce(EngineReport) + Send>>,
    /// The last turn asked the core for a wake-up ([`FaultCore::prepare_to_sleep`]): the
    /// next call withdraws it first.
    sleeping: bool,
}

impl std::fmt::Debug for EngineSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineSource")
            .field("device", &self.engine.as_ref().map(|e| e.slot.id))
            .field("sleeping", &self.sleeping)
            .finish_non_exhaustive()
    }
}

impl EngineSource {
    /// The engine of `slot`'s device running `workload` (in rounds until `drain`, if given),
    /// publishing `progress[index]`; `done` gets its report.
    pub fn new(
        slot: Arc<DeviceSlot>,
        workload: Workload,
        progress: Arc<Vec<Progress>>,
        index: usize,
        drain: Option<Arc<AtomicBool>>,
        stop: Arc<AtomicBool>,
        done: Box<dyn FnOnce(EngineReport) + Send>,
    ) -> Self {
        Self {
            engine: Some(
                Engine::new(slot, workload, progress, index, drain)
                    .with_ticks(REACTOR_DOORBELL_TICK, REACTOR_IDLE_TICK),
            ),
            stop,
            done: Some(done),
            sleeping: false,
        }
    }

    /// What to register it with: a turn at once.
    pub fn wait() -> Wait {
        Wait::at(Instant::now())
    }

    fn finish(&mut self) -> Next {
        if let (Some(engine), Some(done)) = (self.engine.take(), self.done.take()) {
            done(engine.report());
        }
        Next::Remove
    }
}

impl Handler for EngineSource {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.engine.as_ref()?.wake.as_ref().map(AsFd::as_fd)
    }

    fn on_event(&mut self, cx: &Context<'_>, _: Ready) -> Next {
        if self.stop.load(Relaxed) {
            return self.finish();
        }
        let Some(engine) = self.engine.as_mut() else {
            return Next::Remove;
        };
        if std::mem::take(&mut self.sleeping) {
            engine.woke();
        }
        // A few turns at most per call, so one busy device cannot hold a worker.
        for _ in 0..TURNS_PER_CALL {
            let mut retired = Vec::new();
            let step = engine.turn(&mut retired);
            for old in &retired {
                // The handler life of that doorbell is over: stop watching it before it
                // closes.
                cx.unwatch(old.as_fd());
            }
            match step {
                Step::Done => return self.finish(),
                Step::Again => continue,
                Step::Sleep { until, doorbell } => {
                    self.sleeping = true;
                    let wait = if doorbell {
                        Wait::readable().until(until)
                    } else {
                        Wait::at(until)
                    };
                    return Next::Wait(wait);
                }
            }
        }
        Next::Wait(Wait::at(Instant::now()))
    }

    fn on_stop(&mut self) {
        // The reactor stops: the report goes out with what was done (the source is dropped
        // next, whatever `finish` says).
        self.finish();
    }
}

/// Turns one [`EngineSource`] call runs at most before it lets other sources run.
const TURNS_PER_CALL: usize = 4;

/// A device's engine between two turns ([`Engine::turn`]).
pub struct Engine {
    core: Arc<FaultCore>,
    slot: Arc<DeviceSlot>,
    workload: Workload,
    progress: Arc<Vec<Progress>>,
    index: usize,
    drain: Option<Arc<AtomicBool>>,
    started: Instant,
    endpoint: Endpoint,
    rng: Rng,
    /// Per stream: accesses issued (in its current round).
    issued: Vec<u32>,
    /// Per stream: when its next access is due.
    next_issue: Vec<Instant>,
    next_id: u64,
    /// The attachment's generation this engine last picked up.
    generation: u64,
    /// The walker of the current attachment (nested mode).
    iommu: Option<NestedIommu>,
    /// Direct mode's IOMMU lives across attachment changes: its pages stay present until their
    /// mapping goes or the device is reset. It runs once `direct_from` has passed.
    direct: Option<DirectIommu>,
    direct_from: Option<Instant>,
    resets: u64,
    map: MemoryMap,
    /// The guest memory DMA writes, with its shadow. It outlives a VMM's connection: if the
    /// VMM comes back with the same memfd (a new handler life), its shadow still holds what DMA
    /// wrote before.
    guest: Option<GuestMemory>,
    wake: Option<Doorbell>,
    verdict: MemoryVerdict,
    malformed: u64,
    errors: u64,
    latency: Histogram<u64>,
    /// When each group in flight was sent, by PRG index.
    sent_at: BTreeMap<u16, Instant>,
    /// What the endpoint sent upstream the last time it stepped.
    upstream: Vec<Upstream>,
    faults: Vec<DeviceFault>,
    /// Accesses ended (completed or failed) at the end of the previous turn.
    ended_before: u64,
    /// The device has been ready once (its streams' schedule has started).
    ran: bool,
    /// The longest sleep while the response doorbell will wake the engine.
    doorbell_tick: Duration,
    /// The longest sleep while the device is not ready.
    idle_tick: Duration,
}

/// One turn of the engine's loop.
struct Turn {
    /// When the turn started.
    now: Instant,
    /// The device's IOMMU for the turn, if it may translate now.
    mmu: Option<Mmu>,
    /// A handler is registered and the VMM has given the device memory and a way to translate.
    ready: bool,
    /// `drain` was set when the turn started.
    draining: bool,
    /// The endpoint stopped for its budget with accesses it could still run.
    more: bool,
    /// Responses taken this turn.
    answered: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.slot.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// The engine of `slot`'s device running `workload` (in rounds until `drain`, if given),
    /// publishing `progress[index]`.
    pub fn new(
        slot: Arc<DeviceSlot>,
        workload: Workload,
        progress: Arc<Vec<Progress>>,
        index: usize,
        drain: Option<Arc<AtomicBool>>,
    ) -> Self {
        let started = Instant::now();
        Self {
            core: slot.port.core().clone(),
            endpoint: Endpoint::new(slot.id.0, workload.endpoint),
            rng: Rng::new(workload.seed),
            issued: vec![0; workload.streams.len()],
            next_issue: vec![started; workload.streams.len()],
            slot,
            workload,
            progress,
            index,
            drain,
            started,
            next_id: 0,
            generation: u64::MAX,
            iommu: None,
            direct: None,
            direct_from: None,
            resets: 0,
            map: MemoryMap::new(),
            guest: None,
            wake: None,
            verdict: MemoryVerdict::default(),
            malformed: 0,
            errors: 0,
            latency: Histogram::new(3)
                .unwrap_or_else(|_| unreachable!("3 significant digits is valid")),
            sent_at: BTreeMap::new(),
            upstream: Vec::new(),
            faults: Vec::new(),
            ended_before: 0,
            ran: false,
            doorbell_tick: Duration::from_millis(2),
            idle_tick: Duration::from_millis(10),
        }
    }

    /// Sets the longest sleeps: `doorbell` while the response doorbell will wake the engine
    /// (it then only bounds how late a response timeout or a VMM's change is noticed), and
    /// `idle` while the device is not ready. The defaults suit a thread per device: 2 ms and
    /// 10 ms.
    pub fn with_ticks(mut self, doorbell: Duration, idle: Duration) -> Self {
        self.doorbell_tick = doorbell;
        self.idle_tick = idle;
        self
    }

    /// The device's progress, which watchers read.
    fn progress(&self) -> &Progress {
        &self.progress[self.index]
    }

    /// One turn: picks up what the VMM changed, issues the accesses due, takes the responses,
    /// steps the endpoint and reports its faults, lets the core take the VMM's answers, and
    /// says what next. The doorbells of handler lives that ended are put in `retired` (a
    /// caller that watches the doorbell stops watching them before they close).
    pub fn turn(&mut self, retired: &mut Vec<Doorbell>) -> Step {
        retired.extend(self.attach());
        let mut turn = self.begin();
        if turn.ready && !turn.draining {
            self.issue(turn.now);
        }
        // Responses first: they free credits and PRG indices.
        self.take_responses(&mut turn);
        self.step(&mut turn);
        self.put_back(turn.mmu.take());
        let moved = self.moved(&turn);
        if self.done() {
            return Step::Done;
        }
        if self.serve_core() {
            // More responses came meanwhile: take them at once.
            return Step::Again;
        }
        let timeout = self.timeout(&turn, moved);
        let until = Instant::now() + timeout;
        if timeout.is_zero() {
            self.woke();
            return Step::Again;
        }
        let registered = self.core.is_registered(self.slot.id).unwrap_or(false);
        match &self.wake {
            Some(_) if self.core.prepare_to_sleep(self.slot.id).unwrap_or(false) => Step::Sleep {
                until,
                doorbell: true,
            },
            // Answers wait in the response ring: no sleep, unless the turn moved nothing (the
            // core is not taking them: the VMM has detached and not hung up yet), where the
            // doorbell tick without a doorbell keeps the device from spinning.
            Some(_) if registered && moved => {
                self.woke();
                Step::Again
            }
            Some(_) if registered => {
                self.woke();
                Step::Sleep {
                    until: Instant::now() + timeout.min(Duration::from_millis(2)),
                    doorbell: false,
                }
            }
            // No handler (the VMM is gone) or no doorbell: the deadline only.
            _ => Step::Sleep {
                until,
                doorbell: false,
            },
        }
    }

    /// Leaves a sleep ([`Step::Sleep`]): drains the doorbell and withdraws the core's wake-up
    /// request.
    pub fn woke(&mut self) {
        if let Some(wake) = &self.wake {
            let drained = wake.drain();
            failed(&mut self.errors, "drain the response doorbell", drained);
        }
        let result = self.core.woke(self.slot.id);
        failed(&mut self.errors, "leave the sleep", result);
    }

    /// Picks up new guest memory or a directory (a VMM attached, mapped, or a new one did).
    /// Returns the doorbell of the handler life that ended, if it changed.
    fn attach(&mut self) -> Option<Doorbell> {
        let slot = self.slot.clone();
        let attachment = slot.attachment();
        if attachment.generation == self.generation {
            return None;
        }
        self.generation = attachment.generation;
        let retired = std::mem::replace(
            &mut self.wake,
            attachment.wake.as_ref().and_then(|d| d.try_clone().ok()),
        );
        if let Some(old) = self.iommu.take() {
            self.malformed += old.malformed;
        }
        let next = desired_map(&attachment, &self.map);
        self.remap(next, &attachment);
        self.direct_from = None;
        if !self.map.is_empty() {
            self.choose_mode(&attachment);
        }
        retired
    }

    /// Moves to the regions `next`: direct mode forgets the pages of every mapping that went
    /// away (and all of them on a reset), and guest memory follows.
    fn remap(&mut self, next: MemoryMap, attachment: &Attachment) {
        if let Some(d) = self.direct.as_mut() {
            for r in self.map.regions() {
                let kept = next
                    .regions()
                    .iter()
                    .any(|n| n.gpa == r.gpa && Arc::ptr_eq(&n.memory, &r.memory));
                if !kept {
                    d.unmap(r.gpa, r.memory.len());
                }
            }
            d.set_map(next.clone());
            if attachment.resets != self.resets {
                d.reset();
            }
        }
        self.resets = attachment.resets;
        self.map = next;
        match self.guest.as_mut() {
            Some(g) => {
                if let Some(v) = g.set_map(self.map.clone()) {
                    add_verdict(&mut self.verdict, &v);
                }
            }
            None => self.guest = GuestMemory::from_map(self.map.clone()),
        }
    }

    /// Translates through the guest's tables if the VMM keeps them, else (after
    /// [`DIRECT_SETTLE`]) one to one through the mappings.
    fn choose_mode(&mut self, attachment: &Attachment) {
        // A directory set by an in-process caller counts as written.
        if attachment.nested || attachment.directory.is_some() {
            if let Some(directory) = attachment.directory {
                let mut walk = NestedIommu::over(self.map.clone());
                walk.set_directory(self.slot.id.0, directory);
                self.iommu = Some(walk);
            }
        } else {
            self.direct_from = Some(Instant::now() + DIRECT_SETTLE);
            let (id, map) = (self.slot.id.0, &self.map);
            self.direct
                .get_or_insert_with(|| DirectIommu::new(id, map.clone()));
        }
    }

    /// Starts a turn: takes the IOMMU of the current mode, and sees whether the device runs.
    fn begin(&mut self) -> Turn {
        let now = Instant::now();
        let mmu = match (self.iommu.take(), self.direct_from) {
            (Some(n), _) => Some(Mmu::Nested(n)),
            (None, Some(from)) if now >= from => self.direct.take().map(Mmu::Direct),
            _ => None,
        };
        // The device runs while a handler is registered and the VMM has given it memory and a
        // directory. It does not look at the VMM's `abi` (a device cannot): the fault core
        // answers its page requests `Invalid` (`not_attached`) while either region lacks it.
        let ready = mmu.is_some()
            && self.guest.is_some()
            && self.core.is_registered(self.slot.id).unwrap_or(false);
        if ready && !self.ran {
            // The streams' schedule starts when the device can first run, not when the engine
            // was created: a device whose VMM attaches late (the thousandth connection of a
            // VMM) does not owe, all at once, every access of its wait.
            self.ran = true;
            for next in &mut self.next_issue {
                *next = (*next).max(now);
            }
        }
        Turn {
            now,
            mmu,
            ready,
            draining: self.drain.as_ref().is_some_and(|d| d.load(Relaxed)),
            more: false,
            answered: 0,
        }
    }

    /// Submits the accesses the streams' schedule owes by `now`.
    fn issue(&mut self, now: Instant) {
        // In rounds, a device that cannot keep up with its streams' rates keeps a bounded
        // backlog: it issues nothing more while this many accesses wait or are in flight.
        let mut room = match &self.drain {
            Some(_) => ROUND_BACKLOG.saturating_sub(outstanding(&self.endpoint.counters())),
            None => u64::MAX,
        };
        let streams = std::mem::take(&mut self.workload.streams);
        for (i, stream) in streams.iter().enumerate() {
            if self.drain.is_some() {
                self.next_round(i, stream, now);
            }
            while self.issued[i] < stream.accesses && self.next_issue[i] <= now && room > 0 {
                room -= 1;
                self.next_id += 1;
                let access = stream.access(self.issued[i], self.next_id, &mut self.rng);
                self.endpoint.submit(access);
                self.issued[i] += 1;
                self.next_issue[i] += Duration::from_nanos(stream.interval_ns);
            }
        }
        self.workload.streams = streams;
    }

    /// In rounds: starts stream `i` over once it has issued its accesses, and forgets what it
    /// owes beyond a short slack.
    fn next_round(&mut self, i: usize, stream: &Stream, now: Instant) {
        if self.issued[i] >= stream.accesses {
            self.issued[i] = 0;
        }
        // A device that runs for hours and cannot keep up with its stream's rate (or waited
        // for a VMM) forgets what it owes beyond a short slack, so the queue of accesses stays
        // bounded.
        if let Some(floor) = now.checked_sub(ROUND_SLACK) {
            self.next_issue[i] = self.next_issue[i].max(floor);
        }
    }

    /// Takes the responses the core delivered, and records their round trips.
    fn take_responses(&mut self, turn: &mut Turn) {
        let mut responses: Vec<DeviceResponse> = Vec::new();
        self.slot.port.drain_responses(&mut responses);
        for response in &responses {
            if let Some(at) = self.sent_at.remove(&response.grpid.get()) {
                let ns = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                // The histogram resizes itself: recording fails only if it cannot grow.
                failed(
                    &mut self.errors,
                    "record a round trip",
                    self.latency.record(ns),
                );
                self.progress().latency.record(ns);
            }
            // Direct mode learns which pages the VMM made present, even in a turn that runs
            // without it (right after a DMA_MAP, DMA_UNMAP or reset, while it settles): an
            // answer taken then would otherwise be lost, and the device would ask again.
            match turn.mmu.as_mut() {
                Some(Mmu::Direct(d)) => {
                    d.page_response(response.pasid, response.grpid, response.code)
                }
                _ => {
                    if let Some(d) = self.direct.as_mut() {
                        d.page_response(response.pasid, response.grpid, response.code);
                    }
                }
            }
            self.endpoint
                .on_response(response.pasid, response.grpid, response.code);
        }
        self.progress()
            .groups_answered
            .fetch_add(responses.len() as u64, Relaxed);
        turn.answered = responses.len();
    }

    /// Steps the endpoint (DMA, translations) and reports its faults to the fault core.
    fn step(&mut self, turn: &mut Turn) {
        // A device reset may have taken the directory away since the top of the loop, and its
        // responses (just taken) freed credits: step only through the tables still current.
        let current = turn.ready && self.slot.attachment().generation == self.generation;
        let (Some(mmu), Some(memory), true) = (turn.mmu.as_mut(), self.guest.as_mut(), current)
        else {
            return;
        };
        self.upstream.clear();
        turn.more = self
            .endpoint
            .step_some(mmu, memory, &mut self.upstream, STEP_BUDGET);
        self.faults.clear();
        for u in &self.upstream {
            if let Upstream::PageRequest(r) = u {
                if let Mmu::Direct(d) = mmu {
                    d.page_requested(r.pasid, r.grpid, r.addr.get());
                }
                if r.last {
                    self.sent_at.insert(r.grpid.get(), Instant::now());
                }
            }
            self.faults.push(match *u {
                Upstream::PageRequest(r) => {
                    DeviceFault::page_request(r.pasid, r.grpid, r.perm, r.addr, r.last)
                }
                Upstream::Unrecoverable(f) => DeviceFault::Unrecoverable(f),
            });
        }
        if !self.faults.is_empty() {
            let result = self.slot.port.report_batch(&self.faults);
            failed(&mut self.errors, "report faults", result);
        }
    }

    /// Keeps the turn's IOMMU for the next turn.
    fn put_back(&mut self, mmu: Option<Mmu>) {
        match mmu {
            Some(Mmu::Nested(n)) => self.iommu = Some(n),
            Some(Mmu::Direct(d)) => self.direct = Some(d),
            None => {}
        }
    }

    /// Publishes the accesses ended, and says whether the turn moved anything: a response
    /// taken, a fault sent, an access ended.
    fn moved(&mut self, turn: &Turn) -> bool {
        let c = self.endpoint.counters();
        let ended = c.accesses - outstanding(&c);
        self.progress().accesses_done.store(ended, Relaxed);
        let moved = turn.more
            || turn.answered > 0
            || !self.upstream.is_empty()
            || ended != self.ended_before;
        self.ended_before = ended;
        moved
    }

    /// Every access issued (or, in rounds, `drain` set), and nothing in flight.
    fn done(&self) -> bool {
        let all_issued = match &self.drain {
            Some(drain) => drain.load(Relaxed),
            None => self
                .issued
                .iter()
                .zip(&self.workload.streams)
                .all(|(n, s)| *n >= s.accesses),
        };
        all_issued && self.endpoint.idle()
    }

    /// Lets the fault core take the VMM's responses and expire groups; says whether responses
    /// wait in the inbox.
    fn serve_core(&mut self) -> bool {
        let result = self.slot.port.process_responses();
        failed(&mut self.errors, "process responses", result);
        // This device's groups only: every device's engine expires its own.
        let expired = self.core.expire_device(self.slot.id);
        failed(&mut self.errors, "expire groups", expired);
        self.slot.port.has_responses()
    }

    /// How long to sleep. A device behind its streams' schedule but stalled (every credit out,
    /// waiting for page responses) cannot move until a response comes: it must sleep on the
    /// response doorbell then, not spin, or it takes the CPU the VMM needs to answer.
    fn timeout(&self, turn: &Turn, moved: bool) -> Duration {
        let drain = self.drain.is_some();
        let next = self
            .next_issue
            .iter()
            .zip(self.issued.iter().zip(&self.workload.streams))
            .filter(|(_, (n, s))| !turn.draining && s.accesses > 0 && (drain || **n < s.accesses))
            .map(|(t, _)| *t)
            .min();
        let tick = match (turn.ready, &self.wake) {
            (false, _) => self.idle_tick,
            (true, Some(_)) => self.doorbell_tick,
            // Without a doorbell, the tick is how soon a response is seen.
            (true, None) => Duration::from_millis(2),
        };
        match next {
            // Queued accesses are runnable right now: no sleep.
            _ if turn.more => Duration::ZERO,
            // Stalled: only a response (which rings the doorbell) or the tick can change that.
            Some(_) if !moved => tick,
            Some(t) => t.saturating_duration_since(Instant::now()).min(tick),
            None => tick,
        }
    }

    /// The run's report, once the loop has ended.
    fn report(mut self) -> EngineReport {
        if let Some(memory) = self.guest.take() {
            add_verdict(&mut self.verdict, &memory.verify());
        }
        if let Some(walk) = self.iommu.take() {
            self.malformed += walk.malformed;
        }
        EngineReport {
            device: self.slot.id.0,
            endpoint: self.endpoint.counters(),
            memory: self.verdict,
            malformed_walks: self.malformed,
            round_trip_us: RoundTrips::of(&self.latency),
            latency: self.latency,
            elapsed_ns: u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            errors: self.errors,
        }
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
