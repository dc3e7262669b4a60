//! The VMM's side of a fault channel, whatever carries it.
//!
//! A VMM receives faults and sends page responses. Two backends carry them: the shared-memory
//! queues of this crate ([`SharedMemoryChannel`], from an iopf host over vfio-user), and the
//! Linux kernel's iommufd fault queue (crate `iopf-iommufd`). Both implement [`FaultChannel`],
//! so a VMM's fault handling code is written once and runs unchanged on either.
//!
//! Faults are handed over as ABI v2 values ([`Fault`]), whatever the wire format; responses go
//! back as ABI v2 records ([`ResponseRecord`]), exactly as the guest wrote them, so that a
//! backend, not the VMM, decides what a malformed answer means.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use iopf_abi::{DecodeError, Fault, ResponseRecord};
use thiserror::Error;

use crate::doorbell::Doorbell;
use crate::endpoint::QueueError;
use crate::fault_queue::FaultQueueConsumer;
use crate::region::RegionAttachError;
use crate::response_queue::ResponseQueueProducer;
use crate::ring::RingError;

/// Why a fault channel stopped working.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer broke a shared-memory queue.
    #[error("shared-memory queue failed")]
    Queue(#[from] QueueError),
    /// The peer broke a ring's indices.
    #[error("ring broken by the peer")]
    Ring(#[from] RingError),
    /// The backend's file failed (a kernel fault queue's `read`, `write` or `poll`).
    #[error("{what} failed")]
    Io {
        /// The operation that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// One fault as a channel delivers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelFault {
    /// The device that faulted, as the backend numbers it (the iopf host's device number, or
    /// the iommufd device object id).
    pub device: u32,
    /// The fault, or why its record does not decode (never skipped silently).
    pub fault: Result<Fault, DecodeError>,
}

/// Where a VMM gets faults and sends page responses.
pub trait FaultChannel {
    /// Reads up to `max` faults in the order the backend produced them and hands each to `f`.
    /// Page requests of one group arrive together, the one with `last` set at the end.
    /// Returns how many were read.
    fn read(&mut self, max: usize, f: &mut dyn FnMut(ChannelFault)) -> Result<usize, ChannelError>;

    /// Sends responses, in order, and returns how many the channel took; the rest did not fit
    /// and should be sent again later. A response the backend refuses (stale, forged,
    /// malformed) counts as taken and shows in [`refused`](Self::refused).
    fn respond(&mut self, responses: &[ResponseRecord]) -> Result<usize, ChannelError>;

    /// Sleeps until faults may be ready or `timeout` passes (`None`: no limit). Returns
    /// whether faults are ready; a spurious `false` is allowed.
    fn wait(&mut self, timeout: Option<Duration>) -> Result<bool, ChannelError>;

    /// Whether the other side says faults may still come (a handler is registered, the kernel
    /// queue is open).
    fn live(&self) -> bool;

    /// The fd that becomes readable when faults may be ready, for an event loop's `epoll` or
    /// `poll` set: the fault doorbell's eventfd, or the kernel fault queue's file.
    ///
    /// Sleep on it only after [`prepare_to_sleep`](Self::prepare_to_sleep) returned `true`,
    /// and call [`woke`](Self::woke) after the sleep; otherwise a wake-up can be lost.
    fn poll_fd(&self) -> BorrowedFd<'_>;

    /// Asks the other side for a wake-up before sleeping on [`poll_fd`](Self::poll_fd).
    /// Returns `true` if nothing is ready and the wake-up is requested (`NEED_WAKEUP` set):
    /// it is safe to sleep. Returns `false` if faults are ready (the request is withdrawn
    /// again): read them instead of sleeping.
    ///
    /// A level-triggered backend (the kernel's fault file) always returns `true`: its fd is
    /// readable for as long as faults are queued.
    fn prepare_to_sleep(&mut self) -> Result<bool, ChannelError>;

    /// After a sleep on [`poll_fd`](Self::poll_fd), whether or not it fired: withdraws the
    /// wake-up request and drains the doorbell's counter, without blocking.
    fn woke(&mut self) -> Result<(), ChannelError>;

    /// Responses the channel refused, as counted on this side.
    fn refused(&self) -> u64;
}

/// The shared-memory queues of one device of an iopf host: a [`FaultQueueConsumer`] and a
/// [`ResponseQueueProducer`].
#[derive(Debug)]
pub struct SharedMemoryChannel {
    device: u32,
    faults: FaultQueueConsumer,
    responses: ResponseQueueProducer,
}

impl SharedMemoryChannel {
    /// The channel of device `device` over its attached queues.
    pub fn new(device: u32, faults: FaultQueueConsumer, responses: ResponseQueueProducer) -> Self {
        Self {
            device,
            faults,
            responses,
        }
    }

    /// The channel of device `device` from the fds a VMM received its own way: the fault and
    /// response queue regions (memfds, checked and mapped as [`FaultQueueConsumer::attach`]
    /// and [`ResponseQueueProducer::attach`] do), the eventfd the host rings when faults
    /// arrive (the fault IRQ's), and the host's response doorbell, if it has one.
    ///
    /// Give the host the fault doorbell (`VFIO_USER_DEVICE_SET_IRQS`) before calling this, so
    /// that a fault published from the moment the VMM attaches wakes it.
    pub fn from_fds(
        device: u32,
        fault_region: OwnedFd,
        response_region: OwnedFd,
        fault_doorbell: Doorbell,
        response_doorbell: Option<Doorbell>,
    ) -> Result<Self, RegionAttachError> {
        let faults = FaultQueueConsumer::attach(fault_region, fault_doorbell)?;
        let responses = ResponseQueueProducer::attach(response_region, response_doorbell)?;
        Ok(Self::new(device, faults, responses))
    }

    /// The device's number, as the host gave it.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// The fault queue.
    pub fn faults(&self) -> &FaultQueueConsumer {
        &self.faults
    }

    /// The response queue.
    pub fn responses(&self) -> &ResponseQueueProducer {
        &self.responses
    }
}

impl FaultChannel for SharedMemoryChannel {
    fn read(&mut self, max: usize, f: &mut dyn FnMut(ChannelFault)) -> Result<usize, ChannelError> {
        let device = self.device;
        Ok(self
            .faults
            .drain_faults(max, |fault| f(ChannelFault { device, fault }))?)
    }

    fn respond(&mut self, responses: &[ResponseRecord]) -> Result<usize, ChannelError> {
        let taken = self
            .responses
            .stage_records_some(responses.iter().copied())?;
        if taken > 0 {
            self.responses.publish()?;
        }
        Ok(taken)
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<bool, ChannelError> {
        Ok(self.faults.wait(timeout)? > 0)
    }

    fn live(&self) -> bool {
        self.faults.live()
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.faults.doorbell().as_fd()
    }

    fn prepare_to_sleep(&mut self) -> Result<bool, ChannelError> {
        Ok(self.faults.prepare_to_sleep()?)
    }

    fn woke(&mut self) -> Result<(), ChannelError> {
        self.faults.woke();
        // `Doorbell::drain` never blocks, whatever the peer did to the fd's O_NONBLOCK.
        self.faults
            .doorbell()
            .drain()
            .map_err(|source| ChannelError::Io {
                what: "drain of the fault doorbell",
                source,
            })?;
        Ok(())
    }

    fn refused(&self) -> u64 {
        // The host refuses on its side and counts there; nothing is refused here.
        0
    }
}

#[cfg(test)]
mod tests {

    use rustix::event::{PollFd, PollFlags, Timespec};

    use super::*;
    use crate::fault_queue::FaultQueueProducer;
    use crate::response_queue::ResponseQueueConsumer;
    use crate::test_support::page_request;

    fn pair() -> (FaultQueueProducer, SharedMemoryChannel) {
        let (faults, _responses, channel) = host_and_channel();
        (faults, channel)
    }

    /// The host's ends of both queues, and the VMM's channel over them.
    fn host_and_channel() -> (
        FaultQueueProducer,
        ResponseQueueConsumer,
        SharedMemoryChannel,
    ) {
        let mut faults = FaultQueueProducer::create(8).unwrap();
        let bell = Doorbell::new().unwrap();
        faults.set_doorbell(Some(bell.try_clone().unwrap()));
        faults.set_live(true);
        let responses = ResponseQueueConsumer::create(8, Doorbell::new().unwrap()).unwrap();
        let channel = SharedMemoryChannel::from_fds(
            5,
            faults.memory().fd().try_clone_to_owned().unwrap(),
            responses.memory().fd().try_clone_to_owned().unwrap(),
            bell,
            None,
        )
        .unwrap();
        (faults, responses, channel)
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        rustix::event::poll(&mut fds, Some(&Timespec::default())).unwrap() > 0
    }

    #[test]
    fn a_fault_published_after_prepare_to_sleep_makes_the_poll_fd_readable() {
        let (mut host, mut channel) = pair();
        assert_eq!(channel.device(), 5);
        assert!(channel.prepare_to_sleep().unwrap());
        assert!(!readable(channel.poll_fd()));
        host.stage_group(&[page_request(1)]).unwrap();
        assert!(host.publish().unwrap().kick);
        assert!(readable(channel.poll_fd()));
        channel.woke().unwrap();
        // The counter is drained without blocking, and a second drain of 0 does not block.
        assert!(!readable(channel.poll_fd()));
        channel.woke().unwrap();
        // Faults are ready: no sleep, and no kick asked for.
        assert!(!channel.prepare_to_sleep().unwrap());
        assert_eq!(channel.read(16, &mut |_| {}).unwrap(), 1);
    }

    #[test]
    fn without_prepare_to_sleep_the_host_does_not_ring() {
        let (mut host, channel) = pair();
        host.stage_group(&[page_request(1)]).unwrap();
        assert!(!host.publish().unwrap().kick);
        assert!(!readable(channel.poll_fd()));
    }

    #[test]
    fn read_hands_over_every_ready_fault_and_counts_them() {
        let (mut host, mut channel) = pair();
        host.stage_group(&[page_request(1)]).unwrap();
        host.stage_group(&[page_request(1)]).unwrap();
        host.publish().unwrap();
        let mut devices = Vec::new();
        assert_eq!(
            channel.read(16, &mut |f| devices.push(f.device)).unwrap(),
            2
        );
        assert_eq!(devices, vec![5, 5]);
        assert_eq!(channel.read(16, &mut |_| {}).unwrap(), 0);
    }

    #[test]
    fn respond_publishes_what_fits_and_says_how_many() {
        let (_host, mut responses, mut channel) = host_and_channel();
        let records: Vec<_> = (1..=10u32)
            .map(|n| ResponseRecord {
                cookie: n.into(),
                ..Default::default()
            })
            .collect();
        // The response ring holds 8: the first 8 are taken and visible to the host at once.
        assert_eq!(channel.respond(&records).unwrap(), 8);
        let mut cookies = Vec::new();
        responses
            .drain(usize::MAX, |r| cookies.push(r.cookie.get()))
            .unwrap();
        assert_eq!(cookies, (1..=8).collect::<Vec<_>>());
        assert_eq!(channel.respond(&records[8..]).unwrap(), 2);
        cookies.clear();
        responses
            .drain(usize::MAX, |r| cookies.push(r.cookie.get()))
            .unwrap();
        assert_eq!(cookies, vec![9, 10]);
        // Nothing is refused on the VMM's side.
        assert_eq!(channel.refused(), 0);
    }

    #[test]
    fn wait_says_whether_faults_are_ready() {
        let (mut host, mut channel) = pair();
        assert!(!channel.wait(Some(Duration::from_millis(5))).unwrap());
        host.stage_group(&[page_request(1)]).unwrap();
        host.publish().unwrap();
        assert!(channel.wait(Some(Duration::from_millis(5))).unwrap());
    }

    #[test]
    fn live_follows_the_host() {
        let (mut host, channel) = pair();
        assert!(channel.live());
        host.set_live(false);
        assert!(!channel.live());
    }

    #[test]
    fn a_deferred_publish_hands_back_the_doorbell_of_a_sleeping_vmm() {
        let (mut host, mut channel) = pair();
        host.stage_group(&[page_request(1)]).unwrap();
        assert!(
            host.publish_deferred().unwrap().is_none(),
            "the VMM is awake"
        );
        assert_eq!(channel.read(16, &mut |_| {}).unwrap(), 1);
        assert!(channel.prepare_to_sleep().unwrap());
        host.stage_group(&[page_request(1)]).unwrap();
        let bell = host.publish_deferred().unwrap().expect("the VMM sleeps");
        assert_eq!(host.kicks(), 1);
        assert!(!readable(channel.poll_fd()), "deferred: not rung yet");
        bell.ring().unwrap();
        assert!(readable(channel.poll_fd()));
        channel.woke().unwrap();
        // A deferred kick hands the doorbell back whether or not the VMM sleeps.
        assert!(host.kick_deferred().is_some());
        assert_eq!(host.kicks(), 2);
    }

    #[test]
    fn a_kick_rings_an_awake_vmm_and_is_counted() {
        let (mut host, channel) = pair();
        host.kick().unwrap();
        assert_eq!(host.kicks(), 1);
        assert!(readable(channel.poll_fd()));
    }
}
