//! `iopf bench --quick --json` as a smoke test: every figure is there with a positive value
//! (and every ratio finite and positive).
//! Benchmarks are not tests: nothing here looks at how fast anything was.

use std::process::Command;

use serde_json::Value;

const FIGURES: &[&str] = &[
    "floor_pingpong_rtt",
    "ring_floor_rtt",
    "ring_floor_line_rtt",
    "ceiling_copy_stream",
    "queue_stream_busy",
    "queue_stream_blocking",
    "queue_rtt_busy",
    "queue_rtt_blocking",
    "queue_rtt_blocking_spin",
    "socketpair_rtt",
    "socketpair_stream",
    "pipe_stream",
    "e2e_rtt",
    "e2e_sustained",
];

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

#[test]
fn quick_bench_reports_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .args(["bench", "--quick", "--json"])
        .output()
        .expect("run iopf bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iopf bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));

    let figures = report["figures"].as_array().expect("figures");
    for name in FIGURES {
        let figure = figures
            .iter()
            .find(|f| f["name"] == *name)
            .unwrap_or_else(|| panic!("no figure {name} in {report}"));
        positive(&figure["value"], &format!("{name}.value"));
        positive(&figure["vs_limit"], &format!("{name}.vs_limit"));
        positive(&figure["vs_socketpair"], &format!("{name}.vs_socketpair"));
    }
    let e2e = figures
        .iter()
        .find(|f| f["name"] == "e2e_rtt")
        .expect("e2e_rtt");
    for p in ["p99_ns", "p99.9_ns", "max_ns"] {
        positive(&e2e["details"][p], &format!("e2e_rtt.{p}"));
    }

    let scaling = &report["scaling"];
    for (dimension, sizes) in [
        ("devices", &[1, 16, 256, 1024][..]),
        ("pasids", &[1, 16, 256, 4096, 65536][..]),
        ("pending", &[1, 10, 100, 1000, 10_000, 100_000][..]),
    ] {
        let series = &scaling[dimension];
        let points = series["points"].as_array().expect("scaling points");
        let ns: Vec<u64> = points.iter().map(|p| p["n"].as_u64().expect("n")).collect();
        assert_eq!(ns, sizes, "{dimension}");
        for p in points {
            positive(&p["ns_per_group"], &format!("scaling.{dimension}"));
        }
        positive(
            &series["max_over_min"],
            &format!("scaling.{dimension}.max_over_min"),
        );
    }
    // The VMM event loop figure: 1, 64 and 1,024 devices on one thread, each a ratio to the
    // 1-device point of the same round.
    let vmm_loop = &report["vmm_loop"];
    positive(&vmm_loop["groups_per_point"], "vmm_loop.groups_per_point");
    positive(&vmm_loop["window"], "vmm_loop.window");
    let points = vmm_loop["points"].as_array().expect("vmm_loop points");
    let devices: Vec<u64> = points
        .iter()
        .map(|p| p["devices"].as_u64().expect("devices"))
        .collect();
    assert_eq!(devices, [1, 64, 1024], "vmm_loop devices");
    for p in points {
        let n = &p["devices"];
        positive(&p["ns_per_group"], &format!("vmm_loop.{n}.ns_per_group"));
        positive(&p["vs_one_device"], &format!("vmm_loop.{n}.vs_one_device"));
        positive(
            &p["wall_ns_per_group"],
            &format!("vmm_loop.{n}.wall_ns_per_group"),
        );
        positive(
            &p["loop_rounds_per_group"],
            &format!("vmm_loop.{n}.loop_rounds_per_group"),
        );
        assert_eq!(
            p["rounds"].as_array().map(Vec::len),
            report["rounds"].as_u64().map(|r| r as usize),
            "vmm_loop.{n}: one cost per round"
        );
    }
    assert_eq!(
        points[0]["vs_one_device"].as_f64(),
        Some(1.0),
        "the 1-device point is the reference"
    );

    // The real path: `iopf run` at a fixed total rate over 2 and 8 devices (quick sizes), the
    // rate held, every ratio against the 2-device point.
    let real = &report["real_path"];
    positive(&real["groups_per_second"], "real_path.groups_per_second");
    let points = real["points"].as_array().expect("real_path points");
    let devices: Vec<u64> = points
        .iter()
        .map(|p| p["devices"].as_u64().expect("devices"))
        .collect();
    assert_eq!(devices, [2, 8], "real_path devices");
    for p in points {
        let n = &p["devices"];
        for field in ["groups_per_s", "p50_us", "p99_us", "p99_vs_first"] {
            positive(&p[field], &format!("real_path.{n}.{field}"));
        }
    }
    assert_eq!(points[0]["p99_vs_first"].as_f64(), Some(1.0));

    assert_eq!(
        report["targets"].as_array().map(Vec::len),
        Some(9),
        "targets"
    );
}
