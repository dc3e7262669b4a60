//! Displaying an error with its causes, for logs and reports that have no `Caused by:` chain.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its [`source`](Error::source)s: `what failed: why:
/// why that`.
///
/// Library errors here say only what their own step did and leave the cause to `source`, so
/// a bare `{error}` in a log line would drop the cause. `tracing::warn!(error = %ErrorChain(&e))`
/// keeps it.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use iopf_abi::DecodeError;

    use super::ErrorChain;
    use crate::Refusal;

    #[test]
    fn shows_every_cause_once() {
        let refusal = Refusal::Malformed(DecodeError::ZeroCookie);
        assert_eq!(refusal.to_string(), "malformed response");
        assert_eq!(
            ErrorChain(&refusal).to_string(),
            "malformed response: cookie 0 is reserved"
        );
    }
}
