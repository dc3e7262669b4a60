#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod connection;
pub mod device;
pub mod info;
pub mod protocol;
pub mod request;
pub mod server;
pub mod version;

pub use client::{
    Client, ClientError, ClientOptions, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Region,
    RegionIoFds,
};
pub use connection::{Connection, ConnectionError, Message};
pub use info::{
    DeviceFlags, DeviceInfo, DmaProt, IoFd, IoFdKind, IrqFlags, IrqInfo, RegionCapability,
    RegionFlags, RegionInfo, SparseMmapArea,
};
pub use protocol::{Command, Errno, Header, ProtocolError};
pub use request::{DmaMap, DmaUnmap, IrqAction, IrqData, IrqSetFlags, SetIrqs};
pub use server::{Disconnect, Server, ServerConfig, ServerError, VfioUserDevice, serve};
pub use version::{Capabilities, Version};
