//! The queue against a model of the kernel's fault object (`drivers/iommu/iommufd/fault.c` in
//! 6.12): cookies from the lowest free one up, freed when answered; whole groups per read,
//! `EINVAL` when the first does not fit; writes that stop at the first unknown cookie or bad
//! code; detach answering the device's pending groups. The real kernel is checked by
//! `iopf-kernel-check` under QEMU (`tests/real_kernel.rs`).

use std::collections::{BTreeMap, VecDeque};

use iopf_abi::ResponseRecord;
use proptest::prelude::*;

use super::*;

/// A group the model's device raised, numbered by the order it was raised.
#[derive(Debug, Clone)]
struct Group {
    serial: u64,
    dev_id: u32,
    grpid: u32,
    pages: u32,
}

/// What the device of each group finally received.
#[derive(Debug, Default)]
struct KernelModel {
    next_serial: u64,
    deliver: VecDeque<Group>,
    /// Cookie → group, for groups read and not answered.
    response: BTreeMap<u32, Group>,
    /// Serial → codes the device received (must end up exactly one).
    answers: BTreeMap<u64, Vec<u32>>,
    /// Serials of the groups handed out, in the order they were read.
    read_order: Vec<u64>,
    /// `read` calls, refused ones included.
    reads: usize,
}

impl KernelModel {
    fn trigger(&mut self, dev_id: u32, grpid: u32, pages: u32) -> u64 {
        self.next_serial += 1;
        let serial = self.next_serial;
        self.deliver.push_back(Group {
            serial,
            dev_id,
            grpid,
            pages,
        });
        self.answers.insert(serial, Vec::new());
        serial
    }

    fn answer(&mut self, group: &Group, code: u32) {
        self.answers.entry(group.serial).or_default().push(code);
    }

    /// Detach: every group of the device, queued or read, answered INVALID.
    fn detach(&mut self, dev_id: u32) {
        let (gone, kept): (Vec<Group>, Vec<Group>) =
            self.deliver.drain(..).partition(|g| g.dev_id == dev_id);
        self.deliver = kept.into();
        for g in gone {
            self.answer(&g, RESP_INVALID);
        }
        let cookies: Vec<u32> = self
            .response
            .iter()
            .filter(|(_, g)| g.dev_id == dev_id)
            .map(|(&c, _)| c)
            .collect();
        for c in cookies {
            let g = self.response.remove(&c).unwrap();
            self.answer(&g, RESP_INVALID);
        }
    }

    fn lowest_free_cookie(&self) -> u32 {
        (1..).find(|c| !self.response.contains_key(c)).unwrap()
    }
}

impl FaultFileOps for KernelModel {
    fn read_into(&mut self, buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize> {
        self.reads += 1;
        out.clear();
        assert_eq!(buf.len() % FAULT_RECORD_SIZE, 0, "ESPIPE in the kernel");
        let room = buf.len() / FAULT_RECORD_SIZE;
        while let Some(g) = self.deliver.front() {
            if g.pages as usize > room - out.len() {
                if out.is_empty() {
                    return Err(io::Error::from_raw_os_error(libc_einval()));
                }
                break;
            }
            let g = self.deliver.pop_front().unwrap();
            let cookie = self.lowest_free_cookie();
            for page in 0..g.pages {
                out.push(KernelFault {
                    flags: if page + 1 == g.pages { LAST_PAGE } else { 0 },
                    dev_id: g.dev_id,
                    grpid: g.grpid,
                    perm: 3,
                    addr: 0x10_0000 + u64::from(page) * 4096,
                    cookie,
                    ..KernelFault::default()
                });
            }
            self.read_order.push(g.serial);
            self.response.insert(cookie, g);
        }
        Ok(out.len())
    }

    fn write(&mut self, responses: &[KernelResponse]) -> io::Result<usize> {
        let mut done = 0;
        for r in responses {
            if r.code != RESP_SUCCESS && r.code != RESP_INVALID {
                break;
            }
            let Some(g) = self.response.remove(&r.cookie) else {
                break;
            };
            self.answer(&g, r.code);
            done += 1;
        }
        if done == 0 && !responses.is_empty() {
            return Err(io::Error::from_raw_os_error(libc_einval()));
        }
        Ok(done)
    }

    fn poll(&mut self, _timeout: Option<Duration>) -> Result<bool, KernelError> {
        Ok(!self.deliver.is_empty())
    }
}

fn libc_einval() -> i32 {
    rustix::io::Errno::INVAL.raw_os_error()
}

fn read_all<F: FaultFileOps>(q: &mut KernelFaultQueue<F>) -> Vec<PageRequest> {
    let mut got = Vec::new();
    q.read_faults(usize::MAX, &mut |f| match f.fault {
        Ok(Fault::PageRequest(r)) => got.push(r),
        other => panic!("unexpected {other:?}"),
    })
    .unwrap();
    got
}

/// Reads what the file has; every record must reach the VMM as a decode error. Returns how
/// many did.
fn read_decode_errors<F: FaultFileOps>(q: &mut KernelFaultQueue<F>) -> usize {
    let mut errors = 0;
    q.read_faults(8, &mut |f| {
        assert!(f.fault.is_err());
        errors += 1;
    })
    .unwrap();
    errors
}

fn answer(request: &PageRequest, code: ResponseCode) -> ResponseRecord {
    ResponseRecord::from(&iopf_abi::PageResponse::answering(request, code))
}

#[test]
fn a_group_is_read_converted_and_answered_once() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    let serial = q.file.trigger(7, 5, 3);
    let got = read_all(&mut q);
    assert_eq!(got.len(), 3);
    assert_eq!(
        got.iter().map(|r| r.last).collect::<Vec<_>>(),
        [false, false, true]
    );
    assert!(got.iter().all(|r| r.grpid.get() == 5 && r.pasid.is_none()));
    assert_eq!(q.pending(), 1);
    let last = got[2];
    q.write_responses(&[answer(&last, ResponseCode::Success)])
        .unwrap();
    assert_eq!(q.file.answers[&serial], [RESP_SUCCESS]);
    // Answering twice reaches nobody.
    q.write_responses(&[answer(&last, ResponseCode::Success)])
        .unwrap();
    assert_eq!(q.file.answers[&serial], [RESP_SUCCESS]);
    assert_eq!(q.stats().refused_stale, 1);
    assert_eq!(q.pending(), 0);
}

/// The kernel reuses a cookie as soon as its group is answered. A response to the earlier
/// group must not reach the later one. Fails if the queue handed the kernel's cookie to the
/// VMM, or forgot to retire groups at detach.
#[test]
fn a_response_from_before_a_detach_never_reaches_the_group_that_reuses_its_cookie() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    let first = q.file.trigger(7, 2, 1);
    let old = read_all(&mut q)[0];
    // What `detach_with` does around the detach ioctl.
    q.file.detach(7);
    assert_eq!(q.retire_device(7), 1);
    assert_eq!(q.file.answers[&first], [RESP_INVALID]);
    // The device raises the same PRG index again; the kernel gives it the same cookie.
    let second = q.file.trigger(7, 2, 1);
    let new = read_all(&mut q)[0];
    assert_eq!(q.file.response.keys().copied().collect::<Vec<_>>(), [1]);
    assert_ne!(old.cookie, new.cookie);
    q.write_responses(&[answer(&old, ResponseCode::Success)])
        .unwrap();
    assert!(
        q.file.answers[&second].is_empty(),
        "stale answer reached the new group"
    );
    assert_eq!(q.stats().refused_stale, 1);
    q.write_responses(&[answer(&new, ResponseCode::Success)])
        .unwrap();
    assert_eq!(q.file.answers[&second], [RESP_SUCCESS]);
}

/// A detach reported through a `DetachNotifier` (an `Attachment` dropped elsewhere) retires
/// the device's groups before the next write, even when the late answer comes before any
/// read that would have seen the cookie reused. Fails if the notifier is not drained on write.
#[test]
fn a_detach_reported_by_the_notifier_retires_the_group_before_the_late_answer() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    let notifier = q.detach_notifier();
    let first = q.file.trigger(7, 2, 1);
    let old = read_all(&mut q)[0];
    q.file.detach(7);
    notifier.detached(7);
    // The kernel has since handed the same cookie to a new group, not yet read here.
    let second = q.file.trigger(7, 2, 1);
    let mut buf = vec![0u8; FAULT_RECORD_SIZE];
    let mut out = Vec::new();
    q.file.read_into(&mut buf, &mut out).unwrap();
    assert_eq!(out[0].cookie, q.kernel_cookie(old.cookie).unwrap());
    q.write_responses(&[answer(&old, ResponseCode::Success)])
        .unwrap();
    assert_eq!(q.file.answers[&first], [RESP_INVALID]);
    assert!(
        q.file.answers[&second].is_empty(),
        "the late answer reached the group that reused its cookie"
    );
    assert_eq!((q.stats().retired, q.stats().refused_stale), (1, 1));
    assert_eq!(q.pending(), 0);
}

/// Without `detach_with`, the read that hands out a reused cookie retires its old holder.
#[test]
fn cookie_reuse_seen_at_read_retires_the_earlier_group() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    q.file.trigger(7, 2, 1);
    let old = read_all(&mut q)[0];
    q.file.detach(7);
    let second = q.file.trigger(7, 2, 1);
    let new = read_all(&mut q)[0];
    assert_eq!(q.stats().retired, 1);
    q.write_responses(&[answer(&old, ResponseCode::Invalid)])
        .unwrap();
    assert!(q.file.answers[&second].is_empty());
    q.write_responses(&[answer(&new, ResponseCode::Invalid)])
        .unwrap();
    assert_eq!(q.file.answers[&second], [RESP_INVALID]);
}

#[test]
fn failure_is_sent_as_invalid_and_forged_or_malformed_answers_are_refused() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    let a = q.file.trigger(1, 1, 1);
    let b = q.file.trigger(1, 2, 1);
    let got = read_all(&mut q);
    let mut forged = answer(&got[0], ResponseCode::Success);
    forged.cookie = 999.into();
    let mut malformed = answer(&got[0], ResponseCode::Success);
    malformed.version = 7.into();
    let mut mismatch = answer(&got[0], ResponseCode::Success);
    mismatch.grpid = 3.into();
    q.write_responses(&[forged, malformed, mismatch]).unwrap();
    assert!(q.file.answers[&a].is_empty());
    let s = q.stats();
    assert_eq!(
        (s.refused_stale, s.refused_malformed, s.refused_mismatch),
        (1, 1, 1)
    );
    q.write_responses(&[
        answer(&got[0], ResponseCode::Failure),
        answer(&got[1], ResponseCode::Success),
    ])
    .unwrap();
    assert_eq!(q.file.answers[&a], [RESP_INVALID]);
    assert_eq!(q.file.answers[&b], [RESP_SUCCESS]);
    assert_eq!(q.stats().failure_as_invalid, 1);
}

/// Every kind of refusal counts once in `refused_total`, whatever its kind, and the groups and
/// records read are counted as read.
#[test]
fn the_queue_counts_what_it_read_and_every_refusal_in_its_total() {
    let mut q = KernelFaultQueue::new(9, KernelModel::default());
    assert_eq!(q.fault_id(), 9);
    q.file.trigger(1, 1, 3);
    q.file.trigger(2, 1, 1);
    q.file.trigger(1, 2, 1);
    let got = read_all(&mut q);
    let s = q.stats();
    assert_eq!((s.groups, s.records), (3, 5));
    let mut malformed = answer(&got[2], ResponseCode::Success);
    malformed.version = 7.into();
    let mut mismatch = answer(&got[2], ResponseCode::Success);
    mismatch.grpid = 3.into();
    // Device 2 leaves behind the queue's back: the kernel refuses the answer to its group.
    q.file.detach(2);
    q.write_responses(&[malformed, mismatch, answer(&got[3], ResponseCode::Success)])
        .unwrap();
    q.write_responses(&[answer(&got[2], ResponseCode::Success)])
        .unwrap();
    q.write_responses(&[answer(&got[2], ResponseCode::Success)])
        .unwrap();
    let s = q.stats();
    assert_eq!(
        (
            s.refused_stale,
            s.refused_malformed,
            s.refused_mismatch,
            s.refused_by_kernel
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(q.refused_total(), 4);
}

/// A file whose reads return the records it is given and whose writes the kernel refuses
/// (`EINVAL`), as when a detach answered the group first.
#[derive(Debug, Default)]
struct RefusingFile {
    reads: VecDeque<Vec<KernelFault>>,
}

impl FaultFileOps for RefusingFile {
    fn read_into(&mut self, _buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize> {
        out.clear();
        out.extend(self.reads.pop_front().unwrap_or_default());
        Ok(out.len())
    }
    fn write(&mut self, _responses: &[KernelResponse]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc_einval()))
    }
    fn poll(&mut self, _timeout: Option<Duration>) -> Result<bool, KernelError> {
        Ok(!self.reads.is_empty())
    }
}

/// A record that does not convert is answered `Invalid` at once; when the kernel refuses that
/// answer (it answered the group itself), the refusal is counted and the read goes on.
#[test]
fn an_at_once_answer_the_kernel_refuses_is_counted_and_the_read_goes_on() {
    let record = KernelFault {
        flags: LAST_PAGE,
        dev_id: 1,
        grpid: 600, // wider than a PRG index
        cookie: 4,
        ..KernelFault::default()
    };
    let mut q = KernelFaultQueue::new(
        1,
        RefusingFile {
            reads: VecDeque::from([vec![record]]),
        },
    );
    assert_eq!(read_decode_errors(&mut q), 1);
    assert_eq!(q.stats().refused_by_kernel, 1);
    assert_eq!(q.refused_total(), 1);
}

/// The channel's `wait` says what the fault file's poll says: false while nothing is queued.
#[test]
fn the_channel_waits_on_the_fault_file() {
    let mut q = KernelFaultQueue::new(1, PolledModel(KernelModel::default(), dev_null()));
    assert!(!FaultChannel::wait(&mut q, Some(Duration::ZERO)).unwrap());
    q.file.0.trigger(1, 1, 1);
    assert!(FaultChannel::wait(&mut q, Some(Duration::ZERO)).unwrap());
}

/// The kernel model with an fd, as the channel's owner registers it in its poll set.
#[derive(Debug)]
struct PolledModel(KernelModel, std::fs::File);

fn dev_null() -> std::fs::File {
    std::fs::File::open("/dev/null").unwrap()
}

impl FaultFileOps for PolledModel {
    fn read_into(&mut self, buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize> {
        self.0.read_into(buf, out)
    }
    fn write(&mut self, responses: &[KernelResponse]) -> io::Result<usize> {
        self.0.write(responses)
    }
    fn poll(&mut self, timeout: Option<Duration>) -> Result<bool, KernelError> {
        self.0.poll(timeout)
    }
}

impl AsFd for PolledModel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.1.as_fd()
    }
}

/// A response the kernel refuses in the middle of a batch does not stop the rest.
#[test]
fn a_batch_goes_on_past_a_response_the_kernel_refuses() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    let a = q.file.trigger(1, 1, 1);
    let b = q.file.trigger(2, 1, 1);
    let c = q.file.trigger(1, 2, 1);
    let got = read_all(&mut q);
    // Device 2 leaves behind the queue's back: the kernel answers b and frees its cookie.
    q.file.detach(2);
    q.write_responses(&[
        answer(&got[0], ResponseCode::Success),
        answer(&got[1], ResponseCode::Success),
        answer(&got[2], ResponseCode::Success),
    ])
    .unwrap();
    assert_eq!(q.file.answers[&a], [RESP_SUCCESS]);
    assert_eq!(q.file.answers[&b], [RESP_INVALID]);
    assert_eq!(q.file.answers[&c], [RESP_SUCCESS]);
    assert_eq!(q.stats().refused_by_kernel, 1);
    assert_eq!(q.stats().written, 2);
}

/// A group larger than the read grows the buffer by doubling, so it costs a few refused reads
/// (not one per record), and the next read starts at the size that fitted.
#[test]
fn a_group_larger_than_the_read_grows_the_buffer_and_arrives_whole() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    q.file.trigger(1, 1, 100);
    let mut n = 0;
    q.read_faults(1, &mut |_| n += 1).unwrap();
    assert_eq!(n, 100);
    // 1, 2, 4, ... 64 records refused, then 128 fits.
    assert_eq!(q.file.reads, 8);
    q.file.trigger(1, 2, 100);
    q.read_faults(1, &mut |_| {}).unwrap();
    assert_eq!(q.file.reads, 9, "the second read started small again");
    q.file.trigger(1, 2, MAX_GROUP_RECORDS as u32 + 1);
    let err = q.read_faults(1, &mut |_| {}).unwrap_err();
    assert!(matches!(err, KernelError::GroupTooLarge(_)));
}

#[test]
fn a_record_that_does_not_convert_is_answered_invalid_at_once() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    let serial = q.file.trigger(1, 600, 1); // PRG index wider than 9 bits
    assert_eq!(read_decode_errors(&mut q), 1);
    assert_eq!(q.file.answers[&serial], [RESP_INVALID]);
    assert_eq!(q.pending(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Trigger {
        dev: u32,
        grpid: u32,
        pages: u32,
    },
    Read,
    /// Answer the `i`-th group ever read (possibly again, possibly long gone).
    Answer {
        i: usize,
        code: u8,
    },
    Detach {
        dev: u32,
        through_queue: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3u32, 0..4u32, 1..4u32).prop_map(|(dev, grpid, pages)| Op::Trigger { dev, grpid, pages }),
        2 => Just(Op::Read),
        4 => (0..64usize, 0..3u8).prop_map(|(i, code)| Op::Answer { i, code }),
        1 => (0..3u32, any::<bool>()).prop_map(|(dev, through_queue)| Op::Detach { dev, through_queue }),
    ]
}

proptest! {
    /// Whatever the VMM answers, late, twice, after detaches: every group raised gets at most
    /// one answer, and an answer the VMM wrote reaches only the group it read it for.
    #[test]
    fn answers_reach_only_their_own_group_and_at_most_once(ops in proptest::collection::vec(op(), 1..120)) {
        let mut q = KernelFaultQueue::new(1, KernelModel::default());
        // Every group read, with the serial the model gave it (model's kernel cookie → serial
        // at read time).
        let mut read: Vec<(PageRequest, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Trigger { dev, grpid, pages } => { q.file.trigger(dev, grpid, pages); }
                Op::Read => {
                    let mut got = Vec::new();
                    q.read_faults(usize::MAX, &mut |f| {
                        if let Ok(Fault::PageRequest(r)) = f.fault && r.last { got.push(r); }
                    }).unwrap();
                    let serials = &q.file.read_order[read.len()..];
                    prop_assert_eq!(serials.len(), got.len());
                    read.extend(got.into_iter().zip(serials.iter().copied()));
                }
                Op::Answer { i, code } => {
                    if read.is_empty() { continue; }
                    let (request, serial) = read[i % read.len()];
                    let code = [ResponseCode::Success, ResponseCode::Invalid, ResponseCode::Failure][code as usize];
                    let before = q.file.answers.clone();
                    q.write_responses(&[answer(&request, code)]).unwrap();
                    for (s, codes) in &q.file.answers {
                        if codes.len() != before[s].len() {
                            prop_assert_eq!(*s, serial, "an answer reached another group");
                        }
                    }
                }
                Op::Detach { dev, through_queue } => {
                    if through_queue {
                        q.file.detach(dev);
                        q.retire_device(dev);
                    } else {
                        q.file.detach(dev);
                    }
                }
            }
            for codes in q.file.answers.values() {
                prop_assert!(codes.len() <= 1, "a group was answered twice");
            }
        }
    }
}

/// A file that returns whatever records it is given, as a buggy kernel might.
#[derive(Debug, Default)]
struct ScriptedFile {
    reads: VecDeque<Vec<KernelFault>>,
    written: Vec<KernelResponse>,
}

impl FaultFileOps for ScriptedFile {
    fn read_into(&mut self, buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize> {
        out.clear();
        let room = buf.len() / FAULT_RECORD_SIZE;
        if let Some(mut records) = self.reads.pop_front() {
            records.truncate(room);
            out.extend(records);
        }
        Ok(out.len())
    }
    fn write(&mut self, responses: &[KernelResponse]) -> io::Result<usize> {
        self.written.extend_from_slice(responses);
        Ok(responses.len())
    }
    fn poll(&mut self, _timeout: Option<Duration>) -> Result<bool, KernelError> {
        Ok(!self.reads.is_empty())
    }
}

fn kernel_fault() -> impl Strategy<Value = KernelFault> {
    (
        prop_oneof![Just(LAST_PAGE), Just(LAST_PAGE | PASID_VALID), any::<u32>()],
        0..4u32,
        prop_oneof![0..4u32, any::<u32>()],
        prop_oneof![0..600u32, any::<u32>()],
        prop_oneof![0..16u32, any::<u32>()],
        any::<u64>(),
        0..6u32,
    )
        .prop_map(
            |(flags, dev_id, pasid, grpid, perm, addr, cookie)| KernelFault {
                flags,
                dev_id,
                pasid,
                grpid,
                perm,
                addr,
                cookie,
                ..KernelFault::default()
            },
        )
}

proptest! {
    /// Whatever records the kernel returns: no panic; each record either reaches the VMM as a
    /// page request whose fields are the record's, or as a decode error with its group answered
    /// `Invalid`; answers the VMM writes go out with the kernel cookie of their own group only.
    #[test]
    fn arbitrary_kernel_records_are_converted_or_answered(
        reads in proptest::collection::vec(proptest::collection::vec(kernel_fault(), 0..6), 0..6)
    ) {
        let mut q = KernelFaultQueue::new(1, ScriptedFile { reads: reads.clone().into(), ..Default::default() });
        let mut requests = Vec::new();
        for _ in 0..reads.len() {
            let mut got = Vec::new();
            q.read_faults(64, &mut |f| got.push(f)).unwrap();
            for f in got {
                match f.fault {
                    Ok(Fault::PageRequest(r)) => {
                        prop_assert_eq!(r.addr.get() % 4096, 0);
                        requests.push(r);
                    }
                    Ok(other) => prop_assert!(false, "not a page request: {:?}", other),
                    Err(_) => {}
                }
            }
        }
        let undecodable_answers = q.file().written.len();
        prop_assert_eq!(undecodable_answers as u64, q.stats().undecodable);
        prop_assert!(q.file().written.iter().all(|w| w.code == RESP_INVALID));
        // Answer every group read, twice.
        let last: Vec<ResponseRecord> = requests.iter().filter(|r| r.last).map(|r| answer(r, ResponseCode::Success)).collect();
        q.write_responses(&last).unwrap();
        q.write_responses(&last).unwrap();
        let written = &q.file().written[undecodable_answers..];
        // Kernel cookies written are distinct (no group answered twice through us).
        let mut cookies: Vec<u32> = written.iter().map(|w| w.cookie).collect();
        cookies.sort_unstable();
        cookies.dedup();
        prop_assert_eq!(cookies.len(), written.len());
        prop_assert_eq!(q.pending(), 0);
    }
}

/// What the kernel calls a cookie stays inside the queue; `kernel_cookie` tells it for a group
/// still pending, and nothing once the group is answered.
#[test]
fn kernel_cookie_names_the_kernels_cookie_of_a_pending_group_only() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    q.file.trigger(1, 1, 1);
    q.file.trigger(1, 2, 1);
    let got = read_all(&mut q);
    // The model hands out the lowest free cookies: 1, then 2.
    assert_eq!(q.kernel_cookie(got[0].cookie), Some(1));
    assert_eq!(q.kernel_cookie(got[1].cookie), Some(2));
    q.write_responses(&[answer(&got[1], ResponseCode::Success)])
        .unwrap();
    assert_eq!(q.kernel_cookie(got[1].cookie), None);
}

/// A file whose reads and writes fail with the given errors first (and whose writes then
/// take nothing, `empty_writes` times), then are the model's.
#[derive(Debug, Default)]
struct FailingFile {
    model: KernelModel,
    read_errors: VecDeque<io::ErrorKind>,
    write_errors: VecDeque<io::ErrorKind>,
    empty_writes: usize,
}

impl FaultFileOps for FailingFile {
    fn read_into(&mut self, buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize> {
        match self.read_errors.pop_front() {
            Some(kind) => Err(kind.into()),
            None => self.model.read_into(buf, out),
        }
    }
    fn write(&mut self, responses: &[KernelResponse]) -> io::Result<usize> {
        if let Some(kind) = self.write_errors.pop_front() {
            return Err(kind.into());
        }
        if self.empty_writes > 0 {
            self.empty_writes -= 1;
            return Ok(0);
        }
        self.model.write(responses)
    }
    fn poll(&mut self, timeout: Option<Duration>) -> Result<bool, KernelError> {
        self.model.poll(timeout)
    }
}

/// A read or write interrupted by a signal is tried again and loses nothing; any other error
/// is returned at once, not retried, and the group it was for stays pending, so the same
/// answer given again reaches it.
#[test]
fn interrupted_calls_are_retried_and_other_errors_are_returned() {
    use io::ErrorKind::{Interrupted, Other};
    let mut q = KernelFaultQueue::new(1, FailingFile::default());
    let serial = q.file.model.trigger(1, 1, 1);
    q.file.read_errors = [Interrupted, Interrupted].into();
    let got = read_all(&mut q);
    assert_eq!(got.len(), 1);
    let request = got[0];
    let response = [answer(&request, ResponseCode::Success)];

    q.file.write_errors = [Other].into();
    let err = q.write_responses(&response).unwrap_err();
    assert!(matches!(err, KernelError::Write(_)), "{err:?}");
    assert_eq!(q.file.model.answers[&serial], Vec::<u32>::new());
    assert_eq!(q.pending(), 1);
    assert_eq!(q.kernel_cookie(request.cookie), Some(1));

    q.file.read_errors = [Other].into();
    let err = q.read_faults(8, &mut |_| {}).unwrap_err();
    assert!(matches!(err, KernelError::Read(_)), "{err:?}");

    q.file.write_errors = [Interrupted].into();
    q.write_responses(&response).unwrap();
    assert_eq!(q.file.model.answers[&serial], [RESP_SUCCESS]);
    assert_eq!(q.pending(), 0);
}

/// One response answers a whole group with its PASID, so records of one kernel cookie must agree
/// on it: records that disagree are refused (answered `Invalid`, each reported as a decode
/// error). Without `PASID_VALID` the PASID field means nothing and may differ.
#[test]
fn records_of_a_group_must_agree_on_a_valid_pasid_only() {
    let record = |cookie, flags, pasid| KernelFault {
        flags,
        dev_id: 1,
        grpid: 3,
        pasid,
        perm: 3,
        addr: 0x1000,
        cookie,
        ..KernelFault::default()
    };
    let reads = vec![
        vec![record(1, 0, 0), record(1, LAST_PAGE, 7)],
        vec![
            record(2, PASID_VALID, 5),
            record(2, PASID_VALID | LAST_PAGE, 5),
        ],
        vec![
            record(3, PASID_VALID, 5),
            record(3, PASID_VALID | LAST_PAGE, 6),
        ],
    ];
    let mut q = KernelFaultQueue::new(
        1,
        ScriptedFile {
            reads: reads.into(),
            ..Default::default()
        },
    );
    let mut read = || {
        let mut got = Vec::new();
        q.read_faults(8, &mut |f| got.push(f.fault)).unwrap();
        got
    };
    let no_pasid = read();
    assert!(
        no_pasid
            .iter()
            .all(|f| matches!(f, Ok(Fault::PageRequest(r)) if r.pasid.is_none())),
        "{no_pasid:?}"
    );
    let same = read();
    assert!(
        same.iter()
            .all(|f| matches!(f, Ok(Fault::PageRequest(r)) if r.pasid.map(Pasid::get) == Some(5))),
        "{same:?}"
    );
    let differ = read();
    assert!(
        matches!(
            differ[..],
            [Err(DecodeError::InconsistentGroup { field: "pasid" })]
        ),
        "{differ:?}"
    );
    assert_eq!(
        q.file().written,
        [KernelResponse {
            cookie: 3,
            code: RESP_INVALID
        }]
    );
    assert_eq!(q.pending(), 2);
}

/// Our cookies wrap after 2^32 groups: the counter skips 0 and every cookie still pending, so
/// an old group's cookie is never given to a new one.
#[test]
fn cookies_wrap_past_zero_and_past_groups_still_pending() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    let a = q.file.trigger(1, 1, 1);
    let first = read_all(&mut q)[0];
    assert_eq!(first.cookie.get(), 1);
    q.next_cookie = u32::MAX - 1;
    let b = q.file.trigger(1, 2, 1);
    let c = q.file.trigger(1, 3, 1);
    let got = read_all(&mut q);
    let cookies: Vec<u32> = got.iter().map(|r| r.cookie.get()).collect();
    assert_eq!(cookies, [u32::MAX, 2]);
    q.write_responses(&[
        answer(&first, ResponseCode::Success),
        answer(&got[0], ResponseCode::Invalid),
        answer(&got[1], ResponseCode::Success),
    ])
    .unwrap();
    assert_eq!(q.file.answers[&a], [RESP_SUCCESS]);
    assert_eq!(q.file.answers[&b], [RESP_INVALID]);
    assert_eq!(q.file.answers[&c], [RESP_SUCCESS]);
}

/// The queue as a VMM's loop sees it through `FaultChannel`: always live (the kernel's queue
/// lives as long as its file), free to sleep at once (the file is level-triggered), and its
/// refusals are the queue's total.
#[test]
fn the_channel_face_is_live_level_triggered_and_counts_every_refusal() {
    let mut q = KernelFaultQueue::new(1, PolledModel(KernelModel::default(), dev_null()));
    assert!(FaultChannel::live(&q));
    assert!(FaultChannel::prepare_to_sleep(&mut q).unwrap());
    q.file.0.trigger(1, 1, 1);
    let mut got = Vec::new();
    assert_eq!(
        FaultChannel::read(&mut q, 8, &mut |f| got.push(f)).unwrap(),
        1
    );
    let Ok(Fault::PageRequest(request)) = got[0].fault else {
        panic!("{got:?}");
    };
    let mut forged = answer(&request, ResponseCode::Success);
    forged.cookie = 99.into();
    let responses = [forged, forged, answer(&request, ResponseCode::Success)];
    assert_eq!(FaultChannel::respond(&mut q, &responses).unwrap(), 3);
    assert_eq!(FaultChannel::refused(&q), 2);
    assert_eq!(q.refused_total(), 2);
}

/// Retiring a device retires each of its pending groups and says how many; other devices'
/// groups stay.
#[test]
fn retiring_a_device_retires_and_counts_all_its_groups_only() {
    let mut q = KernelFaultQueue::new(1, KernelModel::default());
    q.file.trigger(7, 1, 1);
    q.file.trigger(8, 1, 1);
    q.file.trigger(7, 2, 1);
    read_all(&mut q);
    q.file.detach(7);
    assert_eq!(q.retire_device(7), 2);
    assert_eq!(q.stats().retired, 2);
    assert_eq!(q.pending(), 1);
    assert_eq!(q.retire_device(7), 0);
    assert_eq!(q.stats().retired, 2);
}

/// The at-once `Invalid` answer to a group that does not convert: an error writing it is the
/// read's error (not taken for the kernel's refusal), and the decode error names the unknown
/// permission bits exactly.
#[test]
fn an_at_once_answer_that_cannot_be_written_fails_the_read() {
    let mut q = KernelFaultQueue::new(1, FailingFile::default());
    q.file.model.trigger(1, 600, 1); // PRG index wider than 9 bits
    q.file.write_errors = [io::ErrorKind::Other].into();
    let err = q.read_faults(8, &mut |_| {}).unwrap_err();
    assert!(matches!(err, KernelError::Write(_)), "{err:?}");
    assert_eq!(q.stats().refused_by_kernel, 0);

    let record = KernelFault {
        flags: LAST_PAGE,
        dev_id: 1,
        grpid: 1,
        perm: 0x1_0003,
        cookie: 5,
        ..KernelFault::default()
    };
    let mut q = KernelFaultQueue::new(
        1,
        ScriptedFile {
            reads: [vec![record]].into(),
            ..Default::default()
        },
    );
    let mut got = Vec::new();
    q.read_faults(8, &mut |f| got.push(f.fault)).unwrap();
    assert!(
        matches!(
            got[..],
            [Err(DecodeError::UnknownBits {
                field: "perm",
                bits: 0x1_0000
            })]
        ),
        "{got:?}"
    );
}

/// A write that takes nothing (which the kernel does not do: it refuses with `EINVAL`) counts
/// the response at the batch's head as refused, and the rest of the batch still goes out.
#[test]
fn a_write_that_takes_nothing_skips_one_response_and_goes_on() {
    let mut q = KernelFaultQueue::new(1, FailingFile::default());
    let a = q.file.model.trigger(1, 1, 1);
    let b = q.file.model.trigger(1, 2, 1);
    let answers: Vec<ResponseRecord> = read_all(&mut q)
        .iter()
        .map(|r| answer(r, ResponseCode::Success))
        .collect();
    q.file.empty_writes = 1;
    q.write_responses(&answers).unwrap();
    assert_eq!(q.stats().refused_by_kernel, 1);
    assert_eq!(q.stats().written, 1);
    assert_eq!(q.file.model.answers[&a], Vec::<u32>::new());
    assert_eq!(q.file.model.answers[&b], [RESP_SUCCESS]);
}
