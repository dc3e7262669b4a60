//! What `iopf bench` found: the figures, their ratios to the machine's limits and to the
//! socketpair baseline, the scaling series and the targets (same-run ratios); as a table or as
//! JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// How a figure is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Nanoseconds per round trip (lower is better).
    Nanoseconds,
    /// Records per second (higher is better).
    RecordsPerSecond,
    /// Page request groups per second (higher is better).
    GroupsPerSecond,
}

impl Unit {
    /// Whether this is a rate (the ceiling is its limit) rather than a latency (the floor).
    pub fn is_rate(self) -> bool {
        !matches!(self, Self::Nanoseconds)
    }
}

/// One figure: the median of its rounds, and its ratios from the same rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key (for scripts).
    pub name: String,
    /// `limit`, `iopf queue`, `baseline` or `end to end`.
    pub group: String,
    /// What was measured.
    pub description: String,
    /// The unit of `value`.
    pub unit: Unit,
    /// Median over the rounds.
    pub value: f64,
    /// Every round's value.
    pub rounds: Vec<f64>,
    /// The limit it is compared with: `floor` (round trips) or `ceiling` (rates).
    pub limit: String,
    /// Median over the rounds of this value divided by the limit measured just before it
    /// (for a latency, how many floors; for a rate, the fraction of the ceiling).
    pub vs_limit: f64,
    /// Median over the rounds of this value divided by the socketpair baseline of the same
    /// round (its round trip for a latency, its stream for a rate).
    pub vs_socketpair: f64,
    /// Other numbers of this figure (percentiles, doorbell kicks and sleeps per record),
    /// medians over the rounds.
    pub details: BTreeMap<String, f64>,
}

/// One point of a scaling series.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingPoint {
    /// Devices, PASIDs per device, or pending groups per device.
    pub n: u64,
    /// Median over the rounds of the cost per reported group, in nanoseconds.
    pub ns_per_group: f64,
    /// Every round's cost.
    pub rounds: Vec<f64>,
}

/// The cost per fault as one dimension grows.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingSeries {
    /// `devices`, `pasids` or `pending`.
    pub dimension: String,
    /// The points, in growing order.
    pub points: Vec<ScalingPoint>,
    /// Largest cost divided by smallest cost (1.0 is perfectly flat).
    pub max_over_min: f64,
}

/// The scaling figures (one process, real core, in-process queues and consumer).
#[derive(Debug, Clone, Serialize)]
pub struct Scaling {
    /// Timed groups per point and round.
    pub groups_per_point: u64,
    /// Groups per `report_batch` (each group is two page requests).
    pub groups_per_step: u64,
    /// As the number of devices grows (one pending target of 0, one PASID).
    pub devices: ScalingSeries,
    /// As the PASIDs in use per device grow (one device).
    pub pasids: ScalingSeries,
    /// As the groups pending per device grow (one device).
    pub pending: ScalingSeries,
}

/// One point of the VMM event loop figure.
#[derive(Debug, Clone, Serialize)]
pub struct VmmLoopPoint {
    /// Devices served by the one VMM thread.
    pub devices: u64,
    /// Median over the rounds of the VMM thread's CPU time per group, in nanoseconds.
    pub ns_per_group: f64,
    /// Median over the rounds of this point's cost divided by the 1-device point's cost of the
    /// same round (1.0: serving more devices costs nothing more per group).
    pub vs_one_device: f64,
    /// Median over the rounds of the wall time per group the host side saw, in nanoseconds.
    pub wall_ns_per_group: f64,
    /// Median over the rounds of `EventLoop::run_once` calls per group (each is one
    /// `epoll_wait`; below 1.0, rounds served more than one group).
    pub loop_rounds_per_group: f64,
    /// Median over the rounds of fault doorbell rings per group (the VMM's loop was asleep
    /// on that device: one wake-up of the loop, one eventfd read).
    pub kicks_per_group: f64,
    /// Every round's `ns_per_group`.
    pub rounds: Vec<f64>,
}

/// The VMM's cost per page request group as one thread serves more devices (the `iopf-vmm`
/// library's `EventLoop`, one process, real shared-memory queues and eventfds).
#[derive(Debug, Clone, Serialize)]
pub struct VmmLoop {
    /// Timed groups per point and round (one page each).
    pub groups_per_point: u64,
    /// Groups in flight over all devices, whatever their number.
    pub window: u64,
    /// The points, in growing number of devices; the first is the 1-device point.
    pub points: Vec<VmmLoopPoint>,
}

/// One point of the real-path figure.
#[derive(Debug, Clone, Serialize)]
pub struct RealPathPoint {
    /// Devices sharing the rate.
    pub devices: u64,
    /// Median over the rounds of the groups answered per second of the whole run.
    pub groups_per_s: f64,
    /// Median over the rounds of the p50 round trip, microseconds.
    pub p50_us: f64,
    /// Median over the rounds of the p99 round trip, microseconds.
    pub p99_us: f64,
    /// Median over the rounds of this point's p50 divided by the first point's of the same
    /// round.
    pub p50_vs_first: f64,
    /// The same for the p99.
    pub p99_vs_first: f64,
    /// The same for groups per second (1.0: the rate held).
    pub groups_per_s_vs_first: f64,
}

/// The real path as devices grow: `iopf run` (a host and one VMM process over vfio-user) at a
/// fixed total rate of one-page groups split over more and more devices.
#[derive(Debug, Clone, Serialize)]
pub struct RealPath {
    /// The total rate asked for, all devices together.
    pub groups_per_second: u64,
    /// Seconds each run is scheduled to last.
    pub seconds: f64,
    /// The points, in growing number of devices; ratios are against the first.
    pub points: Vec<RealPathPoint>,
}

/// A target (a bound on a same-run ratio, `docs/PERFORMANCE.md`) and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What the target says.
    pub target: String,
    /// The ratio this run measured.
    pub ratio: f64,
    /// The bound the ratio must respect, as text (`>= 0.70`).
    pub bound: String,
    /// Whether it held.
    pub met: bool,
}

/// The machine and the placement of the two processes.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may run on.
    pub cpus: usize,
    /// `/proc/cpuinfo`'s model name.
    pub cpu_model: String,
    /// The kernel release.
    pub kernel: String,
    /// Whether the two processes were pinned to two CPUs.
    pub pinned: bool,
    /// Where each process ran.
    pub placement: String,
}

/// Everything one run of `iopf bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Rounds per figure.
    pub rounds: u32,
    /// The `--records` size every count derives from.
    pub records: u64,
    /// `--quick` (smoke-test sizes: the figures mean nothing).
    pub quick: bool,
    /// Wall time of the whole run, seconds.
    pub seconds: f64,
    /// The two-process figures.
    pub figures: Vec<Figure>,
    /// Cost per fault as the core's tables grow (`None` if not asked for).
    pub scaling: Option<Scaling>,
    /// The VMM's cost per group as one thread serves more devices (`None` if not asked for).
    pub vmm_loop: Option<VmmLoop>,
    /// `iopf run` at a fixed total rate over more devices (`None` if not asked for).
    pub real_path: Option<RealPath>,
    /// The targets, each a bound on a ratio of this run.
    pub targets: Vec<Target>,
    /// What the figures are and are not.
    pub notes: Vec<String>,
}

fn format_value(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Nanoseconds if v < 10_000.0 => format!("{v:.0} ns"),
        Unit::Nanoseconds if v < 10_000_000.0 => format!("{:.1} us", v / 1e3),
        Unit::Nanoseconds => format!("{:.1} ms", v / 1e6),
        Unit::RecordsPerSecond => format!("{:.2} M rec/s", v / 1e6),
        Unit::GroupsPerSecond => format!("{:.2} M groups/s", v / 1e6),
    }
}

fn format_limit(unit: Unit, ratio: f64) -> String {
    if unit.is_rate() {
        format!("{:.1} % ceiling", ratio * 100.0)
    } else {
        format!("{ratio:.2}x floor")
    }
}

fn format_details(details: &BTreeMap<String, f64>) -> String {
    details
        .iter()
        .map(|(k, v)| {
            if k.ends_with("_ns") {
                format!(
                    "{}={}",
                    k.trim_end_matches("_ns"),
                    format_value(Unit::Nanoseconds, *v)
                )
            } else if *v != 0.0 && v.abs() < 0.01 {
                format!("{k}={v:.2e}")
            } else {
                format!("{k}={v:.3}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Report {
    /// The figure called `name`.
    pub fn figure(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "iopf bench: median of {} rounds, 64-byte records{}; {} s",
            self.rounds,
            if self.quick {
                " (--quick: smoke-test sizes, figures mean nothing)"
            } else {
                ""
            },
            self.seconds.round()
        );
        let _ = writeln!(
            out,
            "machine: {}, {} CPUs, Linux {}; {}",
            m.cpu_model, m.cpus, m.kernel, m.placement
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<11} {:<54} {:>16} {:>16} {:>12}  notes",
            "group", "figure", "median", "vs limit", "vs sockpair"
        );
        for f in &self.figures {
            let line = format!(
                "{:<11} {:<54} {:>16} {:>16} {:>11.3}x  {}",
                f.group,
                f.description,
                format_value(f.unit, f.value),
                format_limit(f.unit, f.vs_limit),
                f.vs_socketpair,
                format_details(&f.details)
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
        if let Some(s) = &self.scaling {
            self.scaling_table(s, &mut out);
        }
        if let Some(v) = &self.vmm_loop {
            Self::vmm_loop_table(v, &mut out);
        }
        if let Some(r) = &self.real_path {
            Self::real_path_table(r, &mut out);
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "targets (ratios from this run):");
        for t in &self.targets {
            let _ = writeln!(
                out,
                "  {:<66} {:>8.3} {:<8} {}",
                t.target,
                t.ratio,
                t.bound,
                if t.ratio.is_nan() {
                    "not measured"
                } else if t.met {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for note in &self.notes {
                let _ = writeln!(out, "note: {note}");
            }
        }
        out
    }

    fn real_path_table(r: &RealPath, out: &mut String) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "real path: `iopf run` (host and one VMM process over vfio-user), {} one-page \
             groups/s in all split over N devices, {:.1} s per run",
            r.groups_per_second, r.seconds
        );
        for p in &r.points {
            let _ = writeln!(
                out,
                "  {:>5} devices  p50 {:>10.0} us x{:<8.2} p99 {:>10.0} us x{:<8.2} \
                 {:>8.0} groups/s x{:.2}",
                p.devices,
                p.p50_us,
                p.p50_vs_first,
                p.p99_us,
                p.p99_vs_first,
                p.groups_per_s,
                p.groups_per_s_vs_first
            );
        }
    }

    fn vmm_loop_table(v: &VmmLoop, out: &mut String) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "vmm event loop: VMM thread CPU ns per one-page group, one thread serving N devices \
             (iopf-vmm EventLoop), {} groups in flight over all devices",
            v.window
        );
        for p in &v.points {
            let _ = writeln!(
                out,
                "  {:>5} devices {:>8.0} ns   x{:<6.2} vs 1 device   per group: wall {:.0} ns, \
                 {:.3} loop rounds, {:.3} kicks",
                p.devices,
                p.ns_per_group,
                p.vs_one_device,
                p.wall_ns_per_group,
                p.loop_rounds_per_group,
                p.kicks_per_group
            );
        }
    }

    fn scaling_table(&self, s: &Scaling, out: &mut String) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "scaling: ns per reported group (2 page requests; {} groups per report_batch), \
             one process, real core, in-process queues and VMM",
            s.groups_per_step
        );
        for series in [&s.devices, &s.pasids, &s.pending] {
            if series.points.iter().all(|p| p.rounds.is_empty()) {
                continue;
            }
            let points = series
                .points
                .iter()
                .map(|p| format!("{}: {:.0}", p.n, p.ns_per_group))
                .collect::<Vec<_>>()
                .join("  ");
            let _ = writeln!(
                out,
                "  {:<8} {points}   max/min {:.2}",
                series.dimension, series.max_over_min
            );
        }
    }
}
