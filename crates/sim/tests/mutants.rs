//! The checker against the seed review's other bug classes, each built into the fault core by a
//! test-only switch (never on by default):
//! - `mutant-cross-device`: a response answering another device's group (a response whose cookie
//!   its own device does not know is applied to whichever device has a group under it);
//! - `mutant-unregister-forgets`: unregister leaves a pending group unanswered;
//! - `mutant-trust-consumer-index` (in iopf-queue): the host's fault ring takes a consumer index
//!   ahead of what it published to mean "read everything", so it reuses unread slots.
//!
//! Each sweep must catch its bug on every seed of its aimed preset and on some seeds of the
//! default chaotic sweep. `scripts/test` runs this file once per feature; without a feature its
//! tests show as ignored. (The stale-response class has its own file, `mutant_cookie_reset.rs`.)

use iopf_sim::{SimConfig, SimReport, run};

/// The seeds of `seeds` whose run `caught` says nothing about (the checker missed the bug).
// With only `mutant-cookie-reset` on, this file runs nothing (that switch's tests have a file
// of their own).
#[cfg_attr(
    all(
        feature = "mutant-cookie-reset",
        not(any(
            feature = "mutant-cross-device",
            feature = "mutant-unregister-forgets",
            feature = "mutant-trust-consumer-index"
        ))
    ),
    allow(dead_code)
)]
fn missed(
    seeds: std::ops::Range<u64>,
    preset: fn(u64) -> SimConfig,
    caught: fn(&SimReport) -> bool,
) -> Vec<u64> {
    seeds
        .filter(|&seed| {
            let mut config = preset(seed);
            // A run whose device waits forever goes on to the time limit: 200 ms of virtual
            // time is ten response timeouts, far past the end of a correct run.
            config.time_limit_ns = 200_000_000;
            !caught(&run(config).unwrap())
        })
        .collect()
}

/// The control: on a correct fault core (no mutant switch), the same sweeps with the same
/// time limit find nothing, so what the mutant tests count is the bug, not the checker.
#[cfg(not(any(
    feature = "mutant-cookie-reset",
    feature = "mutant-cross-device",
    feature = "mutant-unregister-forgets",
    feature = "mutant-trust-consumer-index"
)))]
#[test]
fn the_aimed_sweeps_pass_on_a_correct_core() {
    let broken = |r: &SimReport| !r.ok();
    for preset in [
        SimConfig::crosstalk,
        SimConfig::stale_collisions,
        SimConfig::chaotic,
    ] {
        let clean = missed(0..100, preset, broken);
        assert_eq!(clean.len(), 100, "a correct core broke an invariant");
    }
}

#[cfg(feature = "mutant-cross-device")]
fn answered_across_devices(report: &SimReport) -> bool {
    report.violations.iter().any(|v| {
        v.contains("written for another device's group was accepted")
            || v.contains("accepted a response no VMM wrote")
    })
}

#[cfg(feature = "mutant-cross-device")]
#[test]
fn crosstalk_catches_a_response_answering_another_devices_group_on_every_seed() {
    let missed = missed(0..100, SimConfig::crosstalk, answered_across_devices);
    assert!(
        missed.is_empty(),
        "the checker missed the bug on seeds {missed:?}"
    );
}

#[cfg(feature = "mutant-cross-device")]
#[test]
fn chaotic_sweep_catches_a_response_answering_another_devices_group() {
    let missed = missed(0..200, SimConfig::chaotic, answered_across_devices);
    let caught = 200 - missed.len();
    eprintln!("chaotic: the cross-device bug caught on {caught}/200 seeds");
    assert!(caught >= 20, "the bug caught on only {caught}/200 seeds");
}

#[cfg(feature = "mutant-unregister-forgets")]
fn left_unanswered(report: &SimReport) -> bool {
    report.violations.iter().any(|v| {
        v.contains("stuck with") || v.contains("books do not balance") || v.contains("answered")
    })
}

#[cfg(feature = "mutant-unregister-forgets")]
#[test]
fn stale_collisions_catch_an_unregister_that_forgets_a_group_on_every_seed() {
    let missed = missed(0..100, SimConfig::stale_collisions, left_unanswered);
    assert!(
        missed.is_empty(),
        "the checker missed the bug on seeds {missed:?}"
    );
}

#[cfg(feature = "mutant-unregister-forgets")]
#[test]
fn chaotic_sweep_catches_an_unregister_that_forgets_a_group_on_most_seeds() {
    let missed = missed(0..200, SimConfig::chaotic, left_unanswered);
    let caught = 200 - missed.len();
    eprintln!("chaotic: the forgetting unregister caught on {caught}/200 seeds");
    assert!(caught > 100, "the bug caught on only {caught}/200 seeds");
}

#[cfg(feature = "mutant-trust-consumer-index")]
fn overwrote_unread_records(report: &SimReport) -> bool {
    report
        .violations
        .iter()
        .any(|v| v.contains("the host broke the fault queue"))
}

#[cfg(feature = "mutant-trust-consumer-index")]
#[test]
fn lying_index_catches_a_producer_that_trusts_the_consumer_index_on_every_seed() {
    let missed = missed(0..100, SimConfig::lying_index, overwrote_unread_records);
    assert!(
        missed.is_empty(),
        "the checker missed the bug on seeds {missed:?}"
    );
}

#[cfg(feature = "mutant-trust-consumer-index")]
#[test]
fn chaotic_sweep_catches_a_producer_that_trusts_the_consumer_index() {
    let missed = missed(0..200, SimConfig::chaotic, overwrote_unread_records);
    let caught = 200 - missed.len();
    eprintln!("chaotic: the trusted consumer index caught on {caught}/200 seeds");
    // One draw in four has a lie, and it shows only if the host needs room while it stands.
    assert!(caught >= 5, "the bug caught on only {caught}/200 seeds");
}

#[cfg(not(feature = "mutant-trust-consumer-index"))]
#[test]
#[ignore = "run with --features mutant-trust-consumer-index (scripts/test does)"]
fn lying_index_catches_a_producer_that_trusts_the_consumer_index_on_every_seed() {}

#[cfg(not(feature = "mutant-cross-device"))]
#[test]
#[ignore = "run with --features mutant-cross-device (scripts/test does)"]
fn crosstalk_catches_a_response_answering_another_devices_group_on_every_seed() {}

#[cfg(not(feature = "mutant-unregister-forgets"))]
#[test]
#[ignore = "run with --features mutant-unregister-forgets (scripts/test does)"]
fn stale_collisions_catch_an_unregister_that_forgets_a_group_on_every_seed() {}
