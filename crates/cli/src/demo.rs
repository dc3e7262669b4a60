//! `iopf demo`: two real processes, a host and a VMM, connected only by a UNIX socket that
//! carries the queue regions' memfds and the doorbells' eventfds (`SCM_RIGHTS`). The host plays
//! a device with a bounded number of outstanding page request groups (its PRI credits) plus a
//! stream of unrecoverable faults; the VMM drains them and answers each group through the
//! response queue. Until the fault core and the device models land, the host matches responses
//! to groups by cookie itself.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use iopf_abi::{
    Cookie, Fault, FaultReason, PageAddr, PageRequest, PageResponse, Pasid, Perm, PrgIndex,
    ResponseCode, UnrecoverableFault,
};
use iopf_queue::fdpass::{recv_with_fds, send_with_fds};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, PushError, ResponseQueueConsumer,
    ResponseQueueProducer, Staged,
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
}

/// Options of the VMM side.
#[derive(Debug, Args)]
pub struct VmmArgs {
    /// The host's socket.
    #[arg(long)]
    socket: PathBuf,
}

/// splitmix64: a tiny, good enough generator so that a seed names one workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// What the host expects back for a group.
struct Pending {
    pasid: Option<Pasid>,
    grpid: PrgIndex,
}

#[derive(Default)]
struct HostStats {
    groups: u64,
    requests: u64,
    unrecoverable: u64,
    responses: u64,
    success: u64,
    invalid: u64,
    refused: u64,
    full: u64,
}

/// Kills the VMM if the host bails out early, so no process is left behind.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn host(args: DemoArgs) -> anyhow::Result<()> {
    let mut faults = FaultQueueProducer::create(args.entries).context("fault queue")?;
    let mut responses =
        ResponseQueueConsumer::create(args.entries, Doorbell::new()?).context("response queue")?;
    let fault_doorbell = Doorbell::new()?;
    faults.set_live(true);
    responses.set_live(true);

    let dir = std::env::temp_dir().join(format!("iopf-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket_path = dir.join("host.sock");
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path).context("bind the host socket")?;
    let child = Command::new(std::env::current_exe()?)
        .arg("demo-vmm")
        .arg("--socket")
        .arg(&socket_path)
        .stdin(Stdio::null())
        .spawn()
        .context("start the VMM process")?;
    let mut vmm = Reaper(child);
    let (stream, _) = listener.accept().context("accept the VMM")?;
    let _ = std::fs::remove_dir_all(&dir);
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
    .context("send the regions and doorbells")?;
    // The VMM rings the fault doorbell's other end; the host keeps its own copy to kick.
    faults.set_doorbell(Some(fault_doorbell));

    let pid = vmm.0.id();
    println!(
        "iopf demo: host pid {}, VMM pid {pid}; fault queue {} x 64 B, response queue {} x 32 B, \
         passed as memfds over a UNIX socket",
        std::process::id(),
        args.entries,
        args.entries,
    );

    // Wait for the VMM to attach (its page's `abi` becomes 1).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !faults.consumer_attached() {
        ensure!(
            Instant::now() < deadline,
            "the VMM did not attach within 10 s"
        );
        if let Some(status) = vmm.0.try_wait()? {
            bail!("the VMM exited before attaching: {status}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    let mut rng = Rng(args.seed);
    let mut pending: HashMap<u32, Pending> = HashMap::new();
    let mut stats = HostStats::default();
    let mut next_cookie = 1u32;
    let mut issued = 0u32;
    let mut group = Vec::with_capacity(4);
    let start = Instant::now();
    while issued < args.groups || !pending.is_empty() {
        // The device issues groups while it has credits.
        while issued < args.groups && (pending.len() as u32) < args.credits {
            let pages = 1 + rng.next() % 4;
            let pasid = Pasid::new(1 + (rng.next() % 8) as u32)?;
            let grpid = PrgIndex::new(issued % 512)?;
            let base = (rng.next() % (1 << 36)) & !0xfff;
            let cookie = Cookie::new(next_cookie)?;
            group.clear();
            for page in 0..pages {
                group.push(PageRequest {
                    cookie,
                    pasid: Some(pasid),
                    grpid,
                    perm: if rng.next().is_multiple_of(2) {
                        Perm::READ
                    } else {
                        Perm::READ | Perm::WRITE
                    },
                    addr: PageAddr::containing(base + page * 4096),
                    last: page + 1 == pages,
                    private_data: None,
                });
            }
            match faults.stage_group(&group) {
                Ok(()) => {
                    pending.insert(
                        cookie.get(),
                        Pending {
                            pasid: Some(pasid),
                            grpid,
                        },
                    );
                    stats.groups += 1;
                    stats.requests += pages;
                }
                // No room: the host answers the device itself (Invalid) at once.
                Err(PushError::Full) => stats.full += 1,
                Err(e) => bail!("fault queue broken by the VMM: {e}"),
            }
            next_cookie = next_cookie.checked_add(1).unwrap_or(1);
            issued += 1;
            if args.unrecoverable_every != 0 && issued.is_multiple_of(args.unrecoverable_every) {
                let fault = UnrecoverableFault {
                    reason: FaultReason::Permission,
                    pasid: Some(pasid),
                    perm: Perm::WRITE,
                    addr: Some(base),
                    fetch_addr: None,
                };
                if faults.stage_unrecoverable(&fault)? == Staged::Queued {
                    stats.unrecoverable += 1;
                }
            }
        }
        faults.publish()?;

        let drained = responses.drain(usize::MAX, |record| {
            stats.responses += 1;
            let accepted = record.decode().ok().and_then(|r| {
                let p = pending.get(&r.cookie.get())?;
                (p.pasid == r.pasid && p.grpid == r.grpid && r.code != ResponseCode::Failure)
                    .then_some(r)
            });
            match accepted {
                Some(r) => {
                    pending.remove(&r.cookie.get());
                    match r.code {
                        ResponseCode::Success => stats.success += 1,
                        _ => stats.invalid += 1,
                    }
                }
                None => stats.refused += 1,
            }
        })?;
        if stats.refused > 0 {
            responses.count_rejected(stats.refused - responses.rejected());
        }
        let idle = drained == 0 && !pending.is_empty();
        if idle
            && responses.wait(Some(Duration::from_millis(100)))? == 0
            && let Some(status) = vmm.0.try_wait()?
        {
            bail!(
                "the VMM exited with {} groups unanswered: {status}",
                pending.len()
            );
        }
    }
    let elapsed = start.elapsed();

    // Tell the VMM the handler is gone, wake it, and collect its account.
    faults.set_live(false);
    faults.kick()?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("read the VMM's summary")?;
    let status = vmm.0.wait()?;
    ensure!(status.success(), "the VMM failed: {status}");
    let vmm_stats: HashMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let get = |k: &str| vmm_stats.get(k).copied().unwrap_or(0);

    let secs = elapsed.as_secs_f64().max(1e-9);
    let records = stats.requests + stats.unrecoverable;
    println!();
    println!(
        "host  published {:>9} page requests in {:>8} groups, {:>7} unrecoverable faults",
        stats.requests, stats.groups, stats.unrecoverable
    );
    println!(
        "VMM   received  {:>9} page requests in {:>8} groups, {:>7} unrecoverable faults, {} malformed",
        get("requests"),
        get("groups"),
        get("unrecoverable"),
        get("malformed")
    );
    println!(
        "guest answered  {:>9} success, {:>7} invalid",
        get("success"),
        get("invalid")
    );
    println!(
        "host  accepted  {:>9} responses ({} success, {} invalid), refused {}",
        stats.success + stats.invalid,
        stats.success,
        stats.invalid,
        stats.refused
    );
    println!(
        "queue full: {} groups answered Invalid by the host, {} unrecoverable faults lost (host page `lost`)",
        stats.full,
        faults.lost()
    );
    println!("unanswered groups: {}", pending.len());
    println!(
        "doorbells: host kicked the VMM {} times ({:.4} per record), the VMM slept {} times; \
              the VMM kicked the host {} times",
        faults.kicks(),
        faults.kicks() as f64 / records.max(1) as f64,
        get("sleeps"),
        get("kicks")
    );
    println!(
        "{:.0} groups/s, {:.0} fault records/s in {:.2} s ({} issued by the device)",
        stats.groups as f64 / secs,
        records as f64 / secs,
        secs,
        issued
    );
    ensure!(pending.is_empty(), "groups left unanswered");
    ensure!(
        get("groups") == stats.groups,
        "the VMM saw a different number of groups"
    );
    ensure!(
        stats.refused == 0,
        "the host refused responses from an honest VMM"
    );
    Ok(())
}

#[derive(Default)]
struct VmmStats {
    requests: u64,
    groups: u64,
    unrecoverable: u64,
    malformed: u64,
    success: u64,
    invalid: u64,
}

pub fn vmm(args: VmmArgs) -> anyhow::Result<()> {
    let stream = UnixStream::connect(&args.socket).context("connect to the host")?;
    let mut hello = [0u8; 64];
    let (len, fds) = recv_with_fds(&stream, &mut hello).context("receive the regions")?;
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
        .context("attach the fault queue")?;
    let mut responses =
        ResponseQueueProducer::attach(response_region, Some(Doorbell::from_fd(response_doorbell)?))
            .context("attach the response queue")?;

    let mut stats = VmmStats::default();
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
                    answers.push(PageResponse {
                        cookie: request.cookie,
                        pasid: request.pasid,
                        grpid: request.grpid,
                        code,
                    });
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
