//! The toy device of `examples/pri_device.rs` and the `minimal` VMM of `iopf-vmm`, each in
//! its own process over a real socket: the device (this test binary run again as a child,
//! serving `pri_device::run`) asks for every page of its buffer, the VMM enables PRI and Bus
//! Master through config space, maps guest memory and answers every group `Success`, and both
//! end cleanly once the device has written every page.

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iopf_vfio_user::DmaProt;
use vm_memory::GuestRegionMmap;

#[allow(dead_code)]
#[path = "../examples/pri_device.rs"]
mod pri_device;

#[allow(dead_code)]
#[path = "../../vmm/examples/minimal.rs"]
mod minimal;

/// Where the child learns its socket.
const SOCKET_VAR: &str = "IOPF_PRI_DEVICE_SOCKET";
const PAGES: u64 = 96;

/// The device's process: run by `the_device_and_the_minimal_vmm_finish_in_two_processes`.
#[test]
#[ignore = "the device process of the_device_and_the_minimal_vmm_finish_in_two_processes"]
fn device_process() {
    let socket = std::env::var(SOCKET_VAR).expect("run by the pair test");
    let summary = pri_device::run(socket.as_ref(), PAGES).unwrap();
    println!(
        "device: {} written, {} requests, {} invalid",
        summary.success, summary.requests, summary.invalid
    );
}

// Catches: a device whose fault regions, config space or page requests a VMM on the public
// library cannot use: the VMM finds no PRI to enable, a group is lost or answered twice, the
// device never sees its answers, or either side does not end.
#[test]
fn the_device_and_the_minimal_vmm_finish_in_two_processes() {
    let dir = TempPath::new("pri-device", "");
    let socket = dir.join("dev.sock");
    let mut device = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "device_process", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(SOCKET_VAR, &socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the device did not bind its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The VMM: one device, guest memory at 0, answers from its vIOMMU.
    let mut vmm = minimal::Vmm::new().unwrap();
    let rw = |_: &GuestRegionMmap| DmaProt::READ | DmaProt::WRITE;
    minimal::attach_all(&mut vmm, &socket, Some(1), minimal::guest_memory, rw).unwrap();
    let accounts = vmm.run().unwrap();
    let [account] = &accounts[..] else {
        panic!("{accounts:?}")
    };
    assert_eq!(
        (
            account.requests,
            account.groups,
            account.success,
            account.invalid
        ),
        (PAGES, PAGES, PAGES, 0),
        "{account}"
    );
    assert_eq!((account.dropped, account.unrecoverable), (0, 0));
    // The device wrote every page and ended; its socket is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = device.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            device.kill().unwrap();
            panic!("the device still runs after its VMM left");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    device
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{status}: {out}");
    let line = format!("device: {PAGES} written, {PAGES} requests, 0 invalid");
    assert!(out.contains(&line), "{out}");
    assert!(!socket.exists());
}
