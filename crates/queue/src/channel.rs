//! The VMM's side of a fault channel, whatever carries it.
//!
//! A VMM receives faults and sends page responses. Two backends carry them: the shared-memory
//! queues of this crate ([`SharedMemoryChannel`], from an iopf host over vfio-user), and the
//! Linux kernel's iommufd fault queue (crate `iopf-iommufd`). Both implement [`FaultChannel`],
//! so a VMM's fault handling code is written once and runs unchanged on either.
//!
//! Faults are handed over as ABI v1 values ([`Fault`]), whatever the wire format; responses go
//! back as ABI v1 records ([`ResponseRecord`]), exactly as the guest wrote them, so that a
//! backend, not the VMM, decides what a malformed answer means.

use std::io;
use std::time::Duration;

use iopf_abi::{DecodeError, Fault, ResponseRecord};
use thiserror::Error;

use crate::endpoint::QueueError;
use crate::fault_queue::FaultQueueConsumer;
use crate::response_queue::ResponseQueueProducer;
use crate::ring::ProtocolError;

/// Why a fault channel stopped working.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer broke a shared-memory queue.
    #[error("shared-memory queue failed")]
    Queue(#[from] QueueError),
    /// The peer broke a ring's indices.
    #[error("ring broken by the peer")]
    Ring(#[from] ProtocolError),
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

    fn refused(&self) -> u64 {
        // The host refuses on its side and counts there; nothing is refused here.
        0
    }
}
