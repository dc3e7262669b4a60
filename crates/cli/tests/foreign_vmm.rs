//! A VMM written by someone else: the `minimal` example of `iopf-vmm` (public API only, no
//! simulator crate), against a real `iopf host` process serving 64 devices in direct mode, all
//! served from one thread with one event loop. Every group the host completed must reach the
//! VMM and be answered by it exactly once, with nothing refused and nothing answered by the
//! host itself.

mod common;
use common::wait_for_socket;
use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Child, Command, Stdio};

use iopf_vfio_user::DmaProt;
use serde_json::Value;
use vm_memory::GuestRegionMmap;

#[allow(dead_code)]
#[path = "../../vmm/examples/minimal.rs"]
mod minimal;

/// Kills the host if the test fails before it ends.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        // The host may have exited already; either way it is reaped.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const DEVICES: usize = 64;
/// Per stream (two streams per device): small, so that 64 devices finish quickly.
const ACCESSES: u64 = 60;

/// Catches: a host that serves fewer devices than asked or two connections one device, a
/// VMM library that loses, duplicates or misroutes groups among many devices on one thread
/// (the counts per device would differ from the host's), answers the host refuses, a host that
/// does not start direct-mode DMA for a VMM writing no directory, or one that never tells the
/// VMM it has finished (the VMM would not leave and the test would time out).
#[test]
fn sixty_four_devices_on_one_thread_get_every_group_answered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("host.sock");
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scenarios/direct.toml");
    let mut host = Reaper(
        Command::new(env!("CARGO_BIN_EXE_iopf"))
            .args(["host", "--json", "--devices", &DEVICES.to_string()])
            .args(["--accesses", &ACCESSES.to_string(), "--scenario", scenario])
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&socket);

    // Attach until the host refuses a connection (every device taken), then serve them all.
    let mut vmm = minimal::Vmm::new().unwrap();
    let rw = |_: &GuestRegionMmap| DmaProt::READ | DmaProt::WRITE;
    minimal::attach_all(&mut vmm, &socket, None, minimal::guest_memory, rw).unwrap();
    assert_eq!(vmm.viommu.guests.len(), DEVICES);
    assert_eq!(vmm.events.len(), DEVICES, "one loop serves every device");
    let accounts = vmm.run().unwrap();

    // The report (about 100 KiB for 64 devices) is read before the wait: it is more than a
    // pipe holds.
    let mut out = String::new();
    let mut stdout = host.0.stdout.take().unwrap();
    stdout.read_to_string(&mut out).unwrap();
    let status = host.0.wait().unwrap();
    assert!(status.success(), "iopf host failed: {status:?}\n{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));

    // The VMM's side: every device accounted for once; each group it saw answered once, Success
    // (every page of direct.toml lies in its guest memory), and taken by the response queue.
    let ids: BTreeSet<u32> = accounts.iter().map(|a| a.device).collect();
    assert_eq!(ids.len(), DEVICES, "accounts of {ids:?}");
    for a in &accounts {
        assert!(a.groups > 0, "device {} saw no group", a.device);
        assert_eq!(
            (a.success, a.invalid, a.dropped),
            (a.groups, 0, 0),
            "device {}",
            a.device
        );
        assert_eq!(a.responses, a.groups, "device {}", a.device);
        assert_eq!(a.unrecoverable, 0, "device {}", a.device);
    }

    // The host's side: the same groups, per device and in all; all answered by the guest,
    // none by the host, none refused; every access completed.
    let groups: u64 = accounts.iter().map(|a| a.groups).sum();
    let core = &report["core"];
    assert_eq!(n(&report["unanswered_groups"]), 0, "{core}");
    assert_eq!(n(&report["groups"]), groups, "{core}");
    assert_eq!(n(&core["groups_delivered"]), groups, "{core}");
    assert_eq!(n(&core["responses"]["guest"]["success"]), groups, "{core}");
    for (kind, counts) in [
        ("auto", &core["responses"]["auto"]),
        ("refused", &core["refused"]),
    ] {
        let total: u64 = counts.as_object().unwrap().values().map(n).sum();
        assert_eq!(total, 0, "{kind}: {counts}");
    }
    let per_device = report["devices"].as_array().unwrap();
    assert_eq!(per_device.len(), DEVICES);
    for d in per_device {
        let id = u32::try_from(n(&d["device"])).unwrap();
        let a = accounts.iter().find(|a| a.device == id).unwrap();
        assert_eq!(n(&d["core"]["groups"]), a.groups, "device {id}");
        assert_eq!(n(&d["core"]["page_requests"]), a.requests, "device {id}");
    }
    let accesses = DEVICES as u64 * 2 * ACCESSES;
    assert_eq!(n(&report["accesses"]), accesses);
    assert_eq!(n(&report["completed"]), accesses);
    assert_eq!(n(&report["dma_bytes_mismatched"]), 0);
}
