//! The backend against real Linux 6.12 and 7.2 kernels with `CONFIG_IOMMUFD_TEST`, booted
//! under QEMU: the fault-queue checks on both, the vIOMMU/vEVENTQ checks on 7.2 (on 6.12 they
//! must say `skip`, never `ok`).
//!
//! `scripts/kernel` builds the kernels (cached under `~/.cache/iopf`); each test builds
//! `iopf-kernel-check` statically, packs it as `/init` of an initramfs, boots it with TCG and
//! asserts every line it prints. Outside CI, a missing kernel or QEMU makes the test ignored,
//! with the reason (decided by `build.rs`, which rebuilds when either appears); in CI
//! (`CI=true`) the test runs and fails on what is missing, because CI installs and builds them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TARGET: &str = "x86_64-unknown-linux-gnu";
/// How long QEMU may run (boot is about a second under TCG; the checks a few more).
const QEMU_TIMEOUT: Duration = Duration::from_secs(300);
const FAULT_QUEUE_CHECKS: [&str; 8] = [
    "setup",
    "round_trip",
    "kernel_refusals",
    "stale_after_reuse",
    "detach_auto_answers",
    "vmm_device",
    "timing",
    "teardown",
];
/// The checks that need a vIOMMU (Linux 6.13+; the vEVENTQ 6.15+).
const VIOMMU_CHECKS: [&str; 6] = [
    "viommu_setup",
    "vevent_delivery",
    "vevent_ordering",
    "vevent_overflow",
    "viommu_page_requests",
    "viommu_teardown_orders",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kernel_image(version: &str, overrides: &[&str]) -> Option<PathBuf> {
    if let Some(path) = overrides.iter().find_map(|v| std::env::var(v).ok()) {
        return Some(PathBuf::from(path));
    }
    let out = Command::new(repo_root().join("scripts/kernel"))
        .args(["--check", version])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    path.is_file().then_some(path)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Builds `iopf-kernel-check` as a static executable (its own target directory, so the outer
/// cargo's lock is not needed).
fn build_check_binary() -> PathBuf {
    let target_dir = repo_root().join("target/kernel-check");
    let status = Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args(["build", "--release", "--locked", "-p", "iopf-kernel-check"])
        .args(["--bin", "iopf-kernel-check", "--target", TARGET])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the static check binary failed");
    target_dir.join(TARGET).join("release/iopf-kernel-check")
}

/// One entry of a `newc` cpio archive (the initramfs format).
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        u32::try_from(data.len()).unwrap(),
        0,
        0,
        0,
        0,
        u32::try_from(name.len() + 1).unwrap(),
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn initramfs(init: &Path, path: &Path) {
    // Each kernel's test writes its own archive (the tests run in parallel).
    let binary = std::fs::read(init).expect("read the check binary");
    let mut archive = Vec::new();
    cpio_entry(&mut archive, 1, "dev", 0o040_755, &[]);
    cpio_entry(&mut archive, 2, "init", 0o100_755, &binary);
    cpio_entry(&mut archive, 3, "TRAILER!!!", 0, &[]);
    std::fs::write(path, archive).expect("write the initramfs");
}

/// Boots `kernel` with the check binary as `/init` and returns the check lines
/// (`<check> ok|FAIL|skip ...`, `done ...`).
fn boot(kernel: &Path, name: &str) -> Vec<String> {
    assert!(
        on_path("qemu-system-x86_64"),
        "qemu-system-x86_64 is not installed (scripts/kernel installs it)"
    );
    let binary = build_check_binary();
    let initrd = repo_root().join(format!("target/kernel-check/initramfs-{name}.cpio"));
    initramfs(&binary, &initrd);

    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-m", "512", "-smp", "1", "-nographic"])
        .args(["-no-reboot", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let stdout = qemu.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut output = Vec::new();
    let mut timed_out = false;
    loop {
        match qemu.try_wait().expect("wait for qemu") {
            Some(_) => break,
            None if started.elapsed() > QEMU_TIMEOUT => {
                timed_out = true;
                let _ = qemu.kill();
                let _ = qemu.wait();
                break;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
        output.extend(lines_rx.try_iter());
    }
    let _ = reader.join();
    output.extend(lines_rx.try_iter());
    let console = output.join("\n");
    eprintln!(
        "--- guest console ({name}) ---\n{console}\n--- end ({:?}) ---",
        started.elapsed()
    );
    assert!(!timed_out, "QEMU did not finish within {QEMU_TIMEOUT:?}");
    output
        .iter()
        // The console may put terminal escapes before a line.
        .filter_map(|l| {
            l.find("iopf-kernel-check: ")
                .map(|at| l[at + 19..].to_string())
        })
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// Asserts that `check`'s line starts with `check <outcome>`.
fn assert_outcome(results: &[String], check: &str, outcome: &str) {
    let line = results
        .iter()
        .find(|l| l.starts_with(&format!("{check} ")))
        .unwrap_or_else(|| panic!("no result line for check `{check}`"));
    assert!(
        line.starts_with(&format!("{check} {outcome}")),
        "check `{check}` is not `{outcome}`: {line}"
    );
}

#[test]
#[cfg_attr(
    all(iopf_no_kernel_6_12, not(iopf_no_qemu)),
    ignore = "needs the 6.12 test kernel (run scripts/kernel to build it)"
)]
#[cfg_attr(
    all(iopf_no_qemu, not(iopf_no_kernel_6_12)),
    ignore = "needs qemu-system-x86_64 (scripts/kernel installs it)"
)]
#[cfg_attr(
    all(iopf_no_kernel_6_12, iopf_no_qemu),
    ignore = "needs the 6.12 test kernel and qemu-system-x86_64 (run scripts/kernel)"
)]
fn fault_queue_checks_pass_on_linux_6_12_and_viommu_checks_are_skipped() {
    let kernel = kernel_image("6.12", &["IOPF_KERNEL_6_12", "IOPF_KERNEL"])
        .expect("no 6.12 test kernel built (scripts/kernel builds it)");
    let results = boot(&kernel, "6.12");
    assert!(
        results.iter().any(|l| l.starts_with("kernel release=6.12")),
        "not a 6.12 kernel: {results:?}"
    );
    for check in FAULT_QUEUE_CHECKS {
        assert_outcome(&results, check, "ok");
    }
    for check in VIOMMU_CHECKS {
        assert_outcome(&results, check, "skip");
    }
    assert!(
        results.contains(&"done passed=8 failed=0 skipped=6".to_string()),
        "no clean summary line"
    );
}

#[test]
#[cfg_attr(
    all(iopf_no_kernel_7_2, not(iopf_no_qemu)),
    ignore = "needs the 7.2 test kernel (run scripts/kernel to build it)"
)]
#[cfg_attr(
    all(iopf_no_qemu, not(iopf_no_kernel_7_2)),
    ignore = "needs qemu-system-x86_64 (scripts/kernel installs it)"
)]
#[cfg_attr(
    all(iopf_no_kernel_7_2, iopf_no_qemu),
    ignore = "needs the 7.2 test kernel and qemu-system-x86_64 (run scripts/kernel)"
)]
fn fault_queue_and_viommu_checks_pass_on_linux_7_2() {
    let kernel = kernel_image("7.2", &["IOPF_KERNEL_7_2"])
        .expect("no 7.2 test kernel built (scripts/kernel builds it)");
    let results = boot(&kernel, "7.2");
    assert!(
        results.iter().any(|l| l.starts_with("kernel release=7.2")),
        "not a 7.2 kernel: {results:?}"
    );
    for check in FAULT_QUEUE_CHECKS.iter().chain(&VIOMMU_CHECKS) {
        assert_outcome(&results, check, "ok");
    }
    assert!(
        results.contains(&"done passed=14 failed=0 skipped=0".to_string()),
        "no clean summary line"
    );
}
