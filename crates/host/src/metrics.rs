//! What an operator watches on a running host: per device, the fault core's counters (page
//! requests, groups, responses by source and code, auto-responses and refusals by reason),
//! pending groups, queue state, and the page request round-trip latency.
//!
//! [`Metrics`] reads them through the fault core's own accessors (each takes the device's lock
//! just long enough to copy a few words) and the engines' lock-free [`LatencyBuckets`]; it
//! never holds anything while it formats or writes. Two ways out:
//!
//! - [`MetricsServer`]: `GET /metrics` in the `OpenMetrics` text format over HTTP, on a loopback
//!   address only (the endpoint has no authentication), from a thread of its own;
//! - [`StatsSocket`]: a UNIX socket next to the host's vfio-user socket ([`stats_socket_path`])
//!   that writes one JSON [`Snapshot`] to whoever connects and closes; [`read_stats`] is its
//!   client (`iopf inspect --socket`). The format is in `docs/PROTOCOL.md`.
//!
//! A VMM or any other embedder of [`FaultCore`] can use [`Metrics`] for its own devices.
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use iopf_core::{DeviceCounters, DeviceId, FaultCore};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A device's DMA engine's progress, which a watcher reads while the engine runs: the engine
/// stores, [`Metrics`] loads (relaxed atomics; nothing waits).
#[derive(Debug, Default)]
pub struct Progress {
    /// Accesses ended (completed or failed).
    pub accesses_done: AtomicU64,
    /// Groups answered.
    pub groups_answered: AtomicU64,
    /// Page request round trips so far.
    pub latency: LatencyBuckets,
}

/// Upper bounds of the round-trip latency buckets, nanoseconds (1 µs to 1 s); a last bucket
/// (`+Inf`) takes the rest.
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// Version of the [`Snapshot`] format the stats socket writes.
pub const SNAPSHOT_VERSION: u32 = 1;

/// The most bytes [`read_stats`] accepts from a stats socket (64 devices take about 100 KiB).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 20;

/// The most devices a [`Snapshot`] read from a socket may list.
const MAX_SNAPSHOT_DEVICES: usize = 4096;

/// How long the stats socket waits for a slow reader, and [`read_stats`] for a slow host.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the metrics endpoints.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The HTTP endpoint has no authentication: it serves loopback addresses only.
    #[error(
        "{0} is not a loopback address; the metrics endpoint has no authentication, so it \
         serves only 127.0.0.0/8 or [::1]"
    )]
    NotLoopback(SocketAddr),
    /// Listening on the address failed.
    #[error("cannot listen for metrics on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Starting the serving thread failed.
    #[error("cannot start the metrics thread")]
    Spawn(#[source] std::io::Error),
    /// Encoding the `OpenMetrics` text failed.
    #[error("cannot encode the metrics as OpenMetrics text")]
    Encode(#[source] fmt::Error),
    /// Binding the stats socket failed.
    #[error("cannot bind the stats socket {path}")]
    BindStats {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something other than a socket is in the way of the stats socket.
    #[error("{0} exists and is not a socket; not replacing it with the stats socket")]
    NotASocket(PathBuf),
    /// Connecting to or reading the stats socket failed.
    #[error("cannot read the stats socket {path}")]
    ReadStats {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The stats socket sent more than [`MAX_SNAPSHOT_BYTES`].
    #[error("the stats socket {0} sent more than {MAX_SNAPSHOT_BYTES} bytes")]
    TooLarge(PathBuf),
    /// What the stats socket sent is not a snapshot.
    #[error("cannot decode what the stats socket {path} sent")]
    Decode {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The snapshot decoded but does not hold together.
    #[error("the stats socket {path} sent an invalid snapshot: {what}")]
    Invalid {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// A device's round-trip latency in fixed buckets ([`LATENCY_BOUNDS_NS`]), recorded with
/// relaxed atomic adds: the engine that records never waits for a reader.
#[derive(Debug, Default)]
pub struct LatencyBuckets {
    counts: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyBuckets {
    /// Records one round trip of `ns` nanoseconds.
    pub fn record(&self, ns: u64) {
        let index = LATENCY_BOUNDS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        // Wraps only after 584 years of summed latency.
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// What has been recorded so far.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            bounds_ns: LATENCY_BOUNDS_NS.to_vec(),
            buckets: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// Round-trip latency at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySnapshot {
    /// Upper bounds of the buckets, nanoseconds, ascending.
    pub bounds_ns: Vec<u64>,
    /// Round trips per bucket (not cumulative); one more than `bounds_ns`, the last one is
    /// everything above the last bound.
    pub buckets: Vec<u64>,
    /// Sum of all round trips, nanoseconds.
    pub sum_ns: u64,
}

impl LatencySnapshot {
    /// Round trips recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), nanoseconds; `None` with no
    /// round trips or when it falls in the last, unbounded bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return self.bounds_ns.get(i).copied();
            }
        }
        None
    }
}

/// One device at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// The device.
    pub device: u32,
    /// A fault handler is registered (its queues are `LIVE`).
    pub registered: bool,
    /// The handler's consumer has attached (a VMM speaks ABI v2 on its queues).
    pub attached: bool,
    /// Groups delivered to the VMM and not answered yet.
    pub pending_groups: u64,
    /// The fault ring now, when the handler's transport tells.
    #[serde(default)]
    pub fault_queue: Option<QueueFill>,
    /// The fault core's counters.
    pub counters: DeviceCounters,
    /// The device's engine, when there is one (the host's simulated endpoints).
    pub engine: Option<EngineSnapshot>,
}

/// How full a ring is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueFill {
    /// Records published and not consumed yet.
    pub used: u32,
    /// Entries of the ring.
    pub entries: u32,
}

/// A device engine's progress at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSnapshot {
    /// DMA accesses ended (completed or failed).
    pub accesses_done: u64,
    /// Page request groups whose response reached the device.
    pub groups_answered: u64,
    /// Page request round trips (group sent to response received).
    pub latency: LatencySnapshot,
}

/// Every device at one moment: what the stats socket writes, and what `/metrics` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The devices, in order.
    pub devices: Vec<DeviceSnapshot>,
}

impl Snapshot {
    /// Checks what a peer sent: the version, and bucket lists that match their bounds.
    fn validate(&self) -> Result<(), String> {
        if self.version != SNAPSHOT_VERSION {
            return Err(format!(
                "version {} (this build reads {SNAPSHOT_VERSION})",
                self.version
            ));
        }
        if self.devices.len() > MAX_SNAPSHOT_DEVICES {
            return Err(format!("{} devices", self.devices.len()));
        }
        for d in &self.devices {
            if let Some(e) = &d.engine {
                let l = &e.latency;
                if l.buckets.len() != l.bounds_ns.len() + 1
                    || l.bounds_ns.windows(2).any(|w| w[0] >= w[1])
                {
                    return Err(format!("device {}: latency buckets do not fit", d.device));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.devices {
            let c = &d.counters;
            let (g, a, r) = (&c.responses.guest, &c.responses.auto, &c.refused);
            writeln!(
                f,
                "device {}: handler {}, consumer {}, {} groups pending",
                d.device,
                if d.registered {
                    "registered (live)"
                } else {
                    "not registered"
                },
                if d.attached {
                    "attached"
                } else {
                    "not attached"
                },
                d.pending_groups
            )?;
            if let Some(q) = &d.fault_queue {
                writeln!(
                    f,
                    "  fault queue    {} of {} entries in use",
                    q.used, q.entries
                )?;
            }
            writeln!(
                f,
                "  page requests  {} in {} groups ({} delivered, {} requests dropped); {} unrecoverable ({} lost)",
                c.page_requests,
                c.groups,
                c.groups_delivered,
                c.partial_dropped,
                c.unrecoverable,
                c.lost
            )?;
            writeln!(
                f,
                "  guest answered {} success, {} invalid, {} failure",
                g.success, g.invalid, g.failure
            )?;
            writeln!(
                f,
                "  host answered  {}: no handler {}, not attached {}, queue full {}, pending limit {}, group too large {}, unregister {}, VMM gone {}, queue broken {}, timeout {}, reset {}",
                c.answered() - g.success - g.invalid - g.failure,
                a.no_handler,
                a.not_attached,
                a.queue_full,
                a.pending_limit,
                a.group_too_large,
                a.unregister,
                a.vmm_gone,
                a.queue_broken,
                a.timeout,
                a.reset
            )?;
            writeln!(
                f,
                "  refused        {}: malformed {}, bad version {}, unknown cookie {}, mismatch {}, failure code {}",
                c.refused_total(),
                r.malformed,
                r.bad_version,
                r.unknown_cookie,
                r.mismatch,
                r.failure_code
            )?;
            writeln!(
                f,
                "  handlers       {} registered, {} unregistered",
                c.registrations, c.unregistrations
            )?;
            if let Some(e) = &d.engine {
                let l = &e.latency;
                let us = |ns: Option<u64>| match ns {
                    Some(ns) => format!("<= {} us", ns as f64 / 1000.0),
                    None => "n/a".to_string(),
                };
                let count = l.count();
                let mean = if count == 0 {
                    "n/a".to_string()
                } else {
                    format!("{:.1} us", l.sum_ns as f64 / count as f64 / 1000.0)
                };
                writeln!(
                    f,
                    "  engine         {} DMA accesses ended, {} groups answered",
                    e.accesses_done, e.groups_answered
                )?;
                writeln!(
                    f,
                    "  round trip     {count} groups, mean {mean}, p50 {}, p99 {}",
                    us(l.quantile_bound(0.5)),
                    us(l.quantile_bound(0.99))
                )?;
            }
        }
        Ok(())
    }
}

/// Reads a fault core's devices for an operator. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    core: Arc<FaultCore>,
    devices: Vec<DeviceId>,
    progress: Option<Arc<Vec<Progress>>>,
}

impl Metrics {
    /// Watches `devices` of `core`.
    pub fn new(core: Arc<FaultCore>, devices: Vec<DeviceId>) -> Self {
        Self {
            core,
            devices,
            progress: None,
        }
    }

    /// Adds the devices' engine progress: `progress[i]` belongs to the `i`-th device.
    pub fn with_progress(mut self, progress: Arc<Vec<Progress>>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Every device now. A device the core no longer knows shows as unregistered with zero
    /// counters.
    pub fn snapshot(&self) -> Snapshot {
        let devices = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, &id)| DeviceSnapshot {
                device: id.0,
                registered: self.core.is_registered(id).unwrap_or(false),
                attached: self.core.consumer_attached(id).unwrap_or(false),
                pending_groups: self.core.pending_groups(id).unwrap_or(0) as u64,
                fault_queue: self
                    .core
                    .fault_queue_fill(id)
                    .ok()
                    .flatten()
                    .map(|(used, entries)| QueueFill { used, entries }),
                counters: self.core.counters(id).unwrap_or_default(),
                engine: self
                    .progress
                    .as_ref()
                    .and_then(|p| p.get(i))
                    .map(|p| EngineSnapshot {
                        accesses_done: p.accesses_done.load(Ordering::Relaxed),
                        groups_answered: p.groups_answered.load(Ordering::Relaxed),
                        latency: p.latency.snapshot(),
                    }),
            })
            .collect();
        Snapshot {
            version: SNAPSHOT_VERSION,
            devices,
        }
    }

    /// The `OpenMetrics` text exposition of every device now (ends with `# EOF`).
    pub fn encode(&self) -> Result<String, MetricsError> {
        self.encode_as(Format::OpenMetrics)
    }

    /// The exposition of every device now, in `format`.
    pub fn encode_as(&self, format: Format) -> Result<String, MetricsError> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut text = String::new();
        match format {
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, &registry),
            Format::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            }
        }
        .map_err(MetricsError::Encode)?;
        Ok(text)
    }
}

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `OpenMetrics` 1.0 text: what Prometheus asks for, and what the endpoint serves when a
    /// request's `Accept` names `application/openmetrics-text`.
    OpenMetrics,
    /// The Prometheus text format 0.0.4: what the endpoint serves otherwise (the format
    /// `promtool check metrics` and older tools read).
    PrometheusText,
}

impl Format {
    /// The format a request with this `Accept` header gets (as the Prometheus Go client does:
    /// `OpenMetrics` only when asked for).
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::PrometheusText,
        }
    }

    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// A metric's labels.
type Labels = Vec<(&'static str, String)>;

fn device_label(d: &DeviceSnapshot) -> Labels {
    vec![("device", d.device.to_string())]
}

fn with_label(d: &DeviceSnapshot, key: &'static str, value: &str) -> Labels {
    let mut labels = device_label(d);
    labels.push((key, value.to_string()));
    labels
}

fn counter(e: &mut MetricEncoder<'_>, labels: &Labels, value: u64) -> fmt::Result {
    e.encode_family(labels)?
        .encode_counter::<NoLabelSet, u64, u64>(&value, None)
}

fn gauge(e: &mut MetricEncoder<'_>, labels: &Labels, value: i64) -> fmt::Result {
    e.encode_family(labels)?.encode_gauge(&value)
}

/// A counter family of one value per device: name, help, the value.
type PerDevice = (&'static str, &'static str, fn(&DeviceCounters) -> u64);

/// A gauge family of one value per device: name, help, the value.
type PerDeviceGauge = (&'static str, &'static str, fn(&DeviceSnapshot) -> i64);

/// A gauge family of the fault ring's fill: name, help, the value.
type PerDeviceFill = (&'static str, &'static str, fn(&QueueFill) -> u32);

/// Per device, by reason: `(reason label, value)`.
type ByReason = fn(&DeviceCounters) -> Vec<(&'static str, u64)>;

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let snapshot = self.snapshot();
        let devices = &snapshot.devices;
        let counters: [PerDevice; 9] = [
            (
                "iopf_page_requests",
                "Page requests the device reported.",
                |c| c.page_requests,
            ),
            (
                "iopf_page_requests_dropped",
                "Page requests dropped before their group completed.",
                |c| c.partial_dropped,
            ),
            (
                "iopf_page_request_groups",
                "Page request groups completed (a LAST_PAGE request arrived).",
                |c| c.groups,
            ),
            (
                "iopf_page_request_groups_delivered",
                "Page request groups published to the VMM.",
                |c| c.groups_delivered,
            ),
            (
                "iopf_unrecoverable_faults",
                "Unrecoverable faults the device reported.",
                |c| c.unrecoverable,
            ),
            (
                "iopf_unrecoverable_faults_lost",
                "Unrecoverable faults dropped (queue full, no handler, no consumer).",
                |c| c.lost,
            ),
            (
                "iopf_handler_registrations",
                "Fault handlers registered.",
                |c| c.registrations,
            ),
            (
                "iopf_handler_unregistrations",
                "Fault handlers unregistered (by request, VMM gone, or broken queue).",
                |c| c.unregistrations,
            ),
            (
                "iopf_responses_refused",
                "Page responses refused, all reasons.",
                |c| c.refused_total(),
            ),
        ];
        for (name, help, value) in counters {
            let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for d in devices {
                counter(&mut e, &device_label(d), value(&d.counters))?;
            }
        }
        {
            let mut e = encoder.encode_descriptor(
                "iopf_page_responses",
                "Page responses that reached the device, by source (guest or host) and code.",
                None,
                MetricType::Counter,
            )?;
            for d in devices {
                let c = &d.counters;
                let g = &c.responses.guest;
                let host = c.answered() - g.success - g.invalid - g.failure;
                for (source, code, value) in [
                    ("guest", "success", g.success),
                    ("guest", "invalid", g.invalid),
                    ("guest", "failure", g.failure),
                    ("host", "invalid", host),
                ] {
                    let mut labels = with_label(d, "source", source);
                    labels.push(("code", code.to_string()));
                    counter(&mut e, &labels, value)?;
                }
            }
        }
        let by_reason: [(&str, &str, ByReason); 2] = [
            (
                "iopf_auto_responses",
                "Page request groups the host answered itself (INVALID), by reason.",
                |c| {
                    let a = &c.responses.auto;
                    vec![
                        ("no_handler", a.no_handler),
                        ("not_attached", a.not_attached),
                        ("queue_full", a.queue_full),
                        ("pending_limit", a.pending_limit),
                        ("group_too_large", a.group_too_large),
                        ("unregister", a.unregister),
                        ("vmm_gone", a.vmm_gone),
                        ("queue_broken", a.queue_broken),
                        ("timeout", a.timeout),
                        ("reset", a.reset),
                    ]
                },
            ),
            (
                "iopf_refusals",
                "Page responses refused (they reached no device), by reason.",
                |c| {
                    let r = &c.refused;
                    vec![
                        ("malformed", r.malformed),
                        ("bad_version", r.bad_version),
                        ("unknown_cookie", r.unknown_cookie),
                        ("mismatch", r.mismatch),
                        ("failure_code", r.failure_code),
                    ]
                },
            ),
        ];
        for (name, help, reasons) in by_reason {
            let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for d in devices {
                for (reason, value) in reasons(&d.counters) {
                    counter(&mut e, &with_label(d, "reason", reason), value)?;
                }
            }
        }
        let gauges: [PerDeviceGauge; 3] = [
            (
                "iopf_pending_groups",
                "Page request groups delivered to the VMM and not answered yet.",
                |d| i64::try_from(d.pending_groups).unwrap_or(i64::MAX),
            ),
            (
                "iopf_queue_live",
                "1 while a fault handler is registered (its queues are LIVE), else 0.",
                |d| i64::from(d.registered),
            ),
            (
                "iopf_queue_attached",
                "1 while a VMM is attached to the handler's queues (ABI v2), else 0.",
                |d| i64::from(d.attached),
            ),
        ];
        for (name, help, value) in gauges {
            let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for d in devices {
                gauge(&mut e, &device_label(d), value(d))?;
            }
        }
        if devices.iter().any(|d| d.fault_queue.is_some()) {
            let fills: [PerDeviceFill; 2] = [
                (
                    "iopf_fault_queue_used",
                    "Fault records published to the VMM and not consumed yet (its index now).",
                    |q| q.used,
                ),
                (
                    "iopf_fault_queue_entries",
                    "Entries of the fault ring.",
                    |q| q.entries,
                ),
            ];
            for (name, help, value) in fills {
                let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for d in devices {
                    if let Some(q) = &d.fault_queue {
                        gauge(&mut e, &device_label(d), i64::from(value(q)))?;
                    }
                }
            }
        }
        if devices.iter().any(|d| d.engine.is_some()) {
            let mut e = encoder.encode_descriptor(
                "iopf_dma_accesses_ended",
                "DMA accesses of the device's engine that ended (completed or failed).",
                None,
                MetricType::Counter,
            )?;
            for d in devices {
                if let Some(engine) = &d.engine {
                    counter(&mut e, &device_label(d), engine.accesses_done)?;
                }
            }
            let mut e = encoder.encode_descriptor(
                "iopf_round_trip",
                "Page request round trips, group sent to response received at the device.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for d in devices {
                if let Some(engine) = &d.engine {
                    let l = &engine.latency;
                    let buckets: Vec<(f64, u64)> = l
                        .bounds_ns
                        .iter()
                        .map(|&ns| ns as f64 / 1e9)
                        .chain([f64::INFINITY])
                        .zip(l.buckets.iter().copied())
                        .collect();
                    e.encode_family(&device_label(d))?
                        .encode_histogram::<NoLabelSet>(
                            l.sum_ns as f64 / 1e9,
                            l.count(),
                            &buckets,
                            None,
                        )?;
                }
            }
        }
        Ok(())
    }
}

/// Refuses an address other than loopback, before anything binds it.
pub fn check_loopback(addr: SocketAddr) -> Result<(), MetricsError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(MetricsError::NotLoopback(addr))
    }
}

/// `GET /metrics` over HTTP, from a thread of its own, until dropped: `OpenMetrics` text when the
/// request's `Accept` asks for it (Prometheus does), else the Prometheus text format
/// ([`Format::negotiate`]).
pub struct MetricsServer {
    addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Listens on `addr` (a loopback address; port 0 picks a free one) and serves `metrics`.
    pub fn start(addr: SocketAddr, metrics: Metrics) -> Result<Self, MetricsError> {
        check_loopback(addr)?;
        let server = tiny_http::Server::http(addr)
            .map_err(|source| MetricsError::Listen { addr, source })?;
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("iopf-metrics".into())
            .spawn(move || serve_http(&serving, &metrics))
            .map_err(MetricsError::Spawn)?;
        Ok(Self {
            addr: bound,
            server,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the port picked, if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            // A panic in the serving thread has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

fn serve_http(server: &tiny_http::Server, metrics: &Metrics) {
    use tiny_http::{Header, Method, Response};
    // `recv` fails once `unblock` is called (the server is being dropped).
    while let Ok(request) = server.recv() {
        let path = request.url().split('?').next().unwrap_or("");
        let accept = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Accept"))
            .map(|h| h.value.as_str());
        let format = Format::negotiate(accept);
        let response = match (request.method(), path) {
            (Method::Get, "/metrics") => match metrics.encode_as(format) {
                Ok(text) => {
                    let response = Response::from_string(text);
                    // A constant, valid ASCII header: `from_bytes` cannot refuse it.
                    match Header::from_bytes(&b"Content-Type"[..], format.content_type()) {
                        Ok(header) => response.with_header(header),
                        Err(()) => response,
                    }
                }
                Err(e) => Response::from_string(format!("{e}\n")).with_status_code(500),
            },
            (Method::Get, _) => {
                Response::from_string("not found; try /metrics\n").with_status_code(404)
            }
            _ => Response::from_string("only GET\n").with_status_code(405),
        };
        if let Err(e) = request.respond(response) {
            // The scraper went away; the next one is served all the same.
            tracing::debug!(error = %e, "cannot answer a metrics request");
        }
    }
}

/// The stats socket of the host serving vfio-user on `socket`: the same path with `.stats`
/// appended.
pub fn stats_socket_path(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".stats");
    PathBuf::from(path)
}

/// A UNIX socket that writes one JSON [`Snapshot`] and a newline to whoever connects, then
/// closes; until dropped (which removes it).
#[derive(Debug)]
pub struct StatsSocket {
    path: PathBuf,
    /// The listening socket, to shut down when dropped.
    waker: UnixListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatsSocket {
    /// Binds `path` (replacing a stale socket left there, nothing else) and serves `metrics`.
    pub fn bind(path: &Path, metrics: Metrics) -> Result<Self, MetricsError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(MetricsError::NotASocket(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| MetricsError::BindStats {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let listener =
            crate::socket::listen_at(path).map_err(|source| MetricsError::BindStats {
                path: path.to_path_buf(),
                source,
            })?;
        let waker = listener
            .try_clone()
            .map_err(|source| MetricsError::BindStats {
                path: path.to_path_buf(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("iopf-stats".into())
            .spawn(move || serve_stats(&listener, &metrics, &stopping))
            .map_err(MetricsError::Spawn)?;
        Ok(Self {
            path: path.to_path_buf(),
            waker,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StatsSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread: on Linux, shutting a listening socket down makes a
        // blocked `accept` return at once, and the thread sees `stop`.
        match rustix::net::shutdown(&self.waker, rustix::net::Shutdown::Read) {
            Ok(()) => {
                if let Some(thread) = self.thread.take() {
                    // A panic in the serving thread has nothing left to clean up.
                    let _ = thread.join();
                }
            }
            // The thread stays blocked in `accept` (detached) until the process ends.
            Err(e) => tracing::debug!(error = %e, "cannot shut the stats socket down"),
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot remove the stats socket");
        }
    }
}

fn serve_stats(listener: &UnixListener, metrics: &Metrics, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(mut stream) = stream else { continue };
        let mut line = match serde_json::to_vec(&metrics.snapshot()) {
            Ok(line) => line,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a stats snapshot");
                continue;
            }
        };
        line.push(b'\n');
        // A reader that does not read stalls this thread (never the fault path) for at most
        // the timeout; then it gets a cut line, which it refuses.
        let written = stream
            .set_write_timeout(Some(STATS_TIMEOUT))
            .and_then(|()| stream.write_all(&line));
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot write a stats snapshot");
        }
    }
}

/// Connects to a host's stats socket ([`stats_socket_path`]) and reads one snapshot.
pub fn read_stats(path: &Path) -> Result<Snapshot, MetricsError> {
    let read_error = |source| MetricsError::ReadStats {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(read_error)?;
    stream
        .set_read_timeout(Some(STATS_TIMEOUT))
        .map_err(read_error)?;
    let mut bytes = Vec::new();
    stream
        .take(MAX_SNAPSHOT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(MetricsError::TooLarge(path.to_path_buf()));
    }
    let snapshot: Snapshot =
        serde_json::from_slice(&bytes).map_err(|source| MetricsError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    snapshot.validate().map_err(|what| MetricsError::Invalid {
        path: path.to_path_buf(),
        what,
    })?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_take_each_round_trip_once() {
        let b = LatencyBuckets::default();
        for ns in [0, 1_000, 1_001, 2_000_000_000] {
            b.record(ns);
        }
        let s = b.snapshot();
        assert_eq!(s.count(), 4);
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[LATENCY_BOUNDS_NS.len()], 1);
        assert_eq!(s.quantile_bound(0.5), Some(1_000));
        assert_eq!(s.quantile_bound(1.0), None);
    }

    #[test]
    fn non_loopback_is_refused() {
        for addr in ["0.0.0.0:9100", "192.0.2.1:1", "[::]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert!(matches!(
                check_loopback(addr),
                Err(MetricsError::NotLoopback(a)) if a == addr
            ));
        }
        for addr in ["127.0.0.1:0", "127.1.2.3:9", "[::1]:0"] {
            assert!(check_loopback(addr.parse().unwrap()).is_ok());
        }
    }

    use crate::temp_path::TempPath;

    fn temp_socket(name: &str) -> TempPath {
        TempPath::new(&format!("metrics-{name}"), "host.sock.stats")
    }

    #[test]
    fn the_stats_socket_serves_a_snapshot_and_goes_away_when_dropped() {
        let core = Arc::new(FaultCore::new(Arc::new(iopf_core::MonotonicClock::new())));
        let metrics = Metrics::new(core, vec![DeviceId(7)]);
        let path = temp_socket("roundtrip");
        let stats = StatsSocket::bind(&path, metrics.clone()).unwrap();
        let read = read_stats(&path).unwrap();
        assert_eq!(read, metrics.snapshot());
        assert_eq!(read.devices[0].device, 7);
        assert!(!read.devices[0].registered);
        // Twice: one reader does not end the socket.
        assert_eq!(read_stats(&path).unwrap(), read);
        drop(stats);
        assert!(!path.exists());
        assert!(matches!(
            read_stats(&path),
            Err(MetricsError::ReadStats { .. })
        ));
        // A file that is not a socket is not replaced.
        std::fs::write(&path, b"keep").unwrap();
        assert!(matches!(
            StatsSocket::bind(&path, metrics),
            Err(MetricsError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// Serves `bytes` once on a socket at `path`, then closes.
    fn fake_host(path: &Path, bytes: Vec<u8>) -> JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // The reader may hang up early (too much): that is its answer.
            let _ = stream.write_all(&bytes);
        })
    }

    #[test]
    fn what_a_stats_socket_sends_is_bounded_and_checked() {
        let path = temp_socket("hostile");
        type Expect = fn(&MetricsError) -> bool;
        let cases: Vec<(Vec<u8>, Expect)> = vec![
            (b"not json\n".to_vec(), |e| {
                matches!(e, MetricsError::Decode { .. })
            }),
            (b"{\"version\": 2, \"devices\": []}".to_vec(), |e| {
                matches!(e, MetricsError::Invalid { .. })
            }),
            (vec![b' '; MAX_SNAPSHOT_BYTES as usize + 10], |e| {
                matches!(e, MetricsError::TooLarge(_))
            }),
        ];
        for (bytes, expected) in cases {
            let _ = std::fs::remove_file(&path);
            let server = fake_host(&path, bytes);
            let error = read_stats(&path).unwrap_err();
            assert!(expected(&error), "{error:?}");
            server.join().unwrap();
        }
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_snapshot_with_mismatched_buckets_is_invalid() {
        let mut s = Snapshot {
            version: SNAPSHOT_VERSION,
            devices: vec![DeviceSnapshot {
                device: 1,
                registered: true,
                attached: false,
                pending_groups: 0,
                fault_queue: None,
                counters: DeviceCounters::default(),
                engine: Some(EngineSnapshot {
                    accesses_done: 0,
                    groups_answered: 0,
                    latency: LatencyBuckets::default().snapshot(),
                }),
            }],
        };
        assert!(s.validate().is_ok());
        if let Some(e) = s.devices[0].engine.as_mut() {
            e.latency.buckets.pop();
        }
        assert!(s.validate().is_err());
        s.version = 2;
        assert!(s.validate().is_err());
    }
}
