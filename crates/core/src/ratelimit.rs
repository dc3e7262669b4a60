//! Rate-limited logging: a hostile peer must not be able to flood the host's log.

use crate::clock::Nanos;

const WINDOW: Nanos = 1_000_000_000;
const PER_WINDOW: u32 = 10;

/// Allows [`PER_WINDOW`] messages per second, then stays quiet until the next second.
#[derive(Debug)]
pub(crate) struct RateLimit {
    window_start: Nanos,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub(crate) fn new() -> Self {
        Self {
            window_start: 0,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether a message may be logged at `now`.
    pub(crate) fn allow(&mut self, now: Nanos) -> bool {
        if now.saturating_sub(self.window_start) >= WINDOW {
            if self.suppressed > 0 {
                tracing::warn!(suppressed = self.suppressed, "log messages suppressed");
            }
            self.window_start = now;
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < PER_WINDOW {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_ten_per_second() {
        let mut r = RateLimit::new();
        let allowed = (0..100).filter(|_| r.allow(5)).count();
        assert_eq!(allowed, 10);
        assert!(r.allow(5 + WINDOW));
    }

    #[test]
    fn counts_what_it_suppresses_until_the_next_second() {
        let mut r = RateLimit::new();
        let allowed = (0..15).filter(|_| r.allow(5)).count();
        assert_eq!((allowed, r.suppressed), (10, 5));
        assert!(r.allow(5 + WINDOW));
        assert_eq!(r.suppressed, 0, "reported, and counted afresh");
    }
}
