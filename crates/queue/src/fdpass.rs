//! Passing fds between processes over a UNIX socket (`SCM_RIGHTS`), the way a region and its
//! doorbells reach the other side.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most fds one message may carry; more is refused on both ends.
pub const MAX_FDS: usize = 16;

/// Sends `data` with `fds` attached as one message.
pub fn send_with_fds(socket: impl AsFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let sent = send_some_with_fds(socket, data, fds)?;
    if sent != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short sendmsg"));
    }
    Ok(())
}

/// Sends as much of `data` as the socket takes now, with `fds` attached to its first byte, in
/// one `sendmsg`; returns the bytes sent. On a non-blocking socket a full buffer is
/// [`io::ErrorKind::WouldBlock`] (nothing sent, fds not passed); a short count means the fds
/// went with the bytes that were sent and the rest must follow without them.
pub fn send_some_with_fds(
    socket: impl AsFd,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message, at most {MAX_FDS}", fds.len()),
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small for the fds"));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(sent)
}

/// Receives one message into `buf` and the fds attached to it (at most [`MAX_FDS`]).
///
/// Returns the bytes received (0 at end of stream) and the fds. A message whose fds did not fit
/// (`MSG_CTRUNC`) is an error; the kernel has closed the fds that did not fit, and the ones that
/// did are closed here, so nothing leaks either way.
pub fn recv_with_fds(socket: impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    // The control buffer has alignment slack, so the kernel may fit a few fds more than
    // MAX_FDS without truncating: refuse those too (dropping `fds` closes them).
    if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message carried more than {MAX_FDS} fds"),
        ));
    }
    Ok((msg.bytes, fds))
}
