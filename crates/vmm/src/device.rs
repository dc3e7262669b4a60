//! One device as the VMM serves it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use iopf_abi::{Fault, PageRequest, Pasid, ResponseRecord};
use iopf_models::guest::Guest;
use iopf_models::memory::GuestMemory;
use iopf_models::nested::GuestTables;
use iopf_queue::{ChannelError, ChannelFault, FaultChannel, SharedMemoryChannel};
use thiserror::Error;

/// What went wrong on the VMM side.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VmmError {
    /// The fault channel failed (the host broke a queue, or the kernel's file failed).
    #[error("fault channel: {0}")]
    Channel(#[from] ChannelError),
    /// An address space could not be created in the guest's page tables (its PASID does not
    /// fit the PASID directory, or guest memory has no page left for its table).
    #[error("cannot create the address space of {}", match .pasid { Some(p) => format!("PASID {}", p.get()), None => "requests without PASID".to_owned() })]
    AddressSpace {
        /// The PASID (`None`: requests without PASID).
        pasid: Option<Pasid>,
        /// Why the tables refused it.
        #[source]
        source: iopf_models::iommu::MapError,
    },
    /// A PASID to serve is beyond the 20-bit PASID space.
    #[error("PASID {0} is beyond the 20-bit PASID space")]
    PasidOutOfRange(u32),
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

/// A device's fault channel, guest memory, page tables and guest.
///
/// The channel is any [`FaultChannel`]: the shared-memory queues of an iopf host (the
/// default) or the kernel's iommufd fault queue; the fault handling here is the same.
#[derive(Debug)]
pub struct VmmDevice<C: FaultChannel = SharedMemoryChannel> {
    device: u32,
    channel: C,
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

impl<C: FaultChannel> VmmDevice<C> {
    /// Serves `device` with its fault channel, guest memory (already registered with the
    /// host) and page tables in it; creates the address spaces of requests without PASID and
    /// of PASIDs `0..pasids`.
    ///
    /// # Errors
    ///
    /// [`VmmError::AddressSpace`] when an address space does not fit the tables' PASID
    /// directory (PASID `p` takes slot `p + 1`) or guest memory has no page for its table.
    pub fn new(
        device: u32,
        channel: C,
        mut memory: GuestMemory,
        tables: GuestTables,
        guest: Guest,
        pasids: u32,
    ) -> Result<Self, VmmError> {
        tables
            .add_space(&mut memory, None)
            .map_err(|source| VmmError::AddressSpace {
                pasid: None,
                source,
            })?;
        for p in 0..pasids {
            let pasid = Pasid::new(p).map_err(|_| VmmError::PasidOutOfRange(p))?;
            tables
                .add_space(&mut memory, Some(pasid))
                .map_err(|source| VmmError::AddressSpace {
                    pasid: Some(pasid),
                    source,
                })?;
        }
        Ok(Self {
            device,
            channel,
            memory,
            tables,
            guest,
            started: Instant::now(),
            partial: Vec::new(),
            due: BinaryHeap::new(),
            seq: 0,
            stats: VmmStats::default(),
        })
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

    /// Takes the channel of a new handler life. Answers still due go to the new channel: the
    /// host refuses those that answer groups of the earlier life.
    pub fn replace_channel(&mut self, channel: C) {
        self.channel = channel;
        self.partial.clear();
    }

    /// The fault channel.
    pub fn channel(&self) -> &C {
        &self.channel
    }

    /// Whether the other side says faults may still come.
    pub fn live(&self) -> bool {
        self.channel.live()
    }

    /// Reads every fault ready, hands whole groups to the guest, and sends the answers that are
    /// due. Returns the fault records read.
    pub fn poll(&mut self) -> Result<usize, VmmError> {
        let mut faults = Vec::new();
        let read = self
            .channel
            .read(usize::MAX, &mut |f: ChannelFault| faults.push(f))?;
        let now_ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for ChannelFault { device, fault } in faults {
            match fault {
                Ok(Fault::PageRequest(request)) => {
                    self.stats.requests += 1;
                    self.partial.push(request);
                    if request.last {
                        self.stats.groups += 1;
                        let group = std::mem::take(&mut self.partial);
                        for answer in self.guest.on_group(
                            device,
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
        let mut due = Vec::new();
        while let Some(Reverse(entry)) = self.due.peek().copied() {
            if entry.0 > now {
                break;
            }
            due.push(entry);
            self.due.pop();
        }
        if due.is_empty() {
            return Ok(());
        }
        let records: Vec<ResponseRecord> = due
            .iter()
            .map(|(_, _, bytes)| zerocopy::transmute!(*bytes))
            .collect();
        let taken = self.channel.respond(&records)?;
        self.stats.responses += taken as u64;
        // What did not fit goes back as it was, for the next poll.
        for entry in &due[taken..] {
            self.due.push(Reverse(*entry));
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
            self.channel.wait(Some(timeout))?;
        }
        Ok(())
    }
}
