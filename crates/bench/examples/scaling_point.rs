//! One scaling point of `iopf bench`, repeated, for a profiler:
//! `scaling_point DEVICES PASIDS PENDING GROUPS [REPEAT]` prints nanoseconds per group.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let [devices, pasids, pending, groups, ref rest @ ..] = args[..] else {
        return Err("usage: scaling_point DEVICES PASIDS PENDING GROUPS [REPEAT]".into());
    };
    let repeat = rest.first().copied().unwrap_or(1);
    for _ in 0..repeat {
        let ns = iopf_bench::scaling_cost(devices as usize, pasids, pending as usize, groups)?;
        println!("{devices} devices, {pasids} PASIDs, {pending} pending: {ns:.0} ns per group");
    }
    Ok(())
}
