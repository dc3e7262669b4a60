//! What the unit tests of several modules build alike.

use iopf_abi::{Cookie, PageAddr, PageRequest, Perm, PrgIndex};

/// A one-page read request for page 0x1000, PRG index 1, no PASID, carrying `cookie`.
pub(crate) fn page_request(cookie: u32) -> PageRequest {
    PageRequest {
        cookie: Cookie::new(cookie).unwrap(),
        pasid: None,
        grpid: PrgIndex::new(1).unwrap(),
        perm: Perm::READ,
        addr: PageAddr::containing(0x1000),
        last: true,
        private_data: None,
    }
}
