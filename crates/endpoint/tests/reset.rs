//! `VFIO_USER_DEVICE_RESET` against `iopf host`'s own device (the `Host` library in-process, a
//! real socket, real memfd regions and eventfds), driven by the crate's vfio-user `Client` and
//! a hand-written VMM that holds its groups unanswered, then resets the device
//! (`docs/PROTOCOL.md` §4.6, "`DEVICE_RESET`").

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use iopf_abi::{Fault, PageRequest, PageResponse, Pasid, Perm, ResponseCode, ResponseRecord};
use iopf_core::{DeviceConfig, DeviceCounters, DeviceId};
use iopf_endpoint::engine::Workload;
use iopf_endpoint::pci::{REG_DIRECTORY_BASE, REG_DIRECTORY_ENTRIES};
use iopf_endpoint::{Host, HostConfig};
use iopf_models::endpoint::EndpointConfig;
use iopf_models::memory::GuestMemory;
use iopf_models::nested::GuestTables;
use iopf_models::workload::{Pattern, Stream};
use iopf_queue::{Doorbell, FaultQueueConsumer, QueueMemory, ResponseQueueProducer};
use iopf_vfio_user::device::{
    DMA_FAULT_IRQ_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE,
    VFIO_REGION_TYPE_NESTED,
};
use iopf_vfio_user::{Client, DeviceFlags, DmaProt};

const DEVICE: DeviceId = DeviceId(1);
/// The device's Outstanding Page Request Allocation: with one page per access, the groups it
/// can have pending at once.
const ALLOCATION: u32 = 8;
/// Accesses, one page each, all issued at once: more than the allocation, so some are still
/// queued in the device when the reset comes.
const ACCESSES: u32 = 64;
const PASID: u32 = 1;
const DEADLINE: Duration = Duration::from_secs(30);

/// The VMM's end of the device: the connection, the queues, guest memory and its tables.
struct Vmm {
    client: Client,
    faults: FaultQueueConsumer,
    responses: ResponseQueueProducer,
    memory: GuestMemory,
    tables: GuestTables,
}

impl Vmm {
    /// `docs/PROTOCOL.md` §4.6's attach order.
    fn attach(socket: &Path) -> Self {
        let mut client = Client::connect(socket).unwrap();
        let info = client.device_info().unwrap();
        assert!(
            info.flags.contains(DeviceFlags::RESET),
            "the device offers reset"
        );
        let mut fd = |subtype| {
            client
                .find_region_by_type(VFIO_REGION_TYPE_NESTED, subtype)
                .unwrap()
                .and_then(|r| r.fd)
                .unwrap()
        };
        let fault_fd = fd(VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT);
        let response_fd = fd(VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE);
        let mut io_fds = client
            .region_io_fds(DMA_FAULT_RESPONSE_REGION_INDEX)
            .unwrap();
        let response_doorbell = Doorbell::from_fd(io_fds.fds.remove(0)).unwrap();
        let fault_doorbell = Doorbell::new().unwrap();
        client
            .set_irqs(DMA_FAULT_IRQ_INDEX, &[fault_doorbell.as_fd()])
            .unwrap();
        let faults = FaultQueueConsumer::attach(fault_fd, fault_doorbell).unwrap();
        let responses =
            ResponseQueueProducer::attach(response_fd, Some(response_doorbell)).unwrap();
        let mut memory = GuestMemory::new(512).unwrap();
        let tables = GuestTables::new(&mut memory, 16).unwrap();
        tables.add_space(&mut memory, pasid()).unwrap();
        client
            .dma_map(
                Some(memory.shared().fd()),
                0,
                0,
                memory.shared().len(),
                DmaProt::READ | DmaProt::WRITE,
            )
            .unwrap();
        let mut vmm = Self {
            client,
            faults,
            responses,
            memory,
            tables,
        };
        vmm.write_directory();
        vmm
    }

    fn write_directory(&mut self) {
        let directory = self.tables.directory();
        self.client
            .region_write(
                VFIO_PCI_BAR0_REGION_INDEX,
                REG_DIRECTORY_BASE,
                &directory.base.to_le_bytes(),
            )
            .unwrap();
        self.client
            .region_write(
                VFIO_PCI_BAR0_REGION_INDEX,
                REG_DIRECTORY_ENTRIES,
                &directory.entries.to_le_bytes(),
            )
            .unwrap();
    }

    fn register(&mut self, offset: u64) -> u64 {
        let mut value = [0u8; 8];
        self.client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, offset, &mut value)
            .unwrap();
        u64::from_le_bytes(value)
    }

    /// The page requests published so far, waiting up to `wait` for the first.
    fn page_requests(&mut self, wait: Duration) -> Vec<PageRequest> {
        let _ = self.faults.wait(Some(wait)).unwrap();
        let mut out = Vec::new();
        self.faults
            .drain_faults(usize::MAX, |fault| match fault.unwrap() {
                Fault::PageRequest(r) => out.push(r),
                Fault::Unrecoverable(f) => panic!("unrecoverable fault {f:?}"),
            })
            .unwrap();
        out
    }

    fn answer(&mut self, requests: &[PageRequest]) {
        for r in requests.iter().filter(|r| r.last) {
            let record = ResponseRecord::from(&PageResponse::answering(r, ResponseCode::Success));
            self.responses.stage_record(&record).unwrap();
        }
        self.responses.publish().unwrap();
    }

    /// What the guest does with a page request: maps the page, then answers `Success`.
    fn serve(&mut self, requests: &[PageRequest]) {
        for r in requests {
            let gpa = self.memory.allocate_page().unwrap();
            self.tables
                .map(
                    &mut self.memory,
                    r.pasid,
                    r.addr.get(),
                    gpa,
                    Perm::READ | Perm::WRITE,
                )
                .unwrap();
        }
        self.answer(requests);
    }
}

fn pasid() -> Option<Pasid> {
    Pasid::new(PASID).ok()
}

fn counters(host: &Host) -> DeviceCounters {
    host.core().counters(DEVICE).unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn socket(name: &str) -> TempPath {
    TempPath::new(name, "host.sock")
}

/// A VMM resets the device while it holds every group the device could send. Catches:
/// - a device that does not offer reset, or answers it with an error;
/// - a reset that leaves pending groups unanswered, answers one twice (the device would count
///   an unexpected response, or the core's answers would exceed its groups), or answers them
///   under another reason than `reset`;
/// - a reset that tears the handler down (a second registration, `LIVE` cleared, the device no
///   longer served through the same queues and fault IRQ);
/// - a late VMM answer to a group the reset answered reaching the device;
/// - directory registers that survive the reset, or a device that goes on translating through
///   the old tables (new groups would arrive before the VMM writes the directory again);
/// - a device that is not served normally to completion once the directory is written again.
#[test]
fn device_reset_answers_held_groups_and_the_device_goes_on_after_the_directory_is_rewritten() {
    let path = socket("reset");
    let config = HostConfig {
        workloads: vec![Workload {
            endpoint: EndpointConfig {
                allocation: ALLOCATION,
                ..EndpointConfig::default()
            },
            streams: vec![Stream {
                pasid: pasid(),
                base: 0x4000_0000,
                pages: u64::from(ACCESSES),
                pattern: Pattern::Sequential,
                access_len: 4096,
                write: true,
                accesses: ACCESSES,
                interval_ns: 0,
            }],
            seed: 7,
        }],
        ring_entries: 64,
        // No timeout answers anything during the test: every host answer is the reset's.
        device: DeviceConfig {
            response_timeout: None,
            ..DeviceConfig::default()
        },
        repeat: false,
        threads: 2,
    };
    let host = Host::bind(config, &path).unwrap();
    let mut vmm = Vmm::attach(&path);

    // The device sends a group per access until its allocation is out; the VMM reads them
    // and answers none.
    let mut held = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while held.len() < ALLOCATION as usize {
        assert!(Instant::now() < deadline, "only {} groups came", held.len());
        held.extend(vmm.page_requests(Duration::from_millis(10)));
    }
    // The device has no credit left: nothing more comes until a response.
    std::thread::sleep(Duration::from_millis(50));
    assert!(vmm.page_requests(Duration::ZERO).is_empty());
    assert!(held.iter().all(|r| r.last), "one page per group");
    let pending = host.pending_groups();
    assert_eq!(pending, ALLOCATION as usize);
    let before = counters(&host);
    assert_eq!(before.answered(), 0);

    vmm.client.reset().expect("DEVICE_RESET succeeds");

    // Exactly the pending groups were answered, by the reset, once each.
    let after = counters(&host);
    assert_eq!(after.responses.auto.reset as usize, pending);
    assert_eq!(after.answered() as usize, pending, "{after:?}");
    assert_eq!(host.pending_groups(), 0);
    // The same handler life: no unregister, no new registration, the VMM still attached.
    assert_eq!((after.registrations, after.unregistrations), (1, 0));
    assert!(host.core().consumer_attached(DEVICE).unwrap());
    assert!(vmm.faults.live());
    // The registers the VMM wrote are back to 0.
    assert_eq!(vmm.register(REG_DIRECTORY_BASE), 0);
    assert_eq!(vmm.register(REG_DIRECTORY_ENTRIES), 0);

    // The VMM's late answers to the held groups are refused, like any stale answer, and
    // reach no device (the device's counters below show no second response).
    vmm.answer(&held);
    wait_for("the late answers to be refused", || {
        counters(&host).refused.unknown_cookie == u64::from(ALLOCATION)
    });
    let refused = counters(&host);
    assert_eq!(refused.responses.guest.success, 0);
    assert_eq!(refused.answered(), after.answered());
    let rejected = vmm.responses.memory().host_page().snapshot().rejected.get();
    assert_eq!(rejected, u64::from(ALLOCATION));

    // Without a directory the device issues nothing: no new group, though it has accesses
    // queued and its credits back.
    std::thread::sleep(Duration::from_millis(50));
    assert!(vmm.page_requests(Duration::ZERO).is_empty());
    assert_eq!(counters(&host).groups, u64::from(ALLOCATION));

    // The VMM writes the directory again: the device goes on, through the same queues and
    // fault IRQ, with newer cookies, and the guest serves every fault to completion.
    vmm.write_directory();
    let newest_held = held.iter().map(|r| r.cookie.get()).max().unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !host.finished() {
        assert!(Instant::now() < deadline, "the device did not finish");
        let requests = vmm.page_requests(Duration::from_millis(5));
        assert!(requests.iter().all(|r| r.cookie.get() > newest_held));
        vmm.serve(&requests);
    }
    let end = counters(&host);
    assert_eq!((end.registrations, end.unregistrations), (1, 0));
    vmm.client.close();
    let report = host.finish();

    let e = report.engines[0].endpoint;
    // The held accesses failed (Invalid, from the reset); every other access completed.
    assert_eq!(e.accesses, u64::from(ACCESSES));
    assert_eq!(e.failed_invalid, u64::from(ALLOCATION), "{e:?}");
    assert_eq!(e.completed, u64::from(ACCESSES - ALLOCATION), "{e:?}");
    // One response per group the device sent, none unexpected: nothing answered twice.
    assert_eq!(e.groups, e.responses_matched, "{e:?}");
    assert_eq!(e.unexpected, 0, "{e:?}");
    let c = report.core;
    assert_eq!(c.groups, e.groups);
    assert_eq!(c.groups, c.answered(), "{c:?}");
    assert_eq!(c.responses.auto.reset, u64::from(ALLOCATION));
    assert_eq!(c.responses.guest.success, c.groups - u64::from(ALLOCATION));
    assert_eq!(c.refused.unknown_cookie, u64::from(ALLOCATION));
    assert_eq!(c.refused_total(), u64::from(ALLOCATION));
    let memory = report.engines[0].memory;
    assert_eq!(memory.bytes_mismatched, 0);
    assert!(memory.bytes_verified > 0);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
