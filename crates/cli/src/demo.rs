//! `iopf demo`: two real processes, a host and a VMM, connected only by a UNIX socket that
//! carries the queue regions' memfds and the doorbells' eventfds (`SCM_RIGHTS`). The host plays
//! a device with a bounded number of outstanding page request groups (its PRI credits) plus a
//! stream of unrecoverable faults; the VMM drains them and answers each group through the
//! response queue. The host side is the real fault core (`iopf-core`): it assembles the groups,
//! gives them cookies, publishes them, checks every response and answers what it must itself.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::stop::{Invariant, Reaper};
use anyhow::{Context, bail, ensure};
use clap::Args;
use iopf_abi::{
    Fault, FaultReason, PageAddr, PageResponse, Pasid, Perm, PrgIndex, ResponseCode,
    UnrecoverableFault,
};
use iopf_core::{
    DeviceConfig, DeviceCounters, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse,
    DeviceSink, FaultCore, MonotonicClock, QueueHandler,
};
use iopf_models::rng::Rng;
use iopf_queue::fdpass::{recv_with_fds, send_with_fds};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, ResponseQueueConsumer, ResponseQueueProducer,
};

const HELLO: &[u8] = b"iopf-demo-v1";

/// Options of `iopf demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Page request groups the device issues.
    #[arg(long, default_value_t = 1_000_000)]
    groups: u32,
    /// Entries per queue (a power of two in 2..=65536).
    #[arg(long, default_value_t = 256)]
    entries: u32,
    /// Groups the device may have outstanding at once (its PRI credits).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    credits: u32,
    /// Issue one unrecoverable fault every this many groups (0: none).
    #[arg(long, default_value_t = 8)]
    unrecoverable_every: u32,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the summary as JSON (on stdout) instead of text.
    #[arg(long)]
    json: bool,
}

/// Options of the demo's VMM side (`iopf demo-vmm`; `iopf vmm` has its own).
#[derive(Debug, Args)]
pub struct DemoVmmArgs {
    /// The host's socket.
    #[arg(long)]
    socket: PathBuf,
}

/// The demo's device: counts what it is answered and how many groups it still waits on.
#[derive(Debug, Default)]
struct DemoDevice {
    outstanding: AtomicU64,
}

impl DeviceSink for DemoDevice {
    fn page_response(&self, _device: DeviceId, _response: DeviceResponse) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

const DEVICE: DeviceId = DeviceId(1);

pub fn host(args: DemoArgs) -> anyhow::Result<()> {
    let mut demo = DemoHost::start(&args)?;
    let (issued, elapsed) = demo.drive(&args)?;
    let vmm = demo.collect()?;
    let counters = demo.core.counters(DEVICE)?;
    print_summary(&args, &counters, &vmm, demo.vmm_pid, issued, elapsed)?;
    check(&counters, &vmm)
}

/// The host side of the demo once the VMM has attached: the fault core with the VMM's queues
/// registered, the VMM process and the socket it is connected on.
struct DemoHost {
    /// Rings the VMM's fault doorbell (to make it see the unregister).
    fault_kick: Doorbell,
    /// The VMM's connection, which carries its summary at the end.
    stream: UnixStream,
    vmm: Reaper,
    vmm_pid: u32,
    /// Rung by the VMM when it has published responses.
    response_wake: Doorbell,
    device: Arc<DemoDevice>,
    core: FaultCore,
}

impl DemoHost {
    /// Creates the queues, starts the VMM process, passes it the queues' memfds and doorbells,
    /// and registers the queues with the fault core once it has attached.
    fn start(args: &DemoArgs) -> anyhow::Result<Self> {
        let core = FaultCore::new(Arc::new(MonotonicClock::new()));
        let device = Arc::new(DemoDevice::default());
        core.add_device(DEVICE, DeviceConfig::default(), device.clone())?;

        let mut faults =
            FaultQueueProducer::create(args.entries).context("cannot create the fault queue")?;
        let response_doorbell = Doorbell::new()?;
        let response_wake = response_doorbell.try_clone()?;
        let responses = ResponseQueueConsumer::create(args.entries, response_doorbell)
            .context("cannot create the response queue")?;
        let fault_doorbell = Doorbell::new()?;

        let (mut vmm, stream) = spawn_vmm()?;
        send_with_fds(
            &stream,
            HELLO,
            &[
                faults.memory().fd(),
                fault_doorbell.as_fd(),
                responses.memory().fd(),
                responses.doorbell().as_fd(),
            ],
        )
        .context("cannot send the regions and doorbells")?;
        let fault_kick = fault_doorbell.try_clone()?;
        faults.set_doorbell(Some(fault_doorbell));

        let vmm_pid = vmm.id();
        if !args.json {
            println!(
                "iopf demo: host pid {}, VMM pid {vmm_pid}; fault queue {} x 64 B, response queue {} x 32 B, \
         passed as memfds over a UNIX socket",
                std::process::id(),
                args.entries,
                args.entries,
            );
        }

        // Wait for the VMM to attach, then register the handler. (A handler registered
        // earlier would answer page requests Invalid until then.)
        wait_for_attach(&faults, &mut vmm)?;
        core.register(DEVICE, Box::new(QueueHandler { faults, responses }))?;
        Ok(Self {
            fault_kick,
            stream,
            vmm,
            vmm_pid,
            response_wake,
            device,
            core,
        })
    }

    /// The device's workload: it issues groups while it has credits, and the host processes
    /// the responses, until every group is answered or a stop signal comes. Returns the groups
    /// issued and how long it took.
    fn drive(&mut self, args: &DemoArgs) -> anyhow::Result<(u32, Duration)> {
        // splitmix64: a seed names one workload.
        let mut rng = Rng::new(args.seed);
        let mut issued = 0u32;
        let mut batch: Vec<DeviceFault> = Vec::with_capacity(4 * args.credits as usize);
        let start = Instant::now();
        loop {
            // The device issues groups while it has credits, reported as one batch.
            batch.clear();
            while issued < args.groups
                && self.device.outstanding.load(Ordering::Relaxed) < u64::from(args.credits)
            {
                let (pasid, base) = push_group(&mut rng, issued, &mut batch)?;
                self.device.outstanding.fetch_add(1, Ordering::Relaxed);
                issued += 1;
                if args.unrecoverable_every != 0 && issued.is_multiple_of(args.unrecoverable_every)
                {
                    batch.push(DeviceFault::Unrecoverable(UnrecoverableFault {
                        reason: FaultReason::Permission,
                        pasid: Some(pasid),
                        perm: Perm::WRITE,
                        addr: Some(base),
                        fetch_addr: None,
                    }));
                }
            }
            if !batch.is_empty() {
                self.core.report_batch(DEVICE, &batch)?;
            }
            if issued == args.groups && self.device.outstanding.load(Ordering::Relaxed) == 0 {
                break;
            }
            if crate::stop::requested() {
                // SIGINT or SIGTERM: the unregister in `collect` answers the groups still
                // pending.
                break;
            }
            self.process_responses()?;
        }
        Ok((issued, start.elapsed()))
    }

    /// Processes the responses the VMM published; with none, sleeps on the response doorbell
    /// and fails if the VMM died or broke a queue.
    fn process_responses(&mut self) -> anyhow::Result<()> {
        if self.core.process_responses(DEVICE)? != 0 {
            return Ok(());
        }
        // Nothing came back: ask the VMM for a doorbell ring and sleep on it.
        if self.core.prepare_to_sleep(DEVICE)? {
            self.response_wake.wait(Some(Duration::from_millis(100)))?;
        }
        self.core.woke(DEVICE)?;
        if let Some(status) = self.vmm.try_wait()? {
            bail!("the VMM exited with groups unanswered: {status}");
        }
        ensure!(
            self.core.is_registered(DEVICE)?,
            "the VMM broke a queue; its groups were answered Invalid"
        );
        Ok(())
    }

    /// Unregisters (clears LIVE), wakes the VMM so it sees that, and collects its account.
    fn collect(&mut self) -> anyhow::Result<HashMap<String, u64>> {
        self.core.unregister(DEVICE);
        self.fault_kick.ring()?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .read_line(&mut line)
            .context("cannot read the VMM's summary")?;
        let status = self.vmm.wait()?;
        ensure!(status.success(), "the VMM failed: {status}");
        Ok(line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect())
    }
}

/// Starts the VMM process and accepts its connection on a socket that exists only until then.
fn spawn_vmm() -> anyhow::Result<(Reaper, UnixStream)> {
    // Removed however the demo ends; only needed until the VMM connects.
    let dir = tempfile::Builder::new()
        .prefix("iopf-demo-")
        .tempdir()
        .context("cannot create the socket directory")?;
    let socket_path = dir.path().join("host.sock");
    let listener = UnixListener::bind(&socket_path).context("cannot bind the host socket")?;
    let vmm = Reaper::spawn(
        crate::stop::command(std::env::current_exe()?)
            .arg("demo-vmm")
            .arg("--socket")
            .arg(&socket_path),
    )
    .context("cannot start the VMM process")?;
    let (stream, _) = listener.accept().context("cannot accept the VMM")?;
    Ok((vmm, stream))
}

/// Waits (10 s at most) for the VMM to attach to the fault queue (its page's `abi` becomes 1).
fn wait_for_attach(faults: &FaultQueueProducer, vmm: &mut Reaper) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !faults.consumer_attached() {
        ensure!(
            Instant::now() < deadline,
            "the VMM did not attach within 10 s"
        );
        if let Some(status) = vmm.try_wait()? {
            bail!("the VMM exited before attaching: {status}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Adds one page request group of 1 to 4 pages to `batch`, the `issued`th; returns its PASID
/// and base address.
fn push_group(
    rng: &mut Rng,
    issued: u32,
    batch: &mut Vec<DeviceFault>,
) -> anyhow::Result<(Pasid, u64)> {
    let pages = 1 + rng.next_u64() % 4;
    let pasid = Pasid::new(1 + (rng.next_u64() % 8) as u32)?;
    let grpid = PrgIndex::new(issued % 512)?;
    let base = (rng.next_u64() % (1 << 36)) & !0xfff;
    for page in 0..pages {
        batch.push(DeviceFault::PageRequest(DevicePageRequest {
            pasid: Some(pasid),
            grpid,
            perm: if rng.next_u64().is_multiple_of(2) {
                Perm::READ
            } else {
                Perm::READ | Perm::WRITE
            },
            addr: PageAddr::containing(base + page * 4096),
            last: page + 1 == pages,
            private_data: None,
        }));
    }
    Ok((pasid, base))
}

/// Prints the demo's summary: JSON on stdout with `--json`, else text.
fn print_summary(
    args: &DemoArgs,
    c: &DeviceCounters,
    vmm: &HashMap<String, u64>,
    vmm_pid: u32,
    issued: u32,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let get = |k: &str| vmm.get(k).copied().unwrap_or(0);
    let auto = &c.responses.auto;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let records = c.page_requests + c.unrecoverable_delivered;
    if args.json {
        let value = serde_json::json!({
            "host_pid": std::process::id(),
            "vmm_pid": vmm_pid,
            "entries": args.entries,
            "elapsed_s": secs,
            "core": c,
            "vmm": vmm,
            "unanswered_groups": c.groups - c.answered(),
            "groups_per_s": c.groups as f64 / secs,
            "records_per_s": records as f64 / secs,
            "interrupted": crate::stop::signal().is_some(),
            "signal": crate::stop::signal(),
            "groups_issued": issued,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!();
    println!(
        "device  issued   {:>9} page requests in {:>8} groups, {:>7} unrecoverable faults",
        c.page_requests, c.groups, c.unrecoverable
    );
    println!(
        "host    published {:>8} groups to the VMM, {:>7} unrecoverable faults ({} lost: ring full)",
        c.groups_delivered, c.unrecoverable_delivered, c.lost
    );
    println!(
        "VMM     received {:>9} page requests in {:>8} groups, {:>7} unrecoverable faults, {} malformed",
        get("requests"),
        get("groups"),
        get("unrecoverable"),
        get("malformed")
    );
    println!(
        "guest   answered {:>9} success, {:>7} invalid; host refused {} responses",
        c.responses.guest.success,
        c.responses.guest.invalid,
        c.refused_total()
    );
    println!(
        "host    answered {:>9} groups itself: {} queue full, {} pending limit, {} timeout, {} other",
        auto.queue_full + auto.pending_limit + auto.timeout + auto.not_attached + auto.no_handler,
        auto.queue_full,
        auto.pending_limit,
        auto.timeout,
        auto.not_attached + auto.no_handler + auto.group_too_large,
    );
    println!("unanswered groups: {}", c.groups - c.answered());
    println!(
        "doorbells: the VMM slept {} times, it kicked the host {} times ({:.4} per response)",
        get("sleeps"),
        get("kicks"),
        get("kicks") as f64 / c.responses.guest.success.max(1) as f64
    );
    println!(
        "{:.0} groups/s, {:.0} fault records/s in {:.2} s",
        c.groups as f64 / secs,
        records as f64 / secs,
        secs,
    );
    if let Some(signal) = crate::stop::signal() {
        println!(
            "INTERRUPTED by {signal}: partial, {issued} of {} groups issued",
            args.groups
        );
    }
    Ok(())
}

/// The demo's invariants: every group answered, the VMM saw every group published, and the
/// host refused nothing of an honest VMM.
fn check(c: &DeviceCounters, vmm: &HashMap<String, u64>) -> anyhow::Result<()> {
    let get = |k: &str| vmm.get(k).copied().unwrap_or(0);
    ensure!(
        c.groups == c.answered(),
        Invariant("groups left unanswered".into())
    );
    ensure!(
        get("groups") == c.groups_delivered,
        Invariant("the VMM saw a different number of groups".into())
    );
    ensure!(
        c.refused_total() == 0,
        Invariant("the host refused responses from an honest VMM".into())
    );
    Ok(())
}

/// What the demo's VMM received and answered: its summary line to the host.
#[derive(Default)]
struct DemoVmmCounts {
    requests: u64,
    groups: u64,
    unrecoverable: u64,
    malformed: u64,
    success: u64,
    invalid: u64,
}

pub fn vmm(args: DemoVmmArgs) -> anyhow::Result<()> {
    let stream = UnixStream::connect(&args.socket).context("cannot connect to the host")?;
    let mut hello = [0u8; 64];
    let (len, fds) = recv_with_fds(&stream, &mut hello).context("cannot receive the regions")?;
    ensure!(&hello[..len] == HELLO, "unexpected greeting from the host");
    let [
        fault_region,
        fault_doorbell,
        response_region,
        response_doorbell,
    ]: [_; 4] = fds
        .try_into()
        .map_err(|fds: Vec<_>| anyhow::anyhow!("expected 4 fds, got {}", fds.len()))?;
    let mut faults = FaultQueueConsumer::attach(fault_region, Doorbell::from_fd(fault_doorbell)?)
        .context("cannot attach the fault queue")?;
    let mut responses =
        ResponseQueueProducer::attach(response_region, Some(Doorbell::from_fd(response_doorbell)?))
            .context("cannot attach the response queue")?;

    let mut stats = DemoVmmCounts::default();
    let mut answers: Vec<PageResponse> = Vec::with_capacity(1024);
    loop {
        let ready = faults.wait(Some(Duration::from_millis(100)))?;
        if ready == 0 {
            if !faults.live() {
                break;
            }
            continue;
        }
        faults.drain_faults(usize::MAX, |fault| match fault {
            Ok(Fault::PageRequest(request)) => {
                stats.requests += 1;
                if request.last {
                    stats.groups += 1;
                    // The guest maps the page, or (one time in 16) refuses.
                    let refuse = (request.addr.get() >> 12) % 16 == 0;
                    let code = if refuse {
                        ResponseCode::Invalid
                    } else {
                        ResponseCode::Success
                    };
                    answers.push(PageResponse::answering(&request, code));
                }
            }
            Ok(Fault::Unrecoverable(_)) => stats.unrecoverable += 1,
            Err(_) => stats.malformed += 1,
        })?;
        let mut sent = 0;
        while sent < answers.len() {
            sent += responses.stage_some(&answers[sent..])?;
            responses.publish()?;
            if sent < answers.len() {
                std::thread::yield_now();
            }
        }
        for a in answers.drain(..) {
            match a.code {
                ResponseCode::Success => stats.success += 1,
                _ => stats.invalid += 1,
            }
        }
        if !faults.live() && faults.wait(Some(Duration::ZERO))? == 0 {
            break;
        }
    }
    let line = format!(
        "requests={} groups={} unrecoverable={} malformed={} success={} invalid={} sleeps={} kicks={}\n",
        stats.requests,
        stats.groups,
        stats.unrecoverable,
        stats.malformed,
        stats.success,
        stats.invalid,
        faults.sleeps(),
        responses.kicks()
    );
    (&stream).write_all(line.as_bytes())?;
    Ok(())
}
