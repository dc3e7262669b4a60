//! `iopf sim` as a user runs it.

use std::process::Command;

fn iopf(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_iopf"))
        .args(args)
        .output()
        .expect("run iopf")
}

#[test]
fn a_seeded_run_prints_the_same_report_twice() {
    let a = iopf(&["sim", "--scenario", "restarts", "--seed", "9", "--json"]);
    let b = iopf(&["sim", "--scenario", "restarts", "--seed", "9", "--json"]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    let report: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    assert_eq!(report["seed"], 9);
    assert_eq!(report["violations"], serde_json::json!([]));
    assert!(report["memory"]["bytes_verified"].as_u64().unwrap() > 0);
}

#[test]
fn a_short_sweep_reports_no_failing_seed() {
    let out = iopf(&["sim", "--sweep", "25", "--seed", "1000"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("25 seeds from 1000"), "{text}");
    assert!(text.contains(": 0 broke an invariant"), "{text}");
}

#[test]
fn the_stale_collisions_preset_replays_colliding_answers_and_passes() {
    let out = iopf(&[
        "sim",
        "--scenario",
        "stale-collisions",
        "--seed",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["violations"], serde_json::json!([]));
    assert!(report["stale_replayed"].as_u64().unwrap() > 0, "{report}");
    let out = iopf(&["sim", "--scenario", "stale-collisions", "--sweep", "20"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(": 0 broke an invariant"), "{text}");
}
