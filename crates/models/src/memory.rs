//! Guest memory that DMA really writes: one or more shared memfd mappings at their
//! guest-physical addresses (so another process can map and check them), plus a shadow of what
//! every written word must hold, so "nothing lost" is checked byte by byte, not assumed.
//!
//! A [`MemoryMap`] is the set of regions a device may reach (what a VMM gives with `DMA_MAP`),
//! each with its permissions: an access resolves its guest-physical address to the one region
//! holding it, needs `READ` (a read, or a page table walk) or `WRITE` (a DMA write) there, and
//! never crosses a region's end. An access that fails this check touches nothing and is
//! counted ([`GuestMemory::refused`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use iopf_abi::Perm;
use iopf_queue::{RegionAttachError, SharedMemory};

use crate::PAGE_SIZE;

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// One region of guest-physical memory: where it is, its bytes, and what a device may do there.
#[derive(Debug, Clone)]
pub struct Region {
    /// Guest-physical address of its first byte (page aligned).
    pub gpa: u64,
    /// Its bytes (a whole number of pages).
    pub memory: Arc<SharedMemory>,
    /// What devices may do: `READ`, `WRITE` or both (other bits are ignored).
    pub perm: Perm,
}

impl Region {
    fn end(&self) -> u64 {
        self.gpa.saturating_add(self.memory.len())
    }

    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }
}

/// Why a region cannot join a [`MemoryMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryMapError {
    /// The region's address is not page aligned, or its end does not fit 64 bits.
    #[error("region at {0:#x} is unaligned or ends beyond 2^64")]
    Placement(u64),
    /// The region overlaps one already in the map.
    #[error("region at {0:#x} overlaps another")]
    Overlap(u64),
    /// The region allows neither reads nor writes.
    #[error("region at {0:#x} allows neither reads nor writes")]
    NoAccess(u64),
}

/// Guest-physical memory as a device sees it: regions at their addresses, none overlapping.
/// Cloning shares the regions' mappings.
#[derive(Debug, Clone, Default)]
pub struct MemoryMap {
    /// Sorted by address, disjoint.
    regions: Vec<Region>,
}

impl MemoryMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// One read-write region from guest-physical 0 (the single-region form).
    pub fn whole(memory: SharedMemory) -> Self {
        Self {
            regions: vec![Region {
                gpa: 0,
                memory: Arc::new(memory),
                perm: Perm::READ | Perm::WRITE,
            }],
        }
    }

    /// Adds a region.
    pub fn insert(&mut self, region: Region) -> Result<(), MemoryMapError> {
        if !region.gpa.is_multiple_of(PAGE_SIZE)
            || region.gpa.checked_add(region.memory.len()).is_none()
        {
            return Err(MemoryMapError::Placement(region.gpa));
        }
        if !region.perm.intersects(Perm::READ | Perm::WRITE) {
            return Err(MemoryMapError::NoAccess(region.gpa));
        }
        let at = self.regions.partition_point(|r| r.gpa < region.gpa);
        let after = self.regions.get(at).is_some_and(|r| r.gpa < region.end());
        let before = at > 0 && self.regions[at - 1].end() > region.gpa;
        if after || before {
            return Err(MemoryMapError::Overlap(region.gpa));
        }
        self.regions.insert(at, region);
        Ok(())
    }

    /// Removes the region starting at `gpa`, if any.
    pub fn remove(&mut self, gpa: u64) -> Option<Region> {
        let at = self.regions.iter().position(|r| r.gpa == gpa)?;
        Some(self.regions.remove(at))
    }

    /// The regions, by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// No region at all.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The region holding `gpa`.
    pub fn find(&self, gpa: u64) -> Option<&Region> {
        let at = self.regions.partition_point(|r| r.gpa <= gpa);
        self.regions[..at].last().filter(|r| r.contains(gpa))
    }

    /// Whether the byte at `gpa` lies in a region allowing `need` (`READ`, `WRITE` or both).
    pub fn allows(&self, gpa: u64, need: Perm) -> bool {
        self.find(gpa)
            .is_some_and(|r| r.perm.contains(need & (Perm::READ | Perm::WRITE)))
    }

    /// `count` words from `gpa` (8-aligned), if they lie in one region that allows `need`
    /// (`Perm::empty()` for the guest's own CPU, which may touch any region).
    pub fn words(&self, gpa: u64, count: usize, need: Perm) -> Option<&[AtomicU64]> {
        if !gpa.is_multiple_of(8) || count == 0 {
            return None;
        }
        let region = self.find(gpa)?;
        if !region.perm.contains(need & (Perm::READ | Perm::WRITE)) {
            return None;
        }
        let index = usize::try_from((gpa - region.gpa) / 8).ok()?;
        region.memory.words().get(index..index.checked_add(count)?)
    }
}

/// Guest-physical memory: page frames handed out by the guest, written by device DMA.
#[derive(Debug)]
pub struct GuestMemory {
    /// Never empty.
    map: MemoryMap,
    pages: u64,
    next_free: u64,
    /// Expected contents of every page DMA has written (unwritten words of such a page: 0),
    /// by guest-physical page number.
    shadow: BTreeMap<u64, Box<[u64; WORDS_PER_PAGE]>>,
    /// Words read by DMA whose value differed from the shadow.
    read_mismatches: u64,
    /// DMA runs refused: no region there, or not the permission the access needs.
    refused: u64,
}

/// The result of checking guest memory against what the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MemoryVerdict {
    /// Bytes compared (every byte of every page DMA wrote).
    pub bytes_verified: u64,
    /// Bytes that differ from what the device wrote.
    pub bytes_mismatched: u64,
    /// 8-byte words DMA read that differed from what was written before.
    pub read_mismatches: u64,
}

impl GuestMemory {
    /// `pages` pages of zeroed shared memory, read-write from guest-physical 0.
    pub fn new(pages: u64) -> Result<Self, RegionAttachError> {
        let memory = SharedMemory::create("iopf-guest-memory", pages.max(2) * PAGE_SIZE)?;
        let pages = memory.len() / PAGE_SIZE;
        Ok(Self::with_map(MemoryMap::whole(memory), pages, 0))
    }

    /// Guest memory another process created, as the device side sees it: one read-write
    /// region from guest-physical 0, DMA reads and writes with a shadow, and no page
    /// allocation (frames are the guest's to hand out).
    pub fn from_shared(memory: SharedMemory) -> Self {
        let pages = memory.len() / PAGE_SIZE;
        Self::with_map(MemoryMap::whole(memory), pages, pages)
    }

    /// Guest memory as the regions of `map` (what a VMM gave with `DMA_MAP`), with no page
    /// allocation; `None` if the map is empty.
    pub fn from_map(map: MemoryMap) -> Option<Self> {
        (!map.is_empty()).then(|| Self::with_map(map, 0, 0))
    }

    fn with_map(map: MemoryMap, pages: u64, next_free: u64) -> Self {
        Self {
            map,
            pages,
            next_free,
            shadow: BTreeMap::new(),
            read_mismatches: 0,
            refused: 0,
        }
    }

    /// The regions.
    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// Replaces the regions with those of `map` (a VMM mapped or unmapped some). The pages DMA
    /// wrote in a region that is not in `map` any more (the same mapping, shared) are checked
    /// now, and the verdict returned, then forgotten; the others keep their shadow. An empty
    /// `map` changes nothing (`None`).
    pub fn set_map(&mut self, map: MemoryMap) -> Option<MemoryVerdict> {
        if map.is_empty() {
            return None;
        }
        // The same bytes at the same place: the same file, range and address (a VMM that
        // comes back maps the same memfd again).
        let kept = |old: &Region| {
            map.regions().iter().any(|r| {
                r.gpa == old.gpa
                    && r.memory.len() == old.memory.len()
                    && r.memory.offset() == old.memory.offset()
                    && (Arc::ptr_eq(&r.memory, &old.memory) || r.memory.same_file(&old.memory))
            })
        };
        let gone: Vec<u64> = self
            .shadow
            .keys()
            .copied()
            .filter(|page| {
                self.map
                    .find(page.saturating_mul(PAGE_SIZE))
                    .is_none_or(|old| !kept(old))
            })
            .collect();
        let mut verdict = MemoryVerdict::default();
        for page in gone {
            self.verify_page(page, &mut verdict);
            self.shadow.remove(&page);
        }
        self.map = map;
        Some(verdict)
    }

    /// DMA runs refused so far (no region, or a region without the permission needed).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The memory of the first region (the only one for the single-region constructors), to
    /// hand its fd to another process.
    pub fn shared(&self) -> &SharedMemory {
        // `map` is never empty (constructors and `set_map` see to it).
        &self.map.regions()[0].memory
    }

    /// A fresh page frame, or `None` when memory is exhausted (the guest then refuses).
    pub fn allocate_page(&mut self) -> Option<u64> {
        (self.next_free < self.pages).then(|| {
            self.next_free += 1;
            (self.next_free - 1) * PAGE_SIZE
        })
    }

    /// Writes one word by DMA at guest-physical `gpa` (8-aligned, in a region allowing writes).
    pub fn dma_write(&mut self, gpa: u64, value: u64) -> bool {
        self.dma_write_run(gpa, &[value]) == 1
    }

    /// Writes consecutive words by DMA from `gpa` (8-aligned) within one page: the same as
    /// [`dma_write`](Self::dma_write) for each, with one shadow lookup for the run. Returns how
    /// many were written (0 if the run leaves its region, crosses a page, or lands where writes
    /// are not allowed: then nothing is written, and the run is counted as refused).
    pub fn dma_write_run(&mut self, gpa: u64, values: &[u64]) -> usize {
        let Some(words) = Self::run(&self.map, &mut self.refused, gpa, values.len(), Perm::WRITE)
        else {
            return 0;
        };
        for (word, value) in words.iter().zip(values) {
            word.store(*value, Ordering::Relaxed);
        }
        let page = self
            .shadow
            .entry(gpa / PAGE_SIZE)
            .or_insert_with(|| Box::new([0; WORDS_PER_PAGE]));
        let at = (gpa % PAGE_SIZE / 8) as usize;
        page[at..at + values.len()].copy_from_slice(values);
        values.len()
    }

    /// Reads `count` consecutive words by DMA from `gpa` (8-aligned) within one page, checking
    /// each against the shadow as [`dma_read`](Self::dma_read) does. Returns how many were read
    /// (0 if the run leaves its region, crosses a page or lands where reads are not allowed;
    /// counted as refused).
    pub fn dma_read_run(&mut self, gpa: u64, count: usize) -> usize {
        let Some(words) = Self::run(&self.map, &mut self.refused, gpa, count, Perm::READ) else {
            return 0;
        };
        let at = (gpa % PAGE_SIZE / 8) as usize;
        let mismatches = match self.shadow.get(&(gpa / PAGE_SIZE)) {
            Some(page) => words
                .iter()
                .zip(&page[at..at + count])
                .filter(|(w, want)| w.load(Ordering::Relaxed) != **want)
                .count(),
            None => words
                .iter()
                .filter(|w| w.load(Ordering::Relaxed) != 0)
                .count(),
        };
        self.read_mismatches += mismatches as u64;
        count
    }

    /// The words of a DMA run of `count` words from `gpa`, if it stays in one page of one
    /// region allowing `need`; counts a refusal otherwise.
    fn run<'a>(
        map: &'a MemoryMap,
        refused: &mut u64,
        gpa: u64,
        count: usize,
        need: Perm,
    ) -> Option<&'a [AtomicU64]> {
        let fits_page = (gpa % PAGE_SIZE / 8) as usize + count <= WORDS_PER_PAGE;
        let words = map.words(gpa, count, need).filter(|_| fits_page);
        if words.is_none() && count > 0 {
            *refused += 1;
        }
        words
    }

    /// Reads one word by DMA, checking it against the shadow; returns the value read.
    pub fn dma_read(&mut self, gpa: u64) -> Option<u64> {
        let value =
            Self::run(&self.map, &mut self.refused, gpa, 1, Perm::READ)?[0].load(Ordering::Relaxed);
        let expected = self
            .shadow
            .get(&(gpa / PAGE_SIZE))
            .map_or(0, |page| page[(gpa % PAGE_SIZE / 8) as usize]);
        if value != expected {
            self.read_mismatches += 1;
        }
        Some(value)
    }

    /// A store by the guest's CPU (page tables, say): not DMA, so not in the shadow, and not
    /// subject to the regions' device permissions.
    pub fn cpu_write(&self, gpa: u64, value: u64) -> bool {
        match self.map.words(gpa, 1, Perm::empty()) {
            Some([word]) => {
                // Release: a device that later sees the effect of a response sent after this
                // store (through the rings' release/acquire) sees the store too.
                word.store(value, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    /// A load by the guest's CPU.
    pub fn cpu_read(&self, gpa: u64) -> Option<u64> {
        match self.map.words(gpa, 1, Perm::empty()) {
            Some([word]) => Some(word.load(Ordering::Acquire)),
            _ => None,
        }
    }

    /// Compares one shadow page with memory, adding to `verdict`. A page no region holds any
    /// more counts as every byte mismatched (its data is lost).
    fn verify_page(&self, page: u64, verdict: &mut MemoryVerdict) {
        let Some(expected) = self.shadow.get(&page) else {
            return;
        };
        let words = self.map.words(
            page.saturating_mul(PAGE_SIZE),
            WORDS_PER_PAGE,
            Perm::empty(),
        );
        for (i, &want) in expected.iter().enumerate() {
            let got = words.map_or(!want, |w| w[i].load(Ordering::Relaxed));
            verdict.bytes_mismatched += u64::from(
                ((got ^ want).to_le_bytes())
                    .iter()
                    .filter(|b| **b != 0)
                    .count() as u8,
            );
        }
        verdict.bytes_verified += PAGE_SIZE;
    }

    /// Compares every page DMA wrote with its shadow.
    pub fn verify(&self) -> MemoryVerdict {
        let mut verdict = MemoryVerdict {
            read_mismatches: self.read_mismatches,
            ..MemoryVerdict::default()
        };
        for &page in self.shadow.keys() {
            self.verify_page(page, &mut verdict);
        }
        verdict
    }

    /// Corrupts one word behind the shadow's back (for tests of the checker itself).
    pub fn corrupt_for_test(&self, gpa: u64) {
        if let Some([word]) = self.map.words(gpa, 1, Perm::empty()) {
            word.fetch_xor(0xff, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run is the same as its words one by one: same memory, same shadow, same verdict,
    /// same read checks; and a run that would cross a page or leave memory does nothing.
    #[test]
    fn runs_match_word_by_word_access() {
        let mut by_run = GuestMemory::new(4).unwrap();
        let mut by_word = GuestMemory::new(4).unwrap();
        let values: Vec<u64> = (0..100).map(|i| i * 0x0101_0101 + 7).collect();
        let gpa = PAGE_SIZE + 8 * 300;
        assert_eq!(by_run.dma_write_run(gpa, &values), 100);
        for (i, v) in values.iter().enumerate() {
            assert!(by_word.dma_write(gpa + 8 * i as u64, *v));
        }
        for i in 0..4 * WORDS_PER_PAGE as u64 {
            assert_eq!(by_run.cpu_read(i * 8), by_word.cpu_read(i * 8));
        }
        assert_eq!(by_run.verify(), by_word.verify());
        assert_eq!(by_run.dma_read_run(gpa - 8 * 10, 120), 120);
        assert_eq!(by_run.verify().read_mismatches, 0);
        by_run.corrupt_for_test(gpa + 8);
        assert_eq!(by_run.dma_read_run(gpa, 4), 4);
        assert_eq!(by_run.verify().read_mismatches, 1);
        // Crossing a page, leaving memory, or empty: nothing done.
        assert_eq!(by_run.dma_write_run(PAGE_SIZE - 8, &[1, 2]), 0);
        assert_eq!(by_run.dma_write_run(4 * PAGE_SIZE, &[1]), 0);
        assert_eq!(by_run.dma_read_run(PAGE_SIZE - 8, 2), 0);
        assert_eq!(by_run.dma_write_run(0, &[]), 0);
    }

    #[test]
    fn written_words_verify_and_corruption_is_caught() {
        let mut m = GuestMemory::new(4).unwrap();
        let page = m.allocate_page().unwrap();
        assert!(m.dma_write(page + 8, 0x1122_3344_5566_7788));
        assert_eq!(m.dma_read(page + 8), Some(0x1122_3344_5566_7788));
        assert_eq!(
            m.verify(),
            MemoryVerdict {
                bytes_verified: 4096,
                bytes_mismatched: 0,
                read_mismatches: 0
            }
        );
        m.corrupt_for_test(page + 8);
        assert_eq!(m.verify().bytes_mismatched, 1);
        assert_eq!(m.dma_read(page + 8), Some(0x1122_3344_5566_7777));
        assert_eq!(m.verify().read_mismatches, 1);
    }

    #[test]
    fn allocation_runs_out_and_out_of_range_writes_are_refused() {
        let mut m = GuestMemory::new(2).unwrap();
        assert_eq!(m.allocate_page(), Some(0));
        assert_eq!(m.allocate_page(), Some(4096));
        assert_eq!(m.allocate_page(), None);
        assert!(!m.dma_write(2 * 4096, 1));
        assert!(!m.dma_write(3, 1));
    }
}
