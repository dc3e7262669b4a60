//! A host's threads do not grow with its devices: a real `iopf host --threads N` serving 64
//! devices to a real `iopf vmm` runs N reactor threads, and besides them only its main thread
//! (progress, signals) and the stats socket's thread; `--metrics` adds the HTTP server's
//! threads, also independent of the devices. Counted from `/proc/PID/task` while the VMM is
//! attached.

mod common;
use common::{Reaper, iopf, socket_path, wait_for_socket};

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The names of the process's threads now.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Fault queue regions the VMM holds (one per attached device).
fn attached(vmm: u32) -> usize {
    std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().contains("iopf-fault-queue"))
        })
        .count()
}

/// Runs a host with `devices` devices on `threads` reactor threads (and `--metrics` if
/// `metrics`), attaches a VMM to every device, and returns the host's threads sampled while
/// all devices were attached (the largest sample).
fn host_threads(devices: u32, threads: u32, metrics: bool) -> Vec<String> {
    let (dir, socket) = socket_path("threads");
    // A slow stream, long enough to be watched (the test ends it), light enough that
    // attaching 64 devices is quick on a loaded machine.
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(
        &scenario,
        "[[device]]\n[[device.stream]]\npages = 16\naccess_len = 4096\naccesses = 100000\n\
         interval_us = 10000\n",
    )
    .unwrap();
    let mut command = iopf();
    command
        .arg("host")
        .arg("--socket")
        .arg(&socket)
        .arg("--scenario")
        .arg(&scenario)
        .args(["--devices", &devices.to_string()])
        .args(["--threads", &threads.to_string()])
        .arg("--json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if metrics {
        command.args(["--metrics", "127.0.0.1:0"]);
    }
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let host = Reaper(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("metrics: http://") {
                let _ = tx.send(url.trim_end_matches("/metrics").to_string());
            }
        }
    });
    wait_for_socket(&socket);
    let vmm = Reaper(
        iopf()
            .args(["vmm", "--devices", &devices.to_string(), "--socket"])
            .arg(&socket)
            .arg("--scenario")
            .arg(&scenario)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while attached(vmm.0.id()) < devices as usize {
        assert!(
            Instant::now() < deadline,
            "the VMM never attached every device"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    if metrics {
        // Scraped twice, one request after the other, so its server's threads exist.
        let addr = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        for _ in 0..2 {
            scrape(&addr);
        }
    }
    let mut most: Vec<String> = Vec::new();
    for _ in 0..20 {
        let now = thread_names(host.0.id());
        if now.len() > most.len() {
            most = now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(vmm);
    drop(host);
    most.sort();
    most
}

fn scrape(addr: &str) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
}

fn reactor_threads(names: &[String]) -> usize {
    names.iter().filter(|n| n.starts_with("reactor-")).count()
}

#[test]
fn sixty_four_devices_run_on_the_threads_asked_for() {
    for threads in [1, 2] {
        let names = host_threads(64, threads, false);
        assert_eq!(reactor_threads(&names), threads as usize, "{names:?}");
        // The reactor's threads, the main thread and the stats socket's: nothing per device
        // or per connection.
        assert!(names.len() <= threads as usize + 2, "{names:?}");
        assert!(names.iter().any(|n| n == "iopf-stats"), "{names:?}");
    }
}

#[test]
fn metrics_add_a_fixed_number_of_threads() {
    let few = host_threads(4, 1, true);
    let many = host_threads(64, 1, true);
    for names in [&few, &many] {
        assert_eq!(reactor_threads(names), 1, "{names:?}");
        assert!(names.iter().any(|n| n == "iopf-metrics"), "{names:?}");
    }
    // The HTTP server's threads (its own, its acceptor, its request pool) do not grow with
    // the devices.
    assert_eq!(few.len(), many.len(), "{few:?} vs {many:?}");
}
