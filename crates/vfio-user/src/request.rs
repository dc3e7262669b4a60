//! Commands from client to server: the validating decoder the server runs on every message,
//! and the encoders the client uses.
//!
//! The decoder checks the header (a command, known flag bits, a known and implemented
//! command), then the payload against the command's layout: exact sizes, `argsz` against the
//! payload or the smallest reply, flag words, counts against the data and the fds attached,
//! and ranges that must not overflow. It never panics and allocates at most the payload it is
//! given (for `DATA_BOOL`, one `bool` per payload byte).

use std::os::fd::OwnedFd;

use bitflags::bitflags;
use zerocopy::IntoBytes;

use crate::info::DmaProt;
use crate::protocol::{
    Command, FLAGS_ERROR, FLAGS_KNOWN, FLAGS_TYPE_COMMAND, Header, MAX_DATA_XFER_SIZE,
    ProtocolError, RawDmaMap, RawDmaUnmap, RawIrqInfo, RawIrqSet, RawRegionAccess, RawRegionInfo,
    RawRegionIoFds, read_exact, read_prefix,
};
use crate::version::Version;

/// `VFIO_DMA_UNMAP_FLAG_ALL` (QEMU's value, from `<linux/vfio.h>`): unmap every mapping;
/// address and size must be 0.
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

bitflags! {
    /// `struct vfio_irq_set` flags: one `DATA_*` bit and one `ACTION_*` bit.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct IrqSetFlags: u32 {
        /// `VFIO_IRQ_SET_DATA_NONE`: no data; the action applies to the whole range.
        const DATA_NONE = 1 << 0;
        /// `VFIO_IRQ_SET_DATA_BOOL`: `count` bytes follow, one per sub-index.
        const DATA_BOOL = 1 << 1;
        /// `VFIO_IRQ_SET_DATA_EVENTFD`: `count` eventfds attached (none: de-assign).
        const DATA_EVENTFD = 1 << 2;
        /// `VFIO_IRQ_SET_ACTION_MASK`.
        const ACTION_MASK = 1 << 3;
        /// `VFIO_IRQ_SET_ACTION_UNMASK`.
        const ACTION_UNMASK = 1 << 4;
        /// `VFIO_IRQ_SET_ACTION_TRIGGER`.
        const ACTION_TRIGGER = 1 << 5;
    }
}

/// What a `SET_IRQS` does to the interrupts it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqAction {
    /// `ACTION_MASK`.
    Mask,
    /// `ACTION_UNMASK`.
    Unmask,
    /// `ACTION_TRIGGER`: with eventfds, the fds the device signals for these interrupts.
    Trigger,
}

/// The data of a `SET_IRQS`.
#[derive(Debug)]
pub enum IrqData {
    /// `DATA_NONE`: act on every sub-index of the range (with `count` 0 and `TRIGGER`:
    /// disable every interrupt of the index).
    None,
    /// `DATA_BOOL`: act on the sub-indices whose byte is non-zero.
    Bool(Vec<bool>),
    /// `DATA_EVENTFD`: one eventfd per sub-index, in order; empty means de-assign the range.
    Eventfds(Vec<OwnedFd>),
}

/// A validated `VFIO_USER_DEVICE_SET_IRQS`.
#[derive(Debug)]
pub struct SetIrqs {
    /// IRQ index.
    pub index: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indices (0 only with [`IrqData::None`], meaning "all").
    pub count: u32,
    /// The action.
    pub action: IrqAction,
    /// The data.
    pub data: IrqData,
}

/// A validated `VFIO_USER_DMA_MAP`.
#[derive(Debug)]
pub struct DmaMap {
    /// Access granted to the device.
    pub prot: DmaProt,
    /// Offset of the mapping in `fd`.
    pub offset: u64,
    /// DMA (IOVA) address.
    pub iova: u64,
    /// Size in bytes (non-zero; `iova + size` does not overflow).
    pub size: u64,
    /// The memory, if the client shares it (otherwise the server would use `DMA_READ`/`WRITE`,
    /// which this crate does not implement).
    pub fd: Option<OwnedFd>,
}

/// A validated `VFIO_USER_DMA_UNMAP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    /// DMA address of the mapping (0 with `all`).
    pub iova: u64,
    /// Its size (0 with `all`).
    pub size: u64,
    /// `VFIO_DMA_UNMAP_FLAG_ALL`: every mapping.
    pub all: bool,
}

/// A validated command.
#[derive(Debug)]
pub enum Request<'a> {
    /// `VFIO_USER_VERSION`.
    Version(Version),
    /// `VFIO_USER_DMA_MAP`.
    DmaMap(DmaMap),
    /// `VFIO_USER_DMA_UNMAP`; `raw` is echoed in the reply.
    DmaUnmap {
        /// The request.
        unmap: DmaUnmap,
        /// The request as sent, which the reply echoes.
        raw: RawDmaUnmap,
    },
    /// `VFIO_USER_DEVICE_GET_INFO`.
    DeviceGetInfo,
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`.
    GetRegionInfo {
        /// Largest reply payload (at least 32).
        argsz: u32,
        /// Region index.
        index: u32,
    },
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`.
    GetRegionIoFds {
        /// Largest reply payload (at least 16).
        argsz: u32,
        /// Region index.
        index: u32,
    },
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
    GetIrqInfo {
        /// IRQ index.
        index: u32,
    },
    /// `VFIO_USER_DEVICE_SET_IRQS`.
    SetIrqs(SetIrqs),
    /// `VFIO_USER_REGION_READ`.
    RegionRead {
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes to read (at most [`MAX_DATA_XFER_SIZE`]).
        count: u32,
    },
    /// `VFIO_USER_REGION_WRITE`.
    RegionWrite {
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// The bytes (at most [`MAX_DATA_XFER_SIZE`]).
        data: &'a [u8],
    },
    /// `VFIO_USER_DEVICE_RESET`.
    DeviceReset,
}

/// Checks a command's header and returns its command: a command message (not a reply), only
/// defined flag bits and no `Error` bit, a known command that this crate implements.
pub fn check_command_header(header: &Header) -> Result<Command, ProtocolError> {
    if header.message_type() != FLAGS_TYPE_COMMAND {
        return Err(ProtocolError::MessageType {
            found: header.message_type(),
            expected: FLAGS_TYPE_COMMAND,
        });
    }
    if header.flags & !FLAGS_KNOWN != 0 || header.flags & FLAGS_ERROR != 0 {
        return Err(ProtocolError::HeaderFlags(header.flags));
    }
    let command =
        Command::from_raw(header.command).ok_or(ProtocolError::UnknownCommand(header.command))?;
    if !command.is_implemented() {
        return Err(ProtocolError::Unimplemented(command));
    }
    Ok(command)
}

fn no_fds(command: Command, fds: &[OwnedFd]) -> Result<(), ProtocolError> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::FdCount {
            command,
            expected: "none allowed",
            actual: fds.len(),
        })
    }
}

fn argsz_at_least(command: Command, argsz: u32, min: usize) -> Result<(), ProtocolError> {
    if (argsz as usize) < min {
        return Err(ProtocolError::Argsz {
            command,
            argsz,
            why: "smaller than the fixed reply",
        });
    }
    Ok(())
}

fn transfer(command: Command, offset: u64, count: u32) -> Result<(), ProtocolError> {
    if count > MAX_DATA_XFER_SIZE {
        return Err(ProtocolError::TransferTooLarge {
            command,
            count,
            max: MAX_DATA_XFER_SIZE,
        });
    }
    if offset.checked_add(u64::from(count)).is_none() {
        return Err(ProtocolError::Field {
            command,
            what: "offset + count overflows",
        });
    }
    Ok(())
}

/// Decodes and validates the payload and fds of a command whose header passed
/// [`check_command_header`]. The fds move into the request (or are closed with the error).
pub fn decode_request(
    command: Command,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Request<'_>, ProtocolError> {
    match command {
        Command::Version => {
            no_fds(command, &fds)?;
            Ok(Request::Version(Version::decode(payload)?))
        }
        Command::DmaMap => decode_dma_map(payload, fds).map(Request::DmaMap),
        Command::DmaUnmap => {
            no_fds(command, &fds)?;
            decode_dma_unmap(payload)
        }
        Command::DeviceGetInfo => {
            no_fds(command, &fds)?;
            decode_device_get_info(payload)
        }
        Command::DeviceGetRegionInfo => {
            no_fds(command, &fds)?;
            decode_get_region_info(payload)
        }
        Command::DeviceGetRegionIoFds => {
            no_fds(command, &fds)?;
            decode_get_region_io_fds(payload)
        }
        Command::DeviceGetIrqInfo => {
            no_fds(command, &fds)?;
            decode_get_irq_info(payload)
        }
        Command::DeviceSetIrqs => decode_set_irqs(payload, fds).map(Request::SetIrqs),
        Command::RegionRead => {
            no_fds(command, &fds)?;
            decode_region_read(payload)
        }
        Command::RegionWrite => {
            no_fds(command, &fds)?;
            decode_region_write(payload)
        }
        Command::DeviceReset => {
            no_fds(command, &fds)?;
            decode_device_reset(payload)
        }
        Command::DmaRead
        | Command::DmaWrite
        | Command::RegionWriteMulti
        | Command::DeviceFeature
        | Command::MigDataRead
        | Command::MigDataWrite => Err(ProtocolError::Unimplemented(command)),
    }
}

fn decode_dma_map(payload: &[u8], mut fds: Vec<OwnedFd>) -> Result<DmaMap, ProtocolError> {
    let command = Command::DmaMap;
    let raw: RawDmaMap = read_exact(command, payload)?;
    if raw.argsz as usize != size_of::<RawDmaMap>() {
        return Err(ProtocolError::Argsz {
            command,
            argsz: raw.argsz,
            why: "DMA_MAP's argsz is its payload size, 32",
        });
    }
    let prot = DmaProt::from_bits(raw.flags).ok_or(ProtocolError::Flags {
        command,
        flags: raw.flags,
    })?;
    if raw.size == 0 {
        return Err(ProtocolError::Field {
            command,
            what: "size is 0",
        });
    }
    if raw.address.checked_add(raw.size).is_none() || raw.offset.checked_add(raw.size).is_none() {
        return Err(ProtocolError::Field {
            command,
            what: "address or offset + size overflows",
        });
    }
    if fds.len() > 1 {
        return Err(ProtocolError::FdCount {
            command,
            expected: "0 or 1 allowed",
            actual: fds.len(),
        });
    }
    Ok(DmaMap {
        prot,
        offset: raw.offset,
        iova: raw.address,
        size: raw.size,
        fd: fds.pop(),
    })
}

fn decode_dma_unmap(payload: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let command = Command::DmaUnmap;
    let raw: RawDmaUnmap = read_exact(command, payload)?;
    argsz_at_least(command, raw.argsz, size_of::<RawDmaUnmap>())?;
    let all = match raw.flags {
        0 => false,
        DMA_UNMAP_FLAG_ALL => true,
        flags => return Err(ProtocolError::Flags { command, flags }),
    };
    if all && (raw.address != 0 || raw.size != 0) {
        return Err(ProtocolError::Field {
            command,
            what: "unmap all with a non-zero address or size",
        });
    }
    if !all && (raw.size == 0 || raw.address.checked_add(raw.size).is_none()) {
        return Err(ProtocolError::Field {
            command,
            what: "size is 0 or address + size overflows",
        });
    }
    Ok(Request::DmaUnmap {
        unmap: DmaUnmap {
            iova: raw.address,
            size: raw.size,
            all,
        },
        raw,
    })
}

fn decode_device_get_info(payload: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let command = Command::DeviceGetInfo;
    // The request is a `struct vfio_device_info` whose fields other than argsz are
    // outputs; they are ignored, as the kernel ignores them.
    let info: crate::protocol::RawDeviceInfo = read_exact(command, payload)?;
    argsz_at_least(command, info.argsz, 16)?;
    Ok(Request::DeviceGetInfo)
}

fn decode_get_region_info(payload: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let command = Command::DeviceGetRegionInfo;
    let raw: RawRegionInfo = read_exact(command, payload)?;
    argsz_at_least(command, raw.argsz, size_of::<RawRegionInfo>())?;
    Ok(Request::GetRegionInfo {
        argsz: raw.argsz,
        index: raw.index,
    })
}

fn decode_get_region_io_fds(payload: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let command = Command::DeviceGetRegionIoFds;
    let raw: RawRegionIoFds = read_exact(command, payload)?;
    argsz_at_least(command, raw.argsz, size_of::<RawRegionIoFds>())?;
    if raw.flags != 0 {
        return Err(ProtocolError::Flags {
            command,
            flags: raw.flags,
        });
    }
    if raw.count != 0 {
        return Err(ProtocolError::Field {
            command,
            what: "count must be 0 in a request",
        });
    }
    Ok(Request::GetRegionIoFds {
        argsz: raw.argsz,
        index: raw.index,
    })
}

fn decode_get_irq_info(payload: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let command = Command::DeviceGetIrqInfo;
    let raw: RawIrqInfo = read_exact(command, payload)?;
    argsz_at_least(command, raw.argsz, size_of::<RawIrqInfo>())?;
    Ok(Request::GetIrqInfo { index: raw.index })
}

fn decode_region_read(payload: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let command = Command::RegionRead;
    let raw: RawRegionAccess = read_exact(command, payload)?;
    transfer(command, raw.offset, raw.count)?;
    Ok(Request::RegionRead {
        region: raw.region,
        offset: raw.offset,
        count: raw.count,
    })
}

fn decode_region_write(payload: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let command = Command::RegionWrite;
    let (raw, data) = read_prefix::<RawRegionAccess>(command, payload)?;
    transfer(command, raw.offset, raw.count)?;
    if data.len() != raw.count as usize {
        return Err(ProtocolError::PayloadSize {
            command,
            expected: size_of::<RawRegionAccess>() + raw.count as usize,
            actual: payload.len(),
        });
    }
    Ok(Request::RegionWrite {
        region: raw.region,
        offset: raw.offset,
        data,
    })
}

fn decode_device_reset(payload: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let command = Command::DeviceReset;
    if !payload.is_empty() {
        return Err(ProtocolError::PayloadSize {
            command,
            expected: 0,
            actual: payload.len(),
        });
    }
    Ok(Request::DeviceReset)
}

fn decode_set_irqs(payload: &[u8], fds: Vec<OwnedFd>) -> Result<SetIrqs, ProtocolError> {
    let command = Command::DeviceSetIrqs;
    let (raw, data) = read_prefix::<RawIrqSet>(command, payload)?;
    if raw.argsz as usize != payload.len() {
        return Err(ProtocolError::Argsz {
            command,
            argsz: raw.argsz,
            why: "SET_IRQS's argsz is its payload size",
        });
    }
    let flags = IrqSetFlags::from_bits(raw.flags).ok_or(ProtocolError::Flags {
        command,
        flags: raw.flags,
    })?;
    let data_flags =
        flags & (IrqSetFlags::DATA_NONE | IrqSetFlags::DATA_BOOL | IrqSetFlags::DATA_EVENTFD);
    let action = match flags - data_flags {
        a if a == IrqSetFlags::ACTION_MASK => IrqAction::Mask,
        a if a == IrqSetFlags::ACTION_UNMASK => IrqAction::Unmask,
        a if a == IrqSetFlags::ACTION_TRIGGER => IrqAction::Trigger,
        _ => {
            return Err(ProtocolError::Flags {
                command,
                flags: raw.flags,
            });
        }
    };
    if raw.start.checked_add(raw.count).is_none() {
        return Err(ProtocolError::Field {
            command,
            what: "start + count overflows",
        });
    }
    let irq_data = if data_flags == IrqSetFlags::DATA_NONE {
        no_fds(command, &fds)?;
        expect_no_data(data)?;
        if raw.count == 0 && raw.start != 0 {
            return Err(ProtocolError::Field {
                command,
                what: "count 0 (all) with a non-zero start",
            });
        }
        IrqData::None
    } else if data_flags == IrqSetFlags::DATA_BOOL {
        no_fds(command, &fds)?;
        if raw.count == 0 {
            return Err(ProtocolError::Field {
                command,
                what: "count is 0",
            });
        }
        if data.len() != raw.count as usize {
            return Err(ProtocolError::PayloadSize {
                command,
                expected: size_of::<RawIrqSet>() + raw.count as usize,
                actual: payload.len(),
            });
        }
        IrqData::Bool(data.iter().map(|&b| b != 0).collect())
    } else if data_flags == IrqSetFlags::DATA_EVENTFD {
        expect_no_data(data)?;
        if raw.count == 0 {
            return Err(ProtocolError::Field {
                command,
                what: "count is 0",
            });
        }
        if !fds.is_empty() && fds.len() != raw.count as usize {
            return Err(ProtocolError::FdCount {
                command,
                expected: "one per sub-index (count), or none to de-assign",
                actual: fds.len(),
            });
        }
        IrqData::Eventfds(fds)
    } else {
        return Err(ProtocolError::Flags {
            command,
            flags: raw.flags,
        });
    };
    Ok(SetIrqs {
        index: raw.index,
        start: raw.start,
        count: raw.count,
        action,
        data: irq_data,
    })
}

fn expect_no_data(data: &[u8]) -> Result<(), ProtocolError> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::PayloadSize {
            command: Command::DeviceSetIrqs,
            expected: size_of::<RawIrqSet>(),
            actual: size_of::<RawIrqSet>() + data.len(),
        })
    }
}

/// Encoders for the client: each returns a command's payload.
pub mod encode {
    use super::*;
    use crate::protocol::RawDeviceInfo;

    /// `DEVICE_GET_INFO` asking for the 16-byte reply.
    pub fn device_get_info() -> Vec<u8> {
        RawDeviceInfo {
            argsz: size_of::<RawDeviceInfo>() as u32,
            ..Default::default()
        }
        .as_bytes()
        .to_vec()
    }

    /// `DEVICE_GET_REGION_INFO` for `index` with a reply of at most `argsz` bytes.
    pub fn get_region_info(index: u32, argsz: u32) -> Vec<u8> {
        RawRegionInfo {
            argsz,
            index,
            ..Default::default()
        }
        .as_bytes()
        .to_vec()
    }

    /// `DEVICE_GET_REGION_IO_FDS` for `index` with a reply of at most `argsz` bytes.
    pub fn get_region_io_fds(index: u32, argsz: u32) -> Vec<u8> {
        RawRegionIoFds {
            argsz,
            flags: 0,
            index,
            count: 0,
        }
        .as_bytes()
        .to_vec()
    }

    /// `DEVICE_GET_IRQ_INFO` for `index`.
    pub fn get_irq_info(index: u32) -> Vec<u8> {
        RawIrqInfo {
            argsz: size_of::<RawIrqInfo>() as u32,
            flags: 0,
            index,
            count: 0,
        }
        .as_bytes()
        .to_vec()
    }

    /// `DEVICE_SET_IRQS`; `bools` is the `DATA_BOOL` data (empty otherwise).
    pub fn set_irqs(
        flags: IrqSetFlags,
        index: u32,
        start: u32,
        count: u32,
        bools: &[u8],
    ) -> Vec<u8> {
        let raw = RawIrqSet {
            argsz: (size_of::<RawIrqSet>() + bools.len()) as u32,
            flags: flags.bits(),
            index,
            start,
            count,
        };
        let mut payload = raw.as_bytes().to_vec();
        payload.extend_from_slice(bools);
        payload
    }

    /// `DMA_MAP`.
    pub fn dma_map(prot: DmaProt, offset: u64, iova: u64, size: u64) -> Vec<u8> {
        RawDmaMap {
            argsz: size_of::<RawDmaMap>() as u32,
            flags: prot.bits(),
            offset,
            address: iova,
            size,
        }
        .as_bytes()
        .to_vec()
    }

    /// `DMA_UNMAP` (`all`: `VFIO_DMA_UNMAP_FLAG_ALL`, with address and size 0).
    pub fn dma_unmap(iova: u64, size: u64, all: bool) -> Vec<u8> {
        RawDmaUnmap {
            argsz: size_of::<RawDmaUnmap>() as u32,
            flags: if all { DMA_UNMAP_FLAG_ALL } else { 0 },
            address: iova,
            size,
        }
        .as_bytes()
        .to_vec()
    }

    /// `REGION_READ` of `count` bytes.
    pub fn region_read(region: u32, offset: u64, count: u32) -> Vec<u8> {
        RawRegionAccess {
            offset,
            region,
            count,
        }
        .as_bytes()
        .to_vec()
    }

    /// `REGION_WRITE` of `data` (callers keep it within the transfer limit).
    pub fn region_write(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
        let raw = RawRegionAccess {
            offset,
            region,
            count: u32::try_from(data.len()).unwrap_or(u32::MAX),
        };
        let mut payload = raw.as_bytes().to_vec();
        payload.extend_from_slice(data);
        payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_irqs_with_eventfds_needs_one_per_sub_index() {
        let payload = encode::set_irqs(
            IrqSetFlags::DATA_EVENTFD | IrqSetFlags::ACTION_TRIGGER,
            5,
            0,
            2,
            &[],
        );
        let fd = || OwnedFd::from(iopf_queue::Doorbell::new().unwrap());
        assert!(decode_request(Command::DeviceSetIrqs, &payload, vec![fd()]).is_err());
        assert!(decode_request(Command::DeviceSetIrqs, &payload, vec![fd(), fd()]).is_ok());
        // No fds: de-assign.
        assert!(decode_request(Command::DeviceSetIrqs, &payload, vec![]).is_ok());
    }

    #[test]
    fn set_irqs_needs_one_data_and_one_action() {
        for flags in [
            IrqSetFlags::DATA_NONE,
            IrqSetFlags::ACTION_TRIGGER,
            IrqSetFlags::DATA_NONE | IrqSetFlags::DATA_BOOL | IrqSetFlags::ACTION_TRIGGER,
            IrqSetFlags::DATA_NONE | IrqSetFlags::ACTION_MASK | IrqSetFlags::ACTION_TRIGGER,
        ] {
            let payload = encode::set_irqs(flags, 0, 0, 1, &[]);
            assert!(decode_request(Command::DeviceSetIrqs, &payload, vec![]).is_err());
        }
    }

    #[test]
    fn region_write_count_must_match_data() {
        let mut payload = encode::region_write(0, 0, &[1, 2, 3]);
        payload.push(4);
        assert!(decode_request(Command::RegionWrite, &payload, vec![]).is_err());
    }

    #[test]
    fn dma_map_refuses_two_fds_and_unknown_flags() {
        let payload = encode::dma_map(DmaProt::READ, 0, 0x1000, 0x1000);
        let fd = || OwnedFd::from(iopf_queue::Doorbell::new().unwrap());
        assert!(decode_request(Command::DmaMap, &payload, vec![fd(), fd()]).is_err());
        let mut bad = payload.clone();
        bad[4] = 0x8;
        assert!(decode_request(Command::DmaMap, &bad, vec![]).is_err());
    }

    #[test]
    fn reply_headers_and_error_bits_are_not_commands() {
        let mut header = Header::command(1, Command::DeviceReset, 0);
        header.flags = 1;
        assert!(check_command_header(&header).is_err());
        header.flags = FLAGS_ERROR;
        assert!(check_command_header(&header).is_err());
        header.flags = 1 << 8;
        assert!(check_command_header(&header).is_err());
        header.flags = 0;
        header.command = 14;
        assert_eq!(
            check_command_header(&header),
            Err(ProtocolError::UnknownCommand(14))
        );
        header.command = Command::DmaRead.raw();
        assert_eq!(
            check_command_header(&header).unwrap_err().errno(),
            crate::protocol::Errno::ENOSYS
        );
    }

    // Catches: a request whose argsz leaves no room for the fixed reply (the reply would be
    // larger than the client asked for).
    #[test]
    fn an_argsz_smaller_than_the_fixed_reply_is_refused() {
        let small = encode::get_region_info(0, 8);
        assert!(matches!(
            decode_request(Command::DeviceGetRegionInfo, &small, vec![]),
            Err(ProtocolError::Argsz { argsz: 8, .. })
        ));
        let fits = encode::get_region_info(0, 32);
        assert!(decode_request(Command::DeviceGetRegionInfo, &fits, vec![]).is_ok());
    }

    #[test]
    fn a_transfer_moves_at_most_max_data_xfer_size() {
        let largest = encode::region_read(0, 0, MAX_DATA_XFER_SIZE);
        assert!(decode_request(Command::RegionRead, &largest, vec![]).is_ok());
        let past = encode::region_read(0, 0, MAX_DATA_XFER_SIZE + 1);
        assert!(matches!(
            decode_request(Command::RegionRead, &past, vec![]),
            Err(ProtocolError::TransferTooLarge { .. })
        ));
    }

    #[test]
    fn a_dma_map_whose_address_or_offset_overflows_is_refused() {
        let near_end = u64::MAX - 0x100;
        for payload in [
            encode::dma_map(DmaProt::READ, 0, near_end, 0x1000),
            encode::dma_map(DmaProt::READ, near_end, 0x1000, 0x1000),
        ] {
            assert!(matches!(
                decode_request(Command::DmaMap, &payload, vec![]),
                Err(ProtocolError::Field { .. })
            ));
        }
    }

    #[test]
    fn unmap_all_with_an_address_or_a_size_is_refused() {
        for payload in [
            encode::dma_unmap(0x1000, 0, true),
            encode::dma_unmap(0, 0x1000, true),
        ] {
            assert!(matches!(
                decode_request(Command::DmaUnmap, &payload, vec![]),
                Err(ProtocolError::Field { .. })
            ));
        }
        assert!(decode_request(Command::DmaUnmap, &encode::dma_unmap(0, 0, true), vec![]).is_ok());
    }

    #[test]
    fn unmapping_nothing_or_past_the_end_of_the_address_space_is_refused() {
        for payload in [
            encode::dma_unmap(0x1000, 0, false),
            encode::dma_unmap(u64::MAX - 0x100, 0x1000, false),
        ] {
            assert!(matches!(
                decode_request(Command::DmaUnmap, &payload, vec![]),
                Err(ProtocolError::Field { .. })
            ));
        }
    }

    #[test]
    fn set_irqs_without_data_may_name_a_range_but_count_0_means_all_from_0() {
        let flags = IrqSetFlags::DATA_NONE | IrqSetFlags::ACTION_MASK;
        let range = encode::set_irqs(flags, 0, 3, 2, &[]);
        assert!(decode_request(Command::DeviceSetIrqs, &range, vec![]).is_ok());
        let all_from_3 = encode::set_irqs(flags, 0, 3, 0, &[]);
        assert!(matches!(
            decode_request(Command::DeviceSetIrqs, &all_from_3, vec![]),
            Err(ProtocolError::Field { .. })
        ));
    }

    #[test]
    fn bool_data_is_one_byte_per_sub_index_and_a_mismatch_says_how_many() {
        let flags = IrqSetFlags::DATA_BOOL | IrqSetFlags::ACTION_MASK;
        let payload = encode::set_irqs(flags, 0, 0, 3, &[1, 0]);
        assert!(matches!(
            decode_request(Command::DeviceSetIrqs, &payload, vec![]),
            Err(ProtocolError::PayloadSize {
                expected: 23,
                actual: 22,
                ..
            })
        ));
        let payload = encode::set_irqs(flags, 0, 0, 3, &[1, 0, 1]);
        assert!(decode_request(Command::DeviceSetIrqs, &payload, vec![]).is_ok());
    }

    #[test]
    fn set_irqs_without_bool_data_carries_no_data() {
        for flags in [IrqSetFlags::DATA_NONE, IrqSetFlags::DATA_EVENTFD] {
            let payload = encode::set_irqs(flags | IrqSetFlags::ACTION_TRIGGER, 0, 0, 1, &[1, 1]);
            assert!(matches!(
                decode_request(Command::DeviceSetIrqs, &payload, vec![]),
                Err(ProtocolError::PayloadSize {
                    expected: 20,
                    actual: 22,
                    ..
                })
            ));
        }
    }

    #[test]
    fn a_region_write_whose_data_is_not_its_count_says_how_long_it_should_be() {
        let mut payload = encode::region_write(0, 0, &[1, 2, 3]);
        payload.push(4);
        assert!(matches!(
            decode_request(Command::RegionWrite, &payload, vec![]),
            Err(ProtocolError::PayloadSize {
                expected: 19,
                actual: 20,
                ..
            })
        ));
    }
}
