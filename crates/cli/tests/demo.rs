//! `iopf demo` as a user runs it: two real processes, real memfds, eventfds and a socket.

use std::process::Command;

fn demo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .arg("demo")
        .args(args)
        .output()
        .expect("run iopf demo");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn number_after(text: &str, prefix: &str) -> u64 {
    let rest = &text[text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"))
        + prefix.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in:\n{text}"))
}

#[test]
fn demo_delivers_and_answers_every_group_between_two_processes() {
    let (ok, text) = demo(&["--groups", "20000"]);
    assert!(ok, "{text}");
    assert_eq!(number_after(&text, "unanswered groups:"), 0, "{text}");
    let published = number_after(&text, "page requests in");
    assert_eq!(published, 20000, "{text}");
    assert!(text.contains("refused 0"), "{text}");
}

#[test]
fn demo_with_a_ring_smaller_than_the_credits_answers_overflowing_groups_itself() {
    // 8 entries, 64 outstanding groups of up to 4 pages: the ring overflows. Groups that do not
    // fit are answered by the host at once (never dropped), unrecoverable faults are counted
    // lost, and still no group is left unanswered.
    let (ok, text) = demo(&["--groups", "5000", "--entries", "8", "--credits", "64"]);
    assert!(ok, "{text}");
    assert_eq!(number_after(&text, "unanswered groups:"), 0, "{text}");
    assert!(number_after(&text, "groups itself:") > 0, "{text}");
    assert!(
        number_after(&text, "faults (") > 0,
        "unrecoverable faults lost: {text}"
    );
}

#[test]
fn demo_refuses_a_ring_size_that_is_not_a_power_of_two() {
    let (ok, text) = demo(&["--entries", "100"]);
    assert!(!ok);
    assert!(
        text.contains("entry count 100 is not a power of two"),
        "{text}"
    );
}

#[test]
fn demo_json_reports_what_crossed_and_what_was_answered() {
    let out = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .args(["demo", "--groups", "2000", "--json"])
        .output()
        .expect("run iopf demo");
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["core"]["groups"], 2000);
    assert_eq!(report["unanswered_groups"], 0);
    assert_eq!(report["vmm"]["groups"], report["core"]["groups_delivered"]);
}
