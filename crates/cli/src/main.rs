//! `iopf`: the command-line front door.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod inspect;
mod logging;
mod outcome;
mod report;
mod run;
mod scenario;
mod sim;
mod soak;
mod stop;
mod watch;

/// Carry I/O page faults from an IOMMU to the VMM that owns the device, and the guest's page
/// responses back.
#[derive(Debug, Parser)]
#[command(name = "iopf", version, about, after_help = stop::EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: a host serving simulated devices over vfio-user and a VMM process
    /// attaching to them, a workload run to completion, and a summary.
    Run(run::RunArgs),
    /// Serve simulated devices over vfio-user on a socket until their workloads finish.
    Host(run::HostArgs),
    /// Attach to a host's devices over vfio-user and answer their page requests.
    Vmm(run::VmmArgs),
    /// Push page request groups and unrecoverable faults from a host process to a VMM process
    /// through real shared-memory queues, answer them, and print what happened.
    Demo(demo::DemoArgs),
    /// The VMM side of `iopf demo` (started by it).
    #[command(hide = true)]
    DemoVmm(demo::DemoVmmArgs),
    /// Measure the fault path against the machine's limits and the baselines, in one run.
    Bench(bench::BenchArgs),
    /// Decode a queue region (a saved image, or a live memfd as /proc/PID/fd/N): its pages,
    /// indices, counters and pending records; or, with --socket, a running host's live view.
    Inspect(inspect::InspectArgs),
    /// Run the deterministic simulation of the whole loop (device, IOMMU, fault core, rings,
    /// VMM, guest) for one seed, or sweep many seeds.
    Sim(sim::SimArgs),
    /// The peer process of `iopf bench` (started by it).
    #[command(hide = true)]
    BenchPeer(bench::PeerArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init();
    stop::exit(command(cli.command))
}

fn command(command: Command) -> anyhow::Result<()> {
    // Started by another `iopf` (a VMM of `iopf run`, the bench peer): die with it.
    let managed = iopf_bench::child::die_with_parent().context("watch the parent process")?;
    // The commands that stop cleanly on SIGINT and SIGTERM; the others keep the default
    // actions (a peer process that is stopped is killed).
    let checked = matches!(
        command,
        Command::Run(_) | Command::Host(_) | Command::Vmm(_) | Command::Demo(_) | Command::Bench(_)
    );
    stop::install(checked, managed).context("install the signal handlers")?;
    raise_fd_limit();
    match command {
        Command::Run(args) => run::run(args),
        Command::Host(args) => run::host(args),
        Command::Vmm(args) => run::vmm(args),
        Command::Demo(args) => demo::host(args),
        Command::DemoVmm(args) => demo::vmm(args),
        Command::Bench(args) => bench::run(args),
        Command::Sim(args) => sim::main(args),
        Command::Inspect(args) => inspect::main(args),
        Command::BenchPeer(args) => bench::peer(args),
    }
}

/// Raises the soft limit on open fds to the hard one: a host or VMM with a thousand devices
/// holds several fds per device (socket, two queue memfds, doorbells, guest memory), past
/// the usual soft limit of 1024.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            // Not fatal: small runs need no more fds than the soft limit.
            tracing::warn!(error = %e, "cannot raise the open-fd limit");
        }
    }
}
