//! The layout of the self-test command `struct iommu_test_cmd` (Linux 6.12's
//! `drivers/iommu/iommufd/iommufd_test.h`), shared by the ioctl in `sys` and the operations in
//! [`selftest`](crate::selftest). It imports neither, so the two do not import each other.

use iommufd_bindings::iommufd::IOMMUFD_CMD_BASE;
use zerocopy::{Immutable, IntoBytes};

/// `IOMMU_TEST_CMD` is `_IO(';', IOMMUFD_CMD_BASE + 32)`.
pub(crate) const IOMMU_TEST_CMD_NR: u32 = IOMMUFD_CMD_BASE + 32;

/// `struct iommu_test_cmd` (72 bytes): a header, a 48-byte union aligned to 8, and `last`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, IntoBytes, Immutable)]
pub(crate) struct TestCmd {
    pub size: u32,
    pub op: u32,
    pub id: u32,
    pub reserved: u32,
    /// The union; its largest member (`dirty`) is 48 bytes.
    pub payload: [u64; 6],
    pub last: u32,
    pub tail_padding: u32,
}

const _: () = assert!(size_of::<TestCmd>() == 72);
const _: () = assert!(std::mem::offset_of!(TestCmd, payload) == 16);
const _: () = assert!(std::mem::offset_of!(TestCmd, last) == 64);

impl TestCmd {
    /// A command `op` on object `id`, with an all-zero union.
    pub(crate) fn new(op: u32, id: u32) -> Self {
        Self {
            size: size_of::<Self>() as u32,
            op,
            id,
            ..Self::default()
        }
    }

    /// The union's 32-bit word `i` (native endian, as the kernel sees it).
    pub(crate) fn word(&self, i: usize) -> u32 {
        let bytes = self.payload.as_bytes();
        u32::from_ne_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    }

    /// Sets the union's first 32-bit words to `words` (native endian), the rest to zero.
    pub(crate) fn set_words(&mut self, words: &[u32]) {
        let mut bytes = [0u8; 48];
        for (i, w) in words.iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            self.payload[i] = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of `struct iommu_test_cmd` in Linux 6.12's `iommufd_test.h`: header at 0..16,
    /// the union at 16 (8-aligned, because of its `__aligned_u64` members) and 48 bytes long
    /// (`dirty`: u32 flags, then five u64), `last` at 64, total 72.
    #[test]
    fn test_cmd_matches_the_kernel_layout() {
        assert_eq!(size_of::<TestCmd>(), 72);
        assert_eq!(std::mem::offset_of!(TestCmd, size), 0);
        assert_eq!(std::mem::offset_of!(TestCmd, op), 4);
        assert_eq!(std::mem::offset_of!(TestCmd, id), 8);
        assert_eq!(std::mem::offset_of!(TestCmd, payload), 16);
        assert_eq!(std::mem::offset_of!(TestCmd, last), 64);
        assert_eq!(align_of::<TestCmd>(), 8);
        assert_eq!(IOMMU_TEST_CMD_NR, 0xa0);
    }
}
