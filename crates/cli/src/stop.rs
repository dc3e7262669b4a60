//! Stop requests and exit codes, for every subcommand.
//!
//! `SIGINT` and `SIGTERM` only set a flag (`signal-hook`); the main loops check [`requested`],
//! stop their work (the host unregisters every device, so pending groups are answered), print
//! what they have marked interrupted, and return normally, so every destructor runs: children
//! are stopped and reaped ([`Reaper`]), temporary directories removed. A process started by
//! another `iopf` (a VMM of `iopf run`, a bench peer) ignores `SIGINT`, which a Ctrl-C sends to
//! the whole process group: its parent decides when it stops (with `SIGTERM`).
//!
//! Exit codes (README, `iopf --help`): see [`EXIT_CODES`].

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

pub(crate) use iopf_bench::child::{Reaper, command};

/// The exit codes, as `iopf --help` prints them.
pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    error: the command could not run (or its child process failed)
  2    usage error
  3    the run finished, but an invariant failed (a group left unanswered, guest memory that
       differs from what DMA wrote, a response for no group in flight, groups still pending,
       a soak whose memory or fds grew)
  130  interrupted by SIGINT (Ctrl-C): stopped cleanly, partial summary printed
  143  interrupted by SIGTERM: stopped cleanly, partial summary printed";

/// The flags the handlers set.
#[derive(Debug, Default)]
struct Flags {
    sigint: Arc<AtomicBool>,
    sigterm: Arc<AtomicBool>,
    any: Arc<AtomicBool>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Installs the handlers. `checked`: this command checks [`requested`] (else `SIGTERM` keeps
/// its default action, ending the process at once). `managed`: this process was started by
/// another `iopf`, which stops it; `SIGINT` is then ignored.
pub(crate) fn install(checked: bool, managed: bool) -> std::io::Result<()> {
    let flags = FLAGS.get_or_init(Flags::default);
    // A second signal while stopping (a stop that hangs, an impatient user) exits at once:
    // registered first, it sees the flag the first signal set. Children still die with this
    // process (`die_with_parent`); the temporary directory is then left behind.
    if checked {
        signal_hook::flag::register_conditional_shutdown(SIGTERM, 143, flags.any.clone())?;
        if !managed {
            signal_hook::flag::register_conditional_shutdown(SIGINT, 130, flags.any.clone())?;
        }
        signal_hook::flag::register(SIGTERM, flags.sigterm.clone())?;
        signal_hook::flag::register(SIGTERM, flags.any.clone())?;
    }
    if managed {
        // Ignored: the flag is never read.
        signal_hook::flag::register(SIGINT, Arc::new(AtomicBool::new(false)))?;
    } else if checked {
        signal_hook::flag::register(SIGINT, flags.sigint.clone())?;
        signal_hook::flag::register(SIGINT, flags.any.clone())?;
    }
    Ok(())
}

/// The flag set when a stop is asked for (to hand to a library).
pub(crate) fn flag() -> Arc<AtomicBool> {
    FLAGS.get_or_init(Flags::default).any.clone()
}

/// Whether a stop was asked for.
pub(crate) fn requested() -> bool {
    FLAGS
        .get()
        .is_some_and(|flags| flags.any.load(Ordering::Relaxed))
}

/// The signal that asked for the stop, by name (`SIGINT` first if both came).
pub(crate) fn signal() -> Option<&'static str> {
    let flags = FLAGS.get()?;
    if flags.sigint.load(Ordering::Relaxed) {
        Some("SIGINT")
    } else if flags.sigterm.load(Ordering::Relaxed) {
        Some("SIGTERM")
    } else {
        None
    }
}

/// An invariant of the run failed (exit code 3): the run finished, its result is wrong.
#[derive(Debug)]
pub(crate) struct Invariant(pub(crate) String);

impl std::fmt::Display for Invariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invariant {}

/// The exit code of a command that returned `result`, printing its error.
pub(crate) fn exit(result: anyhow::Result<()>) -> ExitCode {
    if let Err(e) = &result {
        eprintln!("Error: {e:?}");
    }
    ExitCode::from(code(&result, signal()))
}

/// The exit code of `result`, after a stop by `signal` (if any). Interrupted wins: whatever
/// failed after the stop was asked for, the user stopped the run.
fn code(result: &anyhow::Result<()>, signal: Option<&str>) -> u8 {
    match (signal, result) {
        (Some("SIGINT"), _) => 130,
        (Some(_), _) => 143,
        (None, Ok(())) => 0,
        (None, Err(e)) if e.downcast_ref::<Invariant>().is_some() => 3,
        (None, Err(_)) => 1,
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn exit_codes() {
        let invariant = || -> anyhow::Result<()> {
            Err(anyhow::Error::new(Invariant(
                "3 groups left unanswered".into(),
            )))
            .context("the run")
        };
        let error = || -> anyhow::Result<()> { Err(anyhow::anyhow!("bind the socket")) };
        assert_eq!(code(&Ok(()), None), 0);
        assert_eq!(code(&error(), None), 1);
        assert_eq!(code(&invariant(), None), 3);
        assert_eq!(code(&Ok(()), Some("SIGINT")), 130);
        assert_eq!(code(&invariant(), Some("SIGTERM")), 143);
        assert_eq!(code(&error(), Some("SIGINT")), 130);
    }
}
