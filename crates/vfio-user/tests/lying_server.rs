//! The client against scripted servers that answer wrongly (or merely unusually): every reply
//! is checked before it is used, commands from the server are refused, and requests are cut
//! to the limits the server announced.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use iopf_vfio_user::protocol::{
    FLAGS_NO_REPLY, MAX_DATA_XFER_SIZE, MAX_MSG_FDS, MAX_PAYLOAD_SIZE, PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
};
use iopf_vfio_user::{
    Capabilities, Client, ClientError, ClientOptions, Command, Connection, Errno, Header,
    IrqSetFlags, Message, ProtocolError, Version,
};

/// Bounds every wait of both sides, so a broken client fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(5);

/// A server speaking our version with `capabilities`.
fn ours(capabilities: Capabilities) -> Version {
    Version {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
        capabilities,
    }
}

/// Runs `script` as the server on one end of a socket pair; returns the other end.
fn fake_server<T: Send + 'static>(
    script: impl FnOnce(&mut Connection) -> T + Send + 'static,
) -> (UnixStream, JoinHandle<T>) {
    let (client, server) = UnixStream::pair().unwrap();
    let thread = std::thread::spawn(move || {
        let mut conn = Connection::new(server);
        conn.set_timeouts(Some(LIMIT), Some(LIMIT)).unwrap();
        script(&mut conn)
    });
    (client, thread)
}

/// Answers the version proposal with `version`; returns the client's proposal.
fn handshake(conn: &mut Connection, version: &Version) -> Version {
    let hello = next(conn, Command::Version);
    answer(conn, &hello.header, &version.encode());
    Version::decode(&hello.payload).unwrap()
}

/// The next message, which must be `command`.
fn next(conn: &mut Connection, command: Command) -> Message {
    let message = conn.recv().unwrap().expect("a command");
    assert_eq!(
        message.header.command,
        command.raw(),
        "{:?}",
        message.header
    );
    message
}

fn answer(conn: &mut Connection, request: &Header, payload: &[u8]) {
    answer_with_fds(conn, request, payload, &[]);
}

fn answer_with_fds(
    conn: &mut Connection,
    request: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) {
    let header = Header::reply(request, payload.len());
    conn.send_parts(&header, payload, fds).unwrap();
}

/// A client of a server that runs `script` after answering the handshake with `version`.
fn client_of<T: Send + 'static>(
    version: Version,
    script: impl FnOnce(&mut Connection) -> T + Send + 'static,
) -> (Client, JoinHandle<T>) {
    let (stream, server) = fake_server(move |conn| {
        handshake(conn, &version);
        script(conn)
    });
    let options = ClientOptions::default()
        .handshake_timeout(Some(LIMIT))
        .request_timeout(Some(LIMIT));
    (Client::from_stream_with(stream, options).unwrap(), server)
}

/// The bytes of a `REGION_READ`/`REGION_WRITE` reply header (`struct vfio_user_region_access`).
fn access(offset: u64, region: u32, count: u32) -> Vec<u8> {
    let mut bytes = offset.to_le_bytes().to_vec();
    bytes.extend_from_slice(&region.to_le_bytes());
    bytes.extend_from_slice(&count.to_le_bytes());
    bytes
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn quad(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn bad_reply(result: Result<impl std::fmt::Debug, ClientError>) -> ProtocolError {
    match result {
        Err(ClientError::BadReply { error, .. }) => error,
        other => panic!("expected a bad reply, got {other:?}"),
    }
}

// Catches: a proposal without our limits (the server would assume one fd per message).
#[test]
fn the_client_proposes_the_fds_and_transfer_size_it_accepts() {
    let (stream, server) = fake_server(|conn| handshake(conn, &ours(Capabilities::default())));
    let client = Client::from_stream(stream).unwrap();
    let proposal = server.join().unwrap();
    assert_eq!(proposal.capabilities.max_msg_fds, Some(MAX_MSG_FDS as u32));
    assert_eq!(
        proposal.capabilities.max_data_xfer_size,
        Some(MAX_DATA_XFER_SIZE)
    );
    client.close();
}

#[test]
fn a_server_of_another_major_or_a_newer_minor_is_refused_and_an_older_minor_accepted() {
    for (major, minor) in [
        (PROTOCOL_MAJOR + 1, 0),
        (PROTOCOL_MAJOR, PROTOCOL_MINOR + 1),
    ] {
        let version = Version {
            major,
            minor,
            capabilities: Capabilities::default(),
        };
        let (stream, server) = fake_server(move |conn| handshake(conn, &version));
        let error = bad_reply(Client::from_stream(stream));
        assert!(
            matches!(error, ProtocolError::VersionUnsupported { major: m, minor: n } if (m, n) == (major, minor)),
            "{error:?}"
        );
        server.join().unwrap();
    }
    let older = Version {
        major: PROTOCOL_MAJOR,
        minor: 0,
        capabilities: Capabilities::default(),
    };
    let (stream, server) = fake_server(move |conn| handshake(conn, &older));
    let client = Client::from_stream(stream).expect("0.0 is spoken too");
    assert_eq!((client.version().major, client.version().minor), (0, 0));
    server.join().unwrap();
}

#[test]
fn a_reply_with_another_message_id_or_command_is_refused() {
    let (mut client, server) = client_of(ours(Capabilities::default()), |conn| {
        let request = next(conn, Command::DeviceReset);
        let mut wrong_id = request.header;
        wrong_id.msg_id = wrong_id.msg_id.wrapping_add(1);
        answer(conn, &wrong_id, &[]);
        let request = next(conn, Command::DeviceReset);
        let mut wrong_command = request.header;
        wrong_command.command = Command::DmaUnmap.raw();
        answer(conn, &wrong_command, &[]);
    });
    for _ in 0..2 {
        let error = bad_reply(client.reset());
        assert!(
            matches!(error, ProtocolError::ReplyMismatch { .. }),
            "{error:?}"
        );
    }
    server.join().unwrap();
}

// Catches: a client that answers a NO_REPLY command (the server then reads a stray reply), or
// that leaves a command unanswered (the server waits for ever).
#[test]
fn server_commands_are_refused_with_enosys_unless_they_ask_for_no_reply() {
    let (mut client, server) = client_of(ours(Capabilities::default()), |conn| {
        let request = next(conn, Command::DeviceReset);
        let mut quiet = Header::command(100, Command::DmaRead, 0);
        quiet.flags |= FLAGS_NO_REPLY;
        conn.send_parts(&quiet, &[], &[]).unwrap();
        conn.send_parts(&Header::command(101, Command::DmaRead, 0), &[], &[])
            .unwrap();
        let refusal = conn.recv().unwrap().expect("the refusal");
        answer(conn, &request.header, &[]);
        refusal.header
    });
    client
        .reset()
        .expect("the reply after the server's commands");
    let refusal = server.join().unwrap();
    assert_eq!(refusal.msg_id, 101);
    assert!(refusal.is_reply() && refusal.is_error(), "{refusal:?}");
    assert_eq!(Errno(refusal.error), Errno::ENOSYS);
}

#[test]
fn replies_carrying_fds_or_bytes_their_command_does_not_allow_are_refused() {
    let (mut client, server) = client_of(ours(Capabilities::default()), |conn| {
        let stray = File::open("/dev/null").unwrap();
        let request = next(conn, Command::DeviceGetInfo);
        answer_with_fds(conn, &request.header, &[0; 16], &[stray.as_fd()]);
        let request = next(conn, Command::DeviceReset);
        answer(conn, &request.header, &[0; 4]);
        let request = next(conn, Command::DeviceReset);
        answer_with_fds(conn, &request.header, &[], &[stray.as_fd()]);
    });
    let error = bad_reply(client.device_info());
    assert!(
        matches!(error, ProtocolError::FdCount { actual: 1, .. }),
        "{error:?}"
    );
    let error = bad_reply(client.reset());
    assert!(
        matches!(
            error,
            ProtocolError::PayloadSize {
                expected: 0,
                actual: 4,
                ..
            }
        ),
        "{error:?}"
    );
    let error = bad_reply(client.reset());
    assert!(
        matches!(error, ProtocolError::FdCount { actual: 1, .. }),
        "{error:?}"
    );
    server.join().unwrap();
}

// Catches: data accepted from a reply about another region, offset or length.
#[test]
fn a_region_access_reply_must_echo_the_access() {
    let wrong = [access(8, 3, 4), access(9, 2, 4), access(8, 2, 3)];
    let (mut client, server) = client_of(ours(Capabilities::default()), move |conn| {
        for echo in wrong {
            let request = next(conn, Command::RegionWrite);
            answer(conn, &request.header, &echo);
        }
        let request = next(conn, Command::RegionWrite);
        answer(conn, &request.header, &access(8, 2, 4));
    });
    for _ in 0..3 {
        let error = bad_reply(client.region_write(2, 8, &[1, 2, 3, 4]));
        assert!(matches!(error, ProtocolError::Field { .. }), "{error:?}");
    }
    client
        .region_write(2, 8, &[1, 2, 3, 4])
        .expect("a true echo");
    server.join().unwrap();
}

#[test]
fn a_region_read_reply_of_the_wrong_length_says_how_long_it_should_be() {
    let (mut client, server) = client_of(ours(Capabilities::default()), |conn| {
        let request = next(conn, Command::RegionRead);
        let mut reply = access(0, 1, 8);
        reply.extend_from_slice(&[5; 4]);
        answer(conn, &request.header, &reply);
    });
    let error = bad_reply(client.region_read(1, 0, &mut [0; 8]));
    assert!(
        matches!(
            error,
            ProtocolError::PayloadSize {
                expected: 24,
                actual: 20,
                ..
            }
        ),
        "{error:?}"
    );
    server.join().unwrap();
}

// Catches: transfers not cut to the server's max_data_xfer_size, or pieces at the wrong offset.
#[test]
fn region_accesses_are_cut_at_the_servers_max_data_xfer_size() {
    let capabilities = Capabilities {
        max_data_xfer_size: Some(4),
        ..Capabilities::default()
    };
    let (mut client, server) = client_of(ours(capabilities), |conn| {
        let mut writes = Vec::new();
        for _ in 0..3 {
            let request = next(conn, Command::RegionWrite);
            let (offset, region, count) = (
                quad(&request.payload, 0),
                word(&request.payload, 8),
                word(&request.payload, 12),
            );
            writes.push((offset, request.payload[16..].to_vec()));
            answer(conn, &request.header, &access(offset, region, count));
        }
        let mut reads = Vec::new();
        for _ in 0..3 {
            let request = next(conn, Command::RegionRead);
            let (offset, region, count) = (
                quad(&request.payload, 0),
                word(&request.payload, 8),
                word(&request.payload, 12),
            );
            reads.push((offset, count));
            let mut reply = access(offset, region, count);
            reply.extend((0..count).map(|i| (offset + u64::from(i)) as u8));
            answer(conn, &request.header, &reply);
        }
        (writes, reads)
    });
    client
        .region_write(2, 16, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        .unwrap();
    let mut data = [0; 10];
    client.region_read(2, 100, &mut data).unwrap();
    let (writes, reads) = server.join().unwrap();
    assert_eq!(
        writes,
        [
            (16, vec![0, 1, 2, 3]),
            (20, vec![4, 5, 6, 7]),
            (24, vec![8, 9])
        ]
    );
    assert_eq!(reads, [(100, 4), (104, 4), (108, 2)]);
    assert_eq!(data, [100, 101, 102, 103, 104, 105, 106, 107, 108, 109]);
}

// Catches: eventfds past the first message registered at the wrong sub-index.
#[test]
fn eventfds_beyond_the_servers_max_msg_fds_go_in_several_messages_each_with_its_start() {
    let capabilities = Capabilities {
        max_msg_fds: Some(2),
        ..Capabilities::default()
    };
    let (mut client, server) = client_of(ours(capabilities), |conn| {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let request = next(conn, Command::DeviceSetIrqs);
            let (index, start, count) = (
                word(&request.payload, 8),
                word(&request.payload, 12),
                word(&request.payload, 16),
            );
            seen.push((index, start, count, request.fds.len()));
            answer(conn, &request.header, &[]);
        }
        seen
    });
    let files: Vec<File> = (0..3).map(|_| File::open("/dev/null").unwrap()).collect();
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
    client.set_irqs(4, &fds).unwrap();
    assert_eq!(server.join().unwrap(), [(4, 0, 2, 2), (4, 2, 1, 1)]);
}

#[test]
fn a_dma_unmap_reply_may_be_empty_but_an_echo_must_name_the_mapping() {
    let (mut client, server) = client_of(ours(Capabilities::default()), |conn| {
        let echo = |address: u64, size: u64| {
            let mut bytes = 24u32.to_le_bytes().to_vec();
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend_from_slice(&address.to_le_bytes());
            bytes.extend_from_slice(&size.to_le_bytes());
            bytes
        };
        for reply in [
            Vec::new(),
            echo(0x1000, 0x2000),
            echo(0x3000, 0x2000),
            echo(0x1000, 0x4000),
        ] {
            let request = next(conn, Command::DmaUnmap);
            answer(conn, &request.header, &reply);
        }
    });
    client.dma_unmap(0x1000, 0x2000).expect("an empty reply");
    client.dma_unmap(0x1000, 0x2000).expect("a true echo");
    for _ in 0..2 {
        let error = bad_reply(client.dma_unmap(0x1000, 0x2000));
        assert!(matches!(error, ProtocolError::Field { .. }), "{error:?}");
    }
    server.join().unwrap();
}

// Catches: an off-by-one at the message size limit, either way.
#[test]
fn a_request_larger_than_a_message_is_refused_unsent_and_one_at_the_limit_goes() {
    let (mut client, server) = client_of(ours(Capabilities::default()), |conn| {
        let request = next(conn, Command::RegionWrite);
        answer(conn, &request.header, &access(0, 2, MAX_DATA_XFER_SIZE));
        request.payload.len()
    });
    // 20 bytes of `struct vfio_irq_set`, then the data: one byte past the limit.
    let bools = vec![0; MAX_PAYLOAD_SIZE + 1 - 20];
    let result = client.set_irqs_with(IrqSetFlags::DATA_BOOL, 0, 0, 1, &bools, &[]);
    assert!(
        matches!(result, Err(ClientError::InvalidArgument(_))),
        "{result:?}"
    );
    client
        .region_write(2, 0, &vec![7; MAX_DATA_XFER_SIZE as usize])
        .expect("a largest write is one message");
    assert_eq!(server.join().unwrap(), MAX_PAYLOAD_SIZE);
}
