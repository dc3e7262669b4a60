//! The backend against a real Linux 6.12 kernel with `CONFIG_IOMMUFD_TEST`, booted under QEMU.
//!
//! `scripts/kernel` builds the kernel (cached under `~/.cache/iopf`); this test builds
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
const CHECKS: [&str; 8] = [
    "setup",
    "round_trip",
    "kernel_refusals",
    "stale_after_reuse",
    "detach_auto_answers",
    "vmm_device",
    "timing",
    "teardown",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kernel_image() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("IOPF_KERNEL") {
        return Some(PathBuf::from(path));
    }
    let out = Command::new(repo_root().join("scripts/kernel"))
        .arg("--check")
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
    let binary = std::fs::read(init).expect("read the check binary");
    let mut archive = Vec::new();
    cpio_entry(&mut archive, 1, "dev", 0o040_755, &[]);
    cpio_entry(&mut archive, 2, "init", 0o100_755, &binary);
    cpio_entry(&mut archive, 3, "TRAILER!!!", 0, &[]);
    std::fs::write(path, archive).expect("write the initramfs");
}

#[test]
#[cfg_attr(
    all(iopf_no_test_kernel, not(iopf_no_qemu)),
    ignore = "needs the test kernel (run scripts/kernel to build it)"
)]
#[cfg_attr(
    all(iopf_no_qemu, not(iopf_no_test_kernel)),
    ignore = "needs qemu-system-x86_64 (scripts/kernel installs it)"
)]
#[cfg_attr(
    all(iopf_no_test_kernel, iopf_no_qemu),
    ignore = "needs the test kernel and qemu-system-x86_64 (run scripts/kernel)"
)]
fn backend_passes_every_check_against_a_real_kernel() {
    let kernel = kernel_image().expect("no test kernel built (scripts/kernel builds it)");
    assert!(
        on_path("qemu-system-x86_64"),
        "qemu-system-x86_64 is not installed (scripts/kernel installs it)"
    );
    let binary = build_check_binary();
    let initrd = repo_root().join("target/kernel-check/initramfs.cpio");
    initramfs(&binary, &initrd);

    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-m", "512", "-smp", "1", "-nographic"])
        .args(["-no-reboot", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
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
        "--- guest console ---\n{console}\n--- end ({:?}) ---",
        started.elapsed()
    );
    assert!(!timed_out, "QEMU did not finish within {QEMU_TIMEOUT:?}");

    let results: Vec<&str> = output
        .iter()
        // The console may put terminal escapes before a line.
        .filter_map(|l| l.find("iopf-kernel-check: ").map(|at| &l[at + 19..]))
        .map(str::trim_end)
        .collect();
    for check in CHECKS {
        let line = results
            .iter()
            .find(|l| l.starts_with(&format!("{check} ")))
            .unwrap_or_else(|| panic!("no result line for check `{check}`"));
        assert!(
            line.starts_with(&format!("{check} ok")),
            "check failed: {line}"
        );
    }
    assert!(
        results.contains(&"done passed=8 failed=0"),
        "no clean summary line"
    );
}
