//! What every way of running a host reports: the run's invariants, its report as text, JSON
//! or HTML, the throughput samples behind it, and the VMM child process `run` and the soak start.
//! (`run.rs` and `soak.rs` both use these; neither imports the other's internals.)

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, ensure};
use hdrhistogram::Histogram;
use iopf_endpoint::HostReport;
use serde_json::json;

use crate::stop::{Invariant, Reaper};

/// What a kind of run adds to the report (the soak its findings).
pub(crate) trait ReportExtra: std::fmt::Debug {
    /// Added to the JSON report under its own key.
    fn json(&self) -> serde_json::Value;
    /// Added at the end of the text report.
    fn lines(&self) -> Vec<String>;
}

/// Starts an `iopf vmm` child process for `devices` devices of the host at `socket`.
pub(crate) fn spawn_vmm(
    socket: &Path,
    devices: u32,
    scenario: Option<&Path>,
) -> anyhow::Result<Reaper> {
    let mut command = crate::stop::command(std::env::current_exe()?);
    command
        .args(["vmm", "--devices", &devices.to_string(), "--socket"])
        .arg(socket);
    if let Some(path) = scenario {
        command.arg("--scenario").arg(path);
    }
    Reaper::spawn(command.stdout(Stdio::null())).context("cannot start the VMM process")
}

/// Throughput samples: (seconds since start, groups answered so far).
pub(crate) type Samples = Vec<(f64, u64)>;

/// Throughput samples of a run of any length: past [`Throughput::MAX`] samples, every other one
/// is dropped and the interval doubles, so a soak of hours keeps a few KiB.
#[derive(Debug, Default)]
pub(crate) struct Throughput {
    samples: Samples,
    stride: u64,
    ticks: u64,
}

impl Throughput {
    const MAX: usize = 4096;

    /// Offers a sample; keeps one in `stride`.
    pub(crate) fn push(&mut self, t: f64, answered: u64) {
        if self.samples.is_empty() {
            self.samples.push((0.0, 0));
            self.stride = 1;
        }
        self.ticks += 1;
        if !self.ticks.is_multiple_of(self.stride) {
            return;
        }
        if self.samples.len() >= Self::MAX {
            let kept: Samples = self.samples.iter().step_by(2).copied().collect();
            self.samples = kept;
            self.stride *= 2;
        }
        self.samples.push((t, answered));
    }

    pub(crate) fn samples(&self) -> &Samples {
        &self.samples
    }

    /// The samples kept.
    pub(crate) fn into_samples(self) -> Samples {
        self.samples
    }
}

/// The run's invariants: every group answered exactly once (none left, none answered at a
/// device that had nothing in flight), guest memory holds what DMA wrote, and (unless
/// interrupted) every access ended, none failing silently.
/// A failure is an [`Invariant`] (exit code 3).
pub(crate) fn check(report: &HostReport) -> anyhow::Result<()> {
    let c = &report.core;
    ensure!(
        c.groups == c.answered(),
        Invariant(format!(
            "{} groups left unanswered",
            c.groups - c.answered()
        ))
    );
    for e in &report.engines {
        ensure!(
            e.memory.bytes_mismatched == 0 && e.memory.read_mismatches == 0,
            Invariant(format!(
                "device {}: guest memory differs from what DMA wrote",
                e.device
            ))
        );
        ensure!(
            e.endpoint.unexpected == 0,
            Invariant(format!(
                "device {}: responses for no group in flight",
                e.device
            ))
        );
        if crate::stop::requested() {
            // Interrupted: accesses were still in flight when the device stopped.
            continue;
        }
        // No silent failure: every access ended, and each failure has its reason.
        let p = &e.endpoint;
        let ended = p.completed
            + p.failed_invalid
            + p.failed_no_pri
            + p.failed_retries
            + p.failed_too_large
            + p.failed_halted
            + p.failed_stage2;
        ensure!(
            p.accesses == ended,
            Invariant(format!(
                "device {}: {} of {} accesses neither completed nor failed for a reason",
                e.device,
                p.accesses.abs_diff(ended),
                p.accesses
            ))
        );
        // An access failed by `Invalid` only if someone refused a group of this device: its
        // guest, or the host answering for it.
        let refused = report
            .devices
            .iter()
            .find(|d| d.device == e.device)
            .map_or(0, |d| d.core.answered() - d.core.responses.guest.success);
        ensure!(
            p.failed_invalid == 0 || refused > 0,
            Invariant(format!(
                "device {}: {} accesses failed, but no group of it was refused",
                e.device, p.failed_invalid
            ))
        );
        ensure!(
            e.errors == 0,
            "device {}: {} steps of the device engine failed (logged above)",
            e.device,
            e.errors
        );
        // A group answered Success whose pages stay unmapped: the guest said yes and did not
        // map (a silent failure, not a refusal).
        ensure!(
            e.endpoint.failed_retries == 0,
            "device {}: {} accesses failed although their page requests were answered Success",
            e.device,
            e.endpoint.failed_retries
        );
    }
    Ok(())
}

/// How [`print_report`] prints a run's report, and what it adds to it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ReportOptions<'a> {
    /// JSON on stdout instead of text.
    pub(crate) json: bool,
    /// VMM restarts the run's chaos made.
    pub(crate) restarts: u32,
    /// Also write `report.html` into this directory.
    pub(crate) html: Option<&'a Path>,
    /// The soak's findings, for `iopf run --duration`.
    pub(crate) soak: Option<&'a dyn ReportExtra>,
}

/// Prints the report of a run (text or JSON), and writes its HTML report if asked.
pub(crate) fn print_report(
    (report, elapsed): &(HostReport, Duration),
    samples: &Samples,
    options: ReportOptions<'_>,
) -> anyhow::Result<()> {
    let ReportOptions {
        json: as_json,
        restarts,
        html,
        soak,
    } = options;
    let c = &report.core;
    let a = &c.responses.auto;
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut accesses, mut completed, mut failed, mut written, mut verified, mut mismatched) =
        (0, 0, 0, 0, 0, 0);
    // Accesses still in flight when an interrupt stopped the devices (0 otherwise).
    let mut not_ended = 0;
    for e in &report.engines {
        latency.add(&e.latency)?;
        accesses += e.endpoint.accesses;
        completed += e.endpoint.completed;
        let p = &e.endpoint;
        let ended_failed = p.failed_invalid
            + p.failed_no_pri
            + p.failed_retries
            + p.failed_too_large
            + p.failed_halted
            + p.failed_stage2;
        let open = p.accesses.saturating_sub(p.completed + ended_failed);
        not_ended += open;
        failed += p.accesses - p.completed - open;
        written += e.endpoint.bytes_written;
        verified += e.memory.bytes_verified;
        mismatched += e.memory.bytes_mismatched;
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let interrupted = crate::stop::signal();
    let q = |x: f64| latency.value_at_quantile(x) as f64 / 1000.0;
    if let Some(dir) = html {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("report.html");
        std::fs::write(&path, crate::report::html(report, &latency, samples, secs)?)?;
        eprintln!("report: {}", path.display());
    }
    if as_json {
        let mut value = json!({
            "elapsed_s": secs,
            "accesses": accesses, "completed": completed, "failed": failed, "not_ended": not_ended,
            "page_requests": c.page_requests, "unrecoverable": c.unrecoverable, "groups": c.groups,
            "unanswered_groups": c.groups - c.answered(),
            "core": c,
            "dma_bytes_written": written, "dma_bytes_verified": verified, "dma_bytes_mismatched": mismatched,
            "latency_us": { "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": latency.max() as f64 / 1000.0, "samples": latency.len() },
            "groups_per_s": c.groups as f64 / secs,
            "disconnects": report.disconnects,
            // Per device: the fault core's counters and the endpoint's (crates/cli/tests/hostile_vmm.rs).
            "devices": report.devices, "engines": report.engines,
            "vmm_restarts": restarts,
            // Stopped by SIGINT or SIGTERM: a partial run (exit code 130 or 143).
            "interrupted": interrupted.is_some(),
            "signal": interrupted,
        });
        if let Some(soak) = soak {
            value["soak"] = soak.json();
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "iopf run: {} devices over vfio-user, {:.2} s, {restarts} VMM restarts{}",
        report.engines.len(),
        secs,
        interrupted.map_or(String::new(), |signal| format!(
            "; INTERRUPTED by {signal}: partial"
        ))
    );
    println!(
        "  DMA accesses      {accesses:>10}: {completed} completed, {failed} failed{}",
        if not_ended > 0 {
            format!(", {not_ended} not ended (interrupted)")
        } else {
            String::new()
        }
    );
    println!(
        "  page requests     {:>10} in {} groups; {} unrecoverable faults ({} lost)",
        c.page_requests, c.groups, c.unrecoverable, c.lost
    );
    println!(
        "  guest answered    {:>10} success, {} invalid",
        c.responses.guest.success, c.responses.guest.invalid
    );
    println!(
        "  host answered     {:>10} itself: {} queue full, {} not attached, {} no handler, {} VMM gone, {} unregister, {} timeout, {} reset",
        c.answered()
            - c.responses.guest.success
            - c.responses.guest.invalid
            - c.responses.guest.failure,
        a.queue_full,
        a.not_attached,
        a.no_handler,
        a.vmm_gone,
        a.unregister,
        a.timeout,
        a.reset
    );
    println!(
        "  refused           {:>10} (unknown or stale cookie {}, mismatch {}, malformed {})",
        c.refused_total(),
        c.refused.unknown_cookie,
        c.refused.mismatch,
        c.refused.malformed + c.refused.bad_version
    );
    println!("  unanswered groups {:>10}", c.groups - c.answered());
    println!(
        "  DMA bytes         {written:>10} written, {verified} verified in guest memory, {mismatched} differ"
    );
    println!(
        "  round trip        p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us ({} groups)",
        q(0.5),
        q(0.99),
        q(0.999),
        latency.max() as f64 / 1000.0,
        latency.len()
    );
    println!(
        "  throughput        {:.0} groups/s, {:.0} page requests/s",
        c.groups as f64 / secs,
        c.page_requests as f64 / secs
    );
    for line in soak.iter().flat_map(|s| s.lines()) {
        println!("{line}");
    }
    Ok(())
}
