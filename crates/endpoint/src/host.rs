//! The simulated endpoints' host process: devices with their engines, a socket, one thread
//! per VMM connection, each serving a [`FaultPciDevice`]. A connection takes the first device no other connection serves; closing it is
//! unregister (the VMM is gone: its device's pending groups are answered `Invalid`), and a new
//! connection can take the device over.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use iopf_core::{DeviceConfig, DeviceCounters, DeviceId, FaultCore, MonotonicClock};
use iopf_vfio_user::{Disconnect, Server, ServerConfig};

use iopf_host::FaultPort;
use iopf_host::socket::{self, BindError, SocketGuard};

use crate::engine::{self, DeviceSlot, EngineReport, Progress, Workload};
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
}

/// A VMM connection: a handle on its socket (to close it) and the thread serving it.
type Connection = (UnixStream, JoinHandle<()>);

/// How many VMM disconnects a report lists; past them, it counts.
const MAX_DISCONNECTS_LISTED: usize = 1024;

/// A running host.
#[derive(Debug)]
pub struct Host {
    core: Arc<FaultCore>,
    slots: Vec<Arc<DeviceSlot>>,
    served: Arc<Mutex<Vec<bool>>>,
    progress: Arc<Vec<Progress>>,
    stop: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
    engines: Vec<JoinHandle<EngineReport>>,
    connections: Arc<Mutex<Vec<Connection>>>,
    disconnects: Arc<Mutex<Vec<String>>>,
    /// Disconnects past [`MAX_DISCONNECTS_LISTED`].
    unlisted: Arc<AtomicU64>,
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
    /// Starts the devices' engines (they wait for a VMM) and serves `listener` in a thread.
    pub fn start(config: HostConfig, listener: UnixListener) -> std::io::Result<Self> {
        let core = Arc::new(FaultCore::new(Arc::new(MonotonicClock::new())));
        let mut slots = Vec::new();
        for index in 0..config.workloads.len() {
            let port = FaultPort::add(core.clone(), DeviceId(index as u32 + 1), config.device)
                .map_err(std::io::Error::other)?;
            slots.push(Arc::new(DeviceSlot::new(port)));
        }
        let progress: Arc<Vec<Progress>> =
            Arc::new((0..slots.len()).map(|_| Progress::default()).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        let repeat = config.repeat;
        let engines = slots
            .iter()
            .zip(config.workloads.iter().cloned())
            .enumerate()
            .map(|(index, (slot, workload))| {
                let (core, slot, progress, stop, drain) = (
                    core.clone(),
                    slot.clone(),
                    progress.clone(),
                    stop.clone(),
                    drain.clone(),
                );
                std::thread::spawn(move || {
                    let drain = repeat.then_some(&*drain);
                    engine::run_until(&core, &slot, &workload, &progress[index], &stop, drain)
                })
            })
            .collect();
        let host = Self {
            core,
            slots,
            served: Arc::new(Mutex::new(vec![false; config.workloads.len()])),
            progress,
            stop,
            drain,
            engines,
            connections: Arc::new(Mutex::new(Vec::new())),
            disconnects: Arc::new(Mutex::new(Vec::new())),
            unlisted: Arc::new(AtomicU64::new(0)),
            socket: None,
        };
        host.accept_in_background(listener, config.ring_entries);
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

    /// Accepts VMM connections until the host finishes. The accepting thread notices the end
    /// at its next connection attempt; a process that embeds a `Host` and outlives it keeps
    /// that one thread blocked in `accept` until then.
    fn accept_in_background(&self, listener: UnixListener, ring_entries: u32) {
        let unlisted = self.unlisted.clone();
        let (slots, served, connections, disconnects, stop) = (
            self.slots.clone(),
            self.served.clone(),
            self.connections.clone(),
            self.disconnects.clone(),
            self.stop.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let free = {
                    let mut served = served.lock().unwrap_or_else(PoisonError::into_inner);
                    let now = std::time::Instant::now();
                    let open = |i: usize| {
                        slots[i]
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
                // No free device: closing the connection is the answer.
                let Some(index) = free else { continue };
                let Ok(control) = stream.try_clone() else {
                    continue;
                };
                let (slot, served, disconnects, unlisted) = (
                    slots[index].clone(),
                    served.clone(),
                    disconnects.clone(),
                    unlisted.clone(),
                );
                let thread = std::thread::spawn(move || {
                    let reason = match FaultPciDevice::new(slot.clone(), ring_entries) {
                        Ok(mut device) => {
                            let server = Server::new(ServerConfig::default());
                            let reason = match server.serve(stream, &mut device) {
                                Ok(Disconnect::Closed) => "closed".to_string(),
                                Ok(other) => format!("{other:?}"),
                                Err(e) => format!("server error: {}", iopf_core::ErrorChain(&e)),
                            };
                            device.detach();
                            reason
                        }
                        Err(e) => format!("setup failed: {e}"),
                    };
                    {
                        let mut list = disconnects.lock().unwrap_or_else(PoisonError::into_inner);
                        // A host that serves VMM after VMM for days lists the first ones.
                        if list.len() < MAX_DISCONNECTS_LISTED {
                            list.push(format!("{}: {reason}", slot.id));
                        } else {
                            unlisted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    served.lock().unwrap_or_else(PoisonError::into_inner)[index] = false;
                });
                let mut connections = connections.lock().unwrap_or_else(PoisonError::into_inner);
                // Forget the connections whose VMM has left: join their threads and close
                // their sockets, so serving VMM after VMM costs no fd and no thread for good.
                let (ended, open): (Vec<Connection>, Vec<Connection>) =
                    std::mem::take(&mut *connections)
                        .into_iter()
                        .partition(|(_, thread)| thread.is_finished());
                *connections = open;
                for (_, thread) in ended {
                    // A connection thread that panicked has already dropped its VMM (the
                    // device's `vmm_gone` ran in its drop): nothing is left to answer.
                    let _ = thread.join();
                }
                connections.push((control, thread));
            }
        });
    }

    /// Unregisters device `index`'s handler now (its pending groups are answered `Invalid`,
    /// `LIVE` is cleared, so its VMM lets the connection go) and lets no VMM attach to it for
    /// `down`; the next attach is a new handler life, with fresh regions.
    pub fn unregister_for(&self, index: usize, down: std::time::Duration) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        *slot
            .closed_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(std::time::Instant::now() + down);
        slot.port.unregister();
    }

    /// Ends a soak ([`HostConfig::repeat`]): the devices issue no more accesses, and their
    /// engines finish once nothing is in flight.
    pub fn drain(&self) {
        self.drain.store(true, Ordering::Relaxed);
    }

    /// Ends the run now (the user interrupted it): every device's engine stops at once, with
    /// accesses still in flight, and no VMM is accepted any more; [`Host::finish`] then
    /// unregisters every device, so the groups still pending are answered.
    pub fn interrupt(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether every device has a handler with an attached consumer (a VMM serving it).
    pub fn all_attached(&self) -> bool {
        self.slots
            .iter()
            .all(|slot| self.core.consumer_attached(slot.id).unwrap_or(false))
    }

    /// Page request groups pending (sent to a VMM, not answered yet), all devices.
    pub fn pending_groups(&self) -> usize {
        self.slots
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
            self.slots.iter().map(|slot| slot.id).collect(),
        )
        .with_progress(self.progress.clone())
    }

    /// The fault core.
    pub fn core(&self) -> &FaultCore {
        &self.core
    }

    /// Whether every engine has finished its workload.
    pub fn finished(&self) -> bool {
        self.engines.iter().all(JoinHandle::is_finished)
    }

    /// Waits for every engine, then removes the socket (no new VMM can connect), unregisters
    /// every device (so the VMMs see `LIVE` cleared and leave), closes the connections, and
    /// reports.
    pub fn finish(mut self) -> HostReport {
        let engines: Vec<EngineReport> = self
            .engines
            .drain(..)
            .filter_map(|e| e.join().ok())
            .collect();
        drop(self.socket.take());
        for slot in &self.slots {
            slot.finished.store(true, Ordering::Relaxed);
            self.core.unregister(slot.id);
        }
        self.stop.store(true, Ordering::Relaxed);
        // The VMMs leave once they see LIVE cleared; give them a moment, then close.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let connections = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (control, thread) in connections {
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // Fails only if the VMM closed the socket first, which is what is wanted.
            let _ = control.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
        let devices = self
            .slots
            .iter()
            .map(|slot| DeviceSummary {
                device: slot.id.0,
                core: self.core.counters(slot.id).unwrap_or_default(),
            })
            .collect();
        let mut disconnects = std::mem::take(
            &mut *self
                .disconnects
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let unlisted = self.unlisted.load(Ordering::Relaxed);
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
}
