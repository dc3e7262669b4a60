//! The fault and response queues between two real processes.
//!
//! The test binary re-executes itself: a parent test (the host) creates the regions and the
//! doorbells, binds a UNIX socket in a temporary directory, and spawns
//! `current_exe() --exact <child test> --nocapture --test-threads=1` with
//! [`ENV_SOCKET`] set. The child test (the VMM) connects, receives the fds with `SCM_RIGHTS`,
//! attaches, checks every record, and reports a summary line back over the socket. Without
//! [`ENV_SOCKET`] the child tests return at once, so a normal run (`cargo test` or
//! `cargo nextest run`) passes them as no-ops.
//!
//! Every wait is bounded: the parent kills the child at [`CHILD_DEADLINE`], the child gives up
//! at the same deadline or as soon as its parent is gone, and socket reads time out, so a bug shows up as a failure with the child's output, never as a hang.
#![cfg(not(loom))]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iopf_abi::{
    Cookie, Fault, FaultReason, FaultRecord, PageAddr, PageRequest, PageResponse, Pasid, Perm,
    PrgIndex, ResponseCode, UnrecoverableFault,
};
use iopf_queue::fdpass::{recv_with_fds, send_with_fds};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, PushError, QueueMemory,
    ResponseQueueConsumer, ResponseQueueProducer, Staged,
};
use zerocopy::IntoBytes;

/// Set in the child's environment: the socket to connect to. Absent: child tests are no-ops.
const ENV_SOCKET: &str = "IOPF_TEST_CHILD_SOCKET";
/// `blocking` (the consumer sleeps on its doorbell) or `busy` (it polls and never sleeps).
const ENV_MODE: &str = "IOPF_TEST_MODE";
/// The parent's pid, so that a child whose parent died (it is re-parented) quits.
const ENV_PARENT: &str = "IOPF_TEST_PARENT_PID";

/// After this long the parent kills the child and fails, and the child gives up by itself.
const CHILD_DEADLINE: Duration = Duration::from_secs(120);

/// Records in the one-million-record tests.
const MILLION: u32 = 1_000_000;
/// Records in the response round trip.
const ROUND_TRIP_RECORDS: u32 = 100_000;
/// Fault queue entries in the one-million-record tests.
const FAULT_RING: u32 = 1024;
/// Records the host stages before it publishes them with one index store.
const BATCH: u32 = 128;
/// Page request groups the host sends at once in the round trip, and then waits for all their
/// responses before it sends more (a PRI device has a small page request allocation): the
/// host waits on its doorbell once per window.
const WINDOW: usize = 32;
/// Polls before the VMM sleeps, in blocking mode: small, so the sleeping path really runs.
const BLOCKING_SPIN: u32 = 10;

// ---------------------------------------------------------------------------------------------
// The records both processes agree on.
// ---------------------------------------------------------------------------------------------

/// The fault with sequence number `seq` (1-based). In every 8: an unrecoverable fault, a page
/// request group of four pages (cookie = the seq of its first page, `LAST_PAGE` on the
/// fourth), then three single-page groups (cookie = seq). grpid = cookie % 512, addr = seq's
/// page; PASID and private data on some.
fn fault_for(seq: u32) -> Fault {
    match seq % 8 {
        0 => Fault::Unrecoverable(UnrecoverableFault {
            reason: FaultReason::from_raw(seq / 8 % 9).unwrap(),
            pasid: (!seq.is_multiple_of(3)).then(|| Pasid::new(seq & Pasid::MAX).unwrap()),
            perm: Perm::WRITE,
            addr: Some((u64::from(seq) << 12) | 0x10),
            fetch_addr: seq.is_multiple_of(16).then_some(u64::from(seq) << 3),
        }),
        r => {
            let (group, last) = if r <= 4 {
                (seq - (r - 1), r == 4)
            } else {
                (seq, true)
            };
            Fault::PageRequest(PageRequest {
                cookie: Cookie::new(group).unwrap(),
                pasid: (group % 3 != 2).then(|| Pasid::new(group & Pasid::MAX).unwrap()),
                grpid: PrgIndex::new(group % 512).unwrap(),
                perm: Perm::READ,
                addr: PageAddr::new(u64::from(seq) << 12).unwrap(),
                last,
                private_data: seq
                    .is_multiple_of(6)
                    .then_some([u64::from(seq), !u64::from(seq)]),
            })
        }
    }
}

/// Whether the record with sequence number `seq` ends what the host stages at once.
fn ends_unit(seq: u32) -> bool {
    match fault_for(seq) {
        Fault::Unrecoverable(_) => true,
        Fault::PageRequest(r) => r.last,
    }
}

/// What the host stages at once, starting at `seq`.
enum Unit {
    Unrecoverable(UnrecoverableFault),
    Group([PageRequest; 4], usize),
}

impl Unit {
    fn at(seq: u32) -> Self {
        match fault_for(seq) {
            Fault::Unrecoverable(u) => Unit::Unrecoverable(u),
            Fault::PageRequest(first) => {
                let mut pages = [first; 4];
                let mut len = 1;
                while !pages[len - 1].last {
                    match fault_for(seq + len as u32) {
                        Fault::PageRequest(r) => pages[len] = r,
                        Fault::Unrecoverable(_) => unreachable!("groups end with LAST_PAGE"),
                    }
                    len += 1;
                }
                Unit::Group(pages, len)
            }
        }
    }

    fn len(&self) -> u32 {
        match self {
            Unit::Unrecoverable(_) => 1,
            Unit::Group(_, len) => *len as u32,
        }
    }
}

/// The VMM's answer to a group: `Invalid` for every fifth cookie, `Success` otherwise.
fn response_for(last_page: &PageRequest) -> PageResponse {
    PageResponse::answering(
        last_page,
        if last_page.cookie.get().is_multiple_of(5) {
            ResponseCode::Invalid
        } else {
            ResponseCode::Success
        },
    )
}

/// Groups (responses owed) among records `1..=records`.
fn groups_in(records: u32) -> usize {
    (1..=records)
        .filter(|&s| matches!(fault_for(s), Fault::PageRequest(r) if r.last))
        .count()
}

const CHECKSUM_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds a record's eight words into a running checksum (order-sensitive).
fn checksum(sum: u64, record: &FaultRecord) -> u64 {
    record.as_bytes().chunks_exact(8).fold(sum, |h, word| {
        (h ^ u64::from_le_bytes(word.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// The parent's side of the process plumbing.
// ---------------------------------------------------------------------------------------------

/// A child test process, its socket, and the temporary directory the socket lives in.
/// Dropping it kills the child if it still runs (the parent failed) and removes the directory.
struct Peer {
    child: Child,
    stream: Option<BufReader<UnixStream>>,
    dir: PathBuf,
    output: Option<(JoinHandle<String>, JoinHandle<String>)>,
    deadline: Instant,
    status: Option<ExitStatus>,
}

impl Peer {
    /// Spawns this test binary running only `child_test`, and accepts its connection.
    fn spawn(child_test: &str, mode: &str) -> Self {
        static UNIQUE: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "iopf-2p-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed),
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("sock");
        // A socket left by an earlier process with the same pid would make bind fail.
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
            .env(ENV_SOCKET, &socket)
            .env(ENV_MODE, mode)
            .env(ENV_PARENT, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = (
            read_to_string_in_background(child.stdout.take().unwrap()),
            read_to_string_in_background(child.stderr.take().unwrap()),
        );
        let mut peer = Peer {
            child,
            stream: None,
            dir,
            output: Some(output),
            deadline: Instant::now() + CHILD_DEADLINE,
            status: None,
        };
        listener.set_nonblocking(true).unwrap();
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    peer.check_alive("waiting for the child to connect");
                    // Bounded polling: the loop ends at the deadline (check_alive fails then).
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        peer.stream = Some(BufReader::new(stream));
        peer
    }

    fn socket(&self) -> &UnixStream {
        self.stream.as_ref().unwrap().get_ref()
    }

    /// Sends the fds (regions and doorbells) in one `SCM_RIGHTS` message.
    fn send_fds(&self, fds: &[BorrowedFd<'_>]) {
        send_with_fds(self.socket(), b"IOPF", fds).unwrap();
    }

    /// Fails (with the child's output) if the child has exited or the deadline has passed.
    fn check_alive(&mut self, doing: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            self.status = Some(status);
            self.fail(&format!("child exited with {status} while {doing}"));
        }
        if Instant::now() >= self.deadline {
            self.fail(&format!("deadline passed while {doing}"));
        }
    }

    /// Reads one line the child sent, within the deadline.
    fn read_line(&mut self, doing: &str) -> String {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let stream = self.stream.as_mut().unwrap();
        stream
            .get_ref()
            .set_read_timeout(Some(remaining.max(Duration::from_millis(1))))
            .unwrap();
        let mut line = String::new();
        match stream.read_line(&mut line) {
            Ok(n) if n > 0 && line.ends_with('\n') => {
                line.pop();
                line
            }
            Ok(_) => self.fail(&format!("socket closed while {doing} (got {line:?})")),
            Err(e) => self.fail(&format!("socket error while {doing}: {e}")),
        }
    }

    /// Waits for the child to exit (killing it at the deadline) and returns its status and
    /// output.
    fn finish(mut self) -> (ExitStatus, String) {
        let status = loop {
            if let Some(status) = self.status.or_else(|| self.child.try_wait().unwrap()) {
                break status;
            }
            if Instant::now() >= self.deadline {
                self.fail("deadline passed while waiting for the child to exit");
            }
            // Bounded polling of the child's exit, ended by the deadline above.
            std::thread::sleep(Duration::from_millis(2));
        };
        self.status = Some(status);
        (status, self.collect_output())
    }

    fn collect_output(&mut self) -> String {
        match self.output.take() {
            Some((out, err)) => format!(
                "--- child stdout ---\n{}\n--- child stderr ---\n{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            ),
            None => String::new(),
        }
    }

    /// Kills the child (if it still runs), then panics with `why` and the child's output.
    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        let output = self.collect_output();
        panic!("{why}\n{output}");
    }

    fn kill(&mut self) {
        if self.status.is_none() {
            // Our own child, by its pid.
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_to_string_in_background(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Parses the child's `done key=value ...` line.
fn parse_summary(line: &str) -> std::collections::HashMap<String, u64> {
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("done"), "summary line: {line:?}");
    words
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_owned(), v.parse().expect("a number"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The child's side.
// ---------------------------------------------------------------------------------------------

/// What a child test gets from its parent.
struct ChildContext {
    stream: UnixStream,
    fds: Vec<OwnedFd>,
    mode: String,
    deadline: Instant,
    parent: i32,
}

impl ChildContext {
    /// `None` outside a child process (the env var is absent): the child test is a no-op.
    fn from_env() -> Option<Self> {
        let socket = std::env::var_os(ENV_SOCKET)?;
        let deadline = Instant::now() + CHILD_DEADLINE;
        let parent: i32 = std::env::var(ENV_PARENT).unwrap().parse().unwrap();
        let stream = UnixStream::connect(socket).unwrap();
        stream.set_read_timeout(Some(CHILD_DEADLINE)).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(&stream, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"IOPF");
        Some(Self {
            stream,
            fds,
            mode: std::env::var(ENV_MODE).unwrap_or_default(),
            deadline,
            parent,
        })
    }

    fn take_fd(&mut self) -> OwnedFd {
        self.fds.remove(0)
    }

    fn send_line(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }

    /// Gives up at the deadline, or as soon as the parent test process is gone (an orphan
    /// must not keep spinning).
    fn check_deadline(&self, doing: &str) {
        assert!(
            Instant::now() < self.deadline,
            "child: deadline passed while {doing}"
        );
        let ppid = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        assert_eq!(ppid, self.parent, "child: the parent test process is gone");
    }
}

/// Checks the VMM's view of records in order: each one decodes to exactly `fault_for(seq)`.
struct Checker {
    next: u32,
    sum: u64,
    error: Option<String>,
}

impl Checker {
    fn new() -> Self {
        Self {
            next: 1,
            sum: CHECKSUM_SEED,
            error: None,
        }
    }

    /// Checks one record; returns the page request it decoded to, if any.
    fn check(&mut self, record: &FaultRecord) -> Option<PageRequest> {
        let seq = self.next;
        self.next = self.next.wrapping_add(1);
        self.sum = checksum(self.sum, record);
        if self.error.is_some() {
            return None;
        }
        let expected = fault_for(seq);
        match record.decode() {
            Ok(fault) if fault == expected => match fault {
                Fault::PageRequest(r) => Some(r),
                Fault::Unrecoverable(_) => None,
            },
            other => {
                self.error = Some(format!(
                    "record {seq}: expected {expected:?}, got {other:?} ({record:?})"
                ));
                None
            }
        }
    }

    /// Fails on the first bad record; after a drain that emptied the ring, the last record
    /// read must end a group (the host publishes whole groups only).
    fn after_drain(&self, drained: usize) {
        if let Some(e) = &self.error {
            panic!("child: {e}");
        }
        let last = self.next - 1;
        assert!(
            drained == 0 || ends_unit(last),
            "child: a drain of everything published ended inside a group, at record {last}"
        );
    }

    fn count(&self) -> u32 {
        self.next - 1
    }
}

/// The child of the one-million-record tests: drains and checks every record.
#[test]
fn child_vmm_drains_and_checks_fault_queue() {
    let Some(mut ctx) = ChildContext::from_env() else {
        return;
    };
    let blocking = match ctx.mode.as_str() {
        "blocking" => true,
        "busy" => false,
        other => panic!("unknown {ENV_MODE} {other:?}"),
    };
    let region = ctx.take_fd();
    let doorbell = Doorbell::from_fd(ctx.take_fd()).unwrap();
    let mut faults = FaultQueueConsumer::attach(region, doorbell).unwrap();
    faults.set_spin(BLOCKING_SPIN);
    ctx.send_line("ready");

    let mut checker = Checker::new();
    let (mut idle_polls, mut timeouts) = (0u64, 0u64);
    while checker.count() < MILLION {
        let drained = faults
            .drain(usize::MAX, |record| {
                checker.check(&record);
            })
            .unwrap();
        checker.after_drain(drained);
        if drained > 0 {
            continue;
        }
        if blocking {
            // The host never pauses for seconds: a timeout here is a lost wake-up.
            if faults.wait(Some(Duration::from_secs(5))).unwrap() == 0 {
                timeouts += 1;
            }
            ctx.check_deadline("waiting for faults");
        } else {
            // Poll without ever sleeping on the doorbell. Yield now and then: with more
            // runnable threads than CPUs (parallel tests, a busy CI machine), a pure spin burns
            // whole time slices the producer needs (measured: fifty times slower with one of two
            // CPUs taken by another job).
            core::hint::spin_loop();
            idle_polls += 1;
            if idle_polls.is_multiple_of(64) {
                std::thread::yield_now();
            }
            if idle_polls.is_multiple_of(1 << 16) {
                ctx.check_deadline("polling for faults");
            }
        }
    }
    // Nothing beyond the last record: no duplicate, no stray publish.
    let extra = faults
        .drain(usize::MAX, |r| panic!("extra record {r:?}"))
        .unwrap();
    assert_eq!(extra, 0);
    let summary = format!(
        "done count={} checksum={} sleeps={} timeouts={timeouts} lost={} broken={}",
        checker.count(),
        checker.sum,
        faults.sleeps(),
        faults.lost(),
        u8::from(faults.broken().is_some()),
    );
    ctx.send_line(&summary);
}

/// The child of the round trip: drains page requests and answers each group.
#[test]
fn child_vmm_answers_page_requests() {
    let Some(mut ctx) = ChildContext::from_env() else {
        return;
    };
    let fault_region = ctx.take_fd();
    let fault_doorbell = Doorbell::from_fd(ctx.take_fd()).unwrap();
    let response_region = ctx.take_fd();
    let host_doorbell = Doorbell::from_fd(ctx.take_fd()).unwrap();
    let mut faults = FaultQueueConsumer::attach(fault_region, fault_doorbell).unwrap();
    faults.set_spin(BLOCKING_SPIN);
    let mut responses =
        ResponseQueueProducer::attach(response_region, Some(host_doorbell)).unwrap();
    ctx.send_line("ready");

    let mut checker = Checker::new();
    let mut pending: Vec<PageResponse> = Vec::new();
    let (mut sent, mut timeouts) = (0u64, 0u64);
    loop {
        if !pending.is_empty() {
            let staged = responses.stage_some(&pending).unwrap();
            pending.drain(..staged);
            if staged > 0 {
                responses.publish().unwrap();
                sent += staged as u64;
            }
            if !pending.is_empty() {
                // The host has not drained yet: let it run.
                std::thread::yield_now();
                ctx.check_deadline("waiting for room in the response queue");
                continue;
            }
        }
        if checker.count() >= ROUND_TRIP_RECORDS {
            break;
        }
        let drained = faults
            .drain(usize::MAX, |record| {
                if let Some(r) = checker.check(&record).filter(|r| r.last) {
                    pending.push(response_for(&r));
                }
            })
            .unwrap();
        checker.after_drain(drained);
        if drained == 0 {
            if faults.wait(Some(Duration::from_secs(5))).unwrap() == 0 {
                timeouts += 1;
            }
            ctx.check_deadline("waiting for page requests");
        }
    }
    let summary = format!(
        "done count={} checksum={} responses={} sleeps={} timeouts={timeouts} kicks={}",
        checker.count(),
        checker.sum,
        sent,
        faults.sleeps(),
        responses.kicks(),
    );
    ctx.send_line(&summary);
}

// ---------------------------------------------------------------------------------------------
// The parent tests.
// ---------------------------------------------------------------------------------------------

/// What the host did while publishing.
struct HostRun {
    checksum: u64,
    publishes: u64,
    /// Times the host found the ring full and yielded.
    backoffs: u64,
    elapsed: Duration,
}

/// Stages `unit` if it fits and returns `true`; returns `false`, with nothing staged, if the
/// ring is full. `staged_total` is how many records were staged before.
fn try_stage(faults: &mut FaultQueueProducer, unit: &Unit, staged_total: u32) -> bool {
    match unit {
        Unit::Unrecoverable(fault) => {
            // An unrecoverable fault that does not fit is dropped (and counted), so stage one
            // only when the VMM's index says there is room: none may go missing here.
            let nb = faults.memory().geometry().nb_entries();
            let cons = faults.memory().vmm_page().snapshot().index.get();
            let used = staged_total.wrapping_sub(cons);
            assert!(used <= nb, "VMM index {cons} is ahead of {staged_total}");
            if used == nb {
                return false;
            }
            assert_eq!(faults.stage_unrecoverable(fault), Ok(Staged::Queued));
            true
        }
        Unit::Group(pages, len) => match faults.stage_group(&pages[..*len]) {
            Ok(()) => true,
            Err(PushError::Full) => false,
            Err(e) => panic!("host: stage_group: {e}"),
        },
    }
}

/// Publishes records `1..=records` in batches, backing off (yield) when the ring is full.
fn host_publishes_all(faults: &mut FaultQueueProducer, peer: &mut Peer, records: u32) -> HostRun {
    let start = Instant::now();
    let (mut seq, mut staged_total, mut in_batch) = (1u32, 0u32, 0u32);
    let (mut sum, mut publishes, mut backoffs) = (CHECKSUM_SEED, 0u64, 0u64);
    while seq <= records {
        let unit = Unit::at(seq);
        let staged = try_stage(faults, &unit, staged_total);
        if staged {
            for s in seq..seq + unit.len() {
                sum = checksum(sum, &FaultRecord::from(&fault_for(s)));
            }
            seq += unit.len();
            staged_total = staged_total.wrapping_add(unit.len());
            in_batch += unit.len();
            if in_batch >= BATCH {
                faults.publish().unwrap();
                (in_batch, publishes) = (0, publishes + 1);
            }
        } else if in_batch > 0 {
            faults.publish().unwrap();
            (in_batch, publishes) = (0, publishes + 1);
        } else {
            std::thread::yield_now();
            backoffs += 1;
            if backoffs.is_multiple_of(256) {
                peer.check_alive("publishing faults");
            }
        }
    }
    if in_batch > 0 {
        faults.publish().unwrap();
        publishes += 1;
    }
    HostRun {
        checksum: sum,
        publishes,
        backoffs,
        elapsed: start.elapsed(),
    }
}

fn one_million_faults(mode: &str) {
    let mut faults = FaultQueueProducer::create(FAULT_RING).unwrap();
    faults.set_live(true);
    let doorbell = Doorbell::new().unwrap();
    let mut peer = Peer::spawn("child_vmm_drains_and_checks_fault_queue", mode);
    peer.send_fds(&[faults.memory().fd(), doorbell.as_fd()]);
    faults.set_doorbell(Some(doorbell));
    assert_eq!(peer.read_line("waiting for the child to attach"), "ready");
    assert!(faults.consumer_attached());

    let start = Instant::now();
    let run = host_publishes_all(&mut faults, &mut peer, MILLION);
    let summary = peer.read_line("waiting for the child's summary");
    // From the first publish to the VMM's report that it checked the last record.
    let elapsed = start.elapsed();
    let (status, output) = peer.finish();
    assert!(status.success(), "child failed: {status}\n{output}");
    let summary = parse_summary(&summary);

    assert_eq!(summary["count"], u64::from(MILLION), "{output}");
    assert_eq!(summary["checksum"], run.checksum, "{output}");
    assert_eq!(summary["lost"], 0);
    assert_eq!(summary["broken"], 0);
    assert_eq!(
        summary["timeouts"], 0,
        "the VMM slept 5 s with records pending: a lost wake-up"
    );
    assert_eq!(faults.lost(), 0);
    assert_eq!(faults.broken(), None);
    // The consumer's Drop says it left.
    assert!(!faults.consumer_attached());

    let (sleeps, kicks) = (summary["sleeps"], faults.kicks());
    eprintln!(
        "two processes, {mode}: {MILLION} records in {elapsed:.2?} ({:.2} M records/s), \
         host done publishing after {:.2?}, {} publishes, {} full-ring backoffs, {kicks} kicks, {sleeps} consumer sleeps",
        f64::from(MILLION) / elapsed.as_secs_f64() / 1e6,
        run.elapsed,
        run.publishes,
        run.backoffs,
    );
    if mode == "blocking" {
        assert!(
            sleeps > 0,
            "the consumer never slept: the doorbell path did not run"
        );
        assert!(kicks > 0, "the producer never rang the doorbell");
        assert!(
            kicks <= u64::from(MILLION) / 10 && kicks <= run.publishes,
            "{kicks} kicks for {} publishes: wake-up suppression does not work",
            run.publishes
        );
    } else {
        assert_eq!(sleeps, 0, "a busy-polling consumer slept");
        assert_eq!(
            kicks, 0,
            "the producer rang a doorbell nobody sleeps on (NEED_WAKEUP was never set)"
        );
    }
}

#[test]
fn one_million_faults_cross_processes_in_order_with_a_sleeping_consumer() {
    one_million_faults("blocking");
}

#[test]
fn one_million_faults_cross_processes_in_order_with_a_busy_polling_consumer() {
    one_million_faults("busy");
}

#[test]
fn every_page_request_group_gets_its_response_back_across_processes() {
    let mut faults = FaultQueueProducer::create(256).unwrap();
    faults.set_live(true);
    let mut responses = ResponseQueueConsumer::create(256, Doorbell::new().unwrap()).unwrap();
    responses.set_live(true);
    responses.set_spin(0);
    let fault_doorbell = Doorbell::new().unwrap();
    let mut peer = Peer::spawn("child_vmm_answers_page_requests", "blocking");
    peer.send_fds(&[
        faults.memory().fd(),
        fault_doorbell.as_fd(),
        responses.memory().fd(),
        responses.doorbell().as_fd(),
    ]);
    faults.set_doorbell(Some(fault_doorbell));
    assert_eq!(peer.read_line("waiting for the child to attach"), "ready");

    let owed = groups_in(ROUND_TRIP_RECORDS);
    let start = Instant::now();
    let mut expected = std::collections::VecDeque::new();
    let (mut seq, mut sum, mut answered) = (1u32, CHECKSUM_SEED, 0usize);
    let (mut host_sleeps, mut host_timeouts) = (0u64, 0u64);
    let mut staged_total = 0u32;
    while answered < owed {
        // Once every response is in, stage the next window (what fits of it) and publish it.
        let mut in_batch = 0;
        let refill = expected.is_empty();
        while refill && seq <= ROUND_TRIP_RECORDS && expected.len() < WINDOW {
            let unit = Unit::at(seq);
            if !try_stage(&mut faults, &unit, staged_total) {
                break; // The VMM is behind: send the rest of the window later.
            }
            staged_total = staged_total.wrapping_add(unit.len());
            if let Unit::Group(pages, len) = &unit {
                expected.push_back(response_for(&pages[*len - 1]));
            }
            for s in seq..seq + unit.len() {
                sum = checksum(sum, &FaultRecord::from(&fault_for(s)));
            }
            seq += unit.len();
            in_batch += unit.len();
        }
        if in_batch > 0 {
            faults.publish().unwrap();
        }
        // Drain and check every response, in order.
        let mut bad = None;
        let drained = responses
            .drain(usize::MAX, |record| {
                let want = expected.pop_front();
                let got = record.decode();
                if bad.is_none() && (want.is_none() || got != Ok(want.unwrap())) {
                    bad = Some(format!(
                        "response {answered}: expected {want:?}, got {got:?} ({record:?})"
                    ));
                }
                answered += 1;
            })
            .unwrap();
        if let Some(bad) = bad {
            peer.fail(&bad);
        }
        if drained == 0 && !expected.is_empty() {
            // Nothing to do until the VMM answers: sleep on the host's doorbell, the way an
            // event loop does (NEED_WAKEUP, re-check, sleep, clear).
            if responses.prepare_to_sleep().unwrap() {
                host_sleeps += 1;
                if !responses
                    .doorbell()
                    .wait(Some(Duration::from_secs(5)))
                    .unwrap()
                {
                    host_timeouts += 1;
                    // Only a sleep that no kick ended says the child may be gone: a child
                    // that published its last responses may exit before we drain them.
                    peer.check_alive("waiting for responses");
                }
                responses.woke();
            }
        }
    }
    let elapsed = start.elapsed();
    let summary = peer.read_line("waiting for the child's summary");
    let (status, output) = peer.finish();
    assert!(status.success(), "child failed: {status}\n{output}");
    let summary = parse_summary(&summary);
    assert_eq!(summary["count"], u64::from(ROUND_TRIP_RECORDS), "{output}");
    assert_eq!(summary["checksum"], sum, "{output}");
    assert_eq!(summary["responses"], owed as u64);
    assert!(expected.is_empty());
    // Nothing after the last response.
    assert_eq!(responses.drain(usize::MAX, |_| ()).unwrap(), 0);
    assert_eq!(responses.broken(), None);
    assert_eq!(faults.lost(), 0);
    assert_eq!(
        (host_timeouts, summary["timeouts"]),
        (0, 0),
        "(host, VMM) slept 5 s with work pending: a lost wake-up"
    );
    eprintln!(
        "round trip: {ROUND_TRIP_RECORDS} page request records, {owed} responses in \
         {elapsed:.2?} ({:.0} k groups/s); host slept {host_sleeps} times, VMM kicked the host \
         {} times, VMM slept {} times, host kicked the VMM {} times",
        owed as f64 / elapsed.as_secs_f64() / 1e3,
        summary["kicks"],
        summary["sleeps"],
        faults.kicks(),
    );
    // Every host sleep ended with a ring (no timeout, above), so the VMM rang at least once.
    assert!(
        host_sleeps == 0 || summary["kicks"] > 0,
        "the host slept on its doorbell {host_sleeps} times but the VMM never rang it"
    );
}
