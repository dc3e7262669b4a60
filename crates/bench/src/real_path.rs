//! The real path as devices grow: `iopf run` (a host and one VMM process over vfio-user, the
//! host's reactor serving every device) at a fixed total page request rate split over N
//! devices. Each device has one sequential stream of 4 KiB writes, every access a new page, so
//! one one-page group per access; the total rate and the run's length are the same at every
//! point, so only the number of devices changes.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::child::{Reaper, command};
use crate::error::{BenchError, Result};

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    /// Groups answered per second of the whole run (start-up included).
    pub groups_per_s: f64,
    /// Round trip percentiles, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The longest one run may take before it counts as stalled.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The scenario of one point: `devices` devices sharing `rate` groups per second for `secs`.
fn scenario(devices: u64, rate: u64, secs: f64) -> String {
    let accesses = ((rate as f64 * secs) as u64 / devices).max(1);
    let interval_us = (devices * 1_000_000 / rate.max(1)).max(1);
    let pages = (accesses + 256).max(256);
    format!(
        "seed = 5\nring_entries = 256\nresponse_timeout_ms = 10000\n\
         [guest]\nlatency_us = [2, 20]\nrefuse_rate = 0.0\npages = {pages}\n\
         [[device]]\ncount = {devices}\nallocation = 64\n\
         [[device.stream]]\npasid = 1\npattern = \"sequential\"\npages = {accesses}\n\
         access_len = 4096\nwrite = true\naccesses = {accesses}\ninterval_us = {interval_us}\n"
    )
}

/// Runs `program run --scenario ... --json` for one point and reads its report.
pub(crate) fn measure(
    program: &Path,
    devices: u64,
    rate: u64,
    secs: f64,
    stop: &AtomicBool,
) -> Result<Point> {
    let dir = tempfile::Builder::new()
        .prefix("iopf-bench-real-path-")
        .tempdir()
        .map_err(BenchError::io("create the scenario's directory"))?;
    let file = dir.path().join("scenario.toml");
    std::fs::write(&file, scenario(devices, rate, secs))
        .map_err(BenchError::io("write the scenario"))?;
    // The report goes to a file: a report of many devices is larger than a pipe holds.
    let out_path = dir.path().join("report.json");
    let out = std::fs::File::create(&out_path).map_err(BenchError::io("create the report file"))?;
    let started = Instant::now();
    let mut child = Reaper::spawn(
        command(program)
            .arg("run")
            .arg("--scenario")
            .arg(&file)
            .arg("--json")
            .stdout(Stdio::from(out))
            .stderr(Stdio::null()),
    )
    .map_err(BenchError::io("start `iopf run`"))?;
    let status = loop {
        if stop.load(Ordering::Relaxed) {
            return Err(BenchError::Interrupted);
        }
        if let Some(status) = child
            .try_wait()
            .map_err(BenchError::io("wait for `iopf run`"))?
        {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            return Err(BenchError::Timeout("`iopf run` of the real-path figure"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&out_path)
        .map_err(BenchError::io("read the report of `iopf run`"))?;
    if !status.success() {
        return Err(BenchError::Invalid(format!(
            "`iopf run` with {devices} devices failed: {status}"
        )));
    }
    let report: serde_json::Value = serde_json::from_str(&text)?;
    let number = |v: &serde_json::Value, what: &str| {
        v.as_f64()
            .ok_or_else(|| BenchError::Invalid(format!("`iopf run` reported no {what}")))
    };
    if report["unanswered_groups"].as_u64() != Some(0) {
        return Err(BenchError::Invalid(format!(
            "`iopf run` with {devices} devices left groups unanswered"
        )));
    }
    let groups = number(&report["groups"], "groups")?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Point {
        groups_per_s: groups / elapsed.max(1e-9),
        p50_us: number(&report["latency_us"]["p50"], "p50")?,
        p99_us: number(&report["latency_us"]["p99"], "p99")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_rate_is_split_over_the_devices() {
        let two = scenario(2, 8000, 3.0);
        assert!(two.contains("count = 2\n") && two.contains("accesses = 12000\n"));
        assert!(two.contains("interval_us = 250\n"));
        let many = scenario(1024, 8000, 3.0);
        assert!(many.contains("accesses = 23\n") && many.contains("interval_us = 128000\n"));
    }
}
