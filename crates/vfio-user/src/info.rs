//! What a device describes about itself: device info, regions with their capability list,
//! IRQ indices, and the I/O fds of a region, with the reply encoders the server uses and the
//! validating reply decoders the client uses.

use std::os::fd::{AsRawFd, BorrowedFd};

use bitflags::bitflags;
use zerocopy::IntoBytes;

use crate::protocol::{
    Command, MAX_PAYLOAD_SIZE, ProtocolError, RawCapHeader, RawCapType, RawDeviceInfo, RawIrqInfo,
    RawRegionInfo, RawRegionIoFds, RawSparseMmap, RawSparseMmapArea, RawSubRegionIoFd, read_exact,
    read_prefix,
};

/// The most regions a client accepts in a device info reply (a server announcing more is
/// refused, so that walking the regions stays bounded).
pub const MAX_REGIONS: u32 = 1024;
/// The most IRQ indices a client accepts in a device info reply.
pub const MAX_IRQS: u32 = 1024;
/// The most sub-regions a client accepts in a `GET_REGION_IO_FDS` reply.
pub const MAX_IO_FD_SUB_REGIONS: u32 = 1024;

/// Capability id of `VFIO_REGION_INFO_CAP_SPARSE_MMAP` (`<linux/vfio.h>`).
pub const VFIO_REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// Capability id of `VFIO_REGION_INFO_CAP_TYPE` (`<linux/vfio.h>`).
pub const VFIO_REGION_INFO_CAP_TYPE: u16 = 2;

/// `VFIO_USER_IO_FD_TYPE_IOEVENTFD`.
pub const VFIO_USER_IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// `VFIO_USER_IO_FD_TYPE_IOREGIONFD`.
pub const VFIO_USER_IO_FD_TYPE_IOREGIONFD: u32 = 1;
/// `KVM_IOEVENTFD_FLAG_DATAMATCH`: signal only when the written value equals `datamatch`.
pub const KVM_IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << 0;
/// `KVM_IOEVENTFD_FLAG_PIO`: a port I/O address rather than MMIO.
pub const KVM_IOEVENTFD_FLAG_PIO: u32 = 1 << 1;

const REGION_INFO_SIZE: usize = size_of::<RawRegionInfo>();

/// The `argsz` handshake of a variable-size reply: the reply never exceeds the `asked` size
/// the client offered; if the whole reply (`needed`) does not fit, the client must ask again
/// (`Ok(false)`); otherwise the reply is exactly `needed` bytes (`Ok(true)`).
fn variable_reply_complete(
    command: Command,
    payload_len: usize,
    asked: u32,
    needed: usize,
) -> Result<bool, ProtocolError> {
    if payload_len > asked as usize {
        return Err(ProtocolError::PayloadSize {
            command,
            expected: asked as usize,
            actual: payload_len,
        });
    }
    if needed > asked as usize {
        return Ok(false);
    }
    if payload_len != needed {
        return Err(ProtocolError::PayloadSize {
            command,
            expected: needed,
            actual: payload_len,
        });
    }
    Ok(true)
}

bitflags! {
    /// `struct vfio_device_info` flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DeviceFlags: u32 {
        /// `VFIO_DEVICE_FLAGS_RESET`: the device supports `VFIO_USER_DEVICE_RESET`.
        const RESET = 1 << 0;
        /// `VFIO_DEVICE_FLAGS_PCI`: a PCI device (the only kind the protocol supports).
        const PCI = 1 << 1;
        // The kernel defines more (platform, CCW, caps, ...): keep whatever a server sends.
        const _ = !0;
    }

    /// `struct vfio_region_info` flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct RegionFlags: u32 {
        /// `VFIO_REGION_INFO_FLAG_READ`: the client may read the region.
        const READ = 1 << 0;
        /// `VFIO_REGION_INFO_FLAG_WRITE`: the client may write the region.
        const WRITE = 1 << 1;
        /// `VFIO_REGION_INFO_FLAG_MMAP`: the client may `mmap` the region's fd.
        const MMAP = 1 << 2;
        /// `VFIO_REGION_INFO_FLAG_CAPS`: a capability list follows (set by the encoder).
        const CAPS = 1 << 3;
    }

    /// `struct vfio_irq_info` flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct IrqFlags: u32 {
        /// `VFIO_IRQ_INFO_EVENTFD`: the index can signal an eventfd.
        const EVENTFD = 1 << 0;
        /// `VFIO_IRQ_INFO_MASKABLE`.
        const MASKABLE = 1 << 1;
        /// `VFIO_IRQ_INFO_AUTOMASKED`.
        const AUTOMASKED = 1 << 2;
        /// `VFIO_IRQ_INFO_NORESIZE`.
        const NORESIZE = 1 << 3;
    }

    /// Access a DMA mapping grants the device (`VFIO_USER_DMA_MAP` flags).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DmaProt: u32 {
        /// The device may read the memory.
        const READ = 1 << 0;
        /// The device may write the memory.
        const WRITE = 1 << 1;
    }
}

/// The device as a whole (`VFIO_USER_DEVICE_GET_INFO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device flags; a server built on this crate always sets [`DeviceFlags::PCI`].
    pub flags: DeviceFlags,
    /// Number of regions (indices `0..num_regions`).
    pub num_regions: u32,
    /// Number of IRQ indices (`0..num_irqs`).
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// The reply payload (16 bytes, `argsz` 16).
    pub fn encode_reply(&self) -> [u8; 16] {
        let raw = RawDeviceInfo {
            argsz: size_of::<RawDeviceInfo>() as u32,
            flags: self.flags.bits(),
            num_regions: self.num_regions,
            num_irqs: self.num_irqs,
        };
        let mut bytes = [0; 16];
        bytes.copy_from_slice(raw.as_bytes());
        bytes
    }

    /// Decodes and validates a reply payload (exactly 16 bytes, at most [`MAX_REGIONS`]
    /// regions and [`MAX_IRQS`] IRQ indices).
    pub fn decode_reply(payload: &[u8]) -> Result<Self, ProtocolError> {
        let command = Command::DeviceGetInfo;
        let raw: RawDeviceInfo = read_exact(command, payload)?;
        if raw.argsz < 16 {
            return Err(ProtocolError::Argsz {
                command,
                argsz: raw.argsz,
                why: "a reply's argsz is at least 16",
            });
        }
        if raw.num_regions > MAX_REGIONS || raw.num_irqs > MAX_IRQS {
            return Err(ProtocolError::Field {
                command,
                what: "more regions or IRQ indices than a client accepts",
            });
        }
        Ok(Self {
            flags: DeviceFlags::from_bits_retain(raw.flags),
            num_regions: raw.num_regions,
            num_irqs: raw.num_irqs,
        })
    }
}

/// One mmap-able area of a sparse region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseMmapArea {
    /// Offset in the region (added to the region's mmap offset).
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A capability in a region's capability list.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegionCapability {
    /// `VFIO_REGION_INFO_CAP_TYPE` (id 2, version 1): a device-specific region's type and
    /// subtype.
    Type {
        /// Region type (e.g. [`crate::device::VFIO_REGION_TYPE_NESTED`]).
        region_type: u32,
        /// Region subtype.
        subtype: u32,
    },
    /// `VFIO_REGION_INFO_CAP_SPARSE_MMAP` (id 1, version 1): only these areas may be mapped.
    SparseMmap(Vec<SparseMmapArea>),
    /// A capability this crate does not know, kept by the decoder so a caller can see it.
    /// The encoder refuses to send one.
    Unknown {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
    },
}

/// A region (`VFIO_USER_DEVICE_GET_REGION_INFO`), without its fd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// [`RegionFlags::READ`], [`RegionFlags::WRITE`], [`RegionFlags::MMAP`]. The encoder
    /// derives [`RegionFlags::CAPS`] from `caps`, and the decoder removes it.
    pub flags: RegionFlags,
    /// Region size in bytes (0: the region does not exist, e.g. an unimplemented BAR).
    pub size: u64,
    /// Offset to give `mmap` on the region's fd.
    pub mmap_offset: u64,
    /// The capability list, in order.
    pub caps: Vec<RegionCapability>,
}

impl Default for RegionFlags {
    fn default() -> Self {
        RegionFlags::empty()
    }
}

/// What a region info reply said: the region, or that the client must ask again with a larger
/// `argsz` (the capability list did not fit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionInfoReply {
    /// The whole region info, capabilities included.
    Complete(RegionInfo),
    /// The reply needs this `argsz`; ask again.
    NeedsArgsz(u32),
}

impl RegionInfo {
    /// The region's type and subtype, from its [`RegionCapability::Type`] capability.
    pub fn region_type(&self) -> Option<(u32, u32)> {
        self.caps.iter().find_map(|cap| match cap {
            RegionCapability::Type {
                region_type,
                subtype,
            } => Some((*region_type, *subtype)),
            _ => None,
        })
    }

    /// The region's sparse mmap areas, if it has that capability.
    pub fn sparse_mmap_areas(&self) -> Option<&[SparseMmapArea]> {
        self.caps.iter().find_map(|cap| match cap {
            RegionCapability::SparseMmap(areas) => Some(areas.as_slice()),
            _ => None,
        })
    }

    /// The capability list as bytes, the first capability at offset 32 from the start of the
    /// region info.
    fn encode_caps(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut bytes = Vec::new();
        for (i, cap) in self.caps.iter().enumerate() {
            let start = bytes.len();
            let (id, body_len) = match cap {
                RegionCapability::Type { .. } => (VFIO_REGION_INFO_CAP_TYPE, 8),
                RegionCapability::SparseMmap(areas) => (
                    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
                    areas
                        .len()
                        .checked_mul(size_of::<RawSparseMmapArea>())
                        .and_then(|n| n.checked_add(size_of::<RawSparseMmap>()))
                        .filter(|&n| n <= MAX_PAYLOAD_SIZE)
                        .ok_or(ProtocolError::ReplyTooLarge {
                            command: Command::DeviceGetRegionInfo,
                            size: usize::MAX,
                        })?,
                ),
                RegionCapability::Unknown { .. } => {
                    return Err(ProtocolError::Capability(
                        "cannot encode an unknown capability",
                    ));
                }
            };
            let end = REGION_INFO_SIZE + start + size_of::<RawCapHeader>() + body_len;
            if end > MAX_PAYLOAD_SIZE {
                return Err(ProtocolError::ReplyTooLarge {
                    command: Command::DeviceGetRegionInfo,
                    size: end,
                });
            }
            let next = if i + 1 == self.caps.len() {
                0
            } else {
                end as u32
            };
            let header = RawCapHeader {
                id,
                version: 1,
                next,
            };
            bytes.extend_from_slice(header.as_bytes());
            match cap {
                RegionCapability::Type {
                    region_type,
                    subtype,
                } => bytes.extend_from_slice(
                    RawCapType {
                        region_type: *region_type,
                        subtype: *subtype,
                    }
                    .as_bytes(),
                ),
                RegionCapability::SparseMmap(areas) => {
                    let head = RawSparseMmap {
                        nr_areas: areas.len() as u32,
                        reserved: 0,
                    };
                    bytes.extend_from_slice(head.as_bytes());
                    for area in areas {
                        let raw = RawSparseMmapArea {
                            offset: area.offset,
                            size: area.size,
                        };
                        bytes.extend_from_slice(raw.as_bytes());
                    }
                }
                RegionCapability::Unknown { .. } => {}
            }
        }
        Ok(bytes)
    }

    /// The reply payload for region `index` asked with `argsz`: the whole info with its
    /// capabilities if `argsz` covers them; otherwise the 32-byte struct alone, with `argsz`
    /// set to the size needed, `CAPS` set and `cap_offset` 0 (as the kernel does), so the
    /// client can ask again. The payload is never larger than `argsz`.
    pub fn encode_reply(&self, index: u32, argsz: u32) -> Result<Vec<u8>, ProtocolError> {
        let caps = self.encode_caps()?;
        let full = REGION_INFO_SIZE + caps.len();
        let mut flags = self.flags - RegionFlags::CAPS;
        if !caps.is_empty() {
            flags |= RegionFlags::CAPS;
        }
        let fits = argsz as usize >= full;
        let raw = RawRegionInfo {
            argsz: full as u32,
            flags: flags.bits(),
            index,
            cap_offset: if fits && !caps.is_empty() {
                REGION_INFO_SIZE as u32
            } else {
                0
            },
            size: self.size,
            offset: self.mmap_offset,
        };
        let mut payload = raw.as_bytes().to_vec();
        if fits {
            payload.extend_from_slice(&caps);
        }
        Ok(payload)
    }

    /// Decodes and validates the reply to a region info request for `index` sent with
    /// `argsz`.
    pub fn decode_reply(
        payload: &[u8],
        index: u32,
        argsz: u32,
    ) -> Result<RegionInfoReply, ProtocolError> {
        let command = Command::DeviceGetRegionInfo;
        let (raw, _) = read_prefix::<RawRegionInfo>(command, payload)?;
        if raw.index != index {
            return Err(ProtocolError::Field {
                command,
                what: "reply is for another region index",
            });
        }
        let needed = raw.argsz as usize;
        if !(REGION_INFO_SIZE..=MAX_PAYLOAD_SIZE).contains(&needed) {
            return Err(ProtocolError::Argsz {
                command,
                argsz: raw.argsz,
                why: "a reply's argsz is between 32 and the message size limit",
            });
        }
        if !variable_reply_complete(command, payload.len(), argsz, needed)? {
            return Ok(RegionInfoReply::NeedsArgsz(raw.argsz));
        }
        let flags = RegionFlags::from_bits(raw.flags).ok_or(ProtocolError::Flags {
            command,
            flags: raw.flags,
        })?;
        let caps = if flags.contains(RegionFlags::CAPS) {
            decode_caps(payload, raw.cap_offset)?
        } else {
            Vec::new()
        };
        Ok(RegionInfoReply::Complete(RegionInfo {
            flags: flags - RegionFlags::CAPS,
            size: raw.size,
            mmap_offset: raw.offset,
            caps,
        }))
    }
}

/// Walks the capability list of a region info reply. Offsets are from the start of the
/// payload; each capability must lie inside it, after the fixed struct, and each `next` must
/// move forward, so the walk ends and touches every byte at most once.
fn decode_caps(payload: &[u8], first: u32) -> Result<Vec<RegionCapability>, ProtocolError> {
    let mut caps = Vec::new();
    let mut offset = first as usize;
    if offset == 0 {
        return Err(ProtocolError::Capability("CAPS is set but cap_offset is 0"));
    }
    while offset != 0 {
        if offset < REGION_INFO_SIZE {
            return Err(ProtocolError::Capability(
                "a capability overlaps the region info",
            ));
        }
        let rest = payload.get(offset..).ok_or(ProtocolError::Capability(
            "a capability lies outside the reply",
        ))?;
        let (header, body) = read_prefix::<RawCapHeader>(Command::DeviceGetRegionInfo, rest)
            .map_err(|_| ProtocolError::Capability("a capability header is truncated"))?;
        let next = header.next as usize;
        if next != 0 && next <= offset {
            return Err(ProtocolError::Capability(
                "a capability's next does not move forward",
            ));
        }
        // The capability's bytes end at the next one, or at the end of the reply.
        let body_len = if next == 0 {
            body.len()
        } else {
            next.checked_sub(offset + size_of::<RawCapHeader>())
                .ok_or(ProtocolError::Capability("capabilities overlap"))?
        };
        let body = body.get(..body_len).ok_or(ProtocolError::Capability(
            "a capability lies outside the reply",
        ))?;
        caps.push(decode_cap(header, body)?);
        offset = next;
    }
    Ok(caps)
}

fn decode_cap(header: RawCapHeader, body: &[u8]) -> Result<RegionCapability, ProtocolError> {
    let truncated = ProtocolError::Capability("a capability's body is truncated");
    match header.id {
        VFIO_REGION_INFO_CAP_TYPE => {
            let (raw, _) = read_prefix::<RawCapType>(Command::DeviceGetRegionInfo, body)
                .map_err(|_| truncated)?;
            Ok(RegionCapability::Type {
                region_type: raw.region_type,
                subtype: raw.subtype,
            })
        }
        VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
            let (head, mut rest) = read_prefix::<RawSparseMmap>(Command::DeviceGetRegionInfo, body)
                .map_err(|_| truncated.clone())?;
            let n = head.nr_areas as usize;
            // Check the count against the bytes present before allocating for it.
            if n > rest.len() / size_of::<RawSparseMmapArea>() {
                return Err(truncated);
            }
            let mut areas = Vec::with_capacity(n);
            for _ in 0..n {
                let (area, tail) =
                    read_prefix::<RawSparseMmapArea>(Command::DeviceGetRegionInfo, rest)
                        .map_err(|_| truncated.clone())?;
                areas.push(SparseMmapArea {
                    offset: area.offset,
                    size: area.size,
                });
                rest = tail;
            }
            Ok(RegionCapability::SparseMmap(areas))
        }
        id => Ok(RegionCapability::Unknown {
            id,
            version: header.version,
        }),
    }
}

/// An IRQ index (`VFIO_USER_DEVICE_GET_IRQ_INFO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// What the index supports.
    pub flags: IrqFlags,
    /// Number of interrupts (sub-indices) of the index; 0 if the device has none of this kind.
    pub count: u32,
}

impl IrqInfo {
    /// The reply payload for IRQ index `index` (16 bytes, `argsz` 16).
    pub fn encode_reply(&self, index: u32) -> [u8; 16] {
        let raw = RawIrqInfo {
            argsz: size_of::<RawIrqInfo>() as u32,
            flags: self.flags.bits(),
            index,
            count: self.count,
        };
        let mut bytes = [0; 16];
        bytes.copy_from_slice(raw.as_bytes());
        bytes
    }

    /// Decodes and validates the reply to an IRQ info request for `index`.
    pub fn decode_reply(payload: &[u8], index: u32) -> Result<Self, ProtocolError> {
        let command = Command::DeviceGetIrqInfo;
        let raw: RawIrqInfo = read_exact(command, payload)?;
        if raw.index != index {
            return Err(ProtocolError::Field {
                command,
                what: "reply is for another IRQ index",
            });
        }
        let flags = IrqFlags::from_bits(raw.flags).ok_or(ProtocolError::Flags {
            command,
            flags: raw.flags,
        })?;
        Ok(Self {
            flags,
            count: raw.count,
        })
    }
}

/// How a sub-region's fd is to be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoFdKind {
    /// `VFIO_USER_IO_FD_TYPE_IOEVENTFD`: an eventfd signalled on a write to the sub-region
    /// (e.g. with `KVM_IOEVENTFD`).
    IoEventFd,
    /// `VFIO_USER_IO_FD_TYPE_IOREGIONFD`.
    IoRegionFd,
}

impl IoFdKind {
    fn raw(self) -> u32 {
        match self {
            IoFdKind::IoEventFd => VFIO_USER_IO_FD_TYPE_IOEVENTFD,
            IoFdKind::IoRegionFd => VFIO_USER_IO_FD_TYPE_IOREGIONFD,
        }
    }
}

/// A sub-region of a region served through an fd (`VFIO_USER_DEVICE_GET_REGION_IO_FDS`),
/// without the fd itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoFd {
    /// Start of the sub-region in the region.
    pub offset: u64,
    /// Its length (0: any access size).
    pub size: u64,
    /// What the fd is.
    pub kind: IoFdKind,
    /// `KVM_IOEVENTFD_FLAG_*` (ioeventfd) or `KVM_IOREGION_*` (ioregionfd).
    pub flags: u32,
    /// `datamatch` (ioeventfd with [`KVM_IOEVENTFD_FLAG_DATAMATCH`]) or `user_data`.
    pub data: u64,
}

/// What a `GET_REGION_IO_FDS` reply said: the sub-regions, each with the index of its fd among
/// the reply's fds, or that the client must ask again with a larger `argsz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoFdsReply {
    /// Every sub-region, with its fd index.
    Complete(Vec<(IoFd, usize)>),
    /// The reply needs this `argsz`; ask again.
    NeedsArgsz(u32),
}

/// Encodes a `GET_REGION_IO_FDS` reply for region `index` asked with `argsz`: the payload and
/// the fds to attach (each distinct fd once; sub-regions sharing an fd share its index). If
/// `argsz` does not cover the sub-regions, the payload is the 16-byte header alone with
/// `argsz` set to the size needed and no fds.
pub fn encode_io_fds_reply<'a>(
    index: u32,
    argsz: u32,
    sub_regions: &[(IoFd, BorrowedFd<'a>)],
) -> Result<(Vec<u8>, Vec<BorrowedFd<'a>>), ProtocolError> {
    let command = Command::DeviceGetRegionIoFds;
    let full = size_of::<RawRegionIoFds>()
        .checked_add(
            sub_regions
                .len()
                .saturating_mul(size_of::<RawSubRegionIoFd>()),
        )
        .filter(|&n| n <= MAX_PAYLOAD_SIZE)
        .ok_or(ProtocolError::ReplyTooLarge {
            command,
            size: usize::MAX,
        })?;
    let head = RawRegionIoFds {
        argsz: full as u32,
        flags: 0,
        index,
        count: sub_regions.len() as u32,
    };
    let mut payload = head.as_bytes().to_vec();
    let mut fds: Vec<BorrowedFd<'a>> = Vec::new();
    if (argsz as usize) < full {
        return Ok((payload, fds));
    }
    for (io_fd, fd) in sub_regions {
        let fd_index = match fds.iter().position(|f| f.as_raw_fd() == fd.as_raw_fd()) {
            Some(i) => i,
            None => {
                fds.push(*fd);
                fds.len() - 1
            }
        };
        let raw = RawSubRegionIoFd {
            offset: io_fd.offset,
            size: io_fd.size,
            fd_index: fd_index as u32,
            fd_type: io_fd.kind.raw(),
            flags: io_fd.flags,
            padding: 0,
            data: io_fd.data,
        };
        payload.extend_from_slice(raw.as_bytes());
    }
    Ok((payload, fds))
}

/// Decodes and validates a `GET_REGION_IO_FDS` reply for region `index` sent with `argsz`
/// that arrived with `fd_count` fds.
pub fn decode_io_fds_reply(
    payload: &[u8],
    index: u32,
    argsz: u32,
    fd_count: usize,
) -> Result<IoFdsReply, ProtocolError> {
    let command = Command::DeviceGetRegionIoFds;
    let (head, mut rest) = read_prefix::<RawRegionIoFds>(command, payload)?;
    if head.index != index {
        return Err(ProtocolError::Field {
            command,
            what: "reply is for another region index",
        });
    }
    if head.flags != 0 {
        return Err(ProtocolError::Flags {
            command,
            flags: head.flags,
        });
    }
    if head.count > MAX_IO_FD_SUB_REGIONS {
        return Err(ProtocolError::Field {
            command,
            what: "more sub-regions than a client accepts",
        });
    }
    let needed = size_of::<RawRegionIoFds>() + head.count as usize * size_of::<RawSubRegionIoFd>();
    if head.argsz as usize != needed {
        return Err(ProtocolError::Argsz {
            command,
            argsz: head.argsz,
            why: "a reply's argsz is 16 + 40 * count",
        });
    }
    if !variable_reply_complete(command, payload.len(), argsz, needed)? {
        return Ok(IoFdsReply::NeedsArgsz(head.argsz));
    }
    let mut sub_regions = Vec::with_capacity(head.count as usize);
    for _ in 0..head.count {
        let (raw, tail) = read_prefix::<RawSubRegionIoFd>(command, rest)?;
        rest = tail;
        let kind = match raw.fd_type {
            VFIO_USER_IO_FD_TYPE_IOEVENTFD => IoFdKind::IoEventFd,
            VFIO_USER_IO_FD_TYPE_IOREGIONFD => IoFdKind::IoRegionFd,
            _ => {
                return Err(ProtocolError::Field {
                    command,
                    what: "unknown sub-region fd type",
                });
            }
        };
        let fd_index = raw.fd_index as usize;
        if fd_index >= fd_count {
            return Err(ProtocolError::Field {
                command,
                what: "a sub-region's fd_index is past the fds received",
            });
        }
        sub_regions.push((
            IoFd {
                offset: raw.offset,
                size: raw.size,
                kind,
                flags: raw.flags,
                data: raw.data,
            },
            fd_index,
        ));
    }
    Ok(IoFdsReply::Complete(sub_regions))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed_region() -> RegionInfo {
        RegionInfo {
            flags: RegionFlags::READ | RegionFlags::WRITE | RegionFlags::MMAP,
            size: 8192 + 64 * 64,
            mmap_offset: 0,
            caps: vec![
                RegionCapability::Type {
                    region_type: 4,
                    subtype: 1,
                },
                RegionCapability::SparseMmap(vec![SparseMmapArea {
                    offset: 4096,
                    size: 4096,
                }]),
            ],
        }
    }

    #[test]
    fn region_info_round_trips_with_caps() {
        let region = typed_region();
        let payload = region.encode_reply(9, 4096).unwrap();
        assert_eq!(payload.len(), 32 + 16 + 32);
        assert_eq!(
            RegionInfo::decode_reply(&payload, 9, 4096).unwrap(),
            RegionInfoReply::Complete(region.clone())
        );
        assert_eq!(region.region_type(), Some((4, 1)));
    }

    #[test]
    fn short_argsz_gets_the_fixed_part_and_the_size_needed() {
        let payload = typed_region().encode_reply(9, 32).unwrap();
        assert_eq!(payload.len(), 32);
        assert_eq!(
            RegionInfo::decode_reply(&payload, 9, 32).unwrap(),
            RegionInfoReply::NeedsArgsz(80)
        );
    }

    #[test]
    fn looping_cap_chain_is_refused() {
        let mut payload = typed_region().encode_reply(9, 4096).unwrap();
        // Point the second capability's next back at the first.
        payload[48 + 4..48 + 8].copy_from_slice(&32u32.to_ne_bytes());
        assert!(RegionInfo::decode_reply(&payload, 9, 4096).is_err());
    }

    #[test]
    fn sparse_area_count_past_the_reply_is_refused() {
        let mut payload = typed_region().encode_reply(9, 4096).unwrap();
        payload[48 + 8..48 + 12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(RegionInfo::decode_reply(&payload, 9, 4096).is_err());
    }

    #[test]
    fn io_fds_share_fd_indices() {
        let doorbell = iopf_queue::Doorbell::new().unwrap();
        use std::os::fd::AsFd;
        let fd = doorbell.as_fd();
        let io_fd = IoFd {
            offset: 4104,
            size: 4,
            kind: IoFdKind::IoEventFd,
            flags: 0,
            data: 0,
        };
        let (payload, fds) = encode_io_fds_reply(10, 1024, &[(io_fd, fd), (io_fd, fd)]).unwrap();
        assert_eq!(fds.len(), 1);
        assert_eq!(
            decode_io_fds_reply(&payload, 10, 1024, 1).unwrap(),
            IoFdsReply::Complete(vec![(io_fd, 0), (io_fd, 0)])
        );
        assert!(decode_io_fds_reply(&payload, 10, 1024, 0).is_err());
    }

    #[test]
    fn ioeventfd_flags_are_the_kernels() {
        // linux/kvm.h: 1 << kvm_ioeventfd_flag_nr_datamatch, 1 << kvm_ioeventfd_flag_nr_pio.
        assert_eq!(
            (KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_PIO),
            (1, 2)
        );
    }

    fn device_info_reply(argsz: u32, num_regions: u32, num_irqs: u32) -> Vec<u8> {
        [argsz, DeviceFlags::PCI.bits(), num_regions, num_irqs]
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect()
    }

    #[test]
    fn a_device_info_reply_needs_an_argsz_of_at_least_16() {
        assert!(matches!(
            DeviceInfo::decode_reply(&device_info_reply(8, 11, 6)),
            Err(ProtocolError::Argsz { argsz: 8, .. })
        ));
        for argsz in [16, 32] {
            let info = DeviceInfo::decode_reply(&device_info_reply(argsz, 11, 6)).unwrap();
            assert_eq!((info.num_regions, info.num_irqs), (11, 6));
        }
    }

    // Catches: a client that would walk millions of regions (or IRQs) a server claims.
    #[test]
    fn a_device_with_too_many_regions_or_irq_indices_is_refused() {
        for (regions, irqs) in [(MAX_REGIONS + 1, 6), (11, MAX_IRQS + 1)] {
            assert!(matches!(
                DeviceInfo::decode_reply(&device_info_reply(16, regions, irqs)),
                Err(ProtocolError::Field { .. })
            ));
        }
        assert!(DeviceInfo::decode_reply(&device_info_reply(16, MAX_REGIONS, MAX_IRQS)).is_ok());
    }

    #[test]
    fn sparse_mmap_areas_are_those_of_the_capability() {
        let areas = vec![SparseMmapArea {
            offset: 4096,
            size: 4096,
        }];
        let mut region = typed_region();
        region.caps = vec![
            RegionCapability::Type {
                region_type: 4,
                subtype: 1,
            },
            RegionCapability::SparseMmap(areas.clone()),
        ];
        assert_eq!(region.sparse_mmap_areas(), Some(areas.as_slice()));
        region.caps.remove(1);
        assert_eq!(region.sparse_mmap_areas(), None);
    }

    fn sparse_region(areas: usize) -> RegionInfo {
        let mut region = typed_region();
        region.caps = vec![RegionCapability::SparseMmap(vec![
            SparseMmapArea {
                offset: 0,
                size: 4096,
            };
            areas
        ])];
        region
    }

    // Catches: an off-by-one at the message limit, either way.
    #[test]
    fn capabilities_may_fill_a_reply_to_the_last_byte_and_no_further() {
        // 32 bytes of region info, 8 of capability header, 8 of sparse header, 16 per area.
        let filling = (MAX_PAYLOAD_SIZE - 48) / 16;
        assert_eq!(48 + 16 * filling, MAX_PAYLOAD_SIZE);
        let full = sparse_region(filling)
            .encode_reply(0, MAX_PAYLOAD_SIZE as u32)
            .unwrap();
        assert_eq!(full.len(), MAX_PAYLOAD_SIZE);
        assert!(matches!(
            sparse_region(filling + 1).encode_reply(0, MAX_PAYLOAD_SIZE as u32),
            Err(ProtocolError::ReplyTooLarge { .. })
        ));
    }

    // Catches: a cap_offset pointing past the payload (no capabilities, or left out).
    #[test]
    fn cap_offset_is_set_only_when_capabilities_follow() {
        let cap_offset = |payload: &[u8]| u32::from_le_bytes(payload[12..16].try_into().unwrap());
        let region = typed_region();
        assert_eq!(cap_offset(&region.encode_reply(0, 4096).unwrap()), 32);
        assert_eq!(cap_offset(&region.encode_reply(0, 32).unwrap()), 0);
        let plain = RegionInfo {
            caps: Vec::new(),
            ..typed_region()
        };
        assert_eq!(cap_offset(&plain.encode_reply(0, 4096).unwrap()), 0);
    }

    // Catches: a capability's body measured past its successor (a short last capability then
    // looks outside the reply).
    #[test]
    fn a_capability_ends_where_the_next_one_starts() {
        let region = RegionInfo {
            caps: vec![RegionCapability::Type {
                region_type: 4,
                subtype: 1,
            }],
            ..typed_region()
        };
        let mut payload = region.encode_reply(9, 4096).unwrap();
        assert_eq!(payload.len(), 48);
        // Chain an unknown capability with an empty body after the type capability.
        payload[32 + 4..32 + 8].copy_from_slice(&48u32.to_le_bytes());
        payload.extend_from_slice(&0x99u16.to_le_bytes());
        payload.extend_from_slice(&1u16.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload[..4].copy_from_slice(&56u32.to_le_bytes());
        let RegionInfoReply::Complete(decoded) =
            RegionInfo::decode_reply(&payload, 9, 4096).unwrap()
        else {
            panic!("the reply fits");
        };
        assert_eq!(
            decoded.caps,
            [
                RegionCapability::Type {
                    region_type: 4,
                    subtype: 1
                },
                RegionCapability::Unknown {
                    id: 0x99,
                    version: 1
                }
            ]
        );
    }

    // Catches: sub-regions sent past the client's argsz, or withheld when they fit exactly.
    #[test]
    fn io_fds_go_in_an_argsz_that_covers_them_exactly_and_not_one_byte_less() {
        use std::os::fd::AsFd;
        let file = std::fs::File::open("/dev/null").unwrap();
        let sub_regions = [(crate::device::response_doorbell_io_fd(), file.as_fd())];
        let full = size_of::<RawRegionIoFds>() + size_of::<RawSubRegionIoFd>();
        let (payload, fds) = encode_io_fds_reply(10, full as u32, &sub_regions).unwrap();
        assert_eq!((payload.len(), fds.len()), (full, 1));
        let (payload, fds) = encode_io_fds_reply(10, full as u32 - 1, &sub_regions).unwrap();
        assert_eq!((payload.len(), fds.len()), (size_of::<RawRegionIoFds>(), 0));
    }

    #[test]
    fn a_reply_may_list_up_to_1024_sub_regions_and_no_more() {
        use std::os::fd::AsFd;
        let file = std::fs::File::open("/dev/null").unwrap();
        for (n, accepted) in [(1024, true), (1025, false)] {
            let sub_regions = vec![(crate::device::response_doorbell_io_fd(), file.as_fd()); n];
            let (payload, fds) = encode_io_fds_reply(10, u32::MAX, &sub_regions).unwrap();
            let decoded = decode_io_fds_reply(&payload, 10, u32::MAX, fds.len());
            assert_eq!(decoded.is_ok(), accepted, "{n}: {decoded:?}");
        }
    }
}
