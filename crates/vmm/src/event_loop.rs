//! One thread serving many devices: an epoll set over each device's fault fd and wake fd.
//!
//! Every device outside a round is *armed*: its channel said
//! [`prepare_to_sleep`](Device::prepare_to_sleep) `true` (the host was asked for a wake-up)
//! before the loop sleeps, so a fault published after the device was last read rings its fd
//! and ends the sleep: no wake-up is lost.

use std::collections::BTreeMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::time::Duration;

use iopf_queue::{FaultChannel, SharedMemoryChannel};
use rustix::event::Timespec;
use rustix::event::epoll;
use thiserror::Error;

use crate::device::{BACKLOG_RETRY, Device, READ_BATCH, VmmError};
use crate::viommu::Viommu;

/// Batches of [`READ_BATCH`] records one device may read in a round before the others get
/// their turn (it is served again in the next round, without sleeping).
const BATCHES_PER_ROUND: usize = 8;

/// Events one `epoll_wait` returns at most.
const EVENTS_PER_WAIT: usize = 64;

/// A device's name in an [`EventLoop`] (never reused by that loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceKey(u64);

/// Why the loop itself failed (a device's own failure is reported in [`Round::failed`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EventLoopError {
    /// `epoll_create` failed.
    #[error("cannot create the epoll set")]
    Create(#[source] io::Error),
    /// A device's fd could not be added to the epoll set.
    #[error("cannot add a device's fd to the epoll set")]
    Register(#[source] io::Error),
    /// `epoll_wait` failed.
    #[error("cannot wait on the epoll set")]
    Wait(#[source] io::Error),
    /// No device has this key (removed, failed, or never added).
    #[error("no device {0:?} in the loop")]
    NoDevice(DeviceKey),
}

/// A device that failed during a round: removed from the loop and handed back.
#[derive(Debug)]
pub struct Failed<C: FaultChannel> {
    /// The key it had.
    pub key: DeviceKey,
    /// The device (its stats, its channel).
    pub device: Device<C>,
    /// What failed.
    pub error: VmmError,
}

/// What one [`EventLoop::run_once`] did.
#[derive(Debug)]
pub struct Round<C: FaultChannel> {
    /// Fault records read, over all devices.
    pub faults: usize,
    /// Devices that failed (a broken queue): removed from the loop; the others were served.
    pub failed: Vec<Failed<C>>,
}

#[derive(Debug)]
struct Slot<C: FaultChannel> {
    device: Device<C>,
    /// In the ready list: its fd fired, it was just added, or it was not done.
    ready: bool,
    /// In the backlog list: answers wait in its outbox for room in the response ring.
    backlogged: bool,
    /// The handler life whose channel fd is in the epoll set.
    registered_life: u64,
}

/// Serves many [`Device`]s from one thread.
///
/// ```no_run
/// # fn demo(mut events: iopf_vmm::EventLoop, mut viommu: impl iopf_vmm::Viommu) -> Result<(), Box<dyn std::error::Error>> {
/// loop {
///     let round = events.run_once(&mut viommu, Some(std::time::Duration::from_millis(100)))?;
///     for failed in round.failed {
///         eprintln!("device {:?}: {}", failed.key, failed.error);
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct EventLoop<C: FaultChannel = SharedMemoryChannel> {
    epoll: OwnedFd,
    slots: BTreeMap<DeviceKey, Slot<C>>,
    /// The devices to serve in the next round, so that a round costs what its ready devices
    /// cost, not what the loop holds (each key once: `Slot::ready`).
    ready: Vec<DeviceKey>,
    /// The devices whose answers wait for ring room (each key once: `Slot::backlogged`).
    backlogged: Vec<DeviceKey>,
    next_key: u64,
}

/// The epoll data of a device's fds: its key, and which fd.
fn data(key: DeviceKey, wake: bool) -> epoll::EventData {
    epoll::EventData::new_u64(key.0 << 1 | u64::from(wake))
}

impl<C: FaultChannel> EventLoop<C> {
    /// An empty loop.
    pub fn new() -> Result<Self, EventLoopError> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| EventLoopError::Create(e.into()))?;
        Ok(Self {
            epoll,
            slots: BTreeMap::new(),
            ready: Vec::new(),
            backlogged: Vec::new(),
            next_key: 0,
        })
    }

    /// Adds `device`; it is served from the next round on.
    pub fn add(&mut self, device: Device<C>) -> Result<DeviceKey, EventLoopError> {
        let key = DeviceKey(self.next_key);
        self.next_key += 1;
        epoll::add(
            &self.epoll,
            device.wake_fd(),
            data(key, true),
            epoll::EventFlags::IN,
        )
        .map_err(|e| EventLoopError::Register(e.into()))?;
        if let Err(e) = epoll::add(
            &self.epoll,
            device.poll_fd(),
            data(key, false),
            epoll::EventFlags::IN,
        ) {
            self.forget(&device);
            return Err(EventLoopError::Register(e.into()));
        }
        let registered_life = device.life();
        self.slots.insert(
            key,
            Slot {
                device,
                ready: true,
                backlogged: false,
                registered_life,
            },
        );
        self.ready.push(key);
        Ok(key)
    }

    /// Takes the fds of `device` out of the epoll set.
    fn forget(&self, device: &Device<C>) {
        // Both fds are open (the device holds them), so a delete fails only for an fd that was
        // never added; and an event left behind would name a key this loop never reuses.
        let _ = epoll::delete(&self.epoll, device.wake_fd());
        let _ = epoll::delete(&self.epoll, device.poll_fd());
    }

    /// Removes a device and hands it back.
    pub fn remove(&mut self, key: DeviceKey) -> Option<Device<C>> {
        let slot = self.slots.remove(&key)?;
        self.forget(&slot.device);
        Some(slot.device)
    }

    /// A device.
    pub fn device(&self, key: DeviceKey) -> Option<&Device<C>> {
        self.slots.get(&key).map(|s| &s.device)
    }

    /// A device, mutably; it is served in the next round. Replace its channel with
    /// [`replace_channel`](Self::replace_channel), not through this.
    pub fn device_mut(&mut self, key: DeviceKey) -> Option<&mut Device<C>> {
        self.mark_ready(key);
        self.slots.get_mut(&key).map(|slot| &mut slot.device)
    }

    /// Puts a device in the ready list (once).
    fn mark_ready(&mut self, key: DeviceKey) {
        if let Some(slot) = self.slots.get_mut(&key)
            && !slot.ready
        {
            slot.ready = true;
            self.ready.push(key);
        }
    }

    /// Gives a device the channel of a new handler life (see [`Device::replace_channel`]),
    /// moving the loop's watch from the old channel's fd to the new one's. Returns the old
    /// channel.
    pub fn replace_channel(&mut self, key: DeviceKey, channel: C) -> Result<C, EventLoopError> {
        let slot = self
            .slots
            .get_mut(&key)
            .ok_or(EventLoopError::NoDevice(key))?;
        // The old fd is still open here: the delete cannot fail but for an fd never added.
        let _ = epoll::delete(&self.epoll, slot.device.poll_fd());
        let old = slot.device.replace_channel(channel);
        slot.registered_life = slot.device.life();
        self.mark_ready(key);
        let slot = self
            .slots
            .get_mut(&key)
            .ok_or(EventLoopError::NoDevice(key))?;
        epoll::add(
            &self.epoll,
            slot.device.poll_fd(),
            data(key, false),
            epoll::EventFlags::IN,
        )
        .map_err(|e| EventLoopError::Register(e.into()))?;
        Ok(old)
    }

    /// The devices, by key.
    pub fn devices(&self) -> impl Iterator<Item = (DeviceKey, &Device<C>)> {
        self.slots.iter().map(|(&k, s)| (k, &s.device))
    }

    /// How many devices the loop serves.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the loop serves no device.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// One round: serves the devices that are ready (new ones, and those not done last
    /// round), sleeps until a device's fd fires or `timeout` passes (`None`: no limit; no
    /// sleep while a device is not done; at most [`BACKLOG_RETRY`] while answers wait for ring
    /// room), then serves the devices that fired. Serving a device reads until its channel
    /// is idle, then arms it ([`Device::prepare_to_sleep`]) before any sleep.
    ///
    /// A device that fails is removed and returned in [`Round::failed`]; the others are
    /// served as usual.
    pub fn run_once<V: Viommu + ?Sized>(
        &mut self,
        viommu: &mut V,
        timeout: Option<Duration>,
    ) -> Result<Round<C>, EventLoopError> {
        let mut round = Round {
            faults: 0,
            failed: Vec::new(),
        };
        let busy = self.serve_ready(viommu, &mut round);
        let backlog = !self.backlogged.is_empty();
        let timeout = if busy {
            Some(Duration::ZERO)
        } else if backlog {
            Some(timeout.map_or(BACKLOG_RETRY, |t| t.min(BACKLOG_RETRY)))
        } else {
            timeout
        };
        let timeout = timeout.map(|t| {
            Timespec::try_from(t).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            })
        });
        // Level-triggered: fds beyond these fire again at the next wait.
        let mut events = [const { MaybeUninit::<epoll::Event>::uninit() }; EVENTS_PER_WAIT];
        let fired = match epoll::wait(&self.epoll, &mut events, timeout.as_ref()) {
            Ok((fired, _)) => fired,
            Err(rustix::io::Errno::INTR) => &mut [],
            Err(e) => return Err(EventLoopError::Wait(e.into())),
        };
        let mut broken = Vec::new();
        for event in fired.iter() {
            let key = DeviceKey(event.data.u64() >> 1);
            let wake = event.data.u64() & 1 == 1;
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            // Drain the fd that fired (its device may have fired for the other one too:
            // each is drained once, when its own event comes).
            if let Err(error) = slot.device.woke_fired(!wake, wake) {
                broken.push((key, error));
                continue;
            }
            if !slot.ready {
                slot.ready = true;
                self.ready.push(key);
            }
        }
        self.fail(broken, &mut round);
        // Answers waiting for ring room are retried too.
        for key in std::mem::take(&mut self.backlogged) {
            if let Some(slot) = self.slots.get_mut(&key) {
                slot.backlogged = false;
            }
            self.mark_ready(key);
        }
        self.serve_ready(viommu, &mut round);
        Ok(round)
    }

    /// Serves every ready device; returns whether one is not done (it stays ready).
    fn serve_ready<V: Viommu + ?Sized>(&mut self, viommu: &mut V, round: &mut Round<C>) -> bool {
        let mut busy = false;
        let mut broken = Vec::new();
        for key in std::mem::take(&mut self.ready) {
            // Removed since it was listed (its key is never reused): nothing to serve.
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            if slot.registered_life != slot.device.life() {
                // The channel was replaced behind the loop's back (through `device_mut`): the
                // old fd is gone from the set with its file; watch the new one.
                if let Err(e) = epoll::add(
                    &self.epoll,
                    slot.device.poll_fd(),
                    data(key, false),
                    epoll::EventFlags::IN,
                ) {
                    broken.push((key, VmmError::Watch(e.into())));
                    continue;
                }
                slot.registered_life = slot.device.life();
            }
            match serve(&mut slot.device, viommu) {
                Ok((faults, done)) => {
                    round.faults += faults;
                    slot.ready = !done;
                    busy |= !done;
                    if !done {
                        self.ready.push(key);
                    }
                    if !slot.backlogged && slot.device.backlog() > 0 {
                        slot.backlogged = true;
                        self.backlogged.push(key);
                    }
                }
                Err(error) => {
                    slot.ready = false;
                    broken.push((key, error));
                }
            }
        }
        self.fail(broken, round);
        busy
    }

    /// Removes the devices that failed and hands them back in `round`.
    fn fail(&mut self, broken: Vec<(DeviceKey, VmmError)>, round: &mut Round<C>) {
        for (key, error) in broken {
            if let Some(device) = self.remove(key) {
                round.failed.push(Failed { key, device, error });
            }
        }
    }
}

/// Serves one device until its channel is idle and armed (`done`), or its share of the round is
/// used up. Returns the records read and whether it is done.
fn serve<C: FaultChannel, V: Viommu + ?Sized>(
    device: &mut Device<C>,
    viommu: &mut V,
) -> Result<(usize, bool), VmmError> {
    let mut read = 0;
    for _ in 0..BATCHES_PER_ROUND {
        let n = device.poll(viommu)?;
        read += n;
        if n < READ_BATCH && device.prepare_to_sleep()? {
            return Ok((read, true));
        }
    }
    Ok((read, false))
}
