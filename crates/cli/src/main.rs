//! `iopf`: the command-line front door.

use clap::{Parser, Subcommand};

mod demo;

/// Carry I/O page faults from an IOMMU to the VMM that owns the device, and the guest's page
/// responses back.
#[derive(Debug, Parser)]
#[command(name = "iopf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Push page request groups and unrecoverable faults from a host process to a VMM process
    /// through real shared-memory queues, answer them, and print what happened.
    Demo(demo::DemoArgs),
    /// The VMM side of `iopf demo` (started by it).
    #[command(hide = true)]
    DemoVmm(demo::VmmArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::host(args),
        Command::DemoVmm(args) => demo::vmm(args),
    }
}
