//! Decides at build time whether `tests/real_kernel.rs` can run here, so that a missing test
//! kernel or QEMU shows as an ignored test with its reason instead of a pass:
//!
//! - `cfg(iopf_no_kernel_6_12)`, `cfg(iopf_no_kernel_7_2)`: that kernel is not built by
//!   `scripts/kernel` (nor given as `IOPF_KERNEL_6_12` / `IOPF_KERNEL_7_2`; `IOPF_KERNEL` is
//!   the 6.12 one's older name);
//! - `cfg(iopf_no_qemu)`: no `qemu-system-x86_64` on `PATH`.
//!
//! With `CI=true` neither is ever set: the test then runs and fails on what is missing (CI
//! installs and builds both).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(iopf_no_kernel_6_12)");
    println!("cargo::rustc-check-cfg=cfg(iopf_no_kernel_7_2)");
    println!("cargo::rustc-check-cfg=cfg(iopf_no_qemu)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in [
        "CI",
        "IOPF_KERNEL",
        "IOPF_KERNEL_6_12",
        "IOPF_KERNEL_7_2",
        "IOPF_CACHE",
        "XDG_CACHE_HOME",
        "HOME",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !in_ci && !kernel_available("6.12", &["IOPF_KERNEL_6_12", "IOPF_KERNEL"]) {
        println!("cargo::rustc-cfg=iopf_no_kernel_6_12");
    }
    if !in_ci && !kernel_available("7.2", &["IOPF_KERNEL_7_2"]) {
        println!("cargo::rustc-cfg=iopf_no_kernel_7_2");
    }
    if !in_ci && !qemu_available() {
        println!("cargo::rustc-cfg=iopf_no_qemu");
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The cache directory `scripts/kernel` builds into (its `CACHE`).
fn kernel_cache() -> Option<PathBuf> {
    let base = match std::env::var_os("IOPF_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(dir) => PathBuf::from(dir).join("iopf"),
            None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/iopf"),
        },
    };
    Some(base.join("kernel"))
}

fn kernel_available(version: &str, overrides: &[&str]) -> bool {
    if let Some(path) = overrides.iter().find_map(std::env::var_os) {
        println!("cargo::rerun-if-changed={}", Path::new(&path).display());
        return Path::new(&path).is_file();
    }
    let script = repo_root().join("scripts/kernel");
    // The script's option list is part of the cache key.
    println!("cargo::rerun-if-changed={}", script.display());
    // A kernel built (or removed) changes the cache directory; until it exists, its parent.
    // Both hold only the finished kernels, and the build tree while one is being built.
    if let Some(cache) = kernel_cache() {
        let watched = if cache.is_dir() {
            cache
        } else {
            cache.parent().map(Path::to_path_buf).unwrap_or(cache)
        };
        println!("cargo::rerun-if-changed={}", watched.display());
    }
    Command::new(&script)
        .args(["--check", version])
        .output()
        .is_ok_and(|out| {
            out.status.success() && Path::new(String::from_utf8_lossy(&out.stdout).trim()).is_file()
        })
}

fn qemu_available() -> bool {
    // Installing or removing the package changes this directory.
    println!("cargo::rerun-if-changed=/usr/bin");
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join("qemu-system-x86_64").is_file())
    })
}
