//! libiopf: the VMM side of iopf for C VMMs (QEMU, libvfio-user devices, any VMM written in
//! C). It wraps `iopf-vmm` behind a C ABI: attach a device over a vfio-user socket or from
//! the fds the VMM holds, watch one fd from the VMM's own event loop, drain whole page request
//! groups and unrecoverable faults into plain C structs, answer each group by its cookie, and
//! read the counters. The header `include/iopf.h` is generated from this crate by cbindgen;
//! `docs/C-API.md` is the guide.
//!
//! Every entry point returns a negative errno value on failure and keeps a message for
//! `iopf_last_error`; none lets a panic cross into C. Handles are numbers looked up in a
//! registry, never pointers, so a stale or forged handle is an error (`-EBADF`), not a crash.
//! The raw pointers and fds C passes are handled in one module (`raw`), the only one that may
//! use `unsafe`.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod api;
mod error;
mod raw;
mod types;

pub use raw::*;
pub use types::*;
