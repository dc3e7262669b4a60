//! One point of `iopf bench`'s VMM event loop figure, repeated, for a profiler:
//! `vmm_loop_point DEVICES GROUPS [REPEAT]` prints the VMM thread's CPU nanoseconds per group.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let [devices, groups, ref rest @ ..] = args[..] else {
        return Err("usage: vmm_loop_point DEVICES GROUPS [REPEAT]".into());
    };
    let repeat = rest.first().copied().unwrap_or(1);
    for _ in 0..repeat {
        let ns = iopf_bench::vmm_loop_cost(usize::try_from(devices)?, groups)?;
        println!("{devices} devices: {ns:.0} ns of VMM CPU per group");
    }
    Ok(())
}
