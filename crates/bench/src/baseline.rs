//! What a user would pick instead of iopf's queues: a UNIX `SOCK_SEQPACKET` socketpair with one
//! 64-byte record per message (the shape of the kernel's fault fd, `read()` and `write()` of
//! whole records), and a pipe read in large batches. Both block in the kernel; nothing polls.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};
use rustix::pipe::PipeFlags;

use crate::control::{Control, Peer, PeerStats, Task, exactly};
use crate::error::{BenchError, Result};
use crate::limit::BATCH;

/// Bytes per record.
const RECORD: usize = 64;
/// Bytes the pipe reader asks for per `read()`.
const PIPE_READ: usize = 64 * 1024;

fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(BenchError::io("socketpair"))
}

fn record(seq: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&seq.to_le_bytes());
    r
}

fn send(socket: &OwnedFd, buf: &[u8]) -> Result<()> {
    let sent =
        rustix::net::send(socket, buf, SendFlags::empty()).map_err(BenchError::io("send"))?;
    if sent == buf.len() {
        Ok(())
    } else {
        Err(BenchError::Invalid(format!("short send: {sent} bytes")))
    }
}

fn recv(socket: &OwnedFd, buf: &mut [u8; RECORD]) -> Result<u64> {
    let (len, _) = rustix::net::recv(socket, &mut buf[..], RecvFlags::empty())
        .map_err(BenchError::io("recv"))?;
    if len != RECORD {
        return Err(BenchError::Invalid(format!(
            "socketpair: a {len}-byte message"
        )));
    }
    Ok(u64::from_le_bytes(buf[..8].try_into().unwrap_or_default()))
}

/// Socketpair throughput: the host sends `records` messages of one record; the peer receives
/// them. Records per second, until the peer says it has them all.
pub(crate) fn sock_stream(peer: &Peer, records: u64) -> Result<f64> {
    let (mine, theirs) = socketpair()?;
    peer.start(&Task::SockStream { records }, &[theirs.as_fd()])?;
    drop(theirs);
    let start = Instant::now();
    for seq in 0..records {
        send(&mine, &record(seq))?;
    }
    let stats = peer.finish()?;
    let elapsed = start.elapsed();
    if stats.records != records {
        return Err(BenchError::Invalid("socketpair stream lost records".into()));
    }
    Ok(records as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// The peer's half of [`sock_stream`].
pub(crate) fn sock_stream_peer(
    control: &Control,
    fds: Vec<OwnedFd>,
    records: u64,
) -> Result<PeerStats> {
    let [socket] = exactly::<1>(fds)?;
    control.ready()?;
    let mut buf = [0u8; RECORD];
    let mut sum = 0u64;
    for _ in 0..records {
        sum = sum.wrapping_add(recv(&socket, &mut buf)?);
    }
    Ok(PeerStats {
        records,
        checksum: sum,
        ..PeerStats::default()
    })
}

/// Socketpair round trip: one record out, the peer sends it back. Nanoseconds per round trip.
pub(crate) fn sock_rtt(peer: &Peer, count: u64) -> Result<f64> {
    let (mine, theirs) = socketpair()?;
    let warm = count / 10 + 1;
    peer.start(
        &Task::SockRtt {
            count: warm + count,
        },
        &[theirs.as_fd()],
    )?;
    drop(theirs);
    let mut buf = [0u8; RECORD];
    let mut start = Instant::now();
    for seq in 0..warm + count {
        if seq == warm {
            start = Instant::now();
        }
        send(&mine, &record(seq))?;
        if recv(&mine, &mut buf)? != seq {
            return Err(BenchError::Invalid("socketpair echo out of order".into()));
        }
    }
    let elapsed = start.elapsed();
    peer.finish()?;
    Ok(elapsed.as_nanos() as f64 / count.max(1) as f64)
}

/// The peer's half of [`sock_rtt`].
pub(crate) fn sock_rtt_peer(control: &Control, fds: Vec<OwnedFd>, count: u64) -> Result<PeerStats> {
    let [socket] = exactly::<1>(fds)?;
    control.ready()?;
    let mut buf = [0u8; RECORD];
    for _ in 0..count {
        recv(&socket, &mut buf)?;
        send(&socket, &buf)?;
    }
    Ok(PeerStats {
        records: count,
        ..PeerStats::default()
    })
}

/// Pipe throughput: the host writes [`BATCH`] records per `write()` (2 KiB, under `PIPE_BUF`,
/// so each write is atomic), the peer reads up to 64 KiB per `read()`. Records per second.
pub(crate) fn pipe_stream(peer: &Peer, records: u64) -> Result<f64> {
    let (reader, writer) =
        rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(BenchError::io("pipe"))?;
    peer.start(&Task::PipeStream { records }, &[reader.as_fd()])?;
    drop(reader);
    let mut writer = File::from(writer);
    let mut buf = vec![0u8; RECORD * BATCH as usize];
    let mut seq = 0u64;
    let start = Instant::now();
    while seq < records {
        let n = (records - seq).min(u64::from(BATCH)) as usize;
        for (i, r) in buf.chunks_exact_mut(RECORD).take(n).enumerate() {
            r[..8].copy_from_slice(&(seq + i as u64).to_le_bytes());
        }
        writer
            .write_all(&buf[..n * RECORD])
            .map_err(BenchError::io("write to the pipe"))?;
        seq += n as u64;
    }
    let stats = peer.finish()?;
    let elapsed = start.elapsed();
    if stats.records != records {
        return Err(BenchError::Invalid("pipe stream lost records".into()));
    }
    Ok(records as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// The peer's half of [`pipe_stream`].
pub(crate) fn pipe_stream_peer(
    control: &Control,
    fds: Vec<OwnedFd>,
    records: u64,
) -> Result<PeerStats> {
    let [reader] = exactly::<1>(fds)?;
    let mut reader = File::from(reader);
    control.ready()?;
    let mut buf = vec![0u8; PIPE_READ];
    let total = records * RECORD as u64;
    let mut got = 0u64;
    let mut sum = 0u64;
    while got < total {
        let n = reader
            .read(&mut buf)
            .map_err(BenchError::io("read the pipe"))?;
        if n == 0 {
            return Err(BenchError::Invalid("the pipe closed early".into()));
        }
        sum = sum.wrapping_add(u64::from(buf[0]));
        got += n as u64;
    }
    Ok(PeerStats {
        records: got / RECORD as u64,
        checksum: sum,
        ..PeerStats::default()
    })
}
