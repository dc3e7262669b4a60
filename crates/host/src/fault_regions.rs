//! The fault regions as a component any vfio-user device embeds: the DMA fault region, the DMA
//! fault response region with its ioeventfd, the DMA fault IRQ, and the life of the device's
//! fault handler on the [`FaultCore`] (`docs/PROTOCOL.md` §4 lists every value).
//!
//! Two types, for two lifetimes:
//!
//! - [`FaultPort`]: the device on the fault core, for the device's whole life (across VMM
//!   connections). The device's DMA engine reports page requests and unrecoverable faults
//!   through it ([`FaultPort::report_batch`]) and takes the answers from it
//!   ([`FaultPort::drain_responses`]): exactly one [`DeviceResponse`] per page request group,
//!   from the guest or from the host itself (no VMM, timeout, reset, ...).
//! - [`FaultRegions`]: one VMM connection's handler life. [`FaultRegions::attach`] creates the
//!   two queues and registers their handler; [`FaultRegions::detach`] (or dropping it) is the
//!   VMM gone; [`FaultRegions::reset`] is the device's function-level reset. Its
//!   `region_*`, `irq_info` and `set_irqs` methods answer for the indices it owns
//!   ([`DMA_FAULT_REGION_INDEX`], [`DMA_FAULT_RESPONSE_REGION_INDEX`],
//!   [`DMA_FAULT_IRQ_INDEX`]) and `None` for any other, so a device's
//!   [`VfioUserDevice`](iopf_vfio_user::VfioUserDevice) implementation forwards to it first and serves its own BARs, config space and DMA.
//!
//! The component knows nothing of the device's DMA engine, its address translation or its
//! registers. A device that shows the PRI capability builds its config space with
//! [`crate::config_space`] and connects it to its port
//! ([`ConfigSpace::connect_pri`](crate::ConfigSpace::connect_pri)): PRI Status then follows
//! the port's outstanding groups, Response Failure and handler.
//!
//! # Example
//!
//! A device with the fault regions and nothing else of its own (a real device adds its BARs,
//! config space and DMA mappings in the `_` arms):
//!
//! ```
//! use std::os::fd::BorrowedFd;
//! use std::sync::Arc;
//!
//! use iopf_core::{DeviceConfig, DeviceId, FaultCore, MonotonicClock};
//! use iopf_host::fault_regions::{FaultPort, FaultRegions};
//! use iopf_vfio_user::device::{absent_irq_info, absent_region_info};
//! use iopf_vfio_user::{
//!     DeviceFlags, DeviceInfo, Errno, IoFd, IrqInfo, RegionInfo, SetIrqs, VfioUserDevice,
//! };
//!
//! #[derive(Debug)]
//! struct MyDevice {
//!     faults: FaultRegions,
//! }
//!
//! impl VfioUserDevice for MyDevice {
//!     fn device_info(&self) -> DeviceInfo {
//!         DeviceInfo {
//!             flags: DeviceFlags::PCI | DeviceFlags::RESET,
//!             num_regions: FaultRegions::NUM_REGIONS,
//!             num_irqs: FaultRegions::NUM_IRQS,
//!         }
//!     }
//!     fn region_info(&self, index: u32) -> Option<RegionInfo> {
//!         self.faults.region_info(index).or_else(|| Some(absent_region_info()))
//!     }
//!     fn region_fd(&self, index: u32) -> Option<BorrowedFd<'_>> {
//!         self.faults.region_fd(index)
//!     }
//!     fn region_io_fds(&self, index: u32) -> Result<Vec<(IoFd, BorrowedFd<'_>)>, Errno> {
//!         Ok(self.faults.region_io_fds(index).unwrap_or_default())
//!     }
//!     fn irq_info(&self, index: u32) -> Option<IrqInfo> {
//!         self.faults.irq_info(index).or_else(|| Some(absent_irq_info()))
//!     }
//!     fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
//!         self.faults.region_read(index, offset, data).unwrap_or(Err(Errno::EINVAL))
//!     }
//!     fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
//!         self.faults.region_write(index, offset, data).unwrap_or(Err(Errno::EINVAL))
//!     }
//!     fn set_irqs(&mut self, request: SetIrqs) -> Result<(), Errno> {
//!         self.faults.set_irqs(request)
//!     }
//!     fn reset(&mut self) -> Result<(), Errno> {
//!         self.faults.reset().map(drop).map_err(|_| Errno::EIO)
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let core = Arc::new(FaultCore::new(Arc::new(MonotonicClock::new())));
//! // Once per device...
//! let port = FaultPort::add(core.clone(), DeviceId(1), DeviceConfig::default())?;
//! // ...and once per VMM connection: `iopf_vfio_user::serve(stream, &mut device)`.
//! let device = MyDevice { faults: FaultRegions::attach(&port, 64)? };
//! assert!(core.is_registered(DeviceId(1))?);
//! assert!(device.region_info(9).is_some_and(|info| !info.caps.is_empty()));
//! // The connection ended: the VMM is gone, its pending groups are answered.
//! device.faults.detach();
//! assert!(!core.is_registered(DeviceId(1))?);
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, PoisonError};

use iopf_abi::{QueueKind, ResponseCode};
use iopf_core::{
    CoreError, DeviceConfig, DeviceFault, DeviceId, DeviceResponse, DeviceSink, FaultCore,
    QueueHandler,
};
use iopf_queue::{Doorbell, FaultQueueProducer, QueueMemory, ResponseQueueConsumer};
use iopf_vfio_user::device::{
    self, DMA_FAULT_IRQ_INDEX, DMA_FAULT_REGION_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX,
};
use iopf_vfio_user::{Errno, IoFd, IrqData, IrqInfo, RegionInfo, SetIrqs};
use thiserror::Error;

/// Why the fault regions could not be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FaultRegionsError {
    /// The fault core refused the device (its id is taken).
    #[error("adding the device to the fault core")]
    AddDevice(#[source] CoreError),
    /// The fault queue's region could not be created.
    #[error("creating the fault queue")]
    FaultQueue(#[source] iopf_queue::RegionAttachError),
    /// The response queue's region could not be created.
    #[error("creating the response queue")]
    ResponseQueue(#[source] iopf_queue::RegionAttachError),
    /// The response doorbell's eventfd could not be created or duplicated, or a region's fd
    /// could not be duplicated.
    #[error("creating the response doorbell or duplicating a region's fd")]
    Fd(#[source] std::io::Error),
    /// The fault core refused the handler (one is registered already).
    #[error("registering the fault handler")]
    Register(#[source] CoreError),
}

/// Where the core delivers a device's responses: a queue the device drains, and what the
/// PRI capability's status shows of them.
#[derive(Debug, Default)]
struct Inbox {
    /// One response per group the device sent: bounded by the groups the device has in
    /// flight (its PRG indices), which the device itself limits.
    responses: Mutex<VecDeque<DeviceResponse>>,
    /// Groups reported (their `LAST` request) and not answered yet.
    outstanding: AtomicU64,
    /// A response with code `Failure` arrived (the PRI status's Response Failure bit):
    /// sticky until software clears it.
    response_failure: AtomicBool,
}

impl DeviceSink for Inbox {
    fn page_response(&self, _device: DeviceId, response: DeviceResponse) {
        // Saturating: a PRI Reset may have forgotten the group this answers. The closure
        // always returns `Some`, so the update cannot fail.
        let _previous = self
            .outstanding
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        if response.code == ResponseCode::Failure {
            self.response_failure.store(true, Relaxed);
        }
        self.responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(response);
    }
}

/// Groups whose `LAST` request is among `faults`.
fn groups_closed(faults: &[DeviceFault]) -> u64 {
    faults
        .iter()
        .filter(|f| matches!(f, DeviceFault::PageRequest(r) if r.last))
        .count() as u64
}

/// A device on the fault core for its whole life: how its DMA engine delivers page requests
/// and unrecoverable faults, and learns the answers. Cloning gives another handle on the same
/// device (an engine thread and a connection may each hold one).
#[derive(Debug, Clone)]
pub struct FaultPort {
    core: Arc<FaultCore>,
    id: DeviceId,
    inbox: Arc<Inbox>,
}

impl FaultPort {
    /// Adds device `id` to `core` with `config` (its limits and policies); the core's answers
    /// to it come back through [`drain_responses`](Self::drain_responses).
    pub fn add(
        core: Arc<FaultCore>,
        id: DeviceId,
        config: DeviceConfig,
    ) -> Result<Self, FaultRegionsError> {
        let inbox = Arc::new(Inbox::default());
        core.add_device(id, config, inbox.clone())
            .map_err(FaultRegionsError::AddDevice)?;
        Ok(Self { core, id, inbox })
    }

    /// The device's id on the core.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The fault core.
    pub fn core(&self) -> &Arc<FaultCore> {
        &self.core
    }

    /// Reports one fault (a page request of a group, or an unrecoverable fault) and publishes
    /// it at once. Without a VMM attached the core answers a completed group `Invalid` itself.
    pub fn report(&self, fault: &DeviceFault) -> Result<(), CoreError> {
        self.report_batch(std::slice::from_ref(fault))
    }

    /// Reports many faults and publishes them together (one doorbell ring at most).
    pub fn report_batch(&self, faults: &[DeviceFault]) -> Result<(), CoreError> {
        // Counted before the core sees them: it may answer a group before it returns.
        self.inbox
            .outstanding
            .fetch_add(groups_closed(faults), Relaxed);
        self.core.report_batch(self.id, faults)
    }

    /// Page request groups reported (their `LAST` request) and not answered yet.
    pub fn outstanding_groups(&self) -> u64 {
        self.inbox.outstanding.load(Relaxed)
    }

    /// Whether a response with code `Failure` has arrived since
    /// [`clear_response_failure`](Self::clear_response_failure): on a PCIe Function that
    /// halts PRI until software re-enables it (the PRI status's Response Failure bit).
    pub fn response_failure(&self) -> bool {
        self.inbox.response_failure.load(Relaxed)
    }

    /// Clears the Response Failure state (software wrote 1 to the bit, or re-enabled PRI).
    pub fn clear_response_failure(&self) {
        self.inbox.response_failure.store(false, Relaxed);
    }

    /// A PRI Reset: the device forgets its outstanding page requests (their credits come
    /// back); answers to them still arrive and are drained as usual.
    pub fn forget_outstanding(&self) {
        self.inbox.outstanding.store(0, Relaxed);
    }

    /// Moves the answers the core has delivered so far into `out`, oldest first; returns how
    /// many. Each page request group gets exactly one.
    pub fn drain_responses(&self, out: &mut Vec<DeviceResponse>) -> usize {
        let mut inbox = self
            .inbox
            .responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = inbox.len();
        out.extend(inbox.drain(..));
        n
    }

    /// Whether answers wait to be drained.
    pub fn has_responses(&self) -> bool {
        !self
            .inbox
            .responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Reads the VMM's responses from the response queue (one bounded batch) and applies them:
    /// call it when the response doorbell ([`FaultRegions::response_doorbell`]) rings. Returns
    /// how many records were read.
    pub fn process_responses(&self) -> Result<usize, CoreError> {
        self.core.process_responses(self.id)
    }

    /// Whether a handler (a VMM connection's [`FaultRegions`]) is registered.
    pub fn is_registered(&self) -> bool {
        self.core.is_registered(self.id).unwrap_or(false)
    }

    /// Unregisters the current handler from the host's side: its pending groups are answered
    /// `Invalid` and `LIVE` is cleared, so its VMM lets the connection go. Returns how many
    /// groups were answered.
    pub fn unregister(&self) -> usize {
        self.core.unregister(self.id)
    }
}

/// One VMM connection's fault regions and fault IRQ: a handler life on the fault core.
///
/// Dropping it is the same as [`detach`](Self::detach). A device has one at a time.
#[derive(Debug)]
pub struct FaultRegions {
    port: FaultPort,
    fault_fd: OwnedFd,
    fault_len: u64,
    response_fd: OwnedFd,
    response_len: u64,
    response_doorbell: Doorbell,
    detached: bool,
}

impl FaultRegions {
    /// `num_regions` of a device with the fault regions and no device-specific region of its
    /// own: the nine standard PCI regions, then the two fault regions.
    pub const NUM_REGIONS: u32 = device::NUM_REGIONS;
    /// `num_irqs` of a device with the fault IRQ: the five standard PCI IRQ indices, then it.
    pub const NUM_IRQS: u32 = device::NUM_IRQS;

    /// Creates a new handler life's queues (`ring_entries` entries each, a power of two) and
    /// registers their handler with the core. Page requests are answered `Invalid` until the
    /// VMM has mapped both regions and written its ABI version.
    pub fn attach(port: &FaultPort, ring_entries: u32) -> Result<Self, FaultRegionsError> {
        let faults =
            FaultQueueProducer::create(ring_entries).map_err(FaultRegionsError::FaultQueue)?;
        let response_doorbell = Doorbell::new().map_err(FaultRegionsError::Fd)?;
        let responses = ResponseQueueConsumer::create(
            ring_entries,
            response_doorbell
                .try_clone()
                .map_err(FaultRegionsError::Fd)?,
        )
        .map_err(FaultRegionsError::ResponseQueue)?;
        let fault_fd = faults
            .memory()
            .fd()
            .try_clone_to_owned()
            .map_err(FaultRegionsError::Fd)?;
        let response_fd = responses
            .memory()
            .fd()
            .try_clone_to_owned()
            .map_err(FaultRegionsError::Fd)?;
        let fault_len = faults.memory().geometry().region_len();
        let response_len = responses.memory().geometry().region_len();
        port.core
            .register(port.id, Box::new(QueueHandler { faults, responses }))
            .map_err(FaultRegionsError::Register)?;
        Ok(Self {
            port: port.clone(),
            fault_fd,
            fault_len,
            response_fd,
            response_len,
            response_doorbell,
            detached: false,
        })
    }

    /// The device on the fault core.
    pub fn port(&self) -> &FaultPort {
        &self.port
    }

    /// The response doorbell: the VMM rings it (through the ioeventfd, or a region write of
    /// the response queue's `prod`) after publishing responses. An engine sleeps on it, or an
    /// event loop polls its fd, then calls [`FaultPort::process_responses`].
    pub fn response_doorbell(&self) -> &Doorbell {
        &self.response_doorbell
    }

    /// Whether region `index` is one of the component's.
    pub const fn owns_region(index: u32) -> bool {
        matches!(
            index,
            DMA_FAULT_REGION_INDEX | DMA_FAULT_RESPONSE_REGION_INDEX
        )
    }

    /// Whether IRQ index `index` is the component's.
    pub const fn owns_irq(index: u32) -> bool {
        index == DMA_FAULT_IRQ_INDEX
    }

    /// The region info of a fault region (readable, writable, mmap-able, with its type
    /// capability: type 4, subtype 1 or 2); `None` for any other index.
    pub fn region_info(&self, index: u32) -> Option<RegionInfo> {
        match index {
            DMA_FAULT_REGION_INDEX => {
                Some(device::queue_region_info(QueueKind::Fault, self.fault_len))
            }
            DMA_FAULT_RESPONSE_REGION_INDEX => Some(device::queue_region_info(
                QueueKind::Response,
                self.response_len,
            )),
            _ => None,
        }
    }

    /// The fd a fault region is mapped through; `None` for any other index.
    pub fn region_fd(&self, index: u32) -> Option<BorrowedFd<'_>> {
        match index {
            DMA_FAULT_REGION_INDEX => Some(self.fault_fd.as_fd()),
            DMA_FAULT_RESPONSE_REGION_INDEX => Some(self.response_fd.as_fd()),
            _ => None,
        }
    }

    /// `GET_REGION_IO_FDS` of a fault region: the response doorbell's ioeventfd on the
    /// response region's `prod`, none on the fault region; `None` for any other index.
    pub fn region_io_fds(&self, index: u32) -> Option<Vec<(IoFd, BorrowedFd<'_>)>> {
        match index {
            DMA_FAULT_REGION_INDEX => Some(Vec::new()),
            DMA_FAULT_RESPONSE_REGION_INDEX => Some(vec![(
                device::response_doorbell_io_fd(),
                self.response_doorbell.as_fd(),
            )]),
            _ => None,
        }
    }

    /// A read of a fault region through the socket instead of the mapping; `None` for any
    /// other index.
    pub fn region_read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Option<Result<(), Errno>> {
        let fd = self.region_fd(index)?;
        let len = data.len();
        Some(match rustix::io::pread(fd, data, offset) {
            Ok(n) if n == len => Ok(()),
            Ok(_) => Err(Errno::EIO),
            Err(e) => Err(Errno(e.raw_os_error().unsigned_abs())),
        })
    }

    /// A write of a fault region through the socket instead of the mapping (the VMM's page of
    /// a queue); on the response queue's `prod` it rings the response doorbell, the fallback
    /// for a VMM without the ioeventfd. `None` for any other index.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Option<Result<(), Errno>> {
        let fd = self.region_fd(index)?;
        Some(match rustix::io::pwrite(fd, data, offset) {
            Ok(n) if n == data.len() => {
                if index == DMA_FAULT_RESPONSE_REGION_INDEX
                    && offset == device::RESPONSE_PROD_OFFSET
                {
                    self.response_doorbell.ring().map_err(Errno::from)
                } else {
                    Ok(())
                }
            }
            Ok(_) => Err(Errno::EIO),
            Err(e) => Err(Errno(e.raw_os_error().unsigned_abs())),
        })
    }

    /// The DMA fault IRQ's info (one eventfd); `None` for any other index.
    pub fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        Self::owns_irq(index).then(device::dma_fault_irq_info)
    }

    /// `SET_IRQS` on the DMA fault IRQ: one eventfd becomes the fault queue's doorbell (the
    /// core rings it for a sleeping VMM), none takes it away. Another IRQ index is `EINVAL`:
    /// a device with IRQs of its own checks [`owns_irq`](Self::owns_irq) first.
    pub fn set_irqs(&self, request: SetIrqs) -> Result<(), Errno> {
        if !Self::owns_irq(request.index) {
            return Err(Errno::EINVAL);
        }
        let doorbell = match request.data {
            IrqData::Eventfds(mut fds) if fds.len() == 1 => {
                Some(Doorbell::from_fd(fds.remove(0)).map_err(|_| Errno::EINVAL)?)
            }
            IrqData::Eventfds(fds) if fds.is_empty() => None,
            IrqData::None => None,
            _ => return Err(Errno::EINVAL),
        };
        self.port
            .core
            .set_fault_doorbell(self.port.id, doorbell)
            .map_err(|_| Errno::EINVAL)?;
        Ok(())
    }

    /// The device's function-level reset as the fault core sees it: responses already queued
    /// are applied, then every group still pending is answered `Invalid` (`reset`). The
    /// handler, its queues, the fault IRQ's eventfd and `LIVE` stay. Returns how many groups
    /// the reset answered.
    pub fn reset(&self) -> Result<usize, CoreError> {
        self.port.core.reset_device(self.port.id)
    }

    /// The VMM is gone (its connection ended): the handler is unregistered, its pending
    /// groups answered `Invalid` (`vmm_gone`). Returns how many groups were answered.
    pub fn detach(mut self) -> usize {
        self.detached = true;
        self.port.core.vmm_gone(self.port.id)
    }
}

impl Drop for FaultRegions {
    fn drop(&mut self) {
        if !self.detached {
            // The count of answered groups is only for a caller that asked (`detach`).
            self.port.core.vmm_gone(self.port.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    use iopf_core::MonotonicClock;
    use iopf_vfio_user::IrqAction;
    use iopf_vfio_user::device::{
        RESPONSE_PROD_OFFSET, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
        VFIO_REGION_TYPE_NESTED,
    };
    use iopf_vfio_user::info::RegionCapability;

    use super::*;
    use crate::test_support::page_request;

    fn port() -> FaultPort {
        let core = Arc::new(FaultCore::new(Arc::new(MonotonicClock::new())));
        FaultPort::add(core, DeviceId(7), DeviceConfig::default()).unwrap()
    }

    /// A fresh eventfd, as a VMM hands one over in `SET_IRQS`.
    fn eventfd() -> OwnedFd {
        Doorbell::new()
            .unwrap()
            .as_fd()
            .try_clone_to_owned()
            .unwrap()
    }

    fn irqs(index: u32, fds: Vec<OwnedFd>) -> SetIrqs {
        SetIrqs {
            index,
            start: 0,
            count: fds.len() as u32,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(fds),
        }
    }

    // Catches: a component that answers for the device's own indices (its BARs, config
    // space, MSI), or forgets one of its own.
    #[test]
    fn it_answers_for_its_indices_only() {
        let port = port();
        let regions = FaultRegions::attach(&port, 64).unwrap();
        for index in 0..FaultRegions::NUM_REGIONS + 2 {
            let mine = FaultRegions::owns_region(index);
            assert_eq!(mine, regions.region_info(index).is_some(), "{index}");
            assert_eq!(mine, regions.region_fd(index).is_some(), "{index}");
            assert_eq!(mine, regions.region_io_fds(index).is_some(), "{index}");
            assert_eq!(mine, regions.region_read(index, 0, &mut [0; 4]).is_some());
        }
        assert_eq!((0..16).filter(|i| FaultRegions::owns_region(*i)).count(), 2);
        assert!(regions.region_info(VFIO_PCI_BAR0_REGION_INDEX).is_none());
        assert!(regions.region_info(VFIO_PCI_CONFIG_REGION_INDEX).is_none());
        let info = regions.region_info(DMA_FAULT_REGION_INDEX).unwrap();
        assert!(matches!(
            info.caps[..],
            [RegionCapability::Type {
                region_type: VFIO_REGION_TYPE_NESTED,
                subtype: 1
            }]
        ));
        assert_eq!(
            regions
                .region_io_fds(DMA_FAULT_RESPONSE_REGION_INDEX)
                .unwrap()
                .len(),
            1
        );
        for index in 0..FaultRegions::NUM_IRQS + 1 {
            assert_eq!(FaultRegions::owns_irq(index), index == DMA_FAULT_IRQ_INDEX);
            assert_eq!(
                regions.irq_info(index).is_some(),
                index == DMA_FAULT_IRQ_INDEX
            );
        }
        // Another IRQ index is refused, the fault IRQ takes an eventfd and nothing else.
        assert_eq!(
            regions.set_irqs(irqs(2, vec![eventfd()])),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            regions.set_irqs(irqs(DMA_FAULT_IRQ_INDEX, vec![eventfd()])),
            Ok(())
        );
        let memfd = regions
            .region_fd(DMA_FAULT_REGION_INDEX)
            .unwrap()
            .try_clone_to_owned();
        assert_eq!(
            regions.set_irqs(irqs(DMA_FAULT_IRQ_INDEX, vec![memfd.unwrap()])),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            regions.set_irqs(irqs(DMA_FAULT_IRQ_INDEX, Vec::new())),
            Ok(())
        );
    }

    /// The VMM's ends of both queues, attached as a VMM attaches them: from then on the core
    /// hands it groups instead of answering them at once.
    fn attach_vmm(
        regions: &FaultRegions,
    ) -> (
        iopf_queue::FaultQueueConsumer,
        iopf_queue::ResponseQueueProducer,
    ) {
        let fd = |index| {
            regions
                .region_fd(index)
                .unwrap()
                .try_clone_to_owned()
                .unwrap()
        };
        (
            iopf_queue::FaultQueueConsumer::attach(
                fd(DMA_FAULT_REGION_INDEX),
                Doorbell::new().unwrap(),
            )
            .unwrap(),
            iopf_queue::ResponseQueueProducer::attach(fd(DMA_FAULT_RESPONSE_REGION_INDEX), None)
                .unwrap(),
        )
    }

    // Catches: a device that counts requests or groups wrongly as outstanding (its request
    // credits), or that believes answers are waiting when none are.
    #[test]
    fn outstanding_counts_groups_closed_and_answers_are_drained_once() {
        let port = port();
        let regions = FaultRegions::attach(&port, 64).unwrap();
        let _vmm = attach_vmm(&regions);
        assert!(!port.has_responses());
        port.report_batch(&[
            page_request(1, false),
            page_request(1, true),
            page_request(2, true),
        ])
        .unwrap();
        assert_eq!(port.outstanding_groups(), 2);
        assert!(!port.has_responses());
        assert_eq!(regions.detach(), 2);
        assert!(port.has_responses());
        let mut answers = Vec::new();
        assert_eq!(port.drain_responses(&mut answers), 2);
        assert!(!port.has_responses());
        assert_eq!(port.outstanding_groups(), 0);
    }

    // Catches: a reset, a detach or an unregister that says it answered fewer groups than
    // were pending (or more), each one a different handler life.
    #[test]
    fn reset_detach_and_unregister_answer_and_count_every_pending_group() {
        let port = port();
        let regions = FaultRegions::attach(&port, 64).unwrap();
        let _vmm = attach_vmm(&regions);
        port.report_batch(&[page_request(1, true), page_request(2, true)])
            .unwrap();
        assert_eq!(regions.reset().unwrap(), 2);
        port.report_batch(&[page_request(3, true), page_request(4, true)])
            .unwrap();
        assert_eq!(regions.detach(), 2);

        let regions = FaultRegions::attach(&port, 64).unwrap();
        let _vmm = attach_vmm(&regions);
        port.report_batch(&[page_request(5, true), page_request(6, true)])
            .unwrap();
        assert_eq!(port.unregister(), 2);
        let mut answers = Vec::new();
        assert_eq!(port.drain_responses(&mut answers), 6);
        assert!(answers.iter().all(|a| a.code == ResponseCode::Invalid));
    }

    // Catches: a read through the socket that fails although it read everything.
    #[test]
    fn a_read_through_the_socket_returns_the_regions_bytes() {
        let port = port();
        let regions = FaultRegions::attach(&port, 64).unwrap();
        let mut magic = [0; 8];
        assert_eq!(
            regions.region_read(DMA_FAULT_REGION_INDEX, 0, &mut magic),
            Some(Ok(()))
        );
        assert_ne!(magic, [0; 8], "the host page starts with its magic");
    }

    // Catches: a fault IRQ that takes no data, or several eventfds, wrongly.
    #[test]
    fn the_fault_irq_takes_one_eventfd_or_none_and_nothing_else() {
        let port = port();
        let regions = FaultRegions::attach(&port, 64).unwrap();
        assert_eq!(
            regions.set_irqs(irqs(DMA_FAULT_IRQ_INDEX, vec![eventfd(), eventfd()])),
            Err(Errno::EINVAL)
        );
        let none = SetIrqs {
            index: DMA_FAULT_IRQ_INDEX,
            start: 0,
            count: 0,
            action: IrqAction::Trigger,
            data: IrqData::None,
        };
        assert_eq!(regions.set_irqs(none), Ok(()));
    }

    // Catches: a VMM without the ioeventfd whose responses never wake the device.
    #[test]
    fn a_write_of_the_response_prod_rings_the_doorbell() {
        let port = port();
        let regions = FaultRegions::attach(&port, 64).unwrap();
        let doorbell = regions.response_doorbell();
        assert!(!doorbell.wait(Some(Duration::ZERO)).unwrap());
        let write = regions.region_write(
            DMA_FAULT_RESPONSE_REGION_INDEX,
            RESPONSE_PROD_OFFSET,
            &[0; 4],
        );
        assert_eq!(write, Some(Ok(())));
        assert!(doorbell.wait(Some(Duration::ZERO)).unwrap());
        // Elsewhere in the region: no ring.
        let write = regions.region_write(
            DMA_FAULT_RESPONSE_REGION_INDEX,
            RESPONSE_PROD_OFFSET + 8,
            &[0; 4],
        );
        assert_eq!(write, Some(Ok(())));
        assert!(!doorbell.wait(Some(Duration::ZERO)).unwrap());
        // Past the region's end.
        let end = regions.region_info(DMA_FAULT_REGION_INDEX).unwrap().size;
        assert!(matches!(
            regions.region_read(DMA_FAULT_REGION_INDEX, end, &mut [0; 4]),
            Some(Err(_))
        ));
    }

    // Catches: a connection that ends without unregistering (its groups never answered), or
    // a device that never learns the answer to a group reported without a VMM.
    #[test]
    fn dropping_the_regions_is_the_vmm_gone_and_every_group_is_answered() {
        let port = port();
        let regions = FaultRegions::attach(&port, 64).unwrap();
        assert!(port.is_registered());
        assert!(
            FaultRegions::attach(&port, 64).is_err(),
            "one handler at a time"
        );
        drop(regions);
        assert!(!port.is_registered());
        let regions = FaultRegions::attach(&port, 64).unwrap();
        let fault = page_request(5, true);
        // The VMM has not attached its consumer: the core answers at once.
        port.report(&fault).unwrap();
        assert!(port.has_responses());
        let mut answers = Vec::new();
        assert_eq!(port.drain_responses(&mut answers), 1);
        assert_eq!(
            (answers[0].grpid.get(), answers[0].code),
            (5, ResponseCode::Invalid)
        );
        assert_eq!(port.outstanding_groups(), 0);
        assert_eq!(regions.detach(), 0);
        assert_eq!(
            port.core()
                .counters(DeviceId(7))
                .unwrap()
                .responses
                .auto
                .vmm_gone,
            0
        );
    }
}
