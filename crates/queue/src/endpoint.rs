//! A ring end with its doorbell: the part of every queue that is the same whichever way records
//! flow. [`Sender`] publishes and kicks; [`Receiver`] drains and sleeps.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::doorbell::Doorbell;
use crate::entry::Entry;
use crate::memory::QueueMemory;
use crate::ring::{Published, RingConsumer, RingError, RingProducer};

/// Why a queue operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The peer broke the ring protocol; the queue is unusable.
    #[error("queue broken by its peer")]
    Broken(#[from] RingError),
    /// The doorbell's eventfd failed.
    #[error("doorbell eventfd failed")]
    Doorbell(#[source] io::Error),
}

/// Default number of polls of the ring before a consumer goes to sleep on its doorbell. An
/// eventfd wake-up costs tens of microseconds; a few microseconds of polling first saves it
/// whenever records keep coming.
pub const DEFAULT_SPIN: u32 = 2000;

/// The producing end of a queue and the doorbell of its consumer.
#[derive(Debug)]
pub struct Sender<E, M> {
    pub(crate) ring: RingProducer<E, M>,
    doorbell: Option<Arc<Doorbell>>,
    kicks: u64,
}

impl<E: Entry, M: QueueMemory> Sender<E, M> {
    pub(crate) fn new(ring: RingProducer<E, M>, doorbell: Option<Doorbell>) -> Self {
        Self {
            ring,
            doorbell: doorbell.map(Arc::new),
            kicks: 0,
        }
    }

    /// Replaces the consumer's doorbell (`None`: publish without kicking).
    pub fn set_doorbell(&mut self, doorbell: Option<Doorbell>) {
        self.doorbell = doorbell.map(Arc::new);
    }

    /// Publishes every staged record (stores their marks) and returns the consumer's doorbell
    /// if it is asleep, for the caller to ring later (after releasing its locks: a peer that
    /// owns the eventfd can make a ring block, see [`Doorbell::ring`]).
    pub fn publish_deferred(&mut self) -> Result<Option<Arc<Doorbell>>, RingError> {
        let published = self.ring.publish()?;
        Ok(self.kick_deferred_if(published.kick))
    }

    /// The consumer's doorbell, for the caller to ring later whether or not it sleeps.
    pub fn kick_deferred(&mut self) -> Option<Arc<Doorbell>> {
        self.kick_deferred_if(true)
    }

    fn kick_deferred_if(&mut self, kick: bool) -> Option<Arc<Doorbell>> {
        let doorbell = self.doorbell.as_ref().filter(|_| kick)?;
        self.kicks += 1;
        Some(Arc::clone(doorbell))
    }

    /// Publishes every staged record (stores their marks), and rings the consumer's doorbell
    /// if it is asleep.
    pub fn publish(&mut self) -> Result<Published, QueueError> {
        let published = self.ring.publish()?;
        if let (true, Some(doorbell)) = (published.kick, &self.doorbell) {
            doorbell.ring().map_err(QueueError::Doorbell)?;
            self.kicks += 1;
        }
        Ok(published)
    }

    /// Rings the consumer's doorbell whether or not it sleeps (to make it look at something
    /// other than the ring, such as the host page's `LIVE` flag).
    pub fn kick(&mut self) -> Result<(), QueueError> {
        if let Some(doorbell) = &self.doorbell {
            doorbell.ring().map_err(QueueError::Doorbell)?;
            self.kicks += 1;
        }
        Ok(())
    }

    /// Doorbell rings so far.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// The ring's error, if the peer broke it.
    pub fn broken(&self) -> Option<RingError> {
        self.ring.broken()
    }
}

/// The consuming end of a queue and its own doorbell.
#[derive(Debug)]
pub struct Receiver<E, M> {
    pub(crate) ring: RingConsumer<E, M>,
    doorbell: Doorbell,
    spin: u32,
    sleeps: u64,
}

impl<E: Entry, M: QueueMemory> Receiver<E, M> {
    pub(crate) fn new(ring: RingConsumer<E, M>, doorbell: Doorbell) -> Self {
        Self {
            ring,
            doorbell,
            spin: DEFAULT_SPIN,
            sleeps: 0,
        }
    }

    /// Sets how many times [`wait`](Self::wait) polls the ring before sleeping.
    pub fn set_spin(&mut self, spin: u32) {
        self.spin = spin;
    }

    /// Reads up to `max` records, in order, handing each to `f`; returns their slots with one
    /// index store. Returns how many were read (0 if none are ready).
    pub fn drain(&mut self, max: usize, f: impl FnMut(E)) -> Result<usize, RingError> {
        self.ring.drain(max, f)
    }

    /// Records published and not yet drained.
    pub fn ready(&mut self) -> Result<u32, RingError> {
        self.ring.refresh()
    }

    /// Waits until records are ready or `timeout` passes (`None`: forever): polls the ring a
    /// while, then sets `NEED_WAKEUP` and sleeps on the doorbell. Returns the records ready
    /// (0 on timeout).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<u32, QueueError> {
        // A timeout too long for the clock to count (`Duration::MAX`, say) is no deadline.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            for _ in 0..=self.spin {
                if self.ring.poll()? {
                    return Ok(self.ring.refresh()?);
                }
                core::hint::spin_loop();
            }
            if !self.ring.prepare_to_sleep()? {
                continue;
            }
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            self.sleeps += 1;
            let slept = self.doorbell.wait(remaining);
            self.ring.woke();
            slept.map_err(QueueError::Doorbell)?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(self.ring.refresh()?);
            }
        }
    }

    /// For an event loop that sleeps on many doorbells at once (epoll): sets `NEED_WAKEUP`
    /// and returns `true` if the ring is still empty, so the caller may sleep on
    /// [`doorbell`](Self::doorbell); `false` if records arrived (the flag is cleared again).
    /// Call [`woke`](Self::woke) after sleeping.
    pub fn prepare_to_sleep(&mut self) -> Result<bool, RingError> {
        self.ring.prepare_to_sleep()
    }

    /// Clears `NEED_WAKEUP` after a sleep.
    pub fn woke(&mut self) {
        self.ring.woke();
    }

    /// Times this receiver went to sleep on its doorbell.
    pub fn sleeps(&self) -> u64 {
        self.sleeps
    }

    /// The doorbell this receiver sleeps on.
    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }

    /// The ring's error, if the peer broke it.
    pub fn broken(&self) -> Option<RingError> {
        self.ring.broken()
    }
}

// Two attributes rather than `all(test, not(loom))`: cargo-mutants recognises `#[cfg(test)]`
// and leaves the test helpers unmutated.
#[cfg(test)]
#[cfg(not(loom))]
mod tests {
    use std::sync::Arc;

    use iopf_abi::{QueueGeometry, QueueKind, ResponseRecord};

    use super::*;
    use crate::memory::HeapMemory;

    #[test]
    fn ready_counts_the_records_published_and_not_drained() {
        let memory = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Response, 4).unwrap(),
        ));
        let mut producer = RingProducer::<ResponseRecord, _>::new(memory.clone());
        let mut receiver = Receiver::new(
            RingConsumer::<ResponseRecord, _>::new(memory),
            Doorbell::new().unwrap(),
        );
        assert_eq!(receiver.ready(), Ok(0));
        producer.stage_all(&[ResponseRecord::default(); 3]).unwrap();
        assert_eq!(receiver.ready(), Ok(0), "staged, not published");
        producer.publish().unwrap();
        assert_eq!(receiver.ready(), Ok(3));
        assert_eq!(receiver.drain(2, |_| ()), Ok(2));
        assert_eq!(receiver.ready(), Ok(1));
    }

    type Memory = Arc<HeapMemory>;

    /// A sender and a receiver over one response ring of 4, the sender holding the receiver's
    /// doorbell.
    fn pair() -> (
        Sender<ResponseRecord, Memory>,
        Receiver<ResponseRecord, Memory>,
    ) {
        let memory = Arc::new(HeapMemory::new(
            QueueGeometry::new(QueueKind::Response, 4).unwrap(),
        ));
        let bell = Doorbell::new().unwrap();
        let sender = Sender::new(
            RingProducer::new(memory.clone()),
            Some(bell.try_clone().unwrap()),
        );
        (sender, Receiver::new(RingConsumer::new(memory), bell))
    }

    #[test]
    fn every_kick_is_counted_whether_rung_at_once_or_handed_back() {
        let (mut sender, receiver) = pair();
        sender.kick().unwrap();
        sender.kick().unwrap();
        assert_eq!(sender.kicks(), 2);
        assert!(receiver.doorbell().drain().unwrap() > 0);
        let bell = sender.kick_deferred().expect("a doorbell is set");
        assert!(sender.kick_deferred().is_some());
        assert_eq!(sender.kicks(), 4);
        bell.ring().unwrap();
        assert_eq!(receiver.doorbell().drain().unwrap(), 1);
        // A deferred publish to an awake receiver hands back nothing and counts no kick.
        sender.ring.stage(&ResponseRecord::default()).unwrap();
        assert!(sender.publish_deferred().unwrap().is_none());
        assert_eq!(sender.kicks(), 4);
    }

    #[test]
    fn a_wait_longer_than_the_clock_can_count_returns_the_ready_records() {
        let (mut sender, mut receiver) = pair();
        sender.ring.stage(&ResponseRecord::default()).unwrap();
        sender.publish().unwrap();
        assert_eq!(receiver.wait(Some(Duration::MAX)).unwrap(), 1);
    }

    #[test]
    fn a_receiver_that_woke_is_not_rung_for_the_next_publish() {
        let (mut sender, mut receiver) = pair();
        assert_eq!(receiver.prepare_to_sleep(), Ok(true));
        receiver.woke();
        sender.ring.stage(&ResponseRecord::default()).unwrap();
        assert!(!sender.publish().unwrap().kick);
        assert_eq!(sender.kicks(), 0);
        assert_eq!(receiver.doorbell().drain().unwrap(), 0);
    }
}
