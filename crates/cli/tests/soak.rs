//! `iopf run --duration`: a short soak with chaos every second (VMM killed and restarted,
//! handlers unregistered) whose memory and fd count stay flat, and its argument checks. The
//! leak check's rule itself, and that it fails on a leak, is unit-tested in `src/soak.rs`.

use std::process::Command;

fn iopf() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iopf"))
}

#[test]
fn a_short_soak_with_chaos_every_second_stays_flat_and_loses_nothing() {
    let tmp = tempfile::TempDir::new().unwrap();
    let out = iopf()
        .args(["run", "--duration", "8s", "--chaos-every", "1s", "--json"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "the soak left in TMPDIR: {left:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let soak = &r["soak"];
    assert_eq!(soak["verdict"], "pass", "{soak:#}");
    assert_eq!(soak["failures"].as_array().unwrap().len(), 0, "{soak:#}");
    // Chaos happened, also between the two measuring windows.
    assert!(soak["vmm_restarts"].as_u64().unwrap() >= 3, "{soak:#}");
    assert!(soak["unregisters"].as_u64().unwrap() >= 3, "{soak:#}");
    assert!(
        soak["between_windows"]["vmm_restarts"].as_u64().unwrap() >= 1,
        "{soak:#}"
    );
    assert!(
        soak["between_windows"]["unregisters"].as_u64().unwrap() >= 1,
        "{soak:#}"
    );
    assert_eq!(r["vmm_restarts"], soak["vmm_restarts"]);
    // The figures the verdict rests on are there, for the host and the VMM.
    for process in ["host", "vmm"] {
        for at in ["first", "after_warmup", "max", "end", "last"] {
            let s = &soak[process][at];
            assert!(s["fds"].as_u64().unwrap() > 0, "{process} {at}: {soak:#}");
            assert!(
                s["rss_kib"].as_u64().unwrap() > 0,
                "{process} {at}: {soak:#}"
            );
        }
        assert_eq!(
            soak[process]["after_warmup"]["fds"], soak[process]["end"]["fds"],
            "{process}: {soak:#}"
        );
    }
    // The run's own invariants, over the whole soak.
    assert_eq!(r["unanswered_groups"], 0, "{r:#}");
    assert_eq!(r["dma_bytes_mismatched"], 0, "{r:#}");
    assert!(r["groups"].as_u64().unwrap() > 1000, "{r:#}");
    assert_eq!(
        r["accesses"],
        r["completed"].as_u64().unwrap() + r["failed"].as_u64().unwrap()
    );
    assert!(
        r["core"]["responses"]["auto"]["vmm_gone"]
            .as_u64()
            .is_some()
    );
    assert!(r["elapsed_s"].as_f64().unwrap() >= 8.0);
}

#[test]
fn soak_arguments_get_clear_errors() {
    for (args, needle) in [
        (&["--duration", "10"][..], "missing unit"),
        (&["--duration", "10 parsecs"], "unknown unit"),
        (&["--duration", "2s"], "5s..=7d"),
        (
            &["--duration", "10s", "--chaos-every", "50ms"],
            "at least 200ms",
        ),
        (&["--chaos-every", "1s"], "--duration"),
        (
            &[
                "--duration",
                "10s",
                "--chaos-every",
                "1s",
                "--scenario",
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../scenarios/unregister.toml"
                ),
            ],
            "its own [[chaos]]",
        ),
    ] {
        let out = iopf().arg("run").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
