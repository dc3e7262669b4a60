//! Errors as a C caller sees them: a negative errno value returned, and a message kept per
//! thread for `iopf_last_error`. Every entry point runs inside [`guard`], so no panic crosses
//! the boundary.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::error::Error as StdError;
use std::ffi::{CString, c_char, c_int};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};

use iopf_vfio_user::ClientError;
use iopf_vmm::{AttachError, RespondError, VmmError};
use rustix::io::Errno;
use thiserror::Error;

thread_local! {
    /// The message of the last call that failed on this thread.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Why a call failed.
#[derive(Debug, Error)]
pub(crate) enum FfiError {
    /// The handle names no attached device (never attached, detached, or not a handle).
    #[error("{0:#x} is not the handle of an attached device")]
    BadHandle(u64),
    /// An argument is out of its range (a null pointer, a length, a code, an fd number).
    #[error("{0}")]
    Argument(String),
    /// No group waits for an answer under this cookie (answered already, never handed out,
    /// or dropped by a reset).
    #[error("no group waits for an answer under cookie {0}")]
    NoSuchCookie(u64),
    /// The next group does not fit the caller's buffer.
    #[error("the next group has {needed} requests; the buffer has room for {room}")]
    NoSpace {
        /// Requests of the group.
        needed: usize,
        /// Room in the caller's request buffer.
        room: usize,
    },
    /// The call needs what this handle does not have (a vfio-user connection).
    #[error("{0}")]
    Unsupported(&'static str),
    /// Faults read and not drained have reached the limit: drain them first.
    #[error("{0} faults wait to be drained; drain them before polling again")]
    Undrained(usize),
    /// A panic inside the library interrupted a call on this handle before.
    #[error("an earlier call on this handle panicked inside the library; detach it")]
    Poisoned,
    /// A panic inside the library was caught here.
    #[error("the library panicked: {0}")]
    Panicked(String),
    /// The server closed the connection during the handshake (an iopf host does so when
    /// every device is taken).
    #[error(
        "the server on {path} closed the connection (an iopf host does when every device is taken)"
    )]
    Refused {
        /// The socket.
        path: String,
        /// How the handshake ended.
        #[source]
        source: ClientError,
    },
    /// Attaching failed.
    #[error("{what}")]
    Attach {
        /// What was attached.
        what: String,
        /// Why.
        #[source]
        source: AttachError,
    },
    /// A vfio-user exchange failed.
    #[error("{what}")]
    Client {
        /// The exchange.
        what: &'static str,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// Serving the device failed.
    #[error("{what}")]
    Device {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: VmmError,
    },
    /// The answer was not queued.
    #[error("answering cookie {cookie}")]
    Respond {
        /// The cookie.
        cookie: u64,
        /// Why.
        #[source]
        source: RespondError,
    },
    /// An fd the caller lent could not be duplicated.
    #[error("duplicating {what}")]
    Dup {
        /// Which argument.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The OS error anywhere in `error`'s source chain, if any.
fn os_errno(error: &(dyn StdError + 'static)) -> Option<i32> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(raw) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(raw);
        }
        if let Some(errno) = e.downcast_ref::<Errno>() {
            return Some(errno.raw_os_error());
        }
        next = e.source();
    }
    None
}

fn client_errno(e: &ClientError) -> Errno {
    match e {
        ClientError::Connect { source, .. } => source
            .raw_os_error()
            .map_or(Errno::CONNREFUSED, Errno::from_raw_os_error),
        ClientError::Closed => Errno::CONNRESET,
        ClientError::NoReply { .. } | ClientError::SendTimeout { .. } => Errno::TIMEDOUT,
        ClientError::Remote { errno, .. } if errno.0 != 0 => {
            Errno::from_raw_os_error(i32::try_from(errno.0).unwrap_or(Errno::IO.raw_os_error()))
        }
        ClientError::BadReply { .. } => Errno::PROTO,
        ClientError::InvalidArgument(_) => Errno::INVAL,
        _ => Errno::from_raw_os_error(os_errno(e).unwrap_or(Errno::IO.raw_os_error())),
    }
}

impl FfiError {
    /// The errno this error is returned as (positive).
    pub(crate) fn errno(&self) -> Errno {
        match self {
            Self::BadHandle(_) => Errno::BADF,
            Self::Argument(_) => Errno::INVAL,
            Self::NoSuchCookie(_) => Errno::NOENT,
            Self::NoSpace { .. } => Errno::NOSPC,
            Self::Unsupported(_) => Errno::NOTSUP,
            Self::Undrained(_) => Errno::NOBUFS,
            Self::Refused { .. } => Errno::CONNRESET,
            Self::Poisoned | Self::Panicked(_) => Errno::NOTRECOVERABLE,
            Self::Attach { source, .. } => match source {
                AttachError::Client(e) | AttachError::DmaMap { source: e, .. } => client_errno(e),
                AttachError::Missing(_) => Errno::NODEV,
                AttachError::NoFile { .. } => Errno::INVAL,
                AttachError::Doorbell(e) => Errno::from_raw_os_error(
                    e.raw_os_error().unwrap_or(Errno::INVAL.raw_os_error()),
                ),
                // A region that fails its checks is the peer's protocol error, unless a
                // system call failed on the way.
                other => os_errno(other).map_or(Errno::PROTO, Errno::from_raw_os_error),
            },
            Self::Client { source, .. } => client_errno(source),
            Self::Device { source, .. } => {
                os_errno(source).map_or(Errno::PROTO, Errno::from_raw_os_error)
            }
            Self::Respond { source, .. } => match source {
                RespondError::StaleLife => Errno::STALE,
                RespondError::OtherDevice => Errno::XDEV,
                RespondError::Closed => Errno::BADF,
                RespondError::Full => Errno::AGAIN,
                other => os_errno(other).map_or(Errno::IO, Errno::from_raw_os_error),
            },
            Self::Io { source, .. } | Self::Dup { source, .. } => match source.raw_os_error() {
                Some(raw) => Errno::from_raw_os_error(raw),
                // Refused by a check here (a doorbell fd that is not an eventfd).
                None if source.kind() == io::ErrorKind::InvalidInput => Errno::INVAL,
                None => Errno::IO,
            },
        }
    }

    /// The message: this error, then each cause, joined by ": ".
    fn message(&self) -> String {
        let mut message = self.to_string();
        let mut next = self.source();
        while let Some(cause) = next {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            next = cause.source();
        }
        message
    }
}

/// Keeps `message` as this thread's last error (interior NUL bytes become spaces).
fn set_last_error(message: String) {
    let bytes: Vec<u8> = message
        .into_bytes()
        .into_iter()
        .map(|b| if b == 0 { b' ' } else { b })
        .collect();
    let message = CString::new(bytes).unwrap_or_default();
    // `try_with`, not `with` (which panics once the thread's locals are destroyed, as in a
    // call from a C thread-exit destructor). Safe to ignore its failure: the message is then
    // not kept, and the returned errno alone says what failed.
    let _ = LAST_ERROR.try_with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            *last = message;
        }
    });
}

/// The last error's message on this thread, NUL-terminated; valid until the next failing
/// call on this thread ("" once the thread's locals are destroyed).
pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|last| last.try_borrow().map(|l| l.as_ptr()).ok())
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}

/// Runs one entry point: its value if it succeeds; `-errno` if it fails or panics, with the
/// message kept for [`last_error`].
pub(crate) fn guard(f: impl FnOnce() -> Result<c_int, FfiError>) -> c_int {
    // Nothing `f` touches outlives a panic in a state the next call trusts: handle state sits
    // behind mutexes whose poisoning is reported as `FfiError::Poisoned`.
    let error = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => return value,
        Ok(Err(error)) => error,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            FfiError::Panicked(what)
        }
    };
    let errno = error.errno().raw_os_error();
    // The message is built inside its own guard: a panicking `Display` must not unwind here.
    let message = catch_unwind(AssertUnwindSafe(|| error.message()))
        .unwrap_or_else(|_| "an error whose message could not be formatted".to_owned());
    set_last_error(message);
    -errno
}
