//! Hostile clients: the server answers bad requests with an error reply and goes on, closes
//! the connection on a broken stream, says why, and never panics.

mod common;

use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{ServerThread, start};
use iopf_queue::Doorbell;
use iopf_vfio_user::connection::{Connection, ConnectionError};
use iopf_vfio_user::device::DMA_FAULT_IRQ_INDEX;
use iopf_vfio_user::protocol::{FLAGS_NO_REPLY, FLAGS_TYPE_REPLY, HEADER_SIZE, MAX_MESSAGE_SIZE};
use iopf_vfio_user::request::encode;
use iopf_vfio_user::{Command, Disconnect, DmaProt, Errno, Header, IrqSetFlags, Version};
use proptest::prelude::*;

/// A raw client: writes bytes, reads whole replies with a time limit.
struct Raw {
    stream: UnixStream,
    replies: Connection,
}

impl Raw {
    fn new(stream: UnixStream) -> Self {
        let mut replies = Connection::new(stream.try_clone().unwrap());
        replies
            .set_timeouts(Some(Duration::from_secs(5)), Some(Duration::from_secs(5)))
            .unwrap();
        Self { stream, replies }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn command(&mut self, id: u16, command: Command, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        let header = Header::command(id, command, payload.len());
        self.replies.send_parts(&header, payload, fds).unwrap();
    }

    fn reply(&mut self) -> Header {
        let message = self.replies.recv().unwrap().expect("a reply");
        assert!(message.header.is_reply());
        message.header
    }

    fn expect_error(&mut self, id: u16, errno: Errno) {
        let reply = self.reply();
        assert_eq!(reply.msg_id, id);
        assert!(reply.is_error(), "{reply:?}");
        assert_eq!(Errno(reply.error), errno);
    }

    fn expect_ok(&mut self, id: u16) {
        let reply = self.reply();
        assert_eq!(reply.msg_id, id);
        assert!(!reply.is_error(), "{reply:?}");
    }

    fn negotiate(&mut self) {
        self.command(0, Command::Version, &Version::default().encode(), &[]);
        self.expect_ok(0);
    }

    fn close(self) {
        drop(self.replies);
        drop(self.stream);
    }
}

fn negotiated() -> (Raw, ServerThread) {
    let (stream, server) = start();
    let mut raw = Raw::new(stream);
    raw.negotiate();
    (raw, server)
}

fn disconnect(server: ServerThread) -> Disconnect {
    let (_, result) = server.join().expect("the server thread did not panic");
    result.expect("a disconnect reason, not a server error")
}

fn header_bytes(msg_id: u16, command: u16, msg_size: u32, flags: u32) -> Vec<u8> {
    Header {
        msg_id,
        command,
        msg_size,
        flags,
        error: 0,
    }
    .with_payload(&[])
}

fn eventfd() -> OwnedFd {
    OwnedFd::from(Doorbell::new().unwrap())
}

#[test]
fn garbage_bytes_close_the_connection() {
    let (stream, server) = start();
    let mut raw = Raw::new(stream);
    raw.write(&[0xff; 64]);
    assert!(matches!(
        disconnect(server),
        Disconnect::Broken(ConnectionError::TooLarge { .. })
    ));
    raw.close();
}

#[test]
fn truncated_header_then_close_is_a_truncation() {
    let (stream, server) = start();
    let mut raw = Raw::new(stream);
    raw.write(&[1; 10]);
    raw.close();
    assert!(matches!(
        disconnect(server),
        Disconnect::Broken(ConnectionError::Truncated {
            received: 10,
            expected: 16
        })
    ));
}

#[test]
fn size_smaller_than_a_header_gets_einval_and_closes() {
    let (mut raw, server) = negotiated();
    raw.write(&header_bytes(1, Command::DeviceGetInfo.raw(), 8, 0));
    raw.expect_error(1, Errno::EINVAL);
    assert!(matches!(
        disconnect(server),
        Disconnect::Broken(ConnectionError::TooSmall { .. })
    ));
}

#[test]
fn oversized_message_is_refused_before_its_body() {
    let (mut raw, server) = negotiated();
    let started = Instant::now();
    // Announce one byte over the limit, send no body: the server must not wait for it (or
    // allocate for it).
    raw.write(&header_bytes(
        1,
        Command::RegionWrite.raw(),
        MAX_MESSAGE_SIZE as u32 + 1,
        0,
    ));
    raw.expect_error(1, Errno::E2BIG);
    assert!(matches!(
        disconnect(server),
        Disconnect::Broken(ConnectionError::TooLarge { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn largest_message_is_accepted() {
    let (mut raw, server) = negotiated();
    // A REGION_WRITE of the whole transfer limit to a region too small for it: framing
    // accepts the message, the range check refuses the write.
    let data = vec![0u8; 1 << 20];
    let payload = encode::region_write(0, 0, &data);
    assert_eq!(HEADER_SIZE + payload.len(), MAX_MESSAGE_SIZE);
    raw.command(1, Command::RegionWrite, &payload, &[]);
    raw.expect_error(1, Errno::EINVAL);
    raw.command(2, Command::DeviceGetInfo, &encode::device_get_info(), &[]);
    raw.expect_ok(2);
    raw.close();
    assert!(matches!(disconnect(server), Disconnect::Closed));
}

#[test]
fn size_larger_than_sent_then_a_stall_times_out() {
    let (mut raw, server) = negotiated();
    let mut bytes = header_bytes(1, Command::DmaUnmap.raw(), 16 + 24, 0);
    bytes.extend_from_slice(&[0; 8]);
    raw.write(&bytes);
    // The test config gives a message 500 ms to arrive whole.
    assert!(matches!(
        disconnect(server),
        Disconnect::Broken(ConnectionError::Timeout)
    ));
    raw.close();
}

#[test]
fn disconnect_mid_message_is_a_truncation() {
    let (mut raw, server) = negotiated();
    let mut bytes = header_bytes(1, Command::RegionWrite.raw(), 16 + 1000, 0);
    bytes.extend_from_slice(&[0; 100]);
    raw.write(&bytes);
    raw.close();
    assert!(matches!(
        disconnect(server),
        Disconnect::Broken(ConnectionError::Truncated {
            received: 116,
            expected: 1016
        })
    ));
}

#[test]
fn size_smaller_than_the_payload_desynchronises_safely() {
    let (mut raw, server) = negotiated();
    // DMA_UNMAP claiming no payload, followed by its 24 payload bytes, which the server then
    // takes for the next header.
    let mut bytes = header_bytes(1, Command::DmaUnmap.raw(), 16, 0);
    bytes.extend_from_slice(&encode::dma_unmap(0x1000, 0x1000, false));
    raw.write(&bytes);
    raw.expect_error(1, Errno::EINVAL);
    raw.close();
    // Whatever the leftover bytes look like, the server ends with a reason, not a panic.
    let _ = disconnect(server);
}

#[test]
fn unknown_and_unimplemented_commands_get_enosys_and_the_connection_goes_on() {
    let (mut raw, server) = negotiated();
    for (id, command) in [
        (1u16, 14u16),
        (2, 0),
        (3, 19),
        (4, 0xffff),
        (5, 11),
        (6, 12),
        (7, 15),
        (8, 16),
        (9, 17),
        (10, 18),
    ] {
        raw.write(&header_bytes(id, command, 16, 0));
        raw.expect_error(id, Errno::ENOSYS);
    }
    raw.command(11, Command::DeviceGetInfo, &encode::device_get_info(), &[]);
    raw.expect_ok(11);
    raw.close();
    assert!(matches!(disconnect(server), Disconnect::Closed));
}

#[test]
fn commands_before_version_are_refused() {
    let (stream, server) = start();
    let mut raw = Raw::new(stream);
    raw.command(1, Command::DeviceGetInfo, &encode::device_get_info(), &[]);
    raw.expect_error(1, Errno::EINVAL);
    raw.command(2, Command::DeviceReset, &[], &[]);
    raw.expect_error(2, Errno::EINVAL);
    raw.negotiate();
    raw.command(3, Command::DeviceGetInfo, &encode::device_get_info(), &[]);
    raw.expect_ok(3);
    raw.close();
    assert!(matches!(disconnect(server), Disconnect::Closed));
}

#[test]
fn malformed_version_is_refused_and_closes() {
    let (stream, server) = start();
    let mut raw = Raw::new(stream);
    let mut payload = vec![0, 0, 1, 0];
    payload.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":\"many\"}}\0");
    raw.command(1, Command::Version, &payload, &[]);
    raw.expect_error(1, Errno::EINVAL);
    assert!(matches!(disconnect(server), Disconnect::VersionRefused(_)));
}

#[test]
fn another_major_version_is_refused_and_closes() {
    let (stream, server) = start();
    let mut raw = Raw::new(stream);
    let version = Version {
        major: 1,
        ..Version::default()
    };
    raw.command(1, Command::Version, &version.encode(), &[]);
    raw.expect_error(1, Errno::ENOTSUP);
    assert!(matches!(disconnect(server), Disconnect::VersionRefused(_)));
}

#[test]
fn a_second_version_is_einval_and_the_connection_goes_on() {
    let (mut raw, server) = negotiated();
    raw.command(1, Command::Version, &Version::default().encode(), &[]);
    raw.expect_error(1, Errno::EINVAL);
    raw.command(2, Command::DeviceGetInfo, &encode::device_get_info(), &[]);
    raw.expect_ok(2);
    raw.close();
    assert!(matches!(disconnect(server), Disconnect::Closed));
}

#[test]
fn fds_on_a_command_that_takes_none_are_refused_and_closed() {
    let (mut raw, server) = negotiated();
    let fds: Vec<OwnedFd> = (0..16).map(|_| eventfd()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    raw.command(
        1,
        Command::DeviceGetInfo,
        &encode::device_get_info(),
        &borrowed,
    );
    raw.expect_error(1, Errno::EINVAL);
    raw.close();
    assert!(matches!(disconnect(server), Disconnect::Closed));
}

#[test]
fn more_than_sixteen_fds_close_the_connection() {
    let (raw, server) = negotiated();
    // fdpass refuses to send more than 16, so build the sendmsg by hand.
    let fds: Vec<OwnedFd> = (0..20).map(|_| eventfd()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let bytes =
        Header::command(1, Command::DeviceGetInfo, 16).with_payload(&encode::device_get_info());
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(20))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&borrowed)));
    rustix::net::sendmsg(
        &raw.stream,
        &[std::io::IoSlice::new(&bytes)],
        &mut control,
        rustix::net::SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert!(matches!(
        disconnect(server),
        Disconnect::Broken(ConnectionError::TooManyFds)
    ));
    raw.close();
}

#[test]
fn set_irqs_with_the_wrong_number_of_fds_is_einval() {
    let (mut raw, server) = negotiated();
    let (a, b) = (eventfd(), eventfd());
    let flags = IrqSetFlags::DATA_EVENTFD | IrqSetFlags::ACTION_TRIGGER;
    let one = encode::set_irqs(flags, DMA_FAULT_IRQ_INDEX, 0, 1, &[]);
    raw.command(1, Command::DeviceSetIrqs, &one, &[a.as_fd(), b.as_fd()]);
    raw.expect_error(1, Errno::EINVAL);
    let two = encode::set_irqs(flags, DMA_FAULT_IRQ_INDEX, 0, 2, &[]);
    raw.command(2, Command::DeviceSetIrqs, &two, &[a.as_fd()]);
    raw.expect_error(2, Errno::EINVAL);
    // DATA_NONE with an fd.
    let none = encode::set_irqs(
        IrqSetFlags::DATA_NONE | IrqSetFlags::ACTION_TRIGGER,
        DMA_FAULT_IRQ_INDEX,
        0,
        1,
        &[],
    );
    raw.command(3, Command::DeviceSetIrqs, &none, &[a.as_fd()]);
    raw.expect_error(3, Errno::EINVAL);
    // The right number works.
    raw.command(4, Command::DeviceSetIrqs, &one, &[a.as_fd()]);
    raw.expect_ok(4);
    raw.close();
    let (device, result) = server.join().unwrap();
    assert!(matches!(result, Ok(Disconnect::Closed)));
    assert_eq!(device.log.eventfds.len(), 1);
}

#[test]
fn dma_map_with_two_fds_is_einval() {
    let (mut raw, server) = negotiated();
    let (a, b) = (eventfd(), eventfd());
    let map = encode::dma_map(DmaProt::READ, 0, 0x1000, 0x1000);
    raw.command(1, Command::DmaMap, &map, &[a.as_fd(), b.as_fd()]);
    raw.expect_error(1, Errno::EINVAL);
    raw.close();
    let (device, _) = server.join().unwrap();
    assert!(device.log.mappings.is_empty());
}

#[test]
fn a_reply_sent_to_the_server_is_einval() {
    let (mut raw, server) = negotiated();
    raw.write(&header_bytes(
        1,
        Command::DeviceGetInfo.raw(),
        16,
        FLAGS_TYPE_REPLY,
    ));
    raw.expect_error(1, Errno::EINVAL);
    raw.close();
    assert!(matches!(disconnect(server), Disconnect::Closed));
}

/// A broken message that asked for no reply, or that is a reply itself, gets none: the server
/// only closes the connection.
#[test]
fn a_broken_message_that_wants_no_reply_gets_none() {
    for flags in [FLAGS_NO_REPLY, FLAGS_TYPE_REPLY] {
        let (mut raw, server) = negotiated();
        raw.write(&header_bytes(
            1,
            Command::RegionWrite.raw(),
            MAX_MESSAGE_SIZE as u32 + 1,
            flags,
        ));
        assert!(matches!(
            disconnect(server),
            Disconnect::Broken(ConnectionError::TooLarge { .. })
        ));
        let left = raw.replies.recv().unwrap();
        assert!(left.is_none(), "flags {flags:#x}: {left:?}");
    }
}

#[test]
fn no_reply_commands_get_no_reply() {
    let (mut raw, server) = negotiated();
    let mut bytes = Header::command(1, Command::DeviceReset, 0).with_payload(&[]);
    bytes[8..12].copy_from_slice(&FLAGS_NO_REPLY.to_ne_bytes());
    raw.write(&bytes);
    // Also for a request that fails.
    raw.write(&header_bytes(2, 99, 16, FLAGS_NO_REPLY));
    raw.command(3, Command::DeviceGetInfo, &encode::device_get_info(), &[]);
    raw.expect_ok(3);
    raw.close();
    let (device, _) = server.join().unwrap();
    assert_eq!(device.log.resets, 1);
}

#[test]
fn region_write_whose_count_lies_is_einval() {
    let (mut raw, server) = negotiated();
    let mut payload = encode::region_write(7, 0, &[0; 10]);
    payload[12..16].copy_from_slice(&100u32.to_ne_bytes());
    raw.command(1, Command::RegionWrite, &payload, &[]);
    raw.expect_error(1, Errno::EINVAL);
    let mut read = encode::region_read(7, 0, 4);
    read[12..16].copy_from_slice(&((1u32 << 20) + 1).to_ne_bytes());
    raw.command(2, Command::RegionRead, &read, &[]);
    raw.expect_error(2, Errno::EINVAL);
    raw.close();
    let (device, _) = server.join().unwrap();
    assert!(device.log.region_writes.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Well-framed messages with arbitrary commands, flags and payloads: each gets a reply
    /// unless it asked for none, the server never dies, and it still serves afterwards.
    #[test]
    fn arbitrary_well_framed_messages_never_break_the_server(
        messages in prop::collection::vec(
            (0u16..24, any::<u32>(), prop::collection::vec(any::<u8>(), 0..96)),
            1..16,
        )
    ) {
        let (mut raw, server) = negotiated();
        for (i, (command, flags, payload)) in messages.iter().enumerate() {
            // Mostly command messages, sometimes any flag bits at all.
            let flags = if flags % 4 == 0 { *flags } else { flags & FLAGS_NO_REPLY };
            let id = i as u16 + 1;
            let mut bytes = header_bytes(id, *command, (HEADER_SIZE + payload.len()) as u32, flags);
            bytes.extend_from_slice(payload);
            raw.write(&bytes);
            if flags & FLAGS_NO_REPLY == 0 {
                let reply = raw.reply();
                prop_assert_eq!(reply.msg_id, id);
            }
        }
        raw.command(999, Command::DeviceGetInfo, &encode::device_get_info(), &[]);
        raw.expect_ok(999);
        raw.close();
        prop_assert!(matches!(disconnect(server), Disconnect::Closed));
    }
}
