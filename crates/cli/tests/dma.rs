//! A real `iopf host` process against a VMM that keeps no page tables (direct mode,
//! `docs/PROTOCOL.md` §4.6), written here with `iopf_vfio_user::Client` and the queue crate's
//! public API only: it maps three regions of guest memory from memfds at different
//! guest-physical addresses, one of them read-only, writes no PASID directory, and answers
//! every page request group `Success`.

mod common;
use common::{Reaper, wait_for_socket};

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iopf_abi::{Fault, PageResponse, ResponseCode, ResponseRecord};
use iopf_queue::{Doorbell, FaultQueueConsumer, ResponseQueueProducer};
use iopf_vfio_user::device::{
    DMA_FAULT_IRQ_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
    VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE, VFIO_REGION_TYPE_NESTED,
};
use iopf_vfio_user::{Client, DmaProt};
use rustix::fs::{MemfdFlags, SealFlags};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The three regions: (guest-physical address, size, offset in its memfd, memfd size, prot).
const RW1: (u64, u64, u64, u64) = (0x100_0000, MIB, 0, MIB);
/// Mapped from the second MiB of a 2 MiB memfd: the offset must be honoured.
const RW2: (u64, u64, u64, u64) = (0x200_0000, MIB, MIB, 2 * MIB);
const RO: (u64, u64, u64, u64) = (0x300_0000, MIB / 4, 0, MIB / 4);
/// What the VMM fills the read-only region with.
const RO_FILL: u8 = 0xa5;

const WRITES_1: u64 = 300;
const WRITES_2: u64 = 200;
const WRITES_RO: u64 = 50;

fn scenario() -> String {
    format!(
        r#"seed = 3
ring_entries = 256
response_timeout_ms = 10000

[guest]
refuse_rate = 0.0

[[device]]
allocation = 32
[[device.stream]]
iova = {rw1:#x}
pattern = "sequential"
pages = 64
access_len = 4096
write = true
accesses = {WRITES_1}
interval_us = 10
[[device.stream]]
iova = {rw2:#x}
pattern = "random"
pages = 64
access_len = 512
write = true
accesses = {WRITES_2}
interval_us = 10
[[device.stream]]
iova = {ro:#x}
pattern = "sequential"
pages = 16
access_len = 4096
write = true
accesses = {WRITES_RO}
interval_us = 10
"#,
        rw1 = RW1.0,
        rw2 = RW2.0,
        ro = RO.0,
    )
}

fn memfd(len: u64, fill: u8) -> OwnedFd {
    let fd =
        rustix::fs::memfd_create("guest", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    if fill != 0 {
        let mut file = File::from(fd.try_clone().unwrap());
        file.write_all(&vec![fill; len as usize]).unwrap();
    }
    // What the host requires: the file cannot shrink under its mapping.
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK).unwrap();
    fd
}

fn bytes(fd: &OwnedFd, offset: u64, len: u64) -> Vec<u8> {
    let file = File::from(fd.try_clone().unwrap());
    let mut out = vec![0; len as usize];
    file.read_exact_at(&mut out, offset).unwrap();
    out
}

/// Catches: a host that maps only one region, ignores a mapping's IOVA or fd offset (the data
/// would land elsewhere in the memfds), lets a device write a read-only mapping, fails the
/// accesses a VMM without page tables has answered `Success` (direct mode missing), or
/// reports what DMA wrote as anything but what guest memory holds.
#[test]
fn a_vmm_without_page_tables_gets_its_pages_one_to_one_and_read_only_memory_stays_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("host.sock");
    let scenario_path = dir.path().join("direct.toml");
    std::fs::write(&scenario_path, scenario()).unwrap();
    let mut host = Reaper(
        Command::new(env!("CARGO_BIN_EXE_iopf"))
            .args(["host", "--json", "--socket"])
            .arg(&socket)
            .arg("--scenario")
            .arg(&scenario_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&socket);

    // Attach: the queues by region type, the response doorbell, the fault IRQ.
    let mut client = Client::connect(&socket).unwrap();
    client.device_info().unwrap();
    let mut region = |subtype| {
        client
            .find_region_by_type(VFIO_REGION_TYPE_NESTED, subtype)
            .unwrap()
            .and_then(|r| r.fd)
            .expect("the queue region and its fd")
    };
    let fault_fd = region(VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT);
    let response_fd = region(VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE);
    let mut io_fds = client
        .region_io_fds(DMA_FAULT_RESPONSE_REGION_INDEX)
        .unwrap();
    let response_doorbell = Doorbell::from_fd(io_fds.fds.remove(0)).unwrap();
    let fault_doorbell = Doorbell::new().unwrap();
    client
        .set_irqs(DMA_FAULT_IRQ_INDEX, &[fault_doorbell.as_fd()])
        .unwrap();
    let mut faults = FaultQueueConsumer::attach(fault_fd, fault_doorbell).unwrap();
    let mut responses =
        ResponseQueueProducer::attach(response_fd, Some(response_doorbell)).unwrap();

    // Guest memory: three memfds, mapped at their guest-physical addresses; no directory.
    let rw1 = memfd(RW1.3, 0);
    let rw2 = memfd(RW2.3, 0);
    let ro = memfd(RO.3, RO_FILL);
    let rw = DmaProt::READ | DmaProt::WRITE;
    for (fd, (gpa, size, offset, _), prot) in
        [(&rw1, RW1, rw), (&rw2, RW2, rw), (&ro, RO, DmaProt::READ)]
    {
        client
            .dma_map(Some(fd.as_fd()), offset, gpa, size, prot)
            .unwrap();
    }

    // Answer every group Success until the host has finished.
    let (mut groups, mut unrecoverable) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while host.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the host did not finish");
        if !faults.live() && groups > 0 {
            break;
        }
        faults.wait(Some(Duration::from_millis(10))).unwrap();
        let mut answers = Vec::new();
        faults
            .drain_faults(usize::MAX, |fault| match fault.unwrap() {
                Fault::PageRequest(r) => {
                    assert!(r.pasid.is_none(), "a stream without PASID");
                    if r.last {
                        answers.push(ResponseRecord::from(&PageResponse::answering(
                            &r,
                            ResponseCode::Success,
                        )));
                    }
                }
                Fault::Unrecoverable(_) => unrecoverable += 1,
            })
            .unwrap();
        groups += answers.len() as u64;
        for record in &answers {
            responses.stage_record(record).unwrap();
        }
        if !answers.is_empty() {
            responses.publish().unwrap();
        }
    }
    let status = host.0.wait().unwrap();
    let mut out = String::new();
    host.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "iopf host failed: {status:?}\n{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let engine = &report["engines"][0];
    let e = &engine["endpoint"];
    let n = |v: &Value| v.as_u64().unwrap();

    // Every access to the read-write regions completed; every write to the read-only one
    // failed at the second stage, each reported as an unrecoverable fault.
    assert_eq!(n(&e["accesses"]), WRITES_1 + WRITES_2 + WRITES_RO, "{e}");
    assert_eq!(n(&e["completed"]), WRITES_1 + WRITES_2, "{e}");
    assert_eq!(n(&e["failed_stage2"]), WRITES_RO, "{e}");
    assert_eq!(n(&e["failed_invalid"]) + n(&e["failed_no_pri"]), 0, "{e}");
    assert!(
        groups > 0 && unrecoverable == WRITES_RO,
        "{groups} {unrecoverable}"
    );
    assert_eq!(n(&report["unanswered_groups"]), 0);
    // The host checked guest memory against what DMA wrote: all of it, through the same
    // memfds.
    let memory = &engine["memory"];
    assert!(n(&memory["bytes_verified"]) >= 64 * 4096, "{memory}");
    assert_eq!(n(&memory["bytes_mismatched"]), 0, "{memory}");

    // The VMM's own view of its memfds: the read-only region is byte for byte what it put
    // there; the written buffers hold data where the IOVA says, nothing outside them (and
    // nothing before the second region's offset in its memfd).
    assert!(bytes(&ro, 0, RO.3).iter().all(|b| *b == RO_FILL));
    let pages_written = |fd: &OwnedFd, offset: u64| {
        (0..64)
            .filter(|p| bytes(fd, offset + p * 4096, 4096).iter().any(|b| *b != 0))
            .count()
    };
    assert_eq!(
        pages_written(&rw1, 0),
        64,
        "the sequential stream covers its buffer"
    );
    assert!(pages_written(&rw2, MIB) > 0);
    assert!(
        bytes(&rw1, 64 * 4096, MIB - 64 * 4096)
            .iter()
            .all(|b| *b == 0)
    );
    assert!(
        bytes(&rw2, 0, MIB).iter().all(|b| *b == 0),
        "offset ignored"
    );
    assert!(
        bytes(&rw2, MIB + 64 * 4096, MIB - 64 * 4096)
            .iter()
            .all(|b| *b == 0)
    );
}
