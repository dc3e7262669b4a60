//! DMA workloads: streams of accesses over a buffer in one address space.

use iopf_abi::Pasid;

use crate::PAGE_SIZE;
use crate::endpoint::DmaAccess;
use crate::rng::Rng;

/// The order in which a stream walks its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// One access after the other, wrapping at the end.
    Sequential,
    /// Anywhere in the buffer.
    Random,
    /// Every `stride` bytes, wrapping.
    Strided {
        /// Distance between accesses, in bytes.
        stride: u64,
    },
}

/// A stream of DMA accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    /// Address space.
    pub pasid: Option<Pasid>,
    /// First byte of the buffer (page aligned).
    pub base: u64,
    /// Buffer size in pages.
    pub pages: u64,
    /// Walk order.
    pub pattern: Pattern,
    /// Bytes per access (a multiple of 8).
    pub access_len: u32,
    /// Writes (else reads).
    pub write: bool,
    /// Accesses in the stream.
    pub accesses: u32,
    /// Time between accesses (the stream's rate), in nanoseconds.
    pub interval_ns: u64,
}

impl Stream {
    /// The `n`-th access, with id `id`.
    pub fn access(&self, n: u32, id: u64, rng: &mut Rng) -> DmaAccess {
        let len = u64::from(self.access_len.max(8) & !7);
        let bytes = (self.pages.max(1) * PAGE_SIZE).max(len);
        let room = bytes - len;
        let offset = match self.pattern {
            Pattern::Sequential => (u64::from(n) * len) % (room + 8),
            Pattern::Random => rng.below(room + 1),
            Pattern::Strided { stride } => (u64::from(n) * stride.max(8)) % (room + 8),
        } & !7;
        DmaAccess {
            id,
            pasid: self.pasid,
            iova: self.base + offset.min(room),
            len: len as u32,
            write: self.write,
            data_seed: rng.next_u64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(pattern: Pattern) -> Stream {
        Stream {
            pasid: None,
            base: 0x10_0000,
            pages: 4,
            pattern,
            access_len: 1000,
            write: true,
            accesses: 100,
            interval_ns: 1,
        }
    }

    #[test]
    fn accesses_stay_inside_the_buffer_and_aligned() {
        let mut rng = Rng::new(3);
        for pattern in [
            Pattern::Sequential,
            Pattern::Random,
            Pattern::Strided { stride: 3000 },
        ] {
            let s = stream(pattern);
            for n in 0..500 {
                let a = s.access(n, u64::from(n), &mut rng);
                assert_eq!(a.len, 1000 & !7);
                assert_eq!(a.iova % 8, 0);
                assert!(a.iova >= s.base);
                assert!(
                    a.iova + u64::from(a.len) <= s.base + 4 * PAGE_SIZE,
                    "{pattern:?} {a:?}"
                );
            }
        }
    }
}
