//! The host's device engine and the VMM's device (served by the library's event loop, the
//! simulated guest as its vIOMMU), on real memfd regions, eventfds and guest memory, in two
//! threads: every access ends, every group is answered, every DMA byte checks.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use iopf_core::{DeviceConfig, DeviceId, FaultCore, MonotonicClock, QueueHandler};
use iopf_endpoint::engine::{DeviceSlot, Progress, Workload, run};
use iopf_host::FaultPort;
use iopf_models::endpoint::EndpointConfig;
use iopf_models::guest::{Guest, GuestConfig};
use iopf_models::memory::GuestMemory;
use iopf_models::nested::GuestTables;
use iopf_models::rng::Rng;
use iopf_models::workload::{Pattern, Stream};
use iopf_queue::{
    Doorbell, FaultQueueProducer, ResponseQueueConsumer, SharedMemory, SharedMemoryChannel,
};
use iopf_sim::vmm_guest::{GuestDevice, SimulatedGuest};
use iopf_vmm::{Device, EventLoop};

#[test]
fn device_engine_and_vmm_finish_a_workload_through_guest_owned_tables() {
    let core = Arc::new(FaultCore::new(Arc::new(MonotonicClock::new())));
    let id = DeviceId(1);
    let slot = Arc::new(DeviceSlot::new(
        FaultPort::add(core.clone(), id, DeviceConfig::default()).unwrap(),
    ));

    // Host side: the regions and doorbells, the handler registered.
    let mut faults = FaultQueueProducer::create(64).unwrap();
    let fault_bell = Doorbell::new().unwrap();
    let response_bell = Doorbell::new().unwrap();
    let wake = response_bell.try_clone().unwrap();
    let responses = ResponseQueueConsumer::create(64, response_bell).unwrap();
    faults.set_doorbell(Some(fault_bell.try_clone().unwrap()));
    let fault_fd = faults.memory().fd().try_clone_to_owned().unwrap();
    let response_fd = responses.memory().fd().try_clone_to_owned().unwrap();
    let response_bell_fd = responses.doorbell().as_fd().try_clone_to_owned().unwrap();
    core.register(id, Box::new(QueueHandler { faults, responses }))
        .unwrap();

    // VMM side: attach from the fds, create guest memory and tables.
    let mut memory = GuestMemory::new(512).unwrap();
    let tables = GuestTables::new(&mut memory, 16).unwrap();
    let guest_fd = memory.shared().fd().try_clone_to_owned().unwrap();
    let channel = SharedMemoryChannel::from_fds(
        1,
        fault_fd,
        response_fd,
        fault_bell,
        Some(Doorbell::from_fd(response_bell_fd).unwrap()),
    )
    .unwrap();
    let device = Device::new(channel).unwrap();
    let mut guest = SimulatedGuest::new();
    guest.add_device(
        1,
        device.responder(),
        GuestDevice::new(
            memory,
            tables,
            Guest::new(GuestConfig::default(), Rng::new(9)),
            4,
        )
        .unwrap(),
    );
    let mut events = EventLoop::new().unwrap();
    let key = events.add(device).unwrap();
    // What DMA_MAP and the register writes would tell the host.
    {
        let mut a = slot.attachment();
        a.memory = Some(SharedMemory::attach(guest_fd, 1 << 30).unwrap());
        a.directory = Some(tables.directory());
        a.wake = Some(wake);
        a.generation += 1;
    }
    let vmm_thread = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while events.device(key).unwrap().live() && std::time::Instant::now() < deadline {
            let timeout = guest.timeout(Duration::from_millis(5));
            let round = events.run_once(&mut guest, Some(timeout)).unwrap();
            assert!(round.failed.is_empty());
            guest.send_due();
        }
        events.device(key).unwrap().stats()
    });
    let workload = Workload {
        endpoint: EndpointConfig::default(),
        streams: vec![
            Stream {
                pasid: iopf_abi::Pasid::new(1).ok(),
                base: 0x4000_0000,
                pages: 64,
                pattern: Pattern::Sequential,
                access_len: 8192,
                write: true,
                accesses: 200,
                interval_ns: 20_000,
            },
            Stream {
                pasid: iopf_abi::Pasid::new(2).ok(),
                base: 0x8000_0000,
                pages: 64,
                pattern: Pattern::Random,
                access_len: 4096,
                write: false,
                accesses: 200,
                interval_ns: 20_000,
            },
        ],
        seed: 3,
    };
    let report = run(
        &slot,
        &workload,
        &Arc::new(vec![Progress::default()]),
        0,
        &AtomicBool::new(false),
    );
    core.unregister(id);
    let vmm_stats = vmm_thread.join().unwrap();

    let e = report.endpoint;
    let c = core.counters(id).unwrap();
    assert_eq!(e.accesses, 400);
    assert_eq!(e.completed + e.failed_invalid, 400, "{e:?}");
    assert_eq!(e.failed_invalid, c.responses.guest.invalid);
    assert_eq!(c.groups, c.answered());
    assert_eq!(e.groups, e.responses_matched);
    assert_eq!(e.unexpected, 0);
    assert_eq!(vmm_stats.groups, c.groups_delivered);
    assert_eq!(vmm_stats.malformed, 0);
    assert_eq!(report.memory.bytes_mismatched, 0);
    assert_eq!(report.memory.read_mismatches, 0);
    assert!(report.memory.bytes_verified > 0);
    assert_eq!(report.malformed_walks, 0);
    assert_eq!(report.latency.len(), e.groups);
}
