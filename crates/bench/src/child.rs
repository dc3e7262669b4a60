//! Child processes that never outlive their parent, for every `iopf` command that starts one
//! (`iopf run`'s VMMs, `iopf demo`'s VMM, `iopf bench`'s peer).
//!
//! The parent starts a child with [`command`], which names the parent in the child's
//! environment ([`PARENT_ENV`]), and keeps it in a [`Reaper`]: dropped (on success, on an error,
//! or while unwinding after a stop signal) it stops the child and reaps it. The child calls
//! [`die_with_parent`] first thing: the kernel then kills it when its parent dies, even by
//! `SIGKILL`, when no destructor runs (`PR_SET_PDEATHSIG`).

use std::ffi::OsStr;
use std::io;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use thiserror::Error;

/// The environment variable through which a parent names itself (its pid) to its child.
pub const PARENT_ENV: &str = "IOPF_PARENT_PID";

/// How long [`Reaper::stop`] waits after `SIGTERM` before it sends `SIGKILL`.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// A command for `program` that the child knows to be started by this process: stdin is
/// `/dev/null`, and [`PARENT_ENV`] holds this process's pid.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .env(PARENT_ENV, std::process::id().to_string())
        .stdin(Stdio::null());
    command
}

/// In a child started with [`command`]: asks the kernel to `SIGKILL` this process when its
/// parent dies, then checks that the parent is still the one that started it (it may have died
/// before the request: then this fails, and the caller must exit). Returns whether this process
/// was started that way.
///
/// The kernel sends the signal when the *thread* that started the child exits: parents start
/// their children from their main thread.
pub fn die_with_parent() -> Result<bool, ParentError> {
    let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .and_then(Pid::from_raw)
    else {
        return Ok(false);
    };
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .map_err(|e| ParentError::DeathSignal(e.into()))?;
    if rustix::process::getppid() != Some(parent) {
        // The parent died between our start and the request: nobody will reap or stop us.
        return Err(ParentError::Gone(parent.as_raw_nonzero().get()));
    }
    Ok(true)
}

/// Why [`die_with_parent`] failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ParentError {
    /// `PR_SET_PDEATHSIG` failed.
    #[error("ask the kernel to end this process with its parent")]
    DeathSignal(#[source] io::Error),
    /// The parent exited before this process could ask to die with it.
    #[error("the parent process that started this one (pid {0}) has exited")]
    Gone(i32),
}

/// A child process that is stopped and reaped when dropped, so none is left behind.
#[derive(Debug)]
pub struct Reaper(Child);

impl Reaper {
    /// Starts `command` (see [`command`]).
    pub fn spawn(command: &mut Command) -> io::Result<Self> {
        command.spawn().map(Self)
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Its exit status if it has exited (then it is reaped).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.0.try_wait()
    }

    /// Waits for it to exit on its own.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.0.wait()
    }

    /// Kills it with `SIGKILL` (no goodbye: chaos) and reaps it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if self.0.try_wait()?.is_none() {
            self.0.kill()?;
        }
        self.0.wait()
    }

    /// Stops it: `SIGTERM`, and `SIGKILL` if it has not exited [`STOP_GRACE`] later; reaps it.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.0.try_wait()? {
            return Ok(status);
        }
        if let Some(pid) = Pid::from_raw(self.0.id() as i32) {
            // It cannot have been reaped (we hold it), so the pid is still its own; an error
            // means it is a zombie already, which the wait below reaps.
            if rustix::process::kill_process(pid, Signal::TERM).is_ok() {
                let deadline = Instant::now() + STOP_GRACE;
                while Instant::now() < deadline {
                    if let Some(status) = self.0.try_wait()? {
                        return Ok(status);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        self.kill()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Nothing to report to from a destructor; `stop` kills and reaps whatever it can.
        let _ = self.stop();
    }
}
