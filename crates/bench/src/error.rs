//! Why a benchmark could not run.

use std::io;

use iopf_core::CoreError;
use iopf_queue::{PushError, QueueError, RegionAttachError, RingError};
use thiserror::Error;

/// Why `iopf bench` (or its peer process) failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BenchError {
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A queue region could not be created or attached.
    #[error("cannot create or attach a queue region")]
    Attach(#[from] RegionAttachError),
    /// A queue operation failed.
    #[error("queue operation failed")]
    Queue(#[from] QueueError),
    /// A ring was broken (a bug here: both sides are ours).
    #[error("ring broken")]
    Protocol(#[from] RingError),
    /// The fault core refused a call.
    #[error("the fault core refused a call")]
    Core(#[from] CoreError),
    /// The VMM library's event loop failed.
    #[error("the VMM's event loop failed")]
    EventLoop(#[from] iopf_vmm::EventLoopError),
    /// The VMM library could not set up a device.
    #[error("the VMM library could not set up a device")]
    Vmm(#[from] iopf_vmm::VmmError),
    /// The control channel to the peer process carried something unexpected.
    #[error("peer protocol: {0}")]
    Peer(String),
    /// The peer process reported a failure.
    #[error("peer process failed: {0}")]
    PeerFailed(String),
    /// A message could not be encoded or decoded.
    #[error("cannot encode or decode a control message")]
    Json(#[from] serde_json::Error),
    /// A loop waited too long for the other side (it died or stalled).
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A stop was asked for ([`crate::Config::stop`]): the run ended early.
    #[error("interrupted")]
    Interrupted,
    /// A measurement produced nothing usable.
    #[error("{0}")]
    Invalid(String),
}

impl BenchError {
    /// A closure mapping an I/O error of `op` into a [`BenchError`].
    pub(crate) fn io<E: Into<io::Error>>(op: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Self::Io {
            op,
            source: e.into(),
        }
    }
}

impl From<PushError> for BenchError {
    fn from(e: PushError) -> Self {
        match e {
            PushError::Broken(e) => Self::Protocol(e),
            other => Self::Invalid(format!("unexpected push error: {other}")),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
