//! Each PRI rule of the endpoint model (`docs/DESIGN.md` §5), one test each.

use iopf_abi::{FaultReason, Pasid, Perm, PrgIndex, ResponseCode};
use iopf_models::PAGE_SIZE;
use iopf_models::endpoint::{
    DmaAccess, Endpoint, EndpointConfig, PageRequestMessage, PrgiAlloc, Upstream,
};
use iopf_models::iommu::Iommu;
use iopf_models::memory::GuestMemory;

const DEV: u32 = 1;

fn pasid() -> Option<Pasid> {
    Some(Pasid::new(5).unwrap())
}

struct Bench {
    endpoint: Endpoint,
    iommu: Iommu,
    memory: GuestMemory,
    next: u64,
}

impl Bench {
    fn new(config: EndpointConfig) -> Self {
        let mut iommu = Iommu::new();
        iommu.add_space((DEV, pasid()));
        Self {
            endpoint: Endpoint::new(DEV, config),
            iommu,
            memory: GuestMemory::new(64).unwrap(),
            next: 0,
        }
    }

    /// Submits a write of `pages` pages starting at page `page`.
    fn write(&mut self, page: u64, pages: u64) {
        self.next += 1;
        self.endpoint.submit(DmaAccess {
            id: self.next,
            pasid: pasid(),
            iova: page * PAGE_SIZE,
            len: (pages * PAGE_SIZE) as u32,
            write: true,
            data_seed: self.next,
        });
    }

    fn step(&mut self) -> Vec<Upstream> {
        let mut out = Vec::new();
        self.endpoint
            .step(&mut self.iommu, &mut self.memory, &mut out);
        out
    }

    fn requests(&mut self) -> Vec<PageRequestMessage> {
        self.step()
            .into_iter()
            .map(|u| match u {
                Upstream::PageRequest(r) => r,
                other => panic!("expected page requests, got {other:?}"),
            })
            .collect()
    }

    /// Maps `page` as the guest would.
    fn map(&mut self, page: u64) {
        let gpa = self.memory.allocate_page().unwrap();
        self.iommu
            .map(
                (DEV, pasid()),
                page * PAGE_SIZE,
                gpa,
                Perm::READ | Perm::WRITE,
            )
            .unwrap();
    }

    fn respond(&mut self, grpid: PrgIndex, code: ResponseCode) {
        self.endpoint.on_response(pasid(), grpid, code);
    }
}

#[test]
fn a_miss_becomes_a_multi_page_group_with_last_on_its_final_request() {
    let mut b = Bench::new(EndpointConfig::default());
    b.write(10, 3);
    let requests = b.requests();
    assert_eq!(requests.len(), 3);
    assert!(
        requests
            .iter()
            .all(|r| r.grpid == requests[0].grpid && r.pasid == pasid() && r.perm == Perm::WRITE)
    );
    assert_eq!(
        requests.iter().map(|r| r.last).collect::<Vec<_>>(),
        vec![false, false, true]
    );
    assert_eq!(
        requests
            .iter()
            .map(|r| r.addr.get() / PAGE_SIZE)
            .collect::<Vec<_>>(),
        vec![10, 11, 12]
    );
    assert_eq!(
        b.endpoint.outstanding(),
        3,
        "credits count requests, not groups"
    );
}

#[test]
fn requests_never_exceed_the_allocation() {
    let mut b = Bench::new(EndpointConfig {
        allocation: 4,
        ..EndpointConfig::default()
    });
    b.write(0, 3);
    b.write(10, 2);
    assert_eq!(
        b.requests().len(),
        3,
        "the second group needs 2 credits, only 1 is left"
    );
    assert_eq!(b.endpoint.counters().stalls, 1);
    let grpid = PrgIndex::new(0).unwrap();
    (0..3).for_each(|p| b.map(p));
    b.respond(grpid, ResponseCode::Success);
    assert_eq!(
        b.endpoint.outstanding(),
        0,
        "a response returns every credit of its group"
    );
    let next = b.requests();
    assert_eq!(next.len(), 2);
}

#[test]
fn a_group_larger_than_the_allocation_fails_its_access() {
    let mut b = Bench::new(EndpointConfig {
        allocation: 2,
        ..EndpointConfig::default()
    });
    b.write(0, 3);
    assert!(b.step().is_empty());
    assert_eq!(b.endpoint.counters().failed_too_large, 1);
}

#[test]
fn an_over_issuing_device_exceeds_its_allocation_by_its_overrun() {
    let mut b = Bench::new(EndpointConfig {
        allocation: 2,
        credit_overrun: 3,
        ..EndpointConfig::default()
    });
    for page in 0..5 {
        b.write(page * 2, 1);
    }
    assert_eq!(b.requests().len(), 5);
    assert_eq!(b.endpoint.outstanding(), 5);
}

#[test]
fn prg_index_is_never_reused_before_its_response() {
    let mut b = Bench::new(EndpointConfig {
        allocation: 600,
        prgi_alloc: PrgiAlloc::LowestFree,
        ..EndpointConfig::default()
    });
    for page in 0..513 {
        b.write(page, 1);
    }
    let requests = b.requests();
    assert_eq!(
        requests.len(),
        512,
        "all 512 PRG indices in flight: the 513th access waits"
    );
    let distinct: std::collections::BTreeSet<u16> =
        requests.iter().map(|r| r.grpid.get()).collect();
    assert_eq!(distinct.len(), 512);
    // Answering index 7 frees exactly that one, which LowestFree takes at once.
    b.respond(PrgIndex::new(7).unwrap(), ResponseCode::Invalid);
    let next = b.requests();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].grpid.get(), 7);
}

#[test]
fn success_retries_the_translation_and_completes_the_dma() {
    let mut b = Bench::new(EndpointConfig::default());
    b.write(3, 1);
    let grpid = b.requests()[0].grpid;
    b.map(3);
    b.respond(grpid, ResponseCode::Success);
    assert!(b.step().is_empty());
    let c = b.endpoint.counters();
    assert_eq!((c.completed, c.retries, c.bytes_written), (1, 1, PAGE_SIZE));
    assert_eq!(b.memory.verify().bytes_mismatched, 0);
    assert!(b.endpoint.idle());
}

#[test]
fn success_without_the_page_mapped_requests_it_again() {
    let mut b = Bench::new(EndpointConfig::default());
    b.write(3, 1);
    let first = b.requests()[0];
    b.respond(first.grpid, ResponseCode::Success);
    let again = b.requests();
    assert_eq!(again.len(), 1, "the page is still missing: a new request");
    assert_eq!(again[0].addr, first.addr);
}

#[test]
fn retry_policy_gives_up_after_its_rounds() {
    let mut b = Bench::new(EndpointConfig {
        retry_rounds: Some(1),
        ..EndpointConfig::default()
    });
    b.write(3, 1);
    let grpid = b.requests()[0].grpid;
    b.respond(grpid, ResponseCode::Success);
    let grpid = b.requests()[0].grpid;
    b.respond(grpid, ResponseCode::Success);
    assert!(b.step().is_empty());
    assert_eq!(b.endpoint.counters().failed_retries, 1);
}

#[test]
fn invalid_fails_the_access_without_dma() {
    let mut b = Bench::new(EndpointConfig::default());
    b.write(3, 1);
    let grpid = b.requests()[0].grpid;
    b.respond(grpid, ResponseCode::Invalid);
    assert!(b.step().is_empty());
    let c = b.endpoint.counters();
    assert_eq!((c.failed_invalid, c.bytes_written, c.completed), (1, 0, 0));
    assert!(b.endpoint.idle());
}

#[test]
fn failure_halts_pri_until_it_is_disabled_and_enabled() {
    let mut b = Bench::new(EndpointConfig::default());
    b.write(1, 1);
    b.write(2, 1);
    let requests = b.requests();
    b.respond(requests[0].grpid, ResponseCode::Failure);
    assert!(b.endpoint.status().response_failure);
    // Every later response is ignored, and no page request goes out: misses fault instead.
    b.respond(requests[1].grpid, ResponseCode::Success);
    assert_eq!(b.endpoint.counters().ignored, 1);
    b.write(9, 1);
    let out = b.step();
    assert!(matches!(out[..], [Upstream::Unrecoverable(f)] if f.reason == FaultReason::PteFetch));
    b.endpoint.disable_pri();
    assert!(b.endpoint.status().stopped);
    assert_eq!(
        b.endpoint.outstanding(),
        0,
        "disable drops tracking and restores credits"
    );
    b.endpoint.enable_pri();
    assert!(!b.endpoint.status().response_failure);
    b.write(9, 1);
    assert_eq!(b.requests().len(), 1);
}

#[test]
fn response_for_an_unknown_prg_index_sets_uprgi_and_is_ignored() {
    let mut b = Bench::new(EndpointConfig::default());
    b.write(1, 1);
    let grpid = b.requests()[0].grpid;
    b.respond(
        PrgIndex::new(grpid.get() as u32 + 1).unwrap(),
        ResponseCode::Success,
    );
    assert!(b.endpoint.status().unexpected_prgi);
    assert_eq!(b.endpoint.counters().unexpected, 1);
    assert_eq!(
        b.endpoint.groups_in_flight(),
        1,
        "the real group is untouched"
    );
}

#[test]
fn response_with_another_pasid_is_unexpected() {
    let mut b = Bench::new(EndpointConfig::default());
    b.write(1, 1);
    let grpid = b.requests()[0].grpid;
    b.endpoint
        .on_response(Some(Pasid::new(6).unwrap()), grpid, ResponseCode::Success);
    assert!(b.endpoint.status().unexpected_prgi);
    assert_eq!(b.endpoint.groups_in_flight(), 1);
}

#[test]
fn without_pri_a_miss_is_an_unrecoverable_fault_and_the_dma_aborts() {
    let mut b = Bench::new(EndpointConfig {
        pri: false,
        ..EndpointConfig::default()
    });
    b.write(4, 1);
    let out = b.step();
    match out[..] {
        [Upstream::Unrecoverable(f)] => {
            assert_eq!(f.reason, FaultReason::PteFetch);
            assert_eq!(f.addr, Some(4 * PAGE_SIZE));
            assert_eq!(f.pasid, pasid());
        }
        _ => panic!("{out:?}"),
    }
    assert_eq!(b.endpoint.counters().failed_no_pri, 1);
}

#[test]
fn a_permission_fault_on_a_pri_device_becomes_a_page_request() {
    let mut b = Bench::new(EndpointConfig::default());
    let gpa = b.memory.allocate_page().unwrap();
    b.iommu
        .map((DEV, pasid()), 4 * PAGE_SIZE, gpa, Perm::READ)
        .unwrap();
    b.write(4, 1);
    let requests = b.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].perm, Perm::WRITE);
}
