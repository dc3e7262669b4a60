//! The host's response-queue consumer fed arbitrary VMM pages, entries and marks (right ones,
//! stale ones from earlier passes, skipped ones, marks before their bodies, garbage): whatever
//! the VMM writes, the host never panics, never reads more than a ring's worth per drain, stays
//! broken once broken, and the fault core answers every group exactly once.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use iopf_abi::{PageAddr, Pasid, Perm, PrgIndex, QueueGeometry, QueueKind, mark};
use iopf_core::{
    DeviceConfig, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, DeviceSink, FaultCore,
    ManualClock, QueueHandler,
};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, HeapMemory, QueueMemory,
    ResponseQueueConsumer,
};
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering;

#[derive(Debug, Arbitrary)]
enum Step {
    /// The device reports a one-page group.
    Report { pasid: u8, grpid: u16 },
    /// The VMM writes a word of an entry.
    Entry { slot: u8, word: u8, value: u64 },
    /// The VMM stores a mark in a slot: the mark of record `lap * 8 + slot` (right for that
    /// pass, whether or not its body was written), of a record one or more passes earlier
    /// (stale), of a later record (skipped), or any value.
    Mark {
        slot: u8,
        lap: u8,
        how: u8,
        raw: u64,
    },
    /// The VMM stores the (unused) index of its page.
    Index(u32),
    /// The VMM stores its page's flags or abi.
    Flags(u32),
    /// The host polls.
    Poll,
    /// Time passes and timeouts fire.
    Expire,
}

#[derive(Debug, Default)]
struct Sink(Mutex<Vec<DeviceResponse>>);

impl DeviceSink for Sink {
    fn page_response(&self, _: DeviceId, response: DeviceResponse) {
        self.0.lock().unwrap().push(response);
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let clock = Arc::new(ManualClock::new(0));
    let core = FaultCore::new(clock.clone());
    let sink = Arc::new(Sink::default());
    let dev = DeviceId(1);
    core.add_device(dev, DeviceConfig::default(), sink.clone())
        .unwrap();
    let faults = Arc::new(HeapMemory::new(
        QueueGeometry::new(QueueKind::Fault, 16).unwrap(),
    ));
    let responses = Arc::new(HeapMemory::new(
        QueueGeometry::new(QueueKind::Response, 8).unwrap(),
    ));
    let handler = QueueHandler {
        faults: FaultQueueProducer::new(faults.clone()),
        responses: ResponseQueueConsumer::new(responses.clone(), Doorbell::new().unwrap()),
    };
    let _vmm = FaultQueueConsumer::new(faults, Doorbell::new().unwrap());
    core.register(dev, Box::new(handler)).unwrap();
    let mut outstanding = std::collections::HashSet::new();
    for step in steps.into_iter().take(256) {
        match step {
            Step::Report { pasid, grpid } => {
                let key = (pasid % 4, grpid % 512);
                if outstanding.insert(key) {
                    let fault = DeviceFault::PageRequest(DevicePageRequest {
                        pasid: Pasid::new(u32::from(key.0)).ok(),
                        grpid: PrgIndex::new(u32::from(key.1)).unwrap(),
                        perm: Perm::READ,
                        addr: PageAddr::new(0x1000).unwrap(),
                        last: true,
                        private_data: None,
                    });
                    core.report(dev, &fault).unwrap();
                }
            }
            Step::Entry { slot, word, value } => {
                let words = responses.entry_words();
                let i = (usize::from(slot) * 4 + usize::from(word % 4)) % words.len();
                words[i].store(value, Ordering::Relaxed);
            }
            Step::Mark {
                slot,
                lap,
                how,
                raw,
            } => {
                let slot = u32::from(slot % 8);
                let index = u32::from(lap) * 8 + slot;
                let value = match how % 4 {
                    0 => mark(index),
                    1 => mark(index.wrapping_sub(8 * (1 + u32::from(how >> 2)))),
                    2 => mark(index.wrapping_add(1 + u32::from(how >> 2))),
                    _ => raw,
                };
                // Word 3 of a response slot is its mark.
                responses.entry_words()[slot as usize * 4 + 3].store(value, Ordering::Release);
            }
            Step::Index(p) => responses.vmm_page().index.store(p, Ordering::Relaxed),
            Step::Flags(f) => responses.vmm_page().flags.store(f, Ordering::Relaxed),
            Step::Poll => {
                let read = core.process_responses(dev).unwrap();
                assert!(read <= 8, "read {read} records from a ring of 8");
            }
            Step::Expire => {
                clock.advance(11_000_000_000);
                core.expire();
            }
        }
        for response in sink.0.lock().unwrap().drain(..) {
            let key = (
                response.pasid.map_or(0, |p| p.get() as u8),
                response.grpid.get(),
            );
            assert!(
                outstanding.remove(&key),
                "response for no outstanding group: {response:?}"
            );
        }
        let c = core.counters(dev).unwrap();
        assert_eq!(
            c.groups,
            c.answered() + core.pending_groups(dev).unwrap() as u64
        );
    }
    core.unregister(dev);
    for response in sink.0.lock().unwrap().drain(..) {
        let key = (
            response.pasid.map_or(0, |p| p.get() as u8),
            response.grpid.get(),
        );
        assert!(outstanding.remove(&key));
    }
    assert!(
        outstanding.is_empty(),
        "groups never answered: {outstanding:?}"
    );
});
