//! One device's fault state: its handler, its partial and pending groups, its cookie counter,
//! its counters. Everything here runs under the device's lock and never blocks; responses for
//! the device are pushed to `out` and delivered by the caller after the lock is released.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use iopf_abi::{
    Cookie, DecodeError, PageRequest, ResponseCode, ResponseRecord, UnrecoverableFault,
};
use iopf_queue::Staged;

use crate::chain::ErrorChain;
use crate::clock::Nanos;
use crate::counters::DeviceCounters;
use crate::handler::{FaultHandler, StageError, Wake};
use crate::pending::{PendingGroup, PendingTable};
use crate::ratelimit::RateLimit;
use crate::types::{
    AutoReason, DeviceConfig, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, Refusal,
    ResponseSource,
};

/// (PASID or `NO_PASID`, PRG index): the key of a group still being assembled.
type PartialKey = (u32, u16);
const NO_PASID: u32 = u32::MAX;

/// A group whose `LAST_PAGE` request has not arrived.
#[derive(Debug, Default)]
struct PartialGroup {
    pages: Vec<DevicePageRequest>,
    /// Pages were dropped because the group passed the page limit.
    truncated: bool,
}

thread_local! {
    /// The records [`DeviceState::process_responses`] reads, reused across calls and devices.
    static SCRATCH: std::cell::Cell<Vec<ResponseRecord>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Responses read from the response queue per call, so one busy VMM cannot hold a device lock
/// for an unbounded time.
const RESPONSE_BATCH: usize = 1024;

/// Batches a reset reads before answering: a full ring of the largest size ABI v2 allows, so
/// a reset takes bounded time even while the VMM keeps publishing.
const RESET_DRAIN_BATCHES: usize = iopf_abi::MAX_ENTRIES as usize / RESPONSE_BATCH;

#[derive(Debug)]
pub(crate) struct DeviceState {
    id: DeviceId,
    config: DeviceConfig,
    handler: Option<Box<dyn FaultHandler>>,
    /// The next cookie to try. Monotonic across handler lives: never reset by unregister.
    next_cookie: u32,
    next_seq: u64,
    partial: HashMap<PartialKey, PartialGroup, BuildHasherDefault<std::hash::DefaultHasher>>,
    pending: PendingTable,
    /// Records staged since the last publish.
    staged: bool,
    pub(crate) counters: DeviceCounters,
    log: RateLimit,
    /// Doorbells to ring once the device's lock is released ([`Wake`]).
    pub(crate) wakes: Vec<Wake>,
    /// Test-only mutant (feature `mutant-cross-device`): responses this device did not know,
    /// handed to [`crate::FaultCore`] to try on the other devices.
    #[cfg(feature = "mutant-cross-device")]
    pub(crate) unknown: Vec<ResponseRecord>,
}

fn auto(request: &DevicePageRequest, reason: AutoReason) -> DeviceResponse {
    DeviceResponse {
        pasid: request.pasid,
        grpid: request.grpid,
        code: ResponseCode::Invalid,
        cookie: None,
        source: ResponseSource::Auto(reason),
    }
}

/// Test-only mutant (feature `mutant-unregister-forgets`, never on by default): unregister
/// forgets the oldest pending group instead of answering it, so the device waits for an answer
/// that never comes.
#[cfg(feature = "mutant-unregister-forgets")]
fn mutant_forget_oldest(groups: &mut Vec<crate::pending::PendingGroup>) {
    if !groups.is_empty() {
        groups.remove(0);
    }
}

/// Where a device's cookie counter starts.
fn first_cookie(id: DeviceId) -> u32 {
    (id.0.wrapping_mul(0x9e37_79b9) >> 8).max(1)
}

impl DeviceState {
    pub(crate) fn new(id: DeviceId, config: DeviceConfig) -> Self {
        Self {
            id,
            config,
            handler: None,
            // Start each device's counter somewhere different, so that cookies of different
            // devices rarely coincide in logs. Correctness does not depend on it: a response
            // is only ever matched against its own device's pending table.
            next_cookie: first_cookie(id),
            next_seq: 0,
            partial: HashMap::default(),
            pending: PendingTable::default(),
            staged: false,
            counters: DeviceCounters::default(),
            log: RateLimit::new(),
            #[cfg(feature = "mutant-cross-device")]
            unknown: Vec::new(),
            wakes: Vec::new(),
        }
    }

    pub(crate) fn has_handler(&self) -> bool {
        self.handler.is_some()
    }

    pub(crate) fn consumer_attached(&self) -> bool {
        self.handler.as_ref().is_some_and(|h| h.consumer_attached())
    }

    pub(crate) fn set_fault_doorbell(&mut self, doorbell: Option<iopf_queue::Doorbell>) -> bool {
        match self.handler.as_mut() {
            Some(handler) => {
                handler.set_fault_doorbell(doorbell);
                true
            }
            None => false,
        }
    }

    pub(crate) fn pending_groups(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn fault_queue_fill(&self) -> Option<(u32, u32)> {
        self.handler.as_ref().and_then(|h| h.fault_queue_fill())
    }

    pub(crate) fn next_deadline(&mut self) -> Option<Nanos> {
        self.pending.next_deadline()
    }

    pub(crate) fn register(
        &mut self,
        mut handler: Box<dyn FaultHandler>,
    ) -> Result<(), Box<dyn FaultHandler>> {
        if self.handler.is_some() {
            return Err(handler);
        }
        handler.set_live(true);
        self.handler = Some(handler);
        self.counters.registrations += 1;
        tracing::debug!(
            life = self.counters.registrations,
            "fault handler registered: LIVE set"
        );
        Ok(())
    }

    /// Drops the handler and answers every pending group `Invalid` for `reason`. Partial
    /// groups are discarded: the device has not finished them, and their `LAST_PAGE` request,
    /// when it comes, is answered then. Never fails, never waits on the consumer.
    pub(crate) fn unregister(
        &mut self,
        reason: AutoReason,
        out: &mut Vec<DeviceResponse>,
    ) -> usize {
        let Some(mut handler) = self.handler.take() else {
            return 0;
        };
        // Best effort: the consumer learns the handler is gone (its doorbell rung after the
        // lock is released). Whatever it writes from now on goes to memory nobody reads.
        handler.set_live(false);
        self.wakes.extend(handler.kick());
        drop(handler);
        self.staged = false;
        self.counters.unregistrations += 1;
        // Test-only mutant (feature `mutant-cookie-reset`, never on by default): the stale-
        // response bug, a counter that starts over with each handler life, so that the
        // simulation's checker can prove it still catches it.
        #[cfg(feature = "mutant-cookie-reset")]
        {
            self.next_cookie = first_cookie(self.id);
        }
        let discarded: usize = self.partial.drain().map(|(_, p)| p.pages.len()).sum();
        self.counters.partial_dropped += discarded as u64;
        #[allow(unused_mut)]
        let mut groups = self.pending.take_all();
        #[cfg(feature = "mutant-unregister-forgets")]
        mutant_forget_oldest(&mut groups);
        let answered = groups.len();
        for group in groups {
            self.count_auto(reason);
            out.push(DeviceResponse {
                pasid: group.pasid,
                grpid: group.grpid,
                code: ResponseCode::Invalid,
                cookie: Some(group.cookie),
                source: ResponseSource::Auto(reason),
            });
        }
        tracing::debug!(
            life = self.counters.registrations,
            answered,
            discarded,
            ?reason,
            "fault handler unregistered: LIVE cleared, pending groups answered Invalid"
        );
        answered
    }

    /// A function-level reset of the device as its VMM sees it. Responses the VMM published
    /// before the reset are applied first (they were sent before it, so they count). Then every
    /// group still pending is answered `Invalid` (`reset`), and partial groups are discarded
    /// (a reset device forgets them; a `LAST_PAGE` request that comes later is handled as a
    /// new group). The handler stays registered, with its queues and doorbells, and the cookie
    /// counter goes on, so an answer to a group the reset answered is refused like any stale
    /// one. Never fails, never waits on the VMM. Returns how many groups the reset answered
    /// (if the drain found a broken queue, the handler was unregistered instead and its groups
    /// answered `queue_broken`: 0 here).
    pub(crate) fn reset(&mut self, now: Nanos, out: &mut Vec<DeviceResponse>) -> usize {
        for _ in 0..RESET_DRAIN_BATCHES {
            if self.process_responses(now, out) < RESPONSE_BATCH {
                break;
            }
        }
        let discarded: usize = self.partial.drain().map(|(_, p)| p.pages.len()).sum();
        self.counters.partial_dropped += discarded as u64;
        let groups = self.pending.take_all();
        let answered = groups.len();
        for group in groups {
            self.count_auto(AutoReason::Reset);
            out.push(DeviceResponse {
                pasid: group.pasid,
                grpid: group.grpid,
                code: ResponseCode::Invalid,
                cookie: Some(group.cookie),
                source: ResponseSource::Auto(AutoReason::Reset),
            });
        }
        tracing::debug!(
            life = self.counters.registrations,
            answered,
            discarded,
            "device reset: pending groups answered Invalid, handler kept"
        );
        answered
    }

    fn count_auto(&mut self, reason: AutoReason) {
        let a = &mut self.counters.responses.auto;
        let counter = match reason {
            AutoReason::NoHandler => &mut a.no_handler,
            AutoReason::NotAttached => &mut a.not_attached,
            AutoReason::QueueFull => &mut a.queue_full,
            AutoReason::PendingLimit => &mut a.pending_limit,
            AutoReason::GroupTooLarge => &mut a.group_too_large,
            AutoReason::Unregister => &mut a.unregister,
            AutoReason::VmmGone => &mut a.vmm_gone,
            AutoReason::QueueBroken => &mut a.queue_broken,
            AutoReason::Timeout => &mut a.timeout,
            AutoReason::Reset => &mut a.reset,
        };
        *counter += 1;
    }

    fn answer_auto(
        &mut self,
        request: &DevicePageRequest,
        reason: AutoReason,
        out: &mut Vec<DeviceResponse>,
    ) {
        self.count_auto(reason);
        out.push(auto(request, reason));
    }

    /// The next cookie: monotonic, never 0, never one that is still pending.
    fn allocate_cookie(&mut self) -> Cookie {
        loop {
            let candidate = self.next_cookie;
            self.next_cookie = candidate.wrapping_add(1).max(1);
            if let Ok(cookie) = Cookie::new(candidate)
                && !self.pending.contains(candidate)
            {
                return cookie;
            }
        }
    }

    pub(crate) fn report(
        &mut self,
        fault: &DeviceFault,
        now: Nanos,
        out: &mut Vec<DeviceResponse>,
    ) {
        match fault {
            DeviceFault::PageRequest(request) => self.report_page_request(request, now, out),
            DeviceFault::Unrecoverable(fault) => self.report_unrecoverable(fault, out),
        }
    }

    fn report_unrecoverable(&mut self, fault: &UnrecoverableFault, out: &mut Vec<DeviceResponse>) {
        self.counters.unrecoverable += 1;
        let Some(handler) = self.handler.as_mut().filter(|h| h.consumer_attached()) else {
            self.counters.lost += 1;
            return;
        };
        match handler.stage_unrecoverable(fault) {
            Ok(Staged::Queued) => {
                self.counters.unrecoverable_delivered += 1;
                self.staged = true;
            }
            Ok(Staged::Lost) => self.counters.lost += 1,
            Err(e) => {
                self.counters.lost += 1;
                tracing::warn!(device = %self.id, error = %e, "fault queue broken by its consumer");
                self.unregister(AutoReason::QueueBroken, out);
            }
        }
    }

    fn report_page_request(
        &mut self,
        request: &DevicePageRequest,
        now: Nanos,
        out: &mut Vec<DeviceResponse>,
    ) {
        self.counters.page_requests += 1;
        let key = (
            request.pasid.map_or(NO_PASID, |p| p.get()),
            request.grpid.get(),
        );
        if !request.last {
            self.hold_partial(key, request);
            return;
        }
        self.counters.groups += 1;
        let partial = self.partial.remove(&key).unwrap_or_default();
        if partial.truncated {
            return self.answer_auto(request, AutoReason::GroupTooLarge, out);
        }
        let Some(handler) = self.handler.as_mut() else {
            return self.answer_auto(request, AutoReason::NoHandler, out);
        };
        if !handler.consumer_attached() {
            return self.answer_auto(request, AutoReason::NotAttached, out);
        }
        if self.pending.len() >= self.config.max_pending_groups {
            if self.log.allow(now) {
                tracing::warn!(device = %self.id, limit = self.config.max_pending_groups, "pending group limit reached");
            }
            return self.answer_auto(request, AutoReason::PendingLimit, out);
        }
        let cookie = self.allocate_cookie();
        let staged = if partial.pages.is_empty() {
            self.stage(&[request.with_cookie(cookie)])
        } else {
            let group: Vec<PageRequest> = partial
                .pages
                .iter()
                .chain(std::iter::once(request))
                .map(|r| r.with_cookie(cookie))
                .collect();
            self.stage(&group)
        };
        match staged {
            Ok(()) => {
                let deadline = self
                    .config
                    .response_timeout
                    .map(|t| now.saturating_add(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)));
                self.pending.insert(PendingGroup {
                    cookie,
                    pasid: request.pasid,
                    grpid: request.grpid,
                    deadline,
                    seq: self.next_seq,
                });
                self.next_seq += 1;
                self.counters.groups_delivered += 1;
                self.staged = true;
            }
            Err(StageError::Full) => self.answer_auto(request, AutoReason::QueueFull, out),
            Err(StageError::Broken(e)) => {
                tracing::warn!(device = %self.id, error = %e, "fault queue broken by its consumer");
                self.answer_auto(request, AutoReason::QueueBroken, out);
                self.unregister(AutoReason::QueueBroken, out);
            }
        }
    }

    fn stage(&mut self, group: &[PageRequest]) -> Result<(), StageError> {
        match self.handler.as_mut() {
            Some(handler) => handler.stage_group(group),
            None => Err(StageError::Full),
        }
    }

    fn hold_partial(&mut self, key: PartialKey, request: &DevicePageRequest) {
        if self.handler.is_none() {
            self.counters.partial_dropped += 1;
            return;
        }
        let max_pages = self.config.max_group_pages;
        if let Some(partial) = self.partial.get_mut(&key) {
            // The LAST_PAGE request needs a place too.
            if partial.pages.len() + 1 >= max_pages {
                partial.truncated = true;
                self.counters.partial_dropped += 1;
            } else {
                partial.pages.push(*request);
            }
        } else if self.partial.len() >= self.config.max_partial_groups || max_pages < 2 {
            // Dropped: when its LAST_PAGE request comes, the group is delivered with what was
            // kept; on Success the device asks again for any page still missing.
            self.counters.partial_dropped += 1;
        } else {
            self.partial.insert(
                key,
                PartialGroup {
                    pages: vec![*request],
                    truncated: false,
                },
            );
        }
    }

    /// Publishes what was staged, waking the consumer if it sleeps.
    pub(crate) fn publish(&mut self, out: &mut Vec<DeviceResponse>) {
        if !std::mem::take(&mut self.staged) {
            return;
        }
        let Some(handler) = self.handler.as_mut() else {
            return;
        };
        match handler.publish() {
            Ok(wake) => self.wakes.extend(wake),
            Err(e) => {
                tracing::warn!(device = %self.id, error = %ErrorChain(&e), "cannot publish to the fault queue");
                self.unregister(AutoReason::QueueBroken, out);
            }
        }
    }

    /// Checks one response against ABI v2 and the pending table; if it answers a pending
    /// group, the group is complete and its response goes to `out`.
    pub(crate) fn respond(
        &mut self,
        record: &ResponseRecord,
        now: Nanos,
        out: &mut Vec<DeviceResponse>,
    ) -> Result<(), Refusal> {
        let result = self.check_response(record);
        match result {
            Ok(response) => {
                let c = &mut self.counters.responses.guest;
                match response.code {
                    ResponseCode::Success => c.success += 1,
                    ResponseCode::Invalid => c.invalid += 1,
                    ResponseCode::Failure => c.failure += 1,
                }
                out.push(response);
                Ok(())
            }
            Err(refusal) => {
                let r = &mut self.counters.refused;
                match refusal {
                    Refusal::Malformed(_) => r.malformed += 1,
                    Refusal::BadVersion(_) => r.bad_version += 1,
                    Refusal::UnknownCookie(_) => r.unknown_cookie += 1,
                    Refusal::Mismatch { .. } => r.mismatch += 1,
                    Refusal::FailureCode => r.failure_code += 1,
                }
                if self.log.allow(now) {
                    tracing::warn!(device = %self.id, refusal = %ErrorChain(&refusal), "page response refused");
                }
                Err(refusal)
            }
        }
    }

    fn check_response(&mut self, record: &ResponseRecord) -> Result<DeviceResponse, Refusal> {
        let response = record.decode().map_err(|e| match e {
            DecodeError::UnsupportedResponseVersion(v) => Refusal::BadVersion(v),
            other => Refusal::Malformed(other),
        })?;
        let group = self
            .pending
            .get(response.cookie)
            .ok_or(Refusal::UnknownCookie(response.cookie))?;
        if group.pasid != response.pasid || group.grpid != response.grpid {
            return Err(Refusal::Mismatch {
                cookie: response.cookie,
                expected_pasid: group.pasid,
                expected_grpid: group.grpid,
                pasid: response.pasid,
                grpid: response.grpid,
            });
        }
        if response.code == ResponseCode::Failure && !self.config.allow_failure {
            return Err(Refusal::FailureCode);
        }
        let group = self
            .pending
            .remove(response.cookie)
            .ok_or(Refusal::UnknownCookie(response.cookie))?;
        Ok(DeviceResponse {
            pasid: group.pasid,
            grpid: group.grpid,
            code: response.code,
            cookie: Some(group.cookie),
            source: ResponseSource::Guest,
        })
    }

    /// Reads a batch of responses from the handler's response queue and applies each one.
    /// Returns how many records were read.
    pub(crate) fn process_responses(&mut self, now: Nanos, out: &mut Vec<DeviceResponse>) -> usize {
        let Some(handler) = self.handler.as_mut() else {
            return 0;
        };
        // One buffer per thread, not per device: it stays in cache however many devices the
        // thread serves (a per-device buffer is one more cold line per 2 responses).
        let mut records = SCRATCH.with(|s| s.take());
        records.clear();
        let drained = handler.drain_responses(RESPONSE_BATCH, &mut records);
        let mut refused = 0;
        for record in &records {
            if let Err(_refusal) = self.respond(record, now, out) {
                #[cfg(feature = "mutant-cross-device")]
                if self.mutant_keep_unknown(record, &_refusal) {
                    continue;
                }
                refused += 1;
            }
        }
        if refused > 0
            && let Some(handler) = self.handler.as_mut()
        {
            handler.count_rejected(refused);
        }
        let read = records.len();
        SCRATCH.with(|s| s.set(records));
        if let Err(e) = drained {
            tracing::warn!(device = %self.id, error = %e, "response queue broken by its producer");
            self.unregister(AutoReason::QueueBroken, out);
        }
        read
    }

    /// Test-only mutant (feature `mutant-cross-device`, never on by default): keeps a response
    /// whose cookie this device does not know, for [`crate::FaultCore`] to try on the other
    /// devices. Whether it was kept.
    #[cfg(feature = "mutant-cross-device")]
    fn mutant_keep_unknown(&mut self, record: &ResponseRecord, refusal: &Refusal) -> bool {
        let unknown = matches!(refusal, Refusal::UnknownCookie(_));
        if unknown {
            self.unknown.push(*record);
        }
        unknown
    }

    /// Asks the handler's VMM for a doorbell ring on its next response. `true`: the caller may
    /// sleep; `false`: responses are waiting, or there is no handler to wait for.
    pub(crate) fn prepare_to_sleep(&mut self, out: &mut Vec<DeviceResponse>) -> bool {
        let Some(handler) = self.handler.as_mut() else {
            return false;
        };
        match handler.prepare_to_sleep() {
            Ok(sleep) => sleep,
            Err(e) => {
                tracing::warn!(device = %self.id, error = %e, "response queue broken by its producer");
                self.unregister(AutoReason::QueueBroken, out);
                false
            }
        }
    }

    pub(crate) fn woke(&mut self) {
        if let Some(handler) = self.handler.as_mut() {
            handler.woke();
        }
    }

    /// Answers every group whose deadline has passed.
    pub(crate) fn expire(&mut self, now: Nanos, out: &mut Vec<DeviceResponse>) -> usize {
        let mut expired = 0;
        while let Some(group) = self.pending.pop_expired(now) {
            self.count_auto(AutoReason::Timeout);
            out.push(DeviceResponse {
                pasid: group.pasid,
                grpid: group.grpid,
                code: ResponseCode::Invalid,
                cookie: Some(group.cookie),
                source: ResponseSource::Auto(AutoReason::Timeout),
            });
            expired += 1;
        }
        if expired > 0 && self.log.allow(now) {
            tracing::warn!(device = %self.id, expired, "page request groups timed out");
        }
        expired
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use iopf_abi::{PageAddr, PageResponse, Pasid, Perm, PrgIndex};
    use iopf_queue::{QueueError, RingError};

    use super::*;

    /// A VMM seen through its handler: `published` response records wait in its response
    /// queue (all of them malformed, so each is refused and counted), and it publishes
    /// `per_read` more each time the host reads (a VMM that never stops). With
    /// `broken_fault_queue`, the VMM has broken its fault queue: staging fails; with
    /// `no_room_for_unrecoverable`, the fault ring drops unrecoverable faults. The page
    /// requests of every group staged are kept in `staged`.
    /// `responses_waiting`: what the VMM's response queue answers a request to sleep; `woke`
    /// counts the requests withdrawn.
    #[derive(Debug, Default)]
    pub(crate) struct FakeVmm {
        pub(crate) published: usize,
        pub(crate) per_read: usize,
        pub(crate) fill: Option<(u32, u32)>,
        pub(crate) broken_fault_queue: bool,
        pub(crate) no_room_for_unrecoverable: bool,
        pub(crate) responses_waiting: bool,
        pub(crate) staged: Arc<Mutex<Vec<PageRequest>>>,
        pub(crate) woke: Arc<Mutex<usize>>,
    }

    impl FaultHandler for FakeVmm {
        fn consumer_attached(&self) -> bool {
            true
        }
        fn stage_group(&mut self, group: &[PageRequest]) -> Result<(), StageError> {
            self.staged.lock().unwrap().extend_from_slice(group);
            Ok(())
        }
        fn stage_unrecoverable(&mut self, _: &UnrecoverableFault) -> Result<Staged, RingError> {
            if self.broken_fault_queue {
                return Err(RingError::ConsumerIndex {
                    found: 9,
                    low: 0,
                    high: 1,
                });
            }
            if self.no_room_for_unrecoverable {
                return Ok(Staged::Lost);
            }
            Ok(Staged::Queued)
        }
        fn publish(&mut self) -> Result<Option<Wake>, QueueError> {
            Ok(None)
        }
        fn drain_responses(
            &mut self,
            max: usize,
            out: &mut Vec<ResponseRecord>,
        ) -> Result<usize, RingError> {
            self.published += self.per_read;
            let n = max.min(self.published);
            self.published -= n;
            out.extend(std::iter::repeat_n(ResponseRecord::default(), n));
            Ok(n)
        }
        fn count_rejected(&mut self, _n: u64) {}
        fn set_live(&mut self, _live: bool) {}
        fn kick(&mut self) -> Option<Wake> {
            None
        }
        fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
            Ok(!self.responses_waiting)
        }
        fn woke(&mut self) {
            *self.woke.lock().unwrap() += 1;
        }
        fn set_fault_doorbell(&mut self, _doorbell: Option<iopf_queue::Doorbell>) {}
        fn fault_queue_fill(&self) -> Option<(u32, u32)> {
            self.fill
        }
    }

    fn device_with(vmm: FakeVmm) -> DeviceState {
        let mut device = DeviceState::new(DeviceId(7), DeviceConfig::default());
        device.register(Box::new(vmm)).unwrap();
        device
    }

    /// Response records the device has read (every one the fake VMM sends is refused).
    fn read(device: &DeviceState) -> u64 {
        device.counters.refused_total()
    }

    /// Reports page `page` of group `grpid` (PASID 1); `last`: its last page.
    fn report_page(device: &mut DeviceState, grpid: u32, page: u64, last: bool) {
        let request = DevicePageRequest {
            pasid: Some(Pasid::new(1).unwrap()),
            grpid: PrgIndex::new(grpid).unwrap(),
            perm: Perm::READ,
            addr: PageAddr::new(page * 4096).unwrap(),
            last,
            private_data: None,
        };
        let mut out = Vec::new();
        device.report(&DeviceFault::PageRequest(request), 0, &mut out);
        assert!(out.is_empty(), "the group is staged, not answered: {out:?}");
    }

    /// Reports page `page` of group 5 (PASID 1), not the last one.
    fn report_partial_page(device: &mut DeviceState, page: u64) {
        report_page(device, 5, page, false);
    }

    fn unrecoverable_fault() -> DeviceFault {
        DeviceFault::Unrecoverable(UnrecoverableFault {
            reason: iopf_abi::FaultReason::Permission,
            pasid: None,
            perm: Perm::WRITE,
            addr: Some(0x1000),
            fetch_addr: None,
        })
    }

    #[test]
    fn reset_applies_every_response_published_before_it() {
        // 3000 records: two full batches and a short one.
        let mut device = device_with(FakeVmm {
            published: 3000,
            ..FakeVmm::default()
        });
        device.reset(0, &mut Vec::new());
        assert_eq!(read(&device), 3000);
    }

    #[test]
    fn reset_stops_reading_once_it_has_caught_up_with_the_vmm() {
        // The VMM publishes 10 records whenever the host reads: the reset reads the first 10
        // (a batch short of full: the queue was empty) and does not chase the rest.
        let mut device = device_with(FakeVmm {
            per_read: 10,
            ..FakeVmm::default()
        });
        device.reset(0, &mut Vec::new());
        assert_eq!(read(&device), 10);
    }

    #[test]
    fn reset_reads_at_most_a_full_ring_of_the_largest_size() {
        // A VMM that keeps the queue full: the reset reads 65536 records (a ring of
        // MAX_ENTRIES) and answers, whatever is still waiting.
        let max = iopf_abi::MAX_ENTRIES as usize;
        let mut device = device_with(FakeVmm {
            published: max + RESPONSE_BATCH,
            ..FakeVmm::default()
        });
        device.reset(0, &mut Vec::new());
        assert_eq!(read(&device), max as u64);
        assert!(device.has_handler(), "a reset keeps the handler");
    }

    #[test]
    fn unregister_counts_the_pages_of_the_partial_groups_it_discards() {
        let mut device = device_with(FakeVmm::default());
        report_partial_page(&mut device, 1);
        report_partial_page(&mut device, 2);
        let answered = device.unregister(AutoReason::Unregister, &mut Vec::new());
        assert_eq!(answered, 0, "no group was complete");
        assert_eq!(device.counters.partial_dropped, 2);
    }

    #[test]
    fn reset_counts_the_pages_of_the_partial_groups_it_discards() {
        let mut device = device_with(FakeVmm::default());
        report_partial_page(&mut device, 1);
        report_partial_page(&mut device, 2);
        report_partial_page(&mut device, 3);
        assert_eq!(device.reset(0, &mut Vec::new()), 0, "no group was complete");
        assert_eq!(device.counters.partial_dropped, 3);
    }

    #[test]
    fn fault_queue_fill_is_the_handlers() {
        let device = device_with(FakeVmm {
            fill: Some((3, 256)),
            ..FakeVmm::default()
        });
        assert_eq!(device.fault_queue_fill(), Some((3, 256)));
        let bare = DeviceState::new(DeviceId(8), DeviceConfig::default());
        assert_eq!(bare.fault_queue_fill(), None, "no handler, no fill");
    }

    #[test]
    fn fault_doorbell_is_taken_only_by_a_registered_handler() {
        let mut device = device_with(FakeVmm::default());
        assert!(device.set_fault_doorbell(None));
        device.unregister(AutoReason::Unregister, &mut Vec::new());
        assert!(!device.set_fault_doorbell(None));
    }

    #[test]
    fn unrecoverable_fault_on_a_broken_fault_queue_is_lost_and_the_handler_dropped() {
        let mut device = device_with(FakeVmm {
            broken_fault_queue: true,
            ..FakeVmm::default()
        });
        device.report(&unrecoverable_fault(), 0, &mut Vec::new());
        let c = &device.counters;
        assert_eq!(
            (c.unrecoverable, c.lost, c.unrecoverable_delivered),
            (1, 1, 0)
        );
        assert!(
            !device.has_handler(),
            "a broken queue unregisters its handler"
        );
        assert_eq!(c.unregistrations, 1);
    }

    #[test]
    fn unrecoverable_faults_are_counted_delivered_or_lost() {
        let mut bare = DeviceState::new(DeviceId(8), DeviceConfig::default());
        bare.report(&unrecoverable_fault(), 0, &mut Vec::new());
        bare.report(&unrecoverable_fault(), 0, &mut Vec::new());
        let c = &bare.counters;
        assert_eq!(
            (c.unrecoverable, c.lost, c.unrecoverable_delivered),
            (2, 2, 0)
        );

        let mut full = device_with(FakeVmm {
            no_room_for_unrecoverable: true,
            ..FakeVmm::default()
        });
        full.report(&unrecoverable_fault(), 0, &mut Vec::new());
        full.report(&unrecoverable_fault(), 0, &mut Vec::new());
        let c = &full.counters;
        assert_eq!(
            (c.unrecoverable, c.lost, c.unrecoverable_delivered),
            (2, 2, 0)
        );

        let mut device = device_with(FakeVmm::default());
        device.report(&unrecoverable_fault(), 0, &mut Vec::new());
        device.report(&unrecoverable_fault(), 0, &mut Vec::new());
        let c = &device.counters;
        assert_eq!(
            (c.unrecoverable, c.lost, c.unrecoverable_delivered),
            (2, 0, 2)
        );
    }

    #[test]
    fn unregister_answers_pending_groups_in_the_order_they_were_issued() {
        // 100 groups issued, the 98 in the middle answered, one more issued: the pending
        // table now keeps the oldest group apart from the two newest, and unregister still
        // answers the oldest first.
        let staged = Arc::new(Mutex::new(Vec::new()));
        let mut device = device_with(FakeVmm {
            staged: staged.clone(),
            ..FakeVmm::default()
        });
        for grpid in 0..100 {
            report_page(&mut device, grpid, u64::from(grpid), true);
        }
        let requests = staged.lock().unwrap().clone();
        assert_eq!(requests.len(), 100);
        let mut out = Vec::new();
        for request in &requests[1..99] {
            let answer = PageResponse::answering(request, ResponseCode::Success);
            device
                .respond(&ResponseRecord::from(&answer), 0, &mut out)
                .unwrap();
        }
        report_page(&mut device, 100, 100, true);
        let c = &device.counters;
        assert_eq!(
            (c.page_requests, c.groups, c.groups_delivered),
            (101, 101, 101)
        );
        out.clear();
        assert_eq!(device.unregister(AutoReason::Unregister, &mut out), 3);
        let order: Vec<u32> = out.iter().map(|r| r.grpid.get().into()).collect();
        assert_eq!(order, [0, 99, 100]);
    }

    #[test]
    fn a_group_of_exactly_the_page_limit_is_delivered_whole() {
        let staged = Arc::new(Mutex::new(Vec::new()));
        let config = DeviceConfig {
            max_group_pages: 2,
            ..DeviceConfig::default()
        };
        let mut device = DeviceState::new(DeviceId(7), config);
        device
            .register(Box::new(FakeVmm {
                staged: staged.clone(),
                ..FakeVmm::default()
            }))
            .unwrap();
        report_page(&mut device, 5, 1, false);
        report_page(&mut device, 5, 2, true);
        let pages: Vec<u64> = staged
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.addr.get())
            .collect();
        assert_eq!(pages, [0x1000, 0x2000]);
        assert_eq!(device.counters.partial_dropped, 0);
    }

    #[test]
    fn guest_answers_are_counted_by_code() {
        let staged = Arc::new(Mutex::new(Vec::new()));
        let config = DeviceConfig {
            allow_failure: true,
            ..DeviceConfig::default()
        };
        let mut device = DeviceState::new(DeviceId(7), config);
        device
            .register(Box::new(FakeVmm {
                staged: staged.clone(),
                ..FakeVmm::default()
            }))
            .unwrap();
        for grpid in 0..6 {
            report_page(&mut device, grpid, u64::from(grpid), true);
        }
        let requests = staged.lock().unwrap().clone();
        let codes = [
            ResponseCode::Success,
            ResponseCode::Invalid,
            ResponseCode::Invalid,
            ResponseCode::Failure,
            ResponseCode::Failure,
            ResponseCode::Failure,
        ];
        let mut out = Vec::new();
        for (request, code) in requests.iter().zip(codes) {
            let answer = PageResponse::answering(request, code);
            device
                .respond(&ResponseRecord::from(&answer), 0, &mut out)
                .unwrap();
        }
        let got: Vec<ResponseCode> = out.iter().map(|r| r.code).collect();
        assert_eq!(got, codes);
        let g = &device.counters.responses.guest;
        assert_eq!((g.success, g.invalid, g.failure), (1, 2, 3));
        assert_eq!(device.counters.answered(), 6);
    }

    #[test]
    fn prepare_to_sleep_and_woke_go_to_the_handler() {
        let woke = Arc::new(Mutex::new(0));
        let mut device = device_with(FakeVmm {
            woke: woke.clone(),
            ..FakeVmm::default()
        });
        assert!(
            device.prepare_to_sleep(&mut Vec::new()),
            "queue empty: sleep"
        );
        device.woke();
        assert_eq!(*woke.lock().unwrap(), 1, "the request is withdrawn");

        let mut busy = device_with(FakeVmm {
            responses_waiting: true,
            ..FakeVmm::default()
        });
        assert!(
            !busy.prepare_to_sleep(&mut Vec::new()),
            "responses waiting: no sleep"
        );

        let mut bare = DeviceState::new(DeviceId(8), DeviceConfig::default());
        assert!(
            !bare.prepare_to_sleep(&mut Vec::new()),
            "no handler to wait for"
        );
    }

    /// How many more warnings the device may log at `now` (of its ten a second).
    fn warnings_left(device: &mut DeviceState, now: Nanos) -> usize {
        (0..20).filter(|_| device.log.allow(now)).count()
    }

    #[test]
    fn an_expiry_sweep_spends_a_warning_only_when_it_times_groups_out() {
        // The warnings are rate-limited per device: the periodic sweep must not use up the
        // budget that refusals of a hostile VMM's responses need, when it has nothing to say.
        let second: Nanos = 1_000_000_000;
        let mut idle = device_with(FakeVmm::default());
        for _ in 0..20 {
            assert_eq!(idle.expire(second, &mut Vec::new()), 0);
        }
        assert_eq!(
            warnings_left(&mut idle, second),
            10,
            "idle sweeps log nothing"
        );

        let mut device = device_with(FakeVmm::default());
        report_page(&mut device, 1, 1, true);
        let now = 11 * second;
        let mut out = Vec::new();
        assert_eq!(device.expire(now, &mut out), 1, "the 10 s timeout passed");
        assert!(matches!(
            out[0].source,
            ResponseSource::Auto(AutoReason::Timeout)
        ));
        assert_eq!(warnings_left(&mut device, now), 9, "the timeout was logged");
    }
}
