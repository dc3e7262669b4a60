//! A host fault core with real rings, and the VMM end of each device's queues, in one process.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use iopf_abi::{
    Fault, PageAddr, PageRequest, PageResponse, Pasid, Perm, PrgIndex, QueueGeometry, QueueKind,
    ResponseCode, ResponseRecord,
};
use iopf_core::{
    DeviceConfig, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, DeviceSink, FaultCore,
    ManualClock, QueueHandler,
};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, HeapMemory, ResponseQueueConsumer,
    ResponseQueueProducer,
};

/// Every response the core sent to any device, in order.
#[derive(Debug, Default)]
pub struct RecordingSink {
    pub responses: Mutex<Vec<(DeviceId, DeviceResponse)>>,
}

impl DeviceSink for RecordingSink {
    fn page_response(&self, device: DeviceId, response: DeviceResponse) {
        self.responses.lock().unwrap().push((device, response));
    }
}

impl RecordingSink {
    /// Takes what the devices received since the last call.
    pub fn take(&self) -> Vec<(DeviceId, DeviceResponse)> {
        std::mem::take(&mut self.responses.lock().unwrap())
    }
}

/// The VMM's end of one device's queues.
#[derive(Debug)]
pub struct Vmm {
    pub faults: FaultQueueConsumer<Arc<HeapMemory>>,
    pub responses: ResponseQueueProducer<Arc<HeapMemory>>,
}

impl Vmm {
    /// Drains every fault record the host published.
    pub fn faults(&mut self) -> Vec<Fault> {
        let mut out = Vec::new();
        self.faults
            .drain_faults(usize::MAX, |f| {
                out.push(f.expect("host wrote a valid record"))
            })
            .unwrap();
        out
    }

    /// The page requests among them.
    pub fn page_requests(&mut self) -> Vec<PageRequest> {
        self.faults()
            .into_iter()
            .filter_map(|f| match f {
                Fault::PageRequest(r) => Some(r),
                Fault::Unrecoverable(_) => None,
            })
            .collect()
    }

    /// Sends one raw response record.
    pub fn send_record(&mut self, record: ResponseRecord) {
        self.responses.stage_record(&record).unwrap();
        self.responses.publish().unwrap();
    }

    /// Answers `request`'s group with `code`.
    pub fn answer(&mut self, request: &PageRequest, code: ResponseCode) {
        self.send_record(ResponseRecord::from(&PageResponse::answering(
            request, code,
        )));
    }
}

pub struct Host {
    pub core: FaultCore,
    pub clock: Arc<ManualClock>,
    pub sink: Arc<RecordingSink>,
}

pub const SECOND: u64 = 1_000_000_000;

impl Host {
    pub fn new() -> Self {
        let clock = Arc::new(ManualClock::new(0));
        Self {
            core: FaultCore::new(clock.clone()),
            clock,
            sink: Arc::new(RecordingSink::default()),
        }
    }

    pub fn add_device(&self, id: u32, config: DeviceConfig) -> DeviceId {
        let id = DeviceId(id);
        self.core.add_device(id, config, self.sink.clone()).unwrap();
        id
    }

    /// Registers a queue handler for `id` with rings of `entries`, returning the VMM's end
    /// (attached: its page says ABI v2).
    pub fn attach(&self, id: DeviceId, entries: u32) -> Vmm {
        let (handler, vmm) = queues(entries);
        self.core.register(id, Box::new(handler)).unwrap();
        vmm
    }
}

/// A handler and the VMM end of its queues, over private memory.
pub fn queues(entries: u32) -> (QueueHandler<Arc<HeapMemory>>, Vmm) {
    let fault_memory = Arc::new(HeapMemory::new(
        QueueGeometry::new(QueueKind::Fault, entries).unwrap(),
    ));
    let response_memory = Arc::new(HeapMemory::new(
        QueueGeometry::new(QueueKind::Response, entries).unwrap(),
    ));
    let handler = QueueHandler {
        faults: FaultQueueProducer::new(fault_memory.clone()),
        responses: ResponseQueueConsumer::new(response_memory.clone(), Doorbell::new().unwrap()),
    };
    let vmm = Vmm {
        faults: FaultQueueConsumer::new(fault_memory, Doorbell::new().unwrap()),
        responses: ResponseQueueProducer::new(response_memory, None),
    };
    (handler, vmm)
}

/// A page request for (pasid, grpid) at page `page`.
pub fn request(pasid: Option<u32>, grpid: u32, page: u64, last: bool) -> DeviceFault {
    DeviceFault::PageRequest(DevicePageRequest {
        pasid: pasid.map(|p| Pasid::new(p).unwrap()),
        grpid: PrgIndex::new(grpid).unwrap(),
        perm: Perm::READ,
        addr: PageAddr::new(page * 4096).unwrap(),
        last,
        private_data: None,
    })
}

/// A one-page group.
pub fn single(pasid: u32, grpid: u32) -> DeviceFault {
    request(Some(pasid), grpid, u64::from(grpid) + 0x100, true)
}
