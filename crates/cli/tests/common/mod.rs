//! What the process-level tests share: the `iopf` command, a child that is killed and reaped
//! however the test ends, a socket path in a temporary directory that is removed with it, and
//! the wait for a host's socket.
#![allow(dead_code)] // Each test file uses its own part of this.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The `iopf` binary under test.
pub fn iopf() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iopf"))
}

/// Kills the child when the test ends, passed or failed, and reaps it.
pub struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        // The child may have exited already: then the kill fails, and the wait reaps it.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A socket path in a new temporary directory, removed when the directory is dropped.
pub fn socket_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("iopf-test-{name}-"))
        .tempdir()
        .unwrap();
    let path = dir.path().join("host.sock");
    (dir, path)
}

/// Waits (at most 30 s) until the host's socket is at `path`. The host puts it there only once
/// it listens, so a client may connect as soon as this returns.
pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "the host never bound {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
