//! Stale responses built to collide with a group of the new handler life, against the real
//! fault core: every one is refused, on every seed.

use iopf_sim::{SimConfig, run};

#[test]
fn stale_collisions_are_refused_on_every_seed() {
    let mut replayed = 0;
    for seed in 0..100 {
        let r = run(SimConfig::stale_collisions(seed)).unwrap();
        assert!(r.ok(), "seed {seed}: {:#?}", r.violations);
        assert!(
            r.stale_replayed > 0,
            "seed {seed}: no stale response replayed"
        );
        // Each replay was refused (it names a cookie of a past life), never accepted.
        assert!(
            r.core.refused_total() >= r.stale_replayed,
            "seed {seed}: {r:?}"
        );
        replayed += r.stale_replayed;
    }
    eprintln!("{replayed} stale responses built to collide, all refused");
}

#[test]
fn chaotic_sweep_with_collisions_passes() {
    let mut collided = 0;
    for seed in 0..200 {
        let r = run(SimConfig::chaotic(seed)).unwrap();
        assert!(r.ok(), "seed {seed}: {:#?}", r.violations);
        collided += u32::from(r.stale_replayed > 0);
    }
    // The chaotic draw builds collisions on most seeds.
    assert!(
        collided > 100,
        "{collided}/200 seeds replayed a colliding stale response"
    );
}
