//! iceoryx2 0.10 publish-subscribe as one more baseline (cargo feature `iceoryx2`, off by
//! default), with the settings of its own `benchmarks/publish-subscribe` for a fair round
//! trip (two services, history 0, buffer 1, safe overflow) and a stream with buffer 4096 and
//! `RetryUntilDelivered`, as the reference figures in `docs/PERFORMANCE.md` were taken.

use std::time::Instant;

use iceoryx2::port::publisher::Publisher;
use iceoryx2::port::subscriber::Subscriber;
use iceoryx2::prelude::*;
use iceoryx2::service::port_factory::publish_subscribe::PortFactory as PubSub;

use crate::control::{Control, Peer, PeerStats, Task};
use crate::error::{BenchError, Result};
use crate::spin::Waiter;

/// A 64-byte record.
type Record = [u64; 8];

fn err(what: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> BenchError {
    move |e| BenchError::Invalid(format!("iceoryx2 {what}: {e}"))
}

macro_rules! iox {
    ($what:literal, $e:expr) => {
        $e.map_err(|e| err($what)(&e))
    };
}

fn node() -> Result<Node<ipc::Service>> {
    set_log_level(LogLevel::Error);
    iox!("node", NodeBuilder::new().create::<ipc::Service>())
}

/// A service name unique to this run.
fn name(suffix: &str) -> String {
    format!("iopf-bench/{}/{suffix}", std::process::id())
}

fn service(
    node: &Node<ipc::Service>,
    name: &str,
    buffer: usize,
    create: bool,
) -> Result<PubSub<ipc::Service, Record, ()>> {
    let service_name: ServiceName = iox!("service name", name.try_into())?;
    let builder = node
        .service_builder(&service_name)
        .publish_subscribe::<Record>()
        .history_size(0)
        .subscriber_max_buffer_size(buffer)
        .enable_safe_overflow(buffer == 1)
        .max_publishers(1)
        .max_subscribers(1);
    if create {
        iox!("create service", builder.create())
    } else {
        iox!("open service", builder.open())
    }
}

fn publisher(s: &PubSub<ipc::Service, Record, ()>) -> Result<Publisher<ipc::Service, Record, ()>> {
    iox!(
        "publisher",
        s.publisher_builder()
            .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
            .create()
    )
}

fn subscriber(
    s: &PubSub<ipc::Service, Record, ()>,
    buffer: usize,
) -> Result<Subscriber<ipc::Service, Record, ()>> {
    iox!(
        "subscriber",
        s.subscriber_builder().buffer_size(buffer).create()
    )
}

fn record(seq: u64) -> Record {
    let mut r = [0u64; 8];
    r[0] = seq;
    r
}

/// Round trip, busy poll: a record out on one service, back on another. Nanoseconds.
pub(crate) fn rtt(peer: &Peer, count: u64) -> Result<f64> {
    let node = node()?;
    let (ping, pong) = (name("ping"), name("pong"));
    let out = service(&node, &ping, 1, true)?;
    let back = service(&node, &pong, 1, true)?;
    let publisher = publisher(&out)?;
    let subscriber = subscriber(&back, 1)?;
    let warm = count / 10 + 1;
    peer.start(
        &Task::IoxRtt {
            ping,
            pong,
            count: warm + count,
        },
        &[],
    )?;
    let mut waiter = Waiter::new("the iceoryx2 peer");
    let mut start = Instant::now();
    for seq in 0..warm + count {
        if seq == warm {
            start = Instant::now();
        }
        iox!("send", publisher.send_copy(record(seq)))?;
        loop {
            if let Some(sample) = iox!("receive", subscriber.receive())? {
                if sample[0] != seq {
                    return Err(BenchError::Invalid("iceoryx2 echo out of order".into()));
                }
                break;
            }
            waiter.relax()?;
        }
    }
    let elapsed = start.elapsed();
    peer.finish()?;
    Ok(elapsed.as_nanos() as f64 / count.max(1) as f64)
}

/// The peer's half of [`rtt`].
pub(crate) fn rtt_peer(control: &Control, ping: &str, pong: &str, count: u64) -> Result<PeerStats> {
    let node = node()?;
    let out = service(&node, ping, 1, false)?;
    let back = service(&node, pong, 1, false)?;
    let subscriber = subscriber(&out, 1)?;
    let publisher = publisher(&back)?;
    control.ready()?;
    let mut waiter = Waiter::new("the iceoryx2 host");
    for _ in 0..count {
        loop {
            if let Some(sample) = iox!("receive", subscriber.receive())? {
                iox!("send", publisher.send_copy(*sample))?;
                break;
            }
            waiter.relax()?;
        }
    }
    Ok(PeerStats {
        records: count,
        ..PeerStats::default()
    })
}

/// Stream: buffer 4096, `RetryUntilDelivered`, the payload written straight into the loaned
/// sample. Records per second, until the peer has them all.
pub(crate) fn stream(peer: &Peer, records: u64) -> Result<f64> {
    let node = node()?;
    let topic = name("stream");
    let service = service(&node, &topic, 4096, true)?;
    let publisher = publisher(&service)?;
    peer.start(&Task::IoxStream { topic, records }, &[])?;
    let start = Instant::now();
    for seq in 0..records {
        let sample = iox!("loan", publisher.loan_uninit())?;
        iox!("send", sample.write_payload(record(seq)).send())?;
    }
    let stats = peer.finish()?;
    let elapsed = start.elapsed();
    if stats.records != records {
        return Err(BenchError::Invalid("iceoryx2 stream lost records".into()));
    }
    Ok(records as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// The peer's half of [`stream`].
pub(crate) fn stream_peer(control: &Control, topic: &str, records: u64) -> Result<PeerStats> {
    let node = node()?;
    let service = service(&node, topic, 4096, false)?;
    let subscriber = subscriber(&service, 4096)?;
    control.ready()?;
    let mut waiter = Waiter::new("the iceoryx2 publisher");
    let (mut got, mut sum) = (0u64, 0u64);
    while got < records {
        match iox!("receive", subscriber.receive())? {
            Some(sample) => {
                sum = sum.wrapping_add(sample[0]);
                got += 1;
            }
            None => waiter.relax()?,
        }
    }
    Ok(PeerStats {
        records: got,
        checksum: sum,
        ..PeerStats::default()
    })
}

/// What iceoryx2 leaves behind (`/dev/shm/iox2_*`, `/tmp/iceoryx2/`): noted before the run, so
/// that [`Leftovers::clean`] removes only what this run made.
#[derive(Debug)]
pub(crate) struct Leftovers {
    shm: Vec<std::ffi::OsString>,
    tmp_existed: bool,
}

const SHM: &str = "/dev/shm";
const TMP: &str = "/tmp/iceoryx2";

fn iox_shm() -> Vec<std::ffi::OsString> {
    std::fs::read_dir(SHM)
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.file_name()))
                .filter(|n| n.to_string_lossy().starts_with("iox2_"))
                .collect()
        })
        .unwrap_or_default()
}

impl Leftovers {
    /// Notes what exists now.
    pub(crate) fn before() -> Self {
        Self {
            shm: iox_shm(),
            tmp_existed: std::path::Path::new(TMP).exists(),
        }
    }

    /// Removes what appeared since (best effort; after every node is dropped).
    pub(crate) fn clean(self) {
        for name in iox_shm() {
            if !self.shm.contains(&name) {
                let _ = std::fs::remove_file(std::path::Path::new(SHM).join(name));
            }
        }
        if !self.tmp_existed {
            // Only empty directories go: anything else belongs to someone.
            for dir in ["nodes", "services"] {
                let _ = std::fs::remove_dir(std::path::Path::new(TMP).join(dir));
            }
            let _ = std::fs::remove_dir(TMP);
        }
    }
}
