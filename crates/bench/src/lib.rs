//! `iopf bench`: iopf's fault path measured against the limits of the machine and against what
//! a user would pick instead, in one run, so that the figures are ratios that hold on a noisy
//! machine (`docs/PERFORMANCE.md`).
//!
//! Two processes pinned to two CPUs: this one (the host) and a peer started by re-executing the
//! current binary with a hidden subcommand (`iopf bench-peer --socket PATH`), exactly as
//! `iopf demo` starts its VMM. Shared memory, eventfds, sockets and pipes reach the peer over a
//! UNIX socket with `SCM_RIGHTS` ([`iopf_queue::fdpass`]).
//!
//! Each round measures, each figure just after the limit it is divided by:
//! - **limit**: a cache-line ping-pong round trip (the floor) and an SPSC copy loop that
//!   stores straight into the slots with a batched index publish (the ceiling);
//! - **baseline**: a UNIX `SOCK_SEQPACKET` socketpair, one record per message (round trip and
//!   stream), and a pipe read in large batches (stream);
//! - **iopf queue**: the fault queue one way with batching (busy and blocking consumer), and a
//!   round trip out on the fault queue and back on the response queue (busy, blocking with
//!   every wait sleeping, blocking with the library's default spin);
//! - **end to end**: device, fault core, fault queue, VMM process, guest, response queue, fault
//!   core, device: latency percentiles and sustained groups per second;
//! - **scaling** (one process): cost per fault as devices, PASIDs and pending groups grow;
//! - **VMM event loop** (one process, two threads): the `iopf-vmm` library's cost per group
//!   with 1, 64 and 1,024 devices served by one thread, as ratios to the 1-device point.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod baseline;
pub mod child;
mod control;
mod e2e;
mod error;
#[cfg(feature = "iceoryx2")]
mod iox;
mod limit;
mod queue;
mod real_path;
mod report;
mod scaling;
mod spin;
mod vmm_loop;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub use error::BenchError;
pub use report::{
    Figure, Machine, RealPath, RealPathPoint, Report, Scaling, ScalingPoint, ScalingSeries, Target,
    Unit, VmmLoop, VmmLoopPoint,
};

use control::{Control, Peer, Reply, RttMode, Task};
use error::Result;
use iopf_core::ErrorChain;
use spin::Placement;

/// The hidden subcommand the peer process runs (`iopf bench-peer --socket PATH`).
pub const PEER_SUBCOMMAND: &str = "bench-peer";
/// Rounds per figure by default.
pub const DEFAULT_ROUNDS: u32 = 3;
/// The default `--records`: records per stream through shared memory; every other count is
/// derived from it (see [`Config::records`]).
pub const DEFAULT_RECORDS: u64 = 8_000_000;
/// `--records` under `--quick`.
pub const QUICK_RECORDS: u64 = 20_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Rounds per figure; each figure is the median of its rounds.
    pub rounds: u32,
    /// Records per shared-memory stream (ceiling and queue streams). The other counts follow:
    /// pipe stream 1/4 of it, socketpair stream and end-to-end sustained groups 1/20,
    /// ping-pong and busy round trips 1/40, end-to-end latency samples 1/200, blocking and
    /// socketpair round trips 1/400, scaling groups per point 1/20, VMM event loop groups per
    /// point 1/40.
    pub records: u64,
    /// Smoke-test sizes (overrides `records` with [`QUICK_RECORDS`]).
    pub quick: bool,
    /// The program to start as the peer (normally the current executable).
    pub peer_program: PathBuf,
    /// The arguments that make it the peer (normally `[PEER_SUBCOMMAND]`); `--socket PATH` is
    /// appended.
    pub peer_args: Vec<OsString>,
    /// Measure only these figures (names as in the JSON, `scaling` or `vmm_loop`), with the
    /// limit each
    /// is divided by; `None`: everything. For profiling one figure.
    pub only: Option<Vec<String>>,
    /// Set (by a signal handler) to stop: the run ends with [`BenchError::Interrupted`] before
    /// its next figure, and stops its peer process.
    pub stop: Arc<AtomicBool>,
    /// The `iopf` program whose `run` subcommand the real-path figure starts (normally the
    /// current executable); `None`: that figure is not measured.
    pub run_program: Option<PathBuf>,
}

impl Config {
    /// The defaults, with the current executable as the peer.
    pub fn new() -> Result<Self> {
        Ok(Self {
            rounds: DEFAULT_ROUNDS,
            records: DEFAULT_RECORDS,
            quick: false,
            peer_program: std::env::current_exe()
                .map_err(BenchError::io("find the current executable"))?,
            peer_args: vec![PEER_SUBCOMMAND.into()],
            only: None,
            stop: Arc::default(),
            run_program: std::env::current_exe().ok(),
        })
    }
}

/// The counts of one run.
#[derive(Debug, Clone)]
struct Sizes {
    records: u64,
    pingpong: u64,
    busy_rtt: u64,
    blocking_rtt: u64,
    sock_stream: u64,
    pipe_stream: u64,
    e2e_samples: u64,
    e2e_groups: u64,
    scaling_groups: u64,
    vmm_groups: u64,
    vmm_devices: Vec<u64>,
    /// Real path: devices per point, total groups per second, seconds per run.
    real_devices: Vec<u64>,
    real_rate: u64,
    real_secs: f64,
    devices: Vec<u64>,
    pasids: Vec<u64>,
    pending: Vec<u64>,
}

impl Sizes {
    fn new(config: &Config) -> Self {
        let r = if config.quick {
            QUICK_RECORDS
        } else {
            config.records.max(1000)
        };
        let part = |div: u64, min: u64| (r / div).max(min);
        Self {
            records: r,
            pingpong: part(40, 100),
            busy_rtt: part(40, 100),
            blocking_rtt: part(400, 50),
            sock_stream: part(20, 100),
            pipe_stream: part(4, 100),
            e2e_samples: part(200, 50),
            e2e_groups: part(20, 100),
            scaling_groups: part(20, 256),
            vmm_groups: part(40, 256),
            vmm_devices: vec![1, 64, 1024],
            real_devices: if config.quick {
                vec![2, 8]
            } else {
                vec![2, 64, 256, 1024]
            },
            real_rate: if config.quick { 2000 } else { 8000 },
            real_secs: if config.quick { 0.5 } else { 3.0 },
            devices: vec![1, 16, 256, 1024],
            pasids: vec![1, 16, 256, 4096, 65536],
            pending: vec![1, 10, 100, 1000, 10_000, 100_000],
        }
    }
}

/// The figures, in the order of the table: name, group, description, unit.
const FIGURES: &[(&str, &str, &str, Unit)] = &[
    (
        "floor_pingpong_rtt",
        "limit",
        "cache-line ping-pong round trip, busy poll (floor)",
        Unit::Nanoseconds,
    ),
    (
        "ring_floor_rtt",
        "limit",
        "minimal ring round trip: slot + index lines, busy poll",
        Unit::Nanoseconds,
    ),
    (
        "ring_floor_line_rtt",
        "limit",
        "one-line ring round trip: mark in the slot, busy poll",
        Unit::Nanoseconds,
    ),
    (
        "ceiling_copy_stream",
        "limit",
        "SPSC copy into slots, batched publish (ceiling)",
        Unit::RecordsPerSecond,
    ),
    (
        "queue_stream_busy",
        "iopf queue",
        "fault queue one way, batches of 64, busy consumer",
        Unit::RecordsPerSecond,
    ),
    (
        "queue_stream_blocking",
        "iopf queue",
        "fault queue one way, batches of 64, consumer wait()",
        Unit::RecordsPerSecond,
    ),
    (
        "queue_rtt_busy",
        "iopf queue",
        "fault queue out, response queue back, busy poll",
        Unit::Nanoseconds,
    ),
    (
        "queue_rtt_blocking",
        "iopf queue",
        "round trip, eventfd blocking (spin 0: always sleep)",
        Unit::Nanoseconds,
    ),
    (
        "queue_rtt_blocking_spin",
        "iopf queue",
        "round trip, eventfd blocking (default spin, then sleep)",
        Unit::Nanoseconds,
    ),
    (
        "socketpair_rtt",
        "baseline",
        "SOCK_SEQPACKET socketpair round trip, blocking",
        Unit::Nanoseconds,
    ),
    (
        "socketpair_stream",
        "baseline",
        "SOCK_SEQPACKET socketpair, one record per message",
        Unit::RecordsPerSecond,
    ),
    (
        "pipe_stream",
        "baseline",
        "pipe, 64 records per write, 64 KiB reads",
        Unit::RecordsPerSecond,
    ),
    (
        "iceoryx2_rtt",
        "baseline",
        "iceoryx2 0.10 publish-subscribe round trip, busy poll",
        Unit::Nanoseconds,
    ),
    (
        "iceoryx2_stream",
        "baseline",
        "iceoryx2 0.10 publish-subscribe, buffer 4096",
        Unit::RecordsPerSecond,
    ),
    (
        "e2e_rtt",
        "end to end",
        "page request round trip device..VMM..device, p50",
        Unit::Nanoseconds,
    ),
    (
        "e2e_sustained",
        "end to end",
        "sustained page request groups, 64 outstanding",
        Unit::GroupsPerSecond,
    ),
];

#[derive(Debug, Default)]
struct Accumulated {
    values: Vec<f64>,
    vs_limit: Vec<f64>,
    vs_socketpair: Vec<f64>,
    details: BTreeMap<String, Vec<f64>>,
}

/// Collects every round of every figure with its ratios to the limit measured just before it
/// and to the round's socketpair baseline.
#[derive(Debug, Default)]
struct Recorder {
    figures: BTreeMap<&'static str, Accumulated>,
    floor: Option<f64>,
    ceiling: Option<f64>,
    sock_rtt: Option<f64>,
    sock_stream: Option<f64>,
}

fn unit_of(name: &str) -> Unit {
    FIGURES
        .iter()
        .find(|f| f.0 == name)
        .map_or(Unit::Nanoseconds, |f| f.3)
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

impl Recorder {
    fn floor(&mut self, value: f64) {
        self.floor = Some(value);
        self.figures
            .entry("floor_pingpong_rtt")
            .or_default()
            .values
            .push(value);
    }

    fn ceiling(&mut self, value: f64) {
        self.ceiling = Some(value);
        self.figures
            .entry("ceiling_copy_stream")
            .or_default()
            .values
            .push(value);
    }

    fn record(&mut self, name: &'static str, value: f64, details: &[(&str, f64)]) {
        let rate = unit_of(name).is_rate();
        let (limit, sock) = if rate {
            (self.ceiling, self.sock_stream)
        } else {
            (self.floor, self.sock_rtt)
        };
        let acc = self.figures.entry(name).or_default();
        acc.values.push(value);
        if let Some(limit) = limit {
            acc.vs_limit.push(value / limit);
        }
        if let Some(sock) = sock {
            acc.vs_socketpair.push(value / sock);
        }
        for (k, v) in details {
            acc.details.entry((*k).to_owned()).or_default().push(*v);
        }
    }

    fn finish(self) -> Vec<Figure> {
        let nan_if_empty = |v: &[f64]| if v.is_empty() { f64::NAN } else { median(v) };
        let medians: BTreeMap<&str, f64> = self
            .figures
            .iter()
            .map(|(k, a)| (*k, median(&a.values)))
            .collect();
        let get = |k: &str| medians.get(k).copied().unwrap_or(f64::NAN);
        FIGURES
            .iter()
            .filter_map(|&(name, group, description, unit)| {
                let acc = self.figures.get(name)?;
                let value = median(&acc.values);
                let (vs_limit, vs_socketpair) = match name {
                    "floor_pingpong_rtt" => (1.0, value / get("socketpair_rtt")),
                    "ceiling_copy_stream" => (1.0, value / get("socketpair_stream")),
                    _ => (
                        nan_if_empty(&acc.vs_limit),
                        nan_if_empty(&acc.vs_socketpair),
                    ),
                };
                Some(Figure {
                    name: name.to_owned(),
                    group: group.to_owned(),
                    description: description.to_owned(),
                    unit,
                    value,
                    rounds: acc.values.clone(),
                    limit: if unit.is_rate() { "ceiling" } else { "floor" }.to_owned(),
                    vs_limit,
                    vs_socketpair,
                    details: acc
                        .details
                        .iter()
                        .map(|(k, v)| (k.clone(), median(v)))
                        .collect(),
                })
            })
            .collect()
    }
}

/// Whether `config` asks for the figure (or part) `name`.
fn wanted(config: &Config, name: &str) -> bool {
    config
        .only
        .as_ref()
        .is_none_or(|only| only.iter().any(|o| o == name))
}

/// One round of the two-process figures, each just after its limit.
/// `Err(Interrupted)` once a stop was asked for.
fn stopped(config: &Config) -> Result<()> {
    if config.stop.load(Ordering::Relaxed) {
        return Err(BenchError::Interrupted);
    }
    Ok(())
}

fn round(peer: &Peer, config: &Config, s: &Sizes, rec: &mut Recorder) -> Result<()> {
    let want = |name: &str| wanted(config, name);
    let floor = |rec: &mut Recorder| -> Result<()> {
        stopped(config)?;
        rec.floor(limit::pingpong(peer, s.pingpong)?);
        Ok(())
    };
    let ceiling = |rec: &mut Recorder| -> Result<()> {
        stopped(config)?;
        rec.ceiling(limit::ceiling(peer, s.records)?);
        Ok(())
    };
    // Asked for alone; otherwise they are measured before each figure anyway.
    if config.only.is_some() && want("floor_pingpong_rtt") {
        floor(rec)?;
    }
    if config.only.is_some() && want("ceiling_copy_stream") {
        ceiling(rec)?;
    }

    // The baselines first: the round's ratios to them need them.
    if want("socketpair_rtt") {
        floor(rec)?;
        let sock_rtt = baseline::sock_rtt(peer, s.blocking_rtt)?;
        rec.sock_rtt = Some(sock_rtt);
        rec.record("socketpair_rtt", sock_rtt, &[]);
    }
    if want("socketpair_stream") {
        ceiling(rec)?;
        let sock_stream = baseline::sock_stream(peer, s.sock_stream)?;
        rec.sock_stream = Some(sock_stream);
        rec.record("socketpair_stream", sock_stream, &[]);
    }
    if want("pipe_stream") {
        ceiling(rec)?;
        rec.record(
            "pipe_stream",
            baseline::pipe_stream(peer, s.pipe_stream)?,
            &[],
        );
    }

    for (name, blocking) in [
        ("queue_stream_busy", false),
        ("queue_stream_blocking", true),
    ] {
        if !want(name) {
            continue;
        }
        ceiling(rec)?;
        let q = queue::stream(peer, s.records, blocking)?;
        rec.record(
            name,
            q.value,
            &[
                ("kicks_per_record", q.kicks_per_record),
                ("sleeps", q.sleeps as f64),
            ],
        );
    }
    let rtts = [
        ("queue_rtt_busy", RttMode::Busy, s.busy_rtt),
        (
            "queue_rtt_blocking",
            RttMode::Blocking { spin: 0 },
            s.blocking_rtt,
        ),
        (
            "queue_rtt_blocking_spin",
            RttMode::Blocking {
                spin: iopf_queue::DEFAULT_SPIN,
            },
            s.blocking_rtt,
        ),
    ];
    #[cfg(feature = "iceoryx2")]
    {
        if want("iceoryx2_rtt") {
            floor(rec)?;
            rec.record("iceoryx2_rtt", iox::rtt(peer, s.busy_rtt)?, &[]);
        }
        if want("iceoryx2_stream") {
            ceiling(rec)?;
            rec.record("iceoryx2_stream", iox::stream(peer, s.sock_stream)?, &[]);
        }
    }
    if want("ring_floor_rtt") {
        floor(rec)?;
        rec.record("ring_floor_rtt", limit::ring_floor(peer, s.busy_rtt)?, &[]);
    }
    if want("ring_floor_line_rtt") {
        floor(rec)?;
        let line = limit::ring_floor_line(peer, s.busy_rtt)?;
        rec.record("ring_floor_line_rtt", line, &[]);
    }
    for (name, mode, count) in rtts {
        if !want(name) {
            continue;
        }
        floor(rec)?;
        let q = queue::rtt(peer, count, mode)?;
        rec.record(
            name,
            q.value,
            &[
                ("kicks_per_record", q.kicks_per_record),
                ("sleeps_per_rtt", q.sleeps as f64 / count as f64),
            ],
        );
    }

    if want("e2e_rtt") {
        floor(rec)?;
        let l = e2e::latency(peer, s.e2e_samples)?;
        rec.record(
            "e2e_rtt",
            l.p50,
            &[
                ("p99_ns", l.p99),
                ("p99.9_ns", l.p999),
                ("max_ns", l.max),
                ("sleeps_per_group", l.sleeps_per_group),
            ],
        );
    }
    if want("e2e_sustained") {
        ceiling(rec)?;
        let t = e2e::sustained(peer, s.e2e_groups)?;
        rec.record(
            "e2e_sustained",
            t.groups_per_s,
            &[
                ("kicks_per_group", t.kicks_per_group),
                ("sleeps_per_group", t.sleeps_per_group),
            ],
        );
    }
    Ok(())
}

fn series(dimension: &str, ns: &[u64], samples: Vec<Vec<f64>>) -> ScalingSeries {
    let points: Vec<ScalingPoint> = ns
        .iter()
        .zip(samples)
        .map(|(&n, rounds)| ScalingPoint {
            n,
            ns_per_group: median(&rounds),
            rounds,
        })
        .collect();
    let costs = points.iter().map(|p| p.ns_per_group);
    let max = costs.clone().fold(f64::NAN, f64::max);
    let min = costs.fold(f64::NAN, f64::min);
    ScalingSeries {
        dimension: dimension.to_owned(),
        points,
        max_over_min: max / min,
    }
}

/// The scaling series, rounds outermost, so that a noisy moment spreads over every point
/// rather than spoiling one.
fn scaling(config: &Config, s: &Sizes, rounds: u32) -> Result<Option<Scaling>> {
    let g = s.scaling_groups;
    let dims: [(&str, &[u64]); 3] = [
        ("devices", &s.devices),
        ("pasids", &s.pasids),
        ("pending", &s.pending),
    ];
    let want = |dim: &str| wanted(config, "scaling") || wanted(config, &format!("scaling_{dim}"));
    if !dims.iter().any(|(dim, _)| want(dim)) {
        return Ok(None);
    }
    let mut samples: Vec<Vec<Vec<f64>>> = dims
        .iter()
        .map(|(_, ns)| vec![Vec::new(); ns.len()])
        .collect();
    for _ in 0..rounds {
        for ((dim, ns), samples) in dims.iter().zip(&mut samples) {
            if !want(dim) {
                continue;
            }
            for (&n, out) in ns.iter().zip(samples.iter_mut()) {
                let (devices, pasids, pending) = match *dim {
                    "devices" => (n as usize, 1, 0),
                    "pasids" => (1, n, 0),
                    _ => (1, 1, n as usize),
                };
                stopped(config)?;
                out.push(scaling::cost(devices, pasids, pending, g)?);
            }
        }
    }
    let mut samples = samples.into_iter();
    let mut next = |(dim, ns): (&str, &[u64])| series(dim, ns, samples.next().unwrap_or_default());
    Ok(Some(Scaling {
        groups_per_point: g,
        groups_per_step: scaling::GROUPS_PER_STEP,
        devices: next(dims[0]),
        pasids: next(dims[1]),
        pending: next(dims[2]),
    }))
}

/// The VMM event loop figure, rounds outermost; each point's ratio is taken against the
/// 1-device point of the same round.
fn vmm_loop(
    config: &Config,
    s: &Sizes,
    rounds: u32,
    placement: &Placement,
) -> Result<Option<VmmLoop>> {
    if !wanted(config, "vmm_loop") {
        return Ok(None);
    }
    let mut points: Vec<Vec<vmm_loop::Point>> = vec![Vec::new(); s.vmm_devices.len()];
    for _ in 0..rounds {
        for (&n, out) in s.vmm_devices.iter().zip(&mut points) {
            stopped(config)?;
            out.push(vmm_loop::cost(n as usize, s.vmm_groups, placement.peer)?);
        }
    }
    let one: Vec<f64> = points
        .first()
        .map(|p| p.iter().map(|r| r.cpu_ns_per_group).collect())
        .unwrap_or_default();
    let points = s
        .vmm_devices
        .iter()
        .zip(points)
        .map(|(&devices, rounds)| {
            let of = |f: fn(&vmm_loop::Point) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
            let costs = of(|r| r.cpu_ns_per_group);
            let ratios: Vec<f64> = costs.iter().zip(&one).map(|(c, o)| c / o).collect();
            VmmLoopPoint {
                devices,
                ns_per_group: median(&costs),
                vs_one_device: median(&ratios),
                wall_ns_per_group: median(&of(|r| r.wall_ns_per_group)),
                loop_rounds_per_group: median(&of(|r| r.loop_rounds_per_group)),
                kicks_per_group: median(&of(|r| r.kicks_per_group)),
                rounds: costs,
            }
        })
        .collect();
    Ok(Some(VmmLoop {
        groups_per_point: s.vmm_groups,
        window: vmm_loop::WINDOW,
        points,
    }))
}

/// The real-path figure, rounds outermost; each point's ratios are taken against the 2-device
/// point of the same round.
fn real_path(config: &Config, s: &Sizes, rounds: u32) -> Result<Option<RealPath>> {
    let Some(program) = config.run_program.as_deref() else {
        return Ok(None);
    };
    if !wanted(config, "real_path") {
        return Ok(None);
    }
    let mut points: Vec<Vec<real_path::Point>> = vec![Vec::new(); s.real_devices.len()];
    for _ in 0..rounds {
        for (&n, out) in s.real_devices.iter().zip(&mut points) {
            stopped(config)?;
            out.push(real_path::measure(
                program,
                n,
                s.real_rate,
                s.real_secs,
                &config.stop,
            )?);
        }
    }
    let first = points.first().cloned().unwrap_or_default();
    let points = s
        .real_devices
        .iter()
        .zip(points)
        .map(|(&devices, rounds)| {
            let of = |f: fn(&real_path::Point) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
            let ratio = |f: fn(&real_path::Point) -> f64| {
                let ratios: Vec<f64> = rounds
                    .iter()
                    .zip(&first)
                    .map(|(r, o)| f(r) / f(o))
                    .collect();
                median(&ratios)
            };
            RealPathPoint {
                devices,
                groups_per_s: median(&of(|r| r.groups_per_s)),
                p50_us: median(&of(|r| r.p50_us)),
                p99_us: median(&of(|r| r.p99_us)),
                p50_vs_first: ratio(|r| r.p50_us),
                p99_vs_first: ratio(|r| r.p99_us),
                groups_per_s_vs_first: ratio(|r| r.groups_per_s),
            }
        })
        .collect();
    Ok(Some(RealPath {
        groups_per_second: s.real_rate,
        seconds: s.real_secs,
        points,
    }))
}

fn targets(figures: &[Figure], scaling: Option<&Scaling>) -> Vec<Target> {
    let ratio = |f: fn(&Scaling) -> &ScalingSeries| scaling.map_or(f64::NAN, |s| f(s).max_over_min);
    let get = |name: &str, f: fn(&Figure) -> f64| {
        figures.iter().find(|x| x.name == name).map_or(f64::NAN, f)
    };
    let at_least = |target: &str, ratio: f64, bound: f64| Target {
        target: target.to_owned(),
        ratio,
        bound: format!(">= {bound}"),
        met: ratio >= bound,
    };
    let at_most = |target: &str, ratio: f64, bound: f64| Target {
        target: target.to_owned(),
        ratio,
        bound: format!("<= {bound}"),
        met: ratio <= bound,
    };
    vec![
        at_least(
            "queue stream (busy) / copy ceiling",
            get("queue_stream_busy", |f| f.vs_limit),
            0.95,
        ),
        at_least(
            "queue stream (busy) / socketpair stream",
            get("queue_stream_busy", |f| f.vs_socketpair),
            10.0,
        ),
        at_most(
            "queue round trip (busy) / ping-pong floor",
            get("queue_rtt_busy", |f| f.vs_limit),
            1.5,
        ),
        at_most(
            "queue round trip (busy) / one-line ring floor (not a target: shown)",
            get("queue_rtt_busy", |f| f.vs_limit) / get("ring_floor_line_rtt", |f| f.vs_limit),
            1.2,
        ),
        at_most(
            "end-to-end round trip p50 / ping-pong floor",
            get("e2e_rtt", |f| f.vs_limit),
            2.0,
        ),
        at_most(
            "queue round trip (blocking, spin 0) / socketpair round trip",
            get("queue_rtt_blocking", |f| f.vs_socketpair),
            1.0,
        ),
        at_most(
            "end-to-end cost per fault, 1..1024 devices: max / min",
            ratio(|s| &s.devices),
            1.2,
        ),
        at_most(
            "end-to-end cost per fault, 1..100000 pending: max / min",
            ratio(|s| &s.pending),
            1.2,
        ),
        at_most(
            "cost per fault, 1..65536 PASIDs: max / min (not a target: shown)",
            ratio(|s| &s.pasids),
            1.2,
        ),
    ]
}

fn machine(placement: &Placement) -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    Machine {
        cpus: placement.cpus,
        cpu_model,
        kernel,
        pinned: placement.host.is_some(),
        placement: placement.describe(),
    }
}

/// One scaling point, alone (for profiling): nanoseconds per reported group with `devices`
/// devices, `pasids` PASIDs per device and `pending` groups held unanswered per device, over
/// about `groups` timed groups. See `docs/PERFORMANCE.md`.
pub fn scaling_cost(
    devices: usize,
    pasids: u64,
    pending: usize,
    groups: u64,
) -> Result<f64, BenchError> {
    scaling::cost(devices, pasids, pending, groups)
}

/// One point of the VMM event loop figure, alone (for profiling): the VMM thread's CPU
/// nanoseconds per group with `devices` devices served by one `iopf-vmm` `EventLoop`, over
/// about `groups` timed groups. See `docs/PERFORMANCE.md`.
pub fn vmm_loop_cost(devices: usize, groups: u64) -> Result<f64, BenchError> {
    Ok(vmm_loop::cost(devices, groups, None)?.cpu_ns_per_group)
}

/// Runs every figure `config.rounds` times and reports the medians and ratios.
pub fn run(config: &Config) -> Result<Report, BenchError> {
    let started = Instant::now();
    let placement = Placement::choose()?;
    spin::pin(placement.host)?;
    let sizes = Sizes::new(config);
    let rounds = config.rounds.max(1);

    #[cfg(feature = "iceoryx2")]
    let leftovers = iox::Leftovers::before();
    let peer = Peer::spawn(&config.peer_program, &config.peer_args, placement.peer)?;
    let mut recorder = Recorder::default();
    let measured = (0..rounds).try_for_each(|_| {
        stopped(config)?;
        round(&peer, config, &sizes, &mut recorder)
    });
    let exited = peer.exit();
    #[cfg(feature = "iceoryx2")]
    leftovers.clean();
    measured?;
    exited?;
    let figures = recorder.finish();
    let scaling = scaling(config, &sizes, rounds)?;
    let vmm_loop = vmm_loop(config, &sizes, rounds, &placement)?;
    let real_path = real_path(config, &sizes, rounds)?;
    let targets = targets(&figures, scaling.as_ref());

    let mut notes = vec![
        "end to end runs between two processes as `iopf demo` does (fds passed over a UNIX \
         socket), not over the vfio-user control plane, which is not on the fault path; \
         `iopf run` reports round trips over vfio-user"
            .to_owned(),
        "each ratio is taken against the limit measured just before the figure, and against \
         the socketpair baseline of the same round: ratios, not absolutes, are the point"
            .to_owned(),
        "round trips go out as 64-byte fault records and come back as 32-byte response \
         records (ABI v2); the ping-pong and socketpair round trips carry 64 bytes both ways"
            .to_owned(),
    ];
    if cfg!(feature = "iceoryx2") {
        notes.push(
            "iceoryx2 0.10: settings of its own benchmarks (round trip: two services, history \
             0, buffer 1, safe overflow; stream: buffer 4096, RetryUntilDelivered)"
                .to_owned(),
        );
    } else {
        notes.push(
            "iceoryx2 not measured: build with `--features iceoryx2` (docs/PERFORMANCE.md)"
                .to_owned(),
        );
    }
    if placement.host.is_none() {
        notes.push(format!(
            "only {} CPU available: the processes were not pinned and share it, so busy-poll \
             figures measure the scheduler",
            placement.cpus
        ));
    }
    Ok(Report {
        machine: machine(&placement),
        rounds,
        records: sizes.records,
        quick: config.quick,
        seconds: started.elapsed().as_secs_f64(),
        figures,
        scaling,
        vmm_loop,
        real_path,
        targets,
        notes,
    })
}

/// The peer process: connects to the host's control socket and serves its tasks until told
/// to exit.
pub fn peer(socket: &Path) -> Result<(), BenchError> {
    let control = Control::connect(socket)?;
    loop {
        let (task, fds) = control.recv::<Task>()?;
        let result = match task {
            Task::Hello { cpu } => match spin::pin(cpu) {
                Ok(()) => {
                    control.ready()?;
                    continue;
                }
                Err(e) => Err(e),
            },
            Task::Exit => return Ok(()),
            Task::PingPong { count } => limit::pingpong_peer(&control, fds, count),
            Task::Ceiling { records } => limit::ceiling_peer(&control, fds, records),
            Task::RingFloor { count } => limit::ring_floor_peer(&control, fds, count),
            Task::RingFloorLine { count } => limit::ring_floor_line_peer(&control, fds, count),
            Task::QueueStream { records, blocking } => {
                queue::stream_peer(&control, fds, records, blocking)
            }
            Task::QueueRtt { count, mode } => queue::rtt_peer(&control, fds, count, mode),
            Task::SockStream { records } => baseline::sock_stream_peer(&control, fds, records),
            Task::SockRtt { count } => baseline::sock_rtt_peer(&control, fds, count),
            Task::PipeStream { records } => baseline::pipe_stream_peer(&control, fds, records),
            Task::Vmm => e2e::vmm_peer(&control, fds),
            #[cfg(feature = "iceoryx2")]
            Task::IoxRtt { ping, pong, count } => iox::rtt_peer(&control, &ping, &pong, count),
            #[cfg(feature = "iceoryx2")]
            Task::IoxStream { topic, records } => iox::stream_peer(&control, &topic, records),
        };
        match result {
            Ok(stats) => control.send(&Reply::Done(stats), &[])?,
            Err(e) => {
                // Best effort: the host may be gone already, and the error returned below is
                // what this process reports either way.
                let _ = control.send(&Reply::Failed(ErrorChain(&e).to_string()), &[]);
                return Err(e);
            }
        }
    }
}
