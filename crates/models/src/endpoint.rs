//! A PCIe endpoint with ATS and PRI, doing DMA.
//!
//! The rules it follows (`docs/DESIGN.md` §5):
//! - Outstanding Page Request Allocation: credits count requests, not groups; a group is issued
//!   only when all its requests fit, and its response returns every one of its credits;
//! - a PRG index is never reused before its group's response (9 bits, sequential or lowest
//!   free);
//! - a group is the pages one DMA access is missing, the last one flagged `LAST_PAGE`;
//! - `Success`: retry the translation, and request the page again if it is still missing (how
//!   many rounds before giving up is a policy, unbounded by default); `Invalid`: fail that
//!   access; `Failure`: set Response Failure and issue no page request until PRI is disabled
//!   and enabled again, ignoring every response meanwhile;
//! - a response for a PRG index with nothing outstanding (or with another PASID) sets
//!   "Unexpected PRG Index" and is otherwise ignored;
//! - without PRI (not capable, disabled, or halted) a failed translation aborts the DMA and the
//!   IOMMU reports an unrecoverable fault.

use std::collections::{BTreeMap, VecDeque};

use iopf_abi::{FaultReason, PageAddr, Pasid, Perm, PrgIndex, ResponseCode, UnrecoverableFault};
use serde::Serialize;

use crate::PAGE_SIZE;
use crate::iommu::{Translate, Translation};
use crate::memory::GuestMemory;
use crate::rng::pattern_word;

/// How the endpoint picks the next PRG index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrgiAlloc {
    /// Counts upwards modulo 512, skipping indices in flight.
    Sequential,
    /// The lowest index not in flight: reuses an index as soon as possible, which exposes
    /// stale-response bugs at once.
    LowestFree,
}

/// The endpoint's PRI configuration and policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConfig {
    /// PRI capable and enabled at start.
    pub pri: bool,
    /// Outstanding Page Request Allocation: requests it may have in flight.
    pub allocation: u32,
    /// Rounds of `Success` after which an access whose page is still missing fails
    /// (`None`: never give up, the default, since IOMMUs answer `Success` on overflow).
    pub retry_rounds: Option<u32>,
    /// PRG index allocation.
    pub prgi_alloc: PrgiAlloc,
    /// Requests it issues beyond its allocation (0 for a compliant device).
    pub credit_overrun: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            pri: true,
            allocation: 32,
            retry_rounds: None,
            prgi_alloc: PrgiAlloc::Sequential,
            credit_overrun: 0,
        }
    }
}

/// The PRI status bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PriStatus {
    /// Control.Enable.
    pub enabled: bool,
    /// Status.Response Failure (RW1C).
    pub response_failure: bool,
    /// Status.Unexpected PRG Index (RW1C).
    pub unexpected_prgi: bool,
    /// Status.Stopped: disabled with nothing outstanding.
    pub stopped: bool,
}

/// One DMA access: `len` bytes at `iova` (both 8-aligned) in the address space of `pasid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAccess {
    /// Unique per endpoint.
    pub id: u64,
    /// Address space.
    pub pasid: Option<Pasid>,
    /// Start address.
    pub iova: u64,
    /// Length in bytes.
    pub len: u32,
    /// Write (else read).
    pub write: bool,
    /// Seed of the data a write stores.
    pub data_seed: u64,
}

/// A page request as the endpoint sends it (the IOMMU gives it to the fault core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequestMessage {
    /// PASID prefix, if any.
    pub pasid: Option<Pasid>,
    /// PRG index.
    pub grpid: PrgIndex,
    /// Page asked for.
    pub addr: PageAddr,
    /// Access wanted.
    pub perm: Perm,
    /// Last request of the group.
    pub last: bool,
}

/// What a step of the endpoint sends upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// A page request (PRI).
    PageRequest(PageRequestMessage),
    /// An unrecoverable fault the IOMMU reports for an aborted DMA.
    Unrecoverable(UnrecoverableFault),
}

/// What the endpoint counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct EndpointCounters {
    /// Accesses handed to it.
    pub accesses: u64,
    /// Accesses completed (DMA done).
    pub completed: u64,
    /// Accesses failed by an `Invalid` response.
    pub failed_invalid: u64,
    /// Accesses failed for want of PRI (an unrecoverable fault was reported).
    pub failed_no_pri: u64,
    /// Accesses failed after the retry policy's rounds.
    pub failed_retries: u64,
    /// Accesses failed because their group can never fit the allocation.
    pub failed_too_large: u64,
    /// Accesses failed by a `Failure` response or by PRI being reset.
    pub failed_halted: u64,
    /// Accesses failed by the IOMMU's second stage (an address no region of guest memory
    /// holds, or a region without the permission): an unrecoverable fault was reported and
    /// nothing was read or written.
    pub failed_stage2: u64,
    /// Translation requests.
    pub translations: u64,
    /// Page requests sent.
    pub page_requests: u64,
    /// Groups sent.
    pub groups: u64,
    /// Responses that matched a group in flight.
    pub responses_matched: u64,
    /// Matched responses by code.
    pub success: u64,
    /// Matched `Invalid` responses.
    pub invalid: u64,
    /// Matched `Failure` responses.
    pub failure: u64,
    /// Responses for no group in flight (or another PASID): UPRGI.
    pub unexpected: u64,
    /// Responses ignored while Response Failure was set or PRI disabled.
    pub ignored: u64,
    /// Retries after `Success`.
    pub retries: u64,
    /// Bytes written by DMA.
    pub bytes_written: u64,
    /// Bytes read by DMA.
    pub bytes_read: u64,
    /// Steps that stalled for credits or PRG indices.
    pub stalls: u64,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    access: DmaAccess,
    rounds: u32,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    pasid: Option<Pasid>,
    requests: u32,
    waiting: Waiting,
}

/// The endpoint.
#[derive(Debug)]
pub struct Endpoint {
    id: u32,
    config: EndpointConfig,
    status: PriStatus,
    outstanding: u32,
    in_flight: BTreeMap<u16, InFlight>,
    next_prgi: u16,
    queue: VecDeque<Waiting>,
    counters: EndpointCounters,
}

const PRGI_COUNT: u16 = PrgIndex::MAX + 1;

impl Endpoint {
    /// An endpoint with requester id `id`.
    pub fn new(id: u32, config: EndpointConfig) -> Self {
        Self {
            id,
            config,
            status: PriStatus {
                enabled: config.pri,
                stopped: !config.pri,
                ..PriStatus::default()
            },
            outstanding: 0,
            in_flight: BTreeMap::new(),
            next_prgi: 0,
            queue: VecDeque::new(),
            counters: EndpointCounters::default(),
        }
    }

    /// Its requester id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// PRI status bits.
    pub fn status(&self) -> PriStatus {
        self.status
    }

    /// Counters.
    pub fn counters(&self) -> EndpointCounters {
        self.counters
    }

    /// Requests in flight (credits in use).
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// Groups in flight.
    pub fn groups_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Nothing queued, nothing in flight.
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty()
    }

    /// Lets the device issue `extra` requests beyond its allocation (misbehaviour).
    pub fn set_credit_overrun(&mut self, extra: u32) {
        self.config.credit_overrun = extra;
    }

    /// Queues a DMA access.
    pub fn submit(&mut self, access: DmaAccess) {
        self.counters.accesses += 1;
        self.queue.push_back(Waiting { access, rounds: 0 });
    }

    fn pri_active(&self) -> bool {
        self.config.pri && self.status.enabled && !self.status.response_failure
    }

    fn allocate_prgi(&mut self) -> Option<PrgIndex> {
        let start = match self.config.prgi_alloc {
            PrgiAlloc::Sequential => self.next_prgi,
            PrgiAlloc::LowestFree => 0,
        };
        let grpid = (0..PRGI_COUNT)
            .map(|i| (start + i) % PRGI_COUNT)
            .find(|p| !self.in_flight.contains_key(p))?;
        self.next_prgi = (grpid + 1) % PRGI_COUNT;
        PrgIndex::new(u32::from(grpid)).ok()
    }

    /// Runs queued accesses until one must wait (credits, PRG indices) or none are left.
    /// Translates through `iommu`, does the DMA in `memory`, and pushes what goes upstream.
    pub fn step(
        &mut self,
        iommu: &mut impl Translate,
        memory: &mut GuestMemory,
        out: &mut Vec<Upstream>,
    ) {
        self.step_some(iommu, memory, out, usize::MAX);
    }

    /// [`step`](Self::step), handling at most `budget` queued accesses (each one completed,
    /// failed, or sent upstream as a page request group). Returns `true` if it stopped for the
    /// budget with accesses still queued, so a caller that runs in real time can take page
    /// responses between slices of DMA work instead of after all of it.
    pub fn step_some(
        &mut self,
        iommu: &mut impl Translate,
        memory: &mut GuestMemory,
        out: &mut Vec<Upstream>,
        budget: usize,
    ) -> bool {
        let mut handled = 0;
        while let Some(waiting) = self.queue.front().copied() {
            if handled == budget {
                return true;
            }
            handled += 1;
            let access = waiting.access;
            let perm = if access.write {
                Perm::WRITE
            } else {
                Perm::READ
            };
            let space = (self.id, access.pasid);
            let first = access.iova / PAGE_SIZE;
            let last = (access.iova + u64::from(access.len).max(1) - 1) / PAGE_SIZE;
            let mut missing: Vec<(u64, Translation)> = Vec::new();
            let mut pages: Vec<u64> = Vec::new();
            for page in first..=last {
                self.counters.translations += 1;
                match iommu.translate(space, page * PAGE_SIZE, perm) {
                    Translation::Hit(gpa) => pages.push(gpa),
                    other => missing.push((page * PAGE_SIZE, other)),
                }
            }
            if missing.is_empty() {
                self.queue.pop_front();
                self.dma(&access, &pages, memory);
                self.counters.completed += 1;
                continue;
            }
            // The second stage refused a page: no page request can fix it; the DMA faults and
            // is aborted before any byte moves.
            if let Some(&(addr, translation)) = missing
                .iter()
                .find(|(_, t)| matches!(t, Translation::Stage2Fault(_)))
            {
                self.abort(&access, perm, addr, translation, out);
                self.counters.failed_stage2 += 1;
                continue;
            }
            let no_space = missing
                .iter()
                .any(|(_, t)| *t == Translation::NoAddressSpace);
            if !self.pri_active() || no_space {
                // The DMA goes untranslated through the IOMMU, faults, and is aborted.
                let (addr, translation) = missing[0];
                self.abort(&access, perm, addr, translation, out);
                self.counters.failed_no_pri += 1;
                continue;
            }
            let requests = missing.len() as u32;
            if requests > self.config.allocation {
                self.queue.pop_front();
                self.counters.failed_too_large += 1;
                continue;
            }
            if self.outstanding + requests > self.config.allocation + self.config.credit_overrun {
                self.counters.stalls += 1;
                return false;
            }
            let Some(grpid) = self.allocate_prgi() else {
                self.counters.stalls += 1;
                return false;
            };
            self.queue.pop_front();
            for (i, (addr, _)) in missing.iter().enumerate() {
                out.push(Upstream::PageRequest(PageRequestMessage {
                    pasid: access.pasid,
                    grpid,
                    addr: PageAddr::containing(*addr),
                    perm,
                    last: i + 1 == missing.len(),
                }));
            }
            self.in_flight.insert(
                grpid.get(),
                InFlight {
                    pasid: access.pasid,
                    requests,
                    waiting,
                },
            );
            self.outstanding += requests;
            self.counters.page_requests += u64::from(requests);
            self.counters.groups += 1;
        }
        false
    }

    /// Drops the access at the head of the queue: its DMA faulted at `addr` and no page request
    /// can fix it, so the IOMMU reports an unrecoverable fault. The caller counts why.
    fn abort(
        &mut self,
        access: &DmaAccess,
        perm: Perm,
        addr: u64,
        translation: Translation,
        out: &mut Vec<Upstream>,
    ) {
        self.queue.pop_front();
        out.push(Upstream::Unrecoverable(UnrecoverableFault {
            reason: translation.fault_reason().unwrap_or(FaultReason::Unknown),
            pasid: access.pasid,
            perm,
            addr: Some(addr),
            fetch_addr: None,
        }));
    }

    fn dma(&mut self, access: &DmaAccess, pages: &[u64], memory: &mut GuestMemory) {
        // Word by word, as before, but a page's run of words at once: one shadow lookup per
        // page instead of per word.
        let first_page = access.iova / PAGE_SIZE;
        let words = u64::from(access.len / 8);
        let mut values = [0u64; (PAGE_SIZE / 8) as usize];
        let mut word = 0;
        while word < words {
            let iova = access.iova + word * 8;
            let in_page = ((PAGE_SIZE - iova % PAGE_SIZE) / 8).min(words - word);
            let Some(gpa) = pages
                .get((iova / PAGE_SIZE - first_page) as usize)
                .map(|page| page + iova % PAGE_SIZE)
            else {
                word += in_page;
                continue;
            };
            let n = in_page as usize;
            let done = if access.write {
                for (i, v) in values[..n].iter_mut().enumerate() {
                    *v = pattern_word(access.data_seed, iova / 8 + i as u64);
                }
                memory.dma_write_run(gpa, &values[..n])
            } else {
                memory.dma_read_run(gpa, n)
            };
            if access.write {
                self.counters.bytes_written += 8 * done as u64;
            } else {
                self.counters.bytes_read += 8 * done as u64;
            }
            word += in_page;
        }
    }

    /// A PRG Response arrives.
    pub fn on_response(&mut self, pasid: Option<Pasid>, grpid: PrgIndex, code: ResponseCode) {
        if !self.status.enabled || self.status.response_failure {
            self.counters.ignored += 1;
            return;
        }
        let matches = self
            .in_flight
            .get(&grpid.get())
            .is_some_and(|group| group.pasid == pasid);
        let group = match self.in_flight.remove(&grpid.get()) {
            Some(group) if matches => group,
            other => {
                if let Some(group) = other {
                    self.in_flight.insert(grpid.get(), group);
                }
                self.status.unexpected_prgi = true;
                self.counters.unexpected += 1;
                return;
            }
        };
        self.outstanding -= group.requests;
        self.counters.responses_matched += 1;
        match code {
            ResponseCode::Success => {
                self.counters.success += 1;
                let mut waiting = group.waiting;
                waiting.rounds += 1;
                if self
                    .config
                    .retry_rounds
                    .is_some_and(|max| waiting.rounds > max)
                {
                    self.counters.failed_retries += 1;
                } else {
                    self.counters.retries += 1;
                    self.queue.push_back(waiting);
                }
            }
            ResponseCode::Invalid => {
                self.counters.invalid += 1;
                self.counters.failed_invalid += 1;
            }
            ResponseCode::Failure => {
                self.counters.failure += 1;
                self.counters.failed_halted += 1;
                self.status.response_failure = true;
            }
        }
    }

    /// Clears Control.Enable: tracking of requests in flight is dropped and their credits
    /// restored; their accesses fail. Stopped is set.
    pub fn disable_pri(&mut self) {
        self.status.enabled = false;
        self.counters.failed_halted += self.in_flight.len() as u64;
        self.in_flight.clear();
        self.outstanding = 0;
        self.status.stopped = true;
    }

    /// Sets Control.Enable again, clearing Response Failure and Unexpected PRG Index.
    pub fn enable_pri(&mut self) {
        if self.config.pri {
            self.status = PriStatus {
                enabled: true,
                ..PriStatus::default()
            };
        }
    }
}
