//! One test per scenario of the fault core, each asserting exactly what the device receives.

mod common;

use std::time::Duration;

use common::{Host, SECOND, queues, request, single};
use iopf_abi::{
    Cookie, FaultReason, PageResponse, Pasid, Perm, PrgIndex, ResponseCode, ResponseRecord,
    UnrecoverableFault,
};
use iopf_core::{
    AutoReason, CoreError, DeviceConfig, DeviceFault, DeviceResponse, Refusal, ResponseSource,
};
use iopf_queue::QueueMemory;

fn pasid(p: u32) -> Option<Pasid> {
    Some(Pasid::new(p).unwrap())
}

fn grpid(g: u32) -> PrgIndex {
    PrgIndex::new(g).unwrap()
}

fn invalid(
    pasid: Option<Pasid>,
    grpid: PrgIndex,
    cookie: Option<Cookie>,
    reason: AutoReason,
) -> DeviceResponse {
    DeviceResponse {
        pasid,
        grpid,
        code: ResponseCode::Invalid,
        cookie,
        source: ResponseSource::Auto(reason),
    }
}

fn unrecoverable() -> DeviceFault {
    DeviceFault::Unrecoverable(UnrecoverableFault {
        reason: FaultReason::Permission,
        pasid: pasid(1),
        perm: Perm::WRITE,
        addr: Some(0x1000),
        fetch_addr: None,
    })
}

/// The seed review's scenario (`docs/DESIGN.md` §1.5 and §4.2).
#[test]
fn late_response_from_the_previous_life_is_refused_after_reregister() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 64);

    // A page request reaches the VMM.
    host.core.report(dev, &single(5, 7)).unwrap();
    let old = vmm.page_requests();
    assert_eq!(old.len(), 1);

    // Unregister: the device gets Invalid, once.
    assert_eq!(host.core.unregister(dev), 1);
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            invalid(
                pasid(5),
                grpid(7),
                Some(old[0].cookie),
                AutoReason::Unregister
            )
        )]
    );

    // Register again (a new life, new queues); the device reuses PRGI 7 at once.
    let mut vmm2 = host.attach(dev, 64);
    host.core.report(dev, &single(5, 7)).unwrap();
    let new = vmm2.page_requests();
    assert_eq!(new.len(), 1);
    assert_ne!(new[0].cookie, old[0].cookie);
    assert_eq!((new[0].pasid, new[0].grpid), (old[0].pasid, old[0].grpid));

    // The VMM's late answer to the old request arrives through the new queue: refused.
    vmm2.answer(&old[0], ResponseCode::Success);
    host.core.process_responses(dev).unwrap();
    assert_eq!(host.sink.take(), vec![]);
    assert_eq!(host.core.pending_groups(dev).unwrap(), 1);
    assert_eq!(host.core.counters(dev).unwrap().refused.unknown_cookie, 1);

    // Only the response to the new cookie completes the new group.
    vmm2.answer(&new[0], ResponseCode::Success);
    host.core.process_responses(dev).unwrap();
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            DeviceResponse {
                pasid: pasid(5),
                grpid: grpid(7),
                code: ResponseCode::Success,
                cookie: Some(new[0].cookie),
                source: ResponseSource::Guest,
            }
        )]
    );
    drop(vmm);
}

#[test]
fn unregister_answers_10000_pending_groups_once_without_waiting_on_the_vmm() {
    let host = Host::new();
    let config = DeviceConfig {
        max_pending_groups: 20_000,
        ..DeviceConfig::default()
    };
    let dev = host.add_device(1, config);
    // The VMM attaches and then never reads or answers anything.
    let _vmm = host.attach(dev, 16384);
    let faults: Vec<DeviceFault> = (0..10_000u32)
        .map(|i| single(1 + i / 512, i % 512))
        .collect();
    host.core.report_batch(dev, &faults).unwrap();
    assert_eq!(host.core.pending_groups(dev).unwrap(), 10_000);

    assert_eq!(host.core.unregister(dev), 10_000);
    let got = host.sink.take();
    assert_eq!(got.len(), 10_000);
    let mut seen = std::collections::HashSet::new();
    for (i, (_, r)) in got.iter().enumerate() {
        // Answered in the order the groups came, each exactly once.
        assert_eq!(
            (r.pasid, r.grpid),
            (pasid(1 + i as u32 / 512), grpid(i as u32 % 512))
        );
        assert_eq!(r.source, ResponseSource::Auto(AutoReason::Unregister));
        assert_eq!(r.code, ResponseCode::Invalid);
        assert!(seen.insert(r.cookie.unwrap()));
    }
    assert_eq!(host.core.pending_groups(dev).unwrap(), 0);
    assert_eq!(
        host.core.counters(dev).unwrap().responses.auto.unregister,
        10_000
    );
    // A second unregister has nothing to answer.
    assert_eq!(host.core.unregister(dev), 0);
    assert_eq!(host.sink.take(), vec![]);
}

#[test]
fn full_ring_answers_page_requests_invalid_at_once() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 4);
    let faults: Vec<DeviceFault> = (0..6).map(|g| single(1, g)).collect();
    host.core.report_batch(dev, &faults).unwrap();
    // Four fit; the fifth and sixth are answered at once.
    assert_eq!(
        host.sink.take(),
        vec![
            (
                dev,
                invalid(pasid(1), grpid(4), None, AutoReason::QueueFull)
            ),
            (
                dev,
                invalid(pasid(1), grpid(5), None, AutoReason::QueueFull)
            ),
        ]
    );
    assert_eq!(vmm.page_requests().len(), 4);
    assert_eq!(host.core.pending_groups(dev).unwrap(), 4);
    let c = host.core.counters(dev).unwrap();
    assert_eq!(
        (c.groups, c.groups_delivered, c.responses.auto.queue_full),
        (6, 4, 2)
    );
}

#[test]
fn multi_page_group_that_does_not_fit_is_answered_whole_and_nothing_of_it_is_published() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 4);
    host.core.report(dev, &single(1, 0)).unwrap();
    let group: Vec<DeviceFault> = (0..4).map(|p| request(Some(2), 9, p, p == 3)).collect();
    host.core.report_batch(dev, &group).unwrap();
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            invalid(pasid(2), grpid(9), None, AutoReason::QueueFull)
        )]
    );
    assert_eq!(vmm.page_requests().len(), 1);
}

#[test]
fn full_ring_drops_unrecoverable_faults_and_counts_them_lost() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 4);
    let faults = vec![unrecoverable(); 7];
    host.core.report_batch(dev, &faults).unwrap();
    assert_eq!(
        host.sink.take(),
        vec![],
        "unrecoverable faults are never answered"
    );
    assert_eq!(vmm.faults().len(), 4);
    let c = host.core.counters(dev).unwrap();
    assert_eq!(
        (c.unrecoverable, c.unrecoverable_delivered, c.lost),
        (7, 4, 3)
    );
    // The VMM sees the loss in the host page.
    assert_eq!(vmm.faults.lost(), 3);
}

/// Sets up one delivered group and returns it, for the refusal tests.
fn one_pending() -> (
    Host,
    iopf_core::DeviceId,
    common::Vmm,
    iopf_abi::PageRequest,
) {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 16);
    host.core.report(dev, &single(3, 11)).unwrap();
    let request = vmm.page_requests().remove(0);
    (host, dev, vmm, request)
}

fn record(request: &iopf_abi::PageRequest, code: ResponseCode) -> ResponseRecord {
    ResponseRecord::from(&PageResponse::answering(request, code))
}

/// Sends `bad`, checks it is refused with `expected` and leaves the group pending, then checks
/// the honest response still completes the group.
fn assert_refused_and_untouched(
    bad: ResponseRecord,
    expected: Refusal,
    counter: fn(&iopf_core::Refusals) -> u64,
) {
    let (host, dev, mut vmm, request) = one_pending();
    vmm.send_record(bad);
    host.core.process_responses(dev).unwrap();
    assert_eq!(host.sink.take(), vec![]);
    assert_eq!(host.core.pending_groups(dev).unwrap(), 1);
    let c = host.core.counters(dev).unwrap();
    assert_eq!(counter(&c.refused), 1);
    assert_eq!(c.refused_total(), 1);
    // The host page shows the refusal to the VMM.
    // And the same refusal through the direct path names the reason.
    assert_eq!(host.core.respond(dev, &bad).unwrap(), Err(expected));
    vmm.answer(&request, ResponseCode::Success);
    host.core.process_responses(dev).unwrap();
    let got = host.sink.take();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.source, ResponseSource::Guest);
    assert_eq!(got[0].1.cookie, Some(request.cookie));
}

#[test]
fn duplicate_response_is_refused() {
    let (host, dev, mut vmm, request) = one_pending();
    vmm.answer(&request, ResponseCode::Success);
    vmm.answer(&request, ResponseCode::Success);
    host.core.process_responses(dev).unwrap();
    let got = host.sink.take();
    assert_eq!(got.len(), 1, "exactly one response reaches the device");
    assert_eq!(host.core.counters(dev).unwrap().refused.unknown_cookie, 1);
}

#[test]
fn forged_cookie_is_refused() {
    let (_, _, _, request) = one_pending();
    let mut bad = record(&request, ResponseCode::Success);
    let forged = Cookie::new(request.cookie.get().wrapping_add(1000).max(1)).unwrap();
    bad.cookie = forged.get().into();
    assert_refused_and_untouched(bad, Refusal::UnknownCookie(forged), |r| r.unknown_cookie);
}

#[test]
fn cookie_of_another_device_is_refused() {
    let host = Host::new();
    let a = host.add_device(1, DeviceConfig::default());
    let b = host.add_device(2, DeviceConfig::default());
    let mut vmm_a = host.attach(a, 16);
    let mut vmm_b = host.attach(b, 16);
    host.core.report(a, &single(3, 11)).unwrap();
    host.core.report(b, &single(3, 11)).unwrap();
    let on_a = vmm_a.page_requests().remove(0);
    let on_b = vmm_b.page_requests().remove(0);
    assert_ne!(on_a.cookie, on_b.cookie);
    // B's VMM answers A's group through B's queue.
    vmm_b.answer(&on_a, ResponseCode::Success);
    host.core.process_responses(b).unwrap();
    host.core.process_responses(a).unwrap();
    assert_eq!(host.sink.take(), vec![]);
    assert_eq!(host.core.pending_groups(a).unwrap(), 1);
    assert_eq!(host.core.pending_groups(b).unwrap(), 1);
    assert_eq!(host.core.counters(b).unwrap().refused.unknown_cookie, 1);
}

#[test]
fn response_with_mismatched_pasid_is_refused() {
    let (_, _, _, request) = one_pending();
    let mut bad = record(&request, ResponseCode::Success);
    bad.pasid = 4.into();
    assert_refused_and_untouched(
        bad,
        Refusal::Mismatch {
            cookie: request.cookie,
            expected_pasid: pasid(3),
            expected_grpid: grpid(11),
            pasid: pasid(4),
            grpid: grpid(11),
        },
        |r| r.mismatch,
    );
}

#[test]
fn response_with_mismatched_grpid_is_refused() {
    let (_, _, _, request) = one_pending();
    let mut bad = record(&request, ResponseCode::Success);
    bad.grpid = 12.into();
    assert_refused_and_untouched(
        bad,
        Refusal::Mismatch {
            cookie: request.cookie,
            expected_pasid: pasid(3),
            expected_grpid: grpid(11),
            pasid: pasid(3),
            grpid: grpid(12),
        },
        |r| r.mismatch,
    );
}

#[test]
fn response_with_bad_version_is_refused() {
    let (_, _, _, request) = one_pending();
    let mut bad = record(&request, ResponseCode::Success);
    bad.version = 2.into();
    assert_refused_and_untouched(bad, Refusal::BadVersion(2), |r| r.bad_version);
}

#[test]
fn response_with_unknown_flag_bits_is_refused() {
    let (_, _, _, request) = one_pending();
    let mut bad = record(&request, ResponseCode::Success);
    bad.flags = 3.into();
    assert_refused_and_untouched(
        bad,
        Refusal::Malformed(iopf_abi::DecodeError::UnknownBits {
            field: "flags",
            bits: 2,
        }),
        |r| r.malformed,
    );
}

#[test]
fn response_code_failure_is_refused_by_default() {
    let (_, _, _, request) = one_pending();
    assert_refused_and_untouched(
        record(&request, ResponseCode::Failure),
        Refusal::FailureCode,
        |r| r.failure_code,
    );
}

#[test]
fn response_code_failure_is_accepted_when_the_device_allows_it() {
    let host = Host::new();
    let dev = host.add_device(
        1,
        DeviceConfig {
            allow_failure: true,
            ..DeviceConfig::default()
        },
    );
    let mut vmm = host.attach(dev, 16);
    host.core.report(dev, &single(3, 11)).unwrap();
    let request = vmm.page_requests().remove(0);
    vmm.answer(&request, ResponseCode::Failure);
    host.core.process_responses(dev).unwrap();
    let got = host.sink.take();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.code, ResponseCode::Failure);
}

#[test]
fn refused_responses_are_shown_in_the_host_page() {
    let (host, dev, mut vmm, request) = one_pending();
    let mut bad = record(&request, ResponseCode::Success);
    bad.version = 0.into();
    vmm.send_record(bad);
    vmm.send_record(bad);
    host.core.process_responses(dev).unwrap();
    let rejected = vmm.responses.memory().host_page().snapshot().rejected.get();
    assert_eq!(rejected, 2);
}

#[test]
fn partial_groups_interleaved_across_pasids_and_prgis_are_delivered_whole() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 64);
    // Three groups, their requests interleaved: (1, 4) of 3 pages, (2, 4) of 2 pages, (1, 5)
    // of 2 pages; no PASID on a fourth one-page group with PRGI 4.
    let order = [
        request(Some(1), 4, 10, false),
        request(Some(2), 4, 20, false),
        request(Some(1), 5, 30, false),
        request(Some(1), 4, 11, false),
        request(None, 4, 40, true),
        request(Some(2), 4, 21, true),
        request(Some(1), 5, 31, true),
        request(Some(1), 4, 12, true),
    ];
    for fault in &order {
        host.core.report(dev, fault).unwrap();
    }
    let got = vmm.page_requests();
    let summary: Vec<(Option<u32>, u16, u64, bool)> = got
        .iter()
        .map(|r| {
            (
                r.pasid.map(|p| p.get()),
                r.grpid.get(),
                r.addr.get() / 4096,
                r.last,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (None, 4, 40, true),
            (Some(2), 4, 20, false),
            (Some(2), 4, 21, true),
            (Some(1), 5, 30, false),
            (Some(1), 5, 31, true),
            (Some(1), 4, 10, false),
            (Some(1), 4, 11, false),
            (Some(1), 4, 12, true),
        ]
    );
    // Each group's records share one cookie, and the cookies differ between groups.
    let cookies: Vec<u32> = got.iter().map(|r| r.cookie.get()).collect();
    assert_eq!(cookies[1], cookies[2]);
    assert_eq!(cookies[3], cookies[4]);
    assert!(cookies[5] == cookies[6] && cookies[6] == cookies[7]);
    let distinct: std::collections::HashSet<u32> = cookies.iter().copied().collect();
    assert_eq!(distinct.len(), 4);
    assert_eq!(host.sink.take(), vec![]);
    assert_eq!(host.core.pending_groups(dev).unwrap(), 4);
}

#[test]
fn unanswered_group_times_out_once_and_a_late_answer_is_refused() {
    let host = Host::new();
    let dev = host.add_device(
        1,
        DeviceConfig {
            response_timeout: Some(Duration::from_secs(2)),
            ..DeviceConfig::default()
        },
    );
    let mut vmm = host.attach(dev, 16);
    host.core.report(dev, &single(1, 1)).unwrap();
    host.clock.advance(SECOND);
    host.core.report(dev, &single(1, 2)).unwrap();
    let requests = vmm.page_requests();
    assert_eq!(host.core.next_deadline(), Some(2 * SECOND));

    host.clock.advance(SECOND); // t = 2 s: the first group's deadline.
    assert_eq!(host.core.expire(), 1);
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            invalid(
                pasid(1),
                grpid(1),
                Some(requests[0].cookie),
                AutoReason::Timeout
            )
        )]
    );
    assert_eq!(host.core.expire(), 0, "a group times out once");

    // The guest's late answer to the timed-out group is refused; the other is answered.
    vmm.answer(&requests[0], ResponseCode::Success);
    vmm.answer(&requests[1], ResponseCode::Success);
    host.core.process_responses(dev).unwrap();
    let got = host.sink.take();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.cookie, Some(requests[1].cookie));
    host.clock.advance(10 * SECOND);
    assert_eq!(host.core.expire(), 0, "an answered group never times out");
    let c = host.core.counters(dev).unwrap();
    assert_eq!((c.responses.auto.timeout, c.refused.unknown_cookie), (1, 1));
}

#[test]
fn page_request_before_a_consumer_attaches_is_answered_invalid() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let (handler, vmm) = queues(16);
    drop(vmm); // The VMM end never attaches (its page's `abi` stays 0).
    host.core.register(dev, Box::new(handler)).unwrap();
    host.core.report(dev, &single(1, 1)).unwrap();
    host.core.report(dev, &unrecoverable()).unwrap();
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            invalid(pasid(1), grpid(1), None, AutoReason::NotAttached)
        )]
    );
    assert_eq!(host.core.counters(dev).unwrap().lost, 1);
}

// Catches: a host that reads only the fault region's `abi` and delivers page requests to a
// VMM whose response region never announced ABI v2 (or withdrew it), then trusts its answers.
#[test]
fn page_request_with_the_response_region_abi_at_0_is_answered_invalid() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let vmm = host.attach(dev, 16);
    assert!(host.core.consumer_attached(dev).unwrap());
    vmm.responses
        .memory()
        .vmm_page()
        .abi
        .store(0, std::sync::atomic::Ordering::Release);
    assert!(!host.core.consumer_attached(dev).unwrap());
    host.core.report(dev, &single(1, 1)).unwrap();
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            invalid(pasid(1), grpid(1), None, AutoReason::NotAttached)
        )]
    );
    let c = host.core.counters(dev).unwrap();
    assert_eq!((c.groups_delivered, c.responses.auto.not_attached), (0, 1));
}

#[test]
fn page_request_without_a_handler_is_answered_invalid() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    host.core
        .report(dev, &request(Some(1), 1, 5, false))
        .unwrap();
    host.core
        .report(dev, &request(Some(1), 1, 6, true))
        .unwrap();
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            invalid(pasid(1), grpid(1), None, AutoReason::NoHandler)
        )]
    );
    let c = host.core.counters(dev).unwrap();
    assert_eq!((c.page_requests, c.partial_dropped, c.groups), (2, 1, 1));
}

#[test]
fn second_register_while_one_is_live_is_refused() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let _vmm = host.attach(dev, 16);
    let (handler, _vmm2) = queues(16);
    assert!(matches!(
        host.core.register(dev, Box::new(handler)),
        Err(CoreError::AlreadyRegistered(d)) if d == dev
    ));
    assert!(host.core.is_registered(dev).unwrap());
}

#[test]
fn groups_past_the_pending_limit_are_answered_invalid() {
    let host = Host::new();
    let dev = host.add_device(
        1,
        DeviceConfig {
            max_pending_groups: 3,
            ..DeviceConfig::default()
        },
    );
    let _vmm = host.attach(dev, 16);
    let faults: Vec<DeviceFault> = (0..5).map(|g| single(1, g)).collect();
    host.core.report_batch(dev, &faults).unwrap();
    assert_eq!(
        host.sink.take(),
        vec![
            (
                dev,
                invalid(pasid(1), grpid(3), None, AutoReason::PendingLimit)
            ),
            (
                dev,
                invalid(pasid(1), grpid(4), None, AutoReason::PendingLimit)
            ),
        ]
    );
}

#[test]
fn group_over_the_page_limit_is_answered_invalid_when_it_completes() {
    let host = Host::new();
    let dev = host.add_device(
        1,
        DeviceConfig {
            max_group_pages: 4,
            ..DeviceConfig::default()
        },
    );
    let mut vmm = host.attach(dev, 64);
    for page in 0..10 {
        host.core
            .report(dev, &request(Some(1), 2, page, false))
            .unwrap();
    }
    assert_eq!(
        host.sink.take(),
        vec![],
        "no response before the group completes"
    );
    host.core
        .report(dev, &request(Some(1), 2, 10, true))
        .unwrap();
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            invalid(pasid(1), grpid(2), None, AutoReason::GroupTooLarge)
        )]
    );
    assert!(vmm.page_requests().is_empty());
    assert_eq!(host.core.counters(dev).unwrap().partial_dropped, 7);
}

#[test]
fn partial_groups_past_the_limit_are_dropped_but_every_group_is_still_answered_once() {
    let host = Host::new();
    let dev = host.add_device(
        1,
        DeviceConfig {
            max_partial_groups: 2,
            ..DeviceConfig::default()
        },
    );
    let mut vmm = host.attach(dev, 64);
    for g in 0..4 {
        host.core
            .report(dev, &request(Some(1), g, 100 + u64::from(g), false))
            .unwrap();
    }
    for g in 0..4 {
        host.core
            .report(dev, &request(Some(1), g, 200 + u64::from(g), true))
            .unwrap();
    }
    let got = vmm.page_requests();
    // Groups 0 and 1 kept their first page; groups 2 and 3 arrive with their last page only.
    assert_eq!(got.len(), 6);
    assert_eq!(host.core.counters(dev).unwrap().partial_dropped, 2);
    for r in got.iter().filter(|r| r.last) {
        vmm.answer(r, ResponseCode::Success);
    }
    host.core.process_responses(dev).unwrap();
    assert_eq!(host.sink.take().len(), 4);
}

#[test]
fn vmm_that_breaks_the_response_ring_is_unregistered_and_pending_groups_answered() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 16);
    host.core
        .report_batch(dev, &[single(1, 1), single(1, 2)])
        .unwrap();
    let requests = vmm.page_requests();
    // The VMM marks the slot of the host's next response as a record far past anything valid
    // (a skipped mark), straight into shared memory: word 3 of slot 0 is its mark.
    vmm.responses.memory().entry_words()[3]
        .store(iopf_abi::mark(1000), std::sync::atomic::Ordering::Release);
    host.core.process_responses(dev).unwrap();
    let got = host.sink.take();
    assert_eq!(got.len(), 2);
    for ((_, r), req) in got.iter().zip(&requests) {
        assert_eq!(
            *r,
            invalid(
                req.pasid,
                req.grpid,
                Some(req.cookie),
                AutoReason::QueueBroken
            )
        );
    }
    assert!(!host.core.is_registered(dev).unwrap());
    // New faults are answered at once: no handler.
    host.core.report(dev, &single(1, 3)).unwrap();
    assert_eq!(
        host.sink.take()[0].1.source,
        ResponseSource::Auto(AutoReason::NoHandler)
    );
}

#[test]
fn vmm_gone_answers_pending_groups_and_is_counted_apart() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 16);
    host.core.report(dev, &single(1, 1)).unwrap();
    let request = vmm.page_requests().remove(0);
    drop(vmm);
    assert_eq!(host.core.vmm_gone(dev), 1);
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            invalid(
                pasid(1),
                grpid(1),
                Some(request.cookie),
                AutoReason::VmmGone
            )
        )]
    );
    let c = host.core.counters(dev).unwrap();
    assert_eq!((c.responses.auto.vmm_gone, c.unregistrations), (1, 1));
}

/// A device reset (`VFIO_USER_DEVICE_RESET`) with groups pending. Catches: a reset that leaves
/// a group unanswered or answers one twice, answers it under another reason, drops the handler
/// (or its `LIVE`) like unregister does, keeps a partial group across the reset, lets the VMM's
/// late answer complete a group the reset answered, or restarts the cookie counter.
#[test]
fn reset_answers_pending_groups_once_and_keeps_the_handler() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 16);
    host.core
        .report_batch(dev, &[single(1, 1), single(1, 2), single(2, 3)])
        .unwrap();
    // A group still being assembled: its LAST_PAGE request has not come.
    host.core
        .report(dev, &request(Some(1), 4, 0x400, false))
        .unwrap();
    let old = vmm.page_requests();
    assert_eq!(old.len(), 3);
    assert_eq!(host.sink.take(), vec![]);

    assert_eq!(host.core.reset_device(dev).unwrap(), 3);
    // Each pending group is answered Invalid once, in issue order, with its cookie.
    assert_eq!(
        host.sink.take(),
        old.iter()
            .map(|r| (
                dev,
                invalid(r.pasid, r.grpid, Some(r.cookie), AutoReason::Reset)
            ))
            .collect::<Vec<_>>()
    );
    let c = host.core.counters(dev).unwrap();
    assert_eq!(c.responses.auto.reset, 3);
    assert_eq!(c.answered(), 3);
    assert_eq!(c.partial_dropped, 1, "the partial group is discarded");
    assert_eq!((c.registrations, c.unregistrations), (1, 0));
    assert_eq!(host.core.pending_groups(dev).unwrap(), 0);
    // The handler lives on: registered, the VMM still attached, LIVE still set.
    assert!(host.core.is_registered(dev).unwrap());
    assert!(host.core.consumer_attached(dev).unwrap());
    assert!(vmm.faults.live());

    // The VMM answers the groups the reset answered: refused, nothing reaches the device.
    for r in &old {
        vmm.answer(r, ResponseCode::Success);
    }
    host.core.process_responses(dev).unwrap();
    assert_eq!(host.sink.take(), vec![]);
    let c = host.core.counters(dev).unwrap();
    assert_eq!(
        (c.refused.unknown_cookie, c.responses.guest.success),
        (3, 0)
    );
    // The VMM sees the refusals in the same response queue's host page.
    let rejected = vmm.responses.memory().host_page().snapshot().rejected.get();
    assert_eq!(rejected, 3);

    // The device reuses PRG index 1 at once: the group goes through the same queue with a
    // newer cookie, and the VMM's answer to it completes it.
    host.core.report(dev, &single(1, 1)).unwrap();
    let new = vmm.page_requests();
    assert_eq!(new.len(), 1);
    assert!(old.iter().all(|r| new[0].cookie.get() > r.cookie.get()));
    vmm.answer(&new[0], ResponseCode::Success);
    host.core.process_responses(dev).unwrap();
    assert_eq!(
        host.sink.take(),
        vec![(
            dev,
            DeviceResponse {
                pasid: pasid(1),
                grpid: grpid(1),
                code: ResponseCode::Success,
                cookie: Some(new[0].cookie),
                source: ResponseSource::Guest,
            }
        )]
    );
    // The LAST_PAGE request of the discarded partial group comes after the reset: a group of
    // its own, delivered whole (one page).
    host.core
        .report(dev, &request(Some(1), 4, 0x401, true))
        .unwrap();
    let late = vmm.page_requests();
    assert_eq!(late.len(), 1);
    assert!(late[0].last);
    assert_eq!(host.core.pending_groups(dev).unwrap(), 1);
}

/// Answers the VMM published before it reset the device count: the reset reads the response
/// queue before it answers. Catches a reset that answers `Invalid` a group whose guest answer
/// was already in the queue (the device would get the wrong code, and the VMM's answer would
/// then be refused).
#[test]
fn reset_applies_the_answers_published_before_it() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut vmm = host.attach(dev, 16);
    host.core
        .report_batch(dev, &[single(1, 1), single(1, 2)])
        .unwrap();
    let requests = vmm.page_requests();
    vmm.answer(&requests[0], ResponseCode::Success);
    // The host has not read the response queue when the reset comes.
    assert_eq!(host.core.reset_device(dev).unwrap(), 1);
    assert_eq!(
        host.sink.take(),
        vec![
            (
                dev,
                DeviceResponse {
                    pasid: pasid(1),
                    grpid: grpid(1),
                    code: ResponseCode::Success,
                    cookie: Some(requests[0].cookie),
                    source: ResponseSource::Guest,
                }
            ),
            (
                dev,
                invalid(
                    pasid(1),
                    grpid(2),
                    Some(requests[1].cookie),
                    AutoReason::Reset
                )
            ),
        ]
    );
    let c = host.core.counters(dev).unwrap();
    assert_eq!((c.responses.guest.success, c.responses.auto.reset), (1, 1));
    assert_eq!(c.refused_total(), 0);
}

/// A reset of a device without a handler, or with nothing pending, answers nothing and
/// registers nothing. Catches a reset that invents responses or a handler.
#[test]
fn reset_with_nothing_pending_answers_nothing() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    assert_eq!(host.core.reset_device(dev).unwrap(), 0);
    assert!(!host.core.is_registered(dev).unwrap());
    let _vmm = host.attach(dev, 16);
    assert_eq!(host.core.reset_device(dev).unwrap(), 0);
    assert_eq!(host.sink.take(), vec![]);
    assert_eq!(host.core.counters(dev).unwrap().responses.auto.reset, 0);
    assert!(matches!(
        host.core.reset_device(iopf_core::DeviceId(99)),
        Err(CoreError::UnknownDevice(_))
    ));
}

#[test]
fn cookies_are_never_zero_and_keep_increasing_across_lives() {
    let host = Host::new();
    let dev = host.add_device(1, DeviceConfig::default());
    let mut last = 0u32;
    for _life in 0..3 {
        let mut vmm = host.attach(dev, 16);
        for g in 0..4 {
            host.core.report(dev, &single(1, g)).unwrap();
        }
        for r in vmm.page_requests() {
            assert!(r.cookie.get() > last, "{} after {last}", r.cookie.get());
            last = r.cookie.get();
        }
        host.core.unregister(dev);
    }
}

#[test]
fn counters_serialize_to_json() {
    let (host, dev, mut vmm, request) = one_pending();
    vmm.answer(&request, ResponseCode::Success);
    host.core.process_responses(dev).unwrap();
    let json = serde_json::to_value(host.core.total_counters()).unwrap();
    assert_eq!(json["responses"]["guest"]["success"], 1);
    assert_eq!(json["groups"], 1);
    assert_eq!(json["refused"]["unknown_cookie"], 0);
}

#[test]
fn removed_devices_still_count_in_the_totals() {
    let (host, dev, _vmm, _) = one_pending();
    let counters = host.core.remove_device(dev).unwrap();
    assert_eq!(counters.responses.auto.unregister, 1);
    assert_eq!(host.core.total_counters().groups, 1);
    assert!(matches!(
        host.core.report(dev, &single(1, 1)),
        Err(CoreError::UnknownDevice(_))
    ));
}

#[test]
fn reporting_from_many_threads_for_different_devices() {
    let host = std::sync::Arc::new(Host::new());
    let devices: Vec<_> = (0..4)
        .map(|i| host.add_device(i, DeviceConfig::default()))
        .collect();
    let threads: Vec<_> = devices
        .iter()
        .map(|&dev| {
            let host = host.clone();
            std::thread::spawn(move || {
                let mut vmm = host.attach(dev, 1024);
                let mut answered = 0;
                for round in 0..100u32 {
                    let faults: Vec<_> = (0..10).map(|g| single(1 + round, g)).collect();
                    host.core.report_batch(dev, &faults).unwrap();
                    for r in vmm.page_requests() {
                        vmm.answer(&r, ResponseCode::Success);
                    }
                    answered += host.core.process_responses(dev).unwrap();
                }
                answered
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 1000);
    }
    let total = host.core.total_counters();
    assert_eq!((total.groups, total.responses.guest.success), (4000, 4000));
    let got = host.sink.take();
    for dev in devices {
        assert_eq!(got.iter().filter(|(d, _)| *d == dev).count(), 1000);
    }
}
