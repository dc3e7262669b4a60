//! The binary starts and describes its behaviours (this test also makes `cargo test
//! --workspace` build the binary the hostile-VMM suite of `crates/cli` runs).

#[test]
fn the_binary_lists_its_behaviours() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iopf-hostile-vmm"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--behaviour"));
}
