//! Log output: the libraries report through `tracing`; the binary writes their events to
//! stderr, filtered by `RUST_LOG` (warnings and errors when it is unset).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the subscriber. `RUST_LOG=debug` shows the handler life (register, unregister,
/// reset, attach) with each device's number; a `RUST_LOG` that does not parse is reported and
/// the default (`warn`) used.
pub fn init() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("iopf: ignoring RUST_LOG={spec:?} ({e}); logging warnings");
            EnvFilter::new("warn")
        }),
        _ => EnvFilter::new("warn"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never in a file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
