//! The hostile-VMM process suite: a real `iopf host` serving two devices, a
//! well-behaved `iopf vmm` on one, and `iopf-hostile-vmm` (crates/hostile-vmm) misbehaving on the other in one way
//! per test. Whatever the hostile VMM does, the host must
//! - keep serving the good device to completion, undisturbed: every access completed, every
//!   group answered by its guest, nothing refused or answered by the host itself;
//! - lose no fault and answer every group exactly once, on both devices: the fault core's
//!   groups equal its answers, and the endpoint model saw exactly one response per group it
//!   sent (a second response would be counted `unexpected`, or as a second match);
//! - count what it refused (rejected responses, broken queues, dead connections), and the
//!   counts must match what the hostile VMM says it did.
//!
//! Where the hostile VMM breaks its own connection or queues, it leaves, and a fresh `iopf vmm`
//! attaches to the device's next handler life and finishes its workload.
//!
//! Nearby suites, not repeated here: `crates/vfio-user/tests/hostile.rs` (every malformed
//! vfio-user message against the server alone, including lying sizes, stalls and too many
//! fds), `crates/queue/tests/hostile_peer.rs` (garbage in the queue pages, seals, fds, eventfd
//! games, one process), `crates/cli/tests/run.rs` (garbage on the socket before any attach,
//! a VMM killed with thousands of groups pending, stale answers across a host unregister).

mod common;
use common::{Reaper, iopf, wait_for_socket};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The hostile VMM: a test-support binary of its own crate (`crates/hostile-vmm`), never part
/// of `iopf`. `cargo test --workspace` builds it next to `iopf`.
fn hostile_vmm() -> Command {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_iopf")).with_file_name("iopf-hostile-vmm");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p iopf-hostile-vmm` (or run the whole \
         suite with `cargo test --workspace`)",
        path.display()
    );
    Command::new(path)
}

/// The well-behaved VMM's device, and the hostile VMM's.
const GOOD: u64 = 1;
const HOSTILE: u64 = 2;

/// Accesses of the good device (two streams).
const GOOD_ACCESSES: u64 = 2 * 400;

/// How the host and the hostile device are set up for one test.
struct Case {
    behaviour: &'static str,
    /// Entries per queue (both devices).
    ring_entries: u32,
    /// The host's response timeout.
    timeout_ms: u64,
    /// The hostile device's Outstanding Page Request Allocation.
    hostile_allocation: u32,
    /// The hostile device's accesses (one page each), and the time between two.
    hostile_accesses: u32,
    hostile_interval_us: u64,
    /// The hostile VMM leaves before the end: a fresh good VMM finishes its device.
    replace: bool,
}

impl Case {
    fn new(behaviour: &'static str) -> Self {
        Self {
            behaviour,
            ring_entries: 256,
            timeout_ms: 10_000,
            hostile_allocation: 64,
            hostile_accesses: 300,
            hostile_interval_us: 20,
            replace: false,
        }
    }

    /// Device 1 is the good VMM's (it attaches first), device 2 the hostile VMM's. The guests
    /// refuse nothing, so every access of a device served well completes.
    fn scenario(&self) -> String {
        format!(
            r#"seed = 7
ring_entries = {ring}
response_timeout_ms = {timeout}

[guest]
latency_us = [2, 20]
refuse_rate = 0.0
pages = 4096

[[device]]
allocation = 64
[[device.stream]]
pasid = 1
pattern = "sequential"
pages = 512
access_len = 8192
write = true
accesses = {good}
interval_us = 5
[[device.stream]]
pasid = 2
pattern = "random"
pages = 512
access_len = 8192
write = false
accesses = {good}
interval_us = 5

[[device]]
allocation = {alloc}
[[device.stream]]
pasid = 1
pattern = "sequential"
pages = 512
access_len = 4096
write = true
accesses = {hostile}
interval_us = {interval}
"#,
            ring = self.ring_entries,
            timeout = self.timeout_ms,
            alloc = self.hostile_allocation,
            hostile = self.hostile_accesses,
            interval = self.hostile_interval_us,
            good = GOOD_ACCESSES / 2,
        )
    }
}

/// What a run produced: the host's JSON report and the hostile VMM's.
struct Outcome {
    host: Value,
    hostile: Value,
}

/// Waits until `vmm` holds a fault queue region (it has been handed a device).
fn wait_attached(vmm: &Reaper) {
    let fds = format!("/proc/{}/fd", vmm.0.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attached = std::fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().contains("iopf-fault-queue"))
            });
        if attached {
            return;
        }
        assert!(Instant::now() < deadline, "the good VMM never attached");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn good_vmm(socket: &Path, scenario: &Path) -> Reaper {
    Reaper(
        iopf()
            .args(["vmm", "--devices", "1", "--socket"])
            .arg(socket)
            .arg("--scenario")
            .arg(scenario)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits (bounded) for a child to exit and returns its output.
fn finish(mut child: Reaper, what: &str, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let placeholder = iopf()
        .arg("--version")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::mem::replace(&mut child.0, placeholder)
        .wait_with_output()
        .unwrap()
}

fn run(case: &Case, extra: &[&str]) -> Outcome {
    // Removed when the case ends, passed or failed.
    let tmp = tempfile::Builder::new()
        .prefix(&format!("iopf-hostile-{}-", case.behaviour))
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let socket = dir.join("host.sock");
    let scenario = dir.join("scenario.toml");
    std::fs::write(&scenario, case.scenario()).unwrap();
    let host = Reaper(
        iopf()
            .arg("host")
            .arg("--socket")
            .arg(&socket)
            .arg("--scenario")
            .arg(&scenario)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&socket);
    // The good VMM first: it takes device 1, and must hold it before the hostile VMM can hang
    // up and attach again (a connection takes the first free device).
    let good = good_vmm(&socket, &scenario);
    wait_attached(&good);
    let mut hostile = Reaper(
        hostile_vmm()
            .args(["--behaviour", case.behaviour, "--socket"])
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = hostile.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            lines.push(line);
        }
        lines
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the hostile VMM never attached");
    assert_eq!(first, "attached 2", "the hostile VMM must hold device 2");
    let mut _replacement = None;
    let mut hostile = Some(hostile);
    let mut hostile_out = None;
    if case.replace {
        let out = finish(
            hostile.take().unwrap(),
            "the hostile VMM",
            Duration::from_secs(30),
        );
        hostile_out = Some(out);
        _replacement = Some(good_vmm(&socket, &scenario));
    }
    let out = finish(host, "the host", Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "host failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let out = match hostile_out {
        Some(out) => out,
        None => finish(
            hostile.take().unwrap(),
            "the hostile VMM",
            Duration::from_secs(30),
        ),
    };
    let lines = reader.join().unwrap();
    assert!(
        out.status.success(),
        "hostile VMM failed: {lines:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = lines.last().expect("the hostile VMM's report");
    let hostile: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    // Shown when a test fails (the harness captures it otherwise).
    eprintln!("hostile VMM: {hostile}");
    eprintln!("host, hostile device: {}", device(&host, HOSTILE).0);
    let outcome = Outcome { host, hostile };
    assert_sound(&outcome);
    outcome
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn sum(v: &Value) -> u64 {
    v.as_object().unwrap().values().map(u).sum()
}

/// The fault core's counters and the endpoint's of device `id`.
fn device(r: &Value, id: u64) -> (&Value, &Value) {
    let core = r["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .unwrap_or_else(|| panic!("no device {id}: {r:#}"));
    let engine = r["engines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .unwrap_or_else(|| panic!("no engine {id}: {r:#}"));
    (&core["core"], engine)
}

/// What holds whatever the hostile VMM did: every group of both devices answered exactly
/// once, no fault lost, DMA landed where the guest mapped it, and the good device undisturbed.
fn assert_sound(o: &Outcome) {
    let r = &o.host;
    assert_eq!(r["unanswered_groups"], 0, "{r:#}");
    assert_eq!(r["dma_bytes_mismatched"], 0, "{r:#}");
    for id in [GOOD, HOSTILE] {
        let (core, engine) = device(r, id);
        let e = &engine["endpoint"];
        let answered = sum(&core["responses"]["guest"]) + sum(&core["responses"]["auto"]);
        assert_eq!(u(&core["groups"]), answered, "device {id}: {r:#}");
        // The device model sent exactly the groups the core saw, and got exactly one response
        // for each: none unexpected (a second answer, or one for a group not in flight).
        assert_eq!(e["groups"], core["groups"], "device {id}: {r:#}");
        assert_eq!(e["responses_matched"], e["groups"], "device {id}: {r:#}");
        assert_eq!(e["unexpected"], 0, "device {id}: {r:#}");
        assert_eq!(e["ignored"], 0, "device {id}: {r:#}");
        let failed = u(&e["failed_invalid"])
            + u(&e["failed_no_pri"])
            + u(&e["failed_retries"])
            + u(&e["failed_too_large"])
            + u(&e["failed_halted"]);
        assert_eq!(
            u(&e["accesses"]),
            u(&e["completed"]) + failed,
            "device {id}"
        );
        assert!(
            u(&core["groups"]) > 0,
            "device {id} saw no page request: {r:#}"
        );
        assert_eq!(engine["memory"]["bytes_mismatched"], 0, "device {id}");
        assert_eq!(engine["memory"]["read_mismatches"], 0, "device {id}");
    }
    // The good device: every access completed, every group answered by its guest, nothing
    // refused, nothing answered by the host, one handler life.
    let (core, engine) = device(r, GOOD);
    let e = &engine["endpoint"];
    assert_eq!(u(&e["accesses"]), GOOD_ACCESSES, "{r:#}");
    assert_eq!(u(&e["completed"]), GOOD_ACCESSES, "{r:#}");
    assert_eq!(sum(&core["refused"]), 0, "{r:#}");
    assert_eq!(sum(&core["responses"]["auto"]), 0, "{r:#}");
    assert_eq!(
        u(&core["responses"]["guest"]["success"]),
        u(&core["groups"])
    );
    assert_eq!(core["registrations"], 1, "{r:#}");
    assert_eq!(core["lost"], 0, "{r:#}");
}

/// The hostile device's counters.
/// On the hostile device every answer the host took came from the VMM's guest, as many as
/// the hostile VMM sent honestly, and the host answered none itself.
fn assert_every_group_answered_by_its_guest(o: &Outcome) {
    let c = hostile_core(o);
    assert_eq!(
        sum(&c["responses"]["guest"]),
        u(&o.hostile["honest"]),
        "{:#}",
        o.host
    );
    assert_eq!(sum(&c["responses"]["auto"]), 0, "{:#}", o.host);
}

fn hostile_core(o: &Outcome) -> &Value {
    device(&o.host, HOSTILE).0
}

/// What the host answered the hostile device's groups with, beyond its guest.
fn auto(o: &Outcome, reason: &str) -> u64 {
    u(&hostile_core(o)["responses"]["auto"][reason])
}

// Catches: a host that waits for ever on a group nobody answers (the run would hang), or
// answers it twice (timeout, then again at unregister), or lets the silent device's stalled
// credits slow the other device down to failure.
#[test]
fn a_vmm_that_never_answers_gets_every_group_timed_out_once() {
    let mut case = Case::new("silent");
    case.timeout_ms = 400;
    case.hostile_accesses = 60;
    let o = run(&case, &[]);
    let c = hostile_core(&o);
    let held = u(&o.hostile["held"]);
    assert!(held > 0, "{:#}", o.hostile);
    assert_eq!(u(&c["groups_delivered"]), held, "{:#}", o.host);
    assert_eq!(auto(&o, "timeout"), held, "{:#}", o.host);
    assert_eq!(sum(&c["responses"]["guest"]), 0);
    assert_eq!(sum(&c["refused"]), 0);
}

// Catches: a host that lets a duplicate through (the device would see a second response, or
// the run a group answered twice), or does not count duplicates as refused (`unknown_cookie`,
// shown to the VMM in the response queue's `rejected`).
#[test]
fn a_vmm_that_answers_every_group_twice_gets_each_second_answer_refused() {
    let o = run(&Case::new("answer-twice"), &[]);
    let (c, h) = (hostile_core(&o), &o.hostile);
    let honest = u(&h["honest"]);
    assert!(honest > 0);
    assert_eq!(u(&h["bogus"]), honest, "{h:#}");
    assert_eq!(sum(&c["responses"]["guest"]), honest, "{:#}", o.host);
    assert_eq!(u(&c["refused"]["unknown_cookie"]), honest, "{:#}", o.host);
    assert_eq!(sum(&c["refused"]), honest);
    assert_eq!(
        h["host_rejected"], h["bogus"],
        "the VMM sees the count in its region"
    );
    assert_eq!(sum(&c["responses"]["auto"]), 0, "{:#}", o.host);
}

// Catches: matching responses by (PASID, PRG index) instead of cookie; accepting a cookie the
// host issued to another device; accepting a pending cookie on another group's PASID/PRGI;
// letting cookie 0 through. Any of these would answer a group early (then its honest answer
// would be refused, and the counts below would not match) or disturb the good device.
#[test]
fn forged_cookies_and_other_devices_cookies_are_all_refused() {
    let o = run(&Case::new("forge-cookies"), &[]);
    let (c, h) = (hostile_core(&o), &o.hostile);
    let (honest, bogus) = (u(&h["honest"]), u(&h["bogus"]));
    assert!(honest > 0 && bogus >= 4 * honest, "{h:#}");
    assert_eq!(sum(&c["responses"]["guest"]), honest, "{:#}", o.host);
    assert_eq!(sum(&c["refused"]), bogus, "{:#}", o.host);
    assert!(u(&c["refused"]["unknown_cookie"]) >= 3 * honest);
    assert_eq!(
        u(&c["refused"]["malformed"]),
        honest,
        "cookie 0, once per group"
    );
    assert!(
        u(&c["refused"]["mismatch"]) > 0,
        "a pending cookie on the wrong group"
    );
    assert_eq!(h["host_rejected"], h["bogus"]);
    assert_eq!(sum(&c["responses"]["auto"]), 0, "{:#}", o.host);
}

// Catches: cookies reused across handler lives (a replayed answer would complete a new group
// that reuses the PRG index at once), groups owed at the hang-up left unanswered, or a device
// that cannot be attached again after its VMM left.
#[test]
fn answers_replayed_after_a_restart_are_refused_and_owed_groups_answered_once() {
    let o = run(&Case::new("replay-after-restart"), &[]);
    let (c, h) = (hostile_core(&o), &o.hostile);
    assert_eq!(h["lives"], 2, "{h:#}");
    assert_eq!(c["registrations"], 2, "{:#}", o.host);
    let held = u(&h["held"]);
    assert!(held >= 8, "{h:#}");
    // Every answer of the first life (24 groups or a few more), and the answers owed for the
    // held groups, replayed into the new life's response queue: each one refused.
    assert_eq!(h["bogus"], h["replayed"], "{h:#}");
    assert!(u(&h["replayed"]) >= 24 + held, "{h:#}");
    assert_eq!(sum(&c["refused"]), u(&h["bogus"]), "{:#}", o.host);
    assert_eq!(u(&c["refused"]["unknown_cookie"]), u(&h["bogus"]));
    assert_eq!(
        sum(&c["responses"]["guest"]),
        u(&h["honest"]),
        "{:#}",
        o.host
    );
    assert!(auto(&o, "vmm_gone") >= held, "{:#}", o.host);
}

// Catches: a host that reads only the fault region's `abi` (docs/PROTOCOL.md §4.5: the VMM
// writes `abi` = 1 in both regions) and so delivers page requests to, and takes answers from,
// a VMM whose response region says it is not attached.
#[test]
fn a_vmm_whose_response_region_abi_is_0_gets_its_page_requests_answered_invalid() {
    let o = run(&Case::new("response-abi-zero"), &[]);
    let (c, h) = (hostile_core(&o), &o.hostile);
    assert_eq!(h["groups_after_strike"], 0, "{h:#}");
    assert_eq!(h["honest"], 0, "{h:#}");
    assert_eq!(u(&c["groups_delivered"]), 0, "{:#}", o.host);
    let not_attached = auto(&o, "not_attached");
    assert!(not_attached > 0, "{:#}", o.host);
    assert_eq!(u(&c["groups"]), not_attached, "{:#}", o.host);
    assert_eq!(sum(&c["responses"]["guest"]), 0, "{:#}", o.host);
    assert_eq!(sum(&c["refused"]), 0, "{:#}", o.host);
    // Every access of the device failed: its page requests were answered `Invalid`.
    let (_, engine) = device(&o.host, HOSTILE);
    assert_eq!(engine["endpoint"]["completed"], 0, "{:#}", o.host);
}

/// A case where the hostile VMM breaks its own queues or connection and leaves.
fn leaving(behaviour: &'static str) -> Case {
    Case {
        replace: true,
        ..Case::new(behaviour)
    }
}

/// What holds after the hostile VMM broke its handler life and left: the groups it held were
/// answered by the host (for `reason`, or because the VMM then went away), and a fresh VMM
/// attached to a new handler life and finished the device's workload.
fn assert_held_groups_answered_and_device_reattached(o: &Outcome, reasons: &[&str]) {
    let (c, h) = (hostile_core(o), &o.hostile);
    let held = u(&h["held"]);
    assert!(held >= 8, "{h:#}");
    let by_host: u64 = reasons.iter().map(|r| auto(o, r)).sum();
    assert!(
        by_host >= held,
        "{held} held, {by_host} answered for {reasons:?}: {:#}",
        o.host
    );
    assert_eq!(c["registrations"], 2, "a second handler life: {:#}", o.host);
    assert!(u(&c["responses"]["guest"]["success"]) > 0, "{:#}", o.host);
}

// Catches: a host that trusts the VMM's fault queue `cons` (it would overwrite records not yet
// read, or index out of bounds), does not notice the break, or leaves the groups pending on
// the broken queue unanswered; and a device that cannot get a new VMM afterwards.
#[test]
fn a_fault_queue_cons_past_prod_breaks_only_that_queue() {
    // The host reads `cons` again only when its copy says the ring is full. So the hostile
    // device may have more requests outstanding than the ring holds, and keeps issuing them
    // (one a millisecond) after the garbage is written: the host must run out of room, look,
    // and find it.
    let mut case = leaving("cons-past-prod");
    case.ring_entries = 64;
    case.hostile_allocation = 256;
    case.hostile_interval_us = 1000;
    let o = run(&case, &[]);
    assert_eq!(o.hostile["unregistered"], true, "{:#}", o.hostile);
    assert!(
        auto(&o, "queue_broken") >= u(&o.hostile["held"]),
        "{:#}",
        o.host
    );
    assert_held_groups_answered_and_device_reattached(&o, &["queue_broken"]);
}

// Catches: a host that reads response records past what the VMM may have written (a `prod`
// more than a ring ahead), or keeps reading a broken ring, or leaves its pending groups.
#[test]
fn a_response_queue_prod_past_the_ring_breaks_only_that_queue() {
    let o = run(&leaving("prod-past-ring"), &[]);
    assert_eq!(o.hostile["unregistered"], true, "{:#}", o.hostile);
    assert!(
        auto(&o, "queue_broken") >= u(&o.hostile["held"]),
        "{:#}",
        o.host
    );
    assert_eq!(
        sum(&hostile_core(&o)["refused"]),
        0,
        "no garbage record was read"
    );
    assert_held_groups_answered_and_device_reattached(&o, &["queue_broken"]);
}

// Catches: a host whose wake-up logic depends on the VMM's flags for correctness (a lost
// wake-up would leave groups to the timeout, or a spurious one break something).
#[test]
fn need_wakeup_flipped_at_random_costs_nothing_but_wake_ups() {
    let o = run(&Case::new("flip-need-wakeup"), &[]);
    let (c, h) = (hostile_core(&o), &o.hostile);
    assert!(u(&h["flips"]) > 0, "{h:#}");
    assert_every_group_answered_by_its_guest(&o);
    assert_eq!(sum(&c["refused"]), 0);
    assert_eq!(c["registrations"], 1);
}

// Catches: a host that blocks on a saturated eventfd whose O_NONBLOCK the VMM cleared (the
// device's engine would hang), treats EAGAIN on the doorbell as a broken queue, or counts
// doorbell rings as responses.
#[test]
fn a_flooded_and_saturated_doorbell_does_not_stall_the_host() {
    let o = run(&Case::new("flood-doorbells"), &[]);
    let (c, h) = (hostile_core(&o), &o.hostile);
    assert!(u(&h["rings"]) > 1000, "{h:#}");
    assert_every_group_answered_by_its_guest(&o);
    assert_eq!(sum(&c["refused"]), 0);
}

// Catches: an unsealed or under-sealed region memfd (a VMM that shrinks it makes the host's
// next access to its mapping SIGBUS: the host process dies, and the good device with it).
#[test]
fn the_queue_memfds_cannot_be_truncated_grown_or_resealed() {
    let o = run(&Case::new("truncate"), &[]);
    let h = &o.hostile;
    let attempts = h["attempts"].as_object().unwrap();
    assert_eq!(attempts.len(), 14, "{h:#}");
    for (what, result) in attempts {
        if what.ends_with("len_unchanged") {
            assert_eq!(result, "true", "{what}");
        } else {
            assert_eq!(result, "EPERM", "{what}");
        }
    }
    assert_every_group_answered_by_its_guest(&o);
}

// Catches: a host that reads back anything it trusts from shared memory (its own page
// included), reads a record twice (check, then use), or crashes on holes punched in the file.
#[test]
fn scribbling_over_every_byte_of_both_regions_breaks_only_that_device() {
    let o = run(&leaving("scribble"), &[]);
    assert!(
        o.hostile["attempts"]["scribble_rounds"]
            .as_str()
            .is_some_and(|n| n.parse::<u64>().unwrap() > 0)
    );
    assert!(auto(&o, "queue_broken") > 0, "{:#}", o.host);
    assert_held_groups_answered_and_device_reattached(&o, &["queue_broken", "vmm_gone"]);
}

// Catches: a server that believes a message's size (allocating it, or waiting for it) instead
// of closing the connection; and a host that does not treat that close as the VMM being gone.
#[test]
fn a_message_whose_size_lies_closes_the_connection_and_answers_held_groups() {
    let o = run(&leaving("lying-size"), &[]);
    assert_eq!(o.hostile["host_closed"], true, "{:#}", o.hostile);
    assert!(
        auto(&o, "vmm_gone") >= u(&o.hostile["held"]),
        "{:#}",
        o.host
    );
    assert_held_groups_answered_and_device_reattached(&o, &["vmm_gone"]);
    assert_broken_disconnect(&o);
}

// Catches: a server that accepts (or leaks) fds beyond the protocol's limit, or keeps a
// connection whose fds were truncated by the kernel.
#[test]
fn a_message_with_too_many_fds_closes_the_connection_and_answers_held_groups() {
    let o = run(&leaving("too-many-fds"), &[]);
    assert_eq!(o.hostile["host_closed"], true, "{:#}", o.hostile);
    assert_held_groups_answered_and_device_reattached(&o, &["vmm_gone"]);
    assert_broken_disconnect(&o);
}

// Catches: a server that waits for the rest of a message from a VMM that is gone, or a host
// that does not answer the groups a VMM held when it hung up mid-message.
#[test]
fn a_vmm_that_hangs_up_mid_message_has_its_held_groups_answered() {
    let o = run(&leaving("disconnect-mid-message"), &[]);
    assert_held_groups_answered_and_device_reattached(&o, &["vmm_gone"]);
    assert_broken_disconnect(&o);
}

/// The host says why the hostile VMM's connection ended: the stream broke (not a clean close).
fn assert_broken_disconnect(o: &Outcome) {
    let disconnects: Vec<&str> = o.host["disconnects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        disconnects
            .iter()
            .any(|d| d.starts_with(&format!("device {HOSTILE}: Broken"))),
        "{disconnects:?}"
    );
}
