//! The iommufd backend (`iopf-iommufd`'s `KernelFaultQueue`) between a model of the kernel's
//! fault object (6.12 `fault.c`: lowest-free cookies freed on answer, whole-group reads,
//! writes that stop at the first refused response, detach answering the device's groups) and
//! a VMM that answers anything: its own requests late or twice, forged and malformed records.
//! Whatever happens, nothing panics, every group gets at most one answer, and an answer the
//! VMM meant for one group never reaches another, even when the kernel has reused its cookie.
#![no_main]

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::time::Duration;

use arbitrary::Arbitrary;
use iopf_abi::{Fault, PageRequest, PageResponse, ResponseCode, ResponseRecord};
use iopf_iommufd::{
    FAULT_RECORD_SIZE, FaultFileOps, KernelError, KernelFault, KernelFaultQueue, KernelResponse,
};
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

const EINVAL: i32 = 22;

#[derive(Debug, Arbitrary)]
enum Step {
    /// The device raises a group (the kernel may hand it any field values).
    Raise {
        dev: u8,
        grpid: u16,
        pages: u8,
        flags: u32,
        pasid: u32,
        perm: u8,
    },
    /// The VMM reads up to this many records.
    Read(u8),
    /// The VMM answers the `i`-th group it ever read.
    Answer { i: u8, code: u8 },
    /// The VMM writes raw record bytes.
    Raw([u8; 32]),
    /// The device leaves its page table (through the queue, or behind its back).
    Detach { dev: u8, through_queue: bool },
}

#[derive(Debug, Clone)]
struct Group {
    serial: u64,
    dev: u32,
    records: Vec<KernelFault>,
}

#[derive(Debug, Default)]
struct Kernel {
    serial: u64,
    deliver: VecDeque<Group>,
    response: BTreeMap<u32, Group>,
    answers: BTreeMap<u64, u32>,
    read_order: Vec<u64>,
    /// Set when a write answered a group: its serial.
    last_answered: Vec<u64>,
}

impl Kernel {
    fn answer(&mut self, serial: u64) {
        *self.answers.entry(serial).or_default() += 1;
        assert!(self.answers[&serial] <= 1, "group {serial} answered twice");
        self.last_answered.push(serial);
    }

    fn detach(&mut self, dev: u32) {
        let (gone, kept): (Vec<Group>, Vec<Group>) =
            self.deliver.drain(..).partition(|g| g.dev == dev);
        self.deliver = kept.into();
        for g in gone {
            self.answer(g.serial);
        }
        let cookies: Vec<u32> = self
            .response
            .iter()
            .filter(|(_, g)| g.dev == dev)
            .map(|(c, _)| *c)
            .collect();
        for c in cookies {
            let g = self.response.remove(&c).unwrap();
            self.answer(g.serial);
        }
    }
}

impl FaultFileOps for Kernel {
    fn read_into(&mut self, buf: &mut [u8], out: &mut Vec<KernelFault>) -> io::Result<usize> {
        out.clear();
        let room = buf.len() / FAULT_RECORD_SIZE;
        while let Some(g) = self.deliver.front() {
            if g.records.len() > room - out.len() {
                if out.is_empty() {
                    return Err(io::Error::from_raw_os_error(EINVAL));
                }
                break;
            }
            let mut g = self.deliver.pop_front().unwrap();
            let cookie = (1..).find(|c| !self.response.contains_key(c)).unwrap();
            for r in &mut g.records {
                r.cookie = cookie;
            }
            out.extend_from_slice(&g.records);
            self.read_order.push(g.serial);
            self.response.insert(cookie, g);
        }
        Ok(out.len())
    }

    fn write(&mut self, responses: &[KernelResponse]) -> io::Result<usize> {
        let mut done = 0;
        for r in responses {
            if r.code > 1 {
                break;
            }
            let Some(g) = self.response.remove(&r.cookie) else {
                break;
            };
            self.answer(g.serial);
            done += 1;
        }
        if done == 0 && !responses.is_empty() {
            return Err(io::Error::from_raw_os_error(EINVAL));
        }
        Ok(done)
    }

    fn poll(&mut self, _: Option<Duration>) -> Result<bool, KernelError> {
        Ok(!self.deliver.is_empty())
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let mut q = KernelFaultQueue::new(1, Kernel::default());
    // Last request of each group read, with the serial of the group it belongs to.
    let mut read: Vec<(PageRequest, u64)> = Vec::new();
    let mut pending_read: Vec<PageRequest> = Vec::new();
    for step in steps.into_iter().take(256) {
        match step {
            Step::Raise {
                dev,
                grpid,
                pages,
                flags,
                pasid,
                perm,
            } => {
                let k = q.file_mut();
                k.serial += 1;
                let pages = usize::from(pages % 5) + 1;
                let records = (0..pages)
                    .map(|p| KernelFault {
                        flags: if p + 1 == pages {
                            flags | 2
                        } else {
                            flags & !2
                        },
                        dev_id: u32::from(dev % 3),
                        pasid,
                        grpid: u32::from(grpid % 600),
                        perm: u32::from(perm % 32),
                        addr: 0x1000 * p as u64,
                        ..KernelFault::default()
                    })
                    .collect();
                let serial = k.serial;
                k.deliver.push_back(Group {
                    serial,
                    dev: u32::from(dev % 3),
                    records,
                });
            }
            Step::Read(max) => {
                let before = q.file_mut().read_order.len();
                q.read_faults(usize::from(max), &mut |f| {
                    if let Ok(Fault::PageRequest(r)) = f.fault {
                        pending_read.push(r);
                    }
                })
                .unwrap();
                let k = q.file_mut();
                // Groups handed out by this read, in order; those that converted arrive as
                // their requests, the last one with `last` set.
                let serials: Vec<u64> = k.read_order[before..].to_vec();
                let lasts: Vec<PageRequest> = pending_read.drain(..).filter(|r| r.last).collect();
                // Undecodable groups were answered at once and delivered no requests.
                let delivered: Vec<u64> = serials
                    .into_iter()
                    .filter(|s| !k.answers.contains_key(s))
                    .collect();
                assert_eq!(delivered.len(), lasts.len());
                read.extend(lasts.into_iter().zip(delivered));
            }
            Step::Answer { i, code } => {
                if read.is_empty() {
                    continue;
                }
                let (request, serial) = read[usize::from(i) % read.len()];
                let code = [
                    ResponseCode::Success,
                    ResponseCode::Invalid,
                    ResponseCode::Failure,
                ][usize::from(code % 3)];
                q.file_mut().last_answered.clear();
                q.write_responses(&[ResponseRecord::from(&PageResponse::answering(
                    &request, code,
                ))])
                .unwrap();
                for s in &q.file_mut().last_answered {
                    assert_eq!(*s, serial, "an answer reached another group");
                }
            }
            Step::Raw(bytes) => {
                let record = ResponseRecord::read_from_bytes(&bytes[..]).unwrap();
                q.file_mut().last_answered.clear();
                q.write_responses(&[record]).unwrap();
                // A raw record can only answer a group whose (our) cookie it names; if it did,
                // that group was pending under that cookie.
                assert!(q.file_mut().last_answered.len() <= 1);
            }
            Step::Detach { dev, through_queue } => {
                let dev = u32::from(dev % 3);
                q.file_mut().detach(dev);
                if through_queue {
                    q.retire_device(dev);
                }
            }
        }
    }
});
