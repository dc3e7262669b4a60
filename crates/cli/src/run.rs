//! `iopf run`, `iopf host`, `iopf vmm`: the host serving simulated devices over vfio-user, and
//! VMM processes attaching to them; `run` starts both and prints what happened.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use iopf_endpoint::{Host, HostReport};
use iopf_sim::vmm_guest::{GuestSetup, SimulatedGuest, attach, reattach};
use iopf_vfio_user::ClientOptions;
use iopf_vmm::{Device, DeviceKey, EventLoop, host_finished};

use crate::outcome::{ReportOptions, Samples, Throughput, check, print_report, spawn_vmm};
use crate::scenario::{ChaosClock, RunChaos, Scenario};
use crate::soak::{SoakOptions, parse_duration};
use crate::stop::Reaper;

/// Options shared by `run` and `host`: the scenario, and overrides of it.
#[derive(Debug, Args, Clone)]
pub struct DeviceArgs {
    /// A TOML scenario (see `scenarios/`); without it, `scenarios/default.toml`.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Override: this many devices, all like the scenario's first (at most 1024).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    devices: Option<u32>,
    /// Threads of the host's reactor, which serves every device and VMM connection (default
    /// and most: the number of CPUs; more is taken as that).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Override: DMA accesses per stream.
    #[arg(long)]
    accesses: Option<u32>,
    /// Override: entries per queue (a power of two in 2..=65536).
    #[arg(long)]
    ring_entries: Option<u32>,
    /// Override: the endpoints' Outstanding Page Request Allocation.
    #[arg(long)]
    allocation: Option<u32>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

impl DeviceArgs {
    fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = match &self.scenario {
            Some(path) => Scenario::load(path)?,
            None => Scenario::parse(crate::scenario::DEFAULT)?,
        };
        if let Some(n) = self.devices {
            s.devices.truncate(1);
            s.devices[0].count = n;
        }
        for d in &mut s.devices {
            if let Some(a) = self.allocation {
                d.allocation = a;
            }
            for stream in &mut d.streams {
                if let Some(k) = self.accesses {
                    stream.accesses = k;
                }
            }
        }
        if let Some(r) = self.ring_entries {
            s.ring_entries = r;
        }
        let cpus = iopf_endpoint::host::default_threads();
        s.threads = self
            .threads
            .map_or(cpus, |t| usize::try_from(t).unwrap_or(cpus).min(cpus));
        // Overrides go through the same checks as the file.
        Scenario::check_again(s)
    }
}

/// Options of `iopf run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    devices: DeviceArgs,
    /// Write an HTML report (latency histogram, throughput over time) into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Soak: run the workload in rounds for this long (30s, 10m, 1h, ...) with chaos repeating,
    /// and fail unless the memory and fd count of the host and the VMM stay flat. SIGINT or
    /// SIGTERM ends it early, reporting what it has.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Soak: period of the built-in chaos (a VMM kill and restart, an unregister of each
    /// device) when the scenario has no [[chaos]]; default 5s.
    // The doc comment is the option's help: `[[chaos]]` is the scenario's TOML, not a link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_parser = parse_duration, requires = "duration")]
    chaos_every: Option<Duration>,
    /// Soak: sample memory and fds this often (default: 1s, less for short soaks).
    #[arg(long, value_parser = parse_duration, requires = "duration")]
    sample_every: Option<Duration>,
    /// VMM processes to start, like separate virtual machines on one host; the devices are
    /// shared out among them (at most one VMM per device). A `vmm_restart` chaos event kills
    /// and restarts one of them, in turn.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64), conflicts_with = "duration")]
    vmms: u32,
    /// Serve Prometheus metrics over HTTP at ADDR, path /metrics, while the run goes (a
    /// loopback IP:PORT; port 0 picks one, printed on stderr).
    #[arg(long, value_name = "ADDR", conflicts_with = "duration")]
    metrics: Option<std::net::SocketAddr>,
}

/// Options of `iopf host`.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// The socket to serve.
    #[arg(long)]
    socket: PathBuf,
    #[command(flatten)]
    devices: DeviceArgs,
    /// Serve Prometheus metrics over HTTP at ADDR, path /metrics, while the host runs (a
    /// loopback IP:PORT; port 0 picks one, printed on stderr).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// Options of `iopf vmm`.
#[derive(Debug, Args)]
pub struct VmmArgs {
    /// The host's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Devices to attach (one vfio-user connection each; at most 1024).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    devices: u32,
    /// The scenario whose `[guest]` section the guest follows (default: the built-in one).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Override: shortest and longest guest answer latency, in microseconds.
    #[arg(long, num_args = 2)]
    latency_us: Option<Vec<u64>>,
    /// Print each device's account as JSON (an array on stdout) instead of text.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the host's reply to the handshake and to each request before
    /// giving up (default: 5 for the handshake, 10 for each request).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,
}

/// A `--timeout`: seconds, more than 0 and at most a day.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{text} s is not in (0, 86400]"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What the VMM did for one device, printed when the host finishes.
#[derive(Debug, serde::Serialize)]
struct VmmDeviceAccount {
    device: u32,
    page_requests: u64,
    groups: u64,
    unrecoverable: u64,
    responses: u64,
    malformed: u64,
    handler_lives: u32,
    /// SIGINT or SIGTERM stopped the VMM before the host finished.
    interrupted: bool,
}

impl std::fmt::Display for VmmDeviceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {}: {} page requests in {} groups, {} unrecoverable, {} responses, {} malformed, {} handler lives{}",
            self.device,
            self.page_requests,
            self.groups,
            self.unrecoverable,
            self.responses,
            self.malformed,
            self.handler_lives,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        )
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let scenario = args.devices.scenario()?;
    if let Some(duration) = args.duration {
        let options = SoakOptions {
            duration,
            chaos_every: args.chaos_every,
            sample_every: args.sample_every,
        };
        return crate::soak::soak(
            scenario,
            args.devices.scenario.as_deref(),
            options,
            args.devices.json,
            args.report.as_deref(),
        );
    }
    crate::watch::check(args.metrics)?;
    let devices = scenario.device_count();
    // Removed however the run ends (dropped last: after the VMMs are stopped).
    let dir = tempfile::Builder::new()
        .prefix("iopf-run-")
        .tempdir()
        .context("cannot create the socket directory")?;
    let socket = dir.path().join("host.sock");
    let host = Host::bind(scenario.host_config(), &socket).context("cannot start the host")?;
    let _watch = crate::watch::start(&host, args.metrics, None)?;
    let file = args.devices.scenario.as_deref();
    // Each VMM process attaches its share of the devices (whichever the host hands out).
    let shares = vmm_shares(devices, args.vmms);
    let mut vmms = shares
        .iter()
        .map(|&n| spawn_vmm(&socket, n, file))
        .collect::<anyhow::Result<Vec<Reaper>>>()?;
    let mut chaos =
        ChaosClock::new(&scenario.chaos).only(|e| matches!(e, RunChaos::VmmRestart { .. }));
    // The VMM down for a restart, and when it comes back.
    let mut restart_at: Option<(usize, u64)> = None;
    let mut restarts: u32 = 0;
    let outcome = drive(host, &scenario, !args.devices.json, |elapsed| {
        let ms = elapsed.as_millis() as u64;
        for event in chaos.due(ms, false) {
            if let (RunChaos::VmmRestart { down_ms }, None) = (event, restart_at) {
                // SIGKILL: the VMM gets no chance to say goodbye; the host sees its sockets
                // close. With several VMMs, they take turns.
                let victim = restarts as usize % vmms.len();
                vmms[victim].kill().context("kill the VMM process")?;
                restart_at = Some((victim, ms + down_ms));
            }
        }
        if let Some((victim, at)) = restart_at
            && ms >= at
        {
            vmms[victim] = spawn_vmm(&socket, shares[victim], file)?;
            restart_at = None;
            restarts += 1;
        }
        for (i, vmm) in vmms.iter_mut().enumerate() {
            if restart_at.is_none_or(|(victim, _)| victim != i)
                && let Some(status) = vmm.try_wait()?
                && !crate::stop::requested()
            {
                bail!("VMM process {i} exited before the run finished: {status}");
            }
        }
        Ok(())
    });
    let (report, elapsed, samples) = outcome?;
    let mut status = Ok(());
    for (i, vmm) in vmms.iter_mut().enumerate() {
        if crate::stop::requested() {
            // Interrupted: the VMM was told to leave (its devices unregistered) or got the
            // signal too; how it ended says nothing.
            vmm.stop().context("stop the VMM process")?;
            continue;
        }
        let exit = vmm.wait()?;
        if !exit.success() && status.is_ok() {
            status = Err(anyhow::anyhow!("VMM process {i} failed: {exit}"));
        }
    }
    print_report(
        &(report, elapsed),
        &samples,
        ReportOptions {
            json: args.devices.json,
            restarts,
            html: args.report.as_deref(),
            soak: None,
        },
    )?;
    status
}

/// How many devices each of `vmms` VMM processes attaches: as even as possible, at most one
/// VMM per device.
fn vmm_shares(devices: u32, vmms: u32) -> Vec<u32> {
    let vmms = vmms.clamp(1, devices.max(1));
    (0..vmms)
        .map(|i| devices / vmms + u32::from(i < devices % vmms))
        .collect()
}

pub fn host(args: HostArgs) -> anyhow::Result<()> {
    let scenario = args.devices.scenario()?;
    crate::watch::check(args.metrics)?;
    let host = Host::bind(scenario.host_config(), &args.socket).context("cannot start the host")?;
    let watch = crate::watch::start(&host, args.metrics, Some(&args.socket))?;
    // The host removes its socket when it finishes (or is dropped on an error).
    let (report, elapsed, samples) = drive(host, &scenario, !args.devices.json, |_| Ok(()))?;
    drop(watch);
    print_report(
        &(report, elapsed),
        &samples,
        ReportOptions {
            json: args.devices.json,
            ..ReportOptions::default()
        },
    )
}

/// How often [`drive`] samples progress: fine enough that the report's throughput chart has
/// points even for a run of a few tens of milliseconds (reading a few atomics; the fault path
/// never waits for it).
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

/// Waits for the host to finish, with a progress bar; `tick` runs every [`SAMPLE_EVERY`]
/// (chaos, and noticing a dead VMM).
fn drive(
    host: Host,
    scenario: &Scenario,
    bar: bool,
    mut tick: impl FnMut(Duration) -> anyhow::Result<()>,
) -> anyhow::Result<(HostReport, Duration, Samples)> {
    let started = Instant::now();
    let total = scenario.total_accesses();
    // The host's own chaos: unregister a device's handler, let its VMM attach again later.
    let mut unregister =
        ChaosClock::new(&scenario.chaos).only(|e| matches!(e, RunChaos::Unregister { .. }));
    let progress = bar.then(|| {
        let p = indicatif::ProgressBar::new(total);
        p.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} DMA accesses {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        p
    });
    let mut samples = Throughput::default();
    while !host.finished() {
        std::thread::sleep(SAMPLE_EVERY);
        if crate::stop::requested() {
            // SIGINT or SIGTERM: end now; `finish` answers what is pending.
            host.interrupt();
            break;
        }
        let load = |f: fn(&iopf_host::metrics::Progress) -> u64| -> u64 {
            host.progress().iter().map(f).sum()
        };
        let done = load(|p| p.accesses_done.load(std::sync::atomic::Ordering::Relaxed));
        let answered = load(|p| p.groups_answered.load(std::sync::atomic::Ordering::Relaxed));
        samples.push(started.elapsed().as_secs_f64(), answered);
        if let Some(p) = &progress {
            p.set_position(done);
        }
        let ms = started.elapsed().as_millis() as u64;
        for event in unregister.due(ms, false) {
            if let RunChaos::Unregister { device, down_ms } = event {
                host.unregister_for(device, Duration::from_millis(down_ms));
            }
        }
        tick(started.elapsed())?;
    }
    if let Some(p) = &progress {
        p.finish_and_clear();
    }
    let elapsed = started.elapsed();
    let report = host.finish();
    check(&report)?;
    Ok((report, elapsed, samples.into_samples()))
}

pub fn vmm(args: VmmArgs) -> anyhow::Result<()> {
    let scenario = match &args.scenario {
        Some(path) => Scenario::load(path)?,
        None => Scenario::parse(crate::scenario::DEFAULT)?,
    };
    let mut setup = scenario.guest_setup();
    if let Some(l) = &args.latency_us {
        ensure!(l.len() == 2 && l[0] <= l[1], "--latency-us takes MIN MAX");
        setup.guest.latency_ns = (l[0].saturating_mul(1000), l[1].saturating_mul(1000));
    }
    let options = match args.timeout {
        Some(t) => ClientOptions::default()
            .handshake_timeout(Some(t))
            .request_timeout(Some(t)),
        None => ClientOptions::default(),
    };
    let accounts = serve(&args.socket, args.devices, &setup, options)?;
    if !args.json {
        for account in &accounts {
            println!("{account}");
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&accounts)?);
    }
    Ok(())
}

/// One device as `iopf vmm` serves it.
struct ServedDevice {
    device_id: u32,
    /// The connection of the current handler life (`None` while attaching again).
    client: Option<iopf_vfio_user::Client>,
    /// In the loop; `None` while between handler lives (the device is in `parked`).
    key: Option<DeviceKey>,
    parked: Option<Device>,
    lives: u32,
    /// Attaching again: the next try, and when to give up.
    next_try: Instant,
    give_up: Instant,
    /// Its account, once the host has finished.
    done: Option<VmmDeviceAccount>,
}

/// Attaches `devices` devices and serves them all from this thread, with one event loop, until
/// the host finishes. When the host unregisters a device's handler (`LIVE` cleared while the
/// host runs on), the VMM lets its connection go and attaches again to the device's next
/// handler life, keeping its guest memory, page tables and the answers it still owes (the
/// host refuses those that answer the earlier life).
fn serve(
    socket: &Path,
    devices: u32,
    setup: &GuestSetup,
    options: ClientOptions,
) -> anyhow::Result<Vec<VmmDeviceAccount>> {
    let mut events = EventLoop::new()?;
    let mut guest = SimulatedGuest::new();
    let mut served = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..devices {
        // The host may keep a device closed for a while (after an unregister): retry a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        let attached = loop {
            match attach(socket, setup, options) {
                Ok(attached) => break attached,
                // Interrupted before every device attached: account for those that did.
                Err(_) if crate::stop::requested() => return Ok(Vec::new()),
                // A host that does not answer at all is not retried: it would only wait again.
                Err(e) if !e.timed_out() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e).context("cannot attach a device"),
            }
        };
        guest.add_device(
            attached.device_id,
            attached.device.responder(),
            attached.guest,
        );
        let key = events.add(attached.device)?;
        served.push(ServedDevice {
            device_id: attached.device_id,
            client: Some(attached.client),
            key: Some(key),
            parked: None,
            lives: 1,
            next_try: Instant::now(),
            give_up: Instant::now(),
            done: None,
        });
        // Serve the devices attached so far while attaching the next (a thousand attaches
        // take a while, and the first devices' groups would wait for all of them).
        serve_round(
            &mut events,
            &mut guest,
            &mut served,
            &mut failures,
            Duration::ZERO,
        )?;
    }
    while served.iter().any(|s| s.done.is_none()) {
        if crate::stop::requested() {
            // SIGINT or SIGTERM: account for every device as it is now, and leave.
            for s in served.iter_mut().filter(|s| s.done.is_none()) {
                let device = match s.key.take() {
                    Some(key) => events.remove(key),
                    None => s.parked.take(),
                };
                if let Some(device) = device {
                    s.done = Some(account(s.device_id, &device, s.lives));
                }
            }
            break;
        }
        let reattaching = served.iter().any(|s| s.done.is_none() && s.key.is_none());
        let most = Duration::from_millis(if reattaching { 10 } else { 20 });
        let timeout = guest.timeout(most);
        serve_round(&mut events, &mut guest, &mut served, &mut failures, timeout)?;
        for s in served.iter_mut().filter(|s| s.done.is_none()) {
            let now = Instant::now();
            match s.key {
                Some(key) => {
                    if events.device(key).is_none_or(Device::live) {
                        continue;
                    }
                    let device = events.remove(key).context("a device left the loop")?;
                    s.key = None;
                    let mut client = s.client.take().context("a device without connection")?;
                    if host_finished(&mut client).unwrap_or(true) {
                        s.done = Some(account(s.device_id, &device, s.lives));
                        continue;
                    }
                    drop(client);
                    guest.pause(s.device_id, true);
                    s.parked = Some(device);
                    (s.next_try, s.give_up) = (now, now + Duration::from_secs(60));
                }
                None if now >= s.next_try => {
                    let g = guest
                        .device(s.device_id)
                        .context("a device without guest")?;
                    match reattach(socket, s.device_id, g, options) {
                        Ok((client, channel)) => {
                            let mut device = s.parked.take().context("no device to attach")?;
                            drop(device.replace_channel(channel));
                            s.key = Some(events.add(device)?);
                            s.client = Some(client);
                            s.lives += 1;
                            guest.pause(s.device_id, false);
                        }
                        Err(e) if !e.timed_out() && now < s.give_up => {
                            s.next_try = now + Duration::from_millis(10);
                        }
                        Err(e) => {
                            return Err(e).context("cannot attach again after an unregister");
                        }
                    }
                }
                None => {}
            }
        }
    }
    if let Some(e) = failures.into_iter().next() {
        return Err(e);
    }
    Ok(served.into_iter().filter_map(|s| s.done).collect())
}

/// One round of the VMM's loop (waiting at most `timeout`): faults read and handed to the
/// guest, the answers due sent; a device whose queues failed is accounted for and recorded in
/// `failures`.
fn serve_round(
    events: &mut EventLoop,
    guest: &mut SimulatedGuest,
    served: &mut [ServedDevice],
    failures: &mut Vec<anyhow::Error>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let round = events.run_once(guest, Some(timeout))?;
    for failed in round.failed {
        let s = served
            .iter_mut()
            .find(|s| s.key == Some(failed.key))
            .context("a failed device the VMM does not know")?;
        failures.push(anyhow::Error::new(failed.error).context(format!("device {}", s.device_id)));
        s.done = Some(account(s.device_id, &failed.device, s.lives));
        s.key = None;
    }
    guest.send_due();
    Ok(())
}

fn account(device: u32, served: &Device, lives: u32) -> VmmDeviceAccount {
    let s = served.stats();
    VmmDeviceAccount {
        device,
        page_requests: s.requests,
        groups: s.groups,
        unrecoverable: s.unrecoverable,
        responses: s.responses,
        malformed: s.malformed,
        handler_lives: lives,
        interrupted: crate::stop::requested(),
    }
}
