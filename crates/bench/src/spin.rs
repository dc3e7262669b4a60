//! Busy waiting on the other process, and CPU pinning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

use crate::error::{BenchError, Result};

/// Both processes share one CPU: a busy waiter must yield, or it burns its whole time slice
/// before the other side can run.
static SHARE_CPU: AtomicBool = AtomicBool::new(false);

/// How long any one measurement may wait for the other side before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

/// A busy wait with a deadline: [`relax`](Self::relax) in every empty poll.
pub(crate) struct Waiter {
    what: &'static str,
    polls: u32,
    deadline: Option<Instant>,
}

impl Waiter {
    /// A waiter for one measurement (its deadline starts at the first long wait).
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            polls: 0,
            deadline: None,
        }
    }

    /// One empty poll: a pause (or a yield when the peer shares our CPU), and every 64 Ki
    /// polls a look at the clock.
    #[inline]
    pub(crate) fn relax(&mut self) -> Result<()> {
        self.polls = self.polls.wrapping_add(1);
        if SHARE_CPU.load(Ordering::Relaxed) {
            std::thread::yield_now();
        } else {
            core::hint::spin_loop();
        }
        if self.polls & 0xffff == 0 {
            let now = Instant::now();
            match self.deadline {
                None => self.deadline = Some(now + PATIENCE),
                Some(deadline) if now > deadline => return Err(BenchError::Timeout(self.what)),
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Where the two processes run.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// CPU of the host side (this process), if pinned.
    pub(crate) host: Option<usize>,
    /// CPU of the peer process, if pinned.
    pub(crate) peer: Option<usize>,
    /// CPUs this process may run on.
    pub(crate) cpus: usize,
}

impl Placement {
    /// Picks the first two CPUs this process may use; with fewer, no pinning.
    pub(crate) fn choose() -> Result<Self> {
        let set = sched_getaffinity(None).map_err(BenchError::io("sched_getaffinity"))?;
        let allowed: Vec<usize> = (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect();
        let placement = match allowed[..] {
            [host, peer, ..] => Self {
                host: Some(host),
                peer: Some(peer),
                cpus: allowed.len(),
            },
            _ => Self {
                host: None,
                peer: None,
                cpus: allowed.len(),
            },
        };
        SHARE_CPU.store(placement.host.is_none(), Ordering::Relaxed);
        Ok(placement)
    }

    /// A line for the report.
    pub(crate) fn describe(&self) -> String {
        match (self.host, self.peer) {
            (Some(h), Some(p)) => format!("host pinned to CPU {h}, peer to CPU {p}"),
            _ => format!(
                "{} CPU available: not pinned, both processes share it (busy polls yield)",
                self.cpus
            ),
        }
    }
}

/// Pins the calling thread to `cpu` (`None`: leaves it alone and makes busy waits yield).
pub(crate) fn pin(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else {
        SHARE_CPU.store(true, Ordering::Relaxed);
        return Ok(());
    };
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).map_err(BenchError::io("sched_setaffinity"))
}
