//! Gives the shared library its soname the way cargo-c does: `libiopf.so.MAJOR`, or
//! `libiopf.so.0.MINOR` while the major version is 0 (every 0.MINOR may break the C ABI).
//! scripts/c-install installs it under that name.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_default();
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap_or_default();
    let sover = match major.as_str() {
        "0" => format!("0.{minor}"),
        _ => major,
    };
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libiopf.so.{sover}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
