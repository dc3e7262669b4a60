//! Page tables that live in guest memory: the guest writes them, the host's IOMMU walks them.
//!
//! When the guest runs in another process (the VMM), the IOMMU model in the host cannot share
//! its tables with it; as on hardware with nested translation, the guest owns its tables in
//! its own memory and the IOMMU reads them. Guest memory reaches the host as a memfd
//! (`iopf_queue::SharedMemory`), so every word the walker reads is untrusted: each address is
//! bounds-checked, each entry validated, and the walk has a fixed depth, so a hostile guest
//! can make a translation fail but never make the host read out of bounds, loop or panic.
//!
//! Format (little-endian 64-bit words, 4 KiB tables of 512 entries):
//! - a **PASID directory** per device at a guest-physical address the host is told, with
//!   `entries` slots: slot 0 for requests without PASID, slot `p + 1` for PASID `p`; each slot
//!   is 0 (no address space) or the address of a level-2 table with bit 0 set;
//! - three levels indexed by IOVA bits 38:30, 29:21 and 20:12 (a 39-bit IOVA space); a
//!   non-leaf entry is `table address | PRESENT`; a leaf is `page address | perm << 1 |
//!   PRESENT`, with perm bits read, write, exec, priv as in `Perm`.
//!
//! Any other bit set in an entry is malformed, and the walk reports it as a fault.

use iopf_abi::{Pasid, Perm};
use iopf_queue::SharedMemory;

use crate::PAGE_SIZE;
use crate::iommu::{MapError, PageTables, Pte, SpaceId, Translate, Translation};
use crate::memory::GuestMemory;

/// Bit 0 of every entry: present.
pub const PRESENT: u64 = 1;
/// Bits of a table or page address (4 KiB aligned, below 2^52).
pub const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Leaf permission bits (`Perm` shifted left by one).
pub const PERM_MASK: u64 = 0xf << 1;
/// IOVAs the tables can map: 39 bits.
pub const IOVA_BITS: u32 = 39;
const LEVELS: [u32; 3] = [30, 21, 12];
const SLOTS: u64 = 512;

fn slot(pasid: Option<Pasid>) -> u64 {
    pasid.map_or(0, |p| u64::from(p.get()) + 1)
}

/// Where a device's PASID directory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Directory {
    /// Guest-physical address (4 KiB aligned).
    pub base: u64,
    /// Slots (so PASIDs up to `entries - 2`).
    pub entries: u64,
}

/// The host's IOMMU over guest-owned tables: reads only, through its own mapping of guest
/// memory.
#[derive(Debug)]
pub struct NestedIommu {
    memory: SharedMemory,
    directories: std::collections::BTreeMap<u32, Directory>,
    /// Walks that met a malformed entry or an address outside guest memory.
    pub malformed: u64,
}

impl NestedIommu {
    /// An IOMMU reading guest memory through `memory`.
    pub fn new(memory: SharedMemory) -> Self {
        Self {
            memory,
            directories: std::collections::BTreeMap::new(),
            malformed: 0,
        }
    }

    /// Tells the IOMMU where `device`'s PASID directory is (what a guest driver writes into the
    /// device's registers). Unaligned or absurd values are accepted and make every walk fail.
    pub fn set_directory(&mut self, device: u32, directory: Directory) {
        self.directories.insert(device, directory);
    }

    fn read(&mut self, gpa: u64) -> Option<u64> {
        let index = usize::try_from(gpa / 8).ok()?;
        if !gpa.is_multiple_of(8) {
            return None;
        }
        // Acquire: pairs with the guest's release store of the entry (see `cpu_write`).
        Some(
            self.memory
                .words()
                .get(index)?
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    fn walk(&mut self, space: SpaceId, iova: u64) -> Walk {
        let Some(directory) = self.directories.get(&space.0).copied() else {
            return Walk::NoSpace;
        };
        let slot = slot(space.1);
        if slot >= directory.entries {
            return Walk::NoSpace;
        }
        if iova >> IOVA_BITS != 0 {
            return Walk::Miss;
        }
        let Some(mut table) = directory
            .base
            .checked_add(slot * 8)
            .and_then(|at| self.read(at))
        else {
            return Walk::Malformed;
        };
        if table == 0 {
            return Walk::NoSpace;
        }
        for (depth, shift) in LEVELS.iter().enumerate() {
            if table & !(ADDRESS_MASK | PRESENT) != 0 || table & PRESENT == 0 {
                return Walk::Malformed;
            }
            let index = (iova >> shift) % SLOTS;
            let Some(entry) = self.read((table & ADDRESS_MASK) + index * 8) else {
                return Walk::Malformed;
            };
            if entry & PRESENT == 0 {
                return Walk::Miss;
            }
            if depth == LEVELS.len() - 1 {
                if entry & !(ADDRESS_MASK | PERM_MASK | PRESENT) != 0 {
                    return Walk::Malformed;
                }
                let perm = Perm::from_bits_truncate(((entry & PERM_MASK) >> 1) as u32);
                return Walk::Pte(Pte {
                    gpa: entry & ADDRESS_MASK,
                    perm,
                });
            }
            table = entry;
        }
        Walk::Miss
    }

    /// Translates `iova` for `access`, walking the guest's tables.
    pub fn translate(&mut self, space: SpaceId, iova: u64, access: Perm) -> Translation {
        match self.walk(space, iova) {
            Walk::Pte(pte) if !pte.perm.contains(access) => Translation::PermissionFault,
            Walk::Pte(pte) => Translation::Hit(pte.gpa + iova % PAGE_SIZE),
            Walk::NoSpace => Translation::NoAddressSpace,
            Walk::Miss => Translation::Miss,
            Walk::Malformed => {
                self.malformed += 1;
                Translation::Miss
            }
        }
    }
}

/// The outcome of a walk.
enum Walk {
    Pte(Pte),
    Miss,
    NoSpace,
    Malformed,
}

/// The guest's side: writes its page tables into its memory.
#[derive(Debug, Clone, Copy)]
pub struct GuestTables {
    directory: Directory,
}

impl GuestTables {
    /// Allocates a PASID directory of `entries` slots (at most one page: 512) for one device.
    pub fn new(memory: &mut GuestMemory, entries: u64) -> Option<Self> {
        let base = memory.allocate_page()?;
        Some(Self {
            directory: Directory {
                base,
                entries: entries.clamp(1, SLOTS),
            },
        })
    }

    /// Where the directory is (to tell the device).
    pub fn directory(&self) -> Directory {
        self.directory
    }

    /// Creates the address space of `pasid` (an empty level-2 table).
    pub fn add_space(
        &self,
        memory: &mut GuestMemory,
        pasid: Option<Pasid>,
    ) -> Result<(), MapError> {
        let slot = slot(pasid);
        if slot >= self.directory.entries {
            return Err(MapError::NoAddressSpace(0, pasid));
        }
        let at = self.directory.base + slot * 8;
        if memory.cpu_read(at).unwrap_or(0) & PRESENT == 0 {
            let table = memory
                .allocate_page()
                .ok_or(MapError::NoAddressSpace(0, pasid))?;
            memory.cpu_write(at, table | PRESENT);
        }
        Ok(())
    }

    fn leaf_address(
        &self,
        memory: &mut GuestMemory,
        pasid: Option<Pasid>,
        iova: u64,
        create: bool,
    ) -> Option<u64> {
        if iova >> IOVA_BITS != 0 || slot(pasid) >= self.directory.entries {
            return None;
        }
        let mut table = memory.cpu_read(self.directory.base + slot(pasid) * 8)?;
        for shift in &LEVELS[..2] {
            if table & PRESENT == 0 {
                return None;
            }
            let at = (table & ADDRESS_MASK) + ((iova >> shift) % SLOTS) * 8;
            let mut next = memory.cpu_read(at)?;
            if next & PRESENT == 0 {
                if !create {
                    return None;
                }
                next = memory.allocate_page()? | PRESENT;
                memory.cpu_write(at, next);
            }
            table = next;
        }
        Some((table & ADDRESS_MASK) + ((iova >> LEVELS[2]) % SLOTS) * 8)
    }

    /// The mapping of the page holding `iova`, if any.
    pub fn lookup(&self, memory: &mut GuestMemory, pasid: Option<Pasid>, iova: u64) -> Option<Pte> {
        let at = self.leaf_address(memory, pasid, iova, false)?;
        let leaf = memory.cpu_read(at)?;
        (leaf & PRESENT != 0).then(|| Pte {
            gpa: leaf & ADDRESS_MASK,
            perm: Perm::from_bits_truncate(((leaf & PERM_MASK) >> 1) as u32),
        })
    }

    /// Maps the page at `iova` to the page at `gpa` with `perm`, building tables as needed.
    pub fn map(
        &self,
        memory: &mut GuestMemory,
        pasid: Option<Pasid>,
        iova: u64,
        gpa: u64,
        perm: Perm,
    ) -> Result<(), MapError> {
        for addr in [iova, gpa] {
            if !addr.is_multiple_of(PAGE_SIZE) {
                return Err(MapError::Unaligned(addr));
            }
        }
        let leaf = self
            .leaf_address(memory, pasid, iova, true)
            .ok_or(MapError::NoAddressSpace(0, pasid))?;
        memory.cpu_write(
            leaf,
            (gpa & ADDRESS_MASK) | u64::from(perm.bits()) << 1 | PRESENT,
        );
        Ok(())
    }
}

impl Translate for NestedIommu {
    fn translate(&mut self, space: SpaceId, iova: u64, access: Perm) -> Translation {
        NestedIommu::translate(self, space, iova, access)
    }
}

/// One device's tables: the device part of `space` is not looked at.
impl PageTables for GuestTables {
    fn lookup(&mut self, memory: &mut GuestMemory, space: SpaceId, iova: u64) -> Option<Pte> {
        GuestTables::lookup(self, memory, space.1, iova)
    }
    fn map(
        &mut self,
        memory: &mut GuestMemory,
        space: SpaceId,
        iova: u64,
        gpa: u64,
        perm: Perm,
    ) -> Result<(), MapError> {
        GuestTables::map(self, memory, space.1, iova, gpa, perm)
    }
}
