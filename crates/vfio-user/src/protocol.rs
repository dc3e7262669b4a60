//! The vfio-user wire format: the message header, the command numbers, the fixed payload
//! structs, errno values and the limits this crate enforces.
//!
//! The protocol is QEMU's `docs/interop/vfio-user.rst` (the version QEMU's client and the
//! rust-vmm `vfio_user` crate speak). All fields are in the host's byte order, as the
//! specification says; every struct here is `#[repr(C)]` without padding, read from and written
//! to bytes with `zerocopy`, and its size is asserted at compile time.
//!
//! Nothing here trusts its input: the decoders in [`crate::request`], [`crate::info`] and
//! [`crate::version`] check every size, count and flag word against this module's limits and
//! return a [`ProtocolError`], whose [`errno`](ProtocolError::errno) is what an error reply
//! carries.

use std::fmt;
use std::io;
use std::mem::size_of;

use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes in the message header that precedes every message.
pub const HEADER_SIZE: usize = 16;

/// The most data one `REGION_READ`/`REGION_WRITE` moves (`max_data_xfer_size`), in both
/// directions: the specification's default, 1 MiB.
pub const MAX_DATA_XFER_SIZE: u32 = 1 << 20;

/// The largest message either side accepts, header included: a `REGION_WRITE` request or
/// `REGION_READ` reply carrying [`MAX_DATA_XFER_SIZE`] bytes. A header announcing more is
/// refused before anything is allocated for its body.
pub const MAX_MESSAGE_SIZE: usize =
    HEADER_SIZE + size_of::<RawRegionAccess>() + MAX_DATA_XFER_SIZE as usize;

/// The largest payload (message minus header).
pub const MAX_PAYLOAD_SIZE: usize = MAX_MESSAGE_SIZE - HEADER_SIZE;

/// The most fds one message may carry; more is refused. The same bound as
/// [`iopf_queue::fdpass::MAX_FDS`], which does the passing.
pub const MAX_MSG_FDS: usize = iopf_queue::fdpass::MAX_FDS;

/// The largest JSON document `VFIO_USER_VERSION` may carry (terminating NUL included).
pub const MAX_VERSION_DATA: usize = 16 * 1024;

/// The protocol major version this crate speaks (QEMU's `VFIO_USER_MAJOR_VER`).
pub const PROTOCOL_MAJOR: u16 = 0;
/// The highest minor version this crate speaks. Minor versions 0 and 1 describe the same
/// messages; QEMU proposes 0.0, the rust-vmm client 0.1.
pub const PROTOCOL_MINOR: u16 = 1;

/// The header's `flags` bits 0-3: the message type.
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Message type: a command.
pub const FLAGS_TYPE_COMMAND: u32 = 0x0;
/// Message type: a reply to the command with the same message id.
pub const FLAGS_TYPE_REPLY: u32 = 0x1;
/// Bit 4: a command that wants no reply (`No_reply`).
pub const FLAGS_NO_REPLY: u32 = 1 << 4;
/// Bit 5: a reply reporting an error; the header's `error` field holds the errno (`Error`).
pub const FLAGS_ERROR: u32 = 1 << 5;
/// Every bit the specification defines; the others are refused.
pub const FLAGS_KNOWN: u32 = FLAGS_TYPE_MASK | FLAGS_NO_REPLY | FLAGS_ERROR;

/// The 16-byte header of every message, command or reply.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct Header {
    /// Offset 0: chosen by the sender of a command, echoed in its reply.
    pub msg_id: u16,
    /// Offset 2: the [`Command`] number, also set in the reply.
    pub command: u16,
    /// Offset 4: size of the whole message, header included.
    pub msg_size: u32,
    /// Offset 8: message type (bits 0-3), [`FLAGS_NO_REPLY`], [`FLAGS_ERROR`].
    pub flags: u32,
    /// Offset 12: in an error reply, the errno (may be 0); reserved in a command.
    pub error: u32,
}

const _: () = assert!(size_of::<Header>() == HEADER_SIZE);

impl Header {
    /// The header of a command message of `payload_len` bytes after the header.
    pub fn command(msg_id: u16, command: Command, payload_len: usize) -> Self {
        Self {
            msg_id,
            command: command.raw(),
            msg_size: message_size(payload_len),
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        }
    }

    /// The header of a successful reply to `request` carrying `payload_len` bytes.
    pub fn reply(request: &Header, payload_len: usize) -> Self {
        Self {
            msg_id: request.msg_id,
            command: request.command,
            msg_size: message_size(payload_len),
            flags: FLAGS_TYPE_REPLY,
            error: 0,
        }
    }

    /// The header of an error reply to `request` (an error reply has no payload).
    pub fn error_reply(request: &Header, errno: Errno) -> Self {
        Self {
            msg_id: request.msg_id,
            command: request.command,
            msg_size: HEADER_SIZE as u32,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: errno.0,
        }
    }

    /// The message type (bits 0-3 of `flags`).
    pub fn message_type(&self) -> u32 {
        self.flags & FLAGS_TYPE_MASK
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.message_type() == FLAGS_TYPE_REPLY
    }

    /// Whether the sender of this command wants no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAGS_NO_REPLY != 0
    }

    /// Whether this reply reports an error.
    pub fn is_error(&self) -> bool {
        self.flags & FLAGS_ERROR != 0
    }

    /// The payload size this header announces, if `msg_size` is at least a header.
    pub fn payload_len(&self) -> Option<usize> {
        (self.msg_size as usize).checked_sub(HEADER_SIZE)
    }

    /// The header followed by `payload`, as one buffer ready to send.
    pub fn with_payload(&self, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
        bytes.extend_from_slice(self.as_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }
}

/// `msg_size` for a payload of `payload_len` bytes. Callers keep payloads within
/// [`MAX_PAYLOAD_SIZE`]; a larger one saturates, and the receiver refuses it.
fn message_size(payload_len: usize) -> u32 {
    u32::try_from(HEADER_SIZE + payload_len).unwrap_or(u32::MAX)
}

/// The commands of the specification, by number.
///
/// Number 14 is absent from QEMU's text (older drafts and QEMU's `protocol.h` call it
/// `VFIO_USER_DIRTY_PAGES`); like every number not listed, it is an unknown command.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// `VFIO_USER_VERSION`: version and capability negotiation; the first message.
    Version = 1,
    /// `VFIO_USER_DMA_MAP`: client memory the server may access.
    DmaMap = 2,
    /// `VFIO_USER_DMA_UNMAP`: withdraws a DMA mapping.
    DmaUnmap = 3,
    /// `VFIO_USER_DEVICE_GET_INFO`: device flags, region and IRQ counts.
    DeviceGetInfo = 4,
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`: one region, with its capabilities and fd.
    DeviceGetRegionInfo = 5,
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`: ioeventfds/ioregionfds of a region.
    DeviceGetRegionIoFds = 6,
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`: one IRQ index.
    DeviceGetIrqInfo = 7,
    /// `VFIO_USER_DEVICE_SET_IRQS`: eventfds and actions for an IRQ index.
    DeviceSetIrqs = 8,
    /// `VFIO_USER_REGION_READ`: reads device region bytes through the socket.
    RegionRead = 9,
    /// `VFIO_USER_REGION_WRITE`: writes device region bytes through the socket.
    RegionWrite = 10,
    /// `VFIO_USER_DMA_READ` (server to client): not implemented here.
    DmaRead = 11,
    /// `VFIO_USER_DMA_WRITE` (server to client): not implemented here.
    DmaWrite = 12,
    /// `VFIO_USER_DEVICE_RESET`.
    DeviceReset = 13,
    /// `VFIO_USER_REGION_WRITE_MULTI`: not implemented here.
    RegionWriteMulti = 15,
    /// `VFIO_USER_DEVICE_FEATURE`: not implemented here.
    DeviceFeature = 16,
    /// `VFIO_USER_MIG_DATA_READ`: not implemented here.
    MigDataRead = 17,
    /// `VFIO_USER_MIG_DATA_WRITE`: not implemented here.
    MigDataWrite = 18,
}

impl Command {
    /// Every command of the specification.
    pub const ALL: [Command; 17] = [
        Command::Version,
        Command::DmaMap,
        Command::DmaUnmap,
        Command::DeviceGetInfo,
        Command::DeviceGetRegionInfo,
        Command::DeviceGetRegionIoFds,
        Command::DeviceGetIrqInfo,
        Command::DeviceSetIrqs,
        Command::RegionRead,
        Command::RegionWrite,
        Command::DmaRead,
        Command::DmaWrite,
        Command::DeviceReset,
        Command::RegionWriteMulti,
        Command::DeviceFeature,
        Command::MigDataRead,
        Command::MigDataWrite,
    ];

    /// The specification's name of the command (`VFIO_USER_VERSION`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Command::Version => "VFIO_USER_VERSION",
            Command::DmaMap => "VFIO_USER_DMA_MAP",
            Command::DmaUnmap => "VFIO_USER_DMA_UNMAP",
            Command::DeviceGetInfo => "VFIO_USER_DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "VFIO_USER_DEVICE_GET_REGION_INFO",
            Command::DeviceGetRegionIoFds => "VFIO_USER_DEVICE_GET_REGION_IO_FDS",
            Command::DeviceGetIrqInfo => "VFIO_USER_DEVICE_GET_IRQ_INFO",
            Command::DeviceSetIrqs => "VFIO_USER_DEVICE_SET_IRQS",
            Command::RegionRead => "VFIO_USER_REGION_READ",
            Command::RegionWrite => "VFIO_USER_REGION_WRITE",
            Command::DmaRead => "VFIO_USER_DMA_READ",
            Command::DmaWrite => "VFIO_USER_DMA_WRITE",
            Command::DeviceReset => "VFIO_USER_DEVICE_RESET",
            Command::RegionWriteMulti => "VFIO_USER_REGION_WRITE_MULTI",
            Command::DeviceFeature => "VFIO_USER_DEVICE_FEATURE",
            Command::MigDataRead => "VFIO_USER_MIG_DATA_READ",
            Command::MigDataWrite => "VFIO_USER_MIG_DATA_WRITE",
        }
    }

    /// The command with number `raw`, if the specification defines one.
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Command::Version,
            2 => Command::DmaMap,
            3 => Command::DmaUnmap,
            4 => Command::DeviceGetInfo,
            5 => Command::DeviceGetRegionInfo,
            6 => Command::DeviceGetRegionIoFds,
            7 => Command::DeviceGetIrqInfo,
            8 => Command::DeviceSetIrqs,
            9 => Command::RegionRead,
            10 => Command::RegionWrite,
            11 => Command::DmaRead,
            12 => Command::DmaWrite,
            13 => Command::DeviceReset,
            15 => Command::RegionWriteMulti,
            16 => Command::DeviceFeature,
            17 => Command::MigDataRead,
            18 => Command::MigDataWrite,
            _ => return None,
        })
    }

    /// The command's number on the wire.
    pub const fn raw(self) -> u16 {
        self as u16
    }

    /// Whether a server built with this crate handles the command (the others get `ENOSYS`).
    pub const fn is_implemented(self) -> bool {
        !matches!(
            self,
            Command::DmaRead
                | Command::DmaWrite
                | Command::RegionWriteMulti
                | Command::DeviceFeature
                | Command::MigDataRead
                | Command::MigDataWrite
        )
    }
}

/// A Linux errno, as carried in an error reply's `error` field (the specification says "UNIX
/// errno"; both ends of iopf run on Linux).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(1);
    /// No such file or directory.
    pub const ENOENT: Errno = Errno(2);
    /// I/O error.
    pub const EIO: Errno = Errno(5);
    /// Argument list too long (used for replies too large to send).
    pub const E2BIG: Errno = Errno(7);
    /// Bad file descriptor.
    pub const EBADF: Errno = Errno(9);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Permission denied.
    pub const EACCES: Errno = Errno(13);
    /// Bad address.
    pub const EFAULT: Errno = Errno(14);
    /// Device or resource busy.
    pub const EBUSY: Errno = Errno(16);
    /// File exists (a DMA mapping over an existing one).
    pub const EEXIST: Errno = Errno(17);
    /// Invalid argument: the answer to every malformed request.
    pub const EINVAL: Errno = Errno(22);
    /// No space left on device.
    pub const ENOSPC: Errno = Errno(28);
    /// Function not implemented: the answer to unknown and unimplemented commands.
    pub const ENOSYS: Errno = Errno(38);
    /// Operation not supported (an unsupported protocol version or device feature).
    pub const ENOTSUP: Errno = Errno(95);

    /// The errno value.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({}: {self})", self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match i32::try_from(self.0) {
            Ok(code) => write!(f, "{}", io::Error::from_raw_os_error(code)),
            Err(_) => write!(f, "errno {}", self.0),
        }
    }
}

impl std::error::Error for Errno {}

impl From<io::Error> for Errno {
    /// The OS error number of `error`, or `EIO` if it has none.
    fn from(error: io::Error) -> Self {
        error
            .raw_os_error()
            .and_then(|code| u32::try_from(code).ok())
            .filter(|&code| code != 0)
            .map_or(Errno::EIO, Errno)
    }
}

impl From<Errno> for io::Error {
    fn from(errno: Errno) -> Self {
        match i32::try_from(errno.0) {
            Ok(code) => io::Error::from_raw_os_error(code),
            Err(_) => io::Error::other(format!("errno {}", errno.0)),
        }
    }
}

/// Why a message was refused: what a validating decoder found wrong. The server answers each
/// with an error reply carrying [`errno`](Self::errno); the client returns it as a bad reply.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The command number is not in the specification.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// The command exists but this crate does not implement it.
    #[error("command {0:?} is not implemented")]
    Unimplemented(Command),
    /// The header's message type is not the one expected (a command where a reply belongs,
    /// a reply where a command belongs, or a reserved type).
    #[error("message type {found} where {expected} belongs")]
    MessageType {
        /// The type found.
        found: u32,
        /// The type expected.
        expected: u32,
    },
    /// The header's flags have bits the specification does not define, or the `Error` bit in a
    /// command.
    #[error("header flags {0:#x} are invalid")]
    HeaderFlags(u32),
    /// A command other than `VERSION` arrived before version negotiation.
    #[error("{0:?} before VFIO_USER_VERSION")]
    NotNegotiated(Command),
    /// `VERSION` arrived after negotiation had completed.
    #[error("VFIO_USER_VERSION after negotiation")]
    AlreadyNegotiated,
    /// The payload does not have the size the command's layout requires.
    #[error("{command:?}: payload of {actual} bytes, expected {expected}")]
    PayloadSize {
        /// The command.
        command: Command,
        /// Bytes the layout requires.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The payload is shorter than the command's fixed part.
    #[error("{command:?}: payload of {actual} bytes, at least {min} needed")]
    PayloadTooShort {
        /// The command.
        command: Command,
        /// Bytes of the fixed part.
        min: usize,
        /// Bytes present.
        actual: usize,
    },
    /// `argsz` is inconsistent with the payload or below the fixed reply size.
    #[error("{command:?}: argsz {argsz} is invalid ({why})")]
    Argsz {
        /// The command.
        command: Command,
        /// The `argsz` found.
        argsz: u32,
        /// What it should have been.
        why: &'static str,
    },
    /// The message carried a number of fds its command does not allow.
    #[error("{command:?}: {actual} fds attached, {expected}")]
    FdCount {
        /// The command.
        command: Command,
        /// What the command allows, in words.
        expected: &'static str,
        /// Fds attached.
        actual: usize,
    },
    /// A flags field has bits this command does not define, or an invalid combination.
    #[error("{command:?}: flags {flags:#x} are invalid")]
    Flags {
        /// The command.
        command: Command,
        /// The flags found.
        flags: u32,
    },
    /// A field has a value its command does not allow.
    #[error("{command:?}: {what}")]
    Field {
        /// The command.
        command: Command,
        /// What is wrong.
        what: &'static str,
    },
    /// A data transfer larger than [`MAX_DATA_XFER_SIZE`] (or the peer's limit).
    #[error("{command:?}: count {count} exceeds the data transfer limit {max}")]
    TransferTooLarge {
        /// The command.
        command: Command,
        /// The count asked for.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// A region's capability list is malformed.
    #[error("region capability list: {0}")]
    Capability(&'static str),
    /// The version data is not the JSON the specification describes.
    #[error("version data: {0}")]
    VersionData(String),
    /// The proposed (or replied) version cannot be spoken.
    #[error("protocol version {major}.{minor} is not supported")]
    VersionUnsupported {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// A reply would not fit in one message.
    #[error("{command:?}: reply of {size} bytes exceeds the message size limit")]
    ReplyTooLarge {
        /// The command.
        command: Command,
        /// The payload size it would need.
        size: usize,
    },
    /// The device refused a valid request with this errno.
    #[error("the device refused: {0}")]
    Device(Errno),
    /// A reply does not answer the command that was sent.
    #[error("reply (id {found_id}, command {found_command}) to command {command:?} id {msg_id}")]
    ReplyMismatch {
        /// The command sent.
        command: Command,
        /// Its message id.
        msg_id: u16,
        /// The id in the reply.
        found_id: u16,
        /// The command number in the reply.
        found_command: u16,
    },
}

impl ProtocolError {
    /// The errno an error reply to the offending command carries: `ENOSYS` for unknown and
    /// unimplemented commands, `ENOTSUP` for an unsupported version, `E2BIG` for a reply that
    /// cannot be sent, the device's own errno when it refused, `EINVAL` for everything
    /// malformed.
    pub fn errno(&self) -> Errno {
        match self {
            ProtocolError::UnknownCommand(_) | ProtocolError::Unimplemented(_) => Errno::ENOSYS,
            ProtocolError::VersionUnsupported { .. } => Errno::ENOTSUP,
            ProtocolError::ReplyTooLarge { .. } => Errno::E2BIG,
            ProtocolError::Device(errno) => *errno,
            _ => Errno::EINVAL,
        }
    }
}

/// `VFIO_USER_VERSION` fixed part; the JSON version data follows.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawVersion {
    /// Offset 0.
    pub major: u16,
    /// Offset 2.
    pub minor: u16,
}

const _: () = assert!(size_of::<RawVersion>() == 4);

/// `VFIO_USER_DMA_MAP` request (QEMU's layout; `argsz` is this struct's size, 32).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawDmaMap {
    /// Offset 0: 32.
    pub argsz: u32,
    /// Offset 4: `READ` 1, `WRITE` 2.
    pub flags: u32,
    /// Offset 8: offset in the fd sent with the message (0 without one).
    pub offset: u64,
    /// Offset 16: DMA (IOVA) address.
    pub address: u64,
    /// Offset 24: size in bytes.
    pub size: u64,
}

const _: () = assert!(size_of::<RawDmaMap>() == 32);

/// `VFIO_USER_DMA_UNMAP` request and reply (the reply echoes the request).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawDmaUnmap {
    /// Offset 0: the largest reply payload wanted (24).
    pub argsz: u32,
    /// Offset 4: 0, or `VFIO_DMA_UNMAP_FLAG_ALL` (2).
    pub flags: u32,
    /// Offset 8: DMA address of the mapping.
    pub address: u64,
    /// Offset 16: its size.
    pub size: u64,
}

const _: () = assert!(size_of::<RawDmaUnmap>() == 24);

/// `VFIO_USER_DEVICE_GET_INFO` request and reply (`struct vfio_device_info`, first 16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawDeviceInfo {
    /// Offset 0: request: largest reply payload; reply: 16.
    pub argsz: u32,
    /// Offset 4: `RESET` 1, `PCI` 2.
    pub flags: u32,
    /// Offset 8: number of regions.
    pub num_regions: u32,
    /// Offset 12: number of IRQ indices.
    pub num_irqs: u32,
}

const _: () = assert!(size_of::<RawDeviceInfo>() == 16);

/// `VFIO_USER_DEVICE_GET_REGION_INFO` request and reply (`struct vfio_region_info`); in a reply
/// the capability list follows at `cap_offset`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawRegionInfo {
    /// Offset 0: request: largest reply payload; reply: size of the full reply payload.
    pub argsz: u32,
    /// Offset 4: `READ` 1, `WRITE` 2, `MMAP` 4, `CAPS` 8.
    pub flags: u32,
    /// Offset 8: region index.
    pub index: u32,
    /// Offset 12: offset of the first capability from the start of this struct, or 0.
    pub cap_offset: u32,
    /// Offset 16: region size.
    pub size: u64,
    /// Offset 24: offset to give `mmap` on the region's fd.
    pub offset: u64,
}

const _: () = assert!(size_of::<RawRegionInfo>() == 32);

/// The header every region capability begins with (`struct vfio_info_cap_header`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawCapHeader {
    /// Offset 0: capability id.
    pub id: u16,
    /// Offset 2: capability version.
    pub version: u16,
    /// Offset 4: offset of the next capability from the start of the region info, or 0.
    pub next: u32,
}

const _: () = assert!(size_of::<RawCapHeader>() == 8);

/// Body of `VFIO_REGION_INFO_CAP_TYPE` (`struct vfio_region_info_cap_type` after its header).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawCapType {
    /// Region type.
    pub region_type: u32,
    /// Region subtype.
    pub subtype: u32,
}

const _: () = assert!(size_of::<RawCapType>() == 8);

/// Body of `VFIO_REGION_INFO_CAP_SPARSE_MMAP` up to its areas.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawSparseMmap {
    /// Number of areas that follow.
    pub nr_areas: u32,
    /// 0.
    pub reserved: u32,
}

const _: () = assert!(size_of::<RawSparseMmap>() == 8);

/// One mmap-able area of a sparse region (`struct vfio_region_sparse_mmap_area`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawSparseMmapArea {
    /// Offset in the region.
    pub offset: u64,
    /// Size.
    pub size: u64,
}

const _: () = assert!(size_of::<RawSparseMmapArea>() == 16);

/// `VFIO_USER_DEVICE_GET_REGION_IO_FDS` request and reply header; in a reply `count`
/// sub-region descriptors follow.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawRegionIoFds {
    /// Offset 0: request: largest reply payload; reply: size of the full reply payload.
    pub argsz: u32,
    /// Offset 4: 0.
    pub flags: u32,
    /// Offset 8: region index.
    pub index: u32,
    /// Offset 12: request: 0; reply: number of sub-regions.
    pub count: u32,
}

const _: () = assert!(size_of::<RawRegionIoFds>() == 16);

/// One sub-region of a `GET_REGION_IO_FDS` reply (the ioeventfd and ioregionfd layouts are the
/// same size; the last field is `datamatch` or `user_data`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawSubRegionIoFd {
    /// Offset 0: start of the sub-region in the region.
    pub offset: u64,
    /// Offset 8: its length (0: any access size).
    pub size: u64,
    /// Offset 16: index of its fd among the reply's fds.
    pub fd_index: u32,
    /// Offset 20: `VFIO_USER_IO_FD_TYPE_IOEVENTFD` 0 or `..._IOREGIONFD` 1.
    pub fd_type: u32,
    /// Offset 24: `KVM_IOEVENTFD_FLAG_*` or `KVM_IOREGION_*`.
    pub flags: u32,
    /// Offset 28: 0.
    pub padding: u32,
    /// Offset 32: ioeventfd `datamatch`, or ioregionfd `user_data`.
    pub data: u64,
}

const _: () = assert!(size_of::<RawSubRegionIoFd>() == 40);

/// `VFIO_USER_DEVICE_GET_IRQ_INFO` request and reply (`struct vfio_irq_info`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawIrqInfo {
    /// Offset 0: request: largest reply payload; reply: 16.
    pub argsz: u32,
    /// Offset 4: `EVENTFD` 1, `MASKABLE` 2, `AUTOMASKED` 4, `NORESIZE` 8.
    pub flags: u32,
    /// Offset 8: IRQ index.
    pub index: u32,
    /// Offset 12: number of interrupts of the index.
    pub count: u32,
}

const _: () = assert!(size_of::<RawIrqInfo>() == 16);

/// `VFIO_USER_DEVICE_SET_IRQS` request (`struct vfio_irq_set`); with `DATA_BOOL`, `count`
/// bytes follow; with `DATA_EVENTFD` the eventfds travel as `SCM_RIGHTS`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawIrqSet {
    /// Offset 0: size of the request payload, data included.
    pub argsz: u32,
    /// Offset 4: one `DATA_*` and one `ACTION_*` bit.
    pub flags: u32,
    /// Offset 8: IRQ index.
    pub index: u32,
    /// Offset 12: first sub-index.
    pub start: u32,
    /// Offset 16: number of sub-indices.
    pub count: u32,
}

const _: () = assert!(size_of::<RawIrqSet>() == 20);

/// `VFIO_USER_REGION_READ`/`WRITE` request and reply fixed part; data follows in a write
/// request and a read reply.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RawRegionAccess {
    /// Offset 0: offset in the region.
    pub offset: u64,
    /// Offset 8: region index.
    pub region: u32,
    /// Offset 12: bytes to transfer.
    pub count: u32,
}

const _: () = assert!(size_of::<RawRegionAccess>() == 16);

/// Reads a fixed struct from the start of `payload`, refusing a payload too short for it.
pub(crate) fn read_prefix<T: FromBytes>(
    command: Command,
    payload: &[u8],
) -> Result<(T, &[u8]), ProtocolError> {
    T::read_from_prefix(payload).map_err(|_| ProtocolError::PayloadTooShort {
        command,
        min: size_of::<T>(),
        actual: payload.len(),
    })
}

/// Reads a fixed struct that must be the whole `payload`.
pub(crate) fn read_exact<T: FromBytes>(
    command: Command,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    T::read_from_bytes(payload).map_err(|_| ProtocolError::PayloadSize {
        command,
        expected: size_of::<T>(),
        actual: payload.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_round_trips_through_its_number() {
        for command in Command::ALL {
            assert_eq!(Command::from_raw(command.raw()), Some(command));
        }
        for raw in [0, 14, 19, 0xffff] {
            assert_eq!(Command::from_raw(raw), None);
        }
    }

    #[test]
    fn max_message_is_one_data_transfer_plus_headers() {
        assert_eq!(MAX_MESSAGE_SIZE, 16 + 16 + (1 << 20));
    }

    #[test]
    fn errno_from_io_error_keeps_the_os_code() {
        assert_eq!(Errno::from(io::Error::from_raw_os_error(22)), Errno::EINVAL);
        assert_eq!(Errno::from(io::Error::other("x")), Errno::EIO);
    }

    #[test]
    fn error_reply_echoes_id_and_command() {
        let request = Header::command(7, Command::RegionRead, 16);
        let reply = Header::error_reply(&request, Errno::EINVAL);
        assert_eq!(reply.msg_id, 7);
        assert_eq!(reply.command, 9);
        assert!(reply.is_reply() && reply.is_error());
        assert_eq!(reply.error, 22);
        assert_eq!(reply.msg_size, 16);
    }

    #[test]
    fn a_command_is_not_a_reply() {
        let command = Header::command(7, Command::DeviceReset, 0);
        assert!(!command.is_reply());
        assert!(Header::reply(&command, 0).is_reply());
    }

    #[test]
    fn the_payload_length_is_the_message_size_less_the_header() {
        assert_eq!(
            Header::command(1, Command::RegionWrite, 20).payload_len(),
            Some(20)
        );
        assert_eq!(
            Header::command(1, Command::DeviceReset, 0).payload_len(),
            Some(0)
        );
        let mut short = Header::command(1, Command::DeviceReset, 0);
        short.msg_size = 15;
        assert_eq!(short.payload_len(), None);
    }

    #[test]
    fn an_errno_is_its_number_and_reads_as_the_os_message() {
        assert_eq!(Errno::EINVAL.raw(), 22);
        assert_eq!(
            Errno::EINVAL.to_string(),
            io::Error::from_raw_os_error(22).to_string()
        );
        assert_eq!(Errno(u32::MAX).to_string(), "errno 4294967295");
    }

    #[test]
    fn a_reply_too_large_to_send_is_refused_with_e2big() {
        let error = ProtocolError::ReplyTooLarge {
            command: Command::DeviceGetRegionInfo,
            size: 1 << 21,
        };
        assert_eq!(error.errno(), Errno::E2BIG);
    }
}
