//! The VMM's vIOMMU as iopf sees it: whole page request groups in, answers out.

use std::collections::HashMap;

use iopf_abi::{DecodeError, PageRequest, Pasid, PrgIndex, UnrecoverableFault};

/// The VMM's virtual IOMMU, as the library hands it faults.
///
/// [`Device::poll`](crate::Device::poll) and [`EventLoop::run_once`](crate::EventLoop::run_once)
/// call it on the thread that polls, one fault at a time, in the order the channel delivered
/// them.
pub trait Viommu {
    /// A whole page request group (its requests in order, the one with `last` set at the end).
    ///
    /// Answer now or later, from any thread, with
    /// [`Responder::respond`](crate::Responder::respond)`(group.token(), code)`; exactly one
    /// answer per group. A group left unanswered is answered by the host when its timeout
    /// expires, if it has one.
    fn page_request_group(&mut self, group: PageRequestGroup);

    /// An unrecoverable fault (reported, never answered).
    fn unrecoverable(&mut self, device: u32, fault: UnrecoverableFault) {
        let _ = (device, fault);
    }

    /// A record that did not decode (the library counts it too, in
    /// [`DeviceStats::malformed`](crate::DeviceStats::malformed)).
    fn malformed(&mut self, device: u32, error: DecodeError) {
        let _ = (device, error);
    }
}

/// What an answer needs to find its group: the device, the handler life the group came in, and
/// the group's last request (whose cookie, PASID and PRG index the response names).
///
/// Opaque, `Copy` and `Send`: keep it with the guest's work and hand it back to
/// [`Responder::respond`](crate::Responder::respond) from any thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupToken {
    pub(crate) owner: u64,
    pub(crate) life: u64,
    pub(crate) device: u32,
    pub(crate) last: PageRequest,
}

impl GroupToken {
    /// The device the group came from.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// The group's PASID (`None`: requests without PASID).
    pub fn pasid(&self) -> Option<Pasid> {
        self.last.pasid
    }

    /// The group's PRG index.
    pub fn grpid(&self) -> PrgIndex {
        self.last.grpid
    }
}

/// A whole page request group of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequestGroup {
    device: u32,
    pasid: Option<Pasid>,
    grpid: PrgIndex,
    requests: Vec<PageRequest>,
    token: GroupToken,
}

impl PageRequestGroup {
    /// A group of `requests` (never empty; the last one has `last` set).
    pub(crate) fn new(device: u32, requests: Vec<PageRequest>, owner: u64, life: u64) -> Self {
        let last = requests[requests.len() - 1];
        Self {
            device,
            pasid: last.pasid,
            grpid: last.grpid,
            requests,
            token: GroupToken {
                owner,
                life,
                device,
                last,
            },
        }
    }

    /// The device the group came from (the host's device number, or the iommufd device id).
    pub fn device(&self) -> u32 {
        self.device
    }

    /// The address space: its PASID (`None`: requests without PASID).
    pub fn pasid(&self) -> Option<Pasid> {
        self.pasid
    }

    /// The PRG index.
    pub fn grpid(&self) -> PrgIndex {
        self.grpid
    }

    /// The requests, in order; the last one has `last` set.
    pub fn requests(&self) -> &[PageRequest] {
        &self.requests
    }

    /// The requests, taken.
    pub fn into_requests(self) -> Vec<PageRequest> {
        self.requests
    }

    /// What to answer the group with (see [`Responder::respond`](crate::Responder::respond)).
    pub fn token(&self) -> GroupToken {
        self.token
    }
}

/// What [`GroupAssembler::push`] made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembled {
    /// The group is not complete yet.
    Partial,
    /// The group is complete: its requests in order, the one with `last` set at the end.
    Group(Vec<PageRequest>),
    /// The request ended a group that was dropped (too large, or interrupted by another
    /// group): here is its last request, so that the caller can answer it `Invalid`.
    DroppedLast(PageRequest),
}

#[derive(Debug, Default)]
struct Partial {
    requests: Vec<PageRequest>,
    /// A group being dropped: its remaining requests are discarded up to its last one.
    dropping: Option<(Option<Pasid>, PrgIndex)>,
}

/// Assembles page request groups from the requests of one or more devices, in the order a
/// channel delivers them (a group's requests together, the one with `last` set at the end).
///
/// The requests come from an untrusted peer, so the assembler bounds what it keeps: a group
/// longer than its limit is dropped (its last request is still reported, so the group can be
/// answered `Invalid`), and a request of another group arriving before the current group's
/// last one drops the unfinished group.
#[derive(Debug)]
pub struct GroupAssembler {
    limit: usize,
    partial: HashMap<u32, Partial>,
    dropped_groups: u64,
    dropped_requests: u64,
}

impl Default for GroupAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl GroupAssembler {
    /// The default limit on a group's requests. A PCIe function has at most a few hundred
    /// outstanding page request credits, so a real group is far smaller.
    pub const DEFAULT_LIMIT: usize = 512;

    /// An assembler with the [default limit](Self::DEFAULT_LIMIT).
    pub fn new() -> Self {
        Self::with_limit(Self::DEFAULT_LIMIT)
    }

    /// An assembler that drops groups longer than `limit` requests (at least 1).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            partial: HashMap::new(),
            dropped_groups: 0,
            dropped_requests: 0,
        }
    }

    /// Adds one request of `device`.
    pub fn push(&mut self, device: u32, request: PageRequest) -> Assembled {
        let key = (request.pasid, request.grpid);
        let p = self.partial.entry(device).or_default();
        if let Some(dropping) = p.dropping {
            if dropping == key {
                self.dropped_requests += 1;
                if request.last {
                    p.dropping = None;
                    return Assembled::DroppedLast(request);
                }
                return Assembled::Partial;
            }
            // Another group began before the dropped one's last request: stop dropping.
            p.dropping = None;
        }
        if let Some(first) = p.requests.first()
            && (first.pasid, first.grpid) != key
        {
            // The unfinished group was interrupted: its last request will not come in order.
            self.dropped_groups += 1;
            self.dropped_requests += p.requests.len() as u64;
            p.requests.clear();
        }
        if request.last {
            p.requests.push(request);
            let group = std::mem::take(&mut p.requests);
            self.partial.remove(&device);
            return Assembled::Group(group);
        }
        if p.requests.len() + 1 >= self.limit {
            // One more, and the group would be over the limit without its last request.
            self.dropped_groups += 1;
            self.dropped_requests += p.requests.len() as u64 + 1;
            p.requests = Vec::new();
            p.dropping = Some(key);
            return Assembled::Partial;
        }
        p.requests.push(request);
        Assembled::Partial
    }

    /// Forgets every unfinished group (a new handler life: they will never end).
    pub fn clear(&mut self) {
        for p in self.partial.values() {
            if !p.requests.is_empty() {
                self.dropped_groups += 1;
                self.dropped_requests += p.requests.len() as u64;
            }
        }
        self.partial.clear();
    }

    /// Requests held in unfinished groups.
    pub fn pending(&self) -> usize {
        self.partial.values().map(|p| p.requests.len()).sum()
    }

    /// Groups dropped: too long, interrupted, or unfinished at [`clear`](Self::clear).
    pub fn dropped_groups(&self) -> u64 {
        self.dropped_groups
    }

    /// Requests dropped with those groups.
    pub fn dropped_requests(&self) -> u64 {
        self.dropped_requests
    }
}

#[cfg(test)]
mod tests {
    use iopf_abi::{Cookie, PageAddr, Perm};

    use super::*;

    fn req(grpid: u32, page: u64, last: bool) -> PageRequest {
        PageRequest {
            cookie: Cookie::new(grpid + 1).unwrap(),
            pasid: Pasid::new(1).ok(),
            grpid: PrgIndex::new(grpid).unwrap(),
            perm: Perm::READ,
            addr: PageAddr::containing(page * 4096),
            last,
            private_data: None,
        }
    }

    #[test]
    fn groups_of_interleaved_devices_assemble_separately() {
        let mut a = GroupAssembler::new();
        assert_eq!(a.push(1, req(3, 0, false)), Assembled::Partial);
        assert_eq!(a.push(2, req(3, 10, false)), Assembled::Partial);
        assert_eq!(a.push(1, req(3, 1, false)), Assembled::Partial);
        assert_eq!(
            a.push(2, req(3, 11, true)),
            Assembled::Group(vec![req(3, 10, false), req(3, 11, true)])
        );
        assert_eq!(a.pending(), 2);
        assert_eq!(
            a.push(1, req(3, 2, true)),
            Assembled::Group(vec![req(3, 0, false), req(3, 1, false), req(3, 2, true)])
        );
        assert_eq!(a.pending(), 0);
        assert_eq!(a.dropped_groups(), 0);
    }

    #[test]
    fn a_group_over_the_limit_is_dropped_and_its_last_request_reported() {
        let mut a = GroupAssembler::with_limit(4);
        for page in 0..10 {
            assert_eq!(a.push(1, req(5, page, false)), Assembled::Partial);
            assert!(a.pending() < 4, "holds {} requests", a.pending());
        }
        assert_eq!(
            a.push(1, req(5, 10, true)),
            Assembled::DroppedLast(req(5, 10, true))
        );
        assert_eq!(a.dropped_groups(), 1);
        assert_eq!(a.dropped_requests(), 11);
        // The next group assembles normally, up to the limit.
        for page in 0..3 {
            assert_eq!(a.push(1, req(6, page, false)), Assembled::Partial);
        }
        assert!(matches!(a.push(1, req(6, 3, true)), Assembled::Group(g) if g.len() == 4));
    }

    #[test]
    fn a_group_interrupted_by_another_is_dropped() {
        let mut a = GroupAssembler::new();
        a.push(1, req(1, 0, false));
        a.push(1, req(1, 1, false));
        assert_eq!(
            a.push(1, req(2, 5, true)),
            Assembled::Group(vec![req(2, 5, true)])
        );
        assert_eq!((a.dropped_groups(), a.dropped_requests()), (1, 2));
    }

    #[test]
    fn clear_drops_unfinished_groups() {
        let mut a = GroupAssembler::new();
        a.push(1, req(1, 0, false));
        a.push(2, req(1, 0, false));
        a.clear();
        assert_eq!((a.pending(), a.dropped_groups()), (0, 2));
        assert_eq!(
            a.push(1, req(1, 1, true)),
            Assembled::Group(vec![req(1, 1, true)])
        );
    }
}
