//! iopf's own queues between two processes: the fault queue one way (throughput with
//! batching), and a round trip out through the fault queue and back through the response
//! queue, busy-polling or sleeping on the eventfd doorbells with wake-up suppression.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use iopf_abi::{
    Cookie, DecodeError, PageAddr, PageRequest, PageResponse, Pasid, Perm, PrgIndex, ResponseCode,
};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, PushError, QueueMemory,
    ResponseQueueConsumer, ResponseQueueProducer,
};

use crate::control::{Control, Peer, PeerStats, RttMode, Task, exactly};
use crate::error::{BenchError, Result};
use crate::limit::{BATCH, RING_ENTRIES};
use crate::spin::Waiter;

/// Entries of the round-trip rings (one record in flight at a time).
const RTT_ENTRIES: u32 = 256;
/// How long a blocking consumer sleeps before it looks at the clock again.
const NAP: Duration = Duration::from_millis(100);

/// What one queue measurement found.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QueueSample {
    /// Records per second (streams) or nanoseconds per round trip.
    pub(crate) value: f64,
    /// Doorbell rings per record crossing, both directions together.
    pub(crate) kicks_per_record: f64,
    /// Sleeps on a doorbell, both sides together.
    pub(crate) sleeps: u64,
}

fn decode(e: DecodeError) -> BenchError {
    BenchError::Invalid(format!("a record failed to decode: {e}"))
}

/// A page request whose fields vary with `seq` (valid ABI: cookie non-zero, PRGI 9 bits).
pub(crate) fn request(seq: u64, last: bool) -> Result<PageRequest> {
    Ok(PageRequest {
        cookie: Cookie::new((seq as u32) | 1).map_err(decode)?,
        pasid: Some(Pasid::new(1 + (seq as u32 & 0xff)).map_err(decode)?),
        grpid: PrgIndex::new(seq as u32 & 0x1ff).map_err(decode)?,
        perm: Perm::READ | Perm::WRITE,
        addr: PageAddr::containing(seq << 12),
        last,
        private_data: None,
    })
}

/// One-way fault queue throughput: the host stages [`BATCH`] page requests with
/// `stage_group` and publishes them with one index store; the peer drains everything ready
/// with `drain` (raw records, every word read). `blocking`: the peer sleeps in `wait()` when the
/// ring is empty (default spin), so the host kicks only when it sleeps. Records per second.
pub(crate) fn stream(peer: &Peer, records: u64, blocking: bool) -> Result<QueueSample> {
    let mut producer = FaultQueueProducer::create(RING_ENTRIES)?;
    let doorbell = Doorbell::new().map_err(BenchError::io("eventfd"))?;
    peer.start(
        &Task::QueueStream { records, blocking },
        &[producer.memory().fd(), doorbell.as_fd()],
    )?;
    producer.set_doorbell(Some(doorbell));
    let mut batch: Vec<PageRequest> = (0..u64::from(BATCH))
        .map(|i| request(i, true))
        .collect::<Result<_>>()?;
    let mut waiter = Waiter::new("the fault queue consumer");
    let mut seq = 0u64;
    let start = Instant::now();
    while seq < records {
        let n = (records - seq).min(u64::from(BATCH)) as usize;
        for (i, r) in batch[..n].iter_mut().enumerate() {
            r.addr = PageAddr::containing((seq + i as u64) << 12);
        }
        loop {
            match producer.stage_group(&batch[..n]) {
                Ok(()) => break,
                Err(PushError::Full) => waiter.relax()?,
                Err(e) => return Err(e.into()),
            }
        }
        producer.publish()?;
        seq += n as u64;
    }
    let last = records as u32;
    while producer
        .memory()
        .vmm_page()
        .index
        .load(std::sync::atomic::Ordering::Acquire)
        != last
    {
        waiter.relax()?;
    }
    let elapsed = start.elapsed();
    let stats = peer.finish()?;
    if stats.records != records {
        return Err(BenchError::Invalid(format!(
            "fault queue stream: the consumer got {} of {records} records",
            stats.records
        )));
    }
    Ok(QueueSample {
        value: records as f64 / elapsed.as_secs_f64().max(1e-9),
        kicks_per_record: producer.kicks() as f64 / records.max(1) as f64,
        sleeps: stats.sleeps,
    })
}

/// The peer's half of [`stream`].
pub(crate) fn stream_peer(
    control: &Control,
    fds: Vec<OwnedFd>,
    records: u64,
    blocking: bool,
) -> Result<PeerStats> {
    let [region, doorbell] = exactly::<2>(fds)?;
    let doorbell = Doorbell::from_fd(doorbell).map_err(BenchError::io("fault doorbell"))?;
    let mut consumer = FaultQueueConsumer::attach(region, doorbell)?;
    control.ready()?;
    let mut waiter = Waiter::new("the fault queue producer");
    let (mut got, mut sum) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < records {
        if blocking && consumer.wait(Some(NAP))? == 0 {
            if Instant::now() > deadline {
                return Err(BenchError::Timeout("fault records"));
            }
            continue;
        }
        let n = consumer.drain(usize::MAX, |r| {
            sum = sum.wrapping_add(r.addr.get() ^ u64::from(r.cookie.get()));
        })?;
        if n == 0 {
            waiter.relax()?;
        }
        got += n as u64;
    }
    Ok(PeerStats {
        records: got,
        sleeps: consumer.sleeps(),
        checksum: sum,
        ..PeerStats::default()
    })
}

/// Round trip: the host publishes one page request on the fault queue, the peer answers it
/// with one response on the response queue. Nanoseconds per round trip.
pub(crate) fn rtt(peer: &Peer, count: u64, mode: RttMode) -> Result<QueueSample> {
    let mut faults = FaultQueueProducer::create(RTT_ENTRIES)?;
    let fault_doorbell = Doorbell::new().map_err(BenchError::io("eventfd"))?;
    let response_doorbell = Doorbell::new().map_err(BenchError::io("eventfd"))?;
    let mut responses = ResponseQueueConsumer::create(RTT_ENTRIES, response_doorbell)?;
    let warm = count / 10 + 1;
    peer.start(
        &Task::QueueRtt {
            count: warm + count,
            mode,
        },
        &[
            faults.memory().fd(),
            fault_doorbell.as_fd(),
            responses.memory().fd(),
            responses.doorbell().as_fd(),
        ],
    )?;
    faults.set_doorbell(Some(fault_doorbell));
    if let RttMode::Blocking { spin } = mode {
        responses.set_spin(spin);
    }
    let mut waiter = Waiter::new("the round-trip peer");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut sleeps = 0u64;
    let (mut kicks0, mut sleeps0) = (0, 0);
    let mut start = Instant::now();
    for seq in 0..warm + count {
        if seq == warm {
            (kicks0, sleeps0) = (faults.kicks(), sleeps);
            start = Instant::now();
        }
        faults.stage_group(&[request(seq, true)?])?;
        faults.publish()?;
        match mode {
            RttMode::Busy => {
                while responses.drain(1, |_| {})? == 0 {
                    waiter.relax()?;
                }
            }
            RttMode::Blocking { spin } => {
                // `ResponseQueueConsumer` has no sleep counter, so this is its `wait()`
                // spelled out with the public event-loop calls: poll `spin` times, then set
                // NEED_WAKEUP, re-check, and sleep on the doorbell.
                'got: loop {
                    for _ in 0..=spin {
                        if responses.drain(1, |_| {})? == 1 {
                            break 'got;
                        }
                        core::hint::spin_loop();
                    }
                    if responses.prepare_to_sleep()? {
                        sleeps += 1;
                        responses
                            .doorbell()
                            .wait(Some(NAP))
                            .map_err(BenchError::io("response doorbell"))?;
                    }
                    responses.woke();
                    if Instant::now() > deadline {
                        return Err(BenchError::Timeout("a response"));
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let stats = peer.finish()?;
    // The peer counts the whole run, warm-up included; scale its counts to the measured part.
    let share = count as f64 / (warm + count) as f64;
    let kicks = (faults.kicks() - kicks0) as f64 + stats.kicks as f64 * share;
    let sleeps = (sleeps - sleeps0) as f64 + stats.sleeps as f64 * share;
    Ok(QueueSample {
        value: elapsed.as_nanos() as f64 / count.max(1) as f64,
        kicks_per_record: kicks / (2 * count.max(1)) as f64,
        sleeps: sleeps.round() as u64,
    })
}

/// The peer's half of [`rtt`]: answers every fault record with a response record.
pub(crate) fn rtt_peer(
    control: &Control,
    fds: Vec<OwnedFd>,
    count: u64,
    mode: RttMode,
) -> Result<PeerStats> {
    let (mut faults, mut responses) = attach_vmm(fds)?;
    if let RttMode::Blocking { spin } = mode {
        faults.set_spin(spin);
    }
    control.ready()?;
    let mut waiter = Waiter::new("the round-trip host");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answered = 0u64;
    let mut answer = None;
    while answered < count {
        if matches!(mode, RttMode::Blocking { .. }) && faults.wait(Some(NAP))? == 0 {
            if Instant::now() > deadline {
                return Err(BenchError::Timeout("a fault record"));
            }
            continue;
        }
        let mut bad = None;
        faults.drain_faults(1, |fault| match fault {
            Ok(iopf_abi::Fault::PageRequest(r)) => {
                answer = Some(PageResponse::answering(&r, ResponseCode::Success));
            }
            other => bad = Some(format!("{other:?}")),
        })?;
        if let Some(bad) = bad {
            return Err(BenchError::Invalid(format!(
                "unexpected fault record {bad}"
            )));
        }
        match answer.take() {
            Some(response) => {
                responses.stage(&response)?;
                responses.publish()?;
                answered += 1;
            }
            None => waiter.relax()?,
        }
    }
    Ok(PeerStats {
        records: answered,
        sleeps: faults.sleeps(),
        kicks: responses.kicks(),
        checksum: 0,
    })
}

/// Attaches the VMM's ends of a fault queue and a response queue from the four fds a host
/// sends: fault region, fault doorbell, response region, response doorbell.
pub(crate) fn attach_vmm(fds: Vec<OwnedFd>) -> Result<(FaultQueueConsumer, ResponseQueueProducer)> {
    let [
        fault_region,
        fault_doorbell,
        response_region,
        response_doorbell,
    ] = exactly::<4>(fds)?;
    let fault_doorbell =
        Doorbell::from_fd(fault_doorbell).map_err(BenchError::io("fault doorbell"))?;
    let response_doorbell =
        Doorbell::from_fd(response_doorbell).map_err(BenchError::io("response doorbell"))?;
    let faults = FaultQueueConsumer::attach(fault_region, fault_doorbell)?;
    let responses = ResponseQueueProducer::attach(response_region, Some(response_doorbell))?;
    Ok((faults, responses))
}
