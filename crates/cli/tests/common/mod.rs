//! What the process-level tests share: the `iopf` command, a child that is killed and reaped
//! however the test ends, and a socket path in a temporary directory that is removed with it.
#![allow(dead_code)] // Each test file uses its own part of this.

use std::path::PathBuf;
use std::process::{Child, Command};

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
