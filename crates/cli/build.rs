//! Sets `cfg(iopf_no_chromium)` when no Chromium is installed and the build is not in CI
//! (`CI=true`), so that `tests/report.rs`, which renders the HTML report in headless Chromium,
//! shows as ignored with its reason instead of passing. In CI it always runs, and fails
//! without Chromium (`scripts/setup` installs it). Likewise `cfg(iopf_no_promtool)` when
//! `promtool` (Debian package `prometheus`) is missing, for `tests/metrics.rs`.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(iopf_no_chromium)");
    println!("cargo::rustc-check-cfg=cfg(iopf_no_promtool)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=IOPF_CHROMIUM");
    // Installing or removing the package changes this directory.
    println!("cargo::rerun-if-changed=/usr/bin");
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let chromium = std::env::var_os("IOPF_CHROMIUM").is_some_and(|p| Path::new(&p).is_file())
        || Path::new("/usr/bin/chromium").is_file();
    if !in_ci && !chromium {
        println!("cargo::rustc-cfg=iopf_no_chromium");
    }
    if !in_ci && !Path::new("/usr/bin/promtool").is_file() {
        println!("cargo::rustc-cfg=iopf_no_promtool");
    }
}
