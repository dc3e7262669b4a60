//! `iopf sim`: the deterministic simulation of the whole loop, one seeded run or a sweep.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use iopf_sim::{SimConfig, SimReport, run};

/// Which preset to run.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SimPreset {
    /// Two devices, a well-behaved guest, no chaos.
    Clean,
    /// VMM restarts, unregister and register, stale responses replayed.
    Restarts,
    /// Rings too small for the traffic, a device issuing beyond its allocation.
    Overflow,
    /// A guest that answers late, twice, with forged and stale cookies, or never.
    Hostile,
    /// Short runs with chaos drawn from the seed (what `--sweep` runs).
    Chaotic,
    /// Stale responses built to collide: PRG indices reused at once, handler lives cut short,
    /// past lives' answers replayed when the device reuses their PASID and PRG index.
    StaleCollisions,
    /// A VMM that writes some of its guest's answers into the other device's response queue,
    /// with PASIDs and PRG indices that coincide across the devices.
    Crosstalk,
    /// VMMs that write a consumer index past anything published into their fault queue, and
    /// then stop reading for a while, under rings of 4 entries.
    LyingIndex,
}

/// Options of `iopf sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// The preset.
    #[arg(long, value_enum, default_value_t = SimPreset::Chaotic)]
    scenario: SimPreset,
    /// The seed (the first seed of a sweep).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run this many consecutive seeds and report the ones that break an invariant.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    sweep: Option<u64>,
    /// Print the report of a single run as JSON.
    #[arg(long)]
    json: bool,
}

fn config(scenario: SimPreset, seed: u64) -> SimConfig {
    match scenario {
        SimPreset::Clean => SimConfig::clean(seed),
        SimPreset::Restarts => SimConfig::restarts(seed),
        SimPreset::Overflow => SimConfig::overflow(seed),
        SimPreset::Hostile => SimConfig::hostile(seed),
        SimPreset::Chaotic => SimConfig::chaotic(seed),
        SimPreset::StaleCollisions => SimConfig::stale_collisions(seed),
        SimPreset::Crosstalk => SimConfig::crosstalk(seed),
        SimPreset::LyingIndex => SimConfig::lying_index(seed),
    }
}

pub fn main(args: SimArgs) -> anyhow::Result<()> {
    let Some(count) = args.sweep else {
        let report = run(config(args.scenario, args.seed)).context("the simulation failed")?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_report(&report);
        }
        if !report.ok() {
            bail!("seed {} broke an invariant", report.seed);
        }
        return Ok(());
    };
    let mut failed = Vec::new();
    let started = std::time::Instant::now();
    for seed in args.seed..args.seed.saturating_add(count) {
        let report = run(config(args.scenario, seed)).context("the simulation failed")?;
        if !report.ok() {
            eprintln!("seed {seed}: {}", report.violations.join("; "));
            failed.push(seed);
        }
    }
    println!(
        "{count} seeds from {} ({:?}) in {:.1} s: {} broke an invariant",
        args.seed,
        args.scenario,
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!("failing seeds: {failed:?} (replay one with --seed N)");
    }
    Ok(())
}

fn print_report(r: &SimReport) {
    let c = &r.core;
    let e = &r.endpoints;
    let a = &c.responses.auto;
    println!(
        "seed {}: {} events, {:.3} ms of virtual time, trace {:016x}",
        r.seed,
        r.events,
        r.end_ns as f64 / 1e6,
        r.trace_hash
    );
    println!(
        "device  {} accesses: {} done, {} failed (invalid {}, no PRI {}, retries {}, too large {}, halted {})",
        e.accesses,
        e.completed,
        e.accesses - e.completed,
        e.failed_invalid,
        e.failed_no_pri,
        e.failed_retries,
        e.failed_too_large,
        e.failed_halted
    );
    println!(
        "        {} page requests in {} groups; {} retries after Success; {} UPRGI",
        e.page_requests, e.groups, e.retries, e.unexpected
    );
    println!(
        "host    {} groups delivered; guest answered {} success / {} invalid; refused {}",
        c.groups_delivered,
        c.responses.guest.success,
        c.responses.guest.invalid,
        c.refused_total()
    );
    println!(
        "        auto-answered: {} queue full, {} no handler, {} not attached, {} unregister, {} VMM gone, {} timeout, {} pending limit",
        a.queue_full,
        a.no_handler,
        a.not_attached,
        a.unregister,
        a.vmm_gone,
        a.timeout,
        a.pending_limit
    );
    let g = &r.guests;
    println!(
        "guest   {} groups, {} pages mapped; sent {} duplicates, {} forged, {} stale; {} silent, {} late",
        g.groups, g.mapped, g.duplicates, g.forged, g.stale, g.silent, g.late
    );
    if r.stale_replayed > 0 {
        println!(
            "        {} past lives' answers replayed to collide with a group of the new life",
            r.stale_replayed
        );
    }
    if r.lies > 0 {
        println!("        {} consumer indices lied about by a VMM", r.lies);
    }
    if r.misdirected > 0 {
        println!(
            "        {} answers written into another device's response queue",
            r.misdirected
        );
    }
    println!(
        "memory  {} bytes verified, {} differ; {} DMA bytes written, {} read",
        r.memory.bytes_verified, r.memory.bytes_mismatched, e.bytes_written, e.bytes_read
    );
    if r.ok() {
        println!("verdict: every invariant held");
    } else {
        println!("verdict: {} violations", r.violations.len());
        for v in &r.violations {
            println!("  {v}");
        }
    }
}
