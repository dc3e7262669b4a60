//! Framing over a UNIX stream socket: one message in, one message out, fds included.
//!
//! Receiving reads the 16-byte header, refuses a size below the header or above
//! [`MAX_MESSAGE_SIZE`] before allocating anything, then reads exactly the rest of the message
//! (short reads are normal on a stream socket; the buffer is the announced size, bounded).
//! Reading never goes past the message's last byte, so the fds received while reading it
//! belong to it: the kernel attaches `SCM_RIGHTS` to the first bytes of the `sendmsg` that
//! carried them and never merges two messages' fds into one `recvmsg`.
//!
//! Sending writes a whole message, header and payload, with its fds, in ONE `sendmsg`
//! ([`iopf_queue::fdpass::send_with_fds`]): some peers (the rust-vmm client) read a reply's
//! header and its fd in a single `recvmsg` and break on a reply split in two.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use iopf_queue::fdpass::{recv_with_fds, send_with_fds};
use thiserror::Error;
use zerocopy::FromBytes;

use crate::protocol::{HEADER_SIZE, Header, MAX_MESSAGE_SIZE, MAX_MSG_FDS};

/// One message received: its header, its payload (`msg_size - 16` bytes) and the fds that came
/// with it.
#[derive(Debug)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// The bytes after the header.
    pub payload: Vec<u8>,
    /// Fds received with the message (at most [`MAX_MSG_FDS`]).
    pub fds: Vec<OwnedFd>,
}

/// Why a connection can carry no more messages.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The peer closed the socket in the middle of a message.
    #[error("peer closed the connection after {received} of {expected} bytes of a message")]
    Truncated {
        /// Bytes of the message received.
        received: usize,
        /// Bytes the message should have had (16 while the header was incomplete).
        expected: usize,
    },
    /// The header announces a message smaller than the header itself.
    #[error("message size {} is smaller than the 16-byte header", header.msg_size)]
    TooSmall {
        /// The header.
        header: Header,
    },
    /// The header announces a message larger than [`MAX_MESSAGE_SIZE`]; nothing was
    /// allocated for it.
    #[error("message size {} exceeds the limit of {MAX_MESSAGE_SIZE} bytes", header.msg_size)]
    TooLarge {
        /// The header.
        header: Header,
    },
    /// The message carried more fds than [`MAX_MSG_FDS`] (they were closed, and the stream
    /// position is lost with them).
    #[error("a message carried more than {MAX_MSG_FDS} fds")]
    TooManyFds,
    /// The rest of a started message did not arrive in time, or a send did not complete in
    /// time.
    #[error("timed out in the middle of a message")]
    Timeout,
    /// A message was sent only in part (the send timed out, or a signal interrupted it, after
    /// some bytes left): the stream is torn.
    #[error("a message was only partly sent")]
    ShortSend,
    /// The peer did not read its replies: sending the next one would have queued more than
    /// `limit` bytes for it.
    #[error("the peer left more than {limit} bytes of replies unread")]
    Backlog {
        /// The bound on bytes queued for the peer.
        limit: usize,
    },
    /// The peer reset the connection, or is gone while we were sending.
    #[error("connection reset by the peer")]
    Reset,
    /// Any other socket error.
    #[error("socket failed")]
    Io(#[source] io::Error),
}

impl ConnectionError {
    /// The header of the offending message, when it was read completely (an error reply can
    /// then name it).
    pub fn header(&self) -> Option<&Header> {
        match self {
            ConnectionError::TooSmall { header } | ConnectionError::TooLarge { header } => {
                Some(header)
            }
            _ => None,
        }
    }

    pub(crate) fn from_io(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectionError::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected => ConnectionError::Reset,
            // recv_with_fds reports fds that did not fit (MSG_CTRUNC) or more than 16 so.
            io::ErrorKind::InvalidData => ConnectionError::TooManyFds,
            // send_with_fds reports a short sendmsg so.
            io::ErrorKind::WriteZero => ConnectionError::ShortSend,
            _ => ConnectionError::Io(error),
        }
    }
}

/// A vfio-user connection: one side of a UNIX stream socket.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    message_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
}

impl Connection {
    /// Wraps a connected socket. Reads and writes block without a time limit until
    /// [`set_timeouts`](Self::set_timeouts) says otherwise.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            message_timeout: None,
            idle_timeout: None,
        }
    }

    /// Sets the time limits: `idle` for the first bytes of a message (`None`: wait for ever,
    /// right for a server whose client may be quiet for hours), and `message` for the rest of
    /// a message once it has started and for each send (`None`: no limit). A peer that starts
    /// a message and stalls then costs at most `message`.
    pub fn set_timeouts(
        &mut self,
        idle: Option<Duration>,
        message: Option<Duration>,
    ) -> io::Result<()> {
        self.idle_timeout = idle;
        self.message_timeout = message;
        self.stream.set_read_timeout(idle)?;
        self.stream.set_write_timeout(message)
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Receives one whole message. `Ok(None)` means the peer closed the socket cleanly, between
    /// two messages.
    pub fn recv(&mut self) -> Result<Option<Message>, ConnectionError> {
        let mut reader = MessageReader::new();
        // Whether this message switched the socket to the message timeout. Kept here, not in
        // the reader: a reader that completes a message resets itself.
        let mut switched = false;
        let result = loop {
            match reader.read_some(self.stream.as_fd()) {
                Ok(ReadProgress::Message(message)) => break Ok(Some(message)),
                Ok(ReadProgress::Closed) => break Ok(None),
                Ok(ReadProgress::Partial) => {
                    // The first bytes of a message: the rest must come within the message
                    // timeout.
                    if reader.received() > 0
                        && !switched
                        && self.message_timeout != self.idle_timeout
                    {
                        switched = true;
                        if let Err(error) = self.stream.set_read_timeout(self.message_timeout) {
                            break Err(ConnectionError::Io(error));
                        }
                    }
                }
                // A blocking socket says "would block" only when its read timeout expired.
                Ok(ReadProgress::WouldBlock) => break Err(ConnectionError::Timeout),
                Err(error) => break Err(error),
            }
        };
        if switched {
            self.stream
                .set_read_timeout(self.idle_timeout)
                .map_err(ConnectionError::Io)?;
        }
        result
    }

    /// Sends one whole message (`bytes` starts with its header) with `fds`, in one `sendmsg`.
    pub fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ConnectionError> {
        debug_assert!(bytes.len() >= HEADER_SIZE && bytes.len() <= MAX_MESSAGE_SIZE);
        loop {
            match send_with_fds(self.stream.as_fd(), bytes, fds) {
                Ok(()) => return Ok(()),
                // Nothing was sent (a partial send is reported as WriteZero): try again.
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(ConnectionError::from_io(error)),
            }
        }
    }

    /// Sends `header` and `payload` as one message.
    pub fn send_parts(
        &mut self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ConnectionError> {
        self.send(&header.with_payload(payload), fds)
    }

    /// Shuts the socket down in both directions (the peer sees end of stream).
    pub fn shutdown(&self) {
        // Fails only if the socket is no longer connected: then it is shut down already.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// What one [`MessageReader::read_some`] did.
#[derive(Debug)]
pub enum ReadProgress {
    /// The last bytes of a message arrived: here it is, with its fds.
    Message(Message),
    /// Bytes of a message arrived, not all of it yet.
    Partial,
    /// Nothing to read now (a non-blocking socket), or a blocking socket's read timeout
    /// expired.
    WouldBlock,
    /// The peer closed the socket between two messages.
    Closed,
}

/// How many payload bytes a reader makes room for ahead of what has arrived: the buffer grows
/// with the bytes the peer actually sends, so a header announcing a large message costs
/// nothing until its body comes.
const READ_CHUNK: usize = 64 * 1024;

/// Reassembles one message at a time from a stream socket, one `recvmsg` per
/// [`read_some`](Self::read_some), blocking or not: the framing of both [`Connection::recv`]
/// and the non-blocking [`ServerConnection`](crate::ServerConnection).
///
/// It never reads past the current message's last byte, so the fds received while reading a
/// message belong to it (the kernel attaches `SCM_RIGHTS` to the first bytes of the `sendmsg`
/// that carried them, and a message cut into many reads keeps the fds of its first). A header
/// announcing a size below the header or above [`MAX_MESSAGE_SIZE`] is refused before any
/// payload is read, more than [`MAX_MSG_FDS`] fds for one message are refused, and the payload
/// buffer grows only as bytes arrive (at most the announced size).
#[derive(Debug, Default)]
pub struct MessageReader {
    head: [u8; HEADER_SIZE],
    head_got: usize,
    header: Option<Header>,
    payload: Vec<u8>,
    payload_got: usize,
    fds: Vec<OwnedFd>,
}

impl MessageReader {
    /// A reader between two messages.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of the current message received so far (0 between messages).
    pub fn received(&self) -> usize {
        self.head_got + self.payload_got
    }

    /// Whether a message has started and is not complete yet.
    pub fn in_message(&self) -> bool {
        self.received() > 0
    }

    /// One `recvmsg` (retried on `EINTR`): reads at most up to the end of the current message.
    /// After an `Err` the stream position is lost and the connection must be closed.
    pub fn read_some(&mut self, socket: BorrowedFd<'_>) -> Result<ReadProgress, ConnectionError> {
        let (n, fds) = loop {
            let buf = match &self.header {
                None => &mut self.head[self.head_got..],
                Some(header) => {
                    let total = header.msg_size as usize - HEADER_SIZE;
                    if self.payload.len() == self.payload_got {
                        // Bounded by the announced size, itself checked against the limit.
                        let room = (self.payload_got + READ_CHUNK).min(total);
                        self.payload.resize(room, 0);
                    }
                    &mut self.payload[self.payload_got..]
                }
            };
            match recv_with_fds(socket, buf) {
                Ok(got) => break got,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(ReadProgress::WouldBlock);
                }
                Err(error) => return Err(ConnectionError::from_io(error)),
            }
        };
        self.fds.extend(fds);
        if self.fds.len() > MAX_MSG_FDS {
            return Err(ConnectionError::TooManyFds);
        }
        if n == 0 {
            if !self.in_message() {
                return Ok(ReadProgress::Closed);
            }
            return Err(ConnectionError::Truncated {
                received: self.received(),
                expected: self
                    .header
                    .map_or(HEADER_SIZE, |header| header.msg_size as usize),
            });
        }
        match self.header {
            None => {
                self.head_got += n;
                if self.head_got < HEADER_SIZE {
                    return Ok(ReadProgress::Partial);
                }
                let header = Header::read_from_bytes(&self.head).map_err(|_| {
                    ConnectionError::Truncated {
                        received: 0,
                        expected: HEADER_SIZE,
                    }
                })?;
                let size = header.msg_size as usize;
                if size < HEADER_SIZE {
                    return Err(ConnectionError::TooSmall { header });
                }
                if size > MAX_MESSAGE_SIZE {
                    return Err(ConnectionError::TooLarge { header });
                }
                self.header = Some(header);
            }
            Some(_) => self.payload_got += n,
        }
        let Some(header) = self.header else {
            return Ok(ReadProgress::Partial);
        };
        if self.payload_got < header.msg_size as usize - HEADER_SIZE {
            return Ok(ReadProgress::Partial);
        }
        let mut payload = std::mem::take(&mut self.payload);
        payload.truncate(self.payload_got);
        let fds = std::mem::take(&mut self.fds);
        *self = Self::default();
        Ok(ReadProgress::Message(Message {
            header,
            payload,
            fds,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Command;
    use std::io::Write;

    #[test]
    fn message_split_across_writes_is_reassembled() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let header = Header::command(3, Command::RegionWrite, 20);
        let bytes = header.with_payload(&[7; 20]);
        let writer = std::thread::spawn(move || {
            for chunk in bytes.chunks(5) {
                b.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let mut conn = Connection::new(a);
        let message = conn.recv().unwrap().unwrap();
        writer.join().unwrap();
        assert_eq!(message.header, header);
        assert_eq!(message.payload, vec![7; 20]);
        assert!(conn.recv().unwrap().is_none());
    }

    #[test]
    fn oversized_header_is_refused_without_reading_on() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut header = Header::command(1, Command::RegionWrite, 0);
        header.msg_size = u32::MAX;
        b.write_all(&header.with_payload(&[])).unwrap();
        let mut conn = Connection::new(a);
        assert!(matches!(conn.recv(), Err(ConnectionError::TooLarge { .. })));
    }

    #[test]
    fn eof_inside_the_header_is_truncation() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[1, 2, 3]).unwrap();
        drop(b);
        let mut conn = Connection::new(a);
        assert!(matches!(
            conn.recv(),
            Err(ConnectionError::Truncated {
                received: 3,
                expected: 16
            })
        ));
    }

    /// Sends 16-byte messages to a peer that reads nothing until one fails.
    fn fill(conn: &mut Connection) -> ConnectionError {
        let header = Header::command(1, Command::DeviceReset, 0).with_payload(&[]);
        for _ in 0..1_000_000 {
            if let Err(error) = conn.send(&header, &[]) {
                return error;
            }
        }
        panic!("a peer that reads nothing took a million messages");
    }

    // Catches: a send timeout reported as a bare I/O error (the client could not name it).
    #[test]
    fn a_send_the_peer_has_no_room_for_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a);
        conn.set_timeouts(None, Some(Duration::from_millis(20)))
            .unwrap();
        let error = fill(&mut conn);
        assert!(matches!(error, ConnectionError::Timeout), "{error:?}");
    }

    #[test]
    fn a_message_the_peer_takes_only_in_part_is_a_short_send() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a);
        conn.set_timeouts(None, Some(Duration::from_millis(20)))
            .unwrap();
        // Larger than any socket buffer: some of it goes, then the send times out.
        let bytes = Header::command(1, Command::RegionWrite, MAX_MESSAGE_SIZE - HEADER_SIZE)
            .with_payload(&vec![0; MAX_MESSAGE_SIZE - HEADER_SIZE]);
        let error = conn.send(&bytes, &[]).unwrap_err();
        assert!(matches!(error, ConnectionError::ShortSend), "{error:?}");
    }

    #[test]
    fn sending_to_a_peer_that_is_gone_is_a_reset() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut conn = Connection::new(a);
        let header = Header::command(1, Command::DeviceReset, 0);
        let error = conn.send_parts(&header, &[], &[]).unwrap_err();
        assert!(matches!(error, ConnectionError::Reset), "{error:?}");
    }

    // Catches: the idle timeout kept for the rest of a started message (a slow peer cut off
    // mid-message although the message timeout allows it).
    #[test]
    fn a_started_message_has_the_message_timeout_to_finish_not_the_idle_one() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let header = Header::command(3, Command::RegionWrite, 4);
        let bytes = header.with_payload(&[9; 4]);
        let writer = std::thread::spawn(move || {
            b.write_all(&bytes[..10]).unwrap();
            // Longer than the idle timeout, well within the message timeout.
            std::thread::sleep(Duration::from_millis(300));
            b.write_all(&bytes[10..]).unwrap();
            b
        });
        let mut conn = Connection::new(a);
        conn.set_timeouts(
            Some(Duration::from_millis(50)),
            Some(Duration::from_secs(10)),
        )
        .unwrap();
        let message = conn.recv().unwrap().expect("the whole message");
        assert_eq!(message.header, header);
        assert_eq!(message.payload, vec![9; 4]);
        // Between messages the idle timeout holds again.
        assert!(matches!(conn.recv(), Err(ConnectionError::Timeout)));
        drop(writer.join().unwrap());
    }
}
