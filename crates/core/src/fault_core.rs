//! The registry of devices, and the entry points the IOMMU side, the VMM side and the event
//! loop call.
//!
//! Locking: the device map is behind a read-write lock held only long enough to clone a
//! device's `Arc`; each device's state is behind its own mutex. Reporting for one device never
//! waits for another device. Responses are handed to the device's sink after its lock is
//! released, so a sink may report new faults from inside `page_response`.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use iopf_abi::ResponseRecord;
use thiserror::Error;

use crate::clock::{Clock, Nanos};
use crate::counters::DeviceCounters;
use crate::device::DeviceState;
use crate::handler::FaultHandler;
use crate::types::{
    AutoReason, DeviceConfig, DeviceFault, DeviceId, DeviceResponse, DeviceSink, Refusal,
};

/// Errors of the core's entry points.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CoreError {
    /// No device with this id.
    #[error("{0} is not known to the fault core")]
    UnknownDevice(DeviceId),
    /// A device with this id exists already.
    #[error("{0} exists already")]
    DeviceExists(DeviceId),
    /// A handler is registered for the device already.
    #[error("{0} has a fault handler registered already")]
    AlreadyRegistered(DeviceId),
}

#[derive(Debug)]
struct Device {
    sink: Arc<dyn DeviceSink>,
    state: Mutex<DeviceState>,
}

impl Device {
    fn lock(&self) -> MutexGuard<'_, DeviceState> {
        // Nothing under this lock panics by design; if something did, the state is still
        // consistent enough to answer groups, which beats wedging the device.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hashes a `DeviceId` with one multiplication (Fibonacci hashing): ids are small, often
/// consecutive integers chosen by the host, never by a peer, so no keyed hash is needed.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The devices, twice: in id order for sweeps, and in a hash table for the per-fault lookup
/// (one or two cache lines whatever the number of devices, where a B-tree walk touches a few
/// nodes more at every level it grows).
#[derive(Debug, Default)]
struct Devices {
    ordered: BTreeMap<DeviceId, Arc<Device>>,
    by_id: HashMap<DeviceId, Arc<Device>, BuildHasherDefault<IdHasher>>,
}

/// The host's fault core (`docs/DESIGN.md` §2.2 and §4).
#[derive(Debug)]
pub struct FaultCore {
    clock: Arc<dyn Clock>,
    /// Ordered, so that sweeps over all devices (expiry, totals) run in the same order every time:
    /// a deterministic simulation depends on it.
    devices: RwLock<Devices>,
    /// Counters of removed devices, so the totals never go backwards.
    retired: Mutex<DeviceCounters>,
}

impl FaultCore {
    /// A core with no devices, timing responses with `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            devices: RwLock::new(Devices::default()),
            retired: Mutex::new(DeviceCounters::default()),
        }
    }

    /// The core's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Adds a device; its responses go to `sink`.
    pub fn add_device(
        &self,
        id: DeviceId,
        config: DeviceConfig,
        sink: Arc<dyn DeviceSink>,
    ) -> Result<(), CoreError> {
        let mut devices = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        if devices.by_id.contains_key(&id) {
            return Err(CoreError::DeviceExists(id));
        }
        let device = Arc::new(Device {
            sink,
            state: Mutex::new(DeviceState::new(id, config)),
        });
        devices.ordered.insert(id, Arc::clone(&device));
        devices.by_id.insert(id, device);
        Ok(())
    }

    /// Removes a device, unregistering its handler first (its pending groups are answered).
    pub fn remove_device(&self, id: DeviceId) -> Result<DeviceCounters, CoreError> {
        self.unregister_for(id, AutoReason::Unregister)?;
        let device = {
            let mut devices = self.devices.write().unwrap_or_else(PoisonError::into_inner);
            devices.ordered.remove(&id);
            devices.by_id.remove(&id)
        }
        .ok_or(CoreError::UnknownDevice(id))?;
        let counters = device.lock().counters;
        *self.retired.lock().unwrap_or_else(PoisonError::into_inner) += &counters;
        Ok(counters)
    }

    fn device(&self, id: DeviceId) -> Result<Arc<Device>, CoreError> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .get(&id)
            .cloned()
            .ok_or(CoreError::UnknownDevice(id))
    }

    /// Runs `f` on the device's state under its lock, then delivers the responses it produced.
    fn with<R>(
        &self,
        id: DeviceId,
        f: impl FnOnce(&mut DeviceState, Nanos, &mut Vec<DeviceResponse>) -> R,
    ) -> Result<R, CoreError> {
        let device = self.device(id)?;
        let mut out = Vec::new();
        let (result, wakes) = {
            let mut state = device.lock();
            let result = f(&mut state, self.clock.now(), &mut out);
            (result, std::mem::take(&mut state.wakes))
        };
        for response in out {
            device.sink.page_response(id, response);
        }
        // Outside the lock: the consumer owns these eventfds (see `Wake`).
        for wake in wakes {
            if let Err(e) = wake.ring() {
                tracing::warn!(device = %id, error = %e, "cannot ring the consumer's doorbell");
            }
        }
        Ok(result)
    }

    /// Registers `handler` for the device. A second registration while one is live is an
    /// error (the new handler is dropped).
    pub fn register(&self, id: DeviceId, handler: Box<dyn FaultHandler>) -> Result<(), CoreError> {
        let _span = tracing::info_span!("register", device = id.0).entered();
        self.with(id, |state, _, _| state.register(handler))?
            .map_err(|_| CoreError::AlreadyRegistered(id))
    }

    /// Unregisters the device's handler. Never fails and never waits on the VMM: every
    /// pending group is answered `Invalid` before this returns, and nothing of the handler is
    /// reachable afterwards. Returns how many groups were answered (0 for an unknown device
    /// or one without a handler).
    pub fn unregister(&self, id: DeviceId) -> usize {
        self.unregister_for(id, AutoReason::Unregister).unwrap_or(0)
    }

    /// The VMM serving the device is gone (its socket hung up): the same as unregister, counted
    /// apart.
    pub fn vmm_gone(&self, id: DeviceId) -> usize {
        self.unregister_for(id, AutoReason::VmmGone).unwrap_or(0)
    }

    /// A function-level reset of the device as its VMM sees it (`VFIO_USER_DEVICE_RESET`).
    /// Responses already in the response queue are applied first; then every group still
    /// pending is answered `Invalid` (`reset`) and partial groups are discarded. Unlike
    /// [`unregister`](Self::unregister), the handler stays: its queues, their doorbells and
    /// `LIVE` are untouched, and the cookie counter goes on, so the VMM's late answers to the
    /// groups the reset answered are refused (`unknown_cookie`). Never waits on the VMM.
    /// Returns how many groups the reset answered.
    pub fn reset_device(&self, id: DeviceId) -> Result<usize, CoreError> {
        let _span = tracing::info_span!("reset", device = id.0).entered();
        self.with(id, |state, now, out| state.reset(now, out))
    }

    fn unregister_for(&self, id: DeviceId, reason: AutoReason) -> Result<usize, CoreError> {
        let _span = tracing::info_span!("unregister", device = id.0, ?reason).entered();
        self.with(id, |state, _, out| state.unregister(reason, out))
    }

    /// Whether the device has a handler registered.
    pub fn is_registered(&self, id: DeviceId) -> Result<bool, CoreError> {
        self.with(id, |state, _, _| state.has_handler())
    }

    /// Whether the device has a handler whose consumer has attached (speaks ABI v2).
    pub fn consumer_attached(&self, id: DeviceId) -> Result<bool, CoreError> {
        self.with(id, |state, _, _| state.consumer_attached())
    }

    /// Sets the doorbell the device's handler rings for a sleeping consumer (the fault IRQ
    /// eventfd). Returns whether a handler was there to take it.
    pub fn set_fault_doorbell(
        &self,
        id: DeviceId,
        doorbell: Option<iopf_queue::Doorbell>,
    ) -> Result<bool, CoreError> {
        self.with(id, |state, _, _| state.set_fault_doorbell(doorbell))
    }

    /// Reports one fault from the device and publishes it at once.
    pub fn report(&self, id: DeviceId, fault: &DeviceFault) -> Result<(), CoreError> {
        self.report_batch(id, std::slice::from_ref(fault))
    }

    /// Reports many faults from the device and publishes them together: one index store and
    /// at most one doorbell ring for the whole batch.
    pub fn report_batch(&self, id: DeviceId, faults: &[DeviceFault]) -> Result<(), CoreError> {
        self.with(id, |state, now, out| {
            for fault in faults {
                state.report(fault, now, out);
            }
            state.publish(out);
        })
    }

    /// Applies one response record that reached the host by another path than the response
    /// queue (a region write, say). Untrusted: checked exactly as queued responses are.
    pub fn respond(
        &self,
        id: DeviceId,
        record: &ResponseRecord,
    ) -> Result<Result<(), Refusal>, CoreError> {
        self.with(id, |state, now, out| state.respond(record, now, out))
    }

    /// Reads the device's response queue (one bounded batch) and applies every response.
    /// Returns how many records were read; call again while it returns a full batch.
    pub fn process_responses(&self, id: DeviceId) -> Result<usize, CoreError> {
        let read = self.with(id, |state, now, out| state.process_responses(now, out))?;
        #[cfg(feature = "mutant-cross-device")]
        self.mutant_route_across_devices(id);
        Ok(read)
    }

    /// Test-only mutant (feature `mutant-cross-device`, never on by default): a response
    /// whose cookie its own device does not know is applied to whichever other device has a
    /// group pending under that cookie, as a host that looked groups up by cookie alone would.
    #[cfg(feature = "mutant-cross-device")]
    fn mutant_route_across_devices(&self, id: DeviceId) {
        let Ok(unknown) = self.with(id, |state, _, _| std::mem::take(&mut state.unknown)) else {
            return;
        };
        let others: Vec<DeviceId> = self
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .ordered
            .keys()
            .copied()
            .filter(|&other| other != id)
            .collect();
        for record in unknown {
            for &other in &others {
                if matches!(self.respond(other, &record), Ok(Ok(()))) {
                    break;
                }
            }
        }
    }

    /// For an event loop about to sleep on the device's response doorbell: asks the VMM to ring
    /// it for its next response (`NEED_WAKEUP`). `true`: sleep; `false`: responses are already
    /// waiting (or the device has no handler). Call [`woke`](Self::woke) after the sleep.
    pub fn prepare_to_sleep(&self, id: DeviceId) -> Result<bool, CoreError> {
        self.with(id, |state, _, out| state.prepare_to_sleep(out))
    }

    /// Withdraws [`prepare_to_sleep`](Self::prepare_to_sleep) after waking.
    pub fn woke(&self, id: DeviceId) -> Result<(), CoreError> {
        self.with(id, |state, _, _| state.woke())
    }

    /// Answers every group of every device whose response timeout has passed. Returns how
    /// many groups timed out.
    pub fn expire(&self) -> usize {
        let ids: Vec<DeviceId> = self
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .ordered
            .keys()
            .copied()
            .collect();
        ids.into_iter()
            .filter_map(|id| self.with(id, |state, now, out| state.expire(now, out)).ok())
            .sum()
    }

    /// Answers device `id`'s groups whose response timeout has passed (what [`expire`]
    /// does for one device: a loop that serves each device in turn calls this rather than
    /// walking every device each time). Returns how many groups timed out.
    ///
    /// [`expire`]: Self::expire
    pub fn expire_device(&self, id: DeviceId) -> Result<usize, CoreError> {
        self.with(id, |state, now, out| state.expire(now, out))
    }

    /// The earliest response deadline of any device, for an event loop's sleep.
    pub fn next_deadline(&self) -> Option<Nanos> {
        let devices: Vec<Arc<Device>> = self
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .ordered
            .values()
            .cloned()
            .collect();
        devices
            .iter()
            .filter_map(|d| d.lock().next_deadline())
            .min()
    }

    /// Groups delivered to the device's VMM and not answered yet.
    pub fn pending_groups(&self, id: DeviceId) -> Result<usize, CoreError> {
        self.with(id, |state, _, _| state.pending_groups())
    }

    /// For watching: the device's fault records published and not consumed yet, and its fault
    /// ring's entries; `None` without a handler or when its transport cannot tell.
    pub fn fault_queue_fill(&self, id: DeviceId) -> Result<Option<(u32, u32)>, CoreError> {
        self.with(id, |state, _, _| state.fault_queue_fill())
    }

    /// The device's counters.
    pub fn counters(&self, id: DeviceId) -> Result<DeviceCounters, CoreError> {
        self.with(id, |state, _, _| state.counters)
    }

    /// The counters of every device, present and removed, summed.
    pub fn total_counters(&self) -> DeviceCounters {
        let mut total = *self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        let devices: Vec<Arc<Device>> = self
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .ordered
            .values()
            .cloned()
            .collect();
        for device in devices {
            total += &device.lock().counters;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::device::tests::FakeVmm;

    #[derive(Debug)]
    struct NoSink;

    impl DeviceSink for NoSink {
        fn page_response(&self, _device: DeviceId, _response: DeviceResponse) {}
    }

    #[test]
    fn fault_doorbell_is_taken_only_by_a_registered_handler() {
        let core = FaultCore::new(Arc::new(ManualClock::new(0)));
        let id = DeviceId(3);
        core.add_device(id, DeviceConfig::default(), Arc::new(NoSink))
            .unwrap();
        assert!(!core.set_fault_doorbell(id, None).unwrap());
        core.register(id, Box::new(FakeVmm::default())).unwrap();
        assert!(core.set_fault_doorbell(id, None).unwrap());
        assert!(core.set_fault_doorbell(DeviceId(4), None).is_err());
    }

    #[test]
    fn prepare_to_sleep_and_woke_reach_the_handler() {
        let core = FaultCore::new(Arc::new(ManualClock::new(0)));
        let (idle, busy) = (DeviceId(3), DeviceId(4));
        let woke = Arc::new(Mutex::new(0));
        for id in [idle, busy] {
            core.add_device(id, DeviceConfig::default(), Arc::new(NoSink))
                .unwrap();
        }
        core.register(
            idle,
            Box::new(FakeVmm {
                woke: woke.clone(),
                ..FakeVmm::default()
            }),
        )
        .unwrap();
        core.register(
            busy,
            Box::new(FakeVmm {
                responses_waiting: true,
                ..FakeVmm::default()
            }),
        )
        .unwrap();
        assert!(core.prepare_to_sleep(idle).unwrap(), "queue empty: sleep");
        assert!(!core.prepare_to_sleep(busy).unwrap(), "responses waiting");
        core.woke(idle).unwrap();
        assert_eq!(*woke.lock().unwrap(), 1, "the request is withdrawn");
        assert!(core.woke(DeviceId(5)).is_err(), "no such device");
    }

    #[test]
    fn fault_queue_fill_is_the_devices_handlers() {
        let core = FaultCore::new(Arc::new(ManualClock::new(0)));
        let id = DeviceId(3);
        core.add_device(id, DeviceConfig::default(), Arc::new(NoSink))
            .unwrap();
        assert_eq!(core.fault_queue_fill(id).unwrap(), None, "no handler");
        core.register(
            id,
            Box::new(FakeVmm {
                fill: Some((3, 256)),
                ..FakeVmm::default()
            }),
        )
        .unwrap();
        assert_eq!(core.fault_queue_fill(id).unwrap(), Some((3, 256)));
        assert!(
            core.fault_queue_fill(DeviceId(4)).is_err(),
            "no such device"
        );
    }
}
