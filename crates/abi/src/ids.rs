//! Newtypes for the identifiers a page request carries, so that a PASID can never be passed
//! where a PRG index or a cookie is expected.

use core::fmt;
use core::num::NonZeroU32;

use crate::DecodeError;

/// A Process Address Space ID: 20 bits in PCIe (the PASID TLP prefix carries 20 bits).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pasid(u32);

impl Pasid {
    /// The largest PASID PCIe can carry.
    pub const MAX: u32 = (1 << 20) - 1;

    /// A PASID, or an error if `value` does not fit in 20 bits.
    pub const fn new(value: u32) -> Result<Self, DecodeError> {
        if value > Self::MAX {
            return Err(DecodeError::PasidOutOfRange(value));
        }
        Ok(Self(value))
    }

    /// The raw value.
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// A Page Request Group index: 9 bits in a PCIe page request.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrgIndex(u16);

impl PrgIndex {
    /// The largest PRG index PCIe can carry.
    pub const MAX: u16 = (1 << 9) - 1;

    /// A PRG index, or an error if `value` does not fit in 9 bits.
    pub const fn new(value: u32) -> Result<Self, DecodeError> {
        if value > Self::MAX as u32 {
            return Err(DecodeError::PrgIndexOutOfRange(value));
        }
        Ok(Self(value as u16))
    }

    /// The raw value.
    pub const fn get(self) -> u16 {
        self.0
    }
}

/// The host's name for one page request group: non-zero, issued per device by the fault core.
///
/// A response names the group it answers by its cookie; the (PASID, PRG index) pair alone is
/// not enough, because a device reuses a PRG index as soon as its group is answered.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cookie(NonZeroU32);

impl Cookie {
    /// A cookie, or an error for 0 (which the ABI reserves for "no cookie").
    pub const fn new(value: u32) -> Result<Self, DecodeError> {
        match NonZeroU32::new(value) {
            Some(v) => Ok(Self(v)),
            None => Err(DecodeError::ZeroCookie),
        }
    }

    /// The raw value (never 0).
    pub const fn get(self) -> u32 {
        self.0.get()
    }
}

/// The address of a 4 KiB page: what a page request asks to have mapped.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageAddr(u64);

impl PageAddr {
    /// The page size page requests are expressed in.
    pub const SIZE: u64 = 4096;

    /// A page address, or an error unless `addr` is 4 KiB aligned.
    pub const fn new(addr: u64) -> Result<Self, DecodeError> {
        if !addr.is_multiple_of(Self::SIZE) {
            return Err(DecodeError::UnalignedPageAddress(addr));
        }
        Ok(Self(addr))
    }

    /// The page that holds byte address `addr`.
    pub const fn containing(addr: u64) -> Self {
        Self(addr & !(Self::SIZE - 1))
    }

    /// The raw address (4 KiB aligned).
    pub const fn get(self) -> u64 {
        self.0
    }
}

macro_rules! id_fmt {
    ($t:ty, $name:literal, $fmt:literal) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($name, "(", $fmt, ")"), self.get())
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.get())
            }
        }
    };
}

id_fmt!(Pasid, "Pasid", "{:#x}");
id_fmt!(PrgIndex, "PrgIndex", "{}");
id_fmt!(Cookie, "Cookie", "{:#x}");
id_fmt!(PageAddr, "PageAddr", "{:#x}");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pasid_accepts_20_bits_only() {
        assert_eq!(Pasid::new(Pasid::MAX).unwrap().get(), 0xf_ffff);
        assert_eq!(
            Pasid::new(1 << 20),
            Err(DecodeError::PasidOutOfRange(1 << 20))
        );
    }

    #[test]
    fn prg_index_accepts_9_bits_only() {
        assert_eq!(PrgIndex::new(511).unwrap().get(), 511);
        assert_eq!(
            PrgIndex::new(512),
            Err(DecodeError::PrgIndexOutOfRange(512))
        );
    }

    #[test]
    fn page_addr_must_be_4k_aligned() {
        assert_eq!(PageAddr::new(0x2000).unwrap().get(), 0x2000);
        assert_eq!(
            PageAddr::new(0x2001),
            Err(DecodeError::UnalignedPageAddress(0x2001))
        );
        assert_eq!(PageAddr::containing(0x2fff).get(), 0x2000);
    }

    #[test]
    fn cookie_zero_is_refused() {
        assert_eq!(Cookie::new(0), Err(DecodeError::ZeroCookie));
        assert_eq!(Cookie::new(7).unwrap().get(), 7);
    }
}
