//! The non-blocking server connection: messages cut anyhow, fds arriving with any cut, a
//! stalled or non-reading client on a loop that serves others at the same time, on real
//! socket pairs.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{TestDevice, start, test_config};
use iopf_queue::Doorbell;
use iopf_queue::fdpass::send_with_fds;
use iopf_vfio_user::connection::{Connection, ConnectionError};
use iopf_vfio_user::device::{DMA_FAULT_IRQ_INDEX, VFIO_PCI_BAR0_REGION_INDEX};
use iopf_vfio_user::request::encode;
use iopf_vfio_user::{
    Command, Disconnect, Header, IrqSetFlags, Server, ServerConfig, ServerConnection, Status,
    Version,
};
use rustix::event::{PollFd, PollFlags, Timespec};

/// Serves every connection of `streams` from ONE thread, the way an event loop does, until
/// all are closed; returns how each ended.
fn serve_on_one_thread(
    config: ServerConfig,
    streams: Vec<UnixStream>,
) -> std::thread::JoinHandle<Vec<Disconnect>> {
    std::thread::spawn(move || {
        let server = Server::new(config);
        let mut conns: Vec<(ServerConnection, TestDevice, Option<Disconnect>, bool)> = streams
            .into_iter()
            .map(|s| {
                let conn = ServerConnection::new(s, server.clone()).unwrap();
                (conn, TestDevice::new(), None, false)
            })
            .collect();
        let mut deadlines: Vec<Option<Instant>> = vec![None; conns.len()];
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let now = Instant::now();
            assert!(now < give_up, "the loop did not finish in 60 s");
            for (i, (conn, device, ended, want_write)) in conns.iter_mut().enumerate() {
                if ended.is_some() {
                    continue;
                }
                match conn.drive(device, now).unwrap() {
                    Status::Open {
                        want_write: w,
                        deadline,
                    } => {
                        *want_write = w;
                        deadlines[i] = deadline;
                    }
                    Status::Closed(reason) => *ended = Some(reason),
                    _ => unreachable!(),
                }
            }
            if conns.iter().all(|c| c.2.is_some()) {
                break;
            }
            let next = conns
                .iter()
                .zip(&deadlines)
                .filter(|(c, _)| c.2.is_none())
                .filter_map(|(_, d)| *d)
                .min();
            let wait = next
                .map_or(Duration::from_millis(100), |d| {
                    d.saturating_duration_since(Instant::now())
                })
                .min(Duration::from_millis(100));
            let timeout = Timespec {
                tv_sec: 0,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            let mut fds: Vec<PollFd<'_>> = conns
                .iter()
                .filter(|c| c.2.is_none())
                .map(|c| {
                    let mut flags = PollFlags::IN;
                    if c.3 {
                        flags |= PollFlags::OUT;
                    }
                    PollFd::new(c.0.stream(), flags)
                })
                .collect();
            let _ = rustix::event::poll(&mut fds, Some(&timeout));
        }
        conns.into_iter().map(|c| c.2.unwrap()).collect()
    })
}

/// A client reading its replies through a blocking connection with a time limit.
fn client(stream: UnixStream) -> (UnixStream, Connection) {
    let mut replies = Connection::new(stream.try_clone().unwrap());
    replies
        .set_timeouts(Some(Duration::from_secs(10)), Some(Duration::from_secs(10)))
        .unwrap();
    (stream, replies)
}

fn version_bytes(id: u16) -> Vec<u8> {
    let payload = Version::default().encode();
    Header::command(id, Command::Version, payload.len()).with_payload(&payload)
}

fn get_info_bytes(id: u16) -> Vec<u8> {
    let payload = encode::device_get_info();
    Header::command(id, Command::DeviceGetInfo, payload.len()).with_payload(&payload)
}

fn expect_ok(replies: &mut Connection, id: u16) {
    let reply = replies.recv().unwrap().expect("a reply");
    assert!(reply.header.is_reply());
    assert_eq!(reply.header.msg_id, id);
    assert!(!reply.header.is_error(), "{:?}", reply.header);
}

#[test]
fn messages_sent_one_byte_at_a_time_are_served() {
    let (stream, server) = start();
    let (mut raw, mut replies) = client(stream);
    for (id, bytes) in [(0, version_bytes(0)), (1, get_info_bytes(1))] {
        for byte in &bytes {
            raw.write_all(std::slice::from_ref(byte)).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        expect_ok(&mut replies, id);
    }
    drop((raw, replies));
    let (_, result) = server.join().unwrap();
    assert!(matches!(result, Ok(Disconnect::Closed)));
}

#[test]
fn fds_arriving_with_any_cut_of_a_message_stay_with_it() {
    for cut in [1, 3, 16, 20] {
        let (stream, server) = start();
        let (mut raw, mut replies) = client(stream);
        raw.write_all(&version_bytes(0)).unwrap();
        expect_ok(&mut replies, 0);
        let flags = IrqSetFlags::DATA_EVENTFD | IrqSetFlags::ACTION_TRIGGER;
        let payload = encode::set_irqs(flags, DMA_FAULT_IRQ_INDEX, 0, 1, &[]);
        let bytes =
            Header::command(1, Command::DeviceSetIrqs, payload.len()).with_payload(&payload);
        let doorbell = OwnedFd::from(Doorbell::new().unwrap());
        // The first `cut` bytes, then the fd with the next ones, then the rest a byte at a
        // time: the server's reads see the message in many pieces, the fd with one of them.
        raw.write_all(&bytes[..cut]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        send_with_fds(&raw, &bytes[cut..cut + 2], &[doorbell.as_fd()]).unwrap();
        for byte in &bytes[cut + 2..] {
            std::thread::sleep(Duration::from_micros(200));
            raw.write_all(std::slice::from_ref(byte)).unwrap();
        }
        expect_ok(&mut replies, 1);
        drop((raw, replies));
        let (device, result) = server.join().unwrap();
        assert!(matches!(result, Ok(Disconnect::Closed)), "cut {cut}");
        assert_eq!(
            device.log.eventfds.len(),
            1,
            "cut {cut}: the fd reached the device"
        );
    }
}

#[test]
fn a_message_cut_off_mid_way_times_out_and_others_are_served_meanwhile() {
    let config = ServerConfig {
        message_timeout: Some(Duration::from_secs(2)),
        ..ServerConfig::default()
    };
    let (stalled, stalled_server) = UnixStream::pair().unwrap();
    let (good, good_server) = UnixStream::pair().unwrap();
    let ended = serve_on_one_thread(config, vec![stalled_server, good_server]);
    let (mut stalled, mut stalled_replies) = client(stalled);
    stalled.write_all(&version_bytes(0)).unwrap();
    expect_ok(&mut stalled_replies, 0);
    // Half a message, then nothing.
    let bytes = get_info_bytes(1);
    stalled.write_all(&bytes[..bytes.len() - 3]).unwrap();
    // The other connection on the same thread is served while that one stalls.
    let (mut good, mut good_replies) = client(good);
    good.write_all(&version_bytes(0)).unwrap();
    expect_ok(&mut good_replies, 0);
    for id in 1..=50 {
        good.write_all(&get_info_bytes(id)).unwrap();
        expect_ok(&mut good_replies, id);
    }
    // ... and all that happened before the stalled message's deadline: its connection is
    // still open (a read would block rather than see end of stream).
    stalled.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        stalled.read(&mut byte).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the stalled connection was closed before the other was served"
    );
    // Then the stalled one is closed by its deadline: the client sees end of stream.
    stalled.set_nonblocking(false).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(stalled.read(&mut byte).unwrap(), 0);
    drop((good, good_replies));
    let ended = ended.join().unwrap();
    assert!(
        matches!(ended[0], Disconnect::Broken(ConnectionError::Timeout)),
        "{:?}",
        ended[0]
    );
    assert!(matches!(ended[1], Disconnect::Closed), "{:?}", ended[1]);
}

#[test]
fn a_client_that_floods_and_never_reads_is_disconnected_and_others_are_served() {
    let config = ServerConfig {
        max_output: 0, // the smallest allowed: one largest message
        ..test_config()
    };
    let (flood, flood_server) = UnixStream::pair().unwrap();
    let (good, good_server) = UnixStream::pair().unwrap();
    let ended = serve_on_one_thread(config, vec![flood_server, good_server]);
    let flooder = std::thread::spawn(move || {
        let mut flood = flood;
        flood.write_all(&version_bytes(0)).unwrap();
        let mut batch = Vec::new();
        for id in 1..=256u16 {
            batch.extend(get_info_bytes(id));
        }
        // Requests until the server hangs up; replies never read.
        let mut sent = 0u64;
        while flood.write_all(&batch).is_ok() {
            sent += 256;
            assert!(sent < 10_000_000, "never disconnected");
        }
        sent
    });
    let (mut good, mut good_replies) = client(good);
    good.write_all(&version_bytes(0)).unwrap();
    expect_ok(&mut good_replies, 0);
    for id in 1..=50 {
        good.write_all(&get_info_bytes(id)).unwrap();
        expect_ok(&mut good_replies, id);
    }
    let sent = flooder.join().unwrap();
    assert!(sent > 1000, "the flood was cut short after {sent} requests");
    drop((good, good_replies));
    let ended = ended.join().unwrap();
    assert!(
        matches!(
            ended[0],
            Disconnect::Broken(ConnectionError::Backlog { .. })
        ),
        "{:?}",
        ended[0]
    );
    assert!(matches!(ended[1], Disconnect::Closed), "{:?}", ended[1]);
}

// Catches: a blocking server that does not wait for its socket to become writable: without a
// message timeout it would sleep in poll for ever, holding replies a slow reader has yet to
// take.
#[test]
fn replies_queued_for_a_client_that_reads_late_all_arrive_without_a_message_timeout() {
    let (stream, theirs) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let config = ServerConfig {
            message_timeout: None,
            ..test_config()
        };
        Server::new(config).serve(theirs, &mut TestDevice::new())
    });
    let (mut stream, mut replies) = client(stream);
    stream.write_all(&version_bytes(0)).unwrap();
    expect_ok(&mut replies, 0);
    // Far more reply bytes than the socket holds, queued before the client reads any.
    let read = encode::region_read(VFIO_PCI_BAR0_REGION_INDEX, 0, 8192);
    let mut batch = Vec::new();
    for id in 1..=64u16 {
        batch.extend(Header::command(id, Command::RegionRead, read.len()).with_payload(&read));
    }
    stream.write_all(&batch).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for id in 1..=64 {
        expect_ok(&mut replies, id);
    }
    drop((stream, replies));
    let ended = server.join().unwrap();
    assert!(matches!(ended, Ok(Disconnect::Closed)), "{ended:?}");
}

// Catches: a send error taken for a full socket: the server would wait for a reader that is
// gone until its message timeout, and name the wrong reason.
#[test]
fn a_client_that_shuts_its_reading_side_is_seen_as_reset() {
    let (stream, server) = start();
    let (mut stream, mut replies) = client(stream);
    stream.write_all(&version_bytes(0)).unwrap();
    expect_ok(&mut replies, 0);
    stream.shutdown(std::net::Shutdown::Read).unwrap();
    stream.write_all(&get_info_bytes(1)).unwrap();
    let (_, result) = server.join().unwrap();
    assert!(
        matches!(result, Ok(Disconnect::Broken(ConnectionError::Reset))),
        "{result:?}"
    );
}
