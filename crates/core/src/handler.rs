//! Fault handlers: where the core sends a device's faults and finds its page responses.

use std::fmt;
use std::sync::Arc;

use iopf_abi::{PageRequest, ResponseRecord, UnrecoverableFault};
use iopf_queue::{
    Doorbell, FaultQueueProducer, PushError, QueueError, QueueMemory, QueueRegion,
    ResponseQueueConsumer, RingError, Staged,
};

/// Why a handler could not take a group: the ring's own [`PushError`], `Full` (no room for the
/// whole group now) or `Broken` (the consumer broke the queue; the handler is unusable).
pub type StageError = PushError;

/// A doorbell of the consumer's that the core rings once the device's lock is released.
///
/// The consumer owns that eventfd: it can clear the `O_NONBLOCK` the host set on it and
/// saturate its counter, and a write then blocks (`Doorbell::ring` avoids that but for a
/// window of a few instructions). Ringing outside the lock means such a consumer can stall at
/// most the thread that rings, never the device's lock, so unregister, reset and every other
/// core call on the device still complete.
pub type Wake = Arc<Doorbell>;

/// A registered fault handler's view of its transport.
///
/// The core calls it with the device's lock held, so it must not block on the consumer: a full
/// queue is `StageError::Full`, never a wait, and doorbells are handed back ([`Wake`]) for the
/// core to ring after releasing the lock.
pub trait FaultHandler: Send + fmt::Debug {
    /// Whether a consumer is attached and speaks ABI v2. Until then, page requests are
    /// answered `Invalid` at once and unrecoverable faults are dropped.
    fn consumer_attached(&self) -> bool;
    /// Stages a whole group (records in order, `LAST_PAGE` last), or none of it.
    fn stage_group(&mut self, group: &[PageRequest]) -> Result<(), StageError>;
    /// Stages an unrecoverable fault, or drops and counts it when there is no room.
    fn stage_unrecoverable(&mut self, fault: &UnrecoverableFault) -> Result<Staged, RingError>;
    /// Publishes what was staged; returns the consumer's doorbell if it sleeps, for the core
    /// to ring after releasing the device's lock.
    fn publish(&mut self) -> Result<Option<Wake>, QueueError>;
    /// Moves up to `max` response records out of the response queue into `out`.
    fn drain_responses(
        &mut self,
        max: usize,
        out: &mut Vec<ResponseRecord>,
    ) -> Result<usize, RingError>;
    /// Counts `n` refused responses where the consumer can see them.
    fn count_rejected(&mut self, n: u64);
    /// Tells the consumer whether the handler is registered (`LIVE`).
    fn set_live(&mut self, live: bool);
    /// The consumer's doorbell, to ring whether or not it sleeps (so that it sees `LIVE`
    /// change), after the device's lock is released.
    fn kick(&mut self) -> Option<Wake>;
    /// Asks the VMM to ring the response doorbell for its next response (`NEED_WAKEUP`).
    /// Returns `false` if responses are already waiting (the request is withdrawn).
    fn prepare_to_sleep(&mut self) -> Result<bool, RingError>;
    /// Withdraws the request of [`prepare_to_sleep`](Self::prepare_to_sleep).
    fn woke(&mut self);
    /// Sets the doorbell rung when faults are published and the consumer sleeps (the fault
    /// IRQ's eventfd, which the VMM may hand over after registration).
    fn set_fault_doorbell(&mut self, doorbell: Option<iopf_queue::Doorbell>);
    /// For watching: fault records published and not consumed yet, and the fault ring's
    /// entries; `None` when the transport cannot tell (the default).
    fn fault_queue_fill(&self) -> Option<(u32, u32)> {
        None
    }
}

/// The handler of a VMM-attached device: its fault queue and its response queue.
#[derive(Debug)]
pub struct QueueHandler<M: QueueMemory = QueueRegion> {
    /// The fault queue, host end.
    pub faults: FaultQueueProducer<M>,
    /// The response queue, host end.
    pub responses: ResponseQueueConsumer<M>,
}

impl<M: QueueMemory + Send + fmt::Debug> FaultHandler for QueueHandler<M> {
    fn consumer_attached(&self) -> bool {
        // Both regions: a VMM that announced ABI v2 in one and not the other is not attached.
        self.faults.consumer_attached() && self.responses.producer_attached()
    }

    fn stage_group(&mut self, group: &[PageRequest]) -> Result<(), StageError> {
        self.faults.stage_group(group)
    }

    fn stage_unrecoverable(&mut self, fault: &UnrecoverableFault) -> Result<Staged, RingError> {
        self.faults.stage_unrecoverable(fault)
    }

    fn publish(&mut self) -> Result<Option<Wake>, QueueError> {
        Ok(self.faults.publish_deferred()?)
    }

    fn drain_responses(
        &mut self,
        max: usize,
        out: &mut Vec<ResponseRecord>,
    ) -> Result<usize, RingError> {
        self.responses.drain(max, |record| out.push(record))
    }

    fn count_rejected(&mut self, n: u64) {
        self.responses.count_rejected(n);
    }

    fn set_live(&mut self, live: bool) {
        self.faults.set_live(live);
        self.responses.set_live(live);
    }

    fn kick(&mut self) -> Option<Wake> {
        self.faults.kick_deferred()
    }

    fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
        self.responses.prepare_to_sleep()
    }

    fn woke(&mut self) {
        self.responses.woke();
    }

    fn set_fault_doorbell(&mut self, doorbell: Option<iopf_queue::Doorbell>) {
        self.faults.set_doorbell(doorbell);
    }

    fn fault_queue_fill(&self) -> Option<(u32, u32)> {
        self.faults.fill()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport that says nothing about its fill: every method but the defaulted one.
    #[derive(Debug)]
    struct Opaque;

    impl FaultHandler for Opaque {
        fn consumer_attached(&self) -> bool {
            true
        }
        fn stage_group(&mut self, _group: &[PageRequest]) -> Result<(), StageError> {
            Ok(())
        }
        fn stage_unrecoverable(&mut self, _: &UnrecoverableFault) -> Result<Staged, RingError> {
            Ok(Staged::Queued)
        }
        fn publish(&mut self) -> Result<Option<Wake>, QueueError> {
            Ok(None)
        }
        fn drain_responses(
            &mut self,
            _max: usize,
            _out: &mut Vec<ResponseRecord>,
        ) -> Result<usize, RingError> {
            Ok(0)
        }
        fn count_rejected(&mut self, _n: u64) {}
        fn set_live(&mut self, _live: bool) {}
        fn kick(&mut self) -> Option<Wake> {
            None
        }
        fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
            Ok(true)
        }
        fn woke(&mut self) {}
        fn set_fault_doorbell(&mut self, _doorbell: Option<Doorbell>) {}
    }

    #[test]
    fn a_transport_that_cannot_tell_its_fill_reports_none() {
        assert_eq!(Opaque.fault_queue_fill(), None);
    }

    use iopf_abi::{
        Cookie, PageAddr, PageResponse, Perm, PrgIndex, QueueGeometry, QueueKind, ResponseCode,
    };
    use iopf_queue::{FaultQueueConsumer, HeapMemory, ResponseQueueProducer};

    type Heap = Arc<HeapMemory>;

    /// A queue handler over rings of 8 entries, and the VMM's ends of them (attached).
    fn queues() -> (
        QueueHandler<Heap>,
        FaultQueueConsumer<Heap>,
        ResponseQueueProducer<Heap>,
    ) {
        let faults = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Fault, 8).unwrap(),
        ));
        let responses = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Response, 8).unwrap(),
        ));
        let handler = QueueHandler {
            faults: FaultQueueProducer::new(faults.clone()),
            responses: ResponseQueueConsumer::new(responses.clone(), Doorbell::new().unwrap()),
        };
        let vmm_faults = FaultQueueConsumer::new(faults, Doorbell::new().unwrap());
        let vmm_responses = ResponseQueueProducer::new(responses, Some(Doorbell::new().unwrap()));
        (handler, vmm_faults, vmm_responses)
    }

    fn one_page_group(cookie: u32) -> PageRequest {
        PageRequest {
            cookie: Cookie::new(cookie).unwrap(),
            pasid: None,
            grpid: PrgIndex::new(1).unwrap(),
            perm: Perm::READ,
            addr: PageAddr::new(0x1000).unwrap(),
            last: true,
            private_data: None,
        }
    }

    #[test]
    fn queue_handler_fill_is_its_fault_rings() {
        let (mut handler, _vmm_faults, _vmm_responses) = queues();
        assert_eq!(handler.fault_queue_fill(), Some((0, 8)));
        for cookie in 1..=3 {
            handler.stage_group(&[one_page_group(cookie)]).unwrap();
        }
        handler.publish().unwrap();
        assert_eq!(handler.fault_queue_fill(), Some((3, 8)));
    }

    #[test]
    fn queue_handler_fault_doorbell_is_rung_for_a_sleeping_consumer_and_on_kick() {
        let (mut handler, mut vmm_faults, _vmm_responses) = queues();
        assert!(handler.kick().is_none(), "no doorbell yet");
        handler.set_fault_doorbell(Some(Doorbell::new().unwrap()));
        assert!(handler.kick().is_some(), "a kick rings the doorbell set");
        assert!(vmm_faults.prepare_to_sleep().unwrap(), "the VMM sleeps");
        handler.stage_group(&[one_page_group(1)]).unwrap();
        assert!(
            handler.publish().unwrap().is_some(),
            "the sleeping VMM's doorbell is handed back to ring"
        );
    }

    #[test]
    fn queue_handler_sleeps_only_on_an_empty_response_queue_and_withdraws_on_woke() {
        let (mut handler, _vmm_faults, mut vmm_responses) = queues();
        assert!(
            handler.prepare_to_sleep().unwrap(),
            "nothing waiting: sleep"
        );
        handler.woke();
        let answer = PageResponse::answering(&one_page_group(1), ResponseCode::Success);
        vmm_responses.stage(&answer).unwrap();
        assert!(
            !vmm_responses.publish().unwrap().kick,
            "the request to be woken was withdrawn: no ring"
        );
        assert!(
            !handler.prepare_to_sleep().unwrap(),
            "a response is waiting: no sleep"
        );
    }
}
