//! Deterministic end-to-end runs of the whole loop: device, IOMMU, fault core, rings, VMM and
//! guest in one process. Each asserts the checker's verdict and the counters that must hold
//! exactly.

use iopf_sim::{Chaos, ChaosEvent, SimConfig, SimReport, run};

fn assert_ok(report: &SimReport) {
    assert!(
        report.ok(),
        "seed {}: {:#?}",
        report.seed,
        report.violations
    );
}

/// What must hold in every run: the books of the endpoint, the core and the guests agree.
fn assert_books(r: &SimReport) {
    let core = &r.core;
    let e = &r.endpoints;
    // Every group the endpoint sent reached the core and was answered exactly once.
    assert_eq!(core.page_requests, e.page_requests);
    assert_eq!(core.groups, e.groups);
    assert_eq!(core.answered(), core.groups);
    assert_eq!(e.responses_matched, e.groups);
    assert_eq!(e.unexpected, 0);
    // Every access ended: done, or failed for a reason that is counted.
    let failed = e.failed_invalid
        + e.failed_no_pri
        + e.failed_retries
        + e.failed_too_large
        + e.failed_halted;
    assert_eq!(e.completed + failed, e.accesses);
    // Every byte the device wrote is in guest memory.
    assert_eq!(r.memory.bytes_mismatched, 0);
    assert_eq!(r.memory.read_mismatches, 0);
    assert!(r.memory.bytes_verified >= e.bytes_written.min(4096));
}

#[test]
fn clean_run_answers_every_group_from_the_guest() {
    let r = run(SimConfig::clean(1)).unwrap();
    assert_ok(&r);
    assert_books(&r);
    let auto = r.core.answered() - r.core.responses.guest.success - r.core.responses.guest.invalid;
    assert_eq!(auto, 0, "no auto-response in a clean run");
    assert_eq!(r.core.refused_total(), 0);
    assert_eq!(r.core.groups_delivered, r.core.groups);
    assert_eq!(r.guests.groups, r.core.groups);
    assert_eq!(r.core.responses.guest.success, r.guests.success);
    assert_eq!(r.core.responses.guest.invalid, r.guests.refused);
    assert_eq!(r.endpoints.failed_invalid, r.guests.refused);
    assert_eq!(r.answers_written, r.core.groups);
    assert_eq!((r.answers_dropped, r.answers_discarded), (0, 0));
    assert!(r.endpoints.completed > 0 && r.memory.bytes_verified > 0);
}

#[test]
fn run_with_vmm_restarts_refuses_stale_responses() {
    let r = run(SimConfig::restarts(3)).unwrap();
    assert_ok(&r);
    assert_books(&r);
    assert!(r.guests.stale > 0, "the guest replayed responses");
    // Stale replays name cookies that are no longer pending: refused, never delivered.
    assert_eq!(r.core.refused.unknown_cookie, r.core.refused_total());
    assert!(r.core.refused_total() >= r.guests.stale.min(1));
    assert_eq!(
        r.core.registrations,
        2 + 3,
        "two devices, three re-registrations"
    );
    assert_eq!(
        r.answers_written,
        r.core.responses.guest.success
            + r.core.responses.guest.invalid
            + r.core.refused_total()
            + r.answers_discarded
    );
}

#[test]
fn run_with_overflow_answers_what_does_not_fit() {
    let r = run(SimConfig::overflow(5)).unwrap();
    assert_ok(&r);
    assert_books(&r);
    assert!(r.core.responses.auto.queue_full > 0);
    assert_eq!(
        r.core.groups_delivered + r.core.responses.auto.queue_full,
        r.core.groups
    );
    assert_eq!(r.core.refused_total(), 0);
}

#[test]
fn run_with_a_hostile_guest_loses_nothing() {
    let r = run(SimConfig::hostile(7)).unwrap();
    assert_ok(&r);
    assert_books(&r);
    let g = &r.guests;
    assert!(g.duplicates > 0 && g.forged > 0 && g.stale > 0);
    // Every bogus response is refused; so is every late answer to a group that timed out.
    // No queue was torn down, so the books close exactly.
    assert_eq!(r.answers_discarded, 0);
    let accepted = r.core.responses.guest.success + r.core.responses.guest.invalid;
    assert_eq!(r.answers_written, accepted + r.core.refused_total());
    assert!(r.core.refused_total() >= g.bogus() - g.forged);
    // Silent groups were answered by the timeout.
    assert!(r.core.responses.auto.timeout >= g.silent);
}

#[test]
fn a_seeded_run_replays_exactly() {
    let a = run(SimConfig::restarts(42)).unwrap();
    let b = run(SimConfig::restarts(42)).unwrap();
    assert_eq!(a, b);
    let c = run(SimConfig::restarts(43)).unwrap();
    assert_ne!(a.trace_hash, c.trace_hash);
}

#[test]
fn the_checker_catches_guest_memory_that_differs_from_what_dma_wrote() {
    let mut config = SimConfig::clean(1);
    config.chaos.push(ChaosEvent {
        at: 1_000_000,
        chaos: Chaos::CorruptMemory { gpa: 0 },
    });
    let r = run(config).unwrap();
    assert!(!r.ok());
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("guest memory differs")),
        "{:?}",
        r.violations
    );
}

#[test]
fn a_thousand_chaotic_seeds_keep_every_invariant() {
    let mut failures = Vec::new();
    for seed in 0..1000 {
        let r = run(SimConfig::chaotic(seed)).unwrap();
        if !r.ok() {
            failures.push((seed, r.violations));
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds failed, first: {:#?}",
        failures.len(),
        failures.first()
    );
}
