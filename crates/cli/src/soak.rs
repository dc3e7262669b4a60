//! `iopf run --duration D`: the soak. The host and a VMM run the scenario's workload in rounds
//! for `D` with chaos repeating (VMM kill and restart, host-side unregister), while the resident
//! memory and the open fds of the host (this process) and of the current VMM process are
//! sampled at a fixed interval. The verdict: after a warm-up, neither grows.
//!
//! The timeline of a soak of length `D`:
//!
//! ```text
//! | warm-up W | baseline window Q | soak (chaos)          | final window Q |
//! 0           W                   W+Q                     D-Q              D  then drain
//!   chaos        no chaos             chaos                  no chaos
//! ```
//!
//! with `W = clamp(D/5, 1 s, 60 s)` and `Q = clamp(D/20, 1 s, 30 s)`. Chaos runs in the
//! warm-up too, so every path (restart, unregister, reattach) has run at least once and every
//! lazily grown structure has reached its size before the baseline is taken. Both windows are
//! measured in the same conditions: no chaos, and a sample counts only while every device has
//! an attached consumer and no VMM restart is under way ("steady"). Of a window's steady
//! samples, each figure's minimum is kept (its floor): a transient (a connection being set up,
//! a burst of faults after a restart) only ever adds to a figure, while a leak raises its floor
//! for good. See [`judge`] for the rule and `docs/RELIABILITY.md` for why these numbers.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use iopf_endpoint::{Host, HostReport};
use serde::Serialize;
use serde_json::json;

use crate::outcome::{ReportExtra, ReportOptions, Throughput, check, print_report, spawn_vmm};
use crate::scenario::{ChaosClock, RunChaos, Scenario};
use crate::stop::{Invariant, Reaper};

/// Parses a duration such as `30s`, `10m`, `1h`, `1h30m` or `500ms`: one or more whole
/// numbers, each followed by a unit (`ms`, `s`, `m`, `h`, `d`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let err = |why: &str| {
        format!("invalid duration {text:?}: {why} (examples: 30s, 10m, 1h, 1h30m, 500ms)")
    };
    let mut total: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(err("empty"));
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| err("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let ms_per_unit: u64 = match rest[..unit_len].trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(err("missing unit")),
            other => return Err(err(&format!("unknown unit {other:?}"))),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(ms_per_unit)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| err("too long"))?;
    }
    if total == 0 {
        return Err(err("must be longer than 0"));
    }
    Ok(Duration::from_millis(total))
}

/// The soak's options (from `iopf run`).
#[derive(Debug, Clone, Copy)]
pub struct SoakOptions {
    /// How long the workload runs.
    pub duration: Duration,
    /// Period of the built-in chaos (when the scenario has none).
    pub chaos_every: Option<Duration>,
    /// Sampling interval.
    pub sample_every: Option<Duration>,
}

/// Where in the soak a moment falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Chaos, not measured.
    WarmUp,
    /// No chaos; the floors the end is compared with.
    Baseline,
    /// Chaos.
    Soak,
    /// No chaos; the floors compared with the baseline.
    Final,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::WarmUp => "warm-up",
            Phase::Baseline => "baseline",
            Phase::Soak => "soak",
            Phase::Final => "final",
        }
    }
}

/// The soak's timeline (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeline {
    /// Warm-up length.
    pub warmup: Duration,
    /// Length of each measuring window.
    pub window: Duration,
    /// The whole soak.
    pub duration: Duration,
}

impl Timeline {
    /// The timeline of a soak of `duration` (at least 5 s).
    pub fn new(duration: Duration) -> Self {
        Self {
            warmup: (duration / 5).clamp(Duration::from_secs(1), Duration::from_secs(60)),
            window: (duration / 20).clamp(Duration::from_secs(1), Duration::from_secs(30)),
            duration,
        }
    }

    /// The phase at `t`.
    pub fn phase(&self, t: Duration) -> Phase {
        if t < self.warmup {
            Phase::WarmUp
        } else if t < self.warmup + self.window {
            Phase::Baseline
        } else if t + self.window < self.duration {
            Phase::Soak
        } else {
            Phase::Final
        }
    }
}

/// One sample of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `RssAnon` (heap, stacks: where a leak of allocations lives), KiB.
    pub rss_anon_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

impl Sample {
    /// Reads `/proc/PID/status` and `/proc/PID/fd`.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        // Listing our own fds opens one more (the directory's); every sample counts it alike.
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        Ok(Self {
            rss_kib: field("VmRSS:"),
            rss_anon_kib: field("RssAnon:"),
            fds,
        })
    }

    fn min(self, o: Self) -> Self {
        Self {
            rss_kib: self.rss_kib.min(o.rss_kib),
            rss_anon_kib: self.rss_anon_kib.min(o.rss_anon_kib),
            fds: self.fds.min(o.fds),
        }
    }

    fn max(self, o: Self) -> Self {
        Self {
            rss_kib: self.rss_kib.max(o.rss_kib),
            rss_anon_kib: self.rss_anon_kib.max(o.rss_anon_kib),
            fds: self.fds.max(o.fds),
        }
    }
}

/// What is kept of one process's samples: a fixed size, however long the soak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Series {
    /// Samples taken.
    pub samples: u64,
    /// The first.
    pub first: Option<Sample>,
    /// Each figure's floor over the baseline window's steady samples ("after warm-up").
    pub after_warmup: Option<Sample>,
    /// Each figure's maximum over all samples.
    pub max: Option<Sample>,
    /// Each figure's floor over the final window's steady samples.
    pub end: Option<Sample>,
    /// The last.
    pub last: Option<Sample>,
}

impl Series {
    /// Adds a sample taken in `phase`; `steady` when every device was attached and no restart
    /// was under way.
    pub fn add(&mut self, s: Sample, phase: Phase, steady: bool) {
        self.samples += 1;
        self.first.get_or_insert(s);
        self.max = Some(self.max.map_or(s, |m| m.max(s)));
        self.last = Some(s);
        let floor = match (phase, steady) {
            (Phase::Baseline, true) => &mut self.after_warmup,
            (Phase::Final, true) => &mut self.end,
            _ => return,
        };
        *floor = Some(floor.map_or(s, |f| f.min(s)));
    }
}

/// Memory growth from the baseline floor to the final floor that the soak tolerates:
/// 8 MiB, or 10 % of the baseline if that is more (KiB).
pub fn memory_bound_kib(baseline_kib: u64) -> u64 {
    (8 * 1024).max(baseline_kib / 10)
}

/// The flatness rule, for process `name`: both windows have a steady sample; the final fd
/// floor is at most the baseline's (a leak of one fd per restart, per unregister or per
/// connection raises it by at least one); and `RssAnon` and `VmRSS` grow by at most
/// [`memory_bound_kib`] of their baseline. Returns the failures, empty when flat.
pub fn judge(name: &str, series: &Series) -> Vec<String> {
    let (Some(b), Some(e)) = (series.after_warmup, series.end) else {
        return vec![format!(
            "{name}: no steady sample in the {} window (were all devices ever attached at once?)",
            if series.after_warmup.is_none() {
                "baseline"
            } else {
                "final"
            }
        )];
    };
    let mut failures = Vec::new();
    if e.fds > b.fds {
        failures.push(format!(
            "{name}: {} more open fds at the end than after warm-up ({} -> {})",
            e.fds - b.fds,
            b.fds,
            e.fds
        ));
    }
    for (what, before, after) in [
        ("RssAnon", b.rss_anon_kib, e.rss_anon_kib),
        ("VmRSS", b.rss_kib, e.rss_kib),
    ] {
        let bound = memory_bound_kib(before);
        if after.saturating_sub(before) > bound {
            failures.push(format!(
                "{name}: {what} grew by {} KiB from warm-up to the end ({before} -> {after} KiB), more than the {bound} KiB allowed",
                after - before
            ));
        }
    }
    failures
}

/// What the soak did and found.
#[derive(Debug, Clone)]
pub struct SoakSummary {
    timeline: Timeline,
    sample_every: Duration,
    chaos_every: Option<Duration>,
    restarts: u32,
    unregisters: u32,
    /// Chaos events between the two windows.
    chaos_between: (u32, u32),
    groups: u64,
    groups_between: u64,
    host: Series,
    vmm: Series,
    failures: Vec<String>,
    /// Stopped by a signal before its end: no verdict on memory and fds.
    interrupted: bool,
    /// How long it ran.
    elapsed: Duration,
}

impl ReportExtra for SoakSummary {
    fn json(&self) -> serde_json::Value {
        SoakSummary::json(self)
    }
    fn lines(&self) -> Vec<String> {
        SoakSummary::lines(self)
    }
}

impl SoakSummary {
    /// Whether memory and fds stayed flat and the run's checks passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The smallest leak per answered group the memory bound would catch.
    fn detectable_bytes_per_group(&self) -> Option<u64> {
        let bound = memory_bound_kib(self.host.after_warmup?.rss_anon_kib) * 1024;
        (self.groups_between > 0).then(|| bound.div_ceil(self.groups_between))
    }

    /// The `soak` object of `--json`.
    pub fn json(&self) -> serde_json::Value {
        let t = &self.timeline;
        json!({
            "duration_s": t.duration.as_secs_f64(),
            "warmup_s": t.warmup.as_secs_f64(),
            "window_s": t.window.as_secs_f64(),
            "sample_every_s": self.sample_every.as_secs_f64(),
            "chaos_every_s": self.chaos_every.map(|d| d.as_secs_f64()),
            "vmm_restarts": self.restarts,
            "unregisters": self.unregisters,
            "between_windows": {
                "vmm_restarts": self.chaos_between.0,
                "unregisters": self.chaos_between.1,
                "groups": self.groups_between,
            },
            "groups": self.groups,
            "host": self.host,
            "vmm": self.vmm,
            "criterion": {
                "fds": "end floor <= after-warm-up floor",
                "memory": "RssAnon and VmRSS: end floor - after-warm-up floor <= max(8 MiB, 10% of after-warm-up floor)",
                "host_memory_bound_kib": self.host.after_warmup.map(|s| memory_bound_kib(s.rss_anon_kib)),
                "detectable_leak_bytes_per_group": self.detectable_bytes_per_group(),
            },
            "verdict": if self.interrupted { "interrupted" } else if self.passed() { "pass" } else { "fail" },
            "interrupted": self.interrupted,
            "failures": self.failures,
        })
    }

    /// The lines the text summary adds.
    pub fn lines(&self) -> Vec<String> {
        let t = &self.timeline;
        let fmt = |s: Option<Sample>| {
            s.map_or("-".into(), |s| {
                format!(
                    "{:>4} fds {:>7.1} MiB RSS {:>7.1} MiB anon",
                    s.fds,
                    s.rss_kib as f64 / 1024.0,
                    s.rss_anon_kib as f64 / 1024.0
                )
            })
        };
        let mut lines = vec![format!(
            "  soak              {:.0} s (warm-up {:.0} s, windows {:.0} s, a sample every {:.2} s): {} groups, {} VMM restarts, {} unregisters ({} and {} between the windows, {} groups)",
            t.duration.as_secs_f64(),
            t.warmup.as_secs_f64(),
            t.window.as_secs_f64(),
            self.sample_every.as_secs_f64(),
            self.groups,
            self.restarts,
            self.unregisters,
            self.chaos_between.0,
            self.chaos_between.1,
            self.groups_between,
        )];
        for (name, s) in [("host", &self.host), ("VMM", &self.vmm)] {
            lines.push(format!("  {name:<4} first       {}", fmt(s.first)));
            lines.push(format!("       after warm-up {}", fmt(s.after_warmup)));
            lines.push(format!("       max         {}", fmt(s.max)));
            lines.push(format!("       end         {}", fmt(s.end)));
            lines.push(format!("       last        {}", fmt(s.last)));
        }
        if let Some(bytes) = self.detectable_bytes_per_group() {
            lines.push(format!(
                "  leak check        catches 1 fd per restart or unregister, and {bytes} bytes per group"
            ));
        }
        lines.push(if self.interrupted {
            format!(
                "  verdict           interrupted after {:.0} s: no verdict on memory and fds",
                self.elapsed.as_secs_f64()
            )
        } else if self.passed() {
            "  verdict           pass: memory and fds flat".to_string()
        } else {
            format!("  verdict           FAIL: {}", self.failures.join("; "))
        });
        lines
    }
}

/// Runs the soak (`iopf run --duration`), prints the report, and fails if anything leaked.
pub fn soak(
    mut scenario: Scenario,
    file: Option<&Path>,
    options: SoakOptions,
    as_json: bool,
    html: Option<&Path>,
) -> anyhow::Result<()> {
    let plan = Plan::new(&mut scenario, options)?;
    // Removed however the soak ends (dropped last: after the VMM is stopped).
    let dir = tempfile::Builder::new()
        .prefix("iopf-soak-")
        .tempdir()
        .context("create the socket directory")?;
    let socket = dir.path().join("host.sock");
    let mut run = SoakRun::start(&scenario, &plan, socket, file, !as_json)?;
    run.drive(&plan)?;
    run.drain(scenario.response_timeout_ms)?;
    let (report, throughput, summary) = run.collect(plan)?;
    print_report(
        &(report, summary.elapsed),
        throughput.samples(),
        ReportOptions {
            json: as_json,
            restarts: summary.restarts,
            html,
            soak: Some(&summary),
        },
    )?;
    ensure!(
        summary.passed(),
        Invariant(format!("soak failed: {}", summary.failures.join("; ")))
    );
    Ok(())
}

/// The soak's timeline, sampling interval and built-in chaos, checked.
struct Plan {
    timeline: Timeline,
    sample_every: Duration,
    /// Period of the built-in chaos (`None`: the scenario's own).
    chaos_every: Option<Duration>,
}

impl Plan {
    /// Checks the options against the timeline of a soak of their duration, and gives the
    /// scenario the built-in chaos when it has none of its own.
    fn new(scenario: &mut Scenario, options: SoakOptions) -> anyhow::Result<Self> {
        let d = options.duration;
        ensure!(
            d >= Duration::from_secs(5) && d <= Duration::from_secs(7 * 86_400),
            "--duration must be 5s..=7d: a soak needs a warm-up, two measuring windows and chaos in between"
        );
        let timeline = Timeline::new(d);
        let sample_every = options
            .sample_every
            .unwrap_or_else(|| (timeline.window / 5).min(Duration::from_secs(1)));
        ensure!(
            sample_every >= Duration::from_millis(20) && sample_every * 3 <= timeline.window,
            "--sample-every must be at least 20ms and give 3 samples per measuring window ({:?})",
            timeline.window
        );
        let chaos_every = if scenario.chaos.is_empty() {
            let every = options.chaos_every.unwrap_or(Duration::from_secs(5));
            ensure!(
                every >= Duration::from_millis(200),
                "--chaos-every must be at least 200ms"
            );
            scenario.chaos = scenario.soak_chaos(every);
            Some(every)
        } else {
            ensure!(
                options.chaos_every.is_none(),
                "--chaos-every sets the built-in chaos, but the scenario has its own [[chaos]] (use every_ms there)"
            );
            None
        };
        Ok(Self {
            timeline,
            sample_every,
            chaos_every,
        })
    }
}

/// A soak under way: the host, the current VMM process, and what the soak has counted.
struct SoakRun<'a> {
    /// The current VMM process (declared first: dropped, so stopped, before the host).
    vmm: Reaper,
    host: Host,
    socket: PathBuf,
    devices: u32,
    /// The scenario file, passed on to each VMM process.
    file: Option<&'a Path>,
    chaos: ChaosClock,
    progress: Option<indicatif::ProgressBar>,
    started: Instant,
    /// When the VMM killed by chaos comes back (ms since the start).
    restart_at: Option<u64>,
    host_series: Series,
    vmm_series: Series,
    throughput: Throughput,
    restarts: u32,
    unregisters: u32,
    /// Chaos events (restarts, unregisters) between the two windows.
    between: (u32, u32),
    groups_at_baseline: Option<u64>,
    groups_at_final: Option<u64>,
}

impl<'a> SoakRun<'a> {
    /// Starts the host on `socket` and the first VMM process; `bar`: show a progress bar.
    fn start(
        scenario: &Scenario,
        plan: &Plan,
        socket: PathBuf,
        file: Option<&'a Path>,
        bar: bool,
    ) -> anyhow::Result<Self> {
        let devices = scenario.device_count();
        let mut config = scenario.host_config();
        config.repeat = true;
        let host = Host::bind(config, &socket).context("cannot start the host")?;
        let vmm = spawn_vmm(&socket, devices, file)?;
        let chaos = ChaosClock::new(&scenario.chaos);
        let progress = bar.then(|| {
            let p = indicatif::ProgressBar::new(plan.timeline.duration.as_secs().max(1));
            p.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} s soak {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            p
        });
        Ok(Self {
            vmm,
            host,
            socket,
            devices,
            file,
            chaos,
            progress,
            started: Instant::now(),
            restart_at: None,
            host_series: Series::default(),
            vmm_series: Series::default(),
            throughput: Throughput::default(),
            restarts: 0,
            unregisters: 0,
            between: (0, 0),
            groups_at_baseline: None,
            groups_at_final: None,
        })
    }
    /// Groups answered so far, over all devices.
    fn answered(&self) -> u64 {
        self.host
            .progress()
            .iter()
            .map(|p| p.groups_answered.load(Relaxed))
            .sum()
    }

    /// The soak proper, every 20 ms until its duration is over or a stop signal comes:
    /// throughput, chaos, and a sample every `plan.sample_every`.
    fn drive(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let own_pid = std::process::id();
        let mut next_sample = Duration::ZERO;
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let t = self.started.elapsed();
            // A stop signal ends the soak like its duration does (never as chaos).
            if t >= plan.timeline.duration || crate::stop::requested() {
                return Ok(());
            }
            let ms = t.as_millis() as u64;
            let phase = plan.timeline.phase(t);
            let groups = self.answered();
            self.throughput.push(t.as_secs_f64(), groups);
            if phase == Phase::Soak {
                self.groups_at_baseline.get_or_insert(groups);
            }
            if phase == Phase::Final {
                self.groups_at_final.get_or_insert(groups);
            }
            self.run_chaos(ms, phase)?;
            if t >= next_sample {
                next_sample += plan.sample_every;
                self.sample(own_pid, phase, groups)?;
            }
            if let Some(p) = &self.progress {
                p.set_position(t.as_secs());
            }
        }
    }

    /// Runs the chaos due at `ms` (none in the measuring windows), brings the killed VMM back
    /// when its down time is over, and fails if the VMM exited on its own.
    fn run_chaos(&mut self, ms: u64, phase: Phase) -> anyhow::Result<()> {
        let quiet = matches!(phase, Phase::Baseline | Phase::Final);
        for event in self.chaos.due(ms, quiet) {
            match event {
                RunChaos::VmmRestart { down_ms } => {
                    if self.restart_at.is_none() {
                        // SIGKILL: no goodbye; the host sees the VMM's sockets close.
                        self.vmm.kill().context("kill the VMM process")?;
                        self.restart_at = Some(ms + down_ms);
                    }
                }
                RunChaos::Unregister { device, down_ms } => {
                    self.host
                        .unregister_for(device, Duration::from_millis(down_ms));
                    self.unregisters += 1;
                    if phase == Phase::Soak {
                        self.between.1 += 1;
                    }
                }
            }
        }
        if let Some(at) = self.restart_at
            && ms >= at
        {
            self.vmm = spawn_vmm(&self.socket, self.devices, self.file)?;
            self.restart_at = None;
            self.restarts += 1;
            if phase == Phase::Soak {
                self.between.0 += 1;
            }
        }
        if self.restart_at.is_none()
            && let Some(status) = self.vmm.try_wait()?
            && !crate::stop::requested()
        {
            bail!("the VMM process exited during the soak: {status}");
        }
        Ok(())
    }

    /// Samples the host and (unless it is down) the VMM, and shows the figures on the bar.
    fn sample(&mut self, own_pid: u32, phase: Phase, groups: u64) -> anyhow::Result<()> {
        let steady = self.restart_at.is_none() && self.host.all_attached();
        let own = Sample::of(own_pid).context("cannot sample this process")?;
        self.host_series.add(own, phase, steady);
        if self.restart_at.is_none()
            && let Ok(s) = Sample::of(self.vmm.id())
        {
            self.vmm_series.add(s, phase, steady);
        }
        if let Some(p) = &self.progress {
            p.set_message(format!(
                "{}: {groups} groups, {} VMM restarts, {} unregisters; host {} fds, {:.1} MiB",
                phase.name(),
                self.restarts,
                self.unregisters,
                own.fds,
                own.rss_kib as f64 / 1024.0
            ));
        }
        Ok(())
    }

    /// The end: no new accesses; the devices finish what is in flight (interrupted, the host
    /// answers what is pending instead).
    fn drain(&mut self, response_timeout_ms: u64) -> anyhow::Result<()> {
        self.host.drain();
        let deadline =
            Instant::now() + Duration::from_millis(response_timeout_ms) + Duration::from_secs(30);
        while !self.host.finished() {
            if crate::stop::requested() {
                // Interrupted: no waiting for the devices; `finish` answers what is pending.
                self.host.interrupt();
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the devices did not finish their accesses in flight after the soak"
            );
            if let Some(status) = self.vmm.try_wait()? {
                bail!("the VMM process exited while the devices drained: {status}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Finishes the host and the VMM, checks the run's invariants and judges the samples.
    fn collect(self, plan: Plan) -> anyhow::Result<(HostReport, Throughput, SoakSummary)> {
        let Self {
            mut vmm,
            host,
            progress,
            started,
            host_series,
            vmm_series,
            throughput,
            restarts,
            unregisters,
            between,
            groups_at_baseline,
            groups_at_final,
            ..
        } = self;
        let interrupted = crate::stop::requested();
        if let Some(p) = &progress {
            p.finish_and_clear();
        }
        let elapsed = started.elapsed();
        let pending = host.pending_groups();
        let report = host.finish();
        check(&report)?;
        if interrupted {
            // Told to leave (its devices unregistered) or signalled too: its status says nothing.
            vmm.stop().context("stop the VMM process")?;
        } else {
            ensure!(
                pending == 0,
                Invariant(format!(
                    "{pending} groups still pending after the devices drained"
                ))
            );
            let status = vmm.wait()?;
            ensure!(status.success(), "the VMM process failed: {status}");
        }

        let mut failures = Vec::new();
        if !interrupted {
            failures.extend(judge("host", &host_series));
            failures.extend(judge("VMM", &vmm_series));
        }
        if !interrupted && plan.chaos_every.is_some() && between == (0, 0) {
            failures.push(
                "no chaos event between the measuring windows: the check proves nothing".into(),
            );
        }
        let summary = SoakSummary {
            timeline: plan.timeline,
            sample_every: plan.sample_every,
            chaos_every: plan.chaos_every,
            restarts,
            unregisters,
            chaos_between: between,
            groups: report.core.groups,
            groups_between: groups_at_final
                .zip(groups_at_baseline)
                .map_or(0, |(f, b)| f - b),
            host: host_series,
            vmm: vmm_series,
            failures,
            interrupted,
            elapsed,
        };
        Ok((report, throughput, summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024;

    fn s(fds: u64, anon_mib: u64) -> Sample {
        Sample {
            rss_kib: 40 * MIB + anon_mib * MIB,
            rss_anon_kib: anon_mib * MIB,
            fds,
        }
    }

    /// Feeds a soak's worth of synthetic samples, one per second for 600 s, with a restart
    /// every 5 s: each restart adds a transient of 3 fds and 2 MiB for one sample, and
    /// `leak(restarts so far)` adds (extra fds, extra KiB).
    fn soak(leak: impl Fn(u64) -> (u64, u64)) -> Series {
        let timeline = Timeline::new(Duration::from_secs(600));
        let mut series = Series::default();
        for t in 0..600u64 {
            let phase = timeline.phase(Duration::from_secs(t));
            let restarts = t / 5;
            let transient = t % 5 == 0;
            let (fds, kib) = leak(restarts);
            let mut sample = s(20 + fds, 30);
            sample.rss_anon_kib += kib;
            sample.rss_kib += kib;
            if transient {
                sample.fds += 3;
                sample.rss_anon_kib += 2 * MIB;
            }
            // A transient also shows in steady samples (a burst of faults after a restart).
            series.add(sample, phase, t % 7 != 3);
        }
        series
    }

    #[test]
    fn flat_samples_with_transients_pass() {
        let series = soak(|_| (0, 0));
        assert_eq!(judge("host", &series), Vec::<String>::new(), "{series:?}");
        assert_eq!(series.max.unwrap().fds, 23);
    }

    #[test]
    fn one_fd_per_restart_fails() {
        let series = soak(|restarts| (restarts, 0));
        let failures = judge("host", &series);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("more open fds"), "{failures:?}");
    }

    #[test]
    fn a_single_leaked_fd_fails() {
        let series = soak(|restarts| (u64::from(restarts > 60), 0));
        assert_eq!(judge("host", &series).len(), 1);
    }

    #[test]
    fn a_few_hundred_bytes_per_group_fails() {
        // 300 bytes per group at 500 groups/s (the real soak answers more), from t = 0.
        let series = soak(|restarts| (0, restarts * 5 * 500 * 300 / 1024));
        let failures = judge("host", &series);
        assert!(
            failures.iter().any(|f| f.contains("RssAnon grew")),
            "{failures:?}"
        );
    }

    #[test]
    fn growth_under_the_bound_passes_and_the_bound_scales() {
        assert_eq!(memory_bound_kib(30 * MIB), 8 * MIB);
        assert_eq!(memory_bound_kib(1000 * MIB), 100 * MIB);
        // 4 MiB of allocator growth in all, reached early: tolerated.
        let series = soak(|restarts| (0, restarts.min(8) * MIB / 2));
        assert!(judge("host", &series).is_empty());
    }

    #[test]
    fn no_steady_sample_in_a_window_fails() {
        let timeline = Timeline::new(Duration::from_secs(600));
        let mut series = Series::default();
        for t in 0..600u64 {
            let phase = timeline.phase(Duration::from_secs(t));
            series.add(s(20, 30), phase, phase != Phase::Final);
        }
        let failures = judge("VMM", &series);
        assert!(failures[0].contains("final window"), "{failures:?}");
    }

    #[test]
    fn timeline_phases() {
        let t = Timeline::new(Duration::from_secs(600));
        assert_eq!(
            (t.warmup, t.window),
            (Duration::from_secs(60), Duration::from_secs(30))
        );
        let p = |s| t.phase(Duration::from_secs(s));
        assert_eq!(
            [p(0), p(59), p(60), p(89), p(90), p(569), p(570), p(599)],
            [
                Phase::WarmUp,
                Phase::WarmUp,
                Phase::Baseline,
                Phase::Baseline,
                Phase::Soak,
                Phase::Soak,
                Phase::Final,
                Phase::Final
            ]
        );
        let short = Timeline::new(Duration::from_secs(8));
        assert_eq!(short.window, Duration::from_secs(1));
        assert_eq!(short.warmup, Duration::from_millis(1600));
    }

    #[test]
    fn durations_parse_like_humantime() {
        let ok = |t: &str| parse_duration(t).unwrap();
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("10m"), Duration::from_secs(600));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("2d"), Duration::from_secs(172_800));
        for (bad, why) in [
            ("", "empty"),
            ("10", "missing unit"),
            ("10x", "unknown unit"),
            ("m", "expected a number"),
            ("0s", "longer than 0"),
            ("99999999999999999999h", "too large"),
            ("9999999999999999h", "too long"),
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(why) && e.contains("examples"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_sample_reader_reads_this_process() {
        let s = Sample::of(std::process::id()).unwrap();
        assert!(s.fds >= 3 && s.rss_kib > 0 && s.rss_anon_kib > 0, "{s:?}");
    }
}
