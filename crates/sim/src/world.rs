//! The deterministic simulation of the whole loop in one process: endpoints doing DMA through
//! the IOMMU model, the real fault core and real rings, the VMM end of each device's queues,
//! and a guest per VMM, all driven by one event queue on a virtual clock and one seed. Any run
//! is replayed exactly by its seed (same events, same order, same trace hash).
//!
//! An invariant checker watches the run: every page request group answered exactly once (the
//! endpoint sees no response for a group it has not in flight, and none is left in flight);
//! no guest response accepted across handler lives; no device stuck once the run drains; every
//! byte DMA wrote verified in guest memory.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use iopf_abi::{Fault, Pasid, QueueGeometry, QueueKind, ResponseRecord};
use iopf_core::{
    Clock, DeviceConfig, DeviceCounters, DeviceFault, DeviceId, DeviceResponse, DeviceSink,
    FaultCore, ManualClock, Nanos, QueueHandler, ResponseSource,
};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, HeapMemory, QueueMemory,
    ResponseQueueConsumer, ResponseQueueProducer,
};
use iopf_vmm::{Assembled, GroupAssembler};
use serde::Serialize;
use thiserror::Error;

use iopf_models::endpoint::{Endpoint, EndpointConfig, EndpointCounters, Upstream};
use iopf_models::guest::{Guest, GuestConfig, GuestCounters};
use iopf_models::iommu::Iommu;
use iopf_models::memory::{GuestMemory, MemoryVerdict};
use iopf_models::rng::Rng;
use iopf_models::workload::{Pattern, Stream};

/// One simulated device: its endpoint, its workload and its host-side settings.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// The endpoint's PRI configuration.
    pub endpoint: EndpointConfig,
    /// The DMA streams it runs.
    pub streams: Vec<Stream>,
    /// Entries of its fault and response queues.
    pub ring_entries: u32,
    /// The fault core's limits and policies for it.
    pub core: DeviceConfig,
}

/// A disruption at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chaos {
    /// The host unregisters the device's handler (the VMM process lives on).
    Unregister {
        /// Index of the device.
        device: usize,
    },
    /// The host registers a handler again, with fresh queues, for the same VMM process.
    Register {
        /// Index of the device.
        device: usize,
    },
    /// The VMM process dies (its answers in flight die with it) and a new one attaches after
    /// `down_ns`; the new guest may replay responses from before.
    VmmRestart {
        /// Index of the device.
        device: usize,
        /// Time without a VMM.
        down_ns: Nanos,
    },
    /// The handler is re-registered with a ring of `entries`, forcing overflow.
    ShrinkRing {
        /// Index of the device.
        device: usize,
        /// New ring size.
        entries: u32,
    },
    /// Flips bits of guest memory at `gpa` behind the device's back: not a fault iopf must
    /// survive, but a check that the memory verdict catches what it should.
    CorruptMemory {
        /// Guest-physical address of the word.
        gpa: u64,
    },
    /// The VMM writes a consumer index beyond anything the host published into its fault
    /// queue, and stops reading for `stall_ns`: the host must refuse the index (the queue is
    /// broken, the handler ends), never reuse slots the VMM has not read.
    LyingIndex {
        /// Index of the device.
        device: usize,
        /// How long the VMM then reads nothing.
        stall_ns: Nanos,
    },
    /// The endpoint starts issuing `extra` requests beyond its allocation.
    OverIssue {
        /// Index of the device.
        device: usize,
        /// Requests beyond the allocation.
        extra: u32,
    },
}

/// A disruption and its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChaosEvent {
    /// When.
    pub at: Nanos,
    /// What.
    pub chaos: Chaos,
}

/// Everything a run depends on.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Drives every random choice.
    pub seed: u64,
    /// The devices.
    pub devices: Vec<DeviceSpec>,
    /// The guest's behaviour (one guest per device's VMM).
    pub guest: GuestConfig,
    /// Disruptions.
    pub chaos: Vec<ChaosEvent>,
    /// Guest memory, in pages.
    pub guest_pages: u64,
    /// Latency from the host to the device (a PRG response's trip).
    pub link_ns: Nanos,
    /// How often the host polls each device's response queue (and runs timeouts).
    pub host_poll_ns: Nanos,
    /// How often each VMM polls its fault queue.
    pub vmm_poll_ns: Nanos,
    /// The run stops at this virtual time even if work remains (the checker then reports
    /// what is stuck).
    pub time_limit_ns: Nanos,
    /// Stale responses built to collide: each VMM keeps the answers of past handler lives
    /// and, when a group of the current life arrives with the PASID and PRG index of one of
    /// them, replays it first (the one with the same cookie if there is one). Harmless only
    /// if the host never accepts a response across lives.
    pub stale_collisions: bool,
    /// A confused VMM: the fraction of guest answers written into another device's response
    /// queue instead of their own. Harmless only if the host matches a response against its
    /// own device's groups alone.
    pub crosstalk: f64,
}

const MS: Nanos = 1_000_000;

impl SimConfig {
    /// A clean run: two devices, well-behaved guest, no chaos.
    pub fn clean(seed: u64) -> Self {
        let stream = |pasid: u32, pattern, write| Stream {
            pasid: Pasid::new(pasid).ok(),
            base: 0x4000_0000 + u64::from(pasid) * 0x100_0000,
            pages: 32,
            pattern,
            access_len: 6144,
            write,
            accesses: 60,
            interval_ns: 20_000,
        };
        let device = |streams| DeviceSpec {
            endpoint: EndpointConfig::default(),
            streams,
            ring_entries: 64,
            core: DeviceConfig {
                response_timeout: Some(std::time::Duration::from_millis(20)),
                ..DeviceConfig::default()
            },
        };
        Self {
            seed,
            devices: vec![
                device(vec![
                    stream(1, Pattern::Sequential, true),
                    stream(2, Pattern::Random, true),
                    stream(1, Pattern::Random, false),
                ]),
                device(vec![stream(1, Pattern::Strided { stride: 12_288 }, true)]),
            ],
            guest: GuestConfig::default(),
            chaos: Vec::new(),
            guest_pages: 1024,
            link_ns: 500,
            host_poll_ns: 5_000,
            vmm_poll_ns: 3_000,
            time_limit_ns: 10_000 * MS,
            stale_collisions: false,
            crosstalk: 0.0,
        }
    }

    /// The clean run with VMM restarts, unregister/register, and a guest that replays stale
    /// responses.
    pub fn restarts(seed: u64) -> Self {
        let mut config = Self::clean(seed);
        config.guest.stale_rate = 0.2;
        config.devices[0].endpoint.prgi_alloc = iopf_models::endpoint::PrgiAlloc::LowestFree;
        config.chaos = vec![
            ChaosEvent {
                at: 300_000,
                chaos: Chaos::Unregister { device: 0 },
            },
            ChaosEvent {
                at: 350_000,
                chaos: Chaos::Register { device: 0 },
            },
            ChaosEvent {
                at: 600_000,
                chaos: Chaos::VmmRestart {
                    device: 1,
                    down_ns: 100_000,
                },
            },
            ChaosEvent {
                at: 900_000,
                chaos: Chaos::VmmRestart {
                    device: 0,
                    down_ns: 50_000,
                },
            },
        ];
        config
    }

    /// Stale responses built to collide with a group of the new life: devices that reuse
    /// the lowest free PRG index of very few, handler lives cut short again and again by
    /// unregister and VMM restarts, and VMMs that replay a past life's answer whenever the
    /// device has reused its PASID and PRG index ([`SimConfig::stale_collisions`]).
    pub fn stale_collisions(seed: u64) -> Self {
        let mut config = Self::clean(seed);
        config.stale_collisions = true;
        for device in &mut config.devices {
            device.endpoint.prgi_alloc = iopf_models::endpoint::PrgiAlloc::LowestFree;
            device.endpoint.allocation = 2;
        }
        for (i, at) in (100_000..1_200_000).step_by(100_000).enumerate() {
            let device = i % 2;
            if i % 3 == 2 {
                config.chaos.push(ChaosEvent {
                    at,
                    chaos: Chaos::VmmRestart {
                        device,
                        down_ns: 5_000,
                    },
                });
            } else {
                config.chaos.push(ChaosEvent {
                    at,
                    chaos: Chaos::Unregister { device },
                });
                config.chaos.push(ChaosEvent {
                    at: at + 5_000,
                    chaos: Chaos::Register { device },
                });
            }
        }
        config
    }

    /// Answers written to the wrong device: a VMM that serves both devices writes a quarter of
    /// its guest's answers into the other device's response queue ([`SimConfig::crosstalk`]).
    /// The devices' PRG indices and PASIDs coincide, so only the cookie's owner tells the
    /// groups apart.
    pub fn crosstalk(seed: u64) -> Self {
        let mut config = Self::clean(seed);
        config.crosstalk = 0.25;
        for device in &mut config.devices {
            device.endpoint.prgi_alloc = iopf_models::endpoint::PrgiAlloc::LowestFree;
        }
        config
    }

    /// VMMs that lie about how far they read their fault queue: rings of 4 entries under an
    /// allocation of 32, and every 150 µs one device's VMM writes a consumer index past
    /// anything published and stops reading for 100 µs ([`Chaos::LyingIndex`]).
    pub fn lying_index(seed: u64) -> Self {
        let mut config = Self::clean(seed);
        for device in &mut config.devices {
            device.ring_entries = 4;
        }
        let mut rng = Rng::new(seed ^ 0x11e5);
        for (i, at) in (50_000..1_000_000).step_by(150_000).enumerate() {
            config.chaos.push(ChaosEvent {
                at: at + rng.below(50_000),
                chaos: Chaos::LyingIndex {
                    device: i % 2,
                    stall_ns: 100_000,
                },
            });
        }
        config
    }

    /// The clean run with rings too small for the traffic and a device that over-issues.
    pub fn overflow(seed: u64) -> Self {
        let mut config = Self::clean(seed);
        for device in &mut config.devices {
            device.ring_entries = 4;
        }
        config.chaos = vec![
            ChaosEvent {
                at: 0,
                chaos: Chaos::OverIssue {
                    device: 1,
                    extra: 64,
                },
            },
            ChaosEvent {
                at: 200_000,
                chaos: Chaos::ShrinkRing {
                    device: 0,
                    entries: 2,
                },
            },
        ];
        config
    }

    /// The clean run with a guest that misbehaves in every way.
    pub fn hostile(seed: u64) -> Self {
        let mut config = Self::clean(seed);
        config.guest = GuestConfig::hostile();
        config
    }

    /// A short run with chaos drawn from the seed, for sweeps.
    pub fn chaotic(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x5eed);
        let mut config = Self::clean(seed);
        for device in &mut config.devices {
            for stream in &mut device.streams {
                stream.accesses = 12;
            }
            device.ring_entries = 1 << rng.between(1, 6);
            device.endpoint.allocation = rng.between(1, 16) as u32;
            // Lowest-free PRG indices are reused at once: the sharpest test of stale responses.
            if rng.chance(0.5) {
                device.endpoint.prgi_alloc = iopf_models::endpoint::PrgiAlloc::LowestFree;
            }
        }
        config.guest = if rng.chance(0.5) {
            GuestConfig::hostile()
        } else {
            GuestConfig::default()
        };
        for _ in 0..rng.between(0, 5) {
            let device = rng.below(2) as usize;
            let at = rng.below(400_000);
            let chaos = match rng.below(5) {
                0 => Chaos::Unregister { device },
                1 => Chaos::Register { device },
                2 => Chaos::VmmRestart {
                    device,
                    down_ns: rng.between(1_000, 100_000),
                },
                3 => Chaos::ShrinkRing {
                    device,
                    entries: 1 << rng.between(1, 3),
                },
                _ => Chaos::OverIssue {
                    device,
                    extra: rng.between(1, 32) as u32,
                },
            };
            config.chaos.push(ChaosEvent { at, chaos });
        }
        // Most draws build stale responses to collide: PRG indices reused at once, a handler
        // life cut short while traffic runs, VMMs replaying past lives' answers.
        if rng.chance(0.75) {
            config.stale_collisions = true;
            for device in &mut config.devices {
                device.endpoint.prgi_alloc = iopf_models::endpoint::PrgiAlloc::LowestFree;
            }
            for device in 0..config.devices.len() {
                let at = rng.between(30_000, 150_000);
                config.chaos.push(ChaosEvent {
                    at,
                    chaos: Chaos::Unregister { device },
                });
                config.chaos.push(ChaosEvent {
                    at: at + rng.between(1_000, 10_000),
                    chaos: Chaos::Register { device },
                });
            }
        }
        // Some draws misdirect answers to the other device.
        if rng.chance(0.25) {
            config.crosstalk = 0.2;
        }
        // Some have a VMM lie about how far it read its fault queue.
        if rng.chance(0.25) {
            let device = rng.below(2) as usize;
            config.chaos.push(ChaosEvent {
                at: rng.between(20_000, 200_000),
                chaos: Chaos::LyingIndex {
                    device,
                    stall_ns: rng.between(10_000, 100_000),
                },
            });
        }
        // Whatever the chaos did, the run must end with every device registered again.
        for device in 0..config.devices.len() {
            config.chaos.push(ChaosEvent {
                at: 500_000,
                chaos: Chaos::Register { device },
            });
        }
        config
    }
}

/// Why a run could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SimError {
    /// Guest memory could not be created.
    #[error("guest memory: {0}")]
    Memory(#[from] iopf_queue::RegionAttachError),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What a run did, and the checker's verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Virtual time when the run ended.
    pub end_ns: Nanos,
    /// Events processed.
    pub events: u64,
    /// A hash of every event in order: equal for equal runs.
    pub trace_hash: u64,
    /// The fault core's counters, all devices summed.
    pub core: DeviceCounters,
    /// The endpoints' counters, summed.
    pub endpoints: EndpointCounters,
    /// The guests' counters, summed.
    pub guests: GuestCounters,
    /// Guest answers lost with a dead VMM process, or dropped with no queue to write to.
    pub answers_dropped: u64,
    /// Responses the VMMs wrote into a response queue.
    pub answers_written: u64,
    /// Responses written but still unread when their queue was torn down.
    pub answers_discarded: u64,
    /// Guest memory against what DMA wrote.
    pub memory: MemoryVerdict,
    /// Past lives' answers the VMMs replayed to collide with a group of the new life
    /// ([`SimConfig::stale_collisions`]).
    pub stale_replayed: u64,
    /// Guest answers written into another device's response queue ([`SimConfig::crosstalk`]).
    pub misdirected: u64,
    /// Consumer indices the VMMs lied about ([`Chaos::LyingIndex`]).
    pub lies: u64,
    /// Invariant violations (empty: the run is correct).
    pub violations: Vec<String>,
}

impl SimReport {
    /// Whether the checker found nothing wrong.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

#[derive(Debug, Default)]
struct Sink {
    responses: Mutex<Vec<(DeviceId, DeviceResponse)>>,
}

impl DeviceSink for Sink {
    fn page_response(&self, device: DeviceId, response: DeviceResponse) {
        self.responses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((device, response));
    }
}

type Memory = Arc<HeapMemory>;

#[derive(Debug)]
struct Vmm {
    faults: FaultQueueConsumer<Memory>,
    responses: ResponseQueueProducer<Memory>,
    /// Records of a group read so far (a group may straddle two polls).
    partial: GroupAssembler,
}

impl Vmm {
    /// Responses written to the response queue that the host has not read.
    fn unread_responses(&self) -> u64 {
        // The host's index is its own to keep; an honest host's is always in range.
        self.responses
            .fill()
            .map_or(0, |(unread, _)| u64::from(unread))
    }
}

#[derive(Debug)]
struct Device {
    id: DeviceId,
    spec: DeviceSpec,
    endpoint: Endpoint,
    vmm: Option<Vmm>,
    /// Handler lives (registrations).
    life: u64,
    /// VMM processes (restarts).
    process: u64,
    /// Responses in the response queue, in order, each with the handler life of the group it
    /// answers (the checker's provenance of every response the host may accept).
    in_queue: VecDeque<(ResponseRecord, u64)>,
    /// Those the host read in the current poll.
    consumed: Vec<(ResponseRecord, u64)>,
    /// The guest's answers with the handler life they answered, the latest last (bounded),
    /// for replays built to collide.
    past: VecDeque<(ResponseRecord, u64)>,
    guest: Guest,
    /// The VMM reads nothing before this time ([`Chaos::LyingIndex`]).
    stalled_until: Nanos,
    issued: Vec<u32>,
    next_access: u64,
    ring_entries: u32,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Issue {
        device: usize,
        stream: usize,
    },
    VmmPoll {
        device: usize,
    },
    GuestAnswer {
        device: usize,
        process: u64,
        record: ResponseRecord,
        /// The handler life of the group it answers.
        life: u64,
        tries: u32,
    },
    HostPoll {
        device: usize,
    },
    Respond {
        device: usize,
        response: DeviceResponse,
    },
    Chaos(ChaosEvent),
    Reattach {
        device: usize,
    },
}

impl Event {
    fn periodic(&self) -> bool {
        matches!(self, Self::VmmPoll { .. } | Self::HostPoll { .. })
    }

    fn trace(&self, hasher: &mut DefaultHasher) {
        match *self {
            Self::Issue { device, stream } => (0u8, device, stream).hash(hasher),
            Self::VmmPoll { device } => (2u8, device).hash(hasher),
            Self::GuestAnswer {
                device,
                process,
                record,
                life,
                tries,
            } => {
                (3u8, device, process, life, tries).hash(hasher);
                zerocopy::IntoBytes::as_bytes(&record).hash(hasher);
            }
            Self::HostPoll { device } => (4u8, device).hash(hasher),
            Self::Respond { device, response } => (5u8, device, response).hash(hasher),
            Self::Chaos(c) => (6u8, format!("{c:?}")).hash(hasher),
            Self::Reattach { device } => (7u8, device).hash(hasher),
        }
    }
}

struct Scheduled {
    at: Nanos,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The simulated world.
struct World {
    config: SimConfig,
    now: Nanos,
    clock: Arc<ManualClock>,
    core: FaultCore,
    sink: Arc<Sink>,
    iommu: Iommu,
    memory: GuestMemory,
    devices: Vec<Device>,
    rng: Rng,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    /// Events in the queue that are not periodic polls.
    work: u64,
    events: u64,
    trace: DefaultHasher,
    answers_dropped: u64,
    answers_written: u64,
    answers_discarded: u64,
    stale_replayed: u64,
    misdirected: u64,
    lies: u64,
    violations: Vec<String>,
}

/// Answers each VMM remembers for replays built to collide.
const PAST_ANSWERS: usize = 64;

/// The provenance of an answer written into another device's response queue: it answers no
/// group of that device in any life.
const MISDIRECTED: u64 = u64::MAX;

/// Runs one simulation to its end and returns what happened with the checker's verdict.
pub fn run(config: SimConfig) -> Result<SimReport, SimError> {
    World::new(config)?.run()
}

impl World {
    fn new(config: SimConfig) -> Result<Self, SimError> {
        if config.devices.is_empty() {
            return Err(SimError::Config("no devices".into()));
        }
        let clock = Arc::new(ManualClock::new(0));
        let core = FaultCore::new(clock.clone());
        let sink = Arc::new(Sink::default());
        let mut rng = Rng::new(config.seed);
        let mut iommu = Iommu::new();
        let mut devices = Vec::new();
        for (index, spec) in config.devices.iter().enumerate() {
            QueueGeometry::new(QueueKind::Fault, spec.ring_entries)
                .map_err(|e| SimError::Config(e.to_string()))?;
            let id = DeviceId(index as u32 + 1);
            core.add_device(id, spec.core, sink.clone())
                .map_err(|e| SimError::Config(e.to_string()))?;
            for stream in &spec.streams {
                iommu.add_space((id.0, stream.pasid));
            }
            devices.push(Device {
                id,
                spec: spec.clone(),
                endpoint: Endpoint::new(id.0, spec.endpoint),
                vmm: None,
                life: 0,
                process: 0,
                in_queue: VecDeque::new(),
                consumed: Vec::new(),
                past: VecDeque::new(),
                guest: Guest::new(config.guest, rng.fork()),
                stalled_until: 0,
                issued: vec![0; spec.streams.len()],
                next_access: 0,
                ring_entries: spec.ring_entries,
            });
        }
        let memory = GuestMemory::new(config.guest_pages)?;
        let mut world = Self {
            now: 0,
            clock,
            core,
            sink,
            iommu,
            memory,
            devices,
            rng,
            queue: BinaryHeap::new(),
            seq: 0,
            work: 0,
            events: 0,
            trace: DefaultHasher::new(),
            answers_dropped: 0,
            answers_written: 0,
            answers_discarded: 0,
            stale_replayed: 0,
            misdirected: 0,
            lies: 0,
            violations: Vec::new(),
            config,
        };
        for device in 0..world.devices.len() {
            world.attach(device);
            for stream in 0..world.devices[device].spec.streams.len() {
                world.schedule(stream as u64 * 1_000, Event::Issue { device, stream });
            }
            world.schedule(0, Event::VmmPoll { device });
            world.schedule(0, Event::HostPoll { device });
        }
        for chaos in world.config.chaos.clone() {
            world.schedule(chaos.at, Event::Chaos(chaos));
        }
        Ok(world)
    }

    fn schedule(&mut self, delay: Nanos, event: Event) {
        if !event.periodic() {
            self.work += 1;
        }
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at: self.now + delay,
            seq: self.seq,
            event,
        }));
    }

    fn violation(&mut self, text: String) {
        if self.violations.len() < 100 {
            self.violations.push(format!("t={}ns: {text}", self.now));
        }
    }

    /// Registers a fresh handler and VMM end for the device (a new handler life).
    fn attach(&mut self, device: usize) {
        let d = &mut self.devices[device];
        if d.vmm.is_some() {
            return;
        }
        let entries = d.ring_entries;
        let fault_memory = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Fault, entries)
                .unwrap_or_else(|_| unreachable!("checked in new")),
        ));
        let response_memory = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Response, entries)
                .unwrap_or_else(|_| unreachable!("checked in new")),
        ));
        let (Ok(host_bell), Ok(vmm_bell)) = (Doorbell::new(), Doorbell::new()) else {
            self.violation("cannot create an eventfd".into());
            return;
        };
        let handler = QueueHandler {
            faults: FaultQueueProducer::new(fault_memory.clone()),
            responses: ResponseQueueConsumer::new(response_memory.clone(), host_bell),
        };
        d.vmm = Some(Vmm {
            faults: FaultQueueConsumer::new(fault_memory, vmm_bell),
            responses: ResponseQueueProducer::new(response_memory, None),
            partial: GroupAssembler::new(),
        });
        d.life += 1;
        if let Err(e) = self.core.register(d.id, Box::new(handler)) {
            self.violation(format!("register failed: {e}"));
        }
    }

    fn detach(&mut self, device: usize, vmm_gone: bool) {
        let id = self.devices[device].id;
        // Responses the VMM wrote that the host will never read: they go with the queue.
        if let Some(vmm) = &self.devices[device].vmm {
            self.answers_discarded += vmm.unread_responses();
        }
        self.devices[device].in_queue.clear();
        if vmm_gone {
            self.core.vmm_gone(id);
        } else {
            self.core.unregister(id);
        }
        self.devices[device].vmm = None;
        self.collect();
    }

    /// Schedules what the core answered, checking that no guest response crosses lives.
    fn collect(&mut self) {
        let responses = std::mem::take(
            &mut *self
                .sink
                .responses
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (id, response) in responses {
            let device = (id.0 - 1) as usize;
            if response.source == ResponseSource::Guest {
                // Find the record the core accepted: the first one read in this poll that
                // names the same group (the core checks records in order, and any record equal
                // in cookie, PASID and PRG index is the same to it). It must answer a group of
                // the current handler life.
                let d = &mut self.devices[device];
                let position = d.consumed.iter().position(|(record, _)| {
                    record.decode().is_ok_and(|r| {
                        Some(r.cookie) == response.cookie
                            && r.pasid == response.pasid
                            && r.grpid == response.grpid
                    })
                });
                let current = d.life;
                match position.map(|p| d.consumed.remove(p)) {
                    Some((_, life)) if life == current => {}
                    Some((_, MISDIRECTED)) => self.violation(format!(
                        "{id}: a response written for another device's group was accepted: {response:?}"
                    )),
                    Some((_, life)) => self.violation(format!(
                        "{id}: a response to a group of life {life} was accepted in life {current}: {response:?}"
                    )),
                    None => self.violation(format!(
                        "{id}: the core accepted a response no VMM wrote in this poll: {response:?}"
                    )),
                }
            }
            let link = self.config.link_ns;
            self.schedule(link, Event::Respond { device, response });
        }
    }

    /// Whether anything is left to happen: queued work, a device with work, or a group
    /// pending at the host. Periodic polls stop rescheduling themselves when nothing is.
    fn active(&self) -> bool {
        self.work > 0
            || self.devices.iter().any(|d| {
                !d.endpoint.idle()
                    || d.issued
                        .iter()
                        .zip(&d.spec.streams)
                        .any(|(n, s)| *n < s.accesses)
                    || self.core.pending_groups(d.id).unwrap_or(0) > 0
            })
    }

    fn run(mut self) -> Result<SimReport, SimError> {
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at > self.config.time_limit_ns {
                break;
            }
            if !next.event.periodic() {
                self.work -= 1;
            }
            self.now = next.at;
            let delta = self.now.saturating_sub(self.clock.now());
            self.clock.advance(delta);
            self.events += 1;
            self.now.hash(&mut self.trace);
            next.event.trace(&mut self.trace);
            self.handle(next.event);
        }
        Ok(self.finish())
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Issue { device, stream } => self.issue(device, stream),
            Event::VmmPoll { device } => {
                self.vmm_poll(device);
                if self.active() {
                    let every = self.config.vmm_poll_ns;
                    self.schedule(every, Event::VmmPoll { device });
                }
            }
            Event::GuestAnswer {
                device,
                process,
                record,
                life,
                tries,
            } => {
                self.guest_answer(device, process, record, life, tries);
            }
            Event::HostPoll { device } => {
                let id = self.devices[device].id;
                loop {
                    let read = self.core.process_responses(id).unwrap_or(0);
                    let d = &mut self.devices[device];
                    let n = read.min(d.in_queue.len());
                    d.consumed.extend(d.in_queue.drain(..n));
                    if read < 1024 {
                        break;
                    }
                }
                self.core.expire();
                self.collect();
                self.devices[device].consumed.clear();
                if self.active() {
                    let every = self.config.host_poll_ns;
                    self.schedule(every, Event::HostPoll { device });
                }
            }
            Event::Respond { device, response } => {
                self.devices[device].endpoint.on_response(
                    response.pasid,
                    response.grpid,
                    response.code,
                );
                self.step(device);
            }
            Event::Chaos(chaos) => self.chaos(chaos.chaos),
            Event::Reattach { device } => self.attach(device),
        }
    }

    fn issue(&mut self, device: usize, stream: usize) {
        let d = &mut self.devices[device];
        let spec = d.spec.streams[stream];
        let n = d.issued[stream];
        if n >= spec.accesses {
            return;
        }
        d.issued[stream] += 1;
        d.next_access += 1;
        let access = spec.access(n, d.next_access, &mut self.rng);
        d.endpoint.submit(access);
        self.step(device);
        if n + 1 < spec.accesses {
            let jitter = self.rng.below(spec.interval_ns / 4 + 1);
            self.schedule(spec.interval_ns + jitter, Event::Issue { device, stream });
        }
    }

    fn step(&mut self, device: usize) {
        let mut upstream = Vec::new();
        let d = &mut self.devices[device];
        d.endpoint
            .step(&mut self.iommu, &mut self.memory, &mut upstream);
        if upstream.is_empty() {
            return;
        }
        let faults: Vec<DeviceFault> = upstream
            .into_iter()
            .map(|u| match u {
                Upstream::PageRequest(r) => {
                    DeviceFault::page_request(r.pasid, r.grpid, r.perm, r.addr, r.last)
                }
                Upstream::Unrecoverable(f) => DeviceFault::Unrecoverable(f),
            })
            .collect();
        let id = d.id;
        if let Err(e) = self.core.report_batch(id, &faults) {
            self.violation(format!("report failed: {e}"));
        }
        self.collect();
    }

    fn vmm_poll(&mut self, device: usize) {
        let d = &mut self.devices[device];
        if self.now < d.stalled_until {
            return;
        }
        let Some(vmm) = d.vmm.as_mut() else {
            return;
        };
        let mut faults = Vec::new();
        if vmm
            .faults
            .drain_faults(usize::MAX, |f| faults.push(f))
            .is_err()
        {
            self.violation("the host broke the fault queue".into());
            return;
        }
        let mut groups = Vec::new();
        for fault in faults {
            match fault {
                Ok(Fault::PageRequest(request)) => {
                    match vmm.partial.push(0, request) {
                        Assembled::Partial => {}
                        Assembled::Group(group) => groups.push(group),
                        // The fault core delivers groups whole and bounded: never.
                        Assembled::DroppedLast(_) => self.violations.push(
                            "the fault core delivered an interrupted or oversized group".into(),
                        ),
                    }
                }
                Ok(Fault::Unrecoverable(_)) => {}
                Err(e) => {
                    let text = format!("the host published a malformed record: {e}");
                    self.violations.push(text);
                }
            }
        }
        let (id, process, life, now) = (d.id.0, d.process, d.life, self.now);
        for group in groups {
            if self.config.stale_collisions {
                self.replay_colliding(device, process, life, &group);
            }
            let answers = self.devices[device].guest.on_group(
                id,
                &group,
                life,
                &mut self.iommu,
                &mut self.memory,
                now,
            );
            if self.config.stale_collisions {
                let past = &mut self.devices[device].past;
                for answer in answers.iter().filter(|a| a.tag == life) {
                    if past.len() == PAST_ANSWERS {
                        past.pop_front();
                    }
                    past.push_back((answer.record, life));
                }
            }
            for answer in answers {
                let delay = answer.at - now;
                let (mut to, mut to_process, mut life) = (device, process, answer.tag);
                let count = self.devices.len();
                if count > 1 && self.rng.chance(self.config.crosstalk) {
                    to = (device + 1) % count;
                    to_process = self.devices[to].process;
                    life = MISDIRECTED;
                    self.misdirected += 1;
                }
                self.schedule(
                    delay,
                    Event::GuestAnswer {
                        device: to,
                        process: to_process,
                        record: answer.record,
                        life,
                        tries: 0,
                    },
                );
            }
        }
    }

    /// Replays, ahead of the guest's answer, an answer of a past life to the same PASID and
    /// PRG index as `group` (the one with `group`'s cookie if there is one, else the latest),
    /// once.
    fn replay_colliding(
        &mut self,
        device: usize,
        process: u64,
        life: u64,
        group: &[iopf_abi::PageRequest],
    ) {
        let Some(last) = group.last() else {
            return;
        };
        let past = &mut self.devices[device].past;
        let same_key = |(record, old): &(ResponseRecord, u64)| {
            *old < life
                && record
                    .decode()
                    .is_ok_and(|r| r.pasid == last.pasid && r.grpid == last.grpid)
        };
        let same_cookie = past.iter().position(|entry| {
            same_key(entry) && entry.0.decode().is_ok_and(|r| r.cookie == last.cookie)
        });
        let Some(index) = same_cookie.or_else(|| past.iter().rposition(same_key)) else {
            return;
        };
        let Some((record, old)) = past.remove(index) else {
            return;
        };
        self.stale_replayed += 1;
        self.schedule(
            0,
            Event::GuestAnswer {
                device,
                process,
                record,
                life: old,
                tries: 0,
            },
        );
    }

    fn guest_answer(
        &mut self,
        device: usize,
        process: u64,
        record: ResponseRecord,
        life: u64,
        tries: u32,
    ) {
        let d = &mut self.devices[device];
        if d.process != process {
            // The VMM process that owed this answer is dead.
            self.answers_dropped += 1;
            return;
        }
        let written = d.vmm.as_mut().map(|vmm| {
            vmm.responses.stage_record(&record).is_ok() && vmm.responses.publish().is_ok()
        });
        match written {
            Some(true) => {
                self.answers_written += 1;
                d.in_queue.push_back((record, life));
            }
            // No handler right now (between unregister and register), or the ring is full:
            // the VMM tries again a little later, for a while.
            _ if tries < 200 => {
                self.schedule(
                    10_000,
                    Event::GuestAnswer {
                        device,
                        process,
                        record,
                        life,
                        tries: tries + 1,
                    },
                );
            }
            _ => self.answers_dropped += 1,
        }
    }

    fn chaos(&mut self, chaos: Chaos) {
        match chaos {
            Chaos::Unregister { device } => self.detach(device, false),
            Chaos::Register { device } => self.attach(device),
            Chaos::VmmRestart { device, down_ns } => {
                self.detach(device, true);
                self.devices[device].process += 1;
                self.schedule(down_ns, Event::Reattach { device });
            }
            Chaos::ShrinkRing { device, entries } => {
                if QueueGeometry::new(QueueKind::Fault, entries).is_ok() {
                    self.detach(device, false);
                    self.devices[device].ring_entries = entries;
                    self.attach(device);
                }
            }
            Chaos::CorruptMemory { gpa } => self.memory.corrupt_for_test(gpa),
            Chaos::OverIssue { device, extra } => {
                self.devices[device].endpoint.set_credit_overrun(extra);
                self.step(device);
            }
            Chaos::LyingIndex { device, stall_ns } => {
                let d = &mut self.devices[device];
                if let Some(vmm) = &d.vmm {
                    let index = &vmm.faults.memory().vmm_page().index;
                    let lie = index
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .wrapping_add(d.ring_entries + 1);
                    index.store(lie, std::sync::atomic::Ordering::Release);
                    d.stalled_until = self.now + stall_ns;
                    self.lies += 1;
                }
            }
        }
    }

    fn finish(mut self) -> SimReport {
        let mut endpoints = EndpointCounters::default();
        let mut guests = GuestCounters::default();
        for index in 0..self.devices.len() {
            let d = &self.devices[index];
            let e = d.endpoint.counters();
            let status = d.endpoint.status();
            let (id, in_flight, idle) = (d.id, d.endpoint.groups_in_flight(), d.endpoint.idle());
            if e.unexpected > 0 {
                self.violation(format!(
                    "{id}: {} responses for no group in flight (UPRGI)",
                    e.unexpected
                ));
            }
            if !idle && !status.response_failure {
                self.violation(format!("{id}: stuck with {in_flight} groups in flight"));
            }
            if e.groups != e.responses_matched + in_flight as u64 {
                self.violation(format!(
                    "{id}: {} groups sent, {} answered",
                    e.groups, e.responses_matched
                ));
            }
            if let Ok(c) = self.core.counters(id) {
                let pending = self.core.pending_groups(id).unwrap_or(0) as u64;
                if c.groups != c.answered() + pending {
                    self.violation(format!("{id}: core books do not balance: {c:?}"));
                }
                if c.page_requests != e.page_requests {
                    self.violation(format!(
                        "{id}: endpoint sent {} requests, core saw {}",
                        e.page_requests, c.page_requests
                    ));
                }
            }
            add_endpoint(&mut endpoints, &e);
            add_guest(&mut guests, &self.devices[index].guest.counters());
        }
        // Conservation: every response a VMM wrote was accepted, refused, or discarded with its
        // queue; every response the core sent reached the endpoint and matched a group.
        let core = self.core.total_counters();
        let accepted = core.responses.guest.success
            + core.responses.guest.invalid
            + core.responses.guest.failure;
        let read_later = self
            .devices
            .iter()
            .filter_map(|d| d.vmm.as_ref())
            .map(Vmm::unread_responses)
            .sum::<u64>();
        if self.answers_written
            != accepted + core.refused_total() + self.answers_discarded + read_later
        {
            self.violation(format!(
                "responses written {} != accepted {accepted} + refused {} + discarded {} + unread {read_later}",
                self.answers_written,
                core.refused_total(),
                self.answers_discarded
            ));
        }
        let auto = core.answered() - accepted;
        if endpoints.success != core.responses.guest.success
            || endpoints.invalid != core.responses.guest.invalid + auto
            || endpoints.failure != core.responses.guest.failure
        {
            self.violation(format!(
                "endpoints matched {}/{}/{} success/invalid/failure, the core sent {:?} and {auto} auto",
                endpoints.success, endpoints.invalid, endpoints.failure, core.responses.guest
            ));
        }
        let memory = self.memory.verify();
        if memory.bytes_mismatched > 0 || memory.read_mismatches > 0 {
            self.violation(format!(
                "guest memory differs from what DMA wrote: {memory:?}"
            ));
        }
        if memory.bytes_verified == 0 && endpoints.bytes_written > 0 {
            self.violation("DMA wrote bytes but none were verified".into());
        }
        SimReport {
            seed: self.config.seed,
            end_ns: self.now,
            events: self.events,
            trace_hash: self.trace.finish(),
            core,
            endpoints,
            guests,
            answers_dropped: self.answers_dropped,
            answers_written: self.answers_written,
            answers_discarded: self.answers_discarded,
            stale_replayed: self.stale_replayed,
            misdirected: self.misdirected,
            lies: self.lies,
            memory,
            violations: self.violations,
        }
    }
}

macro_rules! sum_fields {
    ($name:ident, $t:ty, $($f:ident),*) => {
        fn $name(total: &mut $t, x: &$t) {
            $(total.$f += x.$f;)*
        }
    };
}

sum_fields!(
    add_endpoint,
    EndpointCounters,
    accesses,
    completed,
    failed_invalid,
    failed_no_pri,
    failed_retries,
    failed_too_large,
    failed_halted,
    failed_stage2,
    translations,
    page_requests,
    groups,
    responses_matched,
    success,
    invalid,
    failure,
    unexpected,
    ignored,
    retries,
    bytes_written,
    bytes_read,
    stalls
);
sum_fields!(
    add_guest,
    GuestCounters,
    groups,
    mapped,
    success,
    refused,
    silent,
    late,
    duplicates,
    forged,
    stale
);
