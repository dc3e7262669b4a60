//! The machine's limits between two processes, in plain shared memory with no protocol:
//! a cache-line ping-pong (the round-trip floor) and a minimal SPSC copy loop (the throughput
//! ceiling). Both run over a fault queue region's memory, touched only through its public
//! atomic views (`HostPage`, `VmmPage`, `entry_words()`), so this needs no `unsafe`.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use iopf_abi::{QueueGeometry, QueueKind};
use iopf_queue::{QueueMemory, QueueRegion, RegionAttachError};

use crate::control::{Control, Peer, PeerStats, Task, exactly};
use crate::error::{BenchError, Result};
use crate::spin::Waiter;

/// Entries of every ring in the stream figures (as the ceiling of the reference figures in
/// `docs/PERFORMANCE.md`).
pub(crate) const RING_ENTRIES: u32 = 4096;
/// Records per index publish in the stream figures.
pub(crate) const BATCH: u32 = 64;
/// 64-bit words per 64-byte record.
const WORDS: usize = 8;

/// A fresh fault-queue-shaped region of `RING_ENTRIES` 64-byte entries.
pub(crate) fn region(entries: u32) -> Result<QueueRegion> {
    let geometry =
        QueueGeometry::new(QueueKind::Fault, entries).map_err(RegionAttachError::from)?;
    Ok(QueueRegion::create(geometry)?)
}

fn attach(fds: Vec<OwnedFd>) -> Result<QueueRegion> {
    let [fd] = exactly::<1>(fds)?;
    Ok(QueueRegion::attach(fd, QueueKind::Fault)?)
}

fn first_word(region: &QueueRegion) -> Result<&AtomicU64> {
    region
        .entry_words()
        .first()
        .ok_or_else(|| BenchError::Invalid("region without entries".into()))
}

fn warm_up(count: u64) -> u64 {
    count / 10 + 1
}

/// Cache-line ping-pong: the host stores an odd number in one shared word, the peer answers
/// with the next even one; both busy-poll. Returns nanoseconds per round trip.
pub(crate) fn pingpong(peer: &Peer, count: u64) -> Result<f64> {
    let region = region(RING_ENTRIES)?;
    let warm = warm_up(count);
    peer.start(
        &Task::PingPong {
            count: warm + count,
        },
        &[region.fd()],
    )?;
    let cell = first_word(&region)?;
    let mut waiter = Waiter::new("the ping-pong peer");
    let mut start = Instant::now();
    for i in 0..warm + count {
        if i == warm {
            start = Instant::now();
        }
        let ping = 2 * i + 1;
        cell.store(ping, Ordering::Release);
        while cell.load(Ordering::Acquire) != ping + 1 {
            waiter.relax()?;
        }
    }
    let elapsed = start.elapsed();
    peer.finish()?;
    Ok(elapsed.as_nanos() as f64 / count.max(1) as f64)
}

/// The peer's half of [`pingpong`].
pub(crate) fn pingpong_peer(control: &Control, fds: Vec<OwnedFd>, count: u64) -> Result<PeerStats> {
    let region = attach(fds)?;
    let cell = first_word(&region)?;
    control.ready()?;
    let mut waiter = Waiter::new("the ping-pong host");
    for i in 0..count {
        let ping = 2 * i + 1;
        while cell.load(Ordering::Acquire) != ping {
            waiter.relax()?;
        }
        cell.store(ping + 1, Ordering::Release);
    }
    Ok(PeerStats {
        records: count,
        ..PeerStats::default()
    })
}

/// The least any index-plus-slot ring can cost per round trip: the host writes a 64-byte
/// record into one line and its index into another; the peer polls the index, reads the
/// record, writes a 32-byte answer into a third line and its index into a fourth; the host
/// polls that index and reads the answer. No flags, no fences, no checks: what iopf's queue
/// round trip costs beyond this is its protocol (wake-up suppression, index validation).
/// Nanoseconds per round trip.
pub(crate) fn ring_floor(peer: &Peer, count: u64) -> Result<f64> {
    let region = region(RING_ENTRIES)?;
    let warm = warm_up(count);
    peer.start(
        &Task::RingFloor {
            count: warm + count,
        },
        &[region.fd()],
    )?;
    let (out_index, back_index) = cells(&region);
    let (slots, _) = region.entry_words().as_chunks::<WORDS>();
    let [out_slot, back_slot, ..] = slots else {
        return Err(BenchError::Invalid("region without two entries".into()));
    };
    let mut waiter = Waiter::new("the ring-floor peer");
    let mut sum = 0u64;
    let mut start = Instant::now();
    for i in 0..warm + count {
        if i == warm {
            start = Instant::now();
        }
        for (k, cell) in out_slot.iter().enumerate() {
            cell.store(word(i, k), Ordering::Relaxed);
        }
        let index = (i as u32).wrapping_add(1);
        out_index.store(index, Ordering::Release);
        while back_index.load(Ordering::Acquire) != index {
            waiter.relax()?;
        }
        for cell in &back_slot[..WORDS / 2] {
            sum = sum.wrapping_add(cell.load(Ordering::Relaxed));
        }
    }
    let elapsed = start.elapsed();
    peer.finish()?;
    std::hint::black_box(sum);
    Ok(elapsed.as_nanos() as f64 / count.max(1) as f64)
}

/// The peer's half of [`ring_floor`].
pub(crate) fn ring_floor_peer(
    control: &Control,
    fds: Vec<OwnedFd>,
    count: u64,
) -> Result<PeerStats> {
    let region = attach(fds)?;
    let (out_index, back_index) = cells(&region);
    let (slots, _) = region.entry_words().as_chunks::<WORDS>();
    let [out_slot, back_slot, ..] = slots else {
        return Err(BenchError::Invalid("region without two entries".into()));
    };
    control.ready()?;
    let mut waiter = Waiter::new("the ring-floor host");
    let mut sum = 0u64;
    for i in 0..count {
        let index = (i as u32).wrapping_add(1);
        while out_index.load(Ordering::Acquire) != index {
            waiter.relax()?;
        }
        for cell in out_slot {
            sum = sum.wrapping_add(cell.load(Ordering::Relaxed));
        }
        for (k, cell) in back_slot[..WORDS / 2].iter().enumerate() {
            cell.store(word(i, k), Ordering::Relaxed);
        }
        back_index.store(index, Ordering::Release);
    }
    Ok(PeerStats {
        records: count,
        checksum: sum,
        ..PeerStats::default()
    })
}

/// The least any one-line ring (a record that carries its own mark, polled in its own line)
/// can cost per round trip: the host writes a 64-byte record whose last word, stored last
/// (Release), is its sequence number; the peer polls that word, reads the record, writes a
/// 32-byte answer the same way into another line; the host polls the answer's last word. No
/// index, no flags, no fences, no checks: the counterpart of [`ring_floor`] for ABI v2's
/// layout. Nanoseconds per round trip.
pub(crate) fn ring_floor_line(peer: &Peer, count: u64) -> Result<f64> {
    let region = region(RING_ENTRIES)?;
    let warm = warm_up(count);
    peer.start(
        &Task::RingFloorLine {
            count: warm + count,
        },
        &[region.fd()],
    )?;
    let (slots, _) = region.entry_words().as_chunks::<WORDS>();
    let [out_slot, back_slot, ..] = slots else {
        return Err(BenchError::Invalid("region without two entries".into()));
    };
    let (out_body, out_mark) = out_slot.split_at(WORDS - 1);
    let (back_body, back_mark) = back_slot[..WORDS / 2].split_at(WORDS / 2 - 1);
    let mut waiter = Waiter::new("the one-line ring-floor peer");
    let mut sum = 0u64;
    let mut start = Instant::now();
    for i in 0..warm + count {
        if i == warm {
            start = Instant::now();
        }
        for (k, cell) in out_body.iter().enumerate() {
            cell.store(word(i, k), Ordering::Relaxed);
        }
        let seq = i + 1;
        out_mark[0].store(seq, Ordering::Release);
        while back_mark[0].load(Ordering::Acquire) != seq {
            waiter.relax()?;
        }
        for cell in back_body {
            sum = sum.wrapping_add(cell.load(Ordering::Relaxed));
        }
    }
    let elapsed = start.elapsed();
    peer.finish()?;
    std::hint::black_box(sum);
    Ok(elapsed.as_nanos() as f64 / count.max(1) as f64)
}

/// The peer's half of [`ring_floor_line`].
pub(crate) fn ring_floor_line_peer(
    control: &Control,
    fds: Vec<OwnedFd>,
    count: u64,
) -> Result<PeerStats> {
    let region = attach(fds)?;
    let (slots, _) = region.entry_words().as_chunks::<WORDS>();
    let [out_slot, back_slot, ..] = slots else {
        return Err(BenchError::Invalid("region without two entries".into()));
    };
    let (out_body, out_mark) = out_slot.split_at(WORDS - 1);
    let (back_body, back_mark) = back_slot[..WORDS / 2].split_at(WORDS / 2 - 1);
    control.ready()?;
    let mut waiter = Waiter::new("the one-line ring-floor host");
    let mut sum = 0u64;
    for i in 0..count {
        let seq = i + 1;
        while out_mark[0].load(Ordering::Acquire) != seq {
            waiter.relax()?;
        }
        for cell in out_body {
            sum = sum.wrapping_add(cell.load(Ordering::Relaxed));
        }
        for (k, cell) in back_body.iter().enumerate() {
            cell.store(word(i, k), Ordering::Relaxed);
        }
        back_mark[0].store(seq, Ordering::Release);
    }
    Ok(PeerStats {
        records: count,
        checksum: sum,
        ..PeerStats::default()
    })
}

/// The ring's index cells: the host page's `index` is `prod`, the VMM page's is `cons`.
fn cells(region: &QueueRegion) -> (&AtomicU32, &AtomicU32) {
    (&region.host_page().index, &region.vmm_page().index)
}

/// Record `seq`'s word `k`: cheap to make, different in every word and record.
#[inline]
fn word(seq: u64, k: usize) -> u64 {
    (seq << 8) | k as u64
}

/// The copy ceiling: the host stores each record's eight words straight into its slot and
/// publishes `prod` once per [`BATCH`]; the peer reads every word of every record and publishes
/// `cons` once per drain. Returns records per second, from the first store until the peer has
/// returned the last slot.
pub(crate) fn ceiling(peer: &Peer, records: u64) -> Result<f64> {
    let region = region(RING_ENTRIES)?;
    peer.start(&Task::Ceiling { records }, &[region.fd()])?;
    let (prod_cell, cons_cell) = cells(&region);
    let (slots, _) = region.entry_words().as_chunks::<WORDS>();
    let mask = RING_ENTRIES - 1;
    let mut waiter = Waiter::new("the copy-ceiling consumer");
    let (mut prod, mut cons) = (0u32, 0u32);
    let mut seq = 0u64;
    let start = Instant::now();
    while seq < records {
        let want = (records - seq).min(u64::from(BATCH)) as u32;
        while RING_ENTRIES - prod.wrapping_sub(cons) < want {
            cons = cons_cell.load(Ordering::Acquire);
            if RING_ENTRIES - prod.wrapping_sub(cons) < want {
                waiter.relax()?;
            }
        }
        for _ in 0..want {
            let slot = &slots[(prod & mask) as usize];
            for (k, cell) in slot.iter().enumerate() {
                cell.store(word(seq, k), Ordering::Relaxed);
            }
            prod = prod.wrapping_add(1);
            seq += 1;
        }
        prod_cell.store(prod, Ordering::Release);
    }
    while cons_cell.load(Ordering::Acquire) != prod {
        waiter.relax()?;
    }
    let elapsed = start.elapsed();
    let stats = peer.finish()?;
    check_sum(stats.checksum, records)?;
    Ok(records as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// What the ceiling consumer's checksum must be: the sum of every word of every record.
fn expected_sum(records: u64) -> u64 {
    // Sum over seq of sum over k of (seq << 8 | k) = 8 * 256 * sum(seq) + records * 28.
    let seqs = if records == 0 {
        0
    } else {
        (records as u128 * (records as u128 - 1) / 2) as u64
    };
    seqs.wrapping_mul(8 << 8)
        .wrapping_add(records.wrapping_mul(28))
}

fn check_sum(found: u64, records: u64) -> Result<()> {
    if found == expected_sum(records) {
        Ok(())
    } else {
        Err(BenchError::Invalid(format!(
            "copy ceiling: the consumer read wrong records (checksum {found:#x})"
        )))
    }
}

/// The peer's half of [`ceiling`].
pub(crate) fn ceiling_peer(
    control: &Control,
    fds: Vec<OwnedFd>,
    records: u64,
) -> Result<PeerStats> {
    let region = attach(fds)?;
    let (prod_cell, cons_cell) = cells(&region);
    let (slots, _) = region.entry_words().as_chunks::<WORDS>();
    let mask = RING_ENTRIES - 1;
    control.ready()?;
    let mut waiter = Waiter::new("the copy-ceiling producer");
    let mut cons = 0u32;
    let mut got = 0u64;
    let mut sum = 0u64;
    while got < records {
        let prod = prod_cell.load(Ordering::Acquire);
        let ready = prod.wrapping_sub(cons);
        if ready == 0 {
            waiter.relax()?;
            continue;
        }
        for _ in 0..ready {
            let slot = &slots[(cons & mask) as usize];
            for cell in slot {
                sum = sum.wrapping_add(cell.load(Ordering::Relaxed));
            }
            cons = cons.wrapping_add(1);
        }
        cons_cell.store(cons, Ordering::Release);
        got += u64::from(ready);
    }
    Ok(PeerStats {
        records: got,
        checksum: sum,
        ..PeerStats::default()
    })
}
