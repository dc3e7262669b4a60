//! The host's socket belongs to the host: `Host::bind` leaves what is not a stale socket
//! alone, and the host removes its socket when it finishes or is dropped.

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use iopf_endpoint::engine::Workload;
use iopf_endpoint::{BindError, Host, HostConfig};
use iopf_models::endpoint::EndpointConfig;

fn config() -> HostConfig {
    HostConfig {
        // No accesses: the device's engine is done at once.
        workloads: vec![Workload {
            endpoint: EndpointConfig::default(),
            streams: Vec::new(),
            seed: 1,
        }],
        ring_entries: 64,
        device: iopf_core::DeviceConfig::default(),
        repeat: false,
        threads: 2,
    }
}

fn socket(name: &str) -> TempPath {
    TempPath::new(&format!("host-socket-{name}"), "host.sock")
}

// Catches: a host that leaves its socket behind (the next start finds a dead socket).
#[test]
fn a_host_removes_its_socket_when_it_finishes() {
    let path = socket("finish");
    let host = Host::bind(config(), &path).unwrap();
    assert_eq!(host.socket_path(), Some(&*path));
    assert!(path.exists());
    let report = host.finish();
    assert_eq!(report.engines.len(), 1);
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn a_host_dropped_without_finishing_removes_its_socket() {
    let path = socket("drop");
    let host = Host::bind(config(), &path).unwrap();
    drop(host);
    assert!(!path.exists(), "{} left behind", path.display());
}

// Catches: `Host::bind` removing a file that is not a socket.
#[test]
fn host_bind_refuses_a_regular_file_and_keeps_it() {
    let socket = socket("file");
    let path = socket.with_file_name("notes.txt");
    std::fs::write(&path, "keep").unwrap();
    let error = Host::bind(config(), &path).unwrap_err();
    assert!(matches!(error, BindError::NotASocket { .. }), "{error}");
    assert!(error.to_string().contains(&*path.to_string_lossy()));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep");
}
