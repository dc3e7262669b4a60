//! The fault queue: the host publishes fault records, the VMM drains them.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use iopf_abi::{
    DecodeError, Fault, FaultRecord, HOST_FLAG_LIVE, PageRequest, QueueGeometry, QueueKind,
    UnrecoverableFault, VMM_ABI,
};

use crate::doorbell::Doorbell;
use crate::endpoint::{QueueError, Receiver, Sender};
use crate::memory::QueueMemory;
use crate::region::{QueueRegion, RegionAttachError};
use crate::ring::{Published, PushError, RingConsumer, RingError, RingProducer};
use crate::sync::Ordering;

/// What became of an unrecoverable fault offered to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// In the ring; visible at the next publish.
    Queued,
    /// The ring was full: dropped and counted in `lost`.
    Lost,
}

/// The host's end of a fault queue.
///
/// Page request groups go in whole or not at all; a group that does not fit is reported
/// [`PushError::Full`] so that the fault core answers it (`Invalid`) at once: a page request is
/// never dropped silently. Unrecoverable faults that do not fit are dropped and counted in the
/// host page's `lost`.
#[derive(Debug)]
pub struct FaultQueueProducer<M = QueueRegion> {
    sender: Sender<FaultRecord, M>,
    flags: u32,
    lost: u64,
}

impl FaultQueueProducer<QueueRegion> {
    /// Creates a fault queue region of `nb_entries` entries (a power of two in 2..=65536).
    pub fn create(nb_entries: u32) -> Result<Self, RegionAttachError> {
        let geometry = QueueGeometry::new(QueueKind::Fault, nb_entries)?;
        Ok(Self::new(QueueRegion::create(geometry)?))
    }
}

impl<M: QueueMemory> FaultQueueProducer<M> {
    /// The host end over fresh fault queue memory.
    pub fn new(memory: M) -> Self {
        Self {
            sender: Sender::new(RingProducer::new(memory), None),
            flags: 0,
            lost: 0,
        }
    }

    /// The region's memory (for its fd, or for inspection).
    pub fn memory(&self) -> &M {
        self.sender.ring.memory()
    }

    /// Sets the doorbell to ring when the VMM sleeps (the fault IRQ's eventfd).
    pub fn set_doorbell(&mut self, doorbell: Option<Doorbell>) {
        self.sender.set_doorbell(doorbell);
    }

    /// Sets or clears `LIVE` (a fault handler is registered) in the host page.
    pub fn set_live(&mut self, live: bool) {
        self.flags = if live { HOST_FLAG_LIVE } else { 0 };
        let host = self.memory().host_page();
        host.flags.store(self.flags, Ordering::Release);
    }

    /// Records published and not consumed yet, and the ring's entries; `None` when the VMM's
    /// index is out of range. For watching only (see [`RingProducer::fill`]).
    pub fn fill(&self) -> Option<(u32, u32)> {
        let ring = &self.sender.ring;
        ring.fill().map(|used| (used, ring.nb_entries()))
    }

    /// Whether a VMM that speaks ABI v2 has attached (its page's `abi` is 2). Untrusted: it
    /// only decides whether publishing is worth trying.
    pub fn consumer_attached(&self) -> bool {
        self.memory().vmm_page().abi.load(Ordering::Acquire) == VMM_ABI
    }

    /// Stages a whole page request group (its `LAST_PAGE` request last), or none of it.
    pub fn stage_group(&mut self, group: &[PageRequest]) -> Result<(), PushError> {
        self.sender
            .ring
            .stage_exact(group.iter().map(FaultRecord::from))
    }

    /// Stages an unrecoverable fault, or drops and counts it if the ring is full.
    pub fn stage_unrecoverable(&mut self, fault: &UnrecoverableFault) -> Result<Staged, RingError> {
        match self.sender.ring.stage(&FaultRecord::from(fault)) {
            Ok(()) => Ok(Staged::Queued),
            Err(PushError::Full) => {
                self.count_lost(1);
                Ok(Staged::Lost)
            }
            Err(PushError::Broken(e)) => Err(e),
        }
    }

    /// Counts `n` records dropped and shows the total in the host page's `lost`.
    pub fn count_lost(&mut self, n: u64) {
        self.lost = self.lost.saturating_add(n);
        let host = self.memory().host_page();
        host.lost.store(self.lost, Ordering::Relaxed);
    }

    /// Publishes every staged record (stores their marks) with at most one doorbell ring.
    pub fn publish(&mut self) -> Result<Published, QueueError> {
        self.sender.publish()
    }

    /// Rings the VMM's doorbell unconditionally (after `LIVE` changes, say).
    pub fn kick(&mut self) -> Result<(), QueueError> {
        self.sender.kick()
    }

    /// Publishes like [`publish`](Self::publish) but returns the VMM's doorbell, if it sleeps,
    /// instead of ringing it: the VMM owns that eventfd and can make a ring block (see
    /// [`Doorbell::ring`]), so a caller holding locks rings it after releasing them.
    pub fn publish_deferred(&mut self) -> Result<Option<Arc<Doorbell>>, RingError> {
        self.sender.publish_deferred()
    }

    /// The VMM's doorbell, to ring later whether or not the VMM sleeps (after `LIVE` changes).
    pub fn kick_deferred(&mut self) -> Option<Arc<Doorbell>> {
        self.sender.kick_deferred()
    }

    /// Records dropped because the ring was full.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Doorbell rings so far.
    pub fn kicks(&self) -> u64 {
        self.sender.kicks()
    }

    /// The ring's error, if the VMM broke it.
    pub fn broken(&self) -> Option<RingError> {
        self.sender.broken()
    }
}

/// The VMM's end of a fault queue.
#[derive(Debug)]
pub struct FaultQueueConsumer<M: QueueMemory = QueueRegion> {
    receiver: Receiver<FaultRecord, M>,
}

impl FaultQueueConsumer<QueueRegion> {
    /// Attaches to a fault queue region from its fd alone (see [`QueueRegion::attach`]),
    /// resuming where a previous consumer left off, and announces ABI v2 in the VMM page.
    /// `doorbell` is the eventfd the host rings (the fault IRQ).
    pub fn attach(fd: OwnedFd, doorbell: Doorbell) -> Result<Self, RegionAttachError> {
        let region = QueueRegion::attach(fd, QueueKind::Fault)?;
        let cons = region.vmm_page().index.load(Ordering::Relaxed);
        let ring = RingConsumer::with_index(region, cons);
        Ok(Self::from_ring(ring, doorbell))
    }
}

impl<M: QueueMemory> FaultQueueConsumer<M> {
    /// The VMM end over fresh fault queue memory, announcing ABI v2.
    pub fn new(memory: M, doorbell: Doorbell) -> Self {
        Self::from_ring(RingConsumer::new(memory), doorbell)
    }

    fn from_ring(ring: RingConsumer<FaultRecord, M>, doorbell: Doorbell) -> Self {
        ring.memory()
            .vmm_page()
            .abi
            .store(VMM_ABI, Ordering::Release);
        Self {
            receiver: Receiver::new(ring, doorbell),
        }
    }

    /// The region's memory.
    pub fn memory(&self) -> &M {
        self.receiver.ring.memory()
    }

    /// Reads up to `max` raw records, in order, and returns their slots.
    pub fn drain(&mut self, max: usize, f: impl FnMut(FaultRecord)) -> Result<usize, RingError> {
        self.receiver.drain(max, f)
    }

    /// Reads up to `max` records and decodes each one (a record the host wrote wrongly is
    /// handed over as its decode error, never skipped silently).
    pub fn drain_faults(
        &mut self,
        max: usize,
        mut f: impl FnMut(Result<Fault, DecodeError>),
    ) -> Result<usize, RingError> {
        self.receiver.drain(max, |record| f(record.decode()))
    }

    /// Waits for faults (spinning a while, then sleeping on the doorbell). Returns how many
    /// are ready; 0 on timeout.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<u32, QueueError> {
        self.receiver.wait(timeout)
    }

    /// Sets how many times [`wait`](Self::wait) polls before it sleeps.
    pub fn set_spin(&mut self, spin: u32) {
        self.receiver.set_spin(spin);
    }

    /// Sets `NEED_WAKEUP` for an event loop about to sleep on [`doorbell`](Self::doorbell);
    /// `false` if faults arrived meanwhile (the flag is cleared again; see
    /// [`Receiver::prepare_to_sleep`]).
    pub fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
        self.receiver.prepare_to_sleep()
    }

    /// Clears `NEED_WAKEUP` after a sleep.
    pub fn woke(&mut self) {
        self.receiver.woke();
    }

    /// The doorbell this end sleeps on (the fault IRQ's eventfd; to add to an epoll set).
    pub fn doorbell(&self) -> &Doorbell {
        self.receiver.doorbell()
    }

    /// Times the consumer slept on its doorbell.
    pub fn sleeps(&self) -> u64 {
        self.receiver.sleeps()
    }

    /// The host's count of faults dropped because the ring was full.
    pub fn lost(&self) -> u64 {
        self.memory().host_page().lost.load(Ordering::Relaxed)
    }

    /// Whether the host says a fault handler is registered.
    pub fn live(&self) -> bool {
        self.memory().host_page().flags.load(Ordering::Acquire) & HOST_FLAG_LIVE != 0
    }

    /// The ring's error, if the host broke it.
    pub fn broken(&self) -> Option<RingError> {
        self.receiver.broken()
    }
}

impl<M: QueueMemory> Drop for FaultQueueConsumer<M> {
    fn drop(&mut self) {
        // Tell the host no consumer is attached any more.
        self.memory().vmm_page().abi.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use iopf_abi::{FaultReason, Perm};

    use super::*;
    use crate::entry::Entry;
    use crate::test_support::page_request;

    /// A host's fault queue of 8 entries with the VMM's doorbell, and the VMM's end attached
    /// to it from its fd alone.
    fn pair() -> (FaultQueueProducer, FaultQueueConsumer) {
        let mut host = FaultQueueProducer::create(8).unwrap();
        let bell = Doorbell::new().unwrap();
        host.set_doorbell(Some(bell.try_clone().unwrap()));
        let vmm =
            FaultQueueConsumer::attach(host.memory().fd().try_clone_to_owned().unwrap(), bell)
                .unwrap();
        (host, vmm)
    }

    #[test]
    fn a_fault_queue_consumer_sees_the_host_go_live_and_not_live() {
        let (mut host, vmm) = pair();
        assert!(!vmm.live(), "no handler registered yet");
        host.set_live(true);
        assert!(vmm.live());
        host.set_live(false);
        assert!(!vmm.live());
    }

    #[test]
    fn a_kick_rings_the_vmms_doorbell_even_when_it_is_awake() {
        let (mut host, vmm) = pair();
        host.kick().unwrap();
        assert_eq!(host.kicks(), 1);
        assert_eq!(vmm.doorbell().drain().unwrap(), 1);
    }

    #[test]
    fn a_deferred_publish_makes_the_faults_visible_and_hands_back_a_sleeping_vmms_doorbell() {
        let (mut host, mut vmm) = pair();
        assert!(vmm.prepare_to_sleep().unwrap());
        host.stage_group(&[page_request(1)]).unwrap();
        let bell = host.publish_deferred().unwrap().expect("the VMM sleeps");
        assert_eq!(vmm.doorbell().drain().unwrap(), 0, "deferred: not rung yet");
        bell.ring().unwrap();
        assert_eq!(vmm.doorbell().drain().unwrap(), 1);
        vmm.woke();
        let mut cookies = Vec::new();
        assert_eq!(vmm.drain(16, |r| cookies.push(r.cookie.get())), Ok(1));
        assert_eq!(cookies, vec![1]);
    }

    #[test]
    fn a_deferred_kick_hands_back_the_vmms_doorbell_whether_or_not_it_sleeps() {
        let (mut host, vmm) = pair();
        let bell = host.kick_deferred().expect("a doorbell is set");
        assert_eq!(host.kicks(), 1);
        bell.ring().unwrap();
        assert_eq!(vmm.doorbell().drain().unwrap(), 1);
        host.set_doorbell(None);
        assert!(host.kick_deferred().is_none(), "no doorbell to ring");
    }

    #[test]
    fn once_the_vmm_woke_the_host_no_longer_asks_to_ring_it() {
        let (mut host, mut vmm) = pair();
        assert!(vmm.prepare_to_sleep().unwrap());
        vmm.woke();
        host.stage_group(&[page_request(1)]).unwrap();
        assert!(!host.publish().unwrap().kick);
        assert_eq!(host.kicks(), 0);
    }

    #[test]
    fn drain_hands_over_every_published_fault_in_order_and_counts_them() {
        let (mut host, mut vmm) = pair();
        for cookie in 1..=3 {
            host.stage_group(&[page_request(cookie)]).unwrap();
        }
        host.publish().unwrap();
        let mut cookies = Vec::new();
        assert_eq!(vmm.drain(16, |r| cookies.push(r.cookie.get())), Ok(3));
        assert_eq!(cookies, vec![1, 2, 3]);
        assert_eq!(vmm.drain(16, |_| ()), Ok(0));
    }

    #[test]
    fn the_host_sees_a_vmm_attach_to_its_fault_queue_and_go_away() {
        let host = FaultQueueProducer::create(8).unwrap();
        assert!(!host.consumer_attached());
        let vmm = FaultQueueConsumer::attach(
            host.memory().fd().try_clone_to_owned().unwrap(),
            Doorbell::new().unwrap(),
        )
        .unwrap();
        assert!(host.consumer_attached());
        drop(vmm);
        assert!(!host.consumer_attached());
    }

    #[test]
    fn fill_counts_the_faults_the_vmm_has_not_read() {
        let (mut host, mut vmm) = pair();
        assert_eq!(host.fill(), Some((0, 8)));
        for cookie in 1..=3 {
            host.stage_group(&[page_request(cookie)]).unwrap();
        }
        assert_eq!(host.fill(), Some((0, 8)), "staged, not published");
        host.publish().unwrap();
        assert_eq!(host.fill(), Some((3, 8)));
        assert_eq!(vmm.drain(2, |_| ()), Ok(2));
        assert_eq!(host.fill(), Some((1, 8)));
        // An index the VMM could not have stored: nothing to count.
        vmm.memory().vmm_page().index.store(20, Ordering::Release);
        assert_eq!(host.fill(), None);
    }

    #[test]
    fn faults_dropped_for_a_full_ring_are_counted_on_both_sides() {
        let (mut host, vmm) = pair();
        let fault = UnrecoverableFault {
            reason: FaultReason::PteFetch,
            pasid: None,
            perm: Perm::READ,
            addr: Some(0x1000),
            fetch_addr: None,
        };
        for _ in 0..8 {
            assert_eq!(host.stage_unrecoverable(&fault), Ok(Staged::Queued));
        }
        assert_eq!((host.lost(), vmm.lost()), (0, 0));
        assert_eq!(host.stage_unrecoverable(&fault), Ok(Staged::Lost));
        assert_eq!((host.lost(), vmm.lost()), (1, 1));
        host.count_lost(2);
        assert_eq!((host.lost(), vmm.lost()), (3, 3));
    }

    #[test]
    fn each_time_the_vmm_sleeps_is_counted() {
        let (_host, mut vmm) = pair();
        vmm.set_spin(0);
        assert_eq!(vmm.sleeps(), 0);
        assert_eq!(vmm.wait(Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(vmm.sleeps(), 1);
        assert_eq!(vmm.wait(Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(vmm.sleeps(), 2);
    }

    #[test]
    fn a_vmm_index_past_the_published_faults_breaks_the_ring_and_the_host_says_why() {
        let (mut host, vmm) = pair();
        for cookie in 1..=8 {
            host.stage_group(&[page_request(cookie)]).unwrap();
        }
        host.publish().unwrap();
        assert_eq!(host.broken(), None);
        vmm.memory().vmm_page().index.store(20, Ordering::Release);
        let error = match host.stage_group(&[page_request(9)]) {
            Err(PushError::Broken(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(
            matches!(error, RingError::ConsumerIndex { found: 20, .. }),
            "{error:?}"
        );
        assert_eq!(host.broken(), Some(error));
    }

    #[test]
    fn a_forged_mark_breaks_the_ring_and_the_consumer_says_why() {
        let (host, mut vmm) = pair();
        assert_eq!(vmm.broken(), None);
        // The host scribbles on the mark (last word) of the first slot.
        let words = FaultRecord::WORDS;
        host.memory().entry_words()[words - 1].store(0xdead, Ordering::Release);
        let error = vmm.drain(16, |_| ()).unwrap_err();
        assert!(
            matches!(error, RingError::Mark { index: 0, .. }),
            "{error:?}"
        );
        assert_eq!(vmm.broken(), Some(error));
    }
}
