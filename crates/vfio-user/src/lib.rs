#![doc = include_str!("../README.md")]
//!
//! ## Modules
//!
//! | module | job |
//! |---|---|
//! | [`protocol`] | header, command numbers, wire structs, errno, limits, [`ProtocolError`] |
//! | [`version`] | `VERSION` and its JSON capabilities |
//! | [`info`] | device, region (with capability list), IRQ and I/O fd descriptions; reply codecs |
//! | [`request`] | the validating decoder of every command, and the client's encoders |
//! | [`connection`] | one whole message in or out, fds included, one `sendmsg` per message |
//! | [`server`] | [`VfioUserDevice`] and [`Server::serve`] (one connection per call) |
//! | [`nonblocking`] | [`ServerConnection`]: one connection as a state machine an event loop drives |
//! | [`client`] | [`Client`] |
//! | [`device`] | the iopf device's region and IRQ indices, types and offsets |
//!
//! Everything read from the peer is untrusted: sizes are checked against the header and the
//! command's layout, counts against the data and fds present, and no message larger than
//! [`protocol::MAX_MESSAGE_SIZE`] is ever allocated for. There is no `unsafe` code here; fds
//! cross the socket through [`iopf_queue::fdpass`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod connection;
pub mod device;
pub mod info;
pub mod nonblocking;
pub mod protocol;
pub mod request;
pub mod server;
pub mod version;

pub use client::{
    Client, ClientError, ClientOptions, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Region,
    RegionIoFds,
};
pub use connection::{Connection, ConnectionError, Message, MessageReader, ReadProgress};
pub use info::{
    DeviceFlags, DeviceInfo, DmaProt, IoFd, IoFdKind, IrqFlags, IrqInfo, RegionCapability,
    RegionFlags, RegionInfo, SparseMmapArea,
};
pub use nonblocking::{ServerConnection, Status};
pub use protocol::{Command, Errno, Header, ProtocolError};
pub use request::{DmaMap, DmaUnmap, IrqAction, IrqData, IrqSetFlags, SetIrqs};
pub use server::{Disconnect, Server, ServerConfig, ServerError, VfioUserDevice, serve};
pub use version::{Capabilities, Version};
