//! The guest: takes page requests from the VMM, maps the pages on demand (or refuses), and
//! answers, with a latency distribution and a failure rate, and misbehaviour switches for the
//! tests (late, duplicate, forged and stale responses; never answering).

use iopf_abi::{Cookie, PageRequest, PageResponse, Perm, ResponseCode, ResponseRecord};
use serde::Serialize;

use crate::iommu::PageTables;
use crate::memory::GuestMemory;
use crate::rng::Rng;
use iopf_abi::Nanos;

/// How the guest behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestConfig {
    /// Answer latency, uniform in this range (nanoseconds).
    pub latency_ns: (Nanos, Nanos),
    /// Share of groups refused (`Invalid`) without mapping.
    pub refuse_rate: f64,
    /// Share of answers delayed by `late_ns` more.
    pub late_rate: f64,
    /// Extra delay of a late answer.
    pub late_ns: Nanos,
    /// Share of answers sent twice.
    pub duplicate_rate: f64,
    /// Share of groups followed by a response with a made-up cookie.
    pub forged_rate: f64,
    /// Share of groups followed by a replay of an earlier response (possibly from an earlier
    /// life of the handler).
    pub stale_rate: f64,
    /// Share of groups never answered.
    pub silent_rate: f64,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            latency_ns: (2_000, 20_000),
            refuse_rate: 0.02,
            late_rate: 0.0,
            late_ns: 0,
            duplicate_rate: 0.0,
            forged_rate: 0.0,
            stale_rate: 0.0,
            silent_rate: 0.0,
        }
    }
}

impl GuestConfig {
    /// A guest that misbehaves in every way the tests know.
    pub fn hostile() -> Self {
        Self {
            late_rate: 0.05,
            late_ns: 50_000_000,
            duplicate_rate: 0.1,
            forged_rate: 0.1,
            stale_rate: 0.1,
            silent_rate: 0.02,
            ..Self::default()
        }
    }
}

/// Why a response was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerKind {
    /// The answer to the group.
    Honest,
    /// A second copy of it.
    Duplicate,
    /// A made-up cookie.
    Forged,
    /// A replay of an earlier response.
    Stale,
}

/// A response the guest sends at `at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    /// When the VMM writes it to the response queue.
    pub at: Nanos,
    /// The record.
    pub record: ResponseRecord,
    /// Why.
    pub kind: AnswerKind,
    /// The tag of the group it answers (the caller's, e.g. the handler life the group came
    /// from; for a stale replay, the tag of the group first answered).
    pub tag: u64,
}

/// What the guest counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct GuestCounters {
    /// Groups received.
    pub groups: u64,
    /// Pages mapped.
    pub mapped: u64,
    /// Groups answered `Success`.
    pub success: u64,
    /// Groups refused (`Invalid`).
    pub refused: u64,
    /// Groups never answered.
    pub silent: u64,
    /// Late answers.
    pub late: u64,
    /// Duplicates sent.
    pub duplicates: u64,
    /// Forged responses sent.
    pub forged: u64,
    /// Stale responses sent.
    pub stale: u64,
}

impl GuestCounters {
    /// Responses sent that no honest guest would send.
    pub fn bogus(&self) -> u64 {
        self.duplicates + self.forged + self.stale
    }
}

/// The guest behind one device's VMM.
#[derive(Debug)]
pub struct Guest {
    config: GuestConfig,
    rng: Rng,
    /// Responses sent and their tags, for stale replays (bounded).
    history: Vec<(ResponseRecord, u64)>,
    counters: GuestCounters,
}

const HISTORY: usize = 256;

impl Guest {
    /// A guest with its own random stream.
    pub fn new(config: GuestConfig, rng: Rng) -> Self {
        Self {
            config,
            rng,
            history: Vec::new(),
            counters: GuestCounters::default(),
        }
    }

    /// Counters.
    pub fn counters(&self) -> GuestCounters {
        self.counters
    }

    /// Handles one whole group (its `LAST_PAGE` request last) for device `device`, mapping
    /// pages in `iommu` with frames from `memory`; returns the responses to send, tagged with
    /// `tag` (or, for stale replays, with the tag of the group they first answered).
    pub fn on_group(
        &mut self,
        device: u32,
        group: &[PageRequest],
        tag: u64,
        iommu: &mut impl PageTables,
        memory: &mut GuestMemory,
        now: Nanos,
    ) -> Vec<Answer> {
        let Some(last) = group.last() else {
            return Vec::new();
        };
        self.counters.groups += 1;
        let mut answers = Vec::new();
        if self.rng.chance(self.config.silent_rate) {
            self.counters.silent += 1;
            return answers;
        }
        let refuse = self.rng.chance(self.config.refuse_rate)
            || !group.iter().all(|r| self.map(device, r, iommu, memory));
        let code = if refuse {
            self.counters.refused += 1;
            ResponseCode::Invalid
        } else {
            self.counters.success += 1;
            ResponseCode::Success
        };
        let record = ResponseRecord::from(&PageResponse::answering(last, code));
        let (lo, hi) = self.config.latency_ns;
        let mut at = now + self.rng.between(lo, hi);
        if self.rng.chance(self.config.late_rate) {
            self.counters.late += 1;
            at += self.config.late_ns;
        }
        answers.push(Answer {
            at,
            record,
            kind: AnswerKind::Honest,
            tag,
        });
        if self.rng.chance(self.config.duplicate_rate) {
            self.counters.duplicates += 1;
            answers.push(Answer {
                at: at + 1_000,
                record,
                kind: AnswerKind::Duplicate,
                tag,
            });
        }
        if self.rng.chance(self.config.forged_rate) {
            self.counters.forged += 1;
            let mut forged = record;
            forged.cookie = Cookie::new(self.rng.next_u64() as u32 | 1)
                .map_or(1, Cookie::get)
                .into();
            answers.push(Answer {
                at: at + 2_000,
                record: forged,
                kind: AnswerKind::Forged,
                tag,
            });
        }
        if !self.history.is_empty() && self.rng.chance(self.config.stale_rate) {
            self.counters.stale += 1;
            let (old, old_tag) = self.history[self.rng.below(self.history.len() as u64) as usize];
            answers.push(Answer {
                at: at + 3_000,
                record: old,
                kind: AnswerKind::Stale,
                tag: old_tag,
            });
        }
        if self.history.len() == HISTORY {
            self.history.remove(0);
        }
        self.history.push((record, tag));
        answers
    }

    /// Maps the page `request` asks for, unless already mapped with the access it needs.
    fn map(
        &mut self,
        device: u32,
        request: &PageRequest,
        iommu: &mut impl PageTables,
        memory: &mut GuestMemory,
    ) -> bool {
        let space = (device, request.pasid);
        let iova = request.addr.get();
        let want = request.perm | Perm::READ;
        let (gpa, perm) = match iommu.lookup(memory, space, iova) {
            Some(pte) if pte.perm.contains(want) => return true,
            // Mapped with less than this access needs: widen the permissions in place.
            Some(pte) => (pte.gpa, pte.perm | want),
            None => match memory.allocate_page() {
                Some(gpa) => (gpa, want),
                None => return false,
            },
        };
        self.counters.mapped += 1;
        iommu.map(memory, space, iova, gpa, perm).is_ok()
    }
}
