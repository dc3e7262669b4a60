//! What the kernel backend reports.

use std::io;

use thiserror::Error;

/// An iommufd operation the kernel refused, or a file that failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KernelError {
    /// `/dev/iommu` could not be opened (no iommufd in this kernel, or no permission).
    #[error("open /dev/iommu: {0}")]
    Open(#[source] io::Error),
    /// The fd given as an iommufd is not one (or could not be inspected with `fstat`).
    #[error("check that the given fd is an iommufd: {0}")]
    NotIommufd(#[source] io::Error),
    /// The VMM's iommufd fd could not be duplicated.
    #[error("duplicate the iommufd fd: {0}")]
    Dup(#[source] io::Error),
    /// An ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// The ioctl (and operation).
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `read` of the fault queue failed.
    #[error("read of the fault queue: {0}")]
    Read(#[source] io::Error),
    /// `write` of page responses failed other than by refusing one response.
    #[error("write of page responses: {0}")]
    Write(#[source] io::Error),
    /// `poll` of the fault queue failed.
    #[error("poll of the fault queue: {0}")]
    Poll(#[source] io::Error),
    /// The kernel's first group is larger than the largest read buffer we allow.
    #[error("a fault group of more than {0} records")]
    GroupTooLarge(usize),
}

impl KernelError {
    /// The OS error number, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Open(e)
            | Self::NotIommufd(e)
            | Self::Dup(e)
            | Self::Read(e)
            | Self::Write(e)
            | Self::Poll(e) => e.raw_os_error(),
            Self::Ioctl { source, .. } => source.raw_os_error(),
            Self::GroupTooLarge(_) => None,
        }
    }
}
