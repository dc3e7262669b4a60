//! What goes into the core from a device, and what comes back out to it.

use std::fmt;
use std::time::Duration;

use iopf_abi::{
    Cookie, DecodeError, PageAddr, PageRequest, Pasid, Perm, PrgIndex, ResponseCode,
    UnrecoverableFault,
};
use serde::Serialize;
use thiserror::Error;

/// A device the core serves (a PCIe requester ID, or any stable number the host chooses).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
pub struct DeviceId(pub u32);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {}", self.0)
    }
}

/// A page request as the IOMMU reports it: no cookie yet (the core gives one to the group).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DevicePageRequest {
    /// The address space, if the request carried a PASID.
    pub pasid: Option<Pasid>,
    /// The device's PRG index.
    pub grpid: PrgIndex,
    /// The access that faulted.
    pub perm: Perm,
    /// The page asked for.
    pub addr: PageAddr,
    /// Last request of its group.
    pub last: bool,
    /// Device-specific data, if any.
    pub private_data: Option<[u64; 2]>,
}

impl DevicePageRequest {
    pub(crate) fn with_cookie(&self, cookie: Cookie) -> PageRequest {
        PageRequest {
            cookie,
            pasid: self.pasid,
            grpid: self.grpid,
            perm: self.perm,
            addr: self.addr,
            last: self.last,
            private_data: self.private_data,
        }
    }
}

/// A fault as the IOMMU reports it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DeviceFault {
    /// A recoverable fault: the device waits for a response to its group.
    PageRequest(DevicePageRequest),
    /// An unrecoverable fault: reported, never answered.
    Unrecoverable(UnrecoverableFault),
}

impl DeviceFault {
    /// A page request as a device model sends it upstream: no device-specific data.
    pub fn page_request(
        pasid: Option<Pasid>,
        grpid: PrgIndex,
        perm: Perm,
        addr: PageAddr,
        last: bool,
    ) -> Self {
        Self::PageRequest(DevicePageRequest {
            pasid,
            grpid,
            perm,
            addr,
            last,
            private_data: None,
        })
    }
}

/// Why the host answered a group itself (always `Invalid`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoReason {
    /// No handler registered.
    NoHandler,
    /// No consumer attached to the handler's queue.
    NotAttached,
    /// The fault queue had no room.
    QueueFull,
    /// The device had its maximum of pending groups.
    PendingLimit,
    /// The group had more pages than allowed.
    GroupTooLarge,
    /// The handler was unregistered.
    Unregister,
    /// The VMM went away.
    VmmGone,
    /// The VMM broke a queue's protocol.
    QueueBroken,
    /// No response within the device's timeout.
    Timeout,
    /// The VMM reset the device (a function-level reset); the handler stays registered.
    Reset,
}

/// Who answered a group.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseSource {
    /// The guest, through the VMM's response queue.
    Guest,
    /// The host, for the reason given.
    Auto(AutoReason),
}

/// The PRG response the core sends to a device: exactly one per page request group.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DeviceResponse {
    /// The group's PASID.
    pub pasid: Option<Pasid>,
    /// The group's PRG index.
    pub grpid: PrgIndex,
    /// The answer.
    pub code: ResponseCode,
    /// The group's cookie, if it got one (groups answered before delivery have none).
    pub cookie: Option<Cookie>,
    /// Who answered.
    pub source: ResponseSource,
}

/// Where a device's responses go: the IOMMU driver's "send PRG response" (a device model in
/// simulation). Called without any core lock held, so it may report new faults at once.
pub trait DeviceSink: Send + Sync + fmt::Debug {
    /// Delivers one response to the device.
    fn page_response(&self, device: DeviceId, response: DeviceResponse);
}

/// Why a response was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The record breaks ABI v2.
    #[error("malformed response")]
    Malformed(#[source] DecodeError),
    /// A response version other than 1.
    #[error("unsupported response version {0}")]
    BadVersion(u32),
    /// The cookie names no group pending on this device.
    #[error("cookie {0} names no pending group of this device")]
    UnknownCookie(Cookie),
    /// PASID or PRG index differ from the pending group's.
    #[error(
        "cookie {cookie} is pending for PASID {expected_pasid:?} PRGI {expected_grpid}, response names {pasid:?} {grpid}"
    )]
    Mismatch {
        /// The cookie.
        cookie: Cookie,
        /// The group's PASID.
        expected_pasid: Option<Pasid>,
        /// The group's PRG index.
        expected_grpid: PrgIndex,
        /// The response's PASID.
        pasid: Option<Pasid>,
        /// The response's PRG index.
        grpid: PrgIndex,
    },
    /// Code `FAILURE`, refused by the device's policy.
    #[error("response code FAILURE is refused for this device")]
    FailureCode,
}

/// Per-device limits and policies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DeviceConfig {
    /// Groups delivered and not yet answered; more are answered `Invalid` at once.
    pub max_pending_groups: usize,
    /// Groups whose `LAST_PAGE` request has not arrived yet; requests of more are dropped.
    pub max_partial_groups: usize,
    /// Pages per group; a larger group is answered `Invalid` when it completes.
    pub max_group_pages: usize,
    /// How long the guest may take to answer before the host answers `Invalid`.
    pub response_timeout: Option<Duration>,
    /// Accept `FAILURE` from the guest (it stops PRI on a real device; refused by default, as
    /// iommufd refuses it).
    pub allow_failure: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            max_pending_groups: 4096,
            max_partial_groups: 256,
            max_group_pages: 64,
            response_timeout: Some(Duration::from_secs(10)),
            allow_failure: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_displays_as_device_and_its_number() {
        assert_eq!(DeviceId(7).to_string(), "device 7");
    }
}
