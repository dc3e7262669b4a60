//! The server side: a device behind a trait, and a loop that serves one connection.
//!
//! [`Server::serve`] reads one message at a time, validates it completely before the device
//! sees it (header, payload layout, fds, and the region or IRQ ranges the device described),
//! calls the device, and replies. A bad request gets an error reply with an errno and the
//! connection goes on; a broken stream (a size below the header or above the limit, end of
//! stream in the middle of a message, too many fds, a stalled message) closes it. Either way
//! `serve` returns once the connection is over, with the reason, so the caller can treat the
//! end of a connection as unregister. It never panics on input and never allocates more than
//! [`MAX_MESSAGE_SIZE`](crate::protocol::MAX_MESSAGE_SIZE) for a message.
//!
//! Both ways of serving run the same state machine, [`ServerConnection`]: an event loop drives
//! it for many connections on few threads ([`ServerConnection::drive`] when the socket is
//! ready or a deadline passes), and [`Server::serve`] drives one connection on the calling
//! thread, waiting in `poll` between two calls.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use thiserror::Error;
use zerocopy::IntoBytes;

use crate::connection::{ConnectionError, Message};
use crate::info::{
    DeviceFlags, DeviceInfo, IoFd, IrqFlags, IrqInfo, RegionFlags, RegionInfo, encode_io_fds_reply,
};
use crate::nonblocking::{Outbox, ServerConnection, Status};
use crate::protocol::{
    Command, Errno, FLAGS_TYPE_COMMAND, HEADER_SIZE, Header, MAX_DATA_XFER_SIZE, MAX_MSG_FDS,
    PROTOCOL_MAJOR, PROTOCOL_MINOR, ProtocolError, RawRegionAccess,
};
use crate::request::{
    DmaMap, DmaUnmap, IrqData, Request, SetIrqs, check_command_header, decode_request,
};
use crate::version::{Capabilities, Version};

/// A device served over vfio-user. The server has validated every request before calling a
/// method: indices are below the counts of [`device_info`](Self::device_info), region
/// accesses lie inside the region and match its `READ`/`WRITE` flags, `SET_IRQS` ranges lie
/// inside the index's count and carry one eventfd per sub-index (or none). An `Err` becomes
/// an error reply carrying the errno.
pub trait VfioUserDevice {
    /// Flags and counts. The server always adds [`DeviceFlags::PCI`].
    fn device_info(&self) -> DeviceInfo;

    /// Region `index` (below `num_regions`). `None` is answered `EINVAL`.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;

    /// The fd the client maps region `index` through (sent with every region info reply for
    /// it), if the region is mmap-able.
    fn region_fd(&self, index: u32) -> Option<BorrowedFd<'_>>;

    /// The sub-regions of region `index` served through fds (`GET_REGION_IO_FDS`), each with
    /// its fd. The default has none.
    fn region_io_fds(&self, index: u32) -> Result<Vec<(IoFd, BorrowedFd<'_>)>, Errno> {
        let _ = index;
        Ok(Vec::new())
    }

    /// IRQ index `index` (below `num_irqs`). `None` is answered `EINVAL`.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;

    /// Reads `data.len()` bytes of region `index` at `offset` (inside the region, which has
    /// `READ`).
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno>;

    /// Writes `data` to region `index` at `offset` (inside the region, which has `WRITE`).
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;

    /// Sets actions on an IRQ index: with [`IrqData::Eventfds`] and
    /// [`IrqAction::Trigger`](crate::request::IrqAction::Trigger), the eventfds to signal.
    /// The fds are whatever the client sent: check them before use
    /// ([`iopf_queue::Doorbell::from_fd`] refuses anything but an eventfd).
    fn set_irqs(&mut self, request: SetIrqs) -> Result<(), Errno>;

    /// Client memory the device may access. The fd, if any, is whatever the client sent:
    /// check it before mapping it ([`iopf_queue::SharedMemory::attach`] refuses anything but
    /// a sealed memfd of a sane size). The default refuses with `ENOTSUP`.
    fn dma_map(&mut self, map: DmaMap) -> Result<(), Errno> {
        let _ = map;
        Err(Errno::ENOTSUP)
    }

    /// Withdraws client memory. The default refuses with `ENOTSUP`.
    fn dma_unmap(&mut self, unmap: DmaUnmap) -> Result<(), Errno> {
        let _ = unmap;
        Err(Errno::ENOTSUP)
    }

    /// Resets the device; called only if [`DeviceFlags::RESET`] is set (otherwise the server
    /// answers `ENOTSUP`). The default refuses with `ENOTSUP`.
    fn reset(&mut self) -> Result<(), Errno> {
        Err(Errno::ENOTSUP)
    }
}

/// Why a connection ended. Every reason means the same to a host: the client is gone
/// (unregister); the variants say whether it left politely.
#[derive(Debug)]
#[non_exhaustive]
pub enum Disconnect {
    /// The client closed the socket between two messages.
    Closed,
    /// The stream broke: end of stream or a stall in the middle of a message, a size below the
    /// header or above the limit, too many fds, or a reset. The server closed the connection.
    Broken(ConnectionError),
    /// Version negotiation failed (malformed `VERSION`, or a major version other than 0); the
    /// server replied with an error and closed the connection.
    VersionRefused(ProtocolError),
}

/// A failure of the server itself rather than of the client.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The socket failed for a reason other than the client (e.g. `EBADF`, `ENOMEM`).
    #[error("socket failed")]
    Io(#[source] io::Error),
}

/// How a server treats its connections.
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Once a message has started, the rest must arrive within this time, and each reply must
    /// be sent within it (`None`: no limit). Between messages the server waits without limit.
    pub message_timeout: Option<Duration>,
    /// `max_dma_maps` announced to a client that proposes it.
    pub max_dma_maps: u32,
    /// `pgsizes` announced to a client that proposes it.
    pub pgsizes: u64,
    /// Bytes of replies a connection may hold for a client that is not reading them; a reply
    /// that would go past it closes the connection ([`ConnectionError::Backlog`]). At least
    /// one largest message ([`MAX_MESSAGE_SIZE`](crate::protocol::MAX_MESSAGE_SIZE)) is
    /// always allowed.
    pub max_output: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            message_timeout: Some(Duration::from_secs(5)),
            max_dma_maps: 65535,
            pgsizes: 4096,
            max_output: 2 * crate::protocol::MAX_MESSAGE_SIZE,
        }
    }
}

/// A vfio-user server: serves one connection per [`serve`](Self::serve) call.
#[derive(Clone, Debug, Default)]
pub struct Server {
    config: ServerConfig,
}

/// What the dispatcher wants next.
pub(crate) enum Next {
    Continue,
    Close(Disconnect),
}

/// A reply ready to send.
struct Reply<'a> {
    bytes: Vec<u8>,
    fds: Vec<BorrowedFd<'a>>,
}

impl Reply<'_> {
    fn to(request: &Header, payload: &[u8]) -> Self {
        Self {
            bytes: Header::reply(request, payload.len()).with_payload(payload),
            fds: Vec::new(),
        }
    }

    fn error(request: &Header, errno: Errno) -> Self {
        Self {
            bytes: Header::error_reply(request, errno).as_bytes().to_vec(),
            fds: Vec::new(),
        }
    }
}

/// Per-connection state.
#[derive(Debug, Default)]
pub(crate) struct Session {
    /// The client's capabilities, once `VERSION` has been exchanged.
    client: Option<Capabilities>,
}

impl Server {
    /// A server with `config`.
    pub fn new(config: ServerConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Serves `device` on `stream` until the connection ends, and says why it ended. The
    /// socket is shut down on return. The calling thread drives a [`ServerConnection`] (the
    /// socket is made non-blocking) and waits in `poll` for the socket or the connection's
    /// next deadline between two steps.
    ///
    /// To stop serving from another thread, shut the socket down through a clone
    /// (`stream.try_clone()?.shutdown(Shutdown::Both)`): `serve` then returns
    /// [`Disconnect::Closed`].
    pub fn serve(
        &self,
        stream: UnixStream,
        device: &mut dyn VfioUserDevice,
    ) -> Result<Disconnect, ServerError> {
        let mut conn = ServerConnection::new(stream, self.clone())?;
        loop {
            match conn.drive(device, Instant::now())? {
                Status::Closed(reason) => return Ok(reason),
                Status::Open {
                    want_write,
                    deadline,
                } => wait_ready(conn.stream().as_fd(), want_write, deadline)?,
            }
        }
    }

    /// The reply to a message whose header was read but whose stream broke (too small, too
    /// large): an error reply naming it, if the client wants one. The connection closes
    /// after it either way.
    pub(crate) fn broken_reply(error: &ConnectionError, out: &mut Outbox) {
        if let Some(header) = error.header() {
            let errno = match error {
                ConnectionError::TooLarge { .. } => Errno::E2BIG,
                _ => Errno::EINVAL,
            };
            if header.message_type() == FLAGS_TYPE_COMMAND && !header.no_reply() {
                // Best effort: the connection ends either way.
                let _ = out.push(Header::error_reply(header, errno).as_bytes(), &[]);
            }
        }
    }

    pub(crate) fn handle(
        &self,
        conn: &mut Outbox,
        session: &mut Session,
        device: &mut dyn VfioUserDevice,
        message: Message,
    ) -> Result<Next, ServerError> {
        let Message {
            header,
            payload,
            fds,
        } = message;
        let outcome = match check_command_header(&header) {
            Err(error) => Err(error),
            Ok(command) if command != Command::Version && session.client.is_none() => {
                Err(ProtocolError::NotNegotiated(command))
            }
            Ok(command) => match decode_request(command, &payload, fds) {
                Err(error) if command == Command::Version && session.client.is_none() => {
                    // A VERSION we cannot parse ends the connection, as the specification
                    // asks of a version the server cannot support.
                    return self.refuse_version(conn, &header, error);
                }
                Err(error) => Err(error),
                Ok(Request::Version(version)) => {
                    return self.negotiate(conn, session, &header, version);
                }
                Ok(request) => self.dispatch(session, device, &header, request),
            },
        };
        let reply = match outcome {
            Ok(reply) => reply,
            Err(error) => Reply::error(&header, error.errno()),
        };
        self.send(conn, &header, reply)
    }

    fn send(
        &self,
        conn: &mut Outbox,
        request: &Header,
        reply: Reply<'_>,
    ) -> Result<Next, ServerError> {
        if request.no_reply() {
            return Ok(Next::Continue);
        }
        match conn.push(&reply.bytes, &reply.fds) {
            Ok(()) => Ok(Next::Continue),
            Err(ConnectionError::Io(error)) => Err(ServerError::Io(error)),
            Err(error) => Ok(Next::Close(Disconnect::Broken(error))),
        }
    }

    fn refuse_version(
        &self,
        conn: &mut Outbox,
        header: &Header,
        error: ProtocolError,
    ) -> Result<Next, ServerError> {
        if !header.no_reply() {
            // Best effort: the connection ends with `error` below whether or not the client
            // could take the reply.
            let _ = conn.push(Header::error_reply(header, error.errno()).as_bytes(), &[]);
        }
        Ok(Next::Close(Disconnect::VersionRefused(error)))
    }

    fn negotiate(
        &self,
        conn: &mut Outbox,
        session: &mut Session,
        header: &Header,
        proposal: Version,
    ) -> Result<Next, ServerError> {
        if session.client.is_some() {
            let errno = ProtocolError::AlreadyNegotiated.errno();
            return self.send(conn, header, Reply::error(header, errno));
        }
        if proposal.major != PROTOCOL_MAJOR {
            let error = ProtocolError::VersionUnsupported {
                major: proposal.major,
                minor: proposal.minor,
            };
            return self.refuse_version(conn, header, error);
        }
        let offered = &proposal.capabilities;
        // The reply's capabilities are those proposed that we support: always the two limits
        // every client needs (QEMU and the rust-vmm client propose and parse both), the DMA
        // ones if proposed. Migration, twin sockets and REGION_WRITE_MULTI are not supported
        // and never echoed, which tells the client so.
        let capabilities = Capabilities {
            max_msg_fds: Some(MAX_MSG_FDS as u32),
            max_data_xfer_size: Some(MAX_DATA_XFER_SIZE),
            max_dma_maps: offered
                .max_dma_maps
                .map(|theirs| theirs.min(self.config.max_dma_maps)),
            pgsizes: offered.pgsizes.map(|_| self.config.pgsizes),
            ..Capabilities::default()
        };
        let reply = Version {
            major: PROTOCOL_MAJOR,
            minor: proposal.minor.min(PROTOCOL_MINOR),
            capabilities,
        };
        session.client = Some(proposal.capabilities);
        self.send(conn, header, Reply::to(header, &reply.encode()))
    }

    fn dispatch<'d>(
        &self,
        session: &Session,
        device: &'d mut dyn VfioUserDevice,
        header: &Header,
        request: Request<'_>,
    ) -> Result<Reply<'d>, ProtocolError> {
        let info = device.device_info();
        let errno = ProtocolError::Device;
        match request {
            Request::Version(_) => Err(ProtocolError::AlreadyNegotiated),
            Request::DeviceGetInfo => {
                let info = DeviceInfo {
                    flags: info.flags | DeviceFlags::PCI,
                    ..info
                };
                Ok(Reply::to(header, &info.encode_reply()))
            }
            Request::GetRegionInfo { argsz, index } => {
                let device: &'d dyn VfioUserDevice = device;
                let mut region = region(device, &info, index)?;
                // A client that accepts no fds gets the region without one, and without
                // MMAP: it reads and writes through the socket instead.
                let fd = device
                    .region_fd(index)
                    .filter(|_| session.client_max_fds() >= 1);
                if fd.is_none() {
                    region.flags -= RegionFlags::MMAP;
                }
                let payload = region.encode_reply(index, argsz)?;
                Ok(Reply {
                    bytes: Header::reply(header, payload.len()).with_payload(&payload),
                    fds: fd.into_iter().collect(),
                })
            }
            Request::GetRegionIoFds { argsz, index } => {
                if index >= info.num_regions {
                    return Err(invalid(Command::DeviceGetRegionIoFds, "no such region"));
                }
                let device: &'d dyn VfioUserDevice = device;
                let sub_regions = device.region_io_fds(index).map_err(errno)?;
                let (payload, fds) = encode_io_fds_reply(index, argsz, &sub_regions)?;
                if fds.len() > session.client_max_fds() as usize || fds.len() > MAX_MSG_FDS {
                    return Err(ProtocolError::ReplyTooLarge {
                        command: Command::DeviceGetRegionIoFds,
                        size: payload.len(),
                    });
                }
                Ok(Reply {
                    bytes: Header::reply(header, payload.len()).with_payload(&payload),
                    fds,
                })
            }
            Request::GetIrqInfo { index } => {
                let irq = irq(&*device, &info, index)?;
                Ok(Reply::to(header, &irq.encode_reply(index)))
            }
            Request::SetIrqs(request) => {
                let command = Command::DeviceSetIrqs;
                let irq = irq(&*device, &info, request.index)?;
                if request.count != 0 && request.start + request.count > irq.count {
                    return Err(invalid(command, "start + count exceeds the index's count"));
                }
                if matches!(request.data, IrqData::Eventfds(_))
                    && !irq.flags.contains(IrqFlags::EVENTFD)
                {
                    return Err(invalid(command, "the index does not signal eventfds"));
                }
                device.set_irqs(request).map_err(errno)?;
                Ok(Reply::to(header, &[]))
            }
            Request::RegionRead {
                region: index,
                offset,
                count,
            } => {
                let command = Command::RegionRead;
                let region = region(&*device, &info, index)?;
                check_access(command, &region, RegionFlags::READ, offset, count)?;
                let access = RawRegionAccess {
                    offset,
                    region: index,
                    count,
                };
                let payload_len = size_of::<RawRegionAccess>() + count as usize;
                // Header, access and data in one buffer: the device reads into its tail.
                let mut bytes = Header::reply(header, payload_len).with_payload(access.as_bytes());
                bytes.resize(HEADER_SIZE + payload_len, 0);
                let data = &mut bytes[HEADER_SIZE + size_of::<RawRegionAccess>()..];
                device.region_read(index, offset, data).map_err(errno)?;
                Ok(Reply {
                    bytes,
                    fds: Vec::new(),
                })
            }
            Request::RegionWrite {
                region: index,
                offset,
                data,
            } => {
                let command = Command::RegionWrite;
                let region = region(&*device, &info, index)?;
                let count = data.len() as u32;
                check_access(command, &region, RegionFlags::WRITE, offset, count)?;
                device.region_write(index, offset, data).map_err(errno)?;
                let access = RawRegionAccess {
                    offset,
                    region: index,
                    count,
                };
                Ok(Reply::to(header, access.as_bytes()))
            }
            Request::DmaMap(map) => {
                device.dma_map(map).map_err(errno)?;
                Ok(Reply::to(header, &[]))
            }
            Request::DmaUnmap { unmap, raw } => {
                device.dma_unmap(unmap).map_err(errno)?;
                Ok(Reply::to(header, raw.as_bytes()))
            }
            Request::DeviceReset => {
                if !info.flags.contains(DeviceFlags::RESET) {
                    return Err(ProtocolError::Device(Errno::ENOTSUP));
                }
                device.reset().map_err(errno)?;
                Ok(Reply::to(header, &[]))
            }
        }
    }
}

impl Session {
    pub(crate) fn client_max_fds(&self) -> u32 {
        self.client.as_ref().map_or(1, Capabilities::max_msg_fds)
    }
}

/// Serves `device` on `stream` with the default [`ServerConfig`].
pub fn serve(
    stream: UnixStream,
    device: &mut dyn VfioUserDevice,
) -> Result<Disconnect, ServerError> {
    Server::default().serve(stream, device)
}

/// Waits until `socket` is readable (or writable, with `want_write`), hung up, or `deadline`
/// passes.
fn wait_ready(
    socket: BorrowedFd<'_>,
    want_write: bool,
    deadline: Option<Instant>,
) -> Result<(), ServerError> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut flags = PollFlags::IN;
    if want_write {
        flags |= PollFlags::OUT;
    }
    let timeout = deadline.map(|deadline| {
        let left = deadline.saturating_duration_since(Instant::now());
        Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        }
    });
    let mut fds = [PollFd::new(&socket, flags)];
    match rustix::event::poll(&mut fds, timeout.as_ref()) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(error) => Err(ServerError::Io(error.into())),
    }
}

fn invalid(command: Command, what: &'static str) -> ProtocolError {
    ProtocolError::Field { command, what }
}

fn region(
    device: &dyn VfioUserDevice,
    info: &DeviceInfo,
    index: u32,
) -> Result<RegionInfo, ProtocolError> {
    if index >= info.num_regions {
        return Err(invalid(Command::DeviceGetRegionInfo, "no such region"));
    }
    device
        .region_info(index)
        .ok_or(invalid(Command::DeviceGetRegionInfo, "no such region"))
}

fn irq(
    device: &dyn VfioUserDevice,
    info: &DeviceInfo,
    index: u32,
) -> Result<IrqInfo, ProtocolError> {
    if index >= info.num_irqs {
        return Err(invalid(Command::DeviceGetIrqInfo, "no such IRQ index"));
    }
    device
        .irq_info(index)
        .ok_or(invalid(Command::DeviceGetIrqInfo, "no such IRQ index"))
}

fn check_access(
    command: Command,
    region: &RegionInfo,
    needed: RegionFlags,
    offset: u64,
    count: u32,
) -> Result<(), ProtocolError> {
    if !region.flags.contains(needed) {
        return Err(invalid(command, "the region does not allow this access"));
    }
    match offset.checked_add(u64::from(count)) {
        Some(end) if end <= region.size => Ok(()),
        _ => Err(invalid(command, "the access lies outside the region")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_keeps_the_config_it_was_made_with() {
        let config = ServerConfig {
            max_dma_maps: 7,
            pgsizes: 1 << 21,
            ..ServerConfig::default()
        };
        let server = Server::new(config);
        assert_eq!(
            (server.config().max_dma_maps, server.config().pgsizes),
            (7, 1 << 21)
        );
    }
}
