//! Every scenario the validator accepts runs correctly, or the validator refuses it with a
//! message that names the field: randomly generated valid scenarios (small workloads) run as
//! `iopf run --scenario FILE --json` with no silent failure, and the cases that used to fail
//! silently are refused or now work.

use std::path::Path;
use std::process::{Command, Output};

use proptest::prelude::*;
use serde_json::Value;

fn iopf() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iopf"))
}

/// Runs `iopf run` on the scenario `text` (written to a file in a fresh temporary directory).
fn run_scenario(text: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scenario.toml");
    std::fs::write(&file, text).unwrap();
    run_file(&file)
}

fn run_file(file: &Path) -> Output {
    iopf()
        .args(["run", "--json", "--scenario"])
        .arg(file)
        .output()
        .unwrap()
}

/// One stream of a generated scenario.
#[derive(Debug, Clone)]
struct Stream {
    pasid: Option<u32>,
    pattern: &'static str,
    pages: u64,
    access_len: u32,
    write: bool,
    accesses: u32,
    interval_us: u64,
}

/// A generated scenario: small, valid, with a guest that never refuses by choice.
#[derive(Debug, Clone)]
struct Generated {
    seed: u64,
    ring_entries: u32,
    latency_us: [u64; 2],
    extra_pages: u64,
    devices: Vec<(u32, u32, Vec<Stream>)>,
}

impl Generated {
    /// Guest pages: exactly what the largest device may need (the validator's bound), plus
    /// `extra_pages`.
    fn guest_pages(&self) -> u64 {
        let need = self
            .devices
            .iter()
            .map(|(_, _, streams)| {
                2 + 64
                    + streams
                        .iter()
                        .map(|s| s.pages + s.pages.div_ceil(512) + 1)
                        .sum::<u64>()
            })
            .max()
            .unwrap_or(0);
        (need + self.extra_pages).max(16)
    }

    fn toml(&self) -> String {
        let mut t = format!(
            "seed = {}\nring_entries = {}\nresponse_timeout_ms = 10000\n\n[guest]\n\
             latency_us = [{}, {}]\nrefuse_rate = 0.0\npages = {}\n",
            self.seed,
            self.ring_entries,
            self.latency_us[0],
            self.latency_us[1],
            self.guest_pages()
        );
        for (count, allocation, streams) in &self.devices {
            t += &format!("\n[[device]]\ncount = {count}\nallocation = {allocation}\n");
            for s in streams {
                t += "\n[[device.stream]]\n";
                if let Some(p) = s.pasid {
                    t += &format!("pasid = {p}\n");
                }
                t += &format!(
                    "pattern = \"{}\"\npages = {}\naccess_len = {}\nwrite = {}\naccesses = {}\n\
                     interval_us = {}\n",
                    s.pattern, s.pages, s.access_len, s.write, s.accesses, s.interval_us
                );
            }
        }
        t
    }
}

fn stream() -> impl Strategy<Value = Stream> {
    (
        prop_oneof![Just(None), (0u32..64).prop_map(Some)],
        prop_oneof![Just("sequential"), Just("random"), Just("strided")],
        1u64..48,
        8u32..9000,
        any::<bool>(),
        1u32..150,
        1u64..30,
    )
        .prop_map(
            |(pasid, pattern, pages, access_len, write, accesses, interval_us)| Stream {
                pasid,
                pattern,
                pages,
                // The validator refuses an access longer than its stream's buffer.
                access_len: access_len.min(pages as u32 * 4096),
                write,
                accesses,
                interval_us,
            },
        )
}

fn generated() -> impl Strategy<Value = Generated> {
    (
        any::<u64>(),
        prop_oneof![Just(4u32), Just(16), Just(64), Just(256)],
        (0u64..20, 0u64..200),
        prop_oneof![Just(0u64), 0u64..100],
        prop::collection::vec(
            (1u32..3, 1u32..64, prop::collection::vec(stream(), 1..4)),
            1..3,
        ),
    )
        .prop_map(
            |(seed, ring_entries, (lo, span), extra_pages, devices)| Generated {
                seed,
                ring_entries,
                latency_us: [lo, lo + span],
                extra_pages,
                devices,
            },
        )
}

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut v = v;
    for key in path {
        v = &v[*key];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number"))
}

/// What a user relies on after a run the validator accepted: it succeeded, every group was
/// answered, guest memory holds what DMA wrote, and every failed access has a reason: an
/// `Invalid` answer (which, with a guest that never refuses, only the host's own
/// auto-responses give) or the device's own limits; never a `Success` that left the page
/// unmapped, and never a refusal the guest did not choose.
fn check_run(out: &Output, scenario: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "iopf run failed ({}) on\n{scenario}\nstderr:\n{stderr}",
        out.status
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(num(&report, &["unanswered_groups"]), 0, "{scenario}");
    assert_eq!(num(&report, &["dma_bytes_mismatched"]), 0, "{scenario}");
    if num(&report, &["groups"]) > 0 {
        assert!(
            report["latency_us"]["p50"].as_f64().unwrap() > 0.0,
            "round trips not measured in\n{scenario}"
        );
    }
    let engines = report["engines"].as_array().unwrap();
    let devices = report["devices"].as_array().unwrap();
    for (engine, device) in engines.iter().zip(devices) {
        let e = &engine["endpoint"];
        let failed = num(e, &["accesses"]) - num(e, &["completed"]);
        let explained = num(e, &["failed_invalid"])
            + num(e, &["failed_no_pri"])
            + num(e, &["failed_too_large"])
            + num(e, &["failed_halted"]);
        assert_eq!(failed, explained, "unexplained failures in\n{scenario}");
        assert_eq!(num(e, &["failed_retries"]), 0, "{scenario}");
        assert_eq!(num(engine, &["errors"]), 0, "{scenario}");
        let core = &device["core"];
        assert_eq!(
            num(core, &["responses", "guest", "invalid"]),
            0,
            "a guest that never refuses refused (it could not map) in\n{scenario}"
        );
        let auto: u64 = core["responses"]["auto"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert!(
            num(e, &["invalid"]) <= auto,
            "more Invalid answers than the host gave itself in\n{scenario}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Each case is a whole run of two processes: a few by default, more on request
        // (`PROPTEST_CASES=200`).
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(12),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn accepted_scenarios_run_without_silent_failure(g in generated()) {
        let text = g.toml();
        check_run(&run_scenario(&text), &text);
    }
}

/// PASID 63, the last one the validator accepts: its address space exists in the VMM's PASID
/// directory, so its accesses complete (they used to fail, half of the run, silently).
#[test]
fn the_last_pasid_works() {
    let text = crate_default().replace("pasid = 2", "pasid = 63");
    assert!(text.contains("pasid = 63"));
    let text = text.replace("refuse_rate = 0.02", "refuse_rate = 0.0");
    let out = run_scenario(&text);
    check_run(&out, &text);
}

/// Guest memory too small for a device's streams is refused before anything runs, and the
/// message names the field.
#[test]
fn too_little_guest_memory_is_refused_naming_the_field() {
    let text = crate_default().replace("pages = 4096", "pages = 1000");
    let out = run_scenario(&text);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("guest.pages = 1000"), "{stderr}");
    assert!(stderr.contains("[[device]] 0"), "{stderr}");
}

/// The generated case that once failed: a one-page stream with 4904-byte accesses. Each access
/// reached into a second page the guest's memory was never sized for, so a guest that never
/// refuses answered Invalid. Such a stream is now refused before anything runs, and the same
/// stream with accesses that fit its page runs with every access explained.
#[test]
fn an_access_longer_than_its_stream_is_refused_and_one_that_fits_runs() {
    let case = |access_len: u32| {
        Generated {
            seed: 1,
            ring_entries: 4,
            latency_us: [19, 38],
            extra_pages: 0,
            devices: vec![(
                1,
                46,
                vec![Stream {
                    pasid: None,
                    pattern: "strided",
                    pages: 1,
                    access_len,
                    write: false,
                    accesses: 100,
                    interval_us: 10,
                }],
            )],
        }
        .toml()
    };
    let out = run_scenario(&case(4904));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("access_len = 4904"), "{stderr}");
    assert!(stderr.contains("1 page(s)"), "{stderr}");
    let fits = case(4096);
    check_run(&run_scenario(&fits), &fits);
}

/// A PASID beyond the directory is refused naming the field.
#[test]
fn a_pasid_beyond_the_directory_is_refused() {
    let text = crate_default().replace("pasid = 2", "pasid = 64");
    let out = run_scenario(&text);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pasid"), "{stderr}");
}

fn crate_default() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scenarios/default.toml"
    ))
    .unwrap()
}
