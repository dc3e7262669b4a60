//! Random interleavings of report, respond, unregister, register, VMM loss, device reset and
//! timeouts, checked against the guarantees of `docs/DESIGN.md` §4.1 to §4.4 after every step.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Host, SECOND, Vmm};
use iopf_abi::{PageRequest, PageResponse, ResponseCode, ResponseRecord};
use iopf_core::{DeviceConfig, DeviceFault, DeviceId, ResponseSource};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// The device issues a group of `pages` pages for (pasid, grpid), if it has none
    /// outstanding there (a device never reuses a PRG index before its response).
    Report {
        dev: usize,
        pasid: u32,
        grpid: u32,
        pages: u64,
    },
    Unrecoverable {
        dev: usize,
    },
    /// The VMM reads its fault queue.
    VmmRead {
        dev: usize,
    },
    /// The VMM answers the `pick`-th request it ever saw (any life: possibly stale, possibly
    /// already answered).
    VmmAnswer {
        dev: usize,
        pick: usize,
        code: u8,
    },
    /// The VMM sends a record with arbitrary fields.
    VmmForge {
        dev: usize,
        cookie: u32,
        pasid: u32,
        grpid: u32,
        version: u32,
    },
    Process {
        dev: usize,
    },
    Unregister {
        dev: usize,
    },
    Register {
        dev: usize,
        entries_log: u32,
    },
    VmmGone {
        dev: usize,
    },
    /// The VMM resets the device: the handler stays, its pending groups are answered.
    Reset {
        dev: usize,
    },
    Advance {
        millis: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let dev = 0usize..2;
    prop_oneof![
        4 => (dev.clone(), 0u32..3, 0u32..6, 1u64..4).prop_map(|(dev, pasid, grpid, pages)| Op::Report { dev, pasid, grpid, pages }),
        1 => dev.clone().prop_map(|dev| Op::Unrecoverable { dev }),
        3 => dev.clone().prop_map(|dev| Op::VmmRead { dev }),
        4 => (dev.clone(), any::<usize>(), 0u8..3).prop_map(|(dev, pick, code)| Op::VmmAnswer { dev, pick, code }),
        1 => (dev.clone(), 0u32..64, 0u32..3, 0u32..6, 0u32..3).prop_map(|(dev, cookie, pasid, grpid, version)| Op::VmmForge { dev, cookie, pasid, grpid, version }),
        3 => dev.clone().prop_map(|dev| Op::Process { dev }),
        1 => dev.clone().prop_map(|dev| Op::Unregister { dev }),
        1 => (dev.clone(), 1u32..5).prop_map(|(dev, entries_log)| Op::Register { dev, entries_log }),
        1 => dev.clone().prop_map(|dev| Op::VmmGone { dev }),
        1 => dev.clone().prop_map(|dev| Op::Reset { dev }),
        1 => (0u64..3000).prop_map(|millis| Op::Advance { millis }),
    ]
}

/// What the device model knows: the groups it waits on, and everything it was answered.
#[derive(Default)]
struct DeviceModel {
    outstanding: HashSet<(u32, u16)>,
    answered_cookies: HashSet<u32>,
    /// Cookies the VMM has put in a response record (so a guest response is traceable).
    sent_cookies: HashSet<u32>,
    /// Cookies seen in fault records, to check each group gets a fresh one.
    issued_cookies: HashSet<u32>,
    vmm: Option<Vmm>,
    seen: Vec<PageRequest>,
}

struct World {
    host: Host,
    ids: Vec<DeviceId>,
    devices: Vec<DeviceModel>,
}

impl World {
    fn new() -> Self {
        let host = Host::new();
        let config = DeviceConfig {
            max_pending_groups: 8,
            response_timeout: Some(Duration::from_secs(2)),
            ..DeviceConfig::default()
        };
        let ids = vec![host.add_device(1, config), host.add_device(2, config)];
        Self {
            host,
            ids,
            devices: vec![DeviceModel::default(), DeviceModel::default()],
        }
    }

    /// Applies what the devices received, checking invariants 1, 2 and 4 on each response.
    fn collect(&mut self) -> Result<(), TestCaseError> {
        for (id, response) in self.host.sink.take() {
            let dev = self.ids.iter().position(|d| *d == id).unwrap();
            let model = &mut self.devices[dev];
            let key = (
                response.pasid.map_or(u32::MAX, |p| p.get()),
                response.grpid.get(),
            );
            // Invariant 1: one response per group, and only for a group the device waits on.
            prop_assert!(
                model.outstanding.remove(&key),
                "response for no outstanding group: {response:?}"
            );
            if let Some(cookie) = response.cookie {
                prop_assert!(
                    model.answered_cookies.insert(cookie.get()),
                    "cookie answered twice: {response:?}"
                );
            }
            // Invariant 2: a guest response carries a cookie the VMM really sent for this device.
            if response.source == ResponseSource::Guest {
                let cookie = response.cookie.unwrap();
                prop_assert!(
                    model.sent_cookies.contains(&cookie.get()),
                    "guest response the VMM never sent: {response:?}"
                );
                prop_assert!(model.issued_cookies.contains(&cookie.get()));
            }
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Report {
                dev,
                pasid,
                grpid,
                pages,
            } => {
                let key = (pasid, grpid as u16);
                if self.devices[dev].outstanding.contains(&key) {
                    return Ok(());
                }
                self.devices[dev].outstanding.insert(key);
                let faults: Vec<DeviceFault> = (0..pages)
                    .map(|p| {
                        common::request(
                            Some(pasid),
                            grpid,
                            0x100 * u64::from(grpid) + p,
                            p + 1 == pages,
                        )
                    })
                    .collect();
                self.host.core.report_batch(self.ids[dev], &faults).unwrap();
            }
            Op::Unrecoverable { dev } => {
                let fault = DeviceFault::Unrecoverable(iopf_abi::UnrecoverableFault {
                    reason: iopf_abi::FaultReason::Access,
                    pasid: None,
                    perm: iopf_abi::Perm::READ,
                    addr: None,
                    fetch_addr: None,
                });
                self.host.core.report(self.ids[dev], &fault).unwrap();
            }
            Op::VmmRead { dev } => {
                let model = &mut self.devices[dev];
                if let Some(vmm) = model.vmm.as_mut() {
                    for request in vmm.page_requests() {
                        if request.last {
                            // Each group gets a cookie no earlier group of the device had.
                            prop_assert!(
                                model.issued_cookies.insert(request.cookie.get()),
                                "cookie reused: {request:?}"
                            );
                            model.seen.push(request);
                        }
                    }
                }
            }
            Op::VmmAnswer { dev, pick, code } => {
                let model = &mut self.devices[dev];
                if let (Some(vmm), false) = (model.vmm.as_mut(), model.seen.is_empty()) {
                    let request = model.seen[pick % model.seen.len()];
                    let code = [
                        ResponseCode::Success,
                        ResponseCode::Invalid,
                        ResponseCode::Failure,
                    ][code as usize];
                    model.sent_cookies.insert(request.cookie.get());
                    let _ = vmm.responses.stage_record(&ResponseRecord::from(
                        &PageResponse::answering(&request, code),
                    ));
                    let _ = vmm.responses.publish();
                }
            }
            Op::VmmForge {
                dev,
                cookie,
                pasid,
                grpid,
                version,
            } => {
                let model = &mut self.devices[dev];
                if let Some(vmm) = model.vmm.as_mut() {
                    // Forged records carry cookies the VMM chose: any that the core accepts
                    // must be traceable too.
                    model.sent_cookies.insert(cookie);
                    let record = ResponseRecord {
                        version: version.into(),
                        flags: 1.into(),
                        pasid: pasid.into(),
                        grpid: grpid.into(),
                        code: 0.into(),
                        cookie: cookie.into(),
                        mark: 0.into(),
                    };
                    let _ = vmm.responses.stage_record(&record);
                    let _ = vmm.responses.publish();
                }
            }
            Op::Process { dev } => {
                self.host.core.process_responses(self.ids[dev]).unwrap();
            }
            Op::Unregister { dev } | Op::VmmGone { dev } => {
                if matches!(op, Op::Unregister { .. }) {
                    self.host.core.unregister(self.ids[dev]);
                } else {
                    self.host.core.vmm_gone(self.ids[dev]);
                }
                self.devices[dev].vmm = None;
                self.collect()?;
                // Invariant 3: after unregister nothing waits on the device's old handler.
                prop_assert_eq!(self.host.core.pending_groups(self.ids[dev]).unwrap(), 0);
                prop_assert!(
                    self.devices[dev].outstanding.is_empty(),
                    "groups left waiting after unregister"
                );
            }
            Op::Reset { dev } => {
                let registered = self.host.core.is_registered(self.ids[dev]).unwrap();
                self.host.core.reset_device(self.ids[dev]).unwrap();
                self.collect()?;
                // Nothing is left pending, and the handler is where it was (unless the reset's
                // read of the response queue found it broken, which the VMM here never does).
                prop_assert_eq!(self.host.core.pending_groups(self.ids[dev]).unwrap(), 0);
                prop_assert!(self.devices[dev].outstanding.is_empty());
                prop_assert_eq!(
                    self.host.core.is_registered(self.ids[dev]).unwrap(),
                    registered
                );
            }
            Op::Register { dev, entries_log } => {
                if !self.host.core.is_registered(self.ids[dev]).unwrap() {
                    self.devices[dev].vmm = Some(self.host.attach(self.ids[dev], 1 << entries_log));
                }
            }
            Op::Advance { millis } => {
                self.host.clock.advance(millis * (SECOND / 1000));
                self.host.core.expire();
            }
        }
        self.collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_the_core_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let mut world = World::new();
        for op in &ops {
            world.step(op)?;
            // The core's books balance: every completed group is answered or pending.
            for (dev, id) in world.ids.iter().enumerate() {
                let c = world.host.core.counters(*id).unwrap();
                let pending = world.host.core.pending_groups(*id).unwrap() as u64;
                prop_assert_eq!(c.groups, c.answered() + pending);
                prop_assert_eq!(world.devices[dev].outstanding.len() as u64, pending);
            }
        }
        // Invariant 1 at the end: unregister everything; every group was answered once.
        for dev in 0..2 {
            world.step(&Op::Unregister { dev })?;
        }
        for model in &world.devices {
            prop_assert!(model.outstanding.is_empty());
        }
    }
}
