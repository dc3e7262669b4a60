//! PCI configuration space for a vfio-user device: the type 0 header, the PCI Express
//! capability, and the ATS, PASID and PRI extended capabilities, with the write semantics of
//! each register (`docs/PROTOCOL.md` §4.8 gives every layout and bit).
//!
//! [`ConfigSpaceBuilder`] lays the capabilities out: the PCI Express capability at 0x40 on the
//! capability list (pointer at 0x34), the extended capabilities chained from 0x100 in the order
//! ATS, PASID, PRI. Extended capabilities need the PCI Express capability and the 4 KiB
//! extended configuration space, so [`ConfigSpace`] is always [`CONFIG_SPACE_SIZE`] bytes.
//!
//! Writes follow each register's access type: read-only bits ignore writes, RW1C bits clear
//! where a 1 is written, read-write bits take the value. Beyond that:
//!
//! - PRI Control's Reset bit acts only while PRI Enable is 0 (the device forgets its
//!   outstanding page requests) and always reads 0; Enable going from 0 to 1 clears Response
//!   Failure and Unexpected PRG Index.
//! - PRI Outstanding Page Request Allocation ignores writes while PRI Enable is 1.
//! - With a [`FaultPort`] connected ([`ConfigSpace::connect_pri`]), the PRI Status register
//!   shows the device's state: Response Failure once a `Failure` response arrived (writing 1
//!   clears it), and Stopped while the device sends no page request and none is outstanding:
//!   PRI Enable is 0, a Response Failure halted it, or no VMM handler is registered.
//!
//! ```
//! use iopf_host::config_space::{ConfigSpaceBuilder, ext_cap, pri};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = ConfigSpaceBuilder::new(0x1b36, 0x10f1)
//!     .bar32(0, 4096)
//!     .express_endpoint()
//!     .ats(0, true)
//!     .pasid(20, false, false)
//!     .pri(32, false)
//!     .build()?;
//! let at = config.find_extended_capability(ext_cap::PRI).ok_or("no PRI")?;
//! // The VMM grants 16 outstanding requests, then enables PRI.
//! config.write(u64::from(at + pri::ALLOCATION), &16u32.to_le_bytes())?;
//! config.write(u64::from(at + pri::CONTROL), &pri::CONTROL_ENABLE.to_le_bytes())?;
//! assert!(config.pri_enabled());
//! assert_eq!(config.pri_allocation(), 16);
//! # Ok(())
//! # }
//! ```

use iopf_vfio_user::Errno;
use thiserror::Error;

use crate::fault_regions::FaultPort;

/// Size of a PCI Express function's configuration space (with the extended space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Where the extended capabilities start.
pub const EXTENDED_START: u16 = 0x100;

/// Offsets and bits of the type 0 header.
pub mod header {
    /// Vendor ID (16 bits, read-only).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits, read-only).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Command bits software may write: Memory Space, Bus Master, Parity Error Response,
    /// `SERR#` Enable, Interrupt Disable.
    pub const COMMAND_WRITABLE: u16 = 0x0546;
    /// Command: Memory Space Enable.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// Command: Bus Master Enable.
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    /// Status (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Status: Capabilities List (read-only).
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Status bits that are RW1C (the error bits).
    pub const STATUS_RW1C: u16 = 0xf900;
    /// Revision ID (8 bits); the class code follows in the next three bytes.
    pub const REVISION: u16 = 0x08;
    /// Header Type (8 bits): 0.
    pub const HEADER_TYPE: u16 = 0x0e;
    /// BAR 0; BARs 1 to 5 follow, 4 bytes each.
    pub const BAR0: u16 = 0x10;
    /// Subsystem Vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Capabilities Pointer (8 bits).
    pub const CAP_POINTER: u16 = 0x34;
    /// Interrupt Line (8 bits, read-write).
    pub const INTERRUPT_LINE: u16 = 0x3c;
}

/// The PCI Express capability (ID 0x10, version 2, 60 bytes).
pub mod express {
    /// Capability ID.
    pub const ID: u8 = 0x10;
    /// Where the builder puts it.
    pub const OFFSET: u16 = 0x40;
    /// Size of a version 2 capability.
    pub const SIZE: u16 = 0x3c;
    /// PCI Express Capabilities register (16 bits): version bits 3:0, device/port type 7:4.
    pub const CAPABILITIES: u16 = 0x02;
    /// Device/port type: PCI Express Endpoint.
    pub const TYPE_ENDPOINT: u16 = 0x0;
    /// Device Capabilities (32 bits); bit 15 Role-Based Error Reporting.
    pub const DEVICE_CAPABILITIES: u16 = 0x04;
    /// Device Control (16 bits).
    pub const DEVICE_CONTROL: u16 = 0x08;
    /// Device Control bits software may write: the error reporting enables, Relaxed
    /// Ordering, Max Payload Size, Extended Tag, No Snoop, Max Read Request Size.
    pub const DEVICE_CONTROL_WRITABLE: u16 = 0x79ff;
    /// Device Control at reset: Relaxed Ordering and No Snoop enabled, Max Read Request 512.
    pub const DEVICE_CONTROL_RESET: u16 = 0x2810;
    /// Device Status (16 bits); bits 3:0 are RW1C.
    pub const DEVICE_STATUS: u16 = 0x0a;
    /// Link Capabilities (32 bits): 2.5 GT/s, x1.
    pub const LINK_CAPABILITIES: u16 = 0x0c;
    /// Link Status (16 bits): 2.5 GT/s, x1.
    pub const LINK_STATUS: u16 = 0x12;
}

/// Extended capability IDs.
pub mod ext_cap {
    /// Address Translation Services.
    pub const ATS: u16 = 0x000f;
    /// Page Request Interface.
    pub const PRI: u16 = 0x0013;
    /// Process Address Space ID.
    pub const PASID: u16 = 0x001b;
}

/// The ATS extended capability (8 bytes).
pub mod ats {
    /// Size.
    pub const SIZE: u16 = 8;
    /// ATS Capability (16 bits, read-only): Invalidate Queue Depth bits 4:0 (0 means 32),
    /// Page Aligned Request bit 5.
    pub const CAPABILITY: u16 = 0x04;
    /// ATS Capability: Page Aligned Request.
    pub const CAPABILITY_PAGE_ALIGNED: u16 = 1 << 5;
    /// ATS Control (16 bits, read-write): Smallest Translation Unit bits 4:0, Enable bit 15.
    pub const CONTROL: u16 = 0x06;
    /// ATS Control: Enable.
    pub const CONTROL_ENABLE: u16 = 1 << 15;
    /// ATS Control: the Smallest Translation Unit field (2^(12 + STU) bytes).
    pub const CONTROL_STU: u16 = 0x1f;
}

/// The PASID extended capability (8 bytes).
pub mod pasid {
    /// Size.
    pub const SIZE: u16 = 8;
    /// PASID Capability (16 bits, read-only): Execute Permission Supported bit 1, Privileged
    /// Mode Supported bit 2, Max PASID Width bits 12:8.
    pub const CAPABILITY: u16 = 0x04;
    /// PASID Capability: Execute Permission Supported.
    pub const CAPABILITY_EXEC: u16 = 1 << 1;
    /// PASID Capability: Privileged Mode Supported.
    pub const CAPABILITY_PRIV: u16 = 1 << 2;
    /// PASID Control (16 bits): PASID Enable bit 0, Execute Permission Enable bit 1,
    /// Privileged Mode Enable bit 2 (each writable only where supported).
    pub const CONTROL: u16 = 0x06;
    /// PASID Control: PASID Enable.
    pub const CONTROL_ENABLE: u16 = 1 << 0;
    /// PASID Control: Execute Permission Enable.
    pub const CONTROL_EXEC: u16 = 1 << 1;
    /// PASID Control: Privileged Mode Enable.
    pub const CONTROL_PRIV: u16 = 1 << 2;
}

/// The PRI extended capability (16 bytes).
pub mod pri {
    /// Size.
    pub const SIZE: u16 = 16;
    /// PRI Control (16 bits): Enable bit 0, Reset bit 1.
    pub const CONTROL: u16 = 0x04;
    /// PRI Control: Enable.
    pub const CONTROL_ENABLE: u16 = 1 << 0;
    /// PRI Control: Reset (acts only while Enable is 0; reads 0).
    pub const CONTROL_RESET: u16 = 1 << 1;
    /// PRI Status (16 bits).
    pub const STATUS: u16 = 0x06;
    /// PRI Status: Response Failure (RW1C).
    pub const STATUS_RESPONSE_FAILURE: u16 = 1 << 0;
    /// PRI Status: Unexpected Page Request Group Index (RW1C).
    pub const STATUS_UPRGI: u16 = 1 << 1;
    /// PRI Status: Stopped (read-only).
    pub const STATUS_STOPPED: u16 = 1 << 8;
    /// PRI Status: PRG Response PASID Required (read-only).
    pub const STATUS_PASID_REQUIRED: u16 = 1 << 15;
    /// Outstanding Page Request Capacity (32 bits, read-only).
    pub const CAPACITY: u16 = 0x08;
    /// Outstanding Page Request Allocation (32 bits, read-write while Enable is 0).
    pub const ALLOCATION: u16 = 0x0c;
}

/// Why a configuration space could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigSpaceError {
    /// Extended capabilities were asked for without the PCI Express capability.
    #[error("extended capabilities need the PCI Express capability")]
    NotExpress,
    /// A BAR index above 5, or a size that is not a power of two of at least 16 bytes.
    #[error("BAR {index} of {size} bytes is not a 32-bit memory BAR")]
    Bar {
        /// The BAR's index.
        index: u8,
        /// Its size.
        size: u32,
    },
    /// An ATS Invalidate Queue Depth above 31.
    #[error("ATS invalidate queue depth {0} does not fit in 5 bits")]
    QueueDepth(u8),
    /// A Max PASID Width above 20.
    #[error("PASID width {0} is above 20 bits")]
    PasidWidth(u8),
}

/// What a configuration space is built from.
#[derive(Debug, Clone)]
pub struct ConfigSpaceBuilder {
    vendor_id: u16,
    device_id: u16,
    class_code: u32,
    bars: Vec<(u8, u32)>,
    express: bool,
    ats: Option<(u8, bool)>,
    pasid: Option<(u8, bool, bool)>,
    pri: Option<(u32, bool)>,
}

impl ConfigSpaceBuilder {
    /// A function with these IDs (also its subsystem IDs), class code 0xff0000 (unassigned),
    /// no BAR and no capability.
    pub fn new(vendor_id: u16, device_id: u16) -> Self {
        Self {
            vendor_id,
            device_id,
            class_code: 0xff_0000,
            bars: Vec::new(),
            express: false,
            ats: None,
            pasid: None,
            pri: None,
        }
    }

    /// The class code (24 bits: class, subclass, programming interface).
    pub fn class_code(mut self, class_code: u32) -> Self {
        self.class_code = class_code & 0xff_ffff;
        self
    }

    /// A 32-bit non-prefetchable memory BAR of `size` bytes (a power of two, at least 16):
    /// software sizes it by writing all ones and reading back.
    pub fn bar32(mut self, index: u8, size: u32) -> Self {
        self.bars.push((index, size));
        self
    }

    /// The PCI Express capability (version 2) of an Endpoint.
    pub fn express_endpoint(mut self) -> Self {
        self.express = true;
        self
    }

    /// The ATS extended capability: `queue_depth` invalidations (0 means 32), and whether
    /// translation requests are page aligned.
    pub fn ats(mut self, queue_depth: u8, page_aligned: bool) -> Self {
        self.ats = Some((queue_depth, page_aligned));
        self
    }

    /// The PASID extended capability: PASIDs of `max_width` bits (at most 20), and whether
    /// the Execute and Privileged permissions are supported.
    pub fn pasid(mut self, max_width: u8, exec: bool, privileged: bool) -> Self {
        self.pasid = Some((max_width, exec, privileged));
        self
    }

    /// The PRI extended capability: `capacity` outstanding page requests, and whether PRG
    /// responses must carry the request's PASID.
    pub fn pri(mut self, capacity: u32, pasid_required: bool) -> Self {
        self.pri = Some((capacity, pasid_required));
        self
    }

    /// Lays the configuration space out.
    pub fn build(self) -> Result<ConfigSpace, ConfigSpaceError> {
        let extended = self.ats.is_some() || self.pasid.is_some() || self.pri.is_some();
        if extended && !self.express {
            return Err(ConfigSpaceError::NotExpress);
        }
        let mut c = ConfigSpace {
            bytes: vec![0; CONFIG_SPACE_SIZE],
            writable: vec![0; CONFIG_SPACE_SIZE],
            clear: vec![0; CONFIG_SPACE_SIZE],
            ats: None,
            pasid: None,
            pri: None,
            port: None,
            reset_image: Vec::new(),
        };
        c.set16(header::VENDOR_ID, self.vendor_id);
        c.set16(header::DEVICE_ID, self.device_id);
        c.set16(header::SUBSYSTEM_VENDOR_ID, self.vendor_id);
        c.set16(header::SUBSYSTEM_ID, self.device_id);
        c.set32(header::REVISION, self.class_code << 8);
        c.mask16(header::COMMAND, header::COMMAND_WRITABLE);
        c.clear16(header::STATUS, header::STATUS_RW1C);
        c.writable[usize::from(header::INTERRUPT_LINE)] = 0xff;
        for (index, size) in self.bars {
            if index > 5 || size < 16 || !size.is_power_of_two() {
                return Err(ConfigSpaceError::Bar { index, size });
            }
            c.mask32(header::BAR0 + 4 * u16::from(index), !(size - 1) & !0xf);
        }
        if self.express {
            let at = express::OFFSET;
            c.set16(header::STATUS, header::STATUS_CAP_LIST);
            c.bytes[usize::from(header::CAP_POINTER)] = at as u8;
            c.bytes[usize::from(at)] = express::ID;
            c.set16(at + express::CAPABILITIES, 2 | express::TYPE_ENDPOINT << 4);
            c.set32(at + express::DEVICE_CAPABILITIES, 1 << 15);
            c.set16(at + express::DEVICE_CONTROL, express::DEVICE_CONTROL_RESET);
            c.mask16(
                at + express::DEVICE_CONTROL,
                express::DEVICE_CONTROL_WRITABLE,
            );
            c.clear16(at + express::DEVICE_STATUS, 0x000f);
            c.set32(at + express::LINK_CAPABILITIES, 0x11);
            c.set16(at + express::LINK_STATUS, 0x11);
        }
        let mut next = EXTENDED_START;
        let mut previous: Option<u16> = None;
        let mut chain = |c: &mut ConfigSpace, id: u16, size: u16| -> u16 {
            let at = next;
            if let Some(p) = previous {
                let header = c.get32(p) | u32::from(at) << 20;
                c.set32(p, header);
            }
            c.set32(at, u32::from(id) | 1 << 16);
            previous = Some(at);
            next += size;
            at
        };
        if let Some((depth, aligned)) = self.ats {
            if depth > 31 {
                return Err(ConfigSpaceError::QueueDepth(depth));
            }
            let at = chain(&mut c, ext_cap::ATS, ats::SIZE);
            let aligned = if aligned {
                ats::CAPABILITY_PAGE_ALIGNED
            } else {
                0
            };
            c.set16(at + ats::CAPABILITY, u16::from(depth) | aligned);
            c.mask16(at + ats::CONTROL, ats::CONTROL_ENABLE | ats::CONTROL_STU);
            c.ats = Some(at);
        }
        if let Some((width, exec, privileged)) = self.pasid {
            if width > 20 {
                return Err(ConfigSpaceError::PasidWidth(width));
            }
            let at = chain(&mut c, ext_cap::PASID, pasid::SIZE);
            let mut cap = u16::from(width) << 8;
            let mut control = pasid::CONTROL_ENABLE;
            if exec {
                cap |= pasid::CAPABILITY_EXEC;
                control |= pasid::CONTROL_EXEC;
            }
            if privileged {
                cap |= pasid::CAPABILITY_PRIV;
                control |= pasid::CONTROL_PRIV;
            }
            c.set16(at + pasid::CAPABILITY, cap);
            c.mask16(at + pasid::CONTROL, control);
            c.pasid = Some(at);
        }
        if let Some((capacity, pasid_required)) = self.pri {
            let at = chain(&mut c, ext_cap::PRI, pri::SIZE);
            c.mask16(at + pri::CONTROL, pri::CONTROL_ENABLE | pri::CONTROL_RESET);
            c.clear16(
                at + pri::STATUS,
                pri::STATUS_RESPONSE_FAILURE | pri::STATUS_UPRGI,
            );
            let required = if pasid_required {
                pri::STATUS_PASID_REQUIRED
            } else {
                0
            };
            c.set16(at + pri::STATUS, pri::STATUS_STOPPED | required);
            c.set32(at + pri::CAPACITY, capacity);
            c.mask32(at + pri::ALLOCATION, u32::MAX);
            c.pri = Some(at);
        }
        c.reset_image = c.bytes.clone();
        Ok(c)
    }
}

/// A function's configuration space: its bytes, which bits software may write, and the
/// device state behind the PRI capability's status.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    /// Bits software may write (read-write).
    writable: Vec<u8>,
    /// Bits a written 1 clears (RW1C).
    clear: Vec<u8>,
    ats: Option<u16>,
    pasid: Option<u16>,
    pri: Option<u16>,
    port: Option<FaultPort>,
    /// The bytes right after the build: what a function-level reset restores.
    reset_image: Vec<u8>,
}

fn range(offset: u64, len: usize) -> Result<std::ops::Range<usize>, Errno> {
    let start = usize::try_from(offset).map_err(|_| Errno::EINVAL)?;
    let end = start.checked_add(len).ok_or(Errno::EINVAL)?;
    if end > CONFIG_SPACE_SIZE {
        return Err(Errno::EINVAL);
    }
    Ok(start..end)
}

impl ConfigSpace {
    /// Its size in bytes (the config region's size): [`CONFIG_SPACE_SIZE`].
    pub fn len(&self) -> u64 {
        CONFIG_SPACE_SIZE as u64
    }

    /// Never empty; for symmetry with [`len`](Self::len).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Shows the device's PRI state (Response Failure, Stopped) in the PRI Status register,
    /// and lets PRI Status and Control writes reach the device: clearing Response Failure,
    /// a PRI Reset forgetting its outstanding requests.
    pub fn connect_pri(&mut self, port: &FaultPort) {
        self.port = Some(port.clone());
    }

    /// Reads `data.len()` bytes at `offset`. Outside the 4 KiB: `EINVAL`.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        let r = range(offset, data.len())?;
        data.copy_from_slice(&self.bytes[r.clone()]);
        if let Some(at) = self.pri {
            let status = usize::from(at + pri::STATUS);
            let value = self.pri_status().to_le_bytes();
            for (i, byte) in value.iter().enumerate() {
                if r.contains(&(status + i)) {
                    data[status + i - r.start] = *byte;
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`, each bit as its register's access type says. Outside the
    /// 4 KiB: `EINVAL`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let r = range(offset, data.len())?;
        let pri_before = self.pri.map(|at| {
            (
                self.get16(at + pri::CONTROL),
                self.get32(at + pri::ALLOCATION),
            )
        });
        for (i, value) in r.clone().zip(data) {
            let old = self.bytes[i];
            let new = (old & !self.writable[i]) | (value & self.writable[i]);
            self.bytes[i] = new & !(value & self.clear[i]);
        }
        if let (Some(at), Some((control, allocation))) = (self.pri, pri_before) {
            self.pri_written(at, &r, data, control, allocation);
        }
        Ok(())
    }

    /// The PRI side effects of a write that covered `r` (`data` its bytes), given PRI
    /// Control and Allocation before it.
    fn pri_written(
        &mut self,
        at: u16,
        r: &std::ops::Range<usize>,
        data: &[u8],
        control_before: u16,
        allocation_before: u32,
    ) {
        let was_enabled = control_before & pri::CONTROL_ENABLE != 0;
        if was_enabled {
            self.set32(at + pri::ALLOCATION, allocation_before);
        }
        let control = self.get16(at + pri::CONTROL);
        let enabled = control & pri::CONTROL_ENABLE != 0;
        if control & pri::CONTROL_RESET != 0 {
            self.set16(at + pri::CONTROL, control & !pri::CONTROL_RESET);
            if !enabled && let Some(port) = &self.port {
                port.forget_outstanding();
            }
        }
        let status = usize::from(at + pri::STATUS);
        let failure_cleared =
            r.contains(&status) && data[status - r.start] & pri::STATUS_RESPONSE_FAILURE as u8 != 0;
        if enabled && !was_enabled {
            let s = self.get16(at + pri::STATUS);
            self.set16(
                at + pri::STATUS,
                s & !(pri::STATUS_UPRGI | pri::STATUS_RESPONSE_FAILURE),
            );
        }
        if (failure_cleared || (enabled && !was_enabled))
            && let Some(port) = &self.port
        {
            port.clear_response_failure();
        }
    }

    /// The PRI Status register as software reads it.
    fn pri_status(&self) -> u16 {
        let Some(at) = self.pri else { return 0 };
        let stored = self.get16(at + pri::STATUS);
        let Some(port) = &self.port else {
            return stored;
        };
        let keep = stored & (pri::STATUS_UPRGI | pri::STATUS_PASID_REQUIRED);
        let failure = port.response_failure();
        let sending = self.pri_enabled() && !failure && port.is_registered();
        let stopped = !sending && port.outstanding_groups() == 0;
        keep | if failure {
            pri::STATUS_RESPONSE_FAILURE
        } else {
            0
        } | if stopped { pri::STATUS_STOPPED } else { 0 }
    }

    /// A function-level reset: every register back to its value after the build (PRI, PASID
    /// and ATS disabled, the command register 0); the device forgets its outstanding page
    /// requests.
    pub fn reset(&mut self) {
        self.bytes.clone_from(&self.reset_image);
        if let Some(port) = &self.port {
            port.forget_outstanding();
            port.clear_response_failure();
        }
    }

    /// The offset of the capability `id` on the capability list.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        if self.get16(header::STATUS) & header::STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut at = u16::from(self.bytes[usize::from(header::CAP_POINTER)]);
        // At most 48 capabilities fit in the 192 bytes after the header.
        for _ in 0..48 {
            if at < 0x40 || usize::from(at) + 2 > 256 {
                return None;
            }
            if self.bytes[usize::from(at)] == id {
                return Some(at);
            }
            at = u16::from(self.bytes[usize::from(at) + 1]);
        }
        None
    }

    /// The offset of the extended capability `id`, walking the chain from 0x100.
    pub fn find_extended_capability(&self, id: u16) -> Option<u16> {
        let mut at = EXTENDED_START;
        // At most 960 headers fit in the extended space.
        for _ in 0..960 {
            if at < EXTENDED_START || usize::from(at) + 4 > CONFIG_SPACE_SIZE {
                return None;
            }
            let header = self.get32(at);
            if header == 0 {
                return None;
            }
            if header & 0xffff == u32::from(id) {
                return Some(at);
            }
            at = (header >> 20) as u16 & !3;
            if at == 0 {
                return None;
            }
        }
        None
    }

    /// Whether the Command register's Bus Master Enable is set.
    pub fn bus_master(&self) -> bool {
        self.get16(header::COMMAND) & header::COMMAND_BUS_MASTER != 0
    }

    /// Whether PRI Enable is set (false without the PRI capability).
    pub fn pri_enabled(&self) -> bool {
        self.pri
            .is_some_and(|at| self.get16(at + pri::CONTROL) & pri::CONTROL_ENABLE != 0)
    }

    /// The page requests the device may have outstanding: the Allocation software wrote,
    /// at most the Capacity (0 without the PRI capability).
    pub fn pri_allocation(&self) -> u32 {
        self.pri.map_or(0, |at| {
            self.get32(at + pri::ALLOCATION)
                .min(self.get32(at + pri::CAPACITY))
        })
    }

    /// Whether PASID Enable is set (false without the PASID capability).
    pub fn pasid_enabled(&self) -> bool {
        self.pasid
            .is_some_and(|at| self.get16(at + pasid::CONTROL) & pasid::CONTROL_ENABLE != 0)
    }

    /// Whether ATS Enable is set (false without the ATS capability).
    pub fn ats_enabled(&self) -> bool {
        self.ats
            .is_some_and(|at| self.get16(at + ats::CONTROL) & ats::CONTROL_ENABLE != 0)
    }

    /// The ATS Smallest Translation Unit: translations cover at least 2^(12 + STU) bytes.
    pub fn ats_stu(&self) -> u8 {
        self.ats.map_or(0, |at| {
            (self.get16(at + ats::CONTROL) & ats::CONTROL_STU) as u8
        })
    }

    fn get16(&self, at: u16) -> u16 {
        let i = usize::from(at);
        u16::from_le_bytes([self.bytes[i], self.bytes[i + 1]])
    }

    fn get32(&self, at: u16) -> u32 {
        let i = usize::from(at);
        u32::from_le_bytes([
            self.bytes[i],
            self.bytes[i + 1],
            self.bytes[i + 2],
            self.bytes[i + 3],
        ])
    }

    fn set16(&mut self, at: u16, value: u16) {
        let i = usize::from(at);
        self.bytes[i..i + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set32(&mut self, at: u16, value: u32) {
        let i = usize::from(at);
        self.bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn mask16(&mut self, at: u16, mask: u16) {
        let i = usize::from(at);
        self.writable[i..i + 2].copy_from_slice(&mask.to_le_bytes());
    }

    fn mask32(&mut self, at: u16, mask: u32) {
        let i = usize::from(at);
        self.writable[i..i + 4].copy_from_slice(&mask.to_le_bytes());
    }

    fn clear16(&mut self, at: u16, mask: u16) {
        let i = usize::from(at);
        self.clear[i..i + 2].copy_from_slice(&mask.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use iopf_abi::{Fault, PageResponse, ResponseCode, ResponseRecord};
    use iopf_core::{DeviceConfig, DeviceId, FaultCore, MonotonicClock};
    use iopf_queue::{Doorbell, FaultChannel, SharedMemoryChannel};
    use iopf_vfio_user::device::{DMA_FAULT_REGION_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX};

    use super::*;
    use crate::fault_regions::FaultRegions;
    use crate::test_support::page_request;

    fn full() -> ConfigSpace {
        ConfigSpaceBuilder::new(0x1b36, 0x10f1)
            .bar32(0, 4096)
            .express_endpoint()
            .ats(0, true)
            .pasid(20, true, false)
            .pri(32, true)
            .build()
            .unwrap()
    }

    fn read16(c: &ConfigSpace, at: u16) -> u16 {
        let mut b = [0; 2];
        c.read(u64::from(at), &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    fn read32(c: &ConfigSpace, at: u16) -> u32 {
        let mut b = [0; 4];
        c.read(u64::from(at), &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn write16(c: &mut ConfigSpace, at: u16, v: u16) {
        c.write(u64::from(at), &v.to_le_bytes()).unwrap();
    }

    fn write32(c: &mut ConfigSpace, at: u16, v: u32) {
        c.write(u64::from(at), &v.to_le_bytes()).unwrap();
    }

    // Catches: a chain a VMM cannot walk (wrong IDs, versions, next pointers), or a header
    // that does not announce the capability list.
    #[test]
    fn the_capabilities_are_walkable_from_their_pointers() {
        let c = full();
        assert_eq!(c.len(), 4096);
        assert_eq!(read16(&c, 0), 0x1b36);
        assert_eq!(read16(&c, 2), 0x10f1);
        assert_ne!(read16(&c, header::STATUS) & header::STATUS_CAP_LIST, 0);
        assert_eq!(c.find_capability(express::ID), Some(0x40));
        assert_eq!(read16(&c, 0x42) & 0xf, 2, "PCIe capability version 2");
        // The extended chain, by hand: ID, version 1, next.
        let mut at = EXTENDED_START;
        let mut seen = Vec::new();
        while at != 0 {
            let h = read32(&c, at);
            assert_eq!((h >> 16) & 0xf, 1, "version of {h:#x}");
            seen.push((at, (h & 0xffff) as u16));
            at = (h >> 20) as u16;
        }
        assert_eq!(
            seen,
            [
                (0x100, ext_cap::ATS),
                (0x108, ext_cap::PASID),
                (0x110, ext_cap::PRI)
            ]
        );
        assert_eq!(c.find_extended_capability(ext_cap::PRI), Some(0x110));
        assert_eq!(read32(&c, 0x110 + pri::CAPACITY), 32);
        assert_eq!(
            read16(&c, 0x108 + pasid::CAPABILITY),
            20 << 8 | pasid::CAPABILITY_EXEC
        );
        let status = read16(&c, 0x110 + pri::STATUS);
        assert_eq!(status, pri::STATUS_STOPPED | pri::STATUS_PASID_REQUIRED);
    }

    #[test]
    fn extended_capabilities_need_pci_express_and_sane_values() {
        let e = ConfigSpaceBuilder::new(1, 2)
            .pri(1, false)
            .build()
            .unwrap_err();
        assert_eq!(e, ConfigSpaceError::NotExpress);
        let e = ConfigSpaceBuilder::new(1, 2)
            .bar32(0, 100)
            .build()
            .unwrap_err();
        assert!(matches!(e, ConfigSpaceError::Bar { .. }));
        let e = ConfigSpaceBuilder::new(1, 2)
            .express_endpoint()
            .pasid(21, false, false)
            .build()
            .unwrap_err();
        assert_eq!(e, ConfigSpaceError::PasidWidth(21));
        // Without extended capabilities, 0x100 holds the empty header.
        let c = ConfigSpaceBuilder::new(1, 2)
            .express_endpoint()
            .build()
            .unwrap();
        assert_eq!(read32(&c, 0x100), 0);
        assert_eq!(c.find_extended_capability(ext_cap::ATS), None);
    }

    // Catches: read-only registers that take writes (IDs, capability headers, Capacity,
    // Stopped, PASID Required), or unsupported PASID modes that can be enabled.
    #[test]
    fn read_only_bits_ignore_writes() {
        let mut c = full();
        let before = {
            let mut b = vec![0; 4096];
            c.read(0, &mut b).unwrap();
            b
        };
        write32(&mut c, 0, 0xffff_ffff);
        write32(&mut c, 0x40, 0xffff_ffff);
        write32(&mut c, 0x100, 0xffff_ffff);
        write32(&mut c, 0x110, 0xffff_ffff);
        write32(&mut c, 0x110 + pri::CAPACITY, 0);
        write16(&mut c, 0x100 + ats::CAPABILITY, 0xffff);
        write16(&mut c, 0x108 + pasid::CAPABILITY, 0);
        let mut after = vec![0; 4096];
        c.read(0, &mut after).unwrap();
        assert_eq!(before, after);
        // Status: Stopped and PASID Required are read-only, writing them changes nothing.
        write16(&mut c, 0x110 + pri::STATUS, 0xffff);
        assert_eq!(
            read16(&c, 0x110 + pri::STATUS),
            pri::STATUS_STOPPED | pri::STATUS_PASID_REQUIRED
        );
        // PASID: Execute is supported, Privileged is not.
        write16(&mut c, 0x108 + pasid::CONTROL, 0xffff);
        assert_eq!(
            read16(&c, 0x108 + pasid::CONTROL),
            pasid::CONTROL_ENABLE | pasid::CONTROL_EXEC
        );
        assert!(c.pasid_enabled());
        // Outside the 4 KiB.
        assert_eq!(c.write(4094, &[0; 4]), Err(Errno::EINVAL));
        assert_eq!(c.read(4096, &mut [0; 1]), Err(Errno::EINVAL));
    }

    // Catches: a BAR a VMM cannot size, enables that do not stick, a Reset that reads back.
    #[test]
    fn writable_registers_take_effect() {
        let mut c = full();
        write32(&mut c, header::BAR0, 0xffff_ffff);
        assert_eq!(read32(&c, header::BAR0), 0xffff_f000, "4 KiB BAR sizes");
        write16(&mut c, header::COMMAND, 0xffff);
        assert_eq!(read16(&c, header::COMMAND), header::COMMAND_WRITABLE);
        assert!(c.bus_master());
        write16(&mut c, 0x100 + ats::CONTROL, ats::CONTROL_ENABLE | 3);
        assert!(c.ats_enabled());
        assert_eq!(c.ats_stu(), 3);
        write32(&mut c, 0x110 + pri::ALLOCATION, 16);
        write16(&mut c, 0x110 + pri::CONTROL, pri::CONTROL_ENABLE);
        assert!(c.pri_enabled());
        assert_eq!(c.pri_allocation(), 16);
        // Allocation is fixed while PRI is enabled.
        write32(&mut c, 0x110 + pri::ALLOCATION, 8);
        assert_eq!(c.pri_allocation(), 16);
        // More than the capacity counts as the capacity.
        write16(&mut c, 0x110 + pri::CONTROL, 0);
        write32(&mut c, 0x110 + pri::ALLOCATION, 1000);
        assert_eq!(c.pri_allocation(), 32);
        write16(&mut c, 0x110 + pri::CONTROL, pri::CONTROL_RESET);
        assert_eq!(read16(&c, 0x110 + pri::CONTROL), 0, "Reset reads 0");
        // A function-level reset disables everything again.
        write16(&mut c, 0x110 + pri::CONTROL, pri::CONTROL_ENABLE);
        c.reset();
        assert!(!c.pri_enabled() && !c.ats_enabled() && !c.bus_master());
    }

    // Catches: a PRI Status that does not follow the device: Stopped while it sends,
    // Response Failure that never shows or cannot be cleared, a Reset that keeps requests.
    #[test]
    fn pri_status_follows_the_device_through_the_component() {
        let core = Arc::new(FaultCore::new(Arc::new(MonotonicClock::new())));
        let config = DeviceConfig {
            allow_failure: true,
            ..DeviceConfig::default()
        };
        let port = FaultPort::add(core.clone(), DeviceId(1), config).unwrap();
        let mut c = full();
        c.connect_pri(&port);
        let status = |c: &ConfigSpace| read16(c, 0x110 + pri::STATUS);
        write16(&mut c, 0x110 + pri::CONTROL, pri::CONTROL_ENABLE);
        // Enabled, but no VMM handler: stopped.
        assert_ne!(status(&c) & pri::STATUS_STOPPED, 0);
        let regions = FaultRegions::attach(&port, 64).unwrap();
        assert_eq!(
            status(&c) & pri::STATUS_STOPPED,
            0,
            "enabled with a handler"
        );
        // The VMM's side of the queues, in process.
        let fd = |i| regions.region_fd(i).unwrap().try_clone_to_owned().unwrap();
        let mut vmm = SharedMemoryChannel::from_fds(
            1,
            fd(DMA_FAULT_REGION_INDEX),
            fd(DMA_FAULT_RESPONSE_REGION_INDEX),
            Doorbell::new().unwrap(),
            None,
        )
        .unwrap();
        port.report(&page_request(1, true)).unwrap();
        assert_eq!(port.outstanding_groups(), 1);
        write16(&mut c, 0x110 + pri::CONTROL, 0);
        assert_eq!(
            status(&c) & pri::STATUS_STOPPED,
            0,
            "disabled, one outstanding"
        );
        write16(&mut c, 0x110 + pri::CONTROL, pri::CONTROL_ENABLE);
        // The guest answers Failure: Response Failure shows, and the device stops.
        let mut faults = Vec::new();
        vmm.read(16, &mut |f| faults.push(f.fault.unwrap()))
            .unwrap();
        let [Fault::PageRequest(r)] = faults[..] else {
            panic!("{faults:?}")
        };
        vmm.respond(&[ResponseRecord::from(&PageResponse::answering(
            &r,
            ResponseCode::Failure,
        ))])
        .unwrap();
        port.process_responses().unwrap();
        let mut answers = Vec::new();
        assert_eq!(port.drain_responses(&mut answers), 1);
        assert_eq!(answers[0].code, ResponseCode::Failure);
        assert_eq!(port.outstanding_groups(), 0);
        assert_ne!(status(&c) & pri::STATUS_RESPONSE_FAILURE, 0);
        assert_ne!(status(&c) & pri::STATUS_STOPPED, 0);
        write16(&mut c, 0x110 + pri::STATUS, pri::STATUS_RESPONSE_FAILURE);
        assert_eq!(status(&c) & pri::STATUS_RESPONSE_FAILURE, 0);
        assert!(!port.response_failure());
        // A PRI Reset while disabled forgets outstanding requests.
        port.report(&page_request(2, true)).unwrap();
        assert_eq!(port.outstanding_groups(), 1);
        write16(&mut c, 0x110 + pri::CONTROL, pri::CONTROL_RESET);
        assert_eq!(port.outstanding_groups(), 0);
        assert_ne!(status(&c) & pri::STATUS_STOPPED, 0);
        // A VMM gone: stopped even with PRI enabled.
        write16(&mut c, 0x110 + pri::CONTROL, pri::CONTROL_ENABLE);
        assert_eq!(status(&c) & pri::STATUS_STOPPED, 0);
        drop(vmm);
        regions.detach();
        assert_ne!(status(&c) & pri::STATUS_STOPPED, 0);
    }
}
