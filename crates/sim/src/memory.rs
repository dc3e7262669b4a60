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
        let Some(index) = self.word_index(gpa) else {
            return false;
        };
        if let Some(word) = self.memory.words().get(index) {
            word.store(value, std::sync::atomic::Ordering::Relaxed);
        }
        let page = self
            .shadow
            .entry(gpa / PAGE_SIZE)
            .or_insert_with(|| Box::new([0; WORDS_PER_PAGE]));
        page[index % WORDS_PER_PAGE] = value;
        true
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
