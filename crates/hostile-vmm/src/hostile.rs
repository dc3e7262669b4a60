//! `iopf hostile-vmm` (hidden): a VMM process that attaches one device over vfio-user the way
//! `iopf vmm` does (fault regions, response doorbell, fault IRQ, guest memory, PASID directory),
//! then misbehaves toward the host in one chosen way. `tests/hostile_vmm.rs` runs it against a
//! real `iopf host`, next to a well-behaved VMM serving another device, and checks the host's
//! guarantees (`docs/DESIGN.md` §4; the table in `docs/RELIABILITY.md`).
//!
//! It prints `attached N` once attached (N: the host's number for the device), and one JSON
//! object when it leaves: what it did (records sent honestly and bogusly, groups held back,
//! what the memfd allowed...), so that the test can hold the host's counters against it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, ValueEnum};
use iopf_abi::{FLAG_NEED_WAKEUP, Fault, PageRequest, Pasid, QueueKind, ResponseRecord};
use iopf_models::guest::{Guest, GuestConfig};
use iopf_models::memory::GuestMemory;
use iopf_models::nested::GuestTables;
use iopf_models::rng::Rng;
use iopf_queue::{
    Doorbell, FaultQueueConsumer, PushError, QueueMemory, QueueRegion, ResponseQueueProducer,
};
use iopf_vfio_user::device::{
    DMA_FAULT_IRQ_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX, RESPONSE_PROD_OFFSET,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
    VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE, VFIO_REGION_TYPE_NESTED,
};
use iopf_vfio_user::device::{REG_DEVICE_ID, REG_HOST_STATE};
use iopf_vfio_user::{Client, Command};
use iopf_vmm::{Assembled, GroupAssembler};
use serde_json::json;

/// How the hostile VMM misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Behaviour {
    /// Reads every group and never answers one.
    Silent,
    /// Answers every group twice (both copies in one publish).
    AnswerTwice,
    /// Before each honest answer: a random cookie, cookies the host issues to the other
    /// devices, another pending group's cookie, and cookie 0.
    ForgeCookies,
    /// Answers a while, holds some groups back, disconnects, attaches again (a new handler
    /// life) and replays every answer of the first life before answering the new groups.
    ReplayAfterRestart,
    /// Holds groups back, then stores a fault queue `cons` far past anything the host
    /// published.
    ConsPastProd,
    /// Holds groups back, then marks the slot of the host's next response as a record more
    /// than a ring ahead (a skipped mark), and rings the response doorbell.
    ProdPastRing,
    /// Answers honestly while a thread flips `NEED_WAKEUP` at random in the fault queue's VMM
    /// page and the response queue's host page.
    FlipNeedWakeup,
    /// Answers honestly while flooding the response doorbell, with both eventfds' shared
    /// `O_NONBLOCK` cleared and the fault IRQ's counter saturated (and `NEED_WAKEUP` always
    /// set, so the host rings it on every publish); also rings through the region-write
    /// fallback after every publish.
    FloodDoorbells,
    /// Tries to shrink, grow, reseal and write past the end of both queue memfds, then answers
    /// honestly.
    Truncate,
    /// Holds groups back, then writes random bytes over every byte of both queue memfds
    /// (through the fd and its own mappings) and punches holes in them, then leaves.
    Scribble,
    /// Holds groups back, then sends a vfio-user header whose size is over the limit.
    LyingSize,
    /// Holds groups back, then sends a message carrying more fds than the protocol allows.
    TooManyFds,
    /// Attaches with the response region's `abi` left at 0 (ABI v2 announced in the fault
    /// region only), then serves honestly whatever it receives, counting it.
    ResponseAbiZero,
    /// Holds groups back, then sends a header and half its payload and hangs up.
    DisconnectMidMessage,
    /// Holds groups back, then sends a header and half its payload and sends nothing more,
    /// the socket left open, until the host closes the connection.
    StallMidMessage,
    /// Sends one request a byte at a time (a few milliseconds apart), checks the reply, then
    /// answers honestly.
    Drip,
    /// Never reads its fault queue nor drains its fault IRQ: waits, reading nothing, until the
    /// host clears `LIVE`.
    NeverRead,
}

/// Options of `iopf hostile-vmm`.
#[derive(Debug, Args)]
pub struct HostileArgs {
    /// The host's socket.
    #[arg(long)]
    socket: PathBuf,
    /// What to do wrong.
    #[arg(long, value_enum)]
    behaviour: Behaviour,
    /// Seed of the random choices (garbage, cookies, flips).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Groups to read and leave unanswered before striking (behaviours that strike).
    #[arg(long, default_value_t = 8)]
    hold: u64,
    /// Groups to answer in the first life (`replay-after-restart`).
    #[arg(long, default_value_t = 24)]
    first_life: u64,
}

/// Fault records read per poll.
const READ_BATCH: usize = 64;
/// How long to wait for the host to do something it must do (clear `LIVE`, free the device).
const PATIENCE: Duration = Duration::from_secs(20);

/// One attachment: a vfio-user connection and the queues of one handler life.
struct Link {
    client: Client,
    /// A second handle on the client's socket, for bytes no client would send.
    raw: UnixStream,
    device: u32,
    faults: FaultQueueConsumer,
    responses: ResponseQueueProducer,
    /// Mappings of our own of both regions, for stores no honest VMM would make.
    fault_region: QueueRegion,
    response_region: QueueRegion,
    /// The fault IRQ's eventfd and the response doorbell (our handles).
    _fault_irq: Doorbell,
    response_doorbell: Option<Doorbell>,
    /// Records staged on `responses` and not yet published.
    staged: u32,
}

impl Link {
    /// Free slots in the response ring as far as we know (the host's `cons` only grows).
    fn free(&self) -> u32 {
        let nb = self.response_region.geometry().nb_entries();
        // Published and unread (none if the host's index is out of range: it never is).
        let unread = self.responses.fill().map_or(0, |(unread, _)| unread);
        nb.saturating_sub(unread.wrapping_add(self.staged))
    }

    fn publish(&mut self) -> anyhow::Result<()> {
        self.responses.publish()?;
        self.staged = 0;
        Ok(())
    }

    fn live(&self) -> bool {
        self.faults.live()
    }

    fn host_finished(&mut self) -> bool {
        let mut state = [0u8; 4];
        match self
            .client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, REG_HOST_STATE, &mut state)
        {
            Ok(()) => u32::from_le_bytes(state) & iopf_vfio_user::device::HOST_STATE_FINISHED != 0,
            Err(_) => true,
        }
    }
}

/// What the hostile VMM did, printed as JSON when it leaves.
#[derive(Debug, Default)]
struct Tally {
    lives: u64,
    groups: u64,
    honest: u64,
    bogus: u64,
    held: u64,
    replayed: u64,
    host_rejected: u64,
    host_closed: Option<bool>,
    flips: u64,
    rings: u64,
    attempts: BTreeMap<String, String>,
    unregistered: bool,
    /// Groups received after the strike (`response-abi-zero`: after attaching).
    after_strike: u64,
}

/// The guest side of the device, kept across handler lives.
struct Hostile {
    behaviour: Behaviour,
    socket: PathBuf,
    memory: GuestMemory,
    tables: GuestTables,
    guest: Guest,
    rng: Rng,
    partial: GroupAssembler,
    tally: Tally,
    /// Every answer sent or owed in the first life (`replay-after-restart`).
    history: Vec<ResponseRecord>,
    /// Records to send before the next honest answer.
    carry: Vec<ResponseRecord>,
    /// Cookies the host hands the other devices (their counters' starting points).
    other_cookies: Vec<u32>,
    /// Our device, once attached.
    device: Option<u32>,
}

/// What to do with the groups read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Honest,
    Never,
    Twice,
    Forged,
}

pub fn main(args: HostileArgs) -> anyhow::Result<()> {
    let mut memory = GuestMemory::new(4096)?;
    let tables =
        GuestTables::new(&mut memory, 64).context("no guest memory for the page tables")?;
    let _ = tables.add_space(&mut memory, None);
    for p in 0..64 {
        let _ = tables.add_space(&mut memory, Pasid::new(p).ok());
    }
    let guest = Guest::new(
        GuestConfig {
            latency_ns: (0, 0),
            refuse_rate: 0.0,
            ..GuestConfig::default()
        },
        Rng::new(args.seed),
    );
    let mut hostile = Hostile {
        behaviour: args.behaviour,
        socket: args.socket.clone(),
        memory,
        tables,
        guest,
        rng: Rng::new(args.seed ^ 0x5eed),
        partial: GroupAssembler::new(),
        tally: Tally::default(),
        history: Vec::new(),
        carry: Vec::new(),
        other_cookies: Vec::new(),
        device: None,
    };
    let mut link = hostile.connect()?;
    hostile.device = Some(link.device);
    println!("attached {}", link.device);
    std::io::stdout().flush()?;
    // The host starts each device's cookie counter at a fixed point (crates/core's
    // `DeviceState::new`): forge the cookies it is handing the other devices right now.
    hostile.other_cookies = (1..=4u32)
        .filter(|&d| d != link.device)
        .map(|d| (d.wrapping_mul(0x9e37_79b9) >> 8).max(1))
        .collect();
    match args.behaviour {
        Behaviour::Silent => hostile.serve(&mut link, Mode::Never)?,
        Behaviour::AnswerTwice => hostile.serve(&mut link, Mode::Twice)?,
        Behaviour::ForgeCookies => hostile.serve(&mut link, Mode::Forged)?,
        Behaviour::FlipNeedWakeup => {
            let stop = Arc::new(AtomicBool::new(false));
            let flips = Arc::new(AtomicU64::new(0));
            let flipper = flipper(&link, args.seed, stop.clone(), flips.clone())?;
            hostile.serve(&mut link, Mode::Honest)?;
            stop.store(true, Ordering::Relaxed);
            let _ = flipper.join();
            hostile.tally.flips = flips.load(Ordering::Relaxed);
        }
        Behaviour::FloodDoorbells => {
            let rings = Arc::new(AtomicU64::new(0));
            if let Some(doorbell) = &link.response_doorbell {
                flooder(doorbell, rings.clone())?;
            }
            hostile.serve(&mut link, Mode::Honest)?;
            hostile.tally.rings = rings.load(Ordering::Relaxed);
        }
        Behaviour::Truncate => {
            for (name, fd) in [
                ("fault", link.fault_region.fd()),
                ("response", link.response_region.fd()),
            ] {
                let len = link_len(fd)?;
                attempt_resizes(&mut hostile.tally.attempts, name, fd, len);
            }
            hostile.serve(&mut link, Mode::Honest)?;
        }
        Behaviour::ReplayAfterRestart => {
            hostile.serve_until(&mut link, args.first_life)?;
            hostile.hold(&mut link, args.hold, true)?;
            // Hang up with groups owed; the host answers them (`vmm_gone`). Then come back.
            drop(link);
            link = hostile.connect()?;
            hostile.carry = std::mem::take(&mut hostile.history);
            hostile.tally.replayed = hostile.carry.len() as u64;
            hostile.serve(&mut link, Mode::Honest)?;
        }
        Behaviour::ConsPastProd => {
            hostile.hold(&mut link, args.hold, false)?;
            let cons = link.fault_region.vmm_page().index.load(Ordering::Acquire);
            let garbage = cons.wrapping_add(0x8000_0000 + hostile.rng.below(1 << 20) as u32);
            link.fault_region
                .vmm_page()
                .index
                .store(garbage, Ordering::Release);
            hostile.wait_not_live(&link)?;
        }
        Behaviour::ProdPastRing => {
            hostile.hold(&mut link, args.hold, false)?;
            let nb = link.response_region.geometry().nb_entries();
            let cons = link
                .response_region
                .host_page()
                .index
                .load(Ordering::Acquire);
            let ahead = cons
                .wrapping_add(nb)
                .wrapping_add(1 + hostile.rng.below(1 << 20) as u32);
            // Word 3 of a response slot is its mark.
            let slot = (cons & (nb - 1)) as usize * 4 + 3;
            if let Some(word) = link.response_region.entry_words().get(slot) {
                word.store(iopf_abi::mark(ahead), Ordering::Release);
            }
            if let Some(doorbell) = &link.response_doorbell {
                doorbell.ring()?;
            }
            hostile.wait_not_live(&link)?;
        }
        Behaviour::Scribble => {
            hostile.hold(&mut link, args.hold, false)?;
            hostile.scribble(&link, Duration::from_millis(300))?;
            hostile.tally.unregistered = true;
        }
        Behaviour::LyingSize => {
            hostile.hold(&mut link, args.hold, false)?;
            // REGION_WRITE whose header claims one byte more than the largest message.
            let size = iopf_vfio_user::protocol::MAX_MESSAGE_SIZE as u32 + 1;
            let header = header_bytes(0x7777, Command::RegionWrite, size);
            link.raw.write_all(&header)?;
            let _ = link.raw.write_all(&[0xa5; 64]);
            hostile.tally.host_closed = Some(closed_by_peer(&mut link.raw));
        }
        Behaviour::TooManyFds => {
            hostile.hold(&mut link, args.hold, false)?;
            // SET_IRQS with 24 eventfds attached: more than the 16 the protocol allows.
            let eventfds: Vec<Doorbell> =
                (0..24).map(|_| Doorbell::new()).collect::<Result<_, _>>()?;
            let fds: Vec<BorrowedFd<'_>> = eventfds.iter().map(AsFd::as_fd).collect();
            let header = header_bytes(0x7778, Command::DeviceSetIrqs, 16 + 20);
            let mut message = header.to_vec();
            message.extend_from_slice(&[0u8; 20]);
            send_with_many_fds(&link.raw, &message, &fds)?;
            hostile.tally.host_closed = Some(closed_by_peer(&mut link.raw));
        }
        Behaviour::ResponseAbiZero => {
            // The response region's `abi` was left at 0 at attach (`try_connect`).
            hostile.serve(&mut link, Mode::Honest)?;
            hostile.tally.after_strike = hostile.tally.groups;
        }
        Behaviour::DisconnectMidMessage => {
            hostile.hold(&mut link, args.hold, false)?;
            // A REGION_WRITE header, then half its payload, then the socket closes.
            let header = header_bytes(0x7779, Command::RegionWrite, 16 + 16 + 8);
            link.raw.write_all(&header)?;
            link.raw.write_all(&[0u8; 12])?;
            let _ = link.raw.shutdown(std::net::Shutdown::Both);
        }
        Behaviour::StallMidMessage => {
            hostile.hold(&mut link, args.hold, false)?;
            // A REGION_WRITE header, then half its payload; the socket stays open.
            let header = header_bytes(0x777a, Command::RegionWrite, 16 + 16 + 8);
            link.raw.write_all(&header)?;
            link.raw.write_all(&[0u8; 12])?;
            hostile.tally.host_closed = Some(closed_by_peer_within(
                &mut link.raw,
                Duration::from_secs(20),
            ));
        }
        Behaviour::Drip => {
            // REGION_READ of the device id register, 4 bytes, a byte at a time.
            let mut message = header_bytes(0x777b, Command::RegionRead, 16 + 16).to_vec();
            message.extend_from_slice(&REG_DEVICE_ID.to_le_bytes());
            message.extend_from_slice(&VFIO_PCI_BAR0_REGION_INDEX.to_le_bytes());
            message.extend_from_slice(&4u32.to_le_bytes());
            for byte in &message {
                link.raw.write_all(std::slice::from_ref(byte))?;
                std::thread::sleep(Duration::from_millis(3));
            }
            let mut reply = [0u8; 16 + 16 + 4];
            link.raw
                .set_read_timeout(Some(Duration::from_secs(10)))
                .context("set a read timeout")?;
            link.raw
                .read_exact(&mut reply)
                .context("no reply to the dripped request")?;
            let id = u32::from_le_bytes([reply[32], reply[33], reply[34], reply[35]]);
            ensure!(
                reply[0..2] == 0x777bu16.to_le_bytes() && id == link.device,
                "a wrong reply to the dripped request: {reply:?}"
            );
            hostile
                .tally
                .attempts
                .insert("drip".into(), format!("{} bytes", message.len()));
            hostile.serve(&mut link, Mode::Honest)?;
        }
        Behaviour::NeverRead => {
            hostile.wait_not_live_for(&link, Duration::from_secs(120))?;
        }
    }
    hostile.tally.host_rejected = link
        .response_region
        .host_page()
        .rejected
        .load(Ordering::Relaxed);
    let t = &hostile.tally;
    let report = json!({
        "device": link.device,
        "behaviour": format!("{:?}", hostile.behaviour),
        "lives": t.lives,
        "groups": t.groups,
        "honest": t.honest,
        "bogus": t.bogus,
        "held": t.held,
        "replayed": t.replayed,
        "host_rejected": t.host_rejected,
        "host_closed": t.host_closed,
        "flips": t.flips,
        "rings": t.rings,
        "attempts": t.attempts,
        "unregistered": t.unregistered,
        "groups_after_strike": t.after_strike,
    });
    println!("{report}");
    std::io::stdout().flush()?;
    Ok(())
}

impl Hostile {
    /// Connects and attaches, retrying while the host has no free device for us (it may still
    /// be tearing down our previous connection).
    fn connect(&mut self) -> anyhow::Result<Link> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.try_connect() {
                Ok(link) => {
                    self.tally.lives += 1;
                    return Ok(link);
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("cannot attach a device"),
            }
        }
    }

    fn try_connect(&mut self) -> anyhow::Result<Link> {
        let stream = UnixStream::connect(&self.socket)?;
        let raw = stream.try_clone()?;
        let mut client = Client::from_stream(stream)?;
        client.device_info()?;
        let mut id = [0u8; 4];
        client.region_read(VFIO_PCI_BAR0_REGION_INDEX, REG_DEVICE_ID, &mut id)?;
        let device = u32::from_le_bytes(id);
        // Attaching again: only our own device will do (while the host still tears down our
        // previous connection, it may hand us another device; hang up and try again).
        if let Some(expected) = self.device
            && device != expected
        {
            bail!("the host handed over device {device}, not {expected}");
        }
        let fault_fd = region_fd(&mut client, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT)?;
        let response_fd = region_fd(&mut client, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE)?;
        let mut io_fds = client.region_io_fds(DMA_FAULT_RESPONSE_REGION_INDEX)?;
        let response_doorbell = match io_fds.fds.len() {
            0 => None,
            _ => Some(Doorbell::from_fd(io_fds.fds.remove(0))?),
        };
        let fault_irq = Doorbell::new()?;
        if self.behaviour == Behaviour::FloodDoorbells {
            // Saturate the fault IRQ's counter before the host sees it. Nobody drains it: this
            // VMM polls instead of sleeping on it.
            rustix::io::write(&fault_irq, &(u64::MAX - 1).to_ne_bytes())?;
        }
        client.set_irqs(DMA_FAULT_IRQ_INDEX, &[fault_irq.as_fd()])?;
        if self.behaviour == Behaviour::FloodDoorbells {
            // Now that the host has its handle (and has set O_NONBLOCK on the file description
            // we share), clear it: an eventfd write to the saturated counter would now block.
            clear_nonblock(fault_irq.as_fd())?;
        }
        let fault_region = QueueRegion::attach(fault_fd.try_clone()?, QueueKind::Fault)?;
        let response_region = QueueRegion::attach(response_fd.try_clone()?, QueueKind::Response)?;
        let faults = FaultQueueConsumer::attach(fault_fd, fault_irq.try_clone()?)?;
        let responses = ResponseQueueProducer::attach(
            response_fd,
            response_doorbell
                .as_ref()
                .map(Doorbell::try_clone)
                .transpose()?,
        )?;
        if self.behaviour == Behaviour::ResponseAbiZero {
            // Withdraw what attaching announced, before the device gets memory to DMA to.
            response_region.vmm_page().abi.store(0, Ordering::Release);
        }
        iopf_sim::vmm_guest::register_memory(&mut client, &self.memory, &self.tables)?;
        self.partial.clear();
        Ok(Link {
            client,
            raw,
            device,
            faults,
            responses,
            fault_region,
            response_region,
            _fault_irq: fault_irq,
            response_doorbell,
            staged: 0,
        })
    }

    /// Reads whole groups (at most one batch of records).
    fn read_groups(&mut self, link: &mut Link) -> anyhow::Result<Vec<Vec<PageRequest>>> {
        let mut faults = Vec::new();
        link.faults.drain_faults(READ_BATCH, |f| faults.push(f))?;
        let mut groups = Vec::new();
        for fault in faults {
            if let Ok(Fault::PageRequest(request)) = fault {
                match self.partial.push(link.device, request) {
                    Assembled::Partial => {}
                    Assembled::Group(group) => {
                        self.tally.groups += 1;
                        groups.push(group);
                    }
                    // The host delivers groups whole: a dropped one is the host's fault, and
                    // the host's own timeout answers it.
                    Assembled::DroppedLast(_) => {}
                }
            }
        }
        Ok(groups)
    }

    /// The guest's honest answer to a group (mapping its pages).
    fn answer(&mut self, device: u32, group: &[PageRequest]) -> Option<ResponseRecord> {
        self.guest
            .on_group(device, group, 0, &mut self.tables, &mut self.memory, 0)
            .first()
            .map(|a| a.record)
    }

    /// Stages a set of records in one publish: waits for room for all of them first, so that
    /// every bogus record shares its publish with the honest answer after it.
    fn send_set(&mut self, link: &mut Link, set: &[ResponseRecord]) -> anyhow::Result<()> {
        let nb = link.response_region.geometry().nb_entries() as usize;
        for chunk in set.chunks(nb) {
            let deadline = Instant::now() + PATIENCE;
            while (link.free() as usize) < chunk.len() {
                if link.staged > 0 {
                    link.publish()?;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the host never drained its responses"
                );
                if !link.live() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            for record in chunk {
                match link.responses.stage_record(record) {
                    Ok(()) => link.staged += 1,
                    Err(PushError::Full) => bail!("response ring full despite the room counted"),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Serves until the host clears `LIVE` (it finished, or it unregistered the handler).
    fn serve(&mut self, link: &mut Link, mode: Mode) -> anyhow::Result<()> {
        self.serve_inner(link, mode, None)
    }

    /// Serves honestly until `groups` groups of this life are answered.
    fn serve_until(&mut self, link: &mut Link, groups: u64) -> anyhow::Result<()> {
        self.serve_inner(link, Mode::Honest, Some(groups))
    }

    fn serve_inner(
        &mut self,
        link: &mut Link,
        mode: Mode,
        stop_after: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut answered = 0u64;
        loop {
            if !link.live() {
                self.tally.unregistered = !link.host_finished();
                return Ok(());
            }
            if self.behaviour == Behaviour::FloodDoorbells {
                // Ask for a fault IRQ on every publish, and never drain it.
                link.fault_region
                    .vmm_page()
                    .flags
                    .fetch_or(FLAG_NEED_WAKEUP, Ordering::SeqCst);
            }
            if stop_after.is_some_and(|n| answered >= n) {
                return Ok(());
            }
            let groups = self.read_groups(link)?;
            let mut honest = Vec::new();
            for group in &groups {
                if mode == Mode::Never {
                    self.tally.held += 1;
                } else if let Some(record) = self.answer(link.device, group) {
                    honest.push(record);
                }
            }
            for (i, &record) in honest.iter().enumerate() {
                // Bogus records first, the honest answer last, all in one publish: the host
                // reads them in one batch, before the group's answer can let the device finish.
                let mut set = std::mem::take(&mut self.carry);
                if mode == Mode::Forged {
                    set.extend(self.forgeries(&record, honest.get(i + 1).copied()));
                }
                set.push(record);
                if mode == Mode::Twice {
                    set.push(record);
                }
                self.tally.bogus += set.len() as u64 - 1;
                self.tally.honest += 1;
                if self.behaviour == Behaviour::ReplayAfterRestart && self.tally.lives == 1 {
                    self.history.push(record);
                }
                self.send_set(link, &set)?;
                answered += 1;
            }
            if link.staged > 0 {
                link.publish()?;
                if self.behaviour == Behaviour::FloodDoorbells {
                    // The doorbell's fallback: a region write of `prod` makes the host ring.
                    let prod = link
                        .response_region
                        .vmm_page()
                        .index
                        .load(Ordering::Relaxed);
                    link.client.region_write(
                        DMA_FAULT_RESPONSE_REGION_INDEX,
                        RESPONSE_PROD_OFFSET,
                        &prod.to_le_bytes(),
                    )?;
                }
            }
            if groups.is_empty() {
                if self.behaviour == Behaviour::FloodDoorbells {
                    // Sleeping on the saturated fault IRQ would drain it: poll instead.
                    std::thread::sleep(Duration::from_millis(1));
                } else {
                    link.faults.wait(Some(Duration::from_millis(20)))?;
                }
            }
        }
    }

    /// The bogus records sent before an honest answer: a random cookie, the cookies the host
    /// is handing the other devices, the next pending group's cookie on this group's PASID
    /// and PRG index, and cookie 0.
    fn forgeries(
        &mut self,
        honest: &ResponseRecord,
        next: Option<ResponseRecord>,
    ) -> Vec<ResponseRecord> {
        let mut out = Vec::new();
        let mut with_cookie = |cookie: u32| {
            let mut r = *honest;
            r.cookie = cookie.into();
            out.push(r);
        };
        with_cookie(self.rng.next_u64() as u32 | 1);
        let n = self.tally.honest as u32;
        for start in self.other_cookies.clone() {
            with_cookie(start.wrapping_add(n % 1024).max(1));
        }
        if let Some(next) = next {
            with_cookie(next.cookie.get());
        }
        with_cookie(0);
        out
    }

    /// Reads groups until `n` are held unanswered (`answer_later`: keep their answers to
    /// replay). Groups read beyond `n` in the same batch are held too.
    fn hold(&mut self, link: &mut Link, n: u64, answer_later: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        let mut held = 0;
        while held < n {
            ensure!(Instant::now() < deadline, "the host sent too few groups");
            ensure!(
                link.live(),
                "the host unregistered the handler before the strike"
            );
            let groups = self.read_groups(link)?;
            for group in &groups {
                held += 1;
                if answer_later && let Some(record) = self.answer(link.device, group) {
                    self.history.push(record);
                }
            }
            if groups.is_empty() {
                link.faults.wait(Some(Duration::from_millis(5)))?;
            }
        }
        self.tally.held += held;
        Ok(())
    }

    /// Waits until the host clears `LIVE` (it noticed the broken queue and unregistered).
    fn wait_not_live(&mut self, link: &Link) -> anyhow::Result<()> {
        self.wait_not_live_for(link, PATIENCE)
    }

    /// [`wait_not_live`](Self::wait_not_live), for at most `patience`.
    fn wait_not_live_for(&mut self, link: &Link, patience: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience;
        while link.live() {
            ensure!(
                Instant::now() < deadline,
                "the host never noticed the broken queue"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        self.tally.unregistered = true;
        Ok(())
    }

    /// Writes random bytes over every byte of both regions, through the fd and through our own
    /// mappings, and punches holes, for `time`.
    fn scribble(&mut self, link: &Link, time: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + time;
        let regions = [&link.fault_region, &link.response_region];
        let mut rounds = 0u64;
        while Instant::now() < end {
            for region in regions {
                let fd = region.fd();
                let len = link_len(fd)?;
                let mut bytes = vec![0u8; len as usize];
                for chunk in bytes.chunks_mut(8) {
                    let word = self.rng.next_u64().to_le_bytes();
                    chunk.copy_from_slice(&word[..chunk.len()]);
                }
                let _ = rustix::io::pwrite(fd, &bytes, 0);
                let page = self.rng.below(len / 4096) * 4096;
                let _ = rustix::fs::fallocate(
                    fd,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    page,
                    4096,
                );
                let vmm = region.vmm_page();
                vmm.abi.store(self.rng.next_u64() as u32, Ordering::Release);
                vmm.flags
                    .store(self.rng.next_u64() as u32, Ordering::Release);
                vmm.index
                    .store(self.rng.next_u64() as u32, Ordering::Release);
                for word in region.entry_words() {
                    word.store(self.rng.next_u64(), Ordering::Relaxed);
                }
            }
            rounds += 1;
        }
        self.tally
            .attempts
            .insert("scribble_rounds".into(), rounds.to_string());
        Ok(())
    }
}

fn region_fd(client: &mut Client, subtype: u32) -> anyhow::Result<OwnedFd> {
    client
        .find_region_by_type(VFIO_REGION_TYPE_NESTED, subtype)?
        .and_then(|region| region.fd)
        .context("the device has no fault region of this subtype")
}

fn link_len(fd: BorrowedFd<'_>) -> anyhow::Result<u64> {
    Ok(u64::try_from(rustix::fs::fstat(fd)?.st_size).unwrap_or(0))
}

fn clear_nonblock(fd: BorrowedFd<'_>) -> anyhow::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Tries every way to change a region memfd's size or seals; records each result.
fn attempt_resizes(
    attempts: &mut BTreeMap<String, String>,
    name: &str,
    fd: BorrowedFd<'_>,
    len: u64,
) {
    let mut record = |what: &str, result: rustix::io::Result<()>| {
        let text = match result {
            Ok(()) => "ok".to_string(),
            Err(rustix::io::Errno::PERM) => "EPERM".to_string(),
            Err(e) => format!("errno {}", e.raw_os_error()),
        };
        attempts.insert(format!("{name}_{what}"), text);
    };
    record("ftruncate_0", rustix::fs::ftruncate(fd, 0));
    record("ftruncate_shrink", rustix::fs::ftruncate(fd, len - 4096));
    record("ftruncate_grow", rustix::fs::ftruncate(fd, len + 4096));
    record(
        "fallocate_grow",
        rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::empty(), len, 4096),
    );
    record(
        "pwrite_past_end",
        rustix::io::pwrite(fd, &[0xff; 8], len).map(|_| ()),
    );
    record(
        "add_seal_write",
        rustix::fs::fcntl_add_seals(fd, rustix::fs::SealFlags::WRITE),
    );
    let after = link_len(fd).unwrap_or(0);
    attempts.insert(format!("{name}_len_unchanged"), (after == len).to_string());
}

/// A vfio-user command header: id, command, size (header included), flags 0, error 0.
fn header_bytes(id: u16, command: Command, size: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..2].copy_from_slice(&id.to_le_bytes());
    h[2..4].copy_from_slice(&(command as u16).to_le_bytes());
    h[4..8].copy_from_slice(&size.to_le_bytes());
    h
}

/// `sendmsg` with any number of fds (`iopf_queue::fdpass` refuses more than 16).
fn send_with_many_fds(
    socket: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> anyhow::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(32))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    ensure!(
        control.push(SendAncillaryMessage::ScmRights(fds)),
        "control buffer too small"
    );
    rustix::net::sendmsg(
        socket,
        &[std::io::IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Whether the host closes the connection within a few seconds (reads and drops anything it
/// sends first).
fn closed_by_peer(socket: &mut UnixStream) -> bool {
    closed_by_peer_within(socket, Duration::from_secs(4))
}

/// Whether the host closes `socket` within `patience` (what it sends meanwhile is read and
/// dropped).
fn closed_by_peer_within(socket: &mut UnixStream, patience: Duration) -> bool {
    let _ = socket.set_read_timeout(Some(patience));
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        match socket.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

/// Flips `NEED_WAKEUP` at random in the fault queue's VMM page (the host reads it to decide
/// whether to ring) and the response queue's host page (the VMM's producer reads it), through
/// mappings of the thread's own.
fn flipper(
    link: &Link,
    seed: u64,
    stop: Arc<AtomicBool>,
    flips: Arc<AtomicU64>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let faults = QueueRegion::attach(
        link.fault_region.fd().try_clone_to_owned()?,
        QueueKind::Fault,
    )?;
    let responses = QueueRegion::attach(
        link.response_region.fd().try_clone_to_owned()?,
        QueueKind::Response,
    )?;
    Ok(std::thread::spawn(move || {
        let mut rng = Rng::new(seed ^ 0xf11b);
        while !stop.load(Ordering::Relaxed) {
            let cell = if rng.chance(0.5) {
                &faults.vmm_page().flags
            } else {
                &responses.host_page().flags
            };
            cell.fetch_xor(FLAG_NEED_WAKEUP, Ordering::SeqCst);
            flips.fetch_add(1, Ordering::Relaxed);
            if rng.chance(0.1) {
                std::thread::sleep(Duration::from_micros(rng.below(200)));
            }
        }
    }))
}

/// Rings the response doorbell without pause, now and then with a value that saturates its
/// counter, with the shared `O_NONBLOCK` cleared (so our own writes block while it is full,
/// until the host drains it). The thread runs until the process exits.
fn flooder(doorbell: &Doorbell, rings: Arc<AtomicU64>) -> anyhow::Result<()> {
    let fd: OwnedFd = doorbell.as_fd().try_clone_to_owned()?;
    clear_nonblock(fd.as_fd())?;
    std::thread::spawn(move || {
        let mut n = 0u64;
        loop {
            let value: u64 = if (n + 1).is_multiple_of(4096) {
                u64::MAX - 1
            } else {
                1
            };
            if rustix::io::write(&fd, &value.to_ne_bytes()).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            n += 1;
            rings.store(n, Ordering::Relaxed);
            if n.is_multiple_of(256) {
                std::thread::yield_now();
            }
        }
    });
    Ok(())
}
