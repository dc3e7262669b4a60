//! The kernel fault queue as a [`FaultChannel`]: conversion to and from ABI v2, and cookies
//! that are never reused while their group is pending.
//!
//! The kernel numbers each group it hands out with the lowest free cookie of the fault object
//! (`xa_alloc` from 1) and frees the cookie as soon as the group is answered: by us, or by the
//! kernel itself when the device leaves the page table (detach or replace answers every pending
//! group `INVALID`). The next group may then carry the same cookie, so a late or duplicate
//! answer written with it would answer a group it was never meant for: the seed review's
//! second problem, back in the kernel's uapi.
//!
//! [`KernelFaultQueue`] gives the VMM its own cookie for each group (monotonic, never reused
//! while pending) and writes a response to the kernel only if the group it answers still holds
//! its kernel cookie. A group the kernel answered by itself is retired here at once when the
//! VMM detaches through [`KernelFaultQueue::detach_with`], and in any case as soon as the
//! kernel hands out its cookie again (the new group's read retires the old holder).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use iommufd_bindings::iommufd::{
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE as LAST_PAGE,
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID as PASID_VALID,
    iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID as RESP_INVALID,
    iommufd_page_response_code_IOMMUFD_PAGE_RESP_SUCCESS as RESP_SUCCESS,
};
use iopf_abi::{
    Cookie, DecodeError, Fault, PageAddr, PageRequest, Pasid, Perm, PrgIndex, ResponseCode,
    ResponseRecord,
};
use iopf_queue::{ChannelError, ChannelFault, FaultChannel};

use crate::error::KernelError;
use crate::fault_file::{FAULT_RECORD_SIZE, FaultFile, KernelFault, KernelResponse};

/// The largest group a read makes room for (records). A PCIe function has at most a few
/// hundred page request credits, so a real group is far smaller; a kernel that hands out a
/// larger one gets [`KernelError::GroupTooLarge`] instead of an unbounded buffer.
pub const MAX_GROUP_RECORDS: usize = 4096;

/// What the queue reads and writes: the kernel's fault file, or a model of it in tests.
pub trait FaultFileOps {
    /// One `read` (see [`FaultFile::read_into`]).
    fn read_into(&mut self, buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize>;
    /// One `write` (see [`FaultFile::write`]).
    fn write(&mut self, responses: &[KernelResponse]) -> io::Result<usize>;
    /// Readiness (see [`FaultFile::poll`]).
    fn poll(&mut self, timeout: Option<Duration>) -> Result<bool, KernelError>;
}

impl FaultFileOps for FaultFile {
    fn read_into(&mut self, buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize> {
        FaultFile::read_into(self, buf, out)
    }
    fn write(&mut self, responses: &[KernelResponse]) -> io::Result<usize> {
        FaultFile::write(self, responses)
    }
    fn poll(&mut self, timeout: Option<Duration>) -> Result<bool, KernelError> {
        FaultFile::poll(self, timeout)
    }
}

/// What the queue counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelQueueStats {
    /// Groups read from the kernel.
    pub groups: u64,
    /// Fault records read.
    pub records: u64,
    /// Responses the kernel accepted.
    pub written: u64,
    /// Responses refused here: their group is no longer pending (answered, retired, or never
    /// handed out).
    pub refused_stale: u64,
    /// Responses refused here: they do not decode.
    pub refused_malformed: u64,
    /// Responses refused here: PASID or PRG index differ from the group's.
    pub refused_mismatch: u64,
    /// Responses the kernel refused (`EINVAL`: it no longer knew the cookie).
    pub refused_by_kernel: u64,
    /// `Failure` answers sent as `Invalid` (the uapi has no `Failure`: stopping PRI for a
    /// function is the kernel's decision, not the VMM's).
    pub failure_as_invalid: u64,
    /// Groups whose records do not convert to ABI v2: answered `Invalid` here at once, handed
    /// to the VMM as decode errors.
    pub undecodable: u64,
    /// Groups the kernel answered by itself (detach or replace) while pending here.
    pub retired: u64,
}

/// A group handed to the VMM and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Pending {
    kernel_cookie: u32,
    dev_id: u32,
    pasid: Option<Pasid>,
    grpid: PrgIndex,
}

/// The kernel's fault queue as a VMM uses it (see the module documentation).
#[derive(Debug)]
pub struct KernelFaultQueue<F: FaultFileOps = FaultFile> {
    file: F,
    fault_id: u32,
    buf: Vec<u8>,
    records: Vec<KernelFault>,
    /// Smallest read (records) that held the first group last time.
    min_read: usize,
    /// Our cookie → the group.
    pending: HashMap<u32, Pending>,
    /// The kernel's cookie → our cookie, for the groups in `pending`.
    by_kernel: HashMap<u32, u32>,
    next_cookie: u32,
    stats: KernelQueueStats,
    /// Devices detached elsewhere (an [`Attachment`](crate::Attachment) dropped), whose groups
    /// are retired before the next read or write.
    detached: Arc<Mutex<Vec<u32>>>,
}

/// Tells a [`KernelFaultQueue`] that a device left its fault-capable page table, from code that
/// does not hold the queue (an [`Attachment`](crate::Attachment) being dropped, another
/// thread). The queue retires the device's pending groups before its next read or write, so
/// no answer can be written with the cookies the kernel freed at the detach.
#[derive(Debug, Clone)]
pub struct DetachNotifier {
    detached: Arc<Mutex<Vec<u32>>>,
}

impl DetachNotifier {
    /// Device `dev_id` was detached: the kernel answered its pending groups.
    pub fn detached(&self, dev_id: u32) {
        // A poisoned lock only means another holder panicked mid-push; the list is still a
        // list of device ids.
        self.detached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(dev_id);
    }
}

impl<F: FaultFileOps> KernelFaultQueue<F> {
    /// The queue over fault object `fault_id` and its file.
    pub fn new(fault_id: u32, file: F) -> Self {
        Self {
            file,
            fault_id,
            buf: Vec::new(),
            records: Vec::new(),
            min_read: 1,
            pending: HashMap::new(),
            by_kernel: HashMap::new(),
            next_cookie: 0,
            stats: KernelQueueStats::default(),
            detached: Arc::default(),
        }
    }

    /// A handle that retires a device's groups from outside the queue (see
    /// [`DetachNotifier`]).
    pub fn detach_notifier(&self) -> DetachNotifier {
        DetachNotifier {
            detached: Arc::clone(&self.detached),
        }
    }

    /// Retires the groups of every device a [`DetachNotifier`] reported.
    fn retire_notified(&mut self) {
        let devices =
            std::mem::take(&mut *self.detached.lock().unwrap_or_else(PoisonError::into_inner));
        for dev_id in devices {
            self.retire_device(dev_id);
        }
    }

    /// The fault object's id (for `IOMMU_HWPT_ALLOC` with `IOMMU_HWPT_FAULT_ID_VALID`).
    pub fn fault_id(&self) -> u32 {
        self.fault_id
    }

    /// The file.
    pub fn file(&self) -> &F {
        &self.file
    }

    /// The file, mutably (diagnostics and models; reading or writing through it bypasses the
    /// queue's cookie tracking).
    pub fn file_mut(&mut self) -> &mut F {
        &mut self.file
    }

    /// Counters.
    pub fn stats(&self) -> KernelQueueStats {
        self.stats
    }

    /// Groups handed to the VMM and not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The kernel's cookie of a pending group (diagnostics: it is never what the VMM sees).
    pub fn kernel_cookie(&self, cookie: Cookie) -> Option<u32> {
        self.pending.get(&cookie.get()).map(|p| p.kernel_cookie)
    }

    /// Runs `detach`, which moves device `dev_id` off the fault-capable page table (VFIO's
    /// detach or replace, or the self-test's `MOCK_DOMAIN_REPLACE`). If it succeeds, the
    /// kernel has answered every pending group of the device `INVALID` and freed their
    /// cookies, so they are retired here before any response can be written with them.
    pub fn detach_with<T, E>(
        &mut self,
        dev_id: u32,
        detach: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let result = detach()?;
        self.retire_device(dev_id);
        Ok(result)
    }

    /// Retires every pending group of `dev_id` (the kernel answered them). Returns how many.
    pub fn retire_device(&mut self, dev_id: u32) -> usize {
        let gone: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.dev_id == dev_id)
            .map(|(&c, _)| c)
            .collect();
        for cookie in &gone {
            if let Some(p) = self.pending.remove(cookie) {
                self.by_kernel.remove(&p.kernel_cookie);
            }
        }
        self.stats.retired += gone.len() as u64;
        gone.len()
    }

    /// Our next cookie: nonzero, and not held by a pending group.
    fn allocate_cookie(&mut self) -> u32 {
        loop {
            self.next_cookie = self.next_cookie.wrapping_add(1);
            if self.next_cookie != 0 && !self.pending.contains_key(&self.next_cookie) {
                return self.next_cookie;
            }
        }
    }

    /// Reads what the kernel has queued (whole groups), growing the buffer while the first
    /// group does not fit.
    fn read_records(&mut self, max: usize) -> Result<usize, KernelError> {
        let mut want = max.clamp(self.min_read, MAX_GROUP_RECORDS);
        loop {
            let bytes = want * FAULT_RECORD_SIZE;
            if self.buf.len() < bytes {
                self.buf.resize(bytes, 0);
            }
            match self
                .file
                .read_into(&mut self.buf[..bytes], &mut self.records)
            {
                Ok(n) => return Ok(n),
                Err(e) if is_einval(&e) => {
                    if want >= MAX_GROUP_RECORDS {
                        return Err(KernelError::GroupTooLarge(MAX_GROUP_RECORDS));
                    }
                    want = (want * 2).min(MAX_GROUP_RECORDS);
                    self.min_read = want;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(KernelError::Read(e)),
            }
        }
    }

    /// Answers a group `Invalid` at once (its records cannot be handed to the VMM).
    fn answer_invalid(&mut self, kernel_cookie: u32) -> Result<(), KernelError> {
        match self.file.write(&[KernelResponse {
            cookie: kernel_cookie,
            code: RESP_INVALID,
        }]) {
            Ok(_) => Ok(()),
            Err(e) if is_einval(&e) => {
                self.stats.refused_by_kernel += 1;
                Ok(())
            }
            Err(e) => Err(KernelError::Write(e)),
        }
    }

    /// Writes `batch` (kernel responses), going on past responses the kernel refuses. On an
    /// error, returns it with how many responses were taken (written or refused) before it;
    /// the kernel took none of the rest.
    fn write_batch(&mut self, batch: &[KernelResponse]) -> Result<(), (usize, KernelError)> {
        let mut at = 0;
        while at < batch.len() {
            match self.file.write(&batch[at..]) {
                Ok(n) if n > 0 => {
                    self.stats.written += n as u64;
                    at += n;
                }
                // Refused (alone, or the first of what is left): the kernel no longer knows
                // the cookie, which it answered itself. Nothing to retry.
                Ok(_) => {
                    self.stats.refused_by_kernel += 1;
                    at += 1;
                }
                Err(e) if is_einval(&e) => {
                    self.stats.refused_by_kernel += 1;
                    at += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((at, KernelError::Write(e))),
            }
        }
        Ok(())
    }

    /// Reads up to `max` records (or one whole group, if larger), converts them, and hands
    /// them to `f`. Returns how many records were handed over.
    pub fn read_faults(
        &mut self,
        max: usize,
        f: &mut dyn FnMut(ChannelFault),
    ) -> Result<usize, KernelError> {
        self.retire_notified();
        if max == 0 {
            return Ok(0);
        }
        let n = self.read_records(max)?;
        let records = std::mem::take(&mut self.records);
        let mut start = 0;
        while start < n {
            let kernel_cookie = records[start].cookie;
            let end = records[start..n]
                .iter()
                .position(|r| r.cookie != kernel_cookie)
                .map_or(n, |len| start + len);
            self.deliver_group(&records[start..end], f)?;
            start = end;
        }
        self.records = records;
        Ok(n)
    }

    fn deliver_group(
        &mut self,
        group: &[KernelFault],
        f: &mut dyn FnMut(ChannelFault),
    ) -> Result<(), KernelError> {
        let kernel_cookie = group[0].cookie;
        self.stats.groups += 1;
        self.stats.records += group.len() as u64;
        // The kernel hands out only free cookies: if ours says this one is pending, the kernel
        // answered that group itself (detach without `detach_with`). Retire it before anything
        // can be written with the cookie.
        if let Some(old) = self.by_kernel.remove(&kernel_cookie) {
            self.pending.remove(&old);
            self.stats.retired += 1;
        }
        let cookie = self.allocate_cookie();
        let first = group[0];
        let converted: Vec<Result<PageRequest, DecodeError>> = group
            .iter()
            .enumerate()
            .map(|(i, r)| {
                same_group(&first, r)?;
                to_page_request(r, cookie, i + 1 == group.len())
            })
            .collect();
        if converted.iter().any(Result::is_err) {
            self.stats.undecodable += 1;
            self.answer_invalid(kernel_cookie)?;
            for (record, result) in group.iter().zip(converted) {
                if let Err(e) = result {
                    f(ChannelFault {
                        device: record.dev_id,
                        fault: Err(e),
                    });
                }
            }
            return Ok(());
        }
        // Every record converted, and they all name the first one's device, PASID and PRG index.
        let requests: Vec<PageRequest> = converted.into_iter().flatten().collect();
        self.pending.insert(
            cookie,
            Pending {
                kernel_cookie,
                dev_id: first.dev_id,
                pasid: requests[0].pasid,
                grpid: requests[0].grpid,
            },
        );
        self.by_kernel.insert(kernel_cookie, cookie);
        for request in requests {
            f(ChannelFault {
                device: first.dev_id,
                fault: Ok(Fault::PageRequest(request)),
            });
        }
        Ok(())
    }

    /// Sends responses (see [`FaultChannel::respond`]); every one is taken. If the write
    /// fails, the error is returned and the groups whose responses the kernel did not take
    /// stay pending, so they can be answered again.
    pub fn write_responses(&mut self, responses: &[ResponseRecord]) -> Result<usize, KernelError> {
        self.retire_notified();
        let mut batch = Vec::with_capacity(responses.len());
        let mut taken = Vec::with_capacity(responses.len());
        for record in responses {
            let response = match record.decode() {
                Ok(r) => r,
                Err(_) => {
                    self.stats.refused_malformed += 1;
                    continue;
                }
            };
            let cookie = response.cookie.get();
            let Some(pending) = self.pending.get(&cookie).copied() else {
                self.stats.refused_stale += 1;
                continue;
            };
            if pending.pasid != response.pasid || pending.grpid != response.grpid {
                self.stats.refused_mismatch += 1;
                continue;
            }
            let code = match response.code {
                ResponseCode::Success => RESP_SUCCESS,
                ResponseCode::Invalid => RESP_INVALID,
                ResponseCode::Failure => {
                    self.stats.failure_as_invalid += 1;
                    RESP_INVALID
                }
            };
            self.pending.remove(&cookie);
            self.by_kernel.remove(&pending.kernel_cookie);
            taken.push((cookie, pending));
            batch.push(KernelResponse {
                cookie: pending.kernel_cookie,
                code,
            });
        }
        if let Err((done, e)) = self.write_batch(&batch) {
            // The kernel never saw these: their groups are still pending there.
            for (cookie, pending) in taken.drain(done..) {
                self.pending.insert(cookie, pending);
                self.by_kernel.insert(pending.kernel_cookie, cookie);
            }
            return Err(e);
        }
        Ok(responses.len())
    }

    /// Responses refused here or by the kernel.
    pub fn refused_total(&self) -> u64 {
        let s = &self.stats;
        s.refused_stale + s.refused_malformed + s.refused_mismatch + s.refused_by_kernel
    }
}

/// Whether the kernel refused with `EINVAL` (a read buffer too small for the first group, or a
/// response whose cookie it no longer knows).
fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// Records of one group (one kernel cookie) must name the same device, PASID and PRG index:
/// the response answers them all with the group's.
fn same_group(first: &KernelFault, record: &KernelFault) -> Result<(), DecodeError> {
    let field = if record.dev_id != first.dev_id {
        "dev_id"
    } else if (record.flags & PASID_VALID) != (first.flags & PASID_VALID)
        || (record.flags & PASID_VALID != 0 && record.pasid != first.pasid)
    {
        "pasid"
    } else if record.grpid != first.grpid {
        "grpid"
    } else {
        return Ok(());
    };
    Err(DecodeError::InconsistentGroup { field })
}

/// One kernel record as an ABI v2 page request carrying our `cookie`. The address is the page
/// that faulted (PRI is page-granular; the self-test's mock passes any address).
fn to_page_request(
    record: &KernelFault,
    cookie: u32,
    last: bool,
) -> Result<PageRequest, DecodeError> {
    let unknown = record.flags & !(PASID_VALID | LAST_PAGE);
    if unknown != 0 {
        return Err(DecodeError::UnknownBits {
            field: "flags",
            bits: unknown,
        });
    }
    let perm = Perm::from_bits(record.perm).ok_or(DecodeError::UnknownBits {
        field: "perm",
        bits: record.perm & !Perm::all().bits(),
    })?;
    let pasid = if record.flags & PASID_VALID != 0 {
        Some(Pasid::new(record.pasid)?)
    } else {
        None
    };
    Ok(PageRequest {
        cookie: Cookie::new(cookie)?,
        pasid,
        grpid: PrgIndex::new(record.grpid)?,
        perm,
        addr: PageAddr::containing(record.addr),
        last,
        private_data: None,
    })
}

fn channel_error(e: KernelError) -> ChannelError {
    let what = match &e {
        KernelError::Read(_) | KernelError::GroupTooLarge(_) => "read of the kernel fault queue",
        KernelError::Write(_) => "write of page responses",
        KernelError::Poll(_) => "poll of the kernel fault queue",
        KernelError::Open(_)
        | KernelError::NotIommufd(_)
        | KernelError::Dup(_)
        | KernelError::Ioctl { .. } => "iommufd",
    };
    let source = match e {
        KernelError::Read(s) | KernelError::Write(s) | KernelError::Poll(s) => s,
        other => io::Error::other(other.to_string()),
    };
    ChannelError::Io { what, source }
}

/// The kernel fault queue as a channel; `F` gives the fd an event loop polls (the fault file).
impl<F: FaultFileOps + AsFd> FaultChannel for KernelFaultQueue<F> {
    fn read(&mut self, max: usize, f: &mut dyn FnMut(ChannelFault)) -> Result<usize, ChannelError> {
        self.read_faults(max, f).map_err(channel_error)
    }

    fn respond(&mut self, responses: &[ResponseRecord]) -> Result<usize, ChannelError> {
        self.write_responses(responses).map_err(channel_error)
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<bool, ChannelError> {
        self.file.poll(timeout).map_err(channel_error)
    }

    fn live(&self) -> bool {
        // The kernel queue lives as long as its file: faults may always come.
        true
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn prepare_to_sleep(&mut self) -> Result<bool, ChannelError> {
        // Level-triggered: the file stays readable while faults are queued, so there is no
        // wake-up to ask for and none to lose.
        Ok(true)
    }

    fn woke(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }

    fn refused(&self) -> u64 {
        self.refused_total()
    }
}

#[cfg(test)]
mod tests;
