//! A software IOMMU: per (device, PASID) I/O page tables with read, write, execute and
//! privileged permissions, and translation with its outcome.
//!
//! The model is one translation stage, the one the guest manages: when the guest maps a page
//! for a page request it writes straight into these tables. (On hardware the guest owns stage 1
//! and the host stage 2; the split changes nothing about faults and responses.)

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;

use iopf_abi::{FaultReason, Pasid, Perm};
use thiserror::Error;

use crate::PAGE_SIZE;
use crate::memory::GuestMemory;

/// Which address space of which device: `None` is the device's requests without PASID.
pub type SpaceId = (u32, Option<Pasid>);

/// One page table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pte {
    /// Guest-physical page address.
    pub gpa: u64,
    /// What the mapping allows.
    pub perm: Perm,
}

/// The outcome of a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// Mapped and allowed: the guest-physical address.
    Hit(u64),
    /// No mapping for the page.
    Miss,
    /// Mapped, but the mapping does not allow the access.
    PermissionFault,
    /// The device has no address space for this PASID.
    NoAddressSpace,
    /// The translation gave a guest-physical address the second stage refuses: no region of
    /// guest memory holds it (`OutOfRangeAddress`), or its region does not allow the access
    /// (`Permission`). Unrecoverable: no page request can fix it.
    Stage2Fault(FaultReason),
}

impl Translation {
    /// The unrecoverable fault reason a failed translation reports without PRI.
    pub fn fault_reason(self) -> Option<FaultReason> {
        match self {
            Self::Hit(_) => None,
            Self::Miss => Some(FaultReason::PteFetch),
            Self::PermissionFault => Some(FaultReason::Permission),
            Self::NoAddressSpace => Some(FaultReason::PasidInvalid),
            Self::Stage2Fault(reason) => Some(reason),
        }
    }
}

/// Why a map request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MapError {
    /// The address space does not exist.
    #[error("no address space for device {0} PASID {1:?}")]
    NoAddressSpace(u32, Option<Pasid>),
    /// An address is not page aligned.
    #[error("address {0:#x} is not page aligned")]
    Unaligned(u64),
}

/// What the endpoint needs from an IOMMU: translation.
pub trait Translate {
    /// Translates `iova` in `space` for an access needing `access`.
    fn translate(&mut self, space: SpaceId, iova: u64, access: Perm) -> Translation;
}

/// What the guest needs to map pages: the page tables of its address spaces.
pub trait PageTables {
    /// The mapping of the page holding `iova`, if any.
    fn lookup(&mut self, memory: &mut GuestMemory, space: SpaceId, iova: u64) -> Option<Pte>;
    /// Maps the page at `iova` to the page at `gpa` with `perm`.
    fn map(
        &mut self,
        memory: &mut GuestMemory,
        space: SpaceId,
        iova: u64,
        gpa: u64,
        perm: Perm,
    ) -> Result<(), MapError>;
}

impl Translate for Iommu {
    fn translate(&mut self, space: SpaceId, iova: u64, access: Perm) -> Translation {
        Iommu::translate(self, space, iova, access)
    }
}

/// The in-process IOMMU keeps its tables itself; guest memory is not involved.
impl PageTables for Iommu {
    fn lookup(&mut self, _: &mut GuestMemory, space: SpaceId, iova: u64) -> Option<Pte> {
        Iommu::lookup(self, space, iova)
    }
    fn map(
        &mut self,
        _: &mut GuestMemory,
        space: SpaceId,
        iova: u64,
        gpa: u64,
        perm: Perm,
    ) -> Result<(), MapError> {
        Iommu::map(self, space, iova, gpa, perm)
    }
}

type Table = HashMap<u64, Pte, BuildHasherDefault<std::hash::DefaultHasher>>;

/// The IOMMU: every address space it translates for.
#[derive(Debug, Default)]
pub struct Iommu {
    spaces: BTreeMap<SpaceId, Table>,
    translations: u64,
}

impl Iommu {
    /// An IOMMU with no address spaces.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates the address space `space` (a PASID table entry), empty.
    pub fn add_space(&mut self, space: SpaceId) {
        self.spaces.entry(space).or_default();
    }

    /// Maps the page at `iova` to the page at `gpa` with `perm`, replacing any mapping.
    pub fn map(&mut self, space: SpaceId, iova: u64, gpa: u64, perm: Perm) -> Result<(), MapError> {
        for addr in [iova, gpa] {
            if !addr.is_multiple_of(PAGE_SIZE) {
                return Err(MapError::Unaligned(addr));
            }
        }
        let table = self
            .spaces
            .get_mut(&space)
            .ok_or(MapError::NoAddressSpace(space.0, space.1))?;
        table.insert(iova / PAGE_SIZE, Pte { gpa, perm });
        Ok(())
    }

    /// Removes the mapping of the page at `iova`; returns it.
    pub fn unmap(&mut self, space: SpaceId, iova: u64) -> Option<Pte> {
        self.spaces.get_mut(&space)?.remove(&(iova / PAGE_SIZE))
    }

    /// The mapping of the page holding `iova`, if any.
    pub fn lookup(&self, space: SpaceId, iova: u64) -> Option<Pte> {
        self.spaces.get(&space)?.get(&(iova / PAGE_SIZE)).copied()
    }

    /// Translates `iova` for an access needing `access`.
    pub fn translate(&mut self, space: SpaceId, iova: u64, access: Perm) -> Translation {
        self.translations += 1;
        let Some(table) = self.spaces.get(&space) else {
            return Translation::NoAddressSpace;
        };
        match table.get(&(iova / PAGE_SIZE)) {
            None => Translation::Miss,
            Some(pte) if !pte.perm.contains(access) => Translation::PermissionFault,
            Some(pte) => Translation::Hit(pte.gpa + iova % PAGE_SIZE),
        }
    }

    /// Translations performed.
    pub fn translations(&self) -> u64 {
        self.translations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> SpaceId {
        (1, Some(Pasid::new(3).unwrap()))
    }

    #[test]
    fn translation_hits_misses_and_checks_permissions() {
        let mut iommu = Iommu::new();
        iommu.add_space(space());
        assert_eq!(
            iommu.translate(space(), 0x5008, Perm::READ),
            Translation::Miss
        );
        iommu.map(space(), 0x5000, 0x9000, Perm::READ).unwrap();
        assert_eq!(
            iommu.translate(space(), 0x5008, Perm::READ),
            Translation::Hit(0x9008)
        );
        assert_eq!(
            iommu.translate(space(), 0x5008, Perm::WRITE),
            Translation::PermissionFault
        );
        assert_eq!(
            iommu.translate(space(), 0x5008, Perm::READ | Perm::PRIV),
            Translation::PermissionFault
        );
        assert_eq!(
            iommu.unmap(space(), 0x5000),
            Some(Pte {
                gpa: 0x9000,
                perm: Perm::READ
            })
        );
        assert_eq!(
            iommu.translate(space(), 0x5008, Perm::READ),
            Translation::Miss
        );
    }

    #[test]
    fn unknown_pasid_has_no_address_space() {
        let mut iommu = Iommu::new();
        assert_eq!(
            iommu.translate(space(), 0, Perm::READ),
            Translation::NoAddressSpace
        );
        assert_eq!(
            iommu.map(space(), 0, 0, Perm::READ),
            Err(MapError::NoAddressSpace(1, space().1))
        );
        assert_eq!(
            Translation::NoAddressSpace.fault_reason(),
            Some(FaultReason::PasidInvalid)
        );
        assert_eq!(
            Translation::Miss.fault_reason(),
            Some(FaultReason::PteFetch)
        );
    }

    #[test]
    fn map_refuses_unaligned_addresses() {
        let mut iommu = Iommu::new();
        iommu.add_space(space());
        assert_eq!(
            iommu.map(space(), 0x5001, 0x9000, Perm::READ),
            Err(MapError::Unaligned(0x5001))
        );
    }
}
