//! The simulated endpoints' host process: devices with their engines and a socket, all served
//! by one reactor ([`iopf_host::reactor`]) on a fixed number of threads, whatever the number
//! of devices: each device's engine is a reactor source woken by its response doorbell or a
//! deadline, and each VMM connection a source serving a [`FaultPciDevice`]. A connection takes
//! the first device no other connection serves; closing it is unregister (the VMM is gone: its
//! device's pending groups are answered `Invalid`), and a new connection can take the device
//! over.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use iopf_core::{DeviceConfig, DeviceCounters, DeviceId, FaultCore, MonotonicClock};
use iopf_vfio_user::{Disconnect, Server, ServerConfig, ServerError};

use iopf_host::FaultPort;
use iopf_host::reactor::{Context, Listener, Reactor, VfioUserSource, Wait, Workers};
use iopf_host::socket::{self, BindError, SocketGuard};

use crate::engine::{DeviceSlot, EngineReport, EngineSource, Progress, Workload};
use crate::pci::FaultPciDevice;

/// How the host runs.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// One workload per device.
    pub workloads: Vec<Workload>,
    /// Entries of each queue.
    pub ring_entries: u32,
    /// The fault core's limits and policies for each device.
    pub device: DeviceConfig,
    /// Run the workloads in rounds until [`Host::drain`] (a soak), instead of once.
    pub repeat: bool,
    /// Threads of the reactor that serves every device and connection (at least 1; see
    /// [`default_threads`]).
    pub threads: usize,
}

/// The reactor threads a host uses unless told otherwise: one per CPU it may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// How many VMM disconnects a report lists; past them, it counts.
const MAX_DISCONNECTS_LISTED: usize = 1024;

/// How long [`Host::finish`] lets the VMMs leave by themselves before it closes their
/// connections.
const LEAVE_GRACE: Duration = Duration::from_secs(5);

/// What the reactor's sources share with the host.
#[derive(Debug)]
struct Shared {
    slots: Vec<Arc<DeviceSlot>>,
    served: Mutex<Vec<bool>>,
    /// VMM connections open now.
    connections: AtomicUsize,
    disconnects: Mutex<Vec<String>>,
    /// Disconnects past [`MAX_DISCONNECTS_LISTED`].
    unlisted: AtomicU64,
    /// Each device's engine report, once its engine has finished.
    reports: Mutex<Vec<Option<EngineReport>>>,
    /// Engines not finished yet.
    running: AtomicUsize,
    stop: Arc<AtomicBool>,
    ring_entries: u32,
}

/// A running host.
#[derive(Debug)]
pub struct Host {
    core: Arc<FaultCore>,
    shared: Arc<Shared>,
    progress: Arc<Vec<Progress>>,
    drain: Arc<AtomicBool>,
    reactor: Reactor,
    workers: Option<Workers>,
    /// The socket [`Host::bind`] bound: removed when the host finishes or is dropped.
    socket: Option<SocketGuard>,
}

/// What a host run did.
#[derive(Debug)]
pub struct HostReport {
    /// Each device's engine report.
    pub engines: Vec<EngineReport>,
    /// The fault core's counters, all devices.
    pub core: DeviceCounters,
    /// How each VMM connection ended.
    pub disconnects: Vec<String>,
    /// Each device's own fault core counters, in device order (so a run can show that one
    /// device's VMM did not disturb another's).
    pub devices: Vec<DeviceSummary>,
}

/// One device's fault core counters at the end of a run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DeviceSummary {
    /// The device.
    pub device: u32,
    /// Its counters.
    pub core: DeviceCounters,
}

impl Host {
    /// Starts the reactor's threads, the devices' engines (they wait for a VMM) and accepts
    /// VMMs on `listener`.
    pub fn start(config: HostConfig, listener: UnixListener) -> std::io::Result<Self> {
        let core = Arc::new(FaultCore::new(Arc::new(MonotonicClock::new())));
        let mut slots = Vec::new();
        for index in 0..config.workloads.len() {
            let port = FaultPort::add(core.clone(), DeviceId(index as u32 + 1), config.device)
                .map_err(std::io::Error::other)?;
            slots.push(Arc::new(DeviceSlot::new(port)));
        }
        let devices = slots.len();
        let progress: Arc<Vec<Progress>> =
            Arc::new((0..devices).map(|_| Progress::default()).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            slots,
            served: Mutex::new(vec![false; devices]),
            connections: AtomicUsize::new(0),
            disconnects: Mutex::new(Vec::new()),
            unlisted: AtomicU64::new(0),
            reports: Mutex::new((0..devices).map(|_| None).collect()),
            running: AtomicUsize::new(devices),
            stop: stop.clone(),
            ring_entries: config.ring_entries,
        });
        let reactor = Reactor::new().map_err(std::io::Error::other)?;
        let workers = reactor
            .spawn_workers(config.threads.max(1))
            .map_err(std::io::Error::other)?;
        let mut host = Self {
            core,
            shared: shared.clone(),
            progress: progress.clone(),
            drain: drain.clone(),
            reactor: reactor.clone(),
            workers: Some(workers),
            socket: None,
        };
        for (index, workload) in config.workloads.iter().cloned().enumerate() {
            let done_shared = shared.clone();
            let done = Box::new(move |report: EngineReport| {
                done_shared
                    .reports
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)[index] = Some(report);
                done_shared.running.fetch_sub(1, Ordering::SeqCst);
            });
            let engine = EngineSource::new(
                shared.slots[index].clone(),
                workload,
                progress.clone(),
                index,
                config.repeat.then(|| drain.clone()),
                stop.clone(),
                done,
            );
            if let Err(e) = reactor.register(Box::new(engine), EngineSource::wait()) {
                host.stop_reactor();
                return Err(std::io::Error::other(e));
            }
        }
        let accept = Listener::new(listener, move |cx: &Context<'_>, stream| {
            accept(&shared, cx, stream);
        })?;
        if let Err(e) = reactor.register(Box::new(accept), Wait::readable()) {
            host.stop_reactor();
            return Err(std::io::Error::other(e));
        }
        Ok(host)
    }

    /// Binds `path` and starts. Only a stale socket at `path` is replaced: anything that is
    /// not a socket, or a socket another process answers on, is refused and left alone
    /// ([`socket::bind`]). The socket is removed when the host finishes or is dropped, if
    /// `path` still names it.
    pub fn bind(config: HostConfig, path: &Path) -> Result<Self, BindError> {
        let (listener, guard) = socket::bind(path)?;
        let mut host = Self::start(config, listener).map_err(|source| BindError::Start {
            path: path.to_path_buf(),
            source,
        })?;
        host.socket = Some(guard);
        Ok(host)
    }

    /// The path of the socket [`Host::bind`] bound (`None` for a host started on a listener).
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_ref().map(SocketGuard::path)
    }

    /// The reactor serving the devices (to add sources of one's own, or watch its load).
    pub fn reactor(&self) -> &Reactor {
        &self.reactor
    }

    /// Unregisters device `index`'s handler now (its pending groups are answered `Invalid`,
    /// `LIVE` is cleared, so its VMM lets the connection go) and lets no VMM attach to it for
    /// `down`; the next attach is a new handler life, with fresh regions.
    pub fn unregister_for(&self, index: usize, down: Duration) {
        let Some(slot) = self.shared.slots.get(index) else {
            return;
        };
        *slot
            .closed_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + down);
        slot.port.unregister();
    }

    /// Ends a soak ([`HostConfig::repeat`]): the devices issue no more accesses, and their
    /// engines finish once nothing is in flight.
    pub fn drain(&self) {
        self.drain.store(true, Ordering::Relaxed);
    }

    /// Ends the run now (the user interrupted it): every device's engine stops at its next
    /// turn, with accesses still in flight, and no VMM is accepted any more; [`Host::finish`]
    /// then unregisters every device, so the groups still pending are answered.
    pub fn interrupt(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // The engines notice at their next turn: make it now.
        self.reactor.wake_all();
    }

    /// Whether every device has a handler with an attached consumer (a VMM serving it).
    pub fn all_attached(&self) -> bool {
        self.shared
            .slots
            .iter()
            .all(|slot| self.core.consumer_attached(slot.id).unwrap_or(false))
    }

    /// Page request groups pending (sent to a VMM, not answered yet), all devices.
    pub fn pending_groups(&self) -> usize {
        self.shared
            .slots
            .iter()
            .map(|slot| self.core.pending_groups(slot.id).unwrap_or(0))
            .sum()
    }

    /// Progress of each device.
    pub fn progress(&self) -> &[Progress] {
        &self.progress
    }

    /// What an operator watches on this host, every device (`iopf_host::metrics`); it reads the
    /// fault core and the engines' progress while they run.
    pub fn metrics(&self) -> iopf_host::metrics::Metrics {
        iopf_host::metrics::Metrics::new(
            self.core.clone(),
            self.shared.slots.iter().map(|slot| slot.id).collect(),
        )
        .with_progress(self.progress.clone())
    }

    /// The fault core.
    pub fn core(&self) -> &FaultCore {
        &self.core
    }

    /// Whether every engine has finished its workload.
    pub fn finished(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst) == 0
    }

    /// Waits for every engine, then removes the socket (no new VMM can connect), unregisters
    /// every device (so the VMMs see `LIVE` cleared and leave), closes the connections still
    /// open after a grace period, stops the reactor, and reports.
    pub fn finish(mut self) -> HostReport {
        while !self.finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(self.socket.take());
        for slot in &self.shared.slots {
            slot.finished.store(true, Ordering::Relaxed);
            slot.port.unregister();
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        // The VMMs leave once they see LIVE cleared; give them a moment, then close.
        let deadline = Instant::now() + LEAVE_GRACE;
        while self.shared.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop_reactor();
        let engines = std::mem::take(
            &mut *self
                .shared
                .reports
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
        .into_iter()
        .flatten()
        .collect();
        let devices = self
            .shared
            .slots
            .iter()
            .map(|slot| DeviceSummary {
                device: slot.id.0,
                core: self.core.counters(slot.id).unwrap_or_default(),
            })
            .collect();
        let mut disconnects = std::mem::take(
            &mut *self
                .shared
                .disconnects
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let unlisted = self.shared.unlisted.load(Ordering::Relaxed);
        if unlisted > 0 {
            disconnects.push(format!("and {unlisted} more disconnects"));
        }
        HostReport {
            engines,
            core: self.core.total_counters(),
            devices,
            disconnects,
        }
    }

    /// Stops the reactor and joins its threads (the connections still open are closed, the
    /// engines still running report what they did).
    fn stop_reactor(&mut self) {
        self.reactor.stop();
        if let Some(workers) = self.workers.take() {
            workers.join();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.stop_reactor();
    }
}

/// A VMM connected: it gets the first device no other connection serves and that is not
/// closed for a while ([`Host::unregister_for`]); without one, closing the connection is the
/// answer.
fn accept(shared: &Arc<Shared>, cx: &Context<'_>, stream: UnixStream) {
    if shared.stop.load(Ordering::Relaxed) {
        return;
    }
    let free = {
        let mut served = shared.served.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let open = |i: usize| {
            shared.slots[i]
                .closed_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none_or(|until| now >= until)
        };
        let free = (0..served.len()).find(|&i| !served[i] && open(i));
        if let Some(i) = free {
            served[i] = true;
        }
        free
    };
    let Some(index) = free else { return };
    let slot = shared.slots[index].clone();
    let device = match FaultPciDevice::new(slot.clone(), shared.ring_entries) {
        Ok(device) => device,
        Err(e) => {
            ended(shared, index, format!("setup failed: {e}"));
            return;
        }
    };
    let closed_shared = shared.clone();
    let closed = move |device: FaultPciDevice, reason: Option<Result<Disconnect, ServerError>>| {
        device.detach();
        let reason = match reason {
            None | Some(Ok(Disconnect::Closed)) => "closed".to_string(),
            Some(Ok(other)) => format!("{other:?}"),
            Some(Err(e)) => format!("server error: {}", iopf_core::ErrorChain(&e)),
        };
        closed_shared.connections.fetch_sub(1, Ordering::SeqCst);
        ended(&closed_shared, index, reason);
    };
    let source =
        match VfioUserSource::new(stream, Server::new(ServerConfig::default()), device, closed) {
            Ok(source) => source,
            Err(e) => {
                // The device went back with the failed source; nothing was attached.
                ended(
                    shared,
                    index,
                    format!("server error: {}", iopf_core::ErrorChain(&e)),
                );
                return;
            }
        };
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let wait = source.wait();
    if let Err(e) = cx.reactor().register(Box::new(source), wait) {
        // The source was dropped with its device: the VMM sees its socket close.
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        ended(shared, index, format!("cannot serve: {e}"));
    }
}

/// Device `index`'s connection is over: records why, and frees the device for the next VMM.
fn ended(shared: &Shared, index: usize, reason: String) {
    {
        let mut list = shared
            .disconnects
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A host that serves VMM after VMM for days lists the first ones.
        if list.len() < MAX_DISCONNECTS_LISTED {
            list.push(format!("{}: {reason}", shared.slots[index].id));
        } else {
            shared.unlisted.fetch_add(1, Ordering::Relaxed);
        }
    }
    shared.served.lock().unwrap_or_else(PoisonError::into_inner)[index] = false;
}
