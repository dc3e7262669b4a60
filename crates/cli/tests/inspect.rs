//! `iopf inspect` on a live region (through /proc) and on garbage.

use std::os::fd::AsRawFd;
use std::process::Command;

use iopf_abi::{
    Cookie, FaultReason, PageAddr, PageRequest, Pasid, Perm, PrgIndex, UnrecoverableFault,
};
use iopf_queue::FaultQueueProducer;

fn inspect(path: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .args(["inspect", path])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn inspect_decodes_a_live_fault_queue_through_proc() {
    let mut queue = FaultQueueProducer::create(8).unwrap();
    queue.set_live(true);
    let request = PageRequest {
        cookie: Cookie::new(42).unwrap(),
        pasid: Some(Pasid::new(3).unwrap()),
        grpid: PrgIndex::new(7).unwrap(),
        perm: Perm::READ,
        addr: PageAddr::new(0x5000).unwrap(),
        last: true,
        private_data: None,
    };
    queue.stage_group(&[request]).unwrap();
    queue
        .stage_unrecoverable(&UnrecoverableFault {
            reason: FaultReason::Permission,
            pasid: None,
            perm: Perm::WRITE,
            addr: Some(0x9000),
            fetch_addr: None,
        })
        .unwrap();
    queue.publish().unwrap();
    let path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        queue.memory().fd().as_raw_fd()
    );
    let (ok, text) = inspect(&path);
    assert!(ok, "{text}");
    assert!(
        text.contains("kind fault entry_size 64 nb_entries 8"),
        "{text}"
    );
    assert!(text.contains("LIVE"), "{text}");
    assert!(
        text.contains("2 records marked between cons 0 and prod 2"),
        "{text}"
    );
    assert!(
        text.contains("Cookie(0x2a)") && text.contains("PrgIndex(7)"),
        "{text}"
    );
    assert!(text.contains("Permission"), "{text}");

    // The same region as JSON.
    let out = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .args(["inspect", "--json", &path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["host"]["kind"], "fault");
    assert_eq!(view["host"]["live"], true);
    assert_eq!(view["records"]["pending"], 2);
    assert_eq!(view["records"]["shown"].as_array().unwrap().len(), 2);
    assert_eq!(view["records"]["bad_mark"], serde_json::Value::Null);
}

#[test]
fn inspect_shows_a_forged_mark_where_the_marked_records_end() {
    use iopf_queue::QueueMemory;
    let mut queue = FaultQueueProducer::create(8).unwrap();
    queue
        .stage_unrecoverable(&UnrecoverableFault {
            reason: FaultReason::Permission,
            pasid: None,
            perm: Perm::WRITE,
            addr: Some(0x9000),
            fetch_addr: None,
        })
        .unwrap();
    queue.publish().unwrap();
    // Slot 1's mark (word 7 of the slot) says record 9: skipped ahead.
    queue.memory().entry_words()[15].store(iopf_abi::mark(9), std::sync::atomic::Ordering::Release);
    let path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        queue.memory().fd().as_raw_fd()
    );
    let (ok, text) = inspect(&path);
    assert!(ok, "{text}");
    assert!(
        text.contains("1 records marked between cons 0 and prod 1"),
        "{text}"
    );
    assert!(
        text.contains("slot of record 1 has mark 0x100000009"),
        "{text}"
    );
}

#[test]
fn inspect_refuses_garbage_without_panicking() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path();
    let small = dir.join("small");
    std::fs::write(&small, [0u8; 100]).unwrap();
    let (ok, text) = inspect(small.to_str().unwrap());
    assert!(!ok);
    assert!(text.contains("too small for a queue region"), "{text}");
    let noise = dir.join("noise");
    let bytes: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&noise, bytes).unwrap();
    let (_, text) = inspect(noise.to_str().unwrap());
    assert!(!text.contains("panicked"), "{text}");
}
