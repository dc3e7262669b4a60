//! Guest memory that DMA really writes: a shared memfd mapping (so another process can map and
//! check it), plus a shadow of what every written word must hold, so "nothing lost" is checked
//! byte by byte, not assumed.

use std::collections::BTreeMap;

use iopf_queue::{AttachError, SharedMemory};

use crate::PAGE_SIZE;

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// Guest-physical memory: page frames handed out by the guest, written by device DMA.
#[derive(Debug)]
pub struct GuestMemory {
    memory: SharedMemory,
    pages: u64,
    next_free: u64,
    /// Expected contents of every page DMA has written (unwritten words of such a page: 0).
    shadow: BTreeMap<u64, Box<[u64; WORDS_PER_PAGE]>>,
    /// Words read by DMA whose value differed from the shadow.
    read_mismatches: u64,
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
    /// `pages` pages of zeroed shared memory.
    pub fn new(pages: u64) -> Result<Self, AttachError> {
        let memory = SharedMemory::create("iopf-guest-memory", pages.max(2) * PAGE_SIZE)?;
        Ok(Self {
            pages: memory.len() / PAGE_SIZE,
            memory,
            next_free: 0,
            shadow: BTreeMap::new(),
            read_mismatches: 0,
        })
    }

    /// Guest memory another process created, as the device side sees it: DMA reads and writes
    /// with a shadow, and no page allocation (frames are the guest's to hand out).
    pub fn from_shared(memory: SharedMemory) -> Self {
        let pages = memory.len() / PAGE_SIZE;
        Self {
            memory,
            pages,
            next_free: pages,
            shadow: BTreeMap::new(),
            read_mismatches: 0,
        }
    }

    /// The shared memory (to hand its fd to another process).
    pub fn shared(&self) -> &SharedMemory {
        &self.memory
    }

    /// A fresh page frame, or `None` when memory is exhausted (the guest then refuses).
    pub fn allocate_page(&mut self) -> Option<u64> {
        (self.next_free < self.pages).then(|| {
            self.next_free += 1;
            (self.next_free - 1) * PAGE_SIZE
        })
    }

    fn word_index(&self, gpa: u64) -> Option<usize> {
        (gpa.is_multiple_of(8) && gpa < self.pages * PAGE_SIZE).then_some((gpa / 8) as usize)
    }

    /// Writes one word by DMA at guest-physical `gpa` (8-aligned, inside memory).
    pub fn dma_write(&mut self, gpa: u64, value: u64) -> bool {
        self.dma_write_run(gpa, &[value]) == 1
    }

    /// Writes consecutive words by DMA from `gpa` (8-aligned) within one page: the same as
    /// [`dma_write`](Self::dma_write) for each, with one shadow lookup for the run. Returns how
    /// many were written (0 if the run leaves memory or crosses a page).
    pub fn dma_write_run(&mut self, gpa: u64, values: &[u64]) -> usize {
        let Some(index) = self.run_index(gpa, values.len()) else {
            return 0;
        };
        let words = self.memory.words();
        for (word, value) in words[index..index + values.len()].iter().zip(values) {
            word.store(*value, std::sync::atomic::Ordering::Relaxed);
        }
        let page = self
            .shadow
            .entry(gpa / PAGE_SIZE)
            .or_insert_with(|| Box::new([0; WORDS_PER_PAGE]));
        let at = index % WORDS_PER_PAGE;
        page[at..at + values.len()].copy_from_slice(values);
        values.len()
    }

    /// Reads `count` consecutive words by DMA from `gpa` (8-aligned) within one page, checking
    /// each against the shadow as [`dma_read`](Self::dma_read) does. Returns how many were read
    /// (0 if the run leaves memory or crosses a page).
    pub fn dma_read_run(&mut self, gpa: u64, count: usize) -> usize {
        let Some(index) = self.run_index(gpa, count) else {
            return 0;
        };
        let words = &self.memory.words()[index..index + count];
        let at = index % WORDS_PER_PAGE;
        let mismatches = match self.shadow.get(&(gpa / PAGE_SIZE)) {
            Some(page) => words
                .iter()
                .zip(&page[at..at + count])
                .filter(|(w, want)| w.load(std::sync::atomic::Ordering::Relaxed) != **want)
                .count(),
            None => words
                .iter()
                .filter(|w| w.load(std::sync::atomic::Ordering::Relaxed) != 0)
                .count(),
        };
        self.read_mismatches += mismatches as u64;
        count
    }

    /// The word index of a run of `count` words from `gpa`, if it stays in memory and in one
    /// page.
    fn run_index(&self, gpa: u64, count: usize) -> Option<usize> {
        let index = self.word_index(gpa)?;
        let fits_page = index % WORDS_PER_PAGE + count <= WORDS_PER_PAGE;
        let fits_memory = index + count <= self.memory.words().len();
        (count > 0 && fits_page && fits_memory).then_some(index)
    }

    /// Reads one word by DMA, checking it against the shadow; returns the value read.
    pub fn dma_read(&mut self, gpa: u64) -> Option<u64> {
        let index = self.word_index(gpa)?;
        let value = self
            .memory
            .words()
            .get(index)?
            .load(std::sync::atomic::Ordering::Relaxed);
        let expected = self
            .shadow
            .get(&(gpa / PAGE_SIZE))
            .map_or(0, |page| page[index % WORDS_PER_PAGE]);
        if value != expected {
            self.read_mismatches += 1;
        }
        Some(value)
    }

    /// A store by the guest's CPU (page tables, say): not DMA, so not in the shadow.
    pub fn cpu_write(&self, gpa: u64, value: u64) -> bool {
        match self
            .word_index(gpa)
            .and_then(|i| self.memory.words().get(i))
        {
            Some(word) => {
                // Release: a device that later sees the effect of a response sent after this
                // store (through the rings' release/acquire) sees the store too.
                word.store(value, std::sync::atomic::Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// A load by the guest's CPU.
    pub fn cpu_read(&self, gpa: u64) -> Option<u64> {
        let index = self.word_index(gpa)?;
        Some(
            self.memory
                .words()
                .get(index)?
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// Compares every page DMA wrote with its shadow.
    pub fn verify(&self) -> MemoryVerdict {
        let words = self.memory.words();
        let mut verdict = MemoryVerdict {
            read_mismatches: self.read_mismatches,
            ..MemoryVerdict::default()
        };
        for (&page, expected) in &self.shadow {
            let base = (page * PAGE_SIZE / 8) as usize;
            for (i, &want) in expected.iter().enumerate() {
                let got = words
                    .get(base + i)
                    .map_or(!want, |w| w.load(std::sync::atomic::Ordering::Relaxed));
                verdict.bytes_mismatched += u64::from(
                    ((got ^ want).to_le_bytes())
                        .iter()
                        .filter(|b| **b != 0)
                        .count() as u8,
                );
            }
            verdict.bytes_verified += PAGE_SIZE;
        }
        verdict
    }

    /// Corrupts one word behind the shadow's back (for tests of the checker itself).
    pub fn corrupt_for_test(&self, gpa: u64) {
        if let Some(word) = self
            .word_index(gpa)
            .and_then(|i| self.memory.words().get(i))
        {
            word.fetch_xor(0xff, std::sync::atomic::Ordering::Relaxed);
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
