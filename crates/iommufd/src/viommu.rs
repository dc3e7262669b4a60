//! The kernel's vIOMMU objects (Linux 6.13 and later) on the VMM's iommufd, owned so that they
//! are released from the inside out whatever order the VMM drops its handles in.
//!
//! The kernel keeps references between these objects and refuses (`EBUSY`) to destroy one
//! that something still holds:
//!
//! | object | held by |
//! |---|---|
//! | vIOMMU | its vDevices, its nested page tables, its vEVENTQs |
//! | nested page table | every device attached to it |
//! | fault object | its file, every page table that reports to it |
//! | vEVENTQ | its file |
//!
//! Each handle here holds, as an `Arc`, the handles of what it depends on, and releases its own
//! object before them: a [`VeventQueue`] closes its file, destroys the vEVENTQ, then lets go of
//! the [`Viommu`]; an [`Attachment`] detaches its device (the kernel answers the device's
//! pending page requests `INVALID`; a [`DetachNotifier`] retires them in the
//! [`KernelFaultQueue`](crate::KernelFaultQueue)), then lets go of the [`NestedHwpt`], which
//! lets go of the vIOMMU and the [`FaultObject`]. The kernel object goes when its last holder
//! does. So a VMM may drop the handles in any order and the kernel never refuses a destroy;
//! a destroy it refuses anyway is logged (`tracing` warning) with the object left to the
//! iommufd's close.
//!
//! Every allocation takes the VMM's iommufd as [`AsFd`] and the ids it already has (device,
//! IOAS, nesting parent). The handles keep one duplicate of that fd (`F_DUPFD_CLOEXEC`: the
//! same open file, the same context, not a second iommufd) to destroy their objects with.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use iommufd_bindings::iommufd::iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID;
use iommufd_ioctls::AttachHwpt;
use iopf_abi::ResponseRecord;
use iopf_queue::{ChannelError, ChannelFault, FaultChannel};

use crate::error::KernelError;
use crate::fault_file::poll_readable;
use crate::queue::DetachNotifier;
use crate::vevent::{VEVENT_HEADER_SIZE, VeventCounts, VeventEntry, VeventParser, VeventType};
use crate::{FaultFile, Iommufd, hwpt_request, sys};

/// An iommufd object this crate allocated; destroyed when dropped.
#[derive(Debug)]
pub(crate) struct Object {
    iommufd: Arc<Iommufd>,
    id: u32,
    what: &'static str,
}

impl Drop for Object {
    fn drop(&mut self) {
        if let Err(error) = self.iommufd.destroy(self.id) {
            // Drop cannot return it; the object stays until the iommufd is closed.
            tracing::warn!(id = self.id, what = self.what, %error, "the kernel refused a destroy");
        }
    }
}

fn ioctl_error(what: &'static str) -> impl FnOnce(io::Error) -> KernelError {
    move |source| KernelError::Ioctl { what, source }
}

/// Allocates a fault queue on the VMM's iommufd (`IOMMU_FAULT_QUEUE_ALLOC`), owned: the fault
/// object is destroyed once its file is closed and every [`NestedHwpt`] reporting to it and the
/// returned [`FaultObject`] are dropped. Build the
/// [`KernelFaultQueue`](crate::KernelFaultQueue) on the file with the object's id.
pub fn alloc_fault_object(iommufd: impl AsFd) -> Result<(FaultObject, FaultFile), KernelError> {
    let iommufd = Arc::new(Iommufd::dup_from(iommufd)?);
    let (id, fd): (u32, OwnedFd) =
        sys::fault_queue_alloc(&iommufd.as_fd()).map_err(ioctl_error("IOMMU_FAULT_QUEUE_ALLOC"))?;
    let object = Arc::new(Object {
        iommufd,
        id,
        what: "fault queue",
    });
    let file = FaultFile::owning(fd, Arc::clone(&object));
    Ok((FaultObject { object }, file))
}

/// A fault object this crate owns (see [`alloc_fault_object`]).
#[derive(Debug, Clone)]
pub struct FaultObject {
    object: Arc<Object>,
}

impl FaultObject {
    /// The fault object's id (`fault_id` of `IOMMU_HWPT_ALLOC`).
    pub fn id(&self) -> u32 {
        self.object.id
    }
}

/// A vIOMMU (`IOMMU_VIOMMU_ALLOC`): the VM's slice of a physical IOMMU, over a nesting parent
/// page table. Clones share it; it is destroyed when the last clone and the last object
/// allocated under it are dropped.
#[derive(Debug, Clone)]
pub struct Viommu {
    object: Arc<Object>,
}

impl Viommu {
    /// Allocates a vIOMMU of `viommu_type` (`enum iommu_viommu_type`: Arm SMMUv3, NVIDIA
    /// CMDQV, or the self-test's) backed by the IOMMU of device `dev_id` (from
    /// `VFIO_DEVICE_BIND_IOMMUFD`), over the nesting parent page table `parent_hwpt_id`, on the
    /// VMM's iommufd. `data` is the type's data; the kernel may write its output fields.
    pub fn alloc(
        iommufd: impl AsFd,
        dev_id: u32,
        parent_hwpt_id: u32,
        viommu_type: u32,
        data: &mut [u8],
    ) -> Result<Self, KernelError> {
        let iommufd = Arc::new(Iommufd::dup_from(iommufd)?);
        let id = sys::viommu_alloc(&iommufd.as_fd(), viommu_type, dev_id, parent_hwpt_id, data)
            .map_err(ioctl_error("IOMMU_VIOMMU_ALLOC"))?;
        Ok(Self {
            object: Arc::new(Object {
                iommufd,
                id,
                what: "vIOMMU",
            }),
        })
    }

    /// The vIOMMU's id.
    pub fn id(&self) -> u32 {
        self.object.id
    }

    /// Allocates the vDevice of device `dev_id` (`IOMMU_VDEVICE_ALLOC`), under the guest's
    /// `virt_id` (the virtual `StreamID` of an SMMUv3, the vRID of VT-d): the ID the vIOMMU's
    /// events name the device by. Allocate it before attaching the device to a nested page
    /// table of this vIOMMU.
    pub fn alloc_vdevice(&self, dev_id: u32, virt_id: u64) -> Result<VDevice, KernelError> {
        let iommufd = Arc::clone(&self.object.iommufd);
        let id = sys::vdevice_alloc(&iommufd.as_fd(), self.object.id, dev_id, virt_id)
            .map_err(ioctl_error("IOMMU_VDEVICE_ALLOC"))?;
        Ok(VDevice {
            object: Object {
                iommufd,
                id,
                what: "vDevice",
            },
            _viommu: Arc::clone(&self.object),
            dev_id,
            virt_id,
        })
    }

    /// Allocates a nested page table under this vIOMMU for device `dev_id`, described by the
    /// guest's stage-1 `data` of `data_type` (`enum iommu_hwpt_data_type`), whose page requests
    /// go to `fault` (`IOMMU_HWPT_FAULT_ID_VALID`) if given.
    pub fn alloc_nested_hwpt(
        &self,
        dev_id: u32,
        fault: Option<&FaultObject>,
        data_type: u32,
        data: &[u8],
    ) -> Result<NestedHwpt, KernelError> {
        let (flags, fault_id) = match fault {
            Some(f) => (iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID, f.id()),
            None => (0, 0),
        };
        let iommufd = Arc::clone(&self.object.iommufd);
        // `data` outlives the ioctl: it is borrowed for this whole call.
        let id = iommufd.alloc_hwpt_with(hwpt_request(
            dev_id,
            self.object.id,
            flags,
            fault_id,
            Some(data),
            data_type,
        ))?;
        Ok(NestedHwpt {
            inner: Arc::new(HwptInner {
                object: Object {
                    iommufd,
                    id,
                    what: "nested page table",
                },
                _viommu: Arc::clone(&self.object),
                _fault: fault.map(|f| Arc::clone(&f.object)),
            }),
        })
    }

    /// Allocates this vIOMMU's vEVENTQ of `kind` (`IOMMU_VEVENTQ_ALLOC`), holding at most
    /// `depth` events (1 to 2^19); the kernel counts what it drops beyond that.
    pub fn alloc_veventq(&self, kind: VeventType, depth: u32) -> Result<VeventQueue, KernelError> {
        let iommufd = Arc::clone(&self.object.iommufd);
        let (id, fd) = sys::veventq_alloc(&iommufd.as_fd(), self.object.id, kind.raw(), depth)
            .map_err(ioctl_error("IOMMU_VEVENTQ_ALLOC"))?;
        Ok(VeventQueue {
            fd,
            object: Object {
                iommufd,
                id,
                what: "vEVENTQ",
            },
            _viommu: Arc::clone(&self.object),
            kind,
            parser: VeventParser::new(kind),
            buf: Vec::new(),
            refused: 0,
        })
    }
}

/// A vDevice: a device under its virtual ID on a [`Viommu`]. Destroyed when dropped, before the
/// vIOMMU is let go.
#[derive(Debug)]
pub struct VDevice {
    object: Object,
    _viommu: Arc<Object>,
    dev_id: u32,
    virt_id: u64,
}

impl VDevice {
    /// The vDevice's id.
    pub fn id(&self) -> u32 {
        self.object.id
    }

    /// The device (iommufd device id).
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The guest's ID of the device.
    pub fn virt_id(&self) -> u64 {
        self.virt_id
    }
}

#[derive(Debug)]
struct HwptInner {
    // Declared first: destroyed before the vIOMMU and the fault object are let go.
    object: Object,
    _viommu: Arc<Object>,
    _fault: Option<Arc<Object>>,
}

/// A nested page table under a [`Viommu`], optionally reporting page requests to a
/// [`FaultObject`]. Destroyed when this handle and every [`Attachment`] to it are dropped.
#[derive(Debug, Clone)]
pub struct NestedHwpt {
    inner: Arc<HwptInner>,
}

impl NestedHwpt {
    /// The page table's id.
    pub fn id(&self) -> u32 {
        self.inner.object.id
    }

    /// Attaches `device` (iommufd device `dev_id`; Cloud Hypervisor's devices implement
    /// [`AttachHwpt`]) to this page table. The returned [`Attachment`] detaches it when dropped
    /// and tells `notifier` (the fault queue's [`DetachNotifier`]) so that the groups the
    /// kernel answered at the detach are retired.
    pub fn attach(
        &self,
        device: Arc<dyn AttachHwpt>,
        dev_id: u32,
        notifier: Option<DetachNotifier>,
    ) -> Result<Attachment, KernelError> {
        device
            .attach_hwpt(self.id())
            .map_err(ioctl_error("attach to the nested page table"))?;
        Ok(Attachment {
            device,
            dev_id,
            notifier,
            attached: true,
            _hwpt: Arc::clone(&self.inner),
        })
    }
}

/// A device attached to a [`NestedHwpt`]; detached when dropped (or by
/// [`detach`](Self::detach)), before the page table is let go.
pub struct Attachment {
    device: Arc<dyn AttachHwpt>,
    dev_id: u32,
    notifier: Option<DetachNotifier>,
    attached: bool,
    _hwpt: Arc<HwptInner>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("dev_id", &self.dev_id)
            .field("hwpt", &self._hwpt.object.id)
            .field("attached", &self.attached)
            .finish()
    }
}

impl Attachment {
    /// The attached device.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// Detaches the device now. The kernel answers its pending page requests `INVALID`; the
    /// fault queue is told to retire them.
    pub fn detach(mut self) -> Result<(), KernelError> {
        self.detach_now()
    }

    fn detach_now(&mut self) -> Result<(), KernelError> {
        if !self.attached {
            return Ok(());
        }
        self.device
            .detach_hwpt()
            .map_err(ioctl_error("detach from the nested page table"))?;
        self.attached = false;
        if let Some(notifier) = &self.notifier {
            notifier.detached(self.dev_id);
        }
        Ok(())
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Err(error) = self.detach_now() {
            // Drop cannot return it; the page table then stays until the iommufd is closed.
            tracing::warn!(dev_id = self.dev_id, %error, "detach refused");
        }
    }
}

/// What a [`VeventQueue`] counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VeventQueueStats {
    /// Events, lost events and malformed reads (see [`VeventCounts`]).
    pub counts: VeventCounts,
    /// Responses given to the channel: an unrecoverable event takes none, so each is refused.
    pub refused: u64,
}

/// A vIOMMU's event queue (`IOMMU_VEVENTQ_ALLOC`) as a [`FaultChannel`]: each event is an
/// unrecoverable fault of the device with the event's virtual ID; events the kernel dropped
/// on overflow are counted ([`lost`](Self::lost)), never hidden.
///
/// Dropping it closes its file, destroys the vEVENTQ, then lets go of the [`Viommu`], in that
/// order (the file holds the queue, the queue the vIOMMU).
#[derive(Debug)]
pub struct VeventQueue {
    // Field order is drop order: the file, then the vEVENTQ object, then the vIOMMU.
    fd: OwnedFd,
    object: Object,
    _viommu: Arc<Object>,
    kind: VeventType,
    parser: VeventParser,
    buf: Vec<u8>,
    refused: u64,
}

/// Entries one read makes room for, at most.
const MAX_READ_EVENTS: usize = 256;

impl VeventQueue {
    /// The vEVENTQ's id.
    pub fn id(&self) -> u32 {
        self.object.id
    }

    /// The queue's type.
    pub fn kind(&self) -> VeventType {
        self.kind
    }

    /// Events the kernel dropped on overflow, as far as read.
    pub fn lost(&self) -> u64 {
        self.parser.counts().lost
    }

    /// Counters.
    pub fn stats(&self) -> VeventQueueStats {
        VeventQueueStats {
            counts: self.parser.counts(),
            refused: self.refused,
        }
    }

    /// One `read` of up to `max` events (at least one); hands each entry to `f`, in order.
    /// Returns how many entries (events and loss markers).
    pub fn read_entries(
        &mut self,
        max: usize,
        f: &mut dyn FnMut(VeventEntry<'_>),
    ) -> Result<usize, KernelError> {
        let size = max.clamp(1, MAX_READ_EVENTS) * (VEVENT_HEADER_SIZE + self.kind.event_size());
        self.buf.resize(size, 0);
        let n = match rustix::io::read(&self.fd, &mut self.buf[..]) {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN) => 0,
            Err(e) => return Err(KernelError::Read(e.into())),
        };
        let bytes = self.buf.get(..n).unwrap_or_default();
        self.parser
            .parse(bytes, f)
            .map_err(|e| KernelError::Read(io::Error::new(io::ErrorKind::InvalidData, e)))
    }
}

impl AsFd for VeventQueue {
    /// The queue's file, readable while events are queued (for an event loop).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn channel_error(what: &'static str, e: KernelError) -> ChannelError {
    let source = match e {
        KernelError::Read(s) | KernelError::Poll(s) => s,
        other => io::Error::other(other.to_string()),
    };
    ChannelError::Io { what, source }
}

/// The vEVENTQ as a channel of unrecoverable faults, the same consumer API as the
/// shared-memory queues' unrecoverable faults; the device is the event's virtual ID.
impl FaultChannel for VeventQueue {
    fn read(&mut self, max: usize, f: &mut dyn FnMut(ChannelFault)) -> Result<usize, ChannelError> {
        if max == 0 {
            return Ok(0);
        }
        let kind = self.kind;
        let mut delivered = 0;
        self.read_entries(max, &mut |entry| {
            if let VeventEntry::Event { data, .. } = entry {
                f(kind.to_channel_fault(data));
                delivered += 1;
            }
        })
        .map_err(|e| channel_error("vEVENTQ read", e))?;
        Ok(delivered)
    }

    fn respond(&mut self, responses: &[ResponseRecord]) -> Result<usize, ChannelError> {
        // Unrecoverable faults take no response: each is taken and refused.
        self.refused += responses.len() as u64;
        Ok(responses.len())
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<bool, ChannelError> {
        poll_readable(self.fd.as_fd(), timeout).map_err(|e| channel_error("vEVENTQ poll", e))
    }

    fn live(&self) -> bool {
        true
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn prepare_to_sleep(&mut self) -> Result<bool, ChannelError> {
        // Level-triggered, like the fault queue's file.
        Ok(true)
    }

    fn woke(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }

    fn refused(&self) -> u64 {
        self.refused
    }
}
