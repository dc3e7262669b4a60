//! A path in a fresh temporary directory that is removed, with everything in it, when the
//! value is dropped (test passed, failed or panicked). Shared by the tests of several crates
//! through `#[path]`, so that no test leaves a directory behind.

use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// `dir/name` inside a temporary directory named `iopf-PREFIX-…`.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TempPath {
    /// A new temporary directory (prefix `iopf-{prefix}-`) and the path `name` inside it.
    pub fn new(prefix: &str, name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("iopf-{prefix}-"))
            .tempdir()
            .expect("create a temporary directory");
        Self {
            path: dir.path().join(name),
            _dir: dir,
        }
    }
}

impl Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<OsStr> for TempPath {
    fn as_ref(&self) -> &OsStr {
        self.path.as_os_str()
    }
}
