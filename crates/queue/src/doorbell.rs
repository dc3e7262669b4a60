//! Doorbells: an eventfd each side can ring and the other can sleep on.
//!
//! An eventfd adds every ring to a counter and one read drains it, so many kicks before the
//! sleeper wakes cost one wake-up; the ring's `NEED_WAKEUP` protocol means the producer rings
//! only when the consumer said it is about to sleep.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::io::{Errno, ReadWriteFlags};
use std::io::IoSliceMut;

/// An eventfd used as a doorbell.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    /// A new doorbell (non-blocking eventfd, close-on-exec).
    pub fn new() -> io::Result<Self> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self { fd })
    }

    /// A doorbell over an fd received from elsewhere. Refuses anything but an eventfd, so a
    /// peer cannot make us write into a pipe or a socket by handing us the wrong fd.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if link.as_os_str() != "anon_inode:[eventfd]" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("doorbell fd is {}, not an eventfd", link.display()),
            ));
        }
        // Our waits use poll(), so blocking or not, a read after POLLIN does not block for long;
        // set non-blocking anyway so a racing reader cannot leave us stuck in read().
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(Self { fd })
    }

    /// A second handle on the same eventfd (to sleep on it while another owner rings or
    /// drains it).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }

    /// Rings the doorbell (adds 1 to the eventfd counter), without ever blocking.
    ///
    /// The fd's `O_NONBLOCK` lives in the open file description, which the peer shares and can
    /// clear; an eventfd write then blocks while the counter is saturated, and the peer can
    /// saturate it. So we ask `poll` first: a counter that is already non-zero (`POLLIN`) will
    /// wake the sleeper anyway and needs no write; a write is made only when `POLLOUT` says it
    /// cannot block. `O_NONBLOCK` is set again first if the peer cleared it (one `fcntl` to
    /// look), so a peer must both clear it and saturate the counter inside the few
    /// instructions between our poll and our write to stall this call. Linux offers no write
    /// to an eventfd that cannot block whatever the flags say: `pwritev2` with `RWF_NOWAIT`
    /// is refused (`EOPNOTSUPP`) and an eventfd cannot be reopened through `/proc` for an
    /// open file description of our own (`ENXIO`). So never ring a peer's doorbell while
    /// holding a lock others need (the fault core rings after releasing the device's lock;
    /// `docs/RELIABILITY.md` §4).
    pub fn ring(&self) -> io::Result<()> {
        let flags = rustix::fs::fcntl_getfl(&self.fd)?;
        if !flags.contains(rustix::fs::OFlags::NONBLOCK) {
            rustix::fs::fcntl_setfl(&self.fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        }
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN | PollFlags::OUT)];
        let ready = loop {
            match rustix::event::poll(&mut fds, Some(&Timespec::default())) {
                Ok(_) => break fds[0].revents(),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if ready.contains(PollFlags::IN) || !ready.contains(PollFlags::OUT) {
            return Ok(());
        }
        match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
            // The counter is saturated: the sleeper is going to wake anyway.
            Ok(_) | Err(Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Drains pending rings without blocking; returns how many rings were pending.
    ///
    /// Reads with `RWF_NOWAIT`, which does not block whatever the shared `O_NONBLOCK` says (a
    /// peer can clear that flag, and can drain the counter between our poll and our read).
    /// Kernels without `RWF_NOWAIT` for eventfds fall back to a plain read.
    pub fn drain(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        let result = match rustix::io::preadv2(
            &self.fd,
            &mut [IoSliceMut::new(&mut buf)],
            u64::MAX,
            ReadWriteFlags::NOWAIT,
        ) {
            Err(Errno::OPNOTSUPP | Errno::INVAL) => rustix::io::read(&self.fd, &mut buf),
            other => other,
        };
        match result {
            Ok(8) => Ok(u64::from_ne_bytes(buf)),
            Ok(_) => Err(io::Error::other("short eventfd read")),
            Err(Errno::AGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Sleeps until the doorbell rings or `timeout` passes (`None`: no timeout), then drains
    /// it. Returns `true` if it rang.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let timeout = timeout.map(|t| Timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: t.subsec_nanos().into(),
        });
        loop {
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(self.drain()? > 0),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Doorbell> for OwnedFd {
    fn from(d: Doorbell) -> OwnedFd {
        d.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::OFlags;

    #[test]
    fn ring_sets_o_nonblock_again_after_the_peer_cleared_it() {
        let ours = Doorbell::new().unwrap();
        let theirs = ours.try_clone().unwrap();
        // The peer clears the flag on the open file description we share.
        let flags = rustix::fs::fcntl_getfl(&theirs).unwrap();
        rustix::fs::fcntl_setfl(&theirs, flags - OFlags::NONBLOCK).unwrap();
        ours.ring().unwrap();
        assert!(
            rustix::fs::fcntl_getfl(&ours)
                .unwrap()
                .contains(OFlags::NONBLOCK)
        );
        assert_eq!(theirs.drain().unwrap(), 1);
        // Saturated by the peer, flag cleared: a ring returns at once.
        let flags = rustix::fs::fcntl_getfl(&theirs).unwrap();
        rustix::fs::fcntl_setfl(&theirs, flags - OFlags::NONBLOCK).unwrap();
        rustix::io::write(&theirs, &(u64::MAX - 1).to_ne_bytes()).unwrap();
        ours.ring().unwrap();
        assert_eq!(theirs.drain().unwrap(), u64::MAX - 1);
    }

    #[test]
    fn from_fd_leaves_a_received_eventfd_non_blocking() {
        for flags in [EventfdFlags::empty(), EventfdFlags::NONBLOCK] {
            let fd = rustix::event::eventfd(0, flags).unwrap();
            let bell = Doorbell::from_fd(fd).unwrap();
            assert!(
                rustix::fs::fcntl_getfl(&bell)
                    .unwrap()
                    .contains(OFlags::NONBLOCK),
                "received with {flags:?}"
            );
            // So draining an empty counter returns at once.
            assert_eq!(bell.drain().unwrap(), 0);
        }
    }

    #[test]
    fn wait_says_whether_the_doorbell_rang() {
        let bell = Doorbell::new().unwrap();
        assert!(!bell.wait(Some(Duration::from_millis(5))).unwrap());
        bell.ring().unwrap();
        assert!(bell.wait(Some(Duration::from_millis(5))).unwrap());
        // The wait drained the ring.
        assert_eq!(bell.drain().unwrap(), 0);
    }
}
