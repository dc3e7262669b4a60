//! `iopf bench`: parses the flags and prints; the measuring is in `iopf-bench`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

/// Options of `iopf bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Rounds per figure; each figure is the median of its rounds.
    #[arg(long, default_value_t = iopf_bench::DEFAULT_ROUNDS,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Records per shared-memory stream; every other count derives from it.
    #[arg(long, default_value_t = iopf_bench::DEFAULT_RECORDS,
          value_parser = clap::value_parser!(u64).range(1000..=1_000_000_000))]
    records: u64,
    /// Tiny sizes, for a smoke test (the figures mean nothing).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Measure only these figures (JSON names, comma-separated; `scaling` or
    /// `scaling_devices`, `scaling_pasids`, `scaling_pending`; `vmm_loop`; `real_path`), each with its
    /// limit: for profiling one of them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// Options of the peer process (started by `iopf bench`).
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// The host's control socket.
    #[arg(long)]
    socket: PathBuf,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut config = iopf_bench::Config::new()?;
    config.rounds = args.rounds;
    config.records = args.records;
    config.quick = args.quick;
    config.only = (!args.only.is_empty()).then_some(args.only);
    config.stop = crate::stop::flag();
    let report = match iopf_bench::run(&config) {
        Err(iopf_bench::BenchError::Interrupted) => {
            // Stopped between figures; the peer is stopped and reaped. Figures are medians
            // over every round: a partial run has none to give.
            let signal = crate::stop::signal();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "interrupted": true, "signal": signal })
                );
            } else {
                println!(
                    "iopf bench: INTERRUPTED by {}: no figures",
                    signal.unwrap_or("a signal")
                );
            }
            return Ok(());
        }
        other => other.context("cannot run the benchmarks")?,
    };
    if args.json {
        println!("{}", report.to_json()?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

pub fn peer(args: PeerArgs) -> anyhow::Result<()> {
    iopf_bench::peer(&args.socket).context("the benchmark peer failed")
}
