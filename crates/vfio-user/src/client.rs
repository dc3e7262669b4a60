//! The client side: connect, negotiate, and one method per command.
//!
//! Every reply is validated before anything in it is used: it must be a reply (a command from
//! the server is answered `ENOSYS`, since this client supports no server-to-client commands),
//! carry the message id and command just sent, have only defined flag bits, the exact payload
//! size its command implies, and the fds its command allows (others are closed). An error
//! reply becomes [`ClientError::Remote`] with its errno.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;
use zerocopy::{FromBytes, IntoBytes};

use crate::connection::{Connection, ConnectionError, Message};
use crate::info::{
    DeviceInfo, DmaProt, IoFd, IoFdsReply, IrqInfo, RegionInfo, RegionInfoReply,
    decode_io_fds_reply,
};
use crate::protocol::{
    Command, Errno, FLAGS_KNOWN, FLAGS_TYPE_COMMAND, FLAGS_TYPE_REPLY, Header, MAX_DATA_XFER_SIZE,
    MAX_MSG_FDS, MAX_PAYLOAD_SIZE, PROTOCOL_MAJOR, PROTOCOL_MINOR, ProtocolError, RawDmaUnmap,
    RawRegionAccess,
};
use crate::request::{IrqSetFlags, encode};
use crate::version::{Capabilities, Version};

/// How many times the client asks again with a larger `argsz` before giving up on a server
/// that keeps asking for more.
const MAX_ARGSZ_RETRIES: usize = 3;

/// How many server-to-client commands the client answers (`ENOSYS`) while waiting for one
/// reply before it gives up on the server.
const MAX_INTERLEAVED_COMMANDS: usize = 64;

/// `argsz` of the first region info request: room for a type capability and a few sparse
/// areas, so one round trip is usually enough.
const REGION_INFO_ARGSZ: u32 = 512;

/// `argsz` of the first `GET_REGION_IO_FDS` request: room for 8 sub-regions.
const IO_FDS_ARGSZ: u32 = 16 + 8 * 40;

/// How long [`ClientOptions::default`] waits for the reply to `VFIO_USER_VERSION`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`ClientOptions::default`] waits for each later reply (and for each send).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client waits for its server. `None` waits for ever.
///
/// ```
/// # use std::time::Duration;
/// let options = iopf_vfio_user::ClientOptions::default()
///     .handshake_timeout(Some(Duration::from_secs(2)))
///     .request_timeout(Some(Duration::from_secs(30)));
/// assert_eq!(options.request, Some(Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// The wait for the reply to `VFIO_USER_VERSION`, the first message.
    pub handshake: Option<Duration>,
    /// The wait for the reply to each later command (the whole reply, server commands in
    /// between included), and for each send.
    pub request: Option<Duration>,
}

impl Default for ClientOptions {
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`] and [`DEFAULT_REQUEST_TIMEOUT`].
    fn default() -> Self {
        Self {
            handshake: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            request: Some(DEFAULT_REQUEST_TIMEOUT),
        }
    }
}

impl ClientOptions {
    /// Sets the wait for the reply to `VFIO_USER_VERSION`.
    pub fn handshake_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.handshake = timeout;
        self
    }

    /// Sets the wait for each later reply.
    pub fn request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request = timeout;
        self
    }
}

/// A duration in seconds, for messages: `5 s`, `0.25 s`.
struct Seconds(Duration);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} s", self.0.as_secs_f64())
    }
}

/// Why a client call failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The connection broke (or timed out).
    #[error("connection to the server failed")]
    Connection(#[from] ConnectionError),
    /// The server closed the connection.
    #[error("the server closed the connection")]
    Closed,
    /// The server sent no (whole) reply to a command in time.
    #[error("no reply to {} within {}", command.name(), Seconds(*waited))]
    NoReply {
        /// The command.
        command: Command,
        /// How long the client waited.
        waited: Duration,
    },
    /// The server did not take a command in time (it does not read its socket).
    #[error("could not send {} within {}", command.name(), Seconds(*waited))]
    SendTimeout {
        /// The command.
        command: Command,
        /// How long the client waited.
        waited: Duration,
    },
    /// The server answered the command with an error.
    #[error("{command:?} refused by the server: {errno}")]
    Remote {
        /// The command.
        command: Command,
        /// The errno of the error reply (may be 0).
        errno: Errno,
    },
    /// The server's reply is malformed or does not answer the command.
    #[error("bad reply to {command:?}")]
    BadReply {
        /// The command.
        command: Command,
        /// What is wrong with the reply.
        #[source]
        error: ProtocolError,
    },
    /// The call cannot be made as asked (e.g. fds to a server that accepts none).
    #[error("{0}")]
    InvalidArgument(&'static str),
}

impl ClientError {
    /// The errno of an error reply, if this is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            ClientError::Remote { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the server did not answer (or take) a command in time.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ClientError::NoReply { .. } | ClientError::SendTimeout { .. }
        )
    }
}

fn bad(command: Command, error: ProtocolError) -> ClientError {
    ClientError::BadReply { command, error }
}

/// A region as the client sees it: its info and the fd to map it through, if the server sent
/// one.
#[derive(Debug)]
pub struct Region {
    /// Region index.
    pub index: u32,
    /// Flags, size, mmap offset, capabilities.
    pub info: RegionInfo,
    /// The fd to `mmap` (at `info.mmap_offset`), if any.
    pub fd: Option<OwnedFd>,
}

/// The sub-regions of a region served through fds, with the fds.
#[derive(Debug)]
pub struct RegionIoFds {
    /// Each sub-region with the index of its fd in `fds`.
    pub sub_regions: Vec<(IoFd, usize)>,
    /// The fds, in the order the server sent them.
    pub fds: Vec<OwnedFd>,
}

impl RegionIoFds {
    /// The fd of sub-region `i`.
    pub fn fd(&self, i: usize) -> Option<BorrowedFd<'_>> {
        let (_, fd_index) = self.sub_regions.get(i)?;
        self.fds.get(*fd_index).map(AsFd::as_fd)
    }
}

/// A vfio-user client connected to one device.
#[derive(Debug)]
pub struct Client {
    conn: Connection,
    next_id: u16,
    server: Version,
    /// The wait for the reply in progress (the handshake's, then each request's).
    timeout: Option<Duration>,
    options: ClientOptions,
}

impl Client {
    /// Connects to the server at `path` and negotiates the version, with the default time
    /// limits ([`ClientOptions::default`]).
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with(path, ClientOptions::default())
    }

    /// Connects to the server at `path` and negotiates the version, waiting for the server
    /// as `options` says.
    pub fn connect_with(
        path: impl AsRef<Path>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_stream_with(stream, options)
    }

    /// Negotiates the version on a connected socket, with the default time limits.
    pub fn from_stream(stream: UnixStream) -> Result<Self, ClientError> {
        Self::from_stream_with(stream, ClientOptions::default())
    }

    /// Negotiates the version on a connected socket, waiting for the server as `options`
    /// says.
    pub fn from_stream_with(
        stream: UnixStream,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let mut client = Self {
            conn: Connection::new(stream),
            next_id: 0,
            server: Version::default(),
            timeout: options.handshake,
            options,
        };
        client.server = client.negotiate()?;
        client.timeout = options.request;
        Ok(client)
    }

    /// Limits the wait for each reply (`None`: wait for ever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.options.request = timeout;
        self.timeout = timeout;
        Ok(())
    }

    /// The time limits the client was made with (and [`set_timeout`](Self::set_timeout)).
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The server's version reply: the negotiated version and the server's capabilities.
    pub fn version(&self) -> &Version {
        &self.server
    }

    /// The server's capabilities.
    pub fn server_capabilities(&self) -> &Capabilities {
        &self.server.capabilities
    }

    fn negotiate(&mut self) -> Result<Version, ClientError> {
        let command = Command::Version;
        let proposal = Version {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            capabilities: Capabilities {
                max_msg_fds: Some(MAX_MSG_FDS as u32),
                max_data_xfer_size: Some(MAX_DATA_XFER_SIZE),
                pgsizes: Some(4096),
                ..Capabilities::default()
            },
        };
        let reply = self.transact(command, &proposal.encode(), &[])?;
        no_fds(command, &reply)?;
        let version = Version::decode(&reply.payload).map_err(|e| bad(command, e))?;
        if version.major != PROTOCOL_MAJOR || version.minor > PROTOCOL_MINOR {
            return Err(bad(
                command,
                ProtocolError::VersionUnsupported {
                    major: version.major,
                    minor: version.minor,
                },
            ));
        }
        Ok(version)
    }

    /// Sends one command and returns its validated reply (not an error reply).
    fn transact(
        &mut self,
        command: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, ClientError> {
        if payload.len() > MAX_PAYLOAD_SIZE {
            return Err(ClientError::InvalidArgument(
                "request larger than a message",
            ));
        }
        let msg_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = Header::command(msg_id, command, payload.len());
        // One deadline for the whole exchange: the send, the reply, and any server commands
        // answered in between.
        let waited = self.timeout;
        let deadline = waited.map(|t| Instant::now() + t);
        self.limit(deadline, command)?;
        self.conn
            .send_parts(&header, payload, fds)
            .map_err(|e| match (e, waited) {
                (ConnectionError::Timeout, Some(waited)) => {
                    ClientError::SendTimeout { command, waited }
                }
                (e, _) => e.into(),
            })?;
        for _ in 0..=MAX_INTERLEAVED_COMMANDS {
            self.limit(deadline, command)?;
            let reply = match self.conn.recv() {
                Ok(reply) => reply.ok_or(ClientError::Closed)?,
                Err(ConnectionError::Timeout) if waited.is_some() => {
                    return Err(ClientError::NoReply {
                        command,
                        waited: waited.unwrap_or_default(),
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let h = reply.header;
            if h.message_type() == FLAGS_TYPE_COMMAND {
                // A command from the server (DMA_READ/WRITE): this client offers none.
                if !h.no_reply() {
                    let refusal = Header::error_reply(&h, Errno::ENOSYS);
                    self.conn.send(refusal.as_bytes(), &[])?;
                }
                continue;
            }
            if h.message_type() != FLAGS_TYPE_REPLY {
                return Err(bad(
                    command,
                    ProtocolError::MessageType {
                        found: h.message_type(),
                        expected: FLAGS_TYPE_REPLY,
                    },
                ));
            }
            if h.msg_id != msg_id || h.command != command.raw() {
                return Err(bad(
                    command,
                    ProtocolError::ReplyMismatch {
                        command,
                        msg_id,
                        found_id: h.msg_id,
                        found_command: h.command,
                    },
                ));
            }
            if h.flags & !FLAGS_KNOWN != 0 {
                return Err(bad(command, ProtocolError::HeaderFlags(h.flags)));
            }
            if h.is_error() {
                return Err(ClientError::Remote {
                    command,
                    errno: Errno(h.error),
                });
            }
            return Ok(reply);
        }
        Err(bad(
            command,
            ProtocolError::Field {
                command,
                what: "the server sent commands instead of a reply",
            },
        ))
    }

    /// Sets the socket's time limits to what is left until `deadline` (none: no limit).
    fn limit(&mut self, deadline: Option<Instant>, command: Command) -> Result<(), ClientError> {
        let left = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ClientError::NoReply {
                        command,
                        waited: self.timeout.unwrap_or_default(),
                    });
                }
                Some(left)
            }
        };
        self.conn
            .set_timeouts(left, left)
            .map_err(|error| ClientError::Connection(ConnectionError::Io(error)))
    }

    /// `VFIO_USER_DEVICE_GET_INFO`.
    pub fn device_info(&mut self) -> Result<DeviceInfo, ClientError> {
        let command = Command::DeviceGetInfo;
        let reply = self.transact(command, &encode::device_get_info(), &[])?;
        no_fds(command, &reply)?;
        DeviceInfo::decode_reply(&reply.payload).map_err(|e| bad(command, e))
    }

    /// `VFIO_USER_DEVICE_GET_REGION_INFO` for `index`: the region with its capabilities
    /// (asking again with a larger `argsz` if the server says they did not fit) and its fd.
    pub fn region_info(&mut self, index: u32) -> Result<Region, ClientError> {
        let command = Command::DeviceGetRegionInfo;
        let mut argsz = REGION_INFO_ARGSZ;
        for _ in 0..=MAX_ARGSZ_RETRIES {
            let mut reply = self.transact(command, &encode::get_region_info(index, argsz), &[])?;
            if reply.fds.len() > 1 {
                return Err(fd_count(command, "at most one", reply.fds.len()));
            }
            match RegionInfo::decode_reply(&reply.payload, index, argsz)
                .map_err(|e| bad(command, e))?
            {
                RegionInfoReply::Complete(info) => {
                    return Ok(Region {
                        index,
                        info,
                        fd: reply.fds.pop(),
                    });
                }
                RegionInfoReply::NeedsArgsz(needed) => argsz = needed,
            }
        }
        Err(bad(
            command,
            ProtocolError::Field {
                command,
                what: "the server keeps asking for a larger argsz",
            },
        ))
    }

    /// The first region whose type capability is (`region_type`, `subtype`), with its fd.
    pub fn find_region_by_type(
        &mut self,
        region_type: u32,
        subtype: u32,
    ) -> Result<Option<Region>, ClientError> {
        let info = self.device_info()?;
        for index in 0..info.num_regions {
            let region = self.region_info(index)?;
            if region.info.region_type() == Some((region_type, subtype)) {
                return Ok(Some(region));
            }
        }
        Ok(None)
    }

    /// `VFIO_USER_DEVICE_GET_IRQ_INFO` for `index`.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo, ClientError> {
        let command = Command::DeviceGetIrqInfo;
        let reply = self.transact(command, &encode::get_irq_info(index), &[])?;
        no_fds(command, &reply)?;
        IrqInfo::decode_reply(&reply.payload, index).map_err(|e| bad(command, e))
    }

    /// `VFIO_USER_DEVICE_SET_IRQS` with `DATA_EVENTFD | ACTION_TRIGGER`: the device signals
    /// `eventfds[i]` for interrupt `i` of `index`. Sent in as many messages as the server's
    /// `max_msg_fds` requires.
    pub fn set_irqs(&mut self, index: u32, eventfds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        if eventfds.is_empty() {
            return Err(ClientError::InvalidArgument(
                "set_irqs needs eventfds; use disable_irqs to turn an index off",
            ));
        }
        let per_message = (self.server.capabilities.max_msg_fds() as usize).min(MAX_MSG_FDS);
        if per_message == 0 {
            return Err(ClientError::InvalidArgument("the server accepts no fds"));
        }
        let flags = IrqSetFlags::DATA_EVENTFD | IrqSetFlags::ACTION_TRIGGER;
        for (i, chunk) in eventfds.chunks(per_message).enumerate() {
            let start = u32::try_from(i * per_message)
                .map_err(|_| ClientError::InvalidArgument("too many eventfds"))?;
            self.set_irqs_with(flags, index, start, chunk.len() as u32, &[], chunk)?;
        }
        Ok(())
    }

    /// `VFIO_USER_DEVICE_SET_IRQS` with `DATA_NONE | ACTION_TRIGGER` and count 0: disables
    /// every interrupt of `index` (the device forgets its eventfds).
    pub fn disable_irqs(&mut self, index: u32) -> Result<(), ClientError> {
        let flags = IrqSetFlags::DATA_NONE | IrqSetFlags::ACTION_TRIGGER;
        self.set_irqs_with(flags, index, 0, 0, &[], &[])
    }

    /// `VFIO_USER_DEVICE_SET_IRQS` as the caller composes it: `bools` is the `DATA_BOOL`
    /// data, `fds` the `DATA_EVENTFD` eventfds.
    pub fn set_irqs_with(
        &mut self,
        flags: IrqSetFlags,
        index: u32,
        start: u32,
        count: u32,
        bools: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let command = Command::DeviceSetIrqs;
        let payload = encode::set_irqs(flags, index, start, count, bools);
        let reply = self.transact(command, &payload, fds)?;
        empty_reply(command, &reply)
    }

    /// Reads `data.len()` bytes of region `index` at `offset` through the socket, in as many
    /// messages as the server's `max_data_xfer_size` requires.
    pub fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), ClientError> {
        let command = Command::RegionRead;
        let chunk_size = self.transfer_size()?;
        let mut at = offset;
        for chunk in data.chunks_mut(chunk_size) {
            let count = chunk.len() as u32;
            let reply = self.transact(command, &encode::region_read(index, at, count), &[])?;
            no_fds(command, &reply)?;
            let (access, bytes) =
                RawRegionAccess::read_from_prefix(&reply.payload).map_err(|_| {
                    bad(
                        command,
                        ProtocolError::PayloadTooShort {
                            command,
                            min: size_of::<RawRegionAccess>(),
                            actual: reply.payload.len(),
                        },
                    )
                })?;
            check_echo(command, &access, index, at, count)?;
            if bytes.len() != chunk.len() {
                return Err(bad(
                    command,
                    ProtocolError::PayloadSize {
                        command,
                        expected: size_of::<RawRegionAccess>() + chunk.len(),
                        actual: reply.payload.len(),
                    },
                ));
            }
            chunk.copy_from_slice(bytes);
            at = next_offset(at, count)?;
        }
        Ok(())
    }

    /// Writes `data` to region `index` at `offset` through the socket, in as many messages as
    /// the server's `max_data_xfer_size` requires.
    pub fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let command = Command::RegionWrite;
        let chunk_size = self.transfer_size()?;
        let mut at = offset;
        for chunk in data.chunks(chunk_size) {
            let count = chunk.len() as u32;
            let reply = self.transact(command, &encode::region_write(index, at, chunk), &[])?;
            no_fds(command, &reply)?;
            let access = RawRegionAccess::read_from_bytes(&reply.payload).map_err(|_| {
                bad(
                    command,
                    ProtocolError::PayloadSize {
                        command,
                        expected: size_of::<RawRegionAccess>(),
                        actual: reply.payload.len(),
                    },
                )
            })?;
            check_echo(command, &access, index, at, count)?;
            at = next_offset(at, count)?;
        }
        Ok(())
    }

    fn transfer_size(&self) -> Result<usize, ClientError> {
        let size = self
            .server
            .capabilities
            .max_data_xfer_size()
            .min(MAX_DATA_XFER_SIZE) as usize;
        if size == 0 {
            return Err(ClientError::InvalidArgument(
                "the server's max_data_xfer_size is 0",
            ));
        }
        Ok(size)
    }

    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS` for `index`: the sub-regions served through fds
    /// (for our device, the response doorbell on the response region's `prod`).
    pub fn region_io_fds(&mut self, index: u32) -> Result<RegionIoFds, ClientError> {
        let command = Command::DeviceGetRegionIoFds;
        let mut argsz = IO_FDS_ARGSZ;
        for _ in 0..=MAX_ARGSZ_RETRIES {
            let reply = self.transact(command, &encode::get_region_io_fds(index, argsz), &[])?;
            match decode_io_fds_reply(&reply.payload, index, argsz, reply.fds.len())
                .map_err(|e| bad(command, e))?
            {
                IoFdsReply::Complete(sub_regions) => {
                    return Ok(RegionIoFds {
                        sub_regions,
                        fds: reply.fds,
                    });
                }
                IoFdsReply::NeedsArgsz(needed) => {
                    no_fds(command, &reply)?;
                    argsz = needed;
                }
            }
        }
        Err(bad(
            command,
            ProtocolError::Field {
                command,
                what: "the server keeps asking for a larger argsz",
            },
        ))
    }

    /// `VFIO_USER_DMA_MAP`: the device may access `size` bytes at DMA address `iova`, which
    /// are `fd` from `offset` (without an fd the server could only use `DMA_READ`/`WRITE`).
    pub fn dma_map(
        &mut self,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        iova: u64,
        size: u64,
        prot: DmaProt,
    ) -> Result<(), ClientError> {
        let command = Command::DmaMap;
        if fd.is_some() && self.server.capabilities.max_msg_fds() == 0 {
            return Err(ClientError::InvalidArgument("the server accepts no fds"));
        }
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let reply = self.transact(command, &encode::dma_map(prot, offset, iova, size), &fds)?;
        empty_reply(command, &reply)
    }

    /// `VFIO_USER_DMA_UNMAP` of the mapping at `iova` of `size` bytes.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), ClientError> {
        self.unmap(iova, size, false)
    }

    /// `VFIO_USER_DMA_UNMAP` with `VFIO_DMA_UNMAP_FLAG_ALL`.
    pub fn dma_unmap_all(&mut self) -> Result<(), ClientError> {
        self.unmap(0, 0, true)
    }

    fn unmap(&mut self, iova: u64, size: u64, all: bool) -> Result<(), ClientError> {
        let command = Command::DmaUnmap;
        let payload = encode::dma_unmap(iova, size, all);
        let reply = self.transact(command, &payload, &[])?;
        no_fds(command, &reply)?;
        // The specification has the server echo the request; accept an empty reply too.
        if !reply.payload.is_empty() {
            let echo = RawDmaUnmap::read_from_bytes(&reply.payload).map_err(|_| {
                bad(
                    command,
                    ProtocolError::PayloadSize {
                        command,
                        expected: size_of::<RawDmaUnmap>(),
                        actual: reply.payload.len(),
                    },
                )
            })?;
            if echo.address != iova || echo.size != size {
                return Err(bad(
                    command,
                    ProtocolError::Field {
                        command,
                        what: "the reply names another mapping",
                    },
                ));
            }
        }
        Ok(())
    }

    /// `VFIO_USER_DEVICE_RESET`.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        let command = Command::DeviceReset;
        let reply = self.transact(command, &[], &[])?;
        empty_reply(command, &reply)
    }

    /// Closes the connection (for our device: unregister).
    pub fn close(self) {
        self.conn.shutdown();
    }
}

fn fd_count(command: Command, expected: &'static str, actual: usize) -> ClientError {
    bad(
        command,
        ProtocolError::FdCount {
            command,
            expected,
            actual,
        },
    )
}

fn no_fds(command: Command, reply: &Message) -> Result<(), ClientError> {
    if reply.fds.is_empty() {
        Ok(())
    } else {
        Err(fd_count(command, "none allowed", reply.fds.len()))
    }
}

fn empty_reply(command: Command, reply: &Message) -> Result<(), ClientError> {
    no_fds(command, reply)?;
    if reply.payload.is_empty() {
        Ok(())
    } else {
        Err(bad(
            command,
            ProtocolError::PayloadSize {
                command,
                expected: 0,
                actual: reply.payload.len(),
            },
        ))
    }
}

fn check_echo(
    command: Command,
    access: &RawRegionAccess,
    region: u32,
    offset: u64,
    count: u32,
) -> Result<(), ClientError> {
    if access.region != region || access.offset != offset || access.count != count {
        return Err(bad(
            command,
            ProtocolError::Field {
                command,
                what: "the reply names another access",
            },
        ));
    }
    Ok(())
}

fn next_offset(offset: u64, count: u32) -> Result<u64, ClientError> {
    offset
        .checked_add(u64::from(count))
        .ok_or(ClientError::InvalidArgument("offset + length overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_error_reply_has_an_errno() {
        let remote = ClientError::Remote {
            command: Command::DmaMap,
            errno: Errno::EEXIST,
        };
        assert_eq!(remote.errno(), Some(Errno::EEXIST));
        assert_eq!(ClientError::Closed.errno(), None);
    }

    #[test]
    fn only_a_missing_reply_or_send_is_a_timeout() {
        let waited = Duration::from_secs(1);
        let command = Command::DeviceReset;
        assert!(ClientError::NoReply { command, waited }.is_timeout());
        assert!(ClientError::SendTimeout { command, waited }.is_timeout());
        assert!(!ClientError::Closed.is_timeout());
        let remote = ClientError::Remote {
            command,
            errno: Errno::EIO,
        };
        assert!(!remote.is_timeout());
    }
}
