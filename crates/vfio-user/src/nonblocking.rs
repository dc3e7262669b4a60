//! One server connection as a state machine an event loop drives: no read, write or wait in
//! it ever blocks.
//!
//! [`ServerConnection::drive`] is called when the socket is readable or writable, or when the
//! deadline it last returned has passed. Each call sends what the socket takes of the queued
//! replies, reads what has arrived (a message at a time through a
//! [`MessageReader`], whatever its cut: a header a byte at a time, fds with the first bytes),
//! hands each whole message to the device, queues the reply with its fds, and sends again.
//! It then says what to wait for next ([`Status::Open`]) or that the connection is over
//! ([`Status::Closed`], the socket shut down).
//!
//! Bounds: a message in progress is bounded by
//! [`MAX_MESSAGE_SIZE`] and [`MAX_MSG_FDS`](crate::protocol::MAX_MSG_FDS), and must be
//! complete within [`ServerConfig::message_timeout`] of its first byte; replies waiting for
//! the client are bounded by [`ServerConfig::max_output`] bytes (a client that stops reading is disconnected
//! once the next reply would go past it) and must move within the message timeout; one call
//! handles at most [`MESSAGES_PER_DRIVE`] messages, so a flooding client cannot hold the
//! thread that drives it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use iopf_queue::fdpass::send_some_with_fds;

use crate::connection::{ConnectionError, MessageReader, ReadProgress};
use crate::protocol::MAX_MESSAGE_SIZE;
#[cfg(doc)]
use crate::server::ServerConfig;
use crate::server::{Disconnect, Next, Server, ServerError, Session, VfioUserDevice};

/// Messages one [`ServerConnection::drive`] handles at most before it returns (the event loop
/// comes back while the socket stays readable).
pub const MESSAGES_PER_DRIVE: usize = 64;

/// What a connection waits for after a [`ServerConnection::drive`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Status {
    /// The connection goes on. Call `drive` again when the socket is readable (always of
    /// interest), writable (if `want_write`: replies are queued), or at `deadline` (a
    /// message or a reply is under way and must finish by then).
    Open {
        /// Replies wait to be sent: wait for the socket to be writable too.
        want_write: bool,
        /// When to call `drive` even if the socket stays quiet.
        deadline: Option<Instant>,
    },
    /// The connection is over, for this reason; the socket is shut down. Do not call `drive`
    /// again.
    Closed(Disconnect),
}

/// One reply being sent: its bytes, how many have left, and the fds that go with its first
/// byte (dropped once it has).
#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    fds: Vec<OwnedFd>,
}

/// Replies queued for the client, bounded in bytes.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: VecDeque<Outgoing>,
    bytes: usize,
    limit: usize,
    /// Since when the queue has been waiting without a byte leaving (set while non-empty).
    stalled_since: Option<Instant>,
}

impl Outbox {
    fn new(limit: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            bytes: 0,
            limit: limit.max(MAX_MESSAGE_SIZE),
            stalled_since: None,
        }
    }

    /// Queues one whole message with `fds` (duplicated: the device's own stay with it).
    pub(crate) fn push(
        &mut self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ConnectionError> {
        if self.bytes + bytes.len() > self.limit {
            return Err(ConnectionError::Backlog { limit: self.limit });
        }
        let fds = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<io::Result<Vec<_>>>()
            .map_err(ConnectionError::Io)?;
        self.bytes += bytes.len();
        self.queue.push_back(Outgoing {
            bytes: bytes.to_vec(),
            sent: 0,
            fds,
        });
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Sends what the socket takes now. `Ok(())` also when the socket is full.
    fn flush(&mut self, socket: BorrowedFd<'_>, now: Instant) -> Result<(), ConnectionError> {
        while let Some(front) = self.queue.front_mut() {
            let fds: Vec<BorrowedFd<'_>> = front.fds.iter().map(AsFd::as_fd).collect();
            match send_some_with_fds(socket, &front.bytes[front.sent..], &fds) {
                Ok(n) => {
                    drop(fds);
                    // The fds went with the first byte sent.
                    front.fds.clear();
                    front.sent += n;
                    self.bytes -= n;
                    self.stalled_since = Some(now);
                    if front.sent == front.bytes.len() {
                        self.queue.pop_front();
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(ConnectionError::from_io(error)),
            }
        }
        if self.queue.is_empty() {
            self.stalled_since = None;
        } else if self.stalled_since.is_none() {
            self.stalled_since = Some(now);
        }
        Ok(())
    }
}

/// A vfio-user server connection driven by an event loop: the non-blocking state machine under
/// both [`Server::serve`] (one connection, the calling thread) and any loop serving many
/// connections on a few threads. It holds no device: each [`drive`](Self::drive) is given
/// the device to dispatch to.
#[derive(Debug)]
pub struct ServerConnection {
    stream: UnixStream,
    server: Server,
    session: Session,
    reader: MessageReader,
    outbox: Outbox,
    /// When the message being read started (its first byte).
    message_started: Option<Instant>,
}

impl ServerConnection {
    /// Takes over `stream` (made non-blocking) to serve it under `server`'s configuration.
    pub fn new(stream: UnixStream, server: Server) -> Result<Self, ServerError> {
        stream.set_nonblocking(true).map_err(ServerError::Io)?;
        let outbox = Outbox::new(server.config().max_output);
        Ok(Self {
            stream,
            server,
            session: Session::default(),
            reader: MessageReader::new(),
            outbox,
            message_started: None,
        })
    }

    /// The socket (for an event loop's interest set).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Moves the connection on at `now` (the caller's clock, so deadlines are checked against
    /// the same time the loop waits with): sends queued replies, reads and handles up to
    /// [`MESSAGES_PER_DRIVE`] messages, sends again, and checks the deadlines. Never blocks.
    ///
    /// An `Err` is a failure of the server itself (the socket failed for a reason other than
    /// the client); the connection is unusable then and the socket is shut down.
    pub fn drive(
        &mut self,
        device: &mut dyn VfioUserDevice,
        now: Instant,
    ) -> Result<Status, ServerError> {
        let status = self.step(device, now);
        if !matches!(status, Ok(Status::Open { .. })) {
            self.shutdown();
        }
        status
    }

    fn step(
        &mut self,
        device: &mut dyn VfioUserDevice,
        now: Instant,
    ) -> Result<Status, ServerError> {
        if let Err(error) = self.outbox.flush(self.stream.as_fd(), now) {
            return broken(error);
        }
        for _ in 0..MESSAGES_PER_DRIVE {
            let progress = self.reader.read_some(self.stream.as_fd());
            let message = match progress {
                Ok(ReadProgress::Message(message)) => message,
                Ok(ReadProgress::Partial) => {
                    self.message_started.get_or_insert(now);
                    continue;
                }
                Ok(ReadProgress::WouldBlock) => break,
                Ok(ReadProgress::Closed) => {
                    // Best effort: replies to the last requests go if the socket takes them.
                    let _ = self.outbox.flush(self.stream.as_fd(), now);
                    return Ok(Status::Closed(Disconnect::Closed));
                }
                Err(error) => {
                    Server::broken_reply(&error, &mut self.outbox);
                    // Best effort: the error reply goes if the socket takes it now.
                    let _ = self.outbox.flush(self.stream.as_fd(), now);
                    return broken(error);
                }
            };
            self.message_started = None;
            match self
                .server
                .handle(&mut self.outbox, &mut self.session, device, message)?
            {
                Next::Continue => {}
                Next::Close(reason) => {
                    // Best effort: a refusal's error reply goes if the socket takes it now.
                    let _ = self.outbox.flush(self.stream.as_fd(), now);
                    return Ok(Status::Closed(reason));
                }
            }
            if let Err(error) = self.outbox.flush(self.stream.as_fd(), now) {
                return broken(error);
            }
        }
        if !self.reader.in_message() {
            self.message_started = None;
        }
        let timeout = self.server.config().message_timeout;
        let deadline = timeout.and_then(|timeout| {
            let message = self.message_started.map(|since| since + timeout);
            let output = self.outbox.stalled_since.map(|since| since + timeout);
            match (message, output) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        });
        if deadline.is_some_and(|deadline| now >= deadline) {
            return Ok(Status::Closed(Disconnect::Broken(ConnectionError::Timeout)));
        }
        Ok(Status::Open {
            want_write: !self.outbox.is_empty(),
            deadline,
        })
    }

    /// Shuts the socket down in both directions (the client sees end of stream).
    pub fn shutdown(&self) {
        // Fails only if the socket is no longer connected: then it is shut down already.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn broken(error: ConnectionError) -> Result<Status, ServerError> {
    match error {
        ConnectionError::Io(error) => Err(ServerError::Io(error)),
        error => Ok(Status::Closed(Disconnect::Broken(error))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches: an off-by-one at the backlog limit.
    #[test]
    fn the_backlog_may_reach_its_limit_and_not_pass_it() {
        let mut outbox = Outbox::new(0);
        outbox.push(&vec![0; MAX_MESSAGE_SIZE], &[]).unwrap();
        assert!(matches!(
            outbox.push(&[0], &[]),
            Err(ConnectionError::Backlog { .. })
        ));
    }

    // Catches: bytes that left still counted against the backlog, or too few counted.
    #[test]
    fn the_backlog_counts_the_bytes_still_queued() {
        let (ours, _peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut outbox = Outbox::new(0);
        outbox.push(&vec![0; MAX_MESSAGE_SIZE], &[]).unwrap();
        // The peer reads nothing: the socket takes what its buffer holds, not all.
        outbox.flush(ours.as_fd(), Instant::now()).unwrap();
        let sent = outbox.queue.front().expect("some bytes left").sent;
        assert!(sent > 0);
        outbox.push(&vec![0; sent], &[]).unwrap();
        assert!(matches!(
            outbox.push(&[0], &[]),
            Err(ConnectionError::Backlog { .. })
        ));
    }
}
