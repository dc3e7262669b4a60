//! The edges a user touches first, with the real binary: what `iopf host --socket` does to
//! whatever is at the path (a file, a live host's socket, a dead host's socket, its own socket
//! when it exits), and `iopf vmm` against a server that accepts and never answers.

#[path = "../../../tests-support/temp_path.rs"]
mod temp_path;
use temp_path::TempPath;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn iopf() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iopf"))
}

/// Kills the child if the test fails before it ends.
struct Reaper(Option<Child>);

impl Reaper {
    fn spawn(command: &mut Command) -> Self {
        Self(Some(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    }

    fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    fn running(&mut self) -> bool {
        self.0.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits (bounded) for the child to exit and returns its output.
    fn finish(mut self, what: &str, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        while self.running() {
            assert!(
                Instant::now() < deadline,
                "{what} did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn dir(name: &str) -> TempPath {
    TempPath::new(&format!("edges-{name}"), "")
}

fn host(socket: &Path, args: &[&str]) -> Reaper {
    Reaper::spawn(
        iopf()
            .arg("host")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .arg("--json"),
    )
}

/// Waits until something accepts connections at `path`.
fn wait_listening(path: &Path, host: &mut Reaper) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(path).is_err() {
        assert!(host.running(), "the host exited before binding");
        assert!(
            Instant::now() < deadline,
            "nothing listens at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// Catches: `iopf host --socket` removing whatever is at the path (a user's file).
#[test]
fn a_regular_file_at_the_socket_path_survives_and_the_host_says_why_it_stops() {
    let dir = dir("file");
    let path = dir.join("notes.txt");
    std::fs::write(&path, "my notes\n").unwrap();
    let out = host(&path, &[]).finish("iopf host", Duration::from_secs(20));
    assert!(!out.status.success(), "the host started over a file");
    let message = stderr(&out);
    assert!(
        message.contains(&*path.to_string_lossy()) && message.contains("not a socket"),
        "{message}"
    );
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "my notes\n");
}

// Catches: a second `iopf host` unlinking a running host's socket and taking the path (the
// first host would then serve nobody, silently).
#[test]
fn a_live_hosts_socket_is_not_taken_by_a_second_host() {
    let dir = dir("live");
    let path = dir.join("host.sock");
    let mut first = host(&path, &[]);
    wait_listening(&path, &mut first);
    let before = std::fs::symlink_metadata(&path).unwrap();
    let out = host(&path, &[]).finish("the second iopf host", Duration::from_secs(20));
    assert!(!out.status.success(), "the second host started");
    let message = stderr(&out);
    assert!(
        message.contains(&*path.to_string_lossy())
            && message.contains("is in use by another process"),
        "{message}"
    );
    let after = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(
        (after.dev(), after.ino()),
        (before.dev(), before.ino()),
        "the first host's socket was replaced"
    );
    assert!(first.running(), "the first host {} died", first.id());
}

// Catches: a host that refuses a dead host's socket (the user would have to remove it by hand
// after every crash), or leaves its own socket behind when it exits.
#[test]
fn a_stale_socket_is_replaced_and_the_host_removes_its_socket_when_it_exits() {
    let dir = dir("stale");
    let path = dir.join("host.sock");
    // A dead host's socket: bound, its listener closed, the path left.
    drop(UnixListener::bind(&path).unwrap());
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let mut h = host(&path, &["--devices", "1", "--accesses", "20"]);
    wait_listening(&path, &mut h);
    let vmm = Reaper::spawn(
        iopf()
            .args(["vmm", "--devices", "1", "--socket"])
            .arg(&path),
    );
    let out = h.finish("iopf host", Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    let vmm = vmm.finish("iopf vmm", Duration::from_secs(30));
    assert!(vmm.status.success(), "{}", stderr(&vmm));
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "the host left its socket at {}",
        path.display()
    );
}

/// Accepts connections at `path` and holds them, never reading or writing, until the test
/// process ends.
fn silent_server(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
}

fn vmm_against_silent_server(name: &str, extra: &[&str], limit: Duration) -> (String, Duration) {
    let dir = dir(name);
    let path = dir.join("silent.sock");
    silent_server(&path);
    let started = Instant::now();
    let out = Reaper::spawn(
        iopf()
            .args(["vmm", "--devices", "1", "--socket"])
            .arg(&path)
            .args(extra),
    )
    .finish("iopf vmm against a silent server", limit);
    assert!(!out.status.success(), "the VMM succeeded against nobody");
    (stderr(&out), started.elapsed())
}

// Catches: `iopf vmm` waiting for ever, without a word, on a server that accepts and never
// answers; or a timeout flag that is not applied.
#[test]
fn a_vmm_against_a_server_that_never_answers_fails_within_its_timeout() {
    let (message, took) =
        vmm_against_silent_server("silent-flag", &["--timeout", "1"], Duration::from_secs(8));
    assert!(
        message.contains("no reply to VFIO_USER_VERSION within 1 s"),
        "{message}"
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");
}

// Catches: a default that waits for ever (or for minutes).
#[test]
fn a_vmm_against_a_server_that_never_answers_fails_within_the_default_timeout() {
    let (message, took) = vmm_against_silent_server("silent-default", &[], Duration::from_secs(12));
    assert!(
        message.contains("no reply to VFIO_USER_VERSION within 5 s"),
        "{message}"
    );
    assert!(took >= Duration::from_secs(5), "{took:?}");
}
