//! `iopf run`, `iopf host`, `iopf vmm`: the host serving simulated devices over vfio-user, and
//! VMM processes attaching to them; `run` starts both and prints what happened.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use hdrhistogram::Histogram;
use iopf_core::DeviceConfig;
use iopf_host::engine::Workload;
use iopf_host::{Host, HostConfig, HostReport};
use iopf_sim::endpoint::EndpointConfig;
use iopf_sim::guest::GuestConfig;
use iopf_sim::workload::{Pattern, Stream};
use iopf_vmm::{GuestSetup, attach};
use serde_json::json;

/// Options shared by `run` and `host`: the devices and their work.
#[derive(Debug, Args, Clone)]
pub struct DeviceArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    devices: u32,
    /// DMA accesses per stream (each device runs two streams on two PASIDs).
    #[arg(long, default_value_t = 5000)]
    accesses: u32,
    /// Entries per queue (a power of two in 2..=65536).
    #[arg(long, default_value_t = 256)]
    ring_entries: u32,
    /// The endpoint's Outstanding Page Request Allocation.
    #[arg(long, default_value_t = 64)]
    allocation: u32,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Options of `iopf run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    devices: DeviceArgs,
}

/// Options of `iopf host`.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// The socket to serve.
    #[arg(long)]
    socket: PathBuf,
    #[command(flatten)]
    devices: DeviceArgs,
}

/// Options of `iopf vmm`.
#[derive(Debug, Args)]
pub struct VmmArgs {
    /// The host's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Devices to attach (one vfio-user connection each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    devices: u32,
    /// Guest memory per device, in 4 KiB pages.
    #[arg(long, default_value_t = 4096)]
    pages: u64,
    /// Share of groups the guest refuses.
    #[arg(long, default_value_t = 0.02)]
    refuse_rate: f64,
    /// Shortest and longest guest answer latency, in microseconds.
    #[arg(long, num_args = 2, default_values_t = [2, 20])]
    latency_us: Vec<u64>,
}

fn host_config(args: &DeviceArgs) -> anyhow::Result<HostConfig> {
    iopf_abi::QueueGeometry::new(iopf_abi::QueueKind::Fault, args.ring_entries)?;
    let stream = |pasid: u32, pattern, write| Stream {
        pasid: iopf_abi::Pasid::new(pasid).ok(),
        base: 0x4000_0000 * u64::from(pasid),
        pages: 1024,
        pattern,
        access_len: 8192,
        write,
        accesses: args.accesses,
        interval_ns: 5_000,
    };
    Ok(HostConfig {
        workloads: (0..args.devices)
            .map(|d| Workload {
                endpoint: EndpointConfig {
                    allocation: args.allocation,
                    ..EndpointConfig::default()
                },
                streams: vec![
                    stream(1, Pattern::Sequential, true),
                    stream(2, Pattern::Random, false),
                ],
                seed: args.seed.wrapping_add(u64::from(d)),
            })
            .collect(),
        ring_entries: args.ring_entries,
        device: DeviceConfig::default(),
    })
}

/// Kills a child that is still running when dropped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = host_config(&args.devices)?;
    let dir = std::env::temp_dir().join(format!("iopf-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("host.sock");
    let host = Host::bind(config, &socket).context("start the host")?;
    let vmm = Command::new(std::env::current_exe()?)
        .args([
            "vmm",
            "--devices",
            &args.devices.devices.to_string(),
            "--socket",
        ])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start the VMM process")?;
    let mut vmm = Reaper(vmm);
    let report = drive(
        host,
        args.devices.accesses * 2 * args.devices.devices,
        !args.devices.json,
        || vmm.0.try_wait().ok().flatten().map(|s| s.to_string()),
    )?;
    let status = vmm.0.wait()?;
    let _ = std::fs::remove_dir_all(&dir);
    print_report(&report, args.devices.json)?;
    ensure!(status.success(), "the VMM process failed: {status}");
    check(&report)
}

pub fn host(args: HostArgs) -> anyhow::Result<()> {
    let config = host_config(&args.devices)?;
    let host = Host::bind(config, &args.socket).context("start the host")?;
    let report = drive(
        host,
        args.devices.accesses * 2 * args.devices.devices,
        !args.devices.json,
        || None,
    )?;
    let _ = std::fs::remove_file(&args.socket);
    print_report(&report, args.devices.json)?;
    check(&report)
}

/// Waits for the host to finish, with a progress bar; `gone` says why a VMM died early.
fn drive(
    host: Host,
    total: u32,
    bar: bool,
    mut gone: impl FnMut() -> Option<String>,
) -> anyhow::Result<(HostReport, Duration)> {
    let started = Instant::now();
    let progress = bar.then(|| {
        let p = indicatif::ProgressBar::new(u64::from(total));
        p.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} DMA accesses {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        p
    });
    while !host.finished() {
        std::thread::sleep(Duration::from_millis(50));
        let done: u64 = host
            .progress()
            .iter()
            .map(|p| p.accesses_done.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        if let Some(p) = &progress {
            p.set_position(done);
        }
        if let Some(status) = gone() {
            bail!("the VMM process exited before the run finished: {status}");
        }
    }
    if let Some(p) = &progress {
        p.finish_and_clear();
    }
    let elapsed = started.elapsed();
    Ok((host.finish(), elapsed))
}

fn check((report, _): &(HostReport, Duration)) -> anyhow::Result<()> {
    let c = &report.core;
    ensure!(
        c.groups == c.answered(),
        "{} groups left unanswered",
        c.groups - c.answered()
    );
    for e in &report.engines {
        ensure!(
            e.memory.bytes_mismatched == 0 && e.memory.read_mismatches == 0,
            "device {}: guest memory differs from what DMA wrote",
            e.device
        );
        ensure!(
            e.endpoint.unexpected == 0,
            "device {}: responses for no group in flight",
            e.device
        );
    }
    Ok(())
}

fn print_report((report, elapsed): &(HostReport, Duration), as_json: bool) -> anyhow::Result<()> {
    let c = &report.core;
    let a = &c.responses.auto;
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut accesses, mut completed, mut failed, mut written, mut verified, mut mismatched) =
        (0, 0, 0, 0, 0, 0);
    for e in &report.engines {
        latency.add(&e.latency)?;
        accesses += e.endpoint.accesses;
        completed += e.endpoint.completed;
        failed += e.endpoint.accesses - e.endpoint.completed;
        written += e.endpoint.bytes_written;
        verified += e.memory.bytes_verified;
        mismatched += e.memory.bytes_mismatched;
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let q = |x: f64| latency.value_at_quantile(x) as f64 / 1000.0;
    if as_json {
        let value = json!({
            "elapsed_s": secs,
            "accesses": accesses, "completed": completed, "failed": failed,
            "page_requests": c.page_requests, "unrecoverable": c.unrecoverable, "groups": c.groups,
            "unanswered_groups": c.groups - c.answered(),
            "core": c,
            "dma_bytes_written": written, "dma_bytes_verified": verified, "dma_bytes_mismatched": mismatched,
            "latency_us": { "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": latency.max() as f64 / 1000.0, "samples": latency.len() },
            "groups_per_s": c.groups as f64 / secs,
            "disconnects": report.disconnects,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "iopf run: {} devices over vfio-user, {:.2} s",
        report.engines.len(),
        secs
    );
    println!("  DMA accesses      {accesses:>10}: {completed} completed, {failed} failed");
    println!(
        "  page requests     {:>10} in {} groups; {} unrecoverable faults ({} lost)",
        c.page_requests, c.groups, c.unrecoverable, c.lost
    );
    println!(
        "  guest answered    {:>10} success, {} invalid",
        c.responses.guest.success, c.responses.guest.invalid
    );
    println!(
        "  host answered     {:>10} itself: {} queue full, {} not attached, {} no handler, {} VMM gone, {} unregister, {} timeout",
        c.answered()
            - c.responses.guest.success
            - c.responses.guest.invalid
            - c.responses.guest.failure,
        a.queue_full,
        a.not_attached,
        a.no_handler,
        a.vmm_gone,
        a.unregister,
        a.timeout
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
    Ok(())
}

pub fn vmm(args: VmmArgs) -> anyhow::Result<()> {
    let setup = GuestSetup {
        guest: GuestConfig {
            latency_ns: (
                args.latency_us[0] * 1000,
                args.latency_us[1].max(args.latency_us[0]) * 1000,
            ),
            refuse_rate: args.refuse_rate.clamp(0.0, 1.0),
            ..GuestConfig::default()
        },
        pages: args.pages,
        pasids: 4,
        seed: 7,
    };
    let threads: Vec<_> = (0..args.devices)
        .map(|_| {
            let socket = args.socket.clone();
            std::thread::spawn(move || serve(&socket, setup))
        })
        .collect();
    for t in threads {
        let line = t
            .join()
            .map_err(|_| anyhow::anyhow!("a device thread panicked"))??;
        println!("{line}");
    }
    Ok(())
}

/// Attaches one device and serves it until the host unregisters it.
fn serve(socket: &Path, setup: GuestSetup) -> anyhow::Result<String> {
    let mut attached = attach(socket, setup).context("attach a device")?;
    while attached.device.live() {
        attached.device.poll()?;
        attached.device.wait(Duration::from_millis(20))?;
    }
    let s = attached.device.stats();
    Ok(format!(
        "device {}: {} page requests in {} groups, {} unrecoverable, {} responses, {} malformed",
        attached.device_id, s.requests, s.groups, s.unrecoverable, s.responses, s.malformed
    ))
}
