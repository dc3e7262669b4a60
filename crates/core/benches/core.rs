//! The fault core in one process, per page request group: `report_batch` of 1, 16 or 256
//! one-page groups (cookie, pending table, staging, one publish), an in-process VMM that drains
//! them and answers each through the response queue, and `process_responses` (decode, cookie
//! check, answer to the device).
//!
//! `cargo bench -p iopf-core --bench core`; the figures between two processes and the scaling
//! series are `iopf bench` (`docs/PERFORMANCE.md`).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use iopf_abi::{
    Fault, PageAddr, PageResponse, Pasid, Perm, PrgIndex, QueueGeometry, QueueKind, ResponseCode,
};
use iopf_core::{
    DeviceConfig, DeviceFault, DeviceId, DevicePageRequest, DeviceResponse, DeviceSink, FaultCore,
    MonotonicClock, QueueHandler,
};
use iopf_queue::{
    Doorbell, FaultQueueConsumer, FaultQueueProducer, HeapMemory, ResponseQueueConsumer,
    ResponseQueueProducer,
};

const DEVICE: DeviceId = DeviceId(1);
const ENTRIES: u32 = 4096;
const BATCHES: [u64; 3] = [1, 16, 256];

type Memory = Arc<HeapMemory>;

#[derive(Debug, Default)]
struct Device {
    answered: AtomicU64,
}

impl DeviceSink for Device {
    fn page_response(&self, _device: DeviceId, _response: DeviceResponse) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }
}

struct Rig {
    core: FaultCore,
    device: Arc<Device>,
    faults: FaultQueueConsumer<Memory>,
    responses: ResponseQueueProducer<Memory>,
    answers: Vec<PageResponse>,
}

impl Rig {
    fn new() -> Self {
        let memory = |kind| Arc::new(HeapMemory::new(QueueGeometry::new(kind, ENTRIES).unwrap()));
        let (faults, responses) = (memory(QueueKind::Fault), memory(QueueKind::Response));
        let core = FaultCore::new(Arc::new(MonotonicClock::new()));
        let device = Arc::new(Device::default());
        core.add_device(DEVICE, DeviceConfig::default(), device.clone())
            .unwrap();
        let handler = QueueHandler {
            faults: FaultQueueProducer::new(faults.clone()),
            responses: ResponseQueueConsumer::new(responses.clone(), Doorbell::new().unwrap()),
        };
        let rig = Self {
            faults: FaultQueueConsumer::new(faults, Doorbell::new().unwrap()),
            responses: ResponseQueueProducer::new(responses, None),
            core,
            device,
            answers: Vec::with_capacity(ENTRIES as usize),
        };
        rig.core.register(DEVICE, Box::new(handler)).unwrap();
        rig
    }

    /// Reports `batch`, lets the VMM answer every group, lets the core take the answers.
    fn cycle(&mut self, batch: &[DeviceFault]) {
        self.core.report_batch(DEVICE, black_box(batch)).unwrap();
        let answers = &mut self.answers;
        self.faults
            .drain_faults(usize::MAX, |fault| {
                if let Ok(Fault::PageRequest(r)) = fault {
                    answers.push(PageResponse::answering(&r, ResponseCode::Success));
                }
            })
            .unwrap();
        self.responses.stage_some(&self.answers).unwrap();
        self.responses.publish().unwrap();
        self.answers.clear();
        while self.core.process_responses(DEVICE).unwrap() > 0 {}
    }
}

fn groups(n: u64) -> Vec<DeviceFault> {
    (0..n)
        .map(|i| {
            DeviceFault::PageRequest(DevicePageRequest {
                pasid: Some(Pasid::new(1 + (i as u32 & 0xff)).unwrap()),
                grpid: PrgIndex::new(i as u32 & 0x1ff).unwrap(),
                perm: Perm::READ,
                addr: PageAddr::containing(i << 12),
                last: true,
                private_data: None,
            })
        })
        .collect()
}

fn report_and_respond(c: &mut Criterion) {
    let mut group = c.benchmark_group("core_report_batch_process_responses");
    for n in BATCHES {
        let batch = groups(n);
        let mut rig = Rig::new();
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &batch, |b, batch| {
            b.iter(|| rig.cycle(batch));
        });
        assert_eq!(
            rig.core.counters(DEVICE).unwrap().responses.guest.success,
            rig.device.answered.load(Ordering::Relaxed),
            "every group answered by the guest"
        );
    }
    group.finish();
}

criterion_group!(benches, report_and_respond);
criterion_main!(benches);
