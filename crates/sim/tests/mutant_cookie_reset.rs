//! The checker against a known bug: with the fault core's test-only `mutant-cookie-reset`
//! feature, a device's cookie counter starts over at unregister, so a response from a past
//! handler life can be accepted for a group of the new one. The sweeps must catch it.
//! `scripts/test` runs this file with `--features mutant-cookie-reset`; without the feature
//! its tests show as ignored.

#[cfg(feature = "mutant-cookie-reset")]
use iopf_sim::{SimConfig, run};

/// Whether a run's checker saw a response accepted across handler lives.
#[cfg(feature = "mutant-cookie-reset")]
fn caught(report: &iopf_sim::SimReport) -> bool {
    report
        .violations
        .iter()
        .any(|v| v.contains("was accepted in life"))
}

#[cfg(feature = "mutant-cookie-reset")]
#[test]
fn stale_collisions_catch_the_cookie_reset_on_every_seed() {
    let missed: Vec<u64> = (0..100)
        .filter(|&seed| !caught(&run(SimConfig::stale_collisions(seed)).unwrap()))
        .collect();
    assert!(
        missed.is_empty(),
        "the checker missed the bug on seeds {missed:?}"
    );
}

#[cfg(feature = "mutant-cookie-reset")]
#[test]
fn chaotic_sweep_catches_the_cookie_reset_on_most_seeds() {
    let caught = (0..200)
        .filter(|&seed| caught(&run(SimConfig::chaotic(seed)).unwrap()))
        .count();
    eprintln!("chaotic: the bug caught on {caught}/200 seeds");
    assert!(caught > 100, "the bug caught on only {caught}/200 seeds");
}

#[cfg(not(feature = "mutant-cookie-reset"))]
#[test]
#[ignore = "run with --features mutant-cookie-reset (scripts/test does)"]
fn stale_collisions_catch_the_cookie_reset_on_every_seed() {}

#[cfg(not(feature = "mutant-cookie-reset"))]
#[test]
#[ignore = "run with --features mutant-cookie-reset (scripts/test does)"]
fn chaotic_sweep_catches_the_cookie_reset_on_most_seeds() {}
