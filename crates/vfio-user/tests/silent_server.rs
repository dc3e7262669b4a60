//! The client against servers that accept and then say nothing: it gives up within its time
//! limits with an error naming what it waited for, instead of hanging.

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use iopf_vfio_user::protocol::{Header, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use iopf_vfio_user::version::{Capabilities, Version};
use iopf_vfio_user::{Client, ClientError, ClientOptions, Command, Connection};

fn socket(name: &str) -> TempPath {
    TempPath::new(&format!("silent-{name}"), "server.sock")
}

/// Accepts one connection and keeps it open, reading nothing and writing nothing, until the
/// test ends.
fn silent_server(path: &std::path::Path) -> std::thread::JoinHandle<UnixStream> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || listener.accept().unwrap().0)
}

// Catches: a client that waits for ever for the version reply (the VMM hangs, silently).
#[test]
fn a_server_that_never_answers_the_handshake_times_out_with_a_typed_error() {
    let path = socket("handshake");
    let server = silent_server(&path);
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let result = Client::connect_with(
        &path,
        ClientOptions::default().handshake_timeout(Some(limit)),
    );
    let took = started.elapsed();
    let error = result.expect_err("the silent server cannot complete a handshake");
    assert!(
        matches!(error, ClientError::NoReply { command: Command::Version, waited } if waited == limit),
        "{error:?}"
    );
    assert!(error.is_timeout());
    assert_eq!(
        error.to_string(),
        "no reply to VFIO_USER_VERSION within 0.3 s"
    );
    assert!(
        took >= limit && took < limit + Duration::from_secs(2),
        "{took:?}"
    );
    drop(server.join().unwrap());
}

// Catches: a request timeout that is not applied after the handshake, or one that restarts
// for every message the server interleaves.
#[test]
fn a_server_that_stops_answering_after_the_handshake_times_out_per_request() {
    let path = socket("request");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut conn = Connection::new(stream);
        let message = conn.recv().unwrap().unwrap();
        assert_eq!(message.header.command, Command::Version.raw());
        let reply = Version {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            capabilities: Capabilities::default(),
        }
        .encode();
        let header = Header::reply(&message.header, reply.len());
        conn.send_parts(&header, &reply, &[]).unwrap();
        // Then silence: read the next command and never answer it.
        let _ = conn.recv();
        conn
    });
    let limit = Duration::from_millis(250);
    let mut client = Client::connect_with(
        &path,
        ClientOptions::default()
            .handshake_timeout(Some(Duration::from_secs(5)))
            .request_timeout(Some(limit)),
    )
    .expect("the handshake is answered");
    let started = Instant::now();
    let error = client.device_info().expect_err("no reply comes");
    let took = started.elapsed();
    assert!(
        matches!(error, ClientError::NoReply { command: Command::DeviceGetInfo, waited } if waited == limit),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "no reply to VFIO_USER_DEVICE_GET_INFO within 0.25 s"
    );
    assert!(
        took >= limit && took < limit + Duration::from_secs(2),
        "{took:?}"
    );
    drop(client);
    drop(server.join().unwrap());
}

#[test]
fn the_default_limits_are_seconds() {
    let options = ClientOptions::default();
    assert_eq!(options.handshake, Some(Duration::from_secs(5)));
    assert_eq!(options.request, Some(Duration::from_secs(10)));
}
