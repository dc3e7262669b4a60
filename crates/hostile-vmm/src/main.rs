//! `iopf-hostile-vmm`: a VMM that attaches one device of an `iopf host` and then misbehaves
//! in one chosen way, for the hostile-VMM process suite (`crates/cli/tests/hostile_vmm.rs`).
//! Test support only: it is not part of the `iopf` binary and is never published.
#![forbid(unsafe_code)]

use clap::Parser;

mod hostile;

/// Attach one device of an `iopf host` and misbehave in one chosen way.
#[derive(Debug, Parser)]
#[command(name = "iopf-hostile-vmm", version, about)]
struct Cli {
    #[command(flatten)]
    args: hostile::HostileArgs,
}

fn main() -> anyhow::Result<()> {
    hostile::main(Cli::parse().args)
}
