//! The fault queue in one process: stage, publish and drain of 64-byte fault records in batches
//! of 1, 16 and 256, over private memory (`HeapMemory`) and over a real memfd region
//! (`QueueRegion`), and the decoders a VMM and a host run on every record.
//!
//! `cargo bench -p iopf-queue --bench ring`; the figures between two processes are
//! `iopf bench` (`docs/PERFORMANCE.md`).

// Under `--cfg loom` the crate exposes only the ring protocol: nothing to bench.
#[cfg(loom)]
fn main() {}

#[cfg(not(loom))]
criterion::criterion_main!(ring::benches);

#[cfg(not(loom))]
mod ring {
    use std::hint::black_box;
    use std::sync::Arc;

    use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
    use iopf_abi::{
        Cookie, FaultReason, FaultRecord, PageAddr, PageRequest, PageResponse, Pasid, Perm,
        PrgIndex, QueueGeometry, QueueKind, ResponseCode, ResponseRecord, UnrecoverableFault,
    };
    use iopf_queue::{
        Doorbell, FaultQueueConsumer, FaultQueueProducer, HeapMemory, QueueMemory, QueueRegion,
    };

    const ENTRIES: u32 = 4096;
    const BATCHES: [usize; 3] = [1, 16, 256];

    fn request(i: u64, last: bool) -> PageRequest {
        PageRequest {
            cookie: Cookie::new(1 + i as u32).expect("non-zero cookie"),
            pasid: Some(Pasid::new(1 + (i as u32 & 0xff)).expect("valid PASID")),
            grpid: PrgIndex::new(i as u32 & 0x1ff).expect("valid PRG index"),
            perm: Perm::READ | Perm::WRITE,
            addr: PageAddr::containing(i << 12),
            last,
            private_data: None,
        }
    }

    /// One iteration: stage `batch` records as one group, publish, drain them all.
    fn round_trip<M: QueueMemory>(
        producer: &mut FaultQueueProducer<M>,
        consumer: &mut FaultQueueConsumer<M>,
        group: &[PageRequest],
    ) -> u64 {
        producer
            .stage_group(black_box(group))
            .expect("room in the ring");
        producer.publish().expect("publish");
        let mut sum = 0u64;
        consumer
            .drain(usize::MAX, |r| sum = sum.wrapping_add(r.addr.get()))
            .expect("drain");
        sum
    }

    fn stage_publish_drain(c: &mut Criterion) {
        let mut group = c.benchmark_group("fault_queue_stage_publish_drain");
        for batch in BATCHES {
            let requests: Vec<PageRequest> = (0..batch as u64)
                .map(|i| request(i, i + 1 == batch as u64))
                .collect();
            group.throughput(Throughput::Elements(batch as u64));

            let geometry = QueueGeometry::new(QueueKind::Fault, ENTRIES).expect("geometry");
            let memory = Arc::new(HeapMemory::new(geometry));
            let mut producer = FaultQueueProducer::new(memory.clone());
            let mut consumer = FaultQueueConsumer::new(memory, Doorbell::new().expect("eventfd"));
            group.bench_with_input(BenchmarkId::new("heap", batch), &requests, |b, r| {
                b.iter(|| round_trip(&mut producer, &mut consumer, r));
            });

            let mut producer = FaultQueueProducer::create(ENTRIES).expect("memfd region");
            let fd = producer
                .memory()
                .fd()
                .try_clone_to_owned()
                .expect("dup the region fd");
            let mut consumer =
                FaultQueueConsumer::attach(fd, Doorbell::new().expect("eventfd")).expect("attach");
            group.bench_with_input(BenchmarkId::new("memfd", batch), &requests, |b, r| {
                b.iter(|| round_trip::<QueueRegion>(&mut producer, &mut consumer, r));
            });
        }
        group.finish();
    }

    fn decode(c: &mut Criterion) {
        let mut group = c.benchmark_group("decode");
        group.throughput(Throughput::Elements(1));
        let page_request = FaultRecord::from(&request(7, true));
        group.bench_function("fault_record_page_request", |b| {
            b.iter(|| black_box(&page_request).decode())
        });
        let unrecoverable = FaultRecord::from(&UnrecoverableFault {
            reason: FaultReason::Permission,
            pasid: Some(Pasid::new(3).expect("valid PASID")),
            perm: Perm::WRITE,
            addr: Some(0x1234_5000),
            fetch_addr: None,
        });
        group.bench_function("fault_record_unrecoverable", |b| {
            b.iter(|| black_box(&unrecoverable).decode())
        });
        let response = ResponseRecord::from(&PageResponse {
            cookie: Cookie::new(9).expect("non-zero cookie"),
            pasid: Some(Pasid::new(3).expect("valid PASID")),
            grpid: PrgIndex::new(5).expect("valid PRG index"),
            code: ResponseCode::Success,
        });
        group.bench_function("response_record", |b| {
            b.iter(|| black_box(&response).decode())
        });
        group.finish();
    }

    criterion_group!(benches, stage_publish_drain, decode);
}
