//! The host and VMM as separate processes over vfio-user: a whole run, a VMM killed with
//! groups pending and replaced, and garbage sent to the host's socket.

mod common;
use common::{Reaper, iopf, socket_path, wait_for_socket};

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn host(socket: &Path, args: &[&str]) -> Reaper {
    Reaper(
        iopf()
            .arg("host")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn vmm(socket: &Path, args: &[&str]) -> Reaper {
    Reaper(
        iopf()
            .arg("vmm")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits for the host to finish (bounded) and returns its JSON report.
fn report(mut host: Reaper) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    while host.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the host did not finish in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = std::mem::replace(&mut host.0, iopf().arg("--version").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "host failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Runs an `iopf` command that prints a JSON report, and returns the report (failing with its
/// output if it failed).
/// Runs `command` (an `iopf run --json`) to success, with its own `TMPDIR`, which it must
/// leave empty.
fn run_json(command: &mut Command) -> serde_json::Value {
    let tmp = tempfile::TempDir::new().unwrap();
    let out = command.env("TMPDIR", tmp.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    let r: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(r["interrupted"], false, "{r:#}");
    r
}

fn assert_clean(r: &serde_json::Value) {
    assert_eq!(r["unanswered_groups"], 0, "{r:#}");
    assert_eq!(r["dma_bytes_mismatched"], 0, "{r:#}");
    assert!(r["dma_bytes_verified"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(
        r["accesses"],
        r["completed"].as_u64().unwrap() + r["failed"].as_u64().unwrap()
    );
}

#[test]
fn iopf_run_answers_every_group_and_verifies_every_dma_byte() {
    let r = run_json(iopf().args(["run", "--devices", "2", "--accesses", "1000", "--json"]));
    assert_clean(&r);
    assert!(r["groups"].as_u64().unwrap() > 0);
    assert_eq!(r["accesses"], 4000);
    assert!(r["latency_us"]["samples"].as_u64().unwrap() > 0);
}

/// A thousand devices on one host: every device's engine and VMM connection served by the
/// host's two reactor threads, every group answered, every DMA byte verified.
#[test]
fn iopf_run_serves_1024_devices_and_answers_every_group() {
    let r = run_json(iopf().args([
        "run",
        "--devices",
        "1024",
        "--accesses",
        "4",
        "--threads",
        "2",
        "--json",
    ]));
    assert_clean(&r);
    assert!(r["groups"].as_u64().unwrap() >= 1024, "{r:#}");
}

#[test]
fn killing_the_vmm_with_groups_pending_answers_them_and_a_new_vmm_finishes() {
    let (_dir, socket) = socket_path("kill");
    let host = host(
        &socket,
        &[
            "--devices",
            "8",
            "--accesses",
            "2000",
            "--allocation",
            "512",
            "--ring-entries",
            "4096",
        ],
    );
    wait_for_socket(&socket);
    // A guest that takes 10 s per answer: each device's groups pile up to its credits (512
    // requests), so about two thousand groups are pending across the eight devices.
    let mut slow = vmm(
        &socket,
        &["--devices", "8", "--latency-us", "10000000", "10000000"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    slow.0.kill().unwrap(); // SIGKILL: no goodbye, the socket just closes
    slow.0.wait().unwrap();
    let _fast = vmm(&socket, &["--devices", "8"]);
    let r = report(host);
    assert_clean(&r);
    let gone = r["core"]["responses"]["auto"]["vmm_gone"].as_u64().unwrap();
    assert!(
        gone >= 1000,
        "only {gone} groups were pending when the VMM died: {r:#}"
    );
    assert_eq!(r["core"]["refused"]["unknown_cookie"], 0);
    assert!(r["disconnects"].as_array().unwrap().len() >= 8);
}

#[test]
fn garbage_on_the_socket_does_not_stop_the_host_serving_a_real_vmm() {
    let (_dir, socket) = socket_path("garbage");
    let host = host(&socket, &["--devices", "1", "--accesses", "500"]);
    wait_for_socket(&socket);
    // A client that sends garbage, then one that stops mid-message, then one that lies about
    // its size: each gets an error or a closed connection, and frees the device again.
    for bytes in [
        &b"\xff\xfegarbage that is no vfio-user header at all"[..],
        &[1, 0, 3],
        &[0, 0, 1, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0],
    ] {
        let mut s = UnixStream::connect(&socket).unwrap();
        let _ = s.write_all(bytes);
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _vmm = vmm(&socket, &["--devices", "1"]);
    let r = report(host);
    assert_clean(&r);
    assert!(r["groups"].as_u64().unwrap() > 0);
}

#[test]
fn a_scenario_with_a_vmm_restart_loses_nothing_and_writes_an_html_report() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path().join("report");
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scenarios/vmm-restart.toml"
    );
    let r = run_json(
        iopf()
            .args(["run", "--scenario", scenario, "--json", "--report"])
            .arg(&dir),
    );
    assert_clean(&r);
    assert_eq!(r["vmm_restarts"], 1);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("Page request round trip"),
        "{html}"
    );
    assert!(html.contains("groups answered per second"));
}

/// Two VMM processes share four devices; the scenario's VMM restart kills one of them. Only
/// that VMM's two devices lose their connection (4 final closes + 2), where one VMM for all
/// four would show 4 + 4: the VMMs are separate processes, like separate virtual machines.
/// Catches a run that starts one VMM whatever `--vmms` says, or a restart that kills them all.
#[test]
fn several_vmm_processes_share_the_devices_and_a_restart_takes_down_only_one() {
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scenarios/vmm-restart.toml"
    );
    let r = run_json(iopf().args(["run", "--scenario", scenario, "--vmms", "2", "--json"]));
    assert_clean(&r);
    assert_eq!(r["vmm_restarts"], 1, "{r:#}");
    let disconnects = r["disconnects"].as_array().unwrap();
    assert_eq!(disconnects.len(), 6, "{r:#}");
    assert!(
        disconnects
            .iter()
            .all(|d| d.as_str().unwrap().ends_with(": closed")),
        "{r:#}"
    );
}

#[test]
fn a_bad_scenario_file_gets_a_clear_error() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "ring_entries = 100\n[[device]]\n[[device.stream]]\npages = 1\naccess_len = 8\naccesses = 1\n").unwrap();
    let out = iopf()
        .args(["run", "--scenario"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("power of two"),
        "{err}"
    );
}

/// The seed review's scenario across processes and vfio-user: the host unregisters a device's
/// handler while the guest still owes answers, the VMM attaches again to the new handler life,
/// and its late answers (through the new response queue) are refused by cookie.
#[test]
fn late_answers_from_an_earlier_handler_life_are_refused_across_processes() {
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scenarios/unregister.toml"
    );
    let r = run_json(iopf().args(["run", "--scenario", scenario, "--json"]));
    assert_clean(&r);
    let core = &r["core"];
    // Two devices, each unregistered once and attached again.
    assert_eq!(core["registrations"], 4, "{r:#}");
    let answered_at_unregister = core["responses"]["auto"]["unregister"].as_u64().unwrap();
    let refused = core["refused"]["unknown_cookie"].as_u64().unwrap();
    assert!(answered_at_unregister > 0, "{r:#}");
    assert!(refused > 0 && refused <= answered_at_unregister, "{r:#}");
    assert_eq!(core["refused"]["mismatch"], 0);
}

/// `iopf vmm --json` prints one account per device it served, and its groups are the host's.
#[test]
fn the_vmm_reports_its_account_as_json() {
    let (_dir, socket) = socket_path("vmm-json");
    let host = host(&socket, &["--devices", "2", "--accesses", "500"]);
    wait_for_socket(&socket);
    let out = iopf()
        .args(["vmm", "--devices", "2", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let accounts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let accounts = accounts.as_array().unwrap();
    assert_eq!(accounts.len(), 2);
    let r = report(host);
    let groups: u64 = accounts.iter().map(|a| a["groups"].as_u64().unwrap()).sum();
    assert_eq!(groups, r["groups"].as_u64().unwrap(), "{accounts:?}");
    assert!(accounts.iter().all(|a| a["handler_lives"] == 1));
}

/// `RUST_LOG=debug` shows the handler life on stderr, with each device's number: the host's
/// register and unregister, and the VMM's attach.
#[test]
fn debug_logging_shows_the_handler_life() {
    let out = iopf()
        .args(["run", "--devices", "1", "--accesses", "200", "--json"])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("fault handler registered"), "{log}");
    assert!(log.contains("fault handler unregistered"), "{log}");
    assert!(log.contains("attached"), "{log}");
    assert!(log.contains("register{device=1}"), "{log}");
    assert!(log.contains("attach{device=1}"), "{log}");
    // Without RUST_LOG: warnings only, so a clean run says nothing on stderr about handlers.
    let out = iopf()
        .args(["run", "--devices", "1", "--accesses", "200", "--json"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("fault handler registered"));
}
