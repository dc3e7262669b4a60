//! What the unit tests of several modules build alike.

use iopf_abi::{PageAddr, Perm, PrgIndex};
use iopf_core::DeviceFault;

/// A read page request for page 0x1000 without PASID, in group `grpid`, the group's last
/// request if `last`.
pub(crate) fn page_request(grpid: u32, last: bool) -> DeviceFault {
    DeviceFault::page_request(
        None,
        PrgIndex::new(grpid).unwrap(),
        Perm::READ,
        PageAddr::new(0x1000).unwrap(),
        last,
    )
}
