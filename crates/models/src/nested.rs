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
//!
//! Guest memory is a set of regions ([`MemoryMap`], what the VMM gave with `DMA_MAP`): the
//! walker reads a table only from a region that allows reads, and the guest-physical address
//! a walk gives must lie in a region that allows the access (the second stage), else the
//! translation is a [`Translation::Stage2Fault`].
//!
//! [`DirectIommu`] is the other mode, for a VMM that keeps no tables: requests without PASID
//! translate one to one (IOVA = guest-physical address) through the regions, a page being
//! present once the VMM answered `Success` to a page request for it.

use std::collections::{BTreeMap, BTreeSet};

use iopf_abi::{FaultReason, Pasid, Perm, PrgIndex, ResponseCode};
use iopf_queue::SharedMemory;

use crate::PAGE_SIZE;
use crate::iommu::{MapError, PageTables, Pte, SpaceId, Translate, Translation};
use crate::memory::{GuestMemory, MemoryMap};

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

/// The second stage: the region holding `gpa` must allow `access`.
fn stage2(map: &MemoryMap, gpa: u64, access: Perm) -> Translation {
    match map.find(gpa) {
        None => Translation::Stage2Fault(FaultReason::OutOfRangeAddress),
        Some(r) if !r.perm.contains(access & (Perm::READ | Perm::WRITE)) => {
            Translation::Stage2Fault(FaultReason::Permission)
        }
        Some(_) => Translation::Hit(gpa),
    }
}

/// The host's IOMMU over guest-owned tables: reads only, through its own mapping of guest
/// memory.
#[derive(Debug)]
pub struct NestedIommu {
    memory: MemoryMap,
    directories: BTreeMap<u32, Directory>,
    /// Walks that met a malformed entry or an address outside readable guest memory.
    pub malformed: u64,
}

impl NestedIommu {
    /// An IOMMU reading guest memory through `memory`, read-write from guest-physical 0.
    pub fn new(memory: SharedMemory) -> Self {
        Self::over(MemoryMap::whole(memory))
    }

    /// An IOMMU over the regions of `memory`.
    pub fn over(memory: MemoryMap) -> Self {
        Self {
            memory,
            directories: BTreeMap::new(),
            malformed: 0,
        }
    }

    /// Tells the IOMMU where `device`'s PASID directory is (what a guest driver writes into the
    /// device's registers). Unaligned or absurd values are accepted and make every walk fail.
    pub fn set_directory(&mut self, device: u32, directory: Directory) {
        self.directories.insert(device, directory);
    }

    fn read(&mut self, gpa: u64) -> Option<u64> {
        // A table read is a read by the IOMMU: its region must allow reads.
        let [word] = self.memory.words(gpa, 1, Perm::READ)? else {
            return None;
        };
        // Acquire: pairs with the guest's release store of the entry (see `cpu_write`).
        Some(word.load(std::sync::atomic::Ordering::Acquire))
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
            Walk::Pte(pte) => stage2(&self.memory, pte.gpa + iova % PAGE_SIZE, access),
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

/// The IOMMU of a device whose VMM keeps no page tables (no PASID directory): requests
/// without PASID translate one to one, IOVA = guest-physical address, through the regions of
/// guest memory, as stage-2-only translation with I/O page faults. A page is not present until
/// the device asked for it with a page request and the answer was `Success`; then it is
/// present, with the permission of its region, until [`unmap`](Self::unmap) of its range or
/// [`reset`](Self::reset). Requests with a PASID have no address space.
#[derive(Debug)]
pub struct DirectIommu {
    device: u32,
    memory: MemoryMap,
    /// Pages (by number) answered `Success`.
    present: BTreeSet<u64>,
    /// Pages asked for by each group in flight (by PRG index).
    asked: BTreeMap<u16, Vec<u64>>,
}

impl DirectIommu {
    /// The IOMMU of `device`, over `memory`, with no page present.
    pub fn new(device: u32, memory: MemoryMap) -> Self {
        Self {
            device,
            memory,
            present: BTreeSet::new(),
            asked: BTreeMap::new(),
        }
    }

    /// Replaces the regions (a mapping came or went), keeping the pages present. The caller
    /// [`unmap`](Self::unmap)s the ranges that went away.
    pub fn set_map(&mut self, memory: MemoryMap) {
        self.memory = memory;
    }

    /// The device sent a page request for the page at `addr` in group `grpid` (without PASID:
    /// requests with one are not this IOMMU's).
    pub fn page_requested(&mut self, pasid: Option<Pasid>, grpid: PrgIndex, addr: u64) {
        if pasid.is_none() {
            self.asked
                .entry(grpid.get())
                .or_default()
                .push(addr / PAGE_SIZE);
        }
    }

    /// The answer to group `grpid` reached the device: with `Success`, its pages are present.
    pub fn page_response(&mut self, pasid: Option<Pasid>, grpid: PrgIndex, code: ResponseCode) {
        if pasid.is_some() {
            return;
        }
        if let Some(pages) = self.asked.remove(&grpid.get())
            && code == ResponseCode::Success
        {
            self.present.extend(pages);
        }
    }

    /// Forgets the pages present in `gpa .. gpa + len` (their mapping went away).
    pub fn unmap(&mut self, gpa: u64, len: u64) {
        let first = gpa / PAGE_SIZE;
        let end = gpa.saturating_add(len).div_ceil(PAGE_SIZE);
        let gone: Vec<u64> = self.present.range(first..end).copied().collect();
        for page in gone {
            self.present.remove(&page);
        }
    }

    /// A device reset: no page is present, no group in flight.
    pub fn reset(&mut self) {
        self.present.clear();
        self.asked.clear();
    }

    /// Pages present now.
    pub fn present(&self) -> usize {
        self.present.len()
    }
}

impl Translate for DirectIommu {
    fn translate(&mut self, space: SpaceId, iova: u64, access: Perm) -> Translation {
        if space.0 != self.device || space.1.is_some() {
            return Translation::NoAddressSpace;
        }
        if !self.present.contains(&(iova / PAGE_SIZE)) {
            return Translation::Miss;
        }
        stage2(&self.memory, iova, access)
    }
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
