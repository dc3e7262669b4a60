//! Signals, children and temporary files, with the real `iopf` binary: `SIGINT` (Ctrl-C, sent
//! to the whole process group) and `SIGTERM` (to the parent alone) stop `iopf run`, normal
//! and soak, within seconds, with an interrupted summary and the documented exit code, no
//! process left and no temporary directory left; `SIGKILL` of the parent takes its VMMs with
//! it. Each spawned `iopf` gets its own `TMPDIR`, checked empty once it has exited.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// `iopf` in a process group of its own (its children join it): whatever is left of the group
/// is killed when the test ends, failed or passed, so a failing test leaves no orphan either.
struct Group(Option<Child>, Pid);

impl Drop for Group {
    fn drop(&mut self) {
        // ESRCH when nothing is left: the normal case.
        let _ = rustix::process::kill_process_group(self.1, Signal::KILL);
        if let Some(child) = &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// `iopf ARGS` in a new process group, with `tmp` as its `TMPDIR`.
fn start(tmp: &tempfile::TempDir, args: &[&str]) -> Group {
    let child = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .args(args)
        .env("TMPDIR", tmp.path())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pgid = pid(&child);
    Group(Some(child), pgid)
}

fn pid(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32).unwrap()
}

/// The children of `pid`, once it has `n` and has been running for `settle` (the workload is
/// under way).
fn children(pid: Pid, n: usize, settle: Duration) -> Vec<i32> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    loop {
        let mut found = Vec::new();
        let dir = format!("/proc/{}/task", pid.as_raw_nonzero());
        for task in std::fs::read_dir(&dir).unwrap() {
            let list =
                std::fs::read_to_string(task.unwrap().path().join("children")).unwrap_or_default();
            found.extend(list.split_whitespace().map(|p| p.parse::<i32>().unwrap()));
        }
        if found.len() >= n && started.elapsed() >= settle {
            return found;
        }
        assert!(Instant::now() < deadline, "no {n} children: {found:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` still runs (a zombie does not: it is dead, waiting for a reaper).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        !state.starts_with('Z') && !state.starts_with('X')
    })
}

/// Waits for the process to exit, within `limit`, and collects its output. A process left
/// behind holding the output pipes (an orphaned VMM inherits stderr) fails the test rather
/// than hanging it.
fn exit_within(group: &mut Group, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    let child = group.0.as_mut().unwrap();
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "iopf still runs {limit:?} after the signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut child = group.0.take().unwrap();
    let status = child.wait().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for (index, pipe) in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            let _ = tx.send((index, bytes));
        });
    }
    let mut output = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    for _ in 0..2 {
        let (index, bytes) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("iopf exited, but a process it started still holds its output open");
        if index == 0 {
            output.stdout = bytes;
        } else {
            output.stderr = bytes;
        }
    }
    output
}

fn assert_nothing_left(tmp: &tempfile::TempDir, vmms: &[i32]) {
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    for &vmm in vmms {
        assert!(!alive(vmm), "VMM process {vmm} still runs");
    }
}

/// Signals `iopf ARGS` once it runs its VMMs (the group for `SIGINT`, like Ctrl-C; the parent
/// alone for `SIGTERM`, like `kill`), and checks it ends within 5 s with `code`, an
/// interrupted JSON report, no VMM left and nothing in its `TMPDIR`.
fn interrupt(args: &[&str], signal: Signal, code: i32) -> serde_json::Value {
    let tmp = tempfile::TempDir::new().unwrap();
    let mut group = start(&tmp, args);
    let parent = pid(group.0.as_ref().unwrap());
    let vmms = children(parent, 1, Duration::from_secs(2));
    if signal == Signal::INT {
        rustix::process::kill_process_group(parent, signal).unwrap();
    } else {
        rustix::process::kill_process(parent, signal).unwrap();
    }
    let out = exit_within(&mut group, Duration::from_secs(10));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(code), "{stdout}{stderr}");
    assert_nothing_left(&tmp, &vmms);
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
    assert_eq!(report["interrupted"], true, "{report:#}");
    // Stopped cleanly: every group the devices raised was answered.
    assert_eq!(report["unanswered_groups"], 0, "{report:#}");
    report
}

/// Long enough that only a signal ends it.
const LONG: &[&str] = &["run", "--accesses", "10000000", "--json"];

#[test]
fn sigint_to_the_group_stops_a_run_cleanly_with_130() {
    let r = interrupt(LONG, Signal::INT, 130);
    assert_eq!(r["signal"], "SIGINT");
    assert_eq!(r["vmm_restarts"], 0, "{r:#}");
}

#[test]
fn sigterm_to_the_parent_stops_a_run_and_its_vmms_with_143() {
    let r = interrupt(
        &["run", "--accesses", "10000000", "--vmms", "2", "--json"],
        Signal::TERM,
        143,
    );
    assert_eq!(r["signal"], "SIGTERM");
}

#[test]
fn sigint_ends_a_soak_as_its_end_not_as_chaos() {
    // Chaos every 10 s: none is due before the signal, so any restart would be the interrupt
    // mistaken for chaos.
    let r = interrupt(
        &["run", "--duration", "60s", "--chaos-every", "10s", "--json"],
        Signal::INT,
        130,
    );
    assert_eq!(r["vmm_restarts"], 0, "{r:#}");
    assert_eq!(r["soak"]["verdict"], "interrupted", "{r:#}");
    assert!(r["elapsed_s"].as_f64().unwrap() < 30.0, "{r:#}");
}

#[test]
fn sigterm_ends_a_soak_with_143() {
    let r = interrupt(&["run", "--duration", "60s", "--json"], Signal::TERM, 143);
    assert_eq!(r["soak"]["interrupted"], true, "{r:#}");
}

#[test]
fn a_plain_run_interrupted_prints_a_summary_marked_interrupted() {
    let tmp = tempfile::TempDir::new().unwrap();
    let mut group = start(&tmp, &["run", "--accesses", "10000000"]);
    let parent = pid(group.0.as_ref().unwrap());
    let vmms = children(parent, 1, Duration::from_secs(1));
    rustix::process::kill_process_group(parent, Signal::INT).unwrap();
    let out = exit_within(&mut group, Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    assert!(stdout.contains("INTERRUPTED by SIGINT"), "{stdout}");
    assert!(stdout.contains("unanswered groups          0"), "{stdout}");
    assert_nothing_left(&tmp, &vmms);
}

#[test]
fn sigkill_of_the_parent_takes_its_vmms_with_it() {
    let tmp = tempfile::TempDir::new().unwrap();
    let mut group = start(
        &tmp,
        &["run", "--accesses", "10000000", "--vmms", "2", "--json"],
    );
    let parent = pid(group.0.as_ref().unwrap());
    let vmms = children(parent, 2, Duration::from_millis(500));
    // The parent alone: the kernel must end its children (no destructor runs).
    rustix::process::kill_process(parent, Signal::KILL).unwrap();
    let out = exit_within(&mut group, Duration::from_secs(10));
    assert_eq!(out.status.code(), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while vmms.iter().any(|&vmm| alive(vmm)) {
        assert!(
            Instant::now() < deadline,
            "VMM processes {vmms:?} outlive their parent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exit_codes_are_documented_in_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for code in ["0 ", "1 ", "2 ", "3 ", "130", "143"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(code) && l.len() > 8),
            "{help}"
        );
    }
    // A usage error is 2.
    let out = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .args(["run", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_host_and_a_vmm_started_apart_stop_cleanly_on_their_own_signals() {
    let tmp = tempfile::TempDir::new().unwrap();
    let socket = tmp.path().join("host.sock");
    let socket = socket.to_str().unwrap();
    let mut host = start(
        &tmp,
        &[
            "host",
            "--socket",
            socket,
            "--accesses",
            "10000000",
            "--json",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(socket).exists() {
        assert!(Instant::now() < deadline, "the host never bound its socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Ctrl-C in the VMM's terminal: it leaves at once; its answers owed go to the host.
    let mut vmm = start(&tmp, &["vmm", "--socket", socket, "--devices", "2"]);
    std::thread::sleep(Duration::from_secs(1));
    rustix::process::kill_process_group(pid(vmm.0.as_ref().unwrap()), Signal::INT).unwrap();
    let out = exit_within(&mut vmm, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(130));
    // A second VMM attaches; `kill` of the host: it unregisters every device, answering what
    // is pending, and the VMM, told the host finished, leaves on its own with success.
    let mut vmm = start(&tmp, &["vmm", "--socket", socket, "--devices", "2"]);
    std::thread::sleep(Duration::from_secs(1));
    rustix::process::kill_process(pid(host.0.as_ref().unwrap()), Signal::TERM).unwrap();
    let out = exit_within(&mut host, Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(143), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(r["interrupted"], true, "{r:#}");
    assert_eq!(r["unanswered_groups"], 0, "{r:#}");
    let out = exit_within(&mut vmm, Duration::from_secs(10));
    assert!(out.status.success(), "{out:?}");
    assert_nothing_left(&tmp, &[]);
}

#[test]
fn sigint_stops_a_bench_and_its_peer_with_130() {
    let tmp = tempfile::TempDir::new().unwrap();
    let mut group = start(&tmp, &["bench", "--json"]);
    let parent = pid(group.0.as_ref().unwrap());
    let peers = children(parent, 1, Duration::from_secs(1));
    rustix::process::kill_process_group(parent, Signal::INT).unwrap();
    let out = exit_within(&mut group, Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    assert!(stdout.contains("\"interrupted\":true"), "{stdout}");
    assert_nothing_left(&tmp, &peers);
}

#[test]
fn sigterm_stops_a_demo_with_every_group_answered() {
    let tmp = tempfile::TempDir::new().unwrap();
    let mut group = start(&tmp, &["demo", "--groups", "1000000000"]);
    let parent = pid(group.0.as_ref().unwrap());
    let vmms = children(parent, 1, Duration::from_secs(1));
    rustix::process::kill_process(parent, Signal::TERM).unwrap();
    let out = exit_within(&mut group, Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(143), "{stdout}");
    assert!(stdout.contains("INTERRUPTED by SIGTERM"), "{stdout}");
    assert!(stdout.contains("unanswered groups: 0"), "{stdout}");
    assert_nothing_left(&tmp, &vmms);
}
