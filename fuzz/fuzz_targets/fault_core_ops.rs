//! The fault core fed arbitrary sequences of report, respond, register, unregister, VMM loss,
//! device reset and timeouts (structure-aware), with the guarantees of `docs/DESIGN.md` §4
//! checked after every step: every group answered exactly once, only for a group the device
//! waits on; a guest response only with a cookie the VMM saw; nothing pending after unregister
//! or reset; the books balance.
#![no_main]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use iopf_abi::{Fault, PageAddr, Pasid, Perm, PrgIndex, QueueGeometry, QueueKind, ResponseRecord};
use iopf_core::{
    DeviceConfig, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, DeviceSink, FaultCore,
    ManualClock, QueueHandler, ResponseSource,
};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, HeapMemory, ResponseQueueConsumer,
    ResponseQueueProducer,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    /// A request of group (pasid, grpid); `last` closes the group.
    Request {
        dev: bool,
        pasid: u8,
        grpid: u8,
        last: bool,
    },
    /// The VMM answers the n-th page request it ever saw (any life), with a code.
    Answer {
        dev: bool,
        pick: u16,
        code: u8,
    },
    /// The VMM sends an arbitrary record.
    Raw {
        dev: bool,
        version: u8,
        flags: u8,
        pasid: u8,
        grpid: u16,
        code: u8,
        cookie: u32,
        /// A mark in the staged record: the ring's to overwrite when it publishes.
        mark: u8,
    },
    Read {
        dev: bool,
    },
    Process {
        dev: bool,
    },
    Register {
        dev: bool,
        entries_log: u8,
    },
    Unregister {
        dev: bool,
    },
    VmmGone {
        dev: bool,
    },
    Expire {
        millis: u16,
    },
    /// The VMM resets the device (`DEVICE_RESET`): the handler stays.
    Reset {
        dev: bool,
    },
}

#[derive(Debug, Default)]
struct Sink(Mutex<Vec<(DeviceId, DeviceResponse)>>);

impl DeviceSink for Sink {
    fn page_response(&self, device: DeviceId, response: DeviceResponse) {
        self.0.lock().unwrap().push((device, response));
    }
}

#[derive(Default)]
struct Model {
    /// Groups the device waits on: requests sent with LAST.
    waiting: HashSet<(u8, u8)>,
    /// Groups with requests sent but no LAST yet.
    open: HashSet<(u8, u8)>,
    vmm: Option<(
        FaultQueueConsumer<Arc<HeapMemory>>,
        ResponseQueueProducer<Arc<HeapMemory>>,
    )>,
    seen: Vec<iopf_abi::PageRequest>,
    sent_cookies: HashSet<u32>,
}

fuzz_target!(|ops: Vec<Op>| {
    let clock = Arc::new(ManualClock::new(0));
    let core = FaultCore::new(clock.clone());
    let sink = Arc::new(Sink::default());
    let config = DeviceConfig {
        max_pending_groups: 16,
        max_partial_groups: 4,
        max_group_pages: 4,
        ..DeviceConfig::default()
    };
    let ids = [DeviceId(1), DeviceId(2)];
    for id in ids {
        core.add_device(id, config, sink.clone()).unwrap();
    }
    let mut models = [Model::default(), Model::default()];
    for op in ops.into_iter().take(300) {
        match op {
            Op::Request {
                dev,
                pasid,
                grpid,
                last,
            } => {
                let (d, key) = (usize::from(dev), (pasid % 3, grpid % 8));
                if models[d].waiting.contains(&key) {
                    continue; // a device never reuses a PRG index before its response
                }
                let fault = DeviceFault::PageRequest(DevicePageRequest {
                    pasid: Pasid::new(u32::from(key.0)).ok(),
                    grpid: PrgIndex::new(u32::from(key.1)).unwrap(),
                    perm: Perm::READ,
                    addr: PageAddr::new(u64::from(grpid) << 12).unwrap(),
                    last,
                    private_data: None,
                });
                core.report(ids[d], &fault).unwrap();
                if last {
                    models[d].open.remove(&key);
                    models[d].waiting.insert(key);
                } else {
                    models[d].open.insert(key);
                }
            }
            Op::Answer { dev, pick, code } => {
                let m = &mut models[usize::from(dev)];
                if let (Some((_, responses)), false) = (m.vmm.as_mut(), m.seen.is_empty()) {
                    let r = m.seen[usize::from(pick) % m.seen.len()];
                    m.sent_cookies.insert(r.cookie.get());
                    let record = ResponseRecord {
                        version: 1.into(),
                        flags: u32::from(r.pasid.is_some()).into(),
                        pasid: r.pasid.map_or(0, |p| p.get()).into(),
                        grpid: u32::from(r.grpid.get()).into(),
                        code: u32::from(code % 3).into(),
                        cookie: r.cookie.get().into(),
                        mark: 0.into(),
                    };
                    let _ = responses.stage_record(&record);
                    let _ = responses.publish();
                }
            }
            Op::Raw {
                dev,
                version,
                flags,
                pasid,
                grpid,
                code,
                cookie,
                mark,
            } => {
                let m = &mut models[usize::from(dev)];
                if let Some((_, responses)) = m.vmm.as_mut() {
                    m.sent_cookies.insert(cookie);
                    let record = ResponseRecord {
                        version: u32::from(version % 3).into(),
                        flags: u32::from(flags % 4).into(),
                        pasid: u32::from(pasid % 4).into(),
                        grpid: u32::from(grpid % 520).into(),
                        code: u32::from(code % 4).into(),
                        cookie: cookie.into(),
                        mark: u64::from(mark).into(),
                    };
                    let _ = responses.stage_record(&record);
                    let _ = responses.publish();
                }
            }
            Op::Read { dev } => {
                let m = &mut models[usize::from(dev)];
                if let Some((faults, _)) = m.vmm.as_mut() {
                    let mut got = Vec::new();
                    faults.drain_faults(usize::MAX, |f| got.push(f)).unwrap();
                    for f in got {
                        match f.expect("the host publishes only valid records") {
                            Fault::PageRequest(r) if r.last => m.seen.push(r),
                            _ => {}
                        }
                    }
                }
            }
            Op::Process { dev } => {
                core.process_responses(ids[usize::from(dev)]).unwrap();
            }
            Op::Register { dev, entries_log } => {
                let d = usize::from(dev);
                if !core.is_registered(ids[d]).unwrap() {
                    let entries = 1 << (1 + entries_log % 5);
                    let f = Arc::new(HeapMemory::new(
                        QueueGeometry::new(QueueKind::Fault, entries).unwrap(),
                    ));
                    let r = Arc::new(HeapMemory::new(
                        QueueGeometry::new(QueueKind::Response, entries).unwrap(),
                    ));
                    let handler = QueueHandler {
                        faults: FaultQueueProducer::new(f.clone()),
                        responses: ResponseQueueConsumer::new(r.clone(), Doorbell::new().unwrap()),
                    };
                    models[d].vmm = Some((
                        FaultQueueConsumer::new(f, Doorbell::new().unwrap()),
                        ResponseQueueProducer::new(r, None),
                    ));
                    core.register(ids[d], Box::new(handler)).unwrap();
                }
            }
            Op::Unregister { dev } | Op::VmmGone { dev } => {
                let d = usize::from(dev);
                if matches!(op, Op::Unregister { .. }) {
                    core.unregister(ids[d]);
                } else {
                    core.vmm_gone(ids[d]);
                }
                models[d].vmm = None;
                models[d].open.clear(); // partial groups are discarded
                assert_eq!(core.pending_groups(ids[d]).unwrap(), 0);
            }
            Op::Reset { dev } => {
                let d = usize::from(dev);
                let registered = core.is_registered(ids[d]).unwrap();
                core.reset_device(ids[d]).unwrap();
                models[d].open.clear(); // partial groups are discarded
                assert_eq!(core.pending_groups(ids[d]).unwrap(), 0);
                // Only a broken queue (which the VMM here cannot cause) would drop the handler.
                assert_eq!(core.is_registered(ids[d]).unwrap(), registered);
            }
            Op::Expire { millis } => {
                clock.advance(u64::from(millis) * 1_000_000);
                core.expire();
            }
        }
        for (id, response) in sink.0.lock().unwrap().drain(..) {
            let m = &mut models[usize::from(id == ids[1])];
            let key = (
                response.pasid.map_or(0, |p| p.get() as u8),
                response.grpid.get() as u8,
            );
            assert!(
                m.waiting.remove(&key),
                "response for no waiting group: {response:?}"
            );
            if response.source == ResponseSource::Guest {
                assert!(m.sent_cookies.contains(&response.cookie.unwrap().get()));
            }
        }
        for (d, id) in ids.iter().enumerate() {
            let c = core.counters(*id).unwrap();
            let pending = core.pending_groups(*id).unwrap() as u64;
            assert_eq!(c.groups, c.answered() + pending);
            assert_eq!(models[d].waiting.len() as u64, pending);
        }
    }
});
