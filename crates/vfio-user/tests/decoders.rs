//! Property tests of the decoders: arbitrary bytes never panic them, what the encoders write
//! decodes back to what was encoded, and what decodes encodes back to the bytes it came from
//! (but for the fields a decoder does not read, named where they are masked).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use iopf_queue::Doorbell;
use iopf_vfio_user::IrqAction;
use iopf_vfio_user::connection::Connection;
use iopf_vfio_user::info::{IoFdsReply, RegionInfoReply, decode_io_fds_reply, encode_io_fds_reply};
use iopf_vfio_user::protocol::{HEADER_SIZE, MAX_PAYLOAD_SIZE};
use iopf_vfio_user::request::{Request, check_command_header, decode_request, encode};
use iopf_vfio_user::version::{MigrationCapabilities, TwinSocket};
use iopf_vfio_user::{
    Capabilities, Command, DeviceFlags, DeviceInfo, DmaProt, Header, IoFd, IoFdKind, IrqData,
    IrqFlags, IrqInfo, IrqSetFlags, RegionCapability, RegionFlags, RegionInfo, SparseMmapArea,
    Version,
};
use proptest::prelude::*;
use zerocopy::FromBytes;

fn command() -> impl Strategy<Value = Command> {
    prop::sample::select(Command::ALL.to_vec())
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    (
        (
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            any::<Option<u64>>(),
        ),
        (
            any::<Option<(u64, Option<u64>)>>(),
            any::<Option<(bool, Option<u32>)>>(),
            any::<Option<bool>>(),
        ),
    )
        .prop_map(
            |(
                (max_msg_fds, max_data_xfer_size, max_dma_maps, pgsizes),
                (migration, twin, multi),
            )| {
                Capabilities {
                    max_msg_fds,
                    max_data_xfer_size,
                    max_dma_maps,
                    pgsizes,
                    migration: migration.map(|(pgsize, max_bitmap_size)| MigrationCapabilities {
                        pgsize,
                        max_bitmap_size,
                    }),
                    twin_socket: twin.map(|(supported, fd_index)| TwinSocket {
                        supported,
                        fd_index,
                    }),
                    write_multiple: multi,
                }
            },
        )
}

fn region_capability() -> impl Strategy<Value = RegionCapability> {
    prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(region_type, subtype)| RegionCapability::Type {
            region_type,
            subtype
        }),
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..8).prop_map(|areas| {
            RegionCapability::SparseMmap(
                areas
                    .into_iter()
                    .map(|(offset, size)| SparseMmapArea { offset, size })
                    .collect(),
            )
        }),
    ]
}

fn region_info() -> impl Strategy<Value = RegionInfo> {
    (
        0u32..8,
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(region_capability(), 0..4),
    )
        .prop_map(|(flags, size, mmap_offset, caps)| RegionInfo {
            flags: RegionFlags::from_bits_truncate(flags),
            size,
            mmap_offset,
            caps,
        })
}

/// The payload of a valid command, as the client's encoders write it.
fn valid_request() -> impl Strategy<Value = (Command, Vec<u8>)> {
    let set_irqs = (0usize..3, 0usize..3, any::<u32>(), 0u32..1024, 1u32..32).prop_map(
        |(data, action, index, start, count)| {
            let action = [
                IrqSetFlags::ACTION_MASK,
                IrqSetFlags::ACTION_UNMASK,
                IrqSetFlags::ACTION_TRIGGER,
            ][action];
            let (flags, bools) = match data {
                0 => (IrqSetFlags::DATA_NONE, Vec::new()),
                1 => (
                    IrqSetFlags::DATA_BOOL,
                    (0..count).map(|i| (i % 2) as u8).collect(),
                ),
                _ => (IrqSetFlags::DATA_EVENTFD, Vec::new()),
            };
            let count = if flags == IrqSetFlags::DATA_NONE {
                0
            } else {
                count
            };
            let start = if count == 0 { 0 } else { start };
            let payload = encode::set_irqs(flags | action, index, start, count, &bools);
            (Command::DeviceSetIrqs, payload)
        },
    );
    prop_oneof![
        Just((Command::DeviceGetInfo, encode::device_get_info())),
        (any::<u32>(), 32u32..).prop_map(|(index, argsz)| {
            (
                Command::DeviceGetRegionInfo,
                encode::get_region_info(index, argsz),
            )
        }),
        (any::<u32>(), 16u32..).prop_map(|(index, argsz)| {
            (
                Command::DeviceGetRegionIoFds,
                encode::get_region_io_fds(index, argsz),
            )
        }),
        any::<u32>().prop_map(|index| (Command::DeviceGetIrqInfo, encode::get_irq_info(index))),
        set_irqs,
        (0u32..4, 0u64..(1 << 48), 0u64..(1 << 48), 1u64..(1 << 40)).prop_map(
            |(prot, offset, iova, size)| {
                let prot = DmaProt::from_bits_truncate(prot);
                (Command::DmaMap, encode::dma_map(prot, offset, iova, size))
            }
        ),
        (0u64..(1 << 48), 1u64..(1 << 40), any::<bool>()).prop_map(|(iova, size, all)| {
            let (iova, size) = if all { (0, 0) } else { (iova, size) };
            (Command::DmaUnmap, encode::dma_unmap(iova, size, all))
        }),
        (any::<u32>(), 0u64..(1 << 40), 0u32..4096).prop_map(|(region, offset, count)| {
            (
                Command::RegionRead,
                encode::region_read(region, offset, count),
            )
        }),
        (
            any::<u32>(),
            0u64..(1 << 40),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(region, offset, data)| {
                (
                    Command::RegionWrite,
                    encode::region_write(region, offset, &data),
                )
            }),
        Just((Command::DeviceReset, Vec::new())),
        (any::<u16>(), any::<u16>(), capabilities()).prop_map(|(major, minor, capabilities)| {
            (
                Command::Version,
                Version {
                    major,
                    minor,
                    capabilities,
                }
                .encode(),
            )
        }),
    ]
}

/// Up to three bytes of `payload` overwritten: some still decode, most do not.
fn mutate<T: std::fmt::Debug + Clone>(
    valid: impl Strategy<Value = (T, Vec<u8>)>,
) -> impl Strategy<Value = (T, Vec<u8>)> {
    (
        valid,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..=3),
    )
        .prop_map(|((what, mut payload), edits)| {
            if !payload.is_empty() {
                for (at, value) in edits {
                    let at = at.index(payload.len());
                    payload[at] = value;
                }
            }
            (what, payload)
        })
}

/// The payload the client's encoder writes for a decoded request.
fn re_encode(request: &Request<'_>) -> Vec<u8> {
    match request {
        Request::Version(version) => version.encode(),
        Request::DmaMap(map) => encode::dma_map(map.prot, map.offset, map.iova, map.size),
        Request::DmaUnmap { unmap, .. } => encode::dma_unmap(unmap.iova, unmap.size, unmap.all),
        Request::DeviceGetInfo => encode::device_get_info(),
        Request::GetRegionInfo { argsz, index } => encode::get_region_info(*index, *argsz),
        Request::GetRegionIoFds { argsz, index } => encode::get_region_io_fds(*index, *argsz),
        Request::GetIrqInfo { index } => encode::get_irq_info(*index),
        Request::SetIrqs(set) => {
            let action = match set.action {
                IrqAction::Mask => IrqSetFlags::ACTION_MASK,
                IrqAction::Unmask => IrqSetFlags::ACTION_UNMASK,
                IrqAction::Trigger => IrqSetFlags::ACTION_TRIGGER,
            };
            let (data, bools) = match &set.data {
                IrqData::None => (IrqSetFlags::DATA_NONE, Vec::new()),
                IrqData::Bool(bools) => (
                    IrqSetFlags::DATA_BOOL,
                    bools.iter().map(|&b| u8::from(b)).collect(),
                ),
                IrqData::Eventfds(_) => (IrqSetFlags::DATA_EVENTFD, Vec::new()),
            };
            encode::set_irqs(data | action, set.index, set.start, set.count, &bools)
        }
        Request::RegionRead {
            region,
            offset,
            count,
        } => encode::region_read(*region, *offset, *count),
        Request::RegionWrite {
            region,
            offset,
            data,
        } => encode::region_write(*region, *offset, data),
        Request::DeviceReset => Vec::new(),
    }
}

/// Overwrites `range` of `bytes` with `value` (native-endian `u32`s, as the payloads are).
fn put(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

/// `payload` with the fields `command`'s decoder does not read set as the encoder writes them:
/// an `argsz` that is only a lower bound, the output fields of a `GET` request (ignored, as
/// the kernel ignores them), and `DATA_BOOL` bytes (any non-zero byte is `true`).
fn canonical(command: Command, payload: &[u8]) -> Vec<u8> {
    let mut bytes = payload.to_vec();
    match command {
        Command::DeviceGetInfo => bytes = encode::device_get_info(),
        Command::DeviceGetRegionInfo => {
            bytes[4..8].fill(0);
            bytes[12..32].fill(0);
        }
        Command::DeviceGetIrqInfo => {
            put(&mut bytes, 0, 16);
            bytes[4..8].fill(0);
            bytes[12..16].fill(0);
        }
        Command::DmaUnmap => put(&mut bytes, 0, 24),
        Command::DeviceSetIrqs => {
            for b in &mut bytes[20..] {
                *b = u8::from(*b != 0);
            }
        }
        _ => {}
    }
    bytes
}

/// A valid region info reply for some index, as a server writes it.
fn valid_region_info_reply() -> impl Strategy<Value = (u32, Vec<u8>)> {
    (region_info(), any::<u32>())
        .prop_map(|(region, index)| (index, region.encode_reply(index, u32::MAX).unwrap()))
}

proptest! {
    #[test]
    fn near_valid_requests_that_decode_re_encode_to_the_same_bytes(
        (command, payload) in mutate(valid_request()),
    ) {
        let Ok(request) = decode_request(command, &payload, Vec::new()) else {
            return Ok(());
        };
        if let Request::Version(version) = &request {
            // JSON has no one encoding: what decodes must decode the same once re-encoded.
            prop_assert_eq!(&Version::decode(&version.encode()).unwrap(), version);
        } else {
            prop_assert_eq!(re_encode(&request), canonical(command, &payload));
        }
    }

    #[test]
    fn near_valid_device_and_irq_info_replies_that_decode_re_encode_to_the_same_bytes(
        (index, payload) in mutate(
            (any::<u32>(), 0u32..8, 0u32..8, 0u32..16, any::<u32>(), any::<u32>()).prop_map(
                |(flags, num_regions, num_irqs, irq_flags, count, index)| {
                    let device = DeviceInfo {
                        flags: DeviceFlags::from_bits_retain(flags),
                        num_regions,
                        num_irqs,
                    };
                    let irq = IrqInfo { flags: IrqFlags::from_bits_truncate(irq_flags), count };
                    let mut both = device.encode_reply().to_vec();
                    both.extend_from_slice(&irq.encode_reply(index));
                    (index, both)
                },
            ),
        ),
    ) {
        // argsz is only a lower bound in a device info reply, and unread in an IRQ info reply.
        let (device_bytes, irq_bytes) = payload.split_at(16);
        if let Ok(device) = DeviceInfo::decode_reply(device_bytes) {
            let mut expected = device_bytes.to_vec();
            put(&mut expected, 0, 16);
            prop_assert_eq!(&device.encode_reply()[..], &expected[..]);
        }
        if let Ok(irq) = IrqInfo::decode_reply(irq_bytes, index) {
            let mut expected = irq_bytes.to_vec();
            put(&mut expected, 0, 16);
            prop_assert_eq!(&irq.encode_reply(index)[..], &expected[..]);
        }
    }

    /// Capabilities may lie anywhere after the fixed part, so a region info reply has no one
    /// encoding: what decodes must decode the same once re-encoded (capabilities the encoder
    /// cannot send, unknown ones, left out).
    #[test]
    fn near_valid_region_info_replies_that_decode_re_encode_to_the_same_region(
        (index, payload) in mutate(valid_region_info_reply()),
    ) {
        if let Ok(RegionInfoReply::Complete(mut region)) = RegionInfo::decode_reply(&payload, index, u32::MAX) {
            region.caps.retain(|cap| !matches!(cap, RegionCapability::Unknown { .. }));
            let again = region.encode_reply(index, u32::MAX).unwrap();
            prop_assert_eq!(
                RegionInfo::decode_reply(&again, index, u32::MAX).unwrap(),
                RegionInfoReply::Complete(region)
            );
        }
    }

    #[test]
    fn request_decoder_never_panics(
        command in command(),
        payload in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = decode_request(command, &payload, Vec::new());
    }

    #[test]
    fn header_check_never_panics(bytes in prop::array::uniform16(any::<u8>())) {
        let header = Header::read_from_bytes(&bytes).unwrap();
        let _ = check_command_header(&header);
    }

    #[test]
    fn reply_decoders_never_panic(
        payload in prop::collection::vec(any::<u8>(), 0..512),
        index in any::<u32>(),
        argsz in any::<u32>(),
        fd_count in 0usize..20,
    ) {
        let _ = Version::decode(&payload);
        let _ = DeviceInfo::decode_reply(&payload);
        let _ = IrqInfo::decode_reply(&payload, index);
        let _ = RegionInfo::decode_reply(&payload, index, argsz);
        let _ = decode_io_fds_reply(&payload, index, argsz, fd_count);
    }

    /// A region info reply built around an arbitrary capability area, with a consistent
    /// fixed part, so the capability walker sees hostile lists rather than early refusals.
    #[test]
    fn capability_walker_never_panics(
        caps in prop::collection::vec(any::<u8>(), 0..256),
        cap_offset in 0u32..320,
    ) {
        let mut payload = RegionInfo::default().encode_reply(3, 32).unwrap();
        let argsz = (32 + caps.len()) as u32;
        payload[0..4].copy_from_slice(&argsz.to_ne_bytes());
        payload[4..8].copy_from_slice(&RegionFlags::CAPS.bits().to_ne_bytes());
        payload[12..16].copy_from_slice(&cap_offset.to_ne_bytes());
        payload.extend_from_slice(&caps);
        let _ = RegionInfo::decode_reply(&payload, 3, argsz);
    }

    /// Arbitrary bytes on a socket: the framing returns messages or an error, never panics,
    /// and never returns a payload over the limit.
    #[test]
    fn framing_never_panics_on_a_byte_stream(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&bytes).unwrap();
        drop(b);
        let mut conn = Connection::new(a);
        while let Ok(Some(message)) = conn.recv() {
            prop_assert!(message.payload.len() <= MAX_PAYLOAD_SIZE);
            prop_assert_eq!(message.payload.len() + HEADER_SIZE, message.header.msg_size as usize);
        }
    }

    #[test]
    fn version_round_trips(major in any::<u16>(), minor in any::<u16>(), capabilities in capabilities()) {
        let version = Version { major, minor, capabilities };
        prop_assert_eq!(Version::decode(&version.encode()).unwrap(), version);
    }

    #[test]
    fn region_info_round_trips(region in region_info(), index in any::<u32>()) {
        let payload = region.encode_reply(index, u32::MAX).unwrap();
        prop_assert_eq!(
            RegionInfo::decode_reply(&payload, index, u32::MAX).unwrap(),
            RegionInfoReply::Complete(region.clone())
        );
        // Asked with the fixed size only: the fixed part, and the size the caps need.
        let short = region.encode_reply(index, 32).unwrap();
        let decoded = RegionInfo::decode_reply(&short, index, 32).unwrap();
        if region.caps.is_empty() {
            prop_assert_eq!(decoded, RegionInfoReply::Complete(region));
        } else {
            prop_assert_eq!(decoded, RegionInfoReply::NeedsArgsz(payload.len() as u32));
        }
    }

    #[test]
    fn device_and_irq_info_round_trip(
        flags in any::<u32>(),
        num_regions in 0u32..1024,
        num_irqs in 0u32..1024,
        irq_flags in 0u32..16,
        count in any::<u32>(),
        index in any::<u32>(),
    ) {
        let device = DeviceInfo { flags: DeviceFlags::from_bits_retain(flags), num_regions, num_irqs };
        prop_assert_eq!(DeviceInfo::decode_reply(&device.encode_reply()).unwrap(), device);
        let irq = IrqInfo { flags: IrqFlags::from_bits_truncate(irq_flags), count };
        prop_assert_eq!(IrqInfo::decode_reply(&irq.encode_reply(index), index).unwrap(), irq);
    }

    #[test]
    fn io_fds_reply_round_trips(
        subs in prop::collection::vec((any::<u64>(), any::<u64>(), any::<bool>(), any::<u32>(), any::<u64>(), 0usize..3), 0..12),
        index in any::<u32>(),
    ) {
        let doorbells: Vec<Doorbell> = (0..3).map(|_| Doorbell::new().unwrap()).collect();
        let entries: Vec<(IoFd, BorrowedFd<'_>)> = subs
            .iter()
            .map(|&(offset, size, regionfd, flags, data, fd)| {
                let kind = if regionfd { IoFdKind::IoRegionFd } else { IoFdKind::IoEventFd };
                (IoFd { offset, size, kind, flags, data }, doorbells[fd].as_fd())
            })
            .collect();
        let (payload, fds) = encode_io_fds_reply(index, u32::MAX, &entries).unwrap();
        let IoFdsReply::Complete(decoded) = decode_io_fds_reply(&payload, index, u32::MAX, fds.len()).unwrap() else {
            panic!("complete reply expected");
        };
        prop_assert_eq!(decoded.len(), entries.len());
        for ((io_fd, fd_index), (expected, fd)) in decoded.iter().zip(&entries) {
            prop_assert_eq!(io_fd, expected);
            prop_assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&fds[*fd_index]), std::os::fd::AsRawFd::as_raw_fd(fd));
        }
    }

    #[test]
    fn region_access_requests_round_trip(
        region in any::<u32>(),
        offset in 0u64..(1 << 40),
        data in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let write = encode::region_write(region, offset, &data);
        match decode_request(Command::RegionWrite, &write, Vec::new()).unwrap() {
            Request::RegionWrite { region: r, offset: o, data: d } => {
                prop_assert_eq!((r, o, d), (region, offset, data.as_slice()));
            }
            other => panic!("{other:?}"),
        }
        let read = encode::region_read(region, offset, data.len() as u32);
        match decode_request(Command::RegionRead, &read, Vec::new()).unwrap() {
            Request::RegionRead { region: r, offset: o, count } => {
                prop_assert_eq!((r, o, count), (region, offset, data.len() as u32));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dma_requests_round_trip(
        prot in 0u32..4,
        offset in 0u64..(1 << 48),
        iova in 0u64..(1 << 48),
        size in 1u64..(1 << 40),
        all in any::<bool>(),
    ) {
        let prot = DmaProt::from_bits_truncate(prot);
        match decode_request(Command::DmaMap, &encode::dma_map(prot, offset, iova, size), Vec::new()).unwrap() {
            Request::DmaMap(map) => {
                prop_assert_eq!((map.prot, map.offset, map.iova, map.size), (prot, offset, iova, size));
                prop_assert!(map.fd.is_none());
            }
            other => panic!("{other:?}"),
        }
        let (iova, size) = if all { (0, 0) } else { (iova, size) };
        match decode_request(Command::DmaUnmap, &encode::dma_unmap(iova, size, all), Vec::new()).unwrap() {
            Request::DmaUnmap { unmap, .. } => {
                prop_assert_eq!((unmap.iova, unmap.size, unmap.all), (iova, size, all));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn info_requests_round_trip(index in any::<u32>(), argsz in 32u32..) {
        match decode_request(Command::DeviceGetRegionInfo, &encode::get_region_info(index, argsz), Vec::new()).unwrap() {
            Request::GetRegionInfo { argsz: a, index: i } => prop_assert_eq!((a, i), (argsz, index)),
            other => panic!("{other:?}"),
        }
        match decode_request(Command::DeviceGetRegionIoFds, &encode::get_region_io_fds(index, argsz), Vec::new()).unwrap() {
            Request::GetRegionIoFds { argsz: a, index: i } => prop_assert_eq!((a, i), (argsz, index)),
            other => panic!("{other:?}"),
        }
        match decode_request(Command::DeviceGetIrqInfo, &encode::get_irq_info(index), Vec::new()).unwrap() {
            Request::GetIrqInfo { index: i } => prop_assert_eq!(i, index),
            other => panic!("{other:?}"),
        }
        prop_assert!(matches!(
            decode_request(Command::DeviceGetInfo, &encode::device_get_info(), Vec::new()).unwrap(),
            Request::DeviceGetInfo
        ));
    }

    #[test]
    fn set_irqs_bool_requests_round_trip(
        index in any::<u32>(),
        start in 0u32..1024,
        bools in prop::collection::vec(any::<bool>(), 1..64),
        action in prop::sample::select(vec![
            IrqSetFlags::ACTION_MASK,
            IrqSetFlags::ACTION_UNMASK,
            IrqSetFlags::ACTION_TRIGGER,
        ]),
    ) {
        let bytes: Vec<u8> = bools.iter().map(|&b| u8::from(b)).collect();
        let payload = encode::set_irqs(IrqSetFlags::DATA_BOOL | action, index, start, bools.len() as u32, &bytes);
        match decode_request(Command::DeviceSetIrqs, &payload, Vec::new()).unwrap() {
            Request::SetIrqs(set) => {
                prop_assert_eq!((set.index, set.start, set.count), (index, start, bools.len() as u32));
                match set.data {
                    IrqData::Bool(decoded) => prop_assert_eq!(decoded, bools),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }
}
