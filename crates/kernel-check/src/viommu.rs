//! The vIOMMU checks (Linux 6.15 and later): a vIOMMU, a vDevice, a fault-capable nested page
//! table under the vIOMMU and a vEVENTQ, all through the backend's owned handles; events
//! injected with the mock's `TRIGGER_VEVENT`. On a kernel without vIOMMUs (6.12) each check
//! reports `skip`, never `ok`.

use iopf_abi::{Fault, ResponseCode, ResponseRecord};
use iopf_iommufd::selftest::{
    IOMMU_HWPT_DATA_SELFTEST, IOMMU_VIOMMU_TYPE_SELFTEST, MockDevice, TriggerIopf,
};
use iopf_iommufd::{
    Attachment, FaultObject, Iommufd, KernelFaultQueue, NestedHwpt, VDevice, VeventEntry,
    VeventQueue, VeventType, Viommu, alloc_fault_object,
};
use iopf_queue::FaultChannel;

use crate::{ENOENT, PERM_RW, answer, wait_for};

/// The vDevice's virtual ID (a guest `StreamID`).
const VIRT_ID: u32 = 0x99;
/// The vEVENTQ's depth: small, to overflow it on purpose.
const DEPTH: u32 = 4;

/// Why the vIOMMU setup did not give a rig.
pub enum Outcome {
    /// Failed.
    Fail(String),
    /// Not applicable on this kernel.
    Skip(String),
}

/// One complete vIOMMU stack on a mock device.
struct Stack {
    // Drop order is declaration order; the teardown check drops them one by one instead.
    attachment: Attachment,
    veventq: VeventQueue,
    vdevice: VDevice,
    hwpt: NestedHwpt,
    queue: KernelFaultQueue,
    fault: FaultObject,
    viommu: Viommu,
}

impl Stack {
    fn ids(&self) -> [(&'static str, u32); 5] {
        [
            ("vEVENTQ", self.veventq.id()),
            ("vDevice", self.vdevice.id()),
            ("nested page table", self.hwpt.id()),
            ("fault queue", self.fault.id()),
            ("vIOMMU", self.viommu.id()),
        ]
    }
}

fn build(iommufd: &Iommufd, device: &MockDevice) -> Result<Stack, String> {
    let viommu = Viommu::alloc(
        iommufd,
        device.idev_id,
        device.parent_hwpt_id,
        IOMMU_VIOMMU_TYPE_SELFTEST,
        &mut [],
    )
    .map_err(|e| e.to_string())?;
    let vdevice = viommu
        .alloc_vdevice(device.idev_id, u64::from(VIRT_ID))
        .map_err(|e| e.to_string())?;
    let (fault, file) = alloc_fault_object(iommufd).map_err(|e| e.to_string())?;
    let queue = KernelFaultQueue::new(fault.id(), file);
    let hwpt = viommu
        .alloc_nested_hwpt(
            device.idev_id,
            Some(&fault),
            IOMMU_HWPT_DATA_SELFTEST,
            &MockDevice::nested_data(),
        )
        .map_err(|e| e.to_string())?;
    let veventq = viommu
        .alloc_veventq(VeventType::Selftest, DEPTH)
        .map_err(|e| e.to_string())?;
    let attachment = hwpt
        .attach(
            device.attacher(iommufd).map_err(|e| e.to_string())?,
            device.idev_id,
            Some(queue.detach_notifier()),
        )
        .map_err(|e| e.to_string())?;
    let stack = Stack {
        attachment,
        veventq,
        vdevice,
        hwpt,
        queue,
        fault,
        viommu,
    };
    // What the handles say about themselves is what was allocated.
    let ids = stack.ids();
    let distinct = ids
        .iter()
        .enumerate()
        .all(|(i, a)| a.1 != 0 && ids[..i].iter().all(|b| b.1 != a.1));
    if !distinct
        || stack.vdevice.dev_id() != device.idev_id
        || stack.attachment.dev_id() != device.idev_id
        || stack.veventq.kind() != VeventType::Selftest
    {
        return Err(format!(
            "the handles disagree with the allocation: ids {ids:?}, vDevice on {}, attachment \
             of {}, vEVENTQ {:?} (device {})",
            stack.vdevice.dev_id(),
            stack.attachment.dev_id(),
            stack.veventq.kind(),
            device.idev_id
        ));
    }
    Ok(stack)
}

/// The vIOMMU rig: a second mock device on the VMM's IOAS and its stack.
pub struct ViommuRig<'a> {
    iommufd: &'a Iommufd,
    device: MockDevice,
    stack: Option<Stack>,
}

/// Sets up the rig; `Err(Skip)` on a kernel without vIOMMUs (`IOMMU_VIOMMU_ALLOC` unknown).
pub fn setup<'a>(iommufd: &'a Iommufd, ioas_id: u32) -> Result<(ViommuRig<'a>, String), Outcome> {
    let device = MockDevice::on_ioas(iommufd, ioas_id).map_err(|e| Outcome::Fail(e.to_string()))?;
    let probe = Viommu::alloc(
        iommufd,
        device.idev_id,
        device.parent_hwpt_id,
        IOMMU_VIOMMU_TYPE_SELFTEST,
        &mut [],
    );
    if let Err(e) = &probe {
        const ENOTTY: i32 = 25;
        if e.errno() == Some(ENOTTY) {
            let cleanup = [device.parent_hwpt_id, device.stdev_id]
                .iter()
                .try_for_each(|&id| iommufd.destroy(id));
            return Err(match cleanup {
                Ok(()) => Outcome::Skip(
                    "not applicable: this kernel has no IOMMU_VIOMMU_ALLOC (6.13+)".into(),
                ),
                Err(e) => Outcome::Fail(format!("cleanup after the probe: {e}")),
            });
        }
    }
    drop(probe.map_err(|e| Outcome::Fail(e.to_string()))?);
    let stack = build(iommufd, &device).map_err(Outcome::Fail)?;
    let detail = format!(
        "vIOMMU {} (selftest type) over parent {}, vDevice {} virt_id={VIRT_ID:#x}, nested \
         page table {} with fault queue {}, vEVENTQ {} depth={DEPTH}, device {} attached",
        stack.viommu.id(),
        device.parent_hwpt_id,
        stack.vdevice.id(),
        stack.hwpt.id(),
        stack.fault.id(),
        stack.veventq.id(),
        device.idev_id,
    );
    Ok((
        ViommuRig {
            iommufd,
            device,
            stack: Some(stack),
        },
        detail,
    ))
}

impl ViommuRig<'_> {
    fn stack(&mut self) -> Result<&mut Stack, String> {
        self.stack.as_mut().ok_or_else(|| "no stack".to_string())
    }

    fn trigger_vevents(&self, n: u32) -> Result<(), String> {
        for _ in 0..n {
            self.device
                .trigger_vevent(self.iommufd)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn trigger_iopf(&self, grpid: u32) -> Result<(), String> {
        self.device
            .trigger_iopf(
                self.iommufd,
                TriggerIopf {
                    pasid: 0,
                    grpid,
                    perm: PERM_RW,
                    addr: 0x7000 + u64::from(grpid) * 0x1000,
                },
            )
            .map_err(|e| e.to_string())
    }

    /// Events arrive through the same `FaultChannel` as the shared-memory path's
    /// unrecoverable faults, each naming the vDevice's virtual ID.
    pub fn delivery(&mut self) -> Result<String, String> {
        let quiet = std::time::Duration::from_millis(20);
        if self
            .stack()?
            .veventq
            .wait(Some(quiet))
            .map_err(|e| e.to_string())?
        {
            return Err("poll woke on an empty vEVENTQ".into());
        }
        self.trigger_vevents(2)?;
        let q = &mut self.stack()?.veventq;
        if !q
            .wait(Some(std::time::Duration::from_secs(5)))
            .map_err(|e| e.to_string())?
        {
            return Err("poll did not wake".into());
        }
        let mut got = Vec::new();
        let read = q
            .read(16, &mut |f| got.push(f))
            .map_err(|e| e.to_string())?;
        // Level-triggered like the fault queue: nothing to arm before sleeping.
        let may_sleep = q.prepare_to_sleep().map_err(|e| e.to_string())?;
        if read != got.len() || !q.live() || !may_sleep {
            return Err(format!(
                "read said {read} for {} events; live={} prepare_to_sleep={may_sleep}",
                got.len(),
                q.live()
            ));
        }
        let good = got
            .iter()
            .filter(|f| f.device == VIRT_ID && matches!(f.fault, Ok(Fault::Unrecoverable(_))))
            .count();
        if got.len() != 2 || good != 2 || q.lost() != 0 {
            return Err(format!("got {got:?}, lost {}", q.lost()));
        }
        if q.wait(Some(quiet)).map_err(|e| e.to_string())? {
            return Err("poll woke on a vEVENTQ read empty".into());
        }
        // An unrecoverable event takes no answer: answers given anyway are each refused.
        let answers = [ResponseRecord::default(); 2];
        let taken = q.respond(&answers).map_err(|e| e.to_string())?;
        if taken != 2 || q.stats().refused != 2 {
            return Err(format!("answers taken {taken}, {:?}", q.stats()));
        }
        Ok(format!(
            "events=2 device=virt_id {VIRT_ID:#x} unrecoverable, lost=0, answers refused=2, \
             no wake when empty"
        ))
    }

    /// Sequence numbers run on without gaps while nothing overflows, across reads: a read of
    /// at most 2 events takes exactly 2, the next read the rest.
    pub fn ordering(&mut self) -> Result<String, String> {
        self.trigger_vevents(DEPTH)?;
        let q = &mut self.stack()?.veventq;
        let mut seqs = Vec::new();
        let mut gaps = 0;
        let mut reads = Vec::new();
        for max in [2, 16] {
            let n = q
                .read_entries(max, &mut |e| match e {
                    VeventEntry::Event {
                        sequence,
                        lost_before,
                        ..
                    } => {
                        seqs.push(sequence);
                        gaps += lost_before;
                    }
                    VeventEntry::Lost { .. } => gaps += 1,
                })
                .map_err(|e| e.to_string())?;
            reads.push(n);
        }
        let consecutive = seqs.windows(2).all(|w| w[1] == w[0] + 1);
        if reads != [2, DEPTH as usize - 2]
            || seqs.len() != DEPTH as usize
            || !consecutive
            || gaps != 0
            || seqs[0] != 2
        {
            return Err(format!("reads {reads:?}, sequences {seqs:?}, gaps {gaps}"));
        }
        Ok(format!("reads={reads:?} sequences={seqs:?} gaps=0"))
    }

    /// More events than the depth: the kernel drops the excess and says so with a
    /// `LOST_EVENTS` header; every lost event is counted, and the next event follows on.
    pub fn overflow(&mut self) -> Result<String, String> {
        const EXTRA: u32 = 3;
        self.trigger_vevents(DEPTH + EXTRA)?;
        let q = &mut self.stack()?.veventq;
        let lost_before = q.lost();
        let mut events = 0;
        let mut markers = Vec::new();
        q.read_entries(16, &mut |e| match e {
            VeventEntry::Event { .. } => events += 1,
            VeventEntry::Lost { sequence, lost } => markers.push((sequence, lost)),
        })
        .map_err(|e| e.to_string())?;
        let lost = q.lost() - lost_before;
        self.trigger_vevents(1)?;
        let q = &mut self.stack()?.veventq;
        let mut after = Vec::new();
        q.read_entries(16, &mut |e| after.push(format!("{e:?}")))
            .map_err(|e| e.to_string())?;
        let lost_after = q.lost() - lost_before;
        if events != DEPTH
            || markers.len() != 1
            || lost != u64::from(EXTRA)
            || after.len() != 1
            || lost_after != lost
        {
            return Err(format!(
                "events={events} markers={markers:?} lost={lost} then {after:?} lost={lost_after}"
            ));
        }
        Ok(format!(
            "triggered={} delivered={events} lost_marker={markers:?} lost_counted={lost} \
             next_event_in_sequence=true total_lost={}",
            DEPTH + EXTRA,
            q.lost()
        ))
    }

    /// Page requests on the nested page table under the vIOMMU go through the cookie guard:
    /// answered once, and answers after a detach refused.
    pub fn page_requests(&mut self) -> Result<String, String> {
        self.trigger_iopf(1)?;
        let stack = self.stack()?;
        let (dev, first) = wait_for(&mut stack.queue, 1)?[0];
        stack
            .queue
            .respond(&[answer(&first, ResponseCode::Success)])
            .map_err(|e| e.to_string())?;
        let accepted = stack.queue.stats().written;
        // Two more, left pending; then the device is detached by dropping its attachment.
        self.trigger_iopf(2)?;
        self.trigger_iopf(3)?;
        let stack = self.stack()?;
        let pending: Vec<ResponseRecord> = wait_for(&mut stack.queue, 2)?
            .iter()
            .map(|(_, r)| answer(r, ResponseCode::Success))
            .collect();
        let before = stack.queue.stats();
        let stack = self.stack.take().ok_or("no stack")?;
        let Stack {
            attachment,
            veventq,
            vdevice,
            hwpt,
            mut queue,
            fault,
            viommu,
        } = stack;
        drop(attachment);
        queue.respond(&pending).map_err(|e| e.to_string())?;
        let after = queue.stats();
        let attachment = hwpt
            .attach(
                self.device
                    .attacher(self.iommufd)
                    .map_err(|e| e.to_string())?,
                self.device.idev_id,
                Some(queue.detach_notifier()),
            )
            .map_err(|e| e.to_string())?;
        self.stack = Some(Stack {
            attachment,
            veventq,
            vdevice,
            hwpt,
            queue,
            fault,
            viommu,
        });
        let retired = after.retired - before.retired;
        let refused = after.refused_stale - before.refused_stale;
        if dev != self.device.idev_id
            || accepted != 1
            || retired != 2
            || refused != 2
            || after.written != before.written
        {
            return Err(format!(
                "dev {dev} accepted {accepted} {before:?} -> {after:?}"
            ));
        }
        Ok(format!(
            "dev_id={dev} answered=1 accepted=1; detach by drop: retired={retired} \
             late_answers_refused={refused} written_after_detach=0"
        ))
    }

    /// Builds a stack, leaves a page request pending and an event unread, and drops the
    /// handles in every order of the five a VMM holds (attachment, vEVENTQ, nested page table,
    /// vIOMMU, fault queue), with the vDevice dropped at each position in turn; then checks that every object is gone (the kernel refused no
    /// destroy and nothing leaked) and that no page request was left unanswered.
    pub fn teardown_orders(mut self) -> Result<String, String> {
        // The rig's own stack first, in the struct's order.
        drop(self.stack.take());
        let (mut orders, mut checked) = (0, 0);
        let mut order = [0usize, 1, 2, 3, 4];
        loop {
            // The vDevice goes at each of the six positions in turn (a VMM may destroy it
            // before or after anything: the kernel lets it go while the device is attached).
            let vdevice_at = orders % 6;
            if self
                .one_order(&order, vdevice_at)
                .map_err(|e| format!("order {order:?}, vDevice at {vdevice_at}: {e}"))?
            {
                checked += 1;
            }
            orders += 1;
            if !next_permutation(&mut order) {
                break;
            }
        }
        let cleanup = [self.device.parent_hwpt_id, self.device.stdev_id]
            .iter()
            .try_for_each(|&id| self.iommufd.destroy(id));
        cleanup.map_err(|e| format!("parent page table or device after the orders: {e}"))?;
        Ok(format!(
            "orders={orders} (attachment, vEVENTQ, nested page table, vIOMMU, fault queue: \
             every permutation; the vDevice at each position in turn) refused=0 leaked=0; pending group answered by the detach and \
             its late answer refused in the {checked} orders where the queue outlived it; \
             parent page table and device destroyed after"
        ))
    }

    /// One order; returns whether the queue outlived the detach, so that the answer to the
    /// pending group could be checked (refused here, unknown to the kernel).
    fn one_order(&self, order: &[usize; 5], vdevice_at: usize) -> Result<bool, String> {
        let stack = build(self.iommufd, &self.device)?;
        let ids = stack.ids();
        self.trigger_iopf(7)?;
        self.trigger_vevents(1)?;
        let Stack {
            attachment,
            veventq,
            vdevice,
            hwpt,
            mut queue,
            fault,
            viommu,
        } = stack;
        let (_, pending) = wait_for(&mut queue, 1)?[0];
        let late = answer(&pending, ResponseCode::Success);
        let kernel_cookie = queue.kernel_cookie(pending.cookie);
        let mut vdevice = Some(vdevice);
        let mut attachment = Some(attachment);
        let mut veventq = Some(veventq);
        let mut hwpt = Some(hwpt);
        let mut viommu = Some(viommu);
        let mut queue_and_fault = Some((queue, fault));
        let mut answer_checked = false;
        for (at, &step) in order.iter().enumerate() {
            if at == vdevice_at {
                drop(vdevice.take());
            }
            match step {
                0 => {
                    drop(attachment.take());
                    if let Some((queue, _)) = queue_and_fault.as_mut() {
                        // The queue outlived the detach: the answer must now be refused here,
                        // and the kernel must no longer know the cookie.
                        queue.respond(&[late]).map_err(|e| e.to_string())?;
                        if queue.pending() != 0 || queue.stats().refused_stale != 1 {
                            return Err(format!("after detach: {:?}", queue.stats()));
                        }
                        if let Some(cookie) = kernel_cookie {
                            let known = queue
                                .file()
                                .write(&[iopf_iommufd::KernelResponse { cookie, code: 0 }]);
                            if known.is_ok() {
                                return Err("the kernel still held the detached group".into());
                            }
                        }
                        answer_checked = true;
                    }
                }
                1 => drop(veventq.take()),
                2 => drop(hwpt.take()),
                3 => drop(viommu.take()),
                _ => drop(queue_and_fault.take()),
            }
        }
        drop(vdevice);
        for (what, id) in ids {
            match self.iommufd.destroy(id) {
                Err(e) if e.errno() == Some(ENOENT) => {}
                Ok(()) => return Err(format!("{what} {id} was left behind")),
                Err(e) => return Err(format!("{what} {id} left behind: {e}")),
            }
        }
        Ok(answer_checked)
    }
}

/// The next permutation in lexicographic order; `false` after the last.
fn next_permutation(v: &mut [usize]) -> bool {
    let Some(i) = (1..v.len()).rev().find(|&i| v[i - 1] < v[i]) else {
        return false;
    };
    let j = (i..v.len()).rev().find(|&j| v[j] > v[i - 1]).unwrap_or(i);
    v.swap(i - 1, j);
    v[i..].reverse();
    true
}
