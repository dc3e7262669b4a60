//! The response queue: the VMM publishes page responses, the host drains them.

use std::os::fd::OwnedFd;
use std::time::Duration;

use iopf_abi::{HOST_FLAG_LIVE, PageResponse, QueueGeometry, QueueKind, ResponseRecord, VMM_ABI};

use crate::doorbell::Doorbell;
use crate::endpoint::{QueueError, Receiver, Sender};
use crate::memory::QueueMemory;
use crate::region::{QueueRegion, RegionAttachError};
use crate::ring::{Published, PushError, RingConsumer, RingError, RingProducer};
use crate::sync::Ordering;

/// The VMM's end of a response queue.
#[derive(Debug)]
pub struct ResponseQueueProducer<M: QueueMemory = QueueRegion> {
    sender: Sender<ResponseRecord, M>,
}

impl ResponseQueueProducer<QueueRegion> {
    /// Attaches to a response queue region from its fd alone (see [`QueueRegion::attach`]),
    /// resuming after the last record an earlier producer marked, and announces ABI v2 (`abi` = 2 in the VMM
    /// page). `doorbell` is the host's (rung when the host sleeps).
    pub fn attach(fd: OwnedFd, doorbell: Option<Doorbell>) -> Result<Self, RegionAttachError> {
        let region = QueueRegion::attach(fd, QueueKind::Response)?;
        let ring = RingProducer::resume(region)?;
        Ok(Self::from_sender(Sender::new(ring, doorbell)))
    }
}

impl<M: QueueMemory> ResponseQueueProducer<M> {
    /// The VMM end over fresh response queue memory, announcing ABI v2.
    pub fn new(memory: M, doorbell: Option<Doorbell>) -> Self {
        Self::from_sender(Sender::new(RingProducer::new(memory), doorbell))
    }

    fn from_sender(sender: Sender<ResponseRecord, M>) -> Self {
        // The host takes a VMM as attached only once both regions say `abi` = 2.
        sender
            .ring
            .memory()
            .vmm_page()
            .abi
            .store(VMM_ABI, Ordering::Release);
        Self { sender }
    }

    /// The region's memory.
    pub fn memory(&self) -> &M {
        self.sender.ring.memory()
    }

    /// Stages one response.
    pub fn stage(&mut self, response: &PageResponse) -> Result<(), PushError> {
        self.sender.ring.stage(&ResponseRecord::from(response))
    }

    /// Stages one raw record, as is (for tools and tests that must send what a decoder would
    /// refuse).
    pub fn stage_record(&mut self, record: &ResponseRecord) -> Result<(), PushError> {
        self.sender.ring.stage(record)
    }

    /// Stages as many of `responses` as fit; returns how many.
    pub fn stage_some(&mut self, responses: &[PageResponse]) -> Result<usize, RingError> {
        self.stage_records_some(responses.iter().map(ResponseRecord::from))
    }

    /// Stages as many raw records as fit, in order, as is; returns how many.
    pub fn stage_records_some(
        &mut self,
        records: impl IntoIterator<Item = ResponseRecord>,
    ) -> Result<usize, RingError> {
        let mut staged = 0;
        for record in records {
            match self.stage_record(&record) {
                Ok(()) => staged += 1,
                Err(PushError::Full) => break,
                Err(PushError::Broken(e)) => return Err(e),
            }
        }
        Ok(staged)
    }

    /// Publishes every staged response (stores their marks) with at most one doorbell ring.
    pub fn publish(&mut self) -> Result<Published, QueueError> {
        self.sender.publish()
    }

    /// Doorbell rings so far.
    pub fn kicks(&self) -> u64 {
        self.sender.kicks()
    }

    /// The ring's error, if the host broke it.
    pub fn broken(&self) -> Option<RingError> {
        self.sender.broken()
    }

    /// Responses published and not read by the host yet, and the ring's entries; `None` when
    /// the host's index is out of range. For watching only (see [`RingProducer::fill`]).
    pub fn fill(&self) -> Option<(u32, u32)> {
        let ring = &self.sender.ring;
        ring.fill().map(|used| (used, ring.nb_entries()))
    }
}

impl<M: QueueMemory> Drop for ResponseQueueProducer<M> {
    fn drop(&mut self) {
        // Tell the host no producer is attached any more.
        self.memory().vmm_page().abi.store(0, Ordering::Release);
    }
}

/// The host's end of a response queue. Every record it yields is untrusted: decode it, then let
/// the fault core decide whether its cookie names a pending group.
#[derive(Debug)]
pub struct ResponseQueueConsumer<M = QueueRegion> {
    receiver: Receiver<ResponseRecord, M>,
    rejected: u64,
}

impl ResponseQueueConsumer<QueueRegion> {
    /// Creates a response queue region of `nb_entries` entries; `doorbell` is the one this end
    /// sleeps on (the VMM rings it).
    pub fn create(nb_entries: u32, doorbell: Doorbell) -> Result<Self, RegionAttachError> {
        let geometry = QueueGeometry::new(QueueKind::Response, nb_entries)?;
        Ok(Self::new(QueueRegion::create(geometry)?, doorbell))
    }
}

impl<M: QueueMemory> ResponseQueueConsumer<M> {
    /// The host end over fresh response queue memory.
    pub fn new(memory: M, doorbell: Doorbell) -> Self {
        Self {
            receiver: Receiver::new(RingConsumer::new(memory), doorbell),
            rejected: 0,
        }
    }

    /// The region's memory.
    pub fn memory(&self) -> &M {
        self.receiver.ring.memory()
    }

    /// Whether a VMM that speaks ABI v2 has attached this region (its page's `abi` is 1).
    /// Untrusted, read afresh at each call: the host delivers no page request unless this and
    /// the fault queue's [`consumer_attached`](crate::FaultQueueProducer::consumer_attached)
    /// both hold.
    pub fn producer_attached(&self) -> bool {
        self.memory().vmm_page().abi.load(Ordering::Acquire) == VMM_ABI
    }

    /// Sets or clears `LIVE` in the host page.
    pub fn set_live(&mut self, live: bool) {
        self.receiver
            .ring
            .set_flags(if live { HOST_FLAG_LIVE } else { 0 });
    }

    /// Reads up to `max` raw records, in order, and returns their slots. Each record is copied
    /// out of shared memory once, so the VMM cannot change it between check and use.
    pub fn drain(&mut self, max: usize, f: impl FnMut(ResponseRecord)) -> Result<usize, RingError> {
        self.receiver.drain(max, f)
    }

    /// Waits for responses (spinning a while, then sleeping on the doorbell). Returns how many
    /// are ready; 0 on timeout.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<u32, QueueError> {
        self.receiver.wait(timeout)
    }

    /// Sets how many times [`wait`](Self::wait) polls before it sleeps.
    pub fn set_spin(&mut self, spin: u32) {
        self.receiver.set_spin(spin);
    }

    /// Sets `NEED_WAKEUP` for an event loop about to sleep on [`doorbell`](Self::doorbell);
    /// `false` if responses arrived meanwhile (see [`Receiver::prepare_to_sleep`]).
    pub fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
        self.receiver.prepare_to_sleep()
    }

    /// Clears `NEED_WAKEUP` after a sleep.
    pub fn woke(&mut self) {
        self.receiver.woke();
    }

    /// The doorbell this end sleeps on (to add to an epoll set).
    pub fn doorbell(&self) -> &Doorbell {
        self.receiver.doorbell()
    }

    /// Counts `n` refused responses and shows the total in the host page's `rejected`.
    pub fn count_rejected(&mut self, n: u64) {
        self.rejected = self.rejected.saturating_add(n);
        let host = self.memory().host_page();
        host.rejected.store(self.rejected, Ordering::Relaxed);
    }

    /// Responses refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// The ring's error, if the VMM broke it.
    pub fn broken(&self) -> Option<RingError> {
        self.receiver.broken()
    }
}

#[cfg(test)]
mod tests {
    use iopf_abi::{Cookie, PrgIndex, ResponseCode};

    use super::*;
    use crate::entry::Entry;

    /// A host's response queue of 4 entries, sleeping on `bell`, and the VMM's end attached to
    /// it from its fd alone with the host's doorbell.
    fn pair() -> (ResponseQueueConsumer, ResponseQueueProducer) {
        let bell = Doorbell::new().unwrap();
        let host = ResponseQueueConsumer::create(4, bell.try_clone().unwrap()).unwrap();
        let vmm = ResponseQueueProducer::attach(
            host.memory().fd().try_clone_to_owned().unwrap(),
            Some(bell),
        )
        .unwrap();
        (host, vmm)
    }

    fn response(cookie: u32) -> PageResponse {
        PageResponse {
            cookie: Cookie::new(cookie).unwrap(),
            pasid: None,
            grpid: PrgIndex::new(1).unwrap(),
            code: ResponseCode::Success,
        }
    }

    fn drain_cookies(host: &mut ResponseQueueConsumer) -> Vec<u32> {
        let mut cookies = Vec::new();
        host.drain(usize::MAX, |r| cookies.push(r.cookie.get()))
            .unwrap();
        cookies
    }

    #[test]
    fn the_host_sees_a_vmm_attach_to_its_response_queue_and_go_away() {
        let bell = Doorbell::new().unwrap();
        let host = ResponseQueueConsumer::create(4, bell).unwrap();
        assert!(!host.producer_attached());
        let vmm =
            ResponseQueueProducer::attach(host.memory().fd().try_clone_to_owned().unwrap(), None)
                .unwrap();
        assert!(host.producer_attached());
        drop(vmm);
        assert!(!host.producer_attached());
    }

    #[test]
    fn stage_some_takes_the_responses_that_fit_and_says_how_many() {
        let (mut host, mut vmm) = pair();
        let responses: Vec<_> = (1..=6).map(response).collect();
        assert_eq!(vmm.stage_some(&responses[..3]), Ok(3));
        assert_eq!(vmm.stage_some(&responses[3..]), Ok(1), "one slot left");
        assert_eq!(vmm.publish().unwrap().records, 4);
        assert_eq!(drain_cookies(&mut host), vec![1, 2, 3, 4]);
        let records = [5, 6].map(|n| ResponseRecord::from(&response(n)));
        assert_eq!(vmm.stage_records_some(records), Ok(2));
        vmm.publish().unwrap();
        assert_eq!(drain_cookies(&mut host), vec![5, 6]);
    }

    #[test]
    fn fill_counts_the_responses_the_host_has_not_read() {
        let (mut host, mut vmm) = pair();
        assert_eq!(vmm.fill(), Some((0, 4)));
        assert_eq!(
            vmm.stage_some(&[response(1), response(2), response(3)]),
            Ok(3)
        );
        assert_eq!(vmm.fill(), Some((0, 4)), "staged, not published");
        vmm.publish().unwrap();
        assert_eq!(vmm.fill(), Some((3, 4)));
        assert_eq!(host.drain(2, |_| ()), Ok(2));
        assert_eq!(vmm.fill(), Some((1, 4)));
        // An index the host could not have stored: nothing to count.
        host.memory().host_page().index.store(9, Ordering::Release);
        assert_eq!(vmm.fill(), None);
    }

    #[test]
    fn a_sleeping_host_is_rung_once_and_an_awake_one_not_at_all() {
        let (mut host, mut vmm) = pair();
        assert_eq!(vmm.kicks(), 0);
        assert_eq!(host.prepare_to_sleep(), Ok(true), "nothing to read");
        vmm.stage(&response(1)).unwrap();
        assert!(vmm.publish().unwrap().kick);
        assert_eq!(vmm.kicks(), 1);
        assert_eq!(host.doorbell().drain().unwrap(), 1);
        host.woke();
        vmm.stage(&response(2)).unwrap();
        assert!(!vmm.publish().unwrap().kick);
        assert_eq!(vmm.kicks(), 1);
        assert_eq!(host.prepare_to_sleep(), Ok(false), "responses are ready");
        assert!(!vmm.publish().unwrap().kick);
    }

    #[test]
    fn a_host_waiting_for_responses_is_told_how_many_are_ready() {
        let (mut host, mut vmm) = pair();
        host.set_spin(0);
        assert_eq!(host.wait(Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(vmm.stage_some(&[response(1), response(2)]), Ok(2));
        vmm.publish().unwrap();
        assert_eq!(host.wait(Some(Duration::ZERO)).unwrap(), 2);
    }

    #[test]
    fn refused_responses_are_counted_where_the_vmm_can_see_them() {
        let (mut host, vmm) = pair();
        host.count_rejected(2);
        host.count_rejected(1);
        assert_eq!(host.rejected(), 3);
        assert_eq!(vmm.memory().host_page().rejected.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_forged_mark_breaks_the_ring_and_the_host_says_why() {
        let (mut host, vmm) = pair();
        assert_eq!(host.broken(), None);
        // The VMM scribbles on the mark (last word) of the first slot.
        vmm.memory().entry_words()[ResponseRecord::WORDS - 1].store(0xdead, Ordering::Release);
        let error = host.drain(16, |_| ()).unwrap_err();
        assert!(
            matches!(error, RingError::Mark { index: 0, .. }),
            "{error:?}"
        );
        assert_eq!(host.broken(), Some(error));
    }

    #[test]
    fn the_vmm_sees_the_host_go_live_and_not_live() {
        let (mut host, vmm) = pair();
        let live = || vmm.memory().host_page().flags.load(Ordering::Acquire) & HOST_FLAG_LIVE != 0;
        assert!(!live());
        host.set_live(true);
        assert!(live());
        host.set_live(false);
        assert!(!live());
    }

    #[test]
    fn a_host_index_past_the_published_responses_breaks_the_ring_and_the_producer_says_why() {
        let (host, mut vmm) = pair();
        assert_eq!(vmm.stage_some(&[1, 2, 3, 4].map(response)), Ok(4));
        vmm.publish().unwrap();
        assert_eq!(vmm.broken(), None);
        host.memory().host_page().index.store(9, Ordering::Release);
        let error = match vmm.stage(&response(5)) {
            Err(PushError::Broken(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(
            matches!(error, RingError::ConsumerIndex { found: 9, .. }),
            "{error:?}"
        );
        assert_eq!(vmm.broken(), Some(error));
    }
}
