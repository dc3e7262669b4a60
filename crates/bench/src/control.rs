//! The control channel between `iopf bench` and its peer process: a `SOCK_SEQPACKET` UNIX
//! socket (one message per task, fds attached with `SCM_RIGHTS` by `iopf_queue::fdpass`),
//! carrying JSON.
//!
//! Every measurement is one exchange: the host sends a [`Task`] with the fds it needs (a
//! region's memfd, an eventfd, a socket or a pipe end); the peer sets up, answers
//! [`Reply::Ready`], runs its side, and answers [`Reply::Done`] with what it counted. The host
//! times its own side between `Ready` and the end of the exchange.

use std::ffi::OsString;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iopf_queue::fdpass::{recv_with_fds, send_with_fds};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::child::Reaper;
use crate::error::{BenchError, Result};

/// Largest control message (JSON); tasks and replies are far smaller.
const MAX_MESSAGE: usize = 4096;

/// How a round trip's consumers wait for their record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RttMode {
    /// Poll the ring without end.
    Busy,
    /// `wait()`: poll `spin` times, then set `NEED_WAKEUP` and sleep on the eventfd.
    Blocking {
        /// Polls before sleeping.
        spin: u32,
    },
}

/// What the host asks the peer to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Task {
    /// Pin yourself to this CPU (or not at all).
    Hello {
        /// The CPU.
        cpu: Option<usize>,
    },
    /// Cache-line ping-pong in the region's first entry word. Fds: region.
    PingPong {
        /// Round trips, warm-up included.
        count: u64,
    },
    /// Answer each record of a minimal index-plus-slot ring. Fds: region.
    RingFloor {
        /// Round trips, warm-up included.
        count: u64,
    },
    /// Answer each record of a minimal one-line ring (the mark in the record). Fds: region.
    RingFloorLine {
        /// Round trips, warm-up included.
        count: u64,
    },
    /// Consume the copy-ceiling ring. Fds: region.
    Ceiling {
        /// Records to consume.
        records: u64,
    },
    /// Consume a fault queue. Fds: fault region, fault doorbell.
    QueueStream {
        /// Records to consume.
        records: u64,
        /// Sleep in `wait()` when empty (else poll).
        blocking: bool,
    },
    /// Answer every fault record with a response record. Fds: fault region, fault doorbell,
    /// response region, response doorbell.
    QueueRtt {
        /// Round trips.
        count: u64,
        /// How to wait.
        mode: RttMode,
    },
    /// Receive records, one per message. Fds: socket.
    SockStream {
        /// Records to receive.
        records: u64,
    },
    /// Echo each record. Fds: socket.
    SockRtt {
        /// Round trips.
        count: u64,
    },
    /// Read records in large reads. Fds: pipe read end.
    PipeStream {
        /// Records to read.
        records: u64,
    },
    /// iceoryx2 echo: subscribe to `ping`, publish each record back on `pong`.
    #[cfg(feature = "iceoryx2")]
    IoxRtt {
        /// Service the host publishes on.
        ping: String,
        /// Service the peer answers on.
        pong: String,
        /// Round trips, warm-up included.
        count: u64,
    },
    /// iceoryx2 stream: subscribe to `topic` and receive `records`.
    #[cfg(feature = "iceoryx2")]
    IoxStream {
        /// The service.
        topic: String,
        /// Records to receive.
        records: u64,
    },
    /// Be a VMM: answer every page request group until the host clears `LIVE`. Fds: as for
    /// `QueueRtt`.
    Vmm,
    /// Exit.
    Exit,
}

/// What the peer counted.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct PeerStats {
    /// Records (or groups) it handled.
    pub(crate) records: u64,
    /// Times it slept on a doorbell.
    pub(crate) sleeps: u64,
    /// Times it rang the host's doorbell.
    pub(crate) kicks: u64,
    /// A sum over what it read, so no read can be optimised away (and as a sanity check).
    pub(crate) checksum: u64,
}

/// The peer's answer to a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// Set up: start.
    Ready,
    /// Finished.
    Done(PeerStats),
    /// Failed.
    Failed(String),
}

/// One end of the control channel.
#[derive(Debug)]
pub(crate) struct Control {
    socket: OwnedFd,
}

impl Control {
    /// Connects to the host's socket (peer side).
    pub(crate) fn connect(path: &Path) -> Result<Self> {
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(BenchError::io("socket"))?;
        let addr = SocketAddrUnix::new(path).map_err(BenchError::io("socket path"))?;
        rustix::net::connect(&socket, &addr).map_err(BenchError::io("connect to the host"))?;
        Ok(Self { socket })
    }

    /// Sends one message with `fds` attached.
    pub(crate) fn send(&self, message: &impl Serialize, fds: &[BorrowedFd<'_>]) -> Result<()> {
        let bytes = serde_json::to_vec(message)?;
        send_with_fds(&self.socket, &bytes, fds).map_err(BenchError::io("send a control message"))
    }

    /// Receives one message and its fds.
    pub(crate) fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (len, fds) = recv_with_fds(&self.socket, &mut buf)
            .map_err(BenchError::io("receive a control message"))?;
        if len == 0 {
            return Err(BenchError::Peer(
                "the other side closed the control socket".into(),
            ));
        }
        Ok((serde_json::from_slice(&buf[..len])?, fds))
    }

    /// Sends `Ready` (peer side).
    pub(crate) fn ready(&self) -> Result<()> {
        self.send(&Reply::Ready, &[])
    }

    fn expect_reply(&self) -> Result<Reply> {
        match self.recv::<Reply>()?.0 {
            Reply::Failed(why) => Err(BenchError::PeerFailed(why)),
            reply => Ok(reply),
        }
    }
}

/// The peer process, as the host sees it: its control channel, and the child to reap.
#[derive(Debug)]
pub(crate) struct Peer {
    control: Control,
    child: Reaper,
}

impl Peer {
    /// Starts `program args... --socket PATH`, waits for it to connect and pins it to `cpu`.
    pub(crate) fn spawn(program: &Path, args: &[OsString], cpu: Option<usize>) -> Result<Self> {
        // The socket is only needed until the peer connects; the directory goes either way.
        let dir = tempfile::Builder::new()
            .prefix("iopf-bench-")
            .tempdir()
            .map_err(BenchError::io("create the socket directory"))?;
        Self::spawn_in(dir.path(), program, args, cpu)
    }

    fn spawn_in(dir: &Path, program: &Path, args: &[OsString], cpu: Option<usize>) -> Result<Self> {
        let path: PathBuf = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(BenchError::io("socket"))?;
        let addr = SocketAddrUnix::new(&path).map_err(BenchError::io("socket path"))?;
        rustix::net::bind(&listener, &addr).map_err(BenchError::io("bind the control socket"))?;
        rustix::net::listen(&listener, 1).map_err(BenchError::io("listen"))?;
        let mut child = Reaper::spawn(
            crate::child::command(program)
                .args(args)
                .arg("--socket")
                .arg(&path),
        )
        .map_err(BenchError::io("start the peer process"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        loop {
            let mut fds = [PollFd::new(&listener, PollFlags::IN)];
            if rustix::event::poll(&mut fds, Some(&timeout)).unwrap_or(0) > 0 {
                break;
            }
            if let Some(status) = child
                .try_wait()
                .map_err(BenchError::io("wait for the peer"))?
            {
                return Err(BenchError::PeerFailed(format!(
                    "the peer exited before connecting: {status}"
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout("the peer process to connect"));
            }
        }
        let socket = rustix::net::accept_with(&listener, SocketFlags::CLOEXEC)
            .map_err(BenchError::io("accept the peer"))?;
        let peer = Self {
            control: Control { socket },
            child,
        };
        peer.start(&Task::Hello { cpu }, &[])?;
        Ok(peer)
    }

    /// Sends `task` with `fds` and waits until the peer is ready for it.
    pub(crate) fn start(&self, task: &Task, fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.control.send(task, fds)?;
        match self.control.expect_reply()? {
            Reply::Ready => Ok(()),
            other => Err(BenchError::Peer(format!("expected Ready, got {other:?}"))),
        }
    }

    /// Waits for the peer to finish the current task.
    pub(crate) fn finish(&self) -> Result<PeerStats> {
        match self.control.expect_reply()? {
            Reply::Done(stats) => Ok(stats),
            other => Err(BenchError::Peer(format!("expected Done, got {other:?}"))),
        }
    }

    /// Asks the peer to exit and reaps it.
    pub(crate) fn exit(mut self) -> Result<()> {
        self.control.send(&Task::Exit, &[])?;
        let status = self
            .child
            .wait()
            .map_err(BenchError::io("wait for the peer"))?;
        if status.success() {
            Ok(())
        } else {
            Err(BenchError::PeerFailed(format!(
                "the peer exited with {status}"
            )))
        }
    }
}

/// A received fd list of exactly `N` fds.
pub(crate) fn exactly<const N: usize>(fds: Vec<OwnedFd>) -> Result<[OwnedFd; N]> {
    fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        BenchError::Peer(format!("expected {N} fds, got {}", fds.len()))
    })
}
