//! `VFIO_USER_VERSION`: the version numbers and the JSON capabilities object.
//!
//! The payload is `major: u16, minor: u16` followed by optional version data: a UTF-8 JSON
//! object ending in one NUL byte, `{"capabilities": {...}}`. Unknown keys are ignored (newer
//! peers may add capabilities); known keys with the wrong type, a missing NUL, or more than
//! [`MAX_VERSION_DATA`] bytes are refused.
//!
//! This crate always sends the `capabilities` object, even when empty: the rust-vmm client
//! refuses version data without it.

use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use crate::protocol::{
    Command, MAX_DATA_XFER_SIZE, MAX_VERSION_DATA, ProtocolError, RawVersion, read_prefix,
};

/// The `migration` capability object (QEMU and the rust-vmm client send it; this crate does
/// not support migration and never echoes it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilities {
    /// Page size of the dirty bitmap.
    pub pgsize: u64,
    /// Largest dirty bitmap, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bitmap_size: Option<u64>,
}

/// The `twin_socket` capability object. This crate never enables twin-socket mode (it sends
/// no server-to-client commands).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinSocket {
    /// Whether the sender supports twin-socket mode.
    #[serde(default)]
    pub supported: bool,
    /// In a reply, the index of the socket among the reply's fds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
}

/// The `capabilities` object. Every field is optional on the wire; absent fields take the
/// specification's defaults through the accessor methods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Most fds the sender can receive in one message (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    /// Largest `count` of a data transfer the sender accepts (default 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u32>,
    /// Most DMA mappings valid at once (default 65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u32>,
    /// Page sizes supported by DMA map, or-ed together (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    /// Migration parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCapabilities>,
    /// Twin-socket parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<TwinSocket>,
    /// Whether `VFIO_USER_REGION_WRITE_MULTI` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_multiple: Option<bool>,
}

impl Capabilities {
    /// `max_msg_fds`, or the specification's default of 1.
    pub fn max_msg_fds(&self) -> u32 {
        self.max_msg_fds.unwrap_or(1)
    }

    /// `max_data_xfer_size`, or the specification's default of 1 MiB.
    pub fn max_data_xfer_size(&self) -> u32 {
        self.max_data_xfer_size.unwrap_or(MAX_DATA_XFER_SIZE)
    }
}

/// The version data document.
#[derive(Serialize, Deserialize)]
struct VersionData {
    #[serde(default)]
    capabilities: Option<Capabilities>,
}

/// A `VFIO_USER_VERSION` payload, request or reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// The sender's capabilities.
    pub capabilities: Capabilities,
}

impl Version {
    /// The payload: the version numbers, the JSON document and its NUL.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawVersion {
            major: self.major,
            minor: self.minor,
        };
        let data = VersionData {
            capabilities: Some(self.capabilities.clone()),
        };
        let mut payload = raw.as_bytes().to_vec();
        // Serializing plain integers, booleans and objects cannot fail.
        if let Ok(json) = serde_json::to_vec(&data) {
            payload.extend_from_slice(&json);
        }
        payload.push(0);
        payload
    }

    /// Decodes and validates a payload. Version data is optional; when present it must be a
    /// JSON object of at most [`MAX_VERSION_DATA`] bytes ending in exactly one NUL.
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (raw, data) = read_prefix::<RawVersion>(Command::Version, payload)?;
        let capabilities = if data.is_empty() {
            Capabilities::default()
        } else {
            parse_version_data(data)?
        };
        Ok(Self {
            major: raw.major,
            minor: raw.minor,
            capabilities,
        })
    }
}

fn parse_version_data(data: &[u8]) -> Result<Capabilities, ProtocolError> {
    if data.len() > MAX_VERSION_DATA {
        return Err(ProtocolError::VersionData(format!(
            "{} bytes, at most {MAX_VERSION_DATA}",
            data.len()
        )));
    }
    let Some((&0, json)) = data.split_last() else {
        return Err(ProtocolError::VersionData(
            "not terminated by a NUL byte".into(),
        ));
    };
    if json.contains(&0) {
        return Err(ProtocolError::VersionData(
            "NUL byte inside the JSON".into(),
        ));
    }
    // Bounded input (checked above) and serde_json's recursion limit bound the work.
    let document: VersionData = serde_json::from_slice(json)
        .map_err(|error| ProtocolError::VersionData(error.to_string()))?;
    Ok(document.capabilities.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(json: &str) -> Vec<u8> {
        let mut bytes = vec![0, 0, 1, 0];
        bytes.extend_from_slice(json.as_bytes());
        bytes.push(0);
        bytes
    }

    #[test]
    fn rust_vmm_proposal_parses() {
        let version = Version::decode(&payload(
            r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#,
        ))
        .unwrap();
        assert_eq!((version.major, version.minor), (0, 1));
        assert_eq!(version.capabilities.max_msg_fds(), 1);
        assert_eq!(
            version.capabilities.migration,
            Some(MigrationCapabilities {
                pgsize: 4096,
                max_bitmap_size: None
            })
        );
    }

    #[test]
    fn qemu_proposal_parses_and_unknown_keys_are_ignored() {
        let version = Version::decode(&payload(
            r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true,"future":[1,2]},"other":{}}"#,
        ))
        .unwrap();
        assert_eq!(version.capabilities.max_msg_fds(), 8);
        assert_eq!(version.capabilities.pgsizes, Some(4096));
        assert_eq!(version.capabilities.write_multiple, Some(true));
    }

    #[test]
    fn absent_data_takes_defaults() {
        let version = Version::decode(&[0, 0, 0, 0]).unwrap();
        assert_eq!(version.capabilities.max_msg_fds(), 1);
        assert_eq!(version.capabilities.max_data_xfer_size(), 1 << 20);
    }

    #[test]
    fn malformed_data_is_refused() {
        for bad in [
            &b"\0\0\0\0{}"[..],                                  // no NUL
            &payload("{\"capabilities\":{\"max_msg_fds\":-1}}"), // wrong type
            &payload("{\"capabilities\":{\"max_msg_fds\":4294967296}}"),
            &payload("[1]"),
            &payload(""),
            &payload("{}\0{}"),
            &[0, 0],
        ] {
            assert!(Version::decode(bad).is_err(), "{bad:?}");
        }
        let mut huge = vec![0, 0, 0, 0];
        huge.extend(std::iter::repeat_n(b' ', MAX_VERSION_DATA));
        huge.push(0);
        assert!(Version::decode(&huge).is_err());
    }

    // Catches: a limit below the documented 16 KiB (a peer's long capabilities refused).
    #[test]
    fn version_data_of_up_to_16_kib_is_accepted() {
        let json = r#"{"capabilities":{"max_msg_fds":8}}"#;
        // Padded with JSON whitespace to 16 KiB, the NUL included.
        let padded = format!("{json:<width$}", width = 16 * 1024 - 1);
        let version = Version::decode(&payload(&padded)).unwrap();
        assert_eq!(version.capabilities.max_msg_fds(), 8);
        // One byte more, however well-formed, is refused.
        let over = format!("{json:<width$}", width = 16 * 1024);
        assert!(matches!(
            Version::decode(&payload(&over)),
            Err(ProtocolError::VersionData(_))
        ));
    }

    #[test]
    fn encode_always_carries_the_capabilities_object() {
        let bytes = Version::default().encode();
        assert_eq!(&bytes[4..], b"{\"capabilities\":{}}\0");
        assert_eq!(Version::decode(&bytes).unwrap(), Version::default());
    }
}
