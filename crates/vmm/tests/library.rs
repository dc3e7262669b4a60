//! The library as a VMM uses it, over real memfd queues and eventfds with an in-process host:
//! the responder (answers from other threads, after a new handler life, into a full ring) and
//! the event loop (many devices, no lost wake-up, a broken device handed back alone).

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use iopf_abi::{
    Cookie, PageAddr, PageRequest, PageResponse, Perm, PrgIndex, ResponseCode, UnrecoverableFault,
};
use iopf_queue::{
    Doorbell, FaultQueueProducer, QueueMemory, ResponseQueueConsumer, SharedMemoryChannel,
};
use iopf_vmm::{Device, EventLoop, GroupToken, PageRequestGroup, RespondError, Responder, Viommu};

/// The host's end of one device's queues.
struct Host {
    faults: FaultQueueProducer,
    responses: ResponseQueueConsumer,
    next_cookie: u32,
}

impl Host {
    /// A host with rings of `entries` entries, and the VMM's channel (device `device`) to it.
    fn new(device: u32, entries: u32) -> (Self, SharedMemoryChannel) {
        let mut faults = FaultQueueProducer::create(entries).unwrap();
        let irq = Doorbell::new().unwrap();
        faults.set_doorbell(Some(irq.try_clone().unwrap()));
        faults.set_live(true);
        let responses = ResponseQueueConsumer::create(entries, Doorbell::new().unwrap()).unwrap();
        let channel = SharedMemoryChannel::from_fds(
            device,
            faults.memory().fd().try_clone_to_owned().unwrap(),
            responses.memory().fd().try_clone_to_owned().unwrap(),
            irq,
            None,
        )
        .unwrap();
        let host = Self {
            faults,
            responses,
            next_cookie: 1,
        };
        (host, channel)
    }

    /// Publishes a group of `pages` requests; returns its cookie.
    fn publish_group(&mut self, pages: u64) -> u32 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let group: Vec<PageRequest> = (0..pages)
            .map(|i| PageRequest {
                cookie: Cookie::new(cookie).unwrap(),
                pasid: None,
                grpid: PrgIndex::new(cookie % 512).unwrap(),
                perm: Perm::READ,
                addr: PageAddr::containing(0x10_0000 + i * 4096),
                last: i + 1 == pages,
                private_data: None,
            })
            .collect();
        self.faults.stage_group(&group).unwrap();
        self.faults.publish().unwrap();
        cookie
    }

    /// The answers published so far: (cookie, code).
    fn answers(&mut self) -> Vec<(u32, ResponseCode)> {
        let mut out = Vec::new();
        self.responses
            .drain(usize::MAX, |r| {
                let r: PageResponse = r.decode().unwrap();
                out.push((r.cookie.get(), r.code));
            })
            .unwrap();
        out
    }
}

/// Answers every group `Success` at once, through the responder of its device.
#[derive(Default)]
struct Answering {
    responders: std::collections::HashMap<u32, Responder>,
    groups: Vec<(u32, usize)>,
    unrecoverable: u32,
}

impl Viommu for Answering {
    fn page_request_group(&mut self, group: PageRequestGroup) {
        self.groups.push((group.device(), group.requests().len()));
        self.responders[&group.device()]
            .respond(group.token(), ResponseCode::Success)
            .unwrap();
    }

    fn unrecoverable(&mut self, _device: u32, _fault: UnrecoverableFault) {
        self.unrecoverable += 1;
    }
}

/// Keeps the tokens, answers nothing.
#[derive(Default)]
struct Keeping {
    tokens: Vec<GroupToken>,
}

impl Viommu for Keeping {
    fn page_request_group(&mut self, group: PageRequestGroup) {
        self.tokens.push(group.token());
    }
}

#[test]
fn an_answer_for_an_earlier_handler_life_is_dropped_not_sent() {
    let (mut host, channel) = Host::new(1, 8);
    let mut device = Device::new(channel).unwrap();
    let responder = device.responder();
    let mut vmm = Keeping::default();
    host.publish_group(1);
    assert_eq!(device.poll(&mut vmm).unwrap(), 1);
    let old = vmm.tokens.pop().unwrap();

    // The host unregisters and the VMM attaches to the new life.
    let (mut new_host, channel) = Host::new(1, 8);
    drop(device.replace_channel(channel));
    assert_eq!(device.life(), 1);
    assert!(matches!(
        responder.respond(old, ResponseCode::Success),
        Err(RespondError::StaleLife)
    ));
    new_host.publish_group(1);
    device.poll(&mut vmm).unwrap();
    let new = vmm.tokens.pop().unwrap();
    responder.respond(new, ResponseCode::Invalid).unwrap();
    device.flush().unwrap();
    assert_eq!(new_host.answers(), vec![(1, ResponseCode::Invalid)]);
    assert!(host.answers().is_empty());
    let stats = device.stats();
    assert_eq!((stats.stale_answers, stats.responses), (1, 1));
}

#[test]
fn a_token_of_another_device_is_refused() {
    let (_a_host, a) = Host::new(1, 8);
    let (mut b_host, b) = Host::new(2, 8);
    let a = Device::new(a).unwrap();
    let mut b = Device::new(b).unwrap();
    let mut vmm = Keeping::default();
    b_host.publish_group(1);
    b.poll(&mut vmm).unwrap();
    assert!(matches!(
        a.responder().respond(vmm.tokens[0], ResponseCode::Success),
        Err(RespondError::OtherDevice)
    ));
    let rb = b.responder();
    drop(b);
    assert!(matches!(
        rb.respond(vmm.tokens[0], ResponseCode::Success),
        Err(RespondError::Closed)
    ));
}

#[test]
fn answers_that_do_not_fit_the_response_ring_go_later_in_order() {
    let (mut host, channel) = Host::new(1, 4);
    let mut device = Device::new(channel).unwrap();
    let mut vmm = Keeping::default();
    let cookies: Vec<u32> = (0..4).map(|_| host.publish_group(1)).collect();
    device.poll(&mut vmm).unwrap();
    let responder = device.responder();
    let more: Vec<u32> = (0..4).map(|_| host.publish_group(1)).collect();
    device.poll(&mut vmm).unwrap();
    assert_eq!(vmm.tokens.len(), 8);
    for token in &vmm.tokens {
        responder.respond(*token, ResponseCode::Success).unwrap();
    }
    assert_eq!(device.flush().unwrap(), 4);
    assert_eq!(device.backlog(), 4);
    let mut seen: Vec<u32> = host.answers().into_iter().map(|(c, _)| c).collect();
    assert_eq!(seen, cookies);
    // Room again: the rest, in order, ahead of anything answered since.
    assert_eq!(device.flush().unwrap(), 4);
    seen = host.answers().into_iter().map(|(c, _)| c).collect();
    assert_eq!(seen, more);
    assert_eq!(device.stats().responses, 8);
}

#[test]
fn an_answer_from_another_thread_wakes_the_loop_and_goes_out() {
    let (mut host, channel) = Host::new(3, 8);
    let device = Device::new(channel).unwrap();
    let responder = device.responder();
    let mut events = EventLoop::new().unwrap();
    events.add(device).unwrap();
    let (tx, rx) = mpsc::channel::<GroupToken>();
    struct Forwarding(mpsc::Sender<GroupToken>);
    impl Viommu for Forwarding {
        fn page_request_group(&mut self, group: PageRequestGroup) {
            self.0.send(group.token()).unwrap();
        }
    }
    let guest = std::thread::spawn(move || {
        let token = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        responder.respond(token, ResponseCode::Success).unwrap();
    });
    let cookie = host.publish_group(2);
    let mut vmm = Forwarding(tx);
    let started = Instant::now();
    let mut answers = Vec::new();
    while answers.is_empty() {
        // A lost wake-up would sleep the whole 30 s.
        events
            .run_once(&mut vmm, Some(Duration::from_secs(30)))
            .unwrap();
        answers = host.answers();
        assert!(started.elapsed() < Duration::from_secs(10), "no wake-up");
    }
    guest.join().unwrap();
    assert_eq!(answers, vec![(cookie, ResponseCode::Success)]);
}

#[test]
fn one_loop_serves_many_devices() {
    const N: u32 = 16;
    let mut events = EventLoop::new().unwrap();
    let mut vmm = Answering::default();
    let mut hosts = Vec::new();
    for d in 0..N {
        let (host, channel) = Host::new(d, 64);
        let device = Device::new(channel).unwrap();
        vmm.responders.insert(d, device.responder());
        events.add(device).unwrap();
        hosts.push(host);
    }
    assert_eq!(events.len(), N as usize);
    for (d, host) in hosts.iter_mut().enumerate() {
        for _ in 0..=d % 3 {
            host.publish_group(1 + d as u64 % 4);
        }
    }
    host_unrecoverable(&mut hosts[5]);
    let expected: usize = (0..N as usize).map(|d| d % 3 + 1).sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    while vmm.groups.len() < expected {
        assert!(
            Instant::now() < deadline,
            "{} of {expected}",
            vmm.groups.len()
        );
        let round = events
            .run_once(&mut vmm, Some(Duration::from_secs(1)))
            .unwrap();
        assert!(round.failed.is_empty());
    }
    events.run_once(&mut vmm, Some(Duration::ZERO)).unwrap();
    for (d, host) in hosts.iter_mut().enumerate() {
        let answers = host.answers();
        assert_eq!(answers.len(), d % 3 + 1, "device {d}");
        assert!(answers.iter().all(|&(_, c)| c == ResponseCode::Success));
    }
    assert!(vmm.groups.iter().all(|&(d, len)| len == 1 + d as usize % 4));
    assert_eq!(vmm.unrecoverable, 1);
    let requests: u64 = events.devices().map(|(_, d)| d.stats().requests).sum();
    assert_eq!(
        requests,
        (0..N as u64)
            .map(|d| (d % 3 + 1) * (1 + d % 4))
            .sum::<u64>()
    );
}

fn host_unrecoverable(host: &mut Host) {
    let fault = UnrecoverableFault {
        reason: iopf_abi::FaultReason::PteFetch,
        pasid: None,
        perm: Perm::READ,
        addr: Some(0x1000),
        fetch_addr: None,
    };
    host.faults.stage_unrecoverable(&fault).unwrap();
    host.faults.publish().unwrap();
}

/// Groups published from another thread at random moments, including between the loop's last
/// read and its sleep: every one is read within moments (a lost wake-up costs the whole
/// timeout).
#[test]
fn no_wake_up_is_lost_while_the_host_publishes_concurrently() {
    const GROUPS: u32 = 2000;
    let (mut host, channel) = Host::new(9, 64);
    let device = Device::new(channel).unwrap();
    let mut vmm = Answering::default();
    vmm.responders.insert(9, device.responder());
    let mut events = EventLoop::new().unwrap();
    events.add(device).unwrap();
    let publisher = std::thread::spawn(move || {
        for i in 0..GROUPS {
            // Wait for room (the loop answers, the host reads the answers).
            while host.answers_pending(i) {
                std::thread::yield_now();
            }
            host.publish_group(1);
            if i % 7 == 0 {
                std::thread::sleep(Duration::from_micros(u64::from(i % 50)));
            }
        }
        host
    });
    let started = Instant::now();
    while vmm.groups.len() < GROUPS as usize {
        let before = Instant::now();
        events
            .run_once(&mut vmm, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(
            vmm.groups.len() == GROUPS as usize || before.elapsed() < Duration::from_secs(4),
            "a round slept through a fault: {} groups read",
            vmm.groups.len()
        );
    }
    let mut host = publisher.join().unwrap();
    events.run_once(&mut vmm, Some(Duration::ZERO)).unwrap();
    host.answers();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        events.devices().next().unwrap().1.stats().groups,
        u64::from(GROUPS)
    );
}

impl Host {
    /// Whether publishing the `i`-th group could overfill the fault ring (the VMM has not
    /// read far enough yet); reads the answers meanwhile.
    fn answers_pending(&mut self, i: u32) -> bool {
        self.answers();
        let cons = self
            .faults
            .memory()
            .vmm_page()
            .index
            .load(Ordering::Acquire);
        i.wrapping_sub(cons) >= 32
    }
}

#[test]
fn a_device_whose_host_breaks_its_queue_is_handed_back_and_the_others_go_on() {
    let mut events = EventLoop::new().unwrap();
    let mut vmm = Answering::default();
    let (mut bad, channel) = Host::new(1, 8);
    let device = Device::new(channel).unwrap();
    vmm.responders.insert(1, device.responder());
    let bad_key = events.add(device).unwrap();
    let (mut good, channel) = Host::new(2, 8);
    let device = Device::new(channel).unwrap();
    vmm.responders.insert(2, device.responder());
    let good_key = events.add(device).unwrap();
    events.run_once(&mut vmm, Some(Duration::ZERO)).unwrap();

    // The bad host marks the slot of the VMM's next record as record 1000 in a ring of 8 (a
    // skipped mark), and kicks. Word 7 of a fault slot is its mark.
    let memory = bad.faults.memory();
    let next = memory.vmm_page().index.load(Ordering::Acquire);
    memory.entry_words()[(next & 7) as usize * 8 + 7]
        .store(iopf_abi::mark(1000), Ordering::Release);
    bad.faults.kick().unwrap();
    let cookie = good.publish_group(1);
    let mut failed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while failed.is_empty() || vmm.groups.is_empty() {
        assert!(Instant::now() < deadline);
        let round = events
            .run_once(&mut vmm, Some(Duration::from_secs(1)))
            .unwrap();
        failed.extend(round.failed);
    }
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].key, bad_key);
    assert!(
        matches!(failed[0].error, iopf_vmm::VmmError::Channel(_)),
        "{}",
        failed[0].error
    );
    assert!(events.device(bad_key).is_none());
    events.run_once(&mut vmm, Some(Duration::ZERO)).unwrap();
    assert_eq!(good.answers(), vec![(cookie, ResponseCode::Success)]);
    // The good device keeps being served.
    let cookie = good.publish_group(2);
    while events.device(good_key).unwrap().stats().groups < 2 {
        events
            .run_once(&mut vmm, Some(Duration::from_secs(1)))
            .unwrap();
    }
    events.run_once(&mut vmm, Some(Duration::ZERO)).unwrap();
    assert_eq!(good.answers(), vec![(cookie, ResponseCode::Success)]);
}

#[test]
fn a_device_served_alone_sleeps_until_a_fault_comes() {
    let (mut host, channel) = Host::new(4, 8);
    let mut device = Device::new(channel).unwrap();
    let mut vmm = Keeping::default();
    device.poll(&mut vmm).unwrap();
    let publisher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        host.publish_group(3);
        host
    });
    let started = Instant::now();
    device.wait(Duration::from_secs(20)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let _host = publisher.join().unwrap();
    device.poll(&mut vmm).unwrap();
    assert_eq!(vmm.tokens.len(), 1);
    assert_eq!(device.stats().requests, 3);
}

/// What a VMM hands to its vCPU or worker threads.
#[test]
fn responders_and_tokens_cross_threads_and_devices_move_to_a_loop_thread() {
    fn clone_send_sync<T: Clone + Send + Sync>() {}
    fn copy_send<T: Copy + Send>() {}
    fn send<T: Send>() {}
    clone_send_sync::<Responder>();
    copy_send::<GroupToken>();
    send::<Device>();
    send::<EventLoop>();
    send::<PageRequestGroup>();
}
