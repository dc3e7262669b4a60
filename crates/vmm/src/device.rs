//! One device as the VMM serves it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use iopf_abi::{Fault, PageRequest, Pasid, ResponseRecord};
use iopf_queue::{FaultQueueConsumer, ProtocolError, QueueError, ResponseQueueProducer};
use iopf_sim::guest::Guest;
use iopf_sim::memory::GuestMemory;
use iopf_sim::nested::GuestTables;
use thiserror::Error;

/// What went wrong on the VMM side.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VmmError {
    /// The host broke a queue's protocol.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// The host broke a ring's indices.
    #[error("ring: {0}")]
    Ring(#[from] ProtocolError),
}

/// What the VMM counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmmStats {
    /// Page requests read.
    pub requests: u64,
    /// Groups read (each answered by the guest, unless it stays silent).
    pub groups: u64,
    /// Unrecoverable faults read.
    pub unrecoverable: u64,
    /// Records the host wrote that do not decode (must stay 0).
    pub malformed: u64,
    /// Responses written.
    pub responses: u64,
}

/// A device's queues, guest memory, page tables and guest.
#[derive(Debug)]
pub struct VmmDevice {
    device: u32,
    faults: FaultQueueConsumer,
    responses: ResponseQueueProducer,
    memory: GuestMemory,
    tables: GuestTables,
    guest: Guest,
    started: Instant,
    partial: Vec<PageRequest>,
    /// Answers waiting for their time (the guest's latency).
    due: BinaryHeap<Reverse<(Instant, u64, [u8; 32])>>,
    seq: u64,
    stats: VmmStats,
}

impl VmmDevice {
    /// Serves `device` with attached queues, guest memory (already registered with the host)
    /// and page tables in it; creates the address spaces of requests without PASID and of
    /// PASIDs `0..pasids`.
    pub fn new(
        device: u32,
        faults: FaultQueueConsumer,
        responses: ResponseQueueProducer,
        mut memory: GuestMemory,
        tables: GuestTables,
        guest: Guest,
        pasids: u32,
    ) -> Self {
        let _ = tables.add_space(&mut memory, None);
        for p in 0..pasids {
            let _ = tables.add_space(&mut memory, Pasid::new(p).ok());
        }
        Self {
            device,
            faults,
            responses,
            memory,
            tables,
            guest,
            started: Instant::now(),
            partial: Vec::new(),
            due: BinaryHeap::new(),
            seq: 0,
            stats: VmmStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> VmmStats {
        self.stats
    }

    /// The guest's counters.
    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    /// The host's number for the device.
    pub fn device_id(&self) -> u32 {
        self.device
    }

    /// Guest memory (to register it with the host again after a new attach).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The guest's page tables.
    pub fn tables(&self) -> GuestTables {
        self.tables
    }

    /// Takes the queues of a new handler life. Answers still due go to the new response queue:
    /// the host refuses those that answer groups of the earlier life.
    pub fn replace_queues(&mut self, faults: FaultQueueConsumer, responses: ResponseQueueProducer) {
        self.faults = faults;
        self.responses = responses;
        self.partial.clear();
    }

    /// Whether the host says a handler is registered.
    pub fn live(&self) -> bool {
        self.faults.live()
    }

    /// Reads every fault ready, hands whole groups to the guest, and sends the answers that are
    /// due. Returns the fault records read.
    pub fn poll(&mut self) -> Result<usize, VmmError> {
        let mut faults = Vec::new();
        let read = self.faults.drain_faults(usize::MAX, |f| faults.push(f))?;
        let now_ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for fault in faults {
            match fault {
                Ok(Fault::PageRequest(request)) => {
                    self.stats.requests += 1;
                    self.partial.push(request);
                    if request.last {
                        self.stats.groups += 1;
                        let group = std::mem::take(&mut self.partial);
                        for answer in self.guest.on_group(
                            self.device,
                            &group,
                            0,
                            &mut self.tables,
                            &mut self.memory,
                            now_ns,
                        ) {
                            let at = self.started + Duration::from_nanos(answer.at);
                            self.seq += 1;
                            let bytes: [u8; 32] = zerocopy::transmute!(answer.record);
                            self.due.push(Reverse((at, self.seq, bytes)));
                        }
                    }
                }
                Ok(Fault::Unrecoverable(_)) => self.stats.unrecoverable += 1,
                Err(_) => self.stats.malformed += 1,
            }
        }
        self.send_due()?;
        Ok(read)
    }

    fn send_due(&mut self) -> Result<(), VmmError> {
        let now = Instant::now();
        let mut staged = false;
        while let Some(Reverse((at, _, bytes))) = self.due.peek().copied() {
            if at > now {
                break;
            }
            let record: ResponseRecord = zerocopy::transmute!(bytes);
            if self.responses.stage_record(&record).is_err() {
                // Ring full: publish what is staged and try again on the next poll.
                break;
            }
            self.due.pop();
            self.stats.responses += 1;
            staged = true;
        }
        if staged {
            self.responses.publish()?;
        }
        Ok(())
    }

    /// Sleeps until faults arrive, an answer falls due, or `timeout` passes.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), VmmError> {
        let until_due = self
            .due
            .peek()
            .map(|Reverse((at, _, _))| at.saturating_duration_since(Instant::now()));
        let timeout = until_due.map_or(timeout, |d| d.min(timeout));
        if !timeout.is_zero() {
            self.faults.wait(Some(timeout))?;
        }
        Ok(())
    }
}
