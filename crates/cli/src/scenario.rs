//! Scenario files for `iopf run` and `iopf host`/`iopf vmm` (TOML): devices, PASIDs and their
//! workloads, the guest's behaviour, ring sizes, timeouts, and chaos. A scenario comes from a
//! file, so every value is checked against a bound before anything is built from it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use iopf_core::DeviceConfig;
use iopf_endpoint::HostConfig;
use iopf_endpoint::engine::Workload;
use iopf_models::endpoint::EndpointConfig;
use iopf_models::guest::GuestConfig;
use iopf_models::workload::{Pattern, Stream};
use iopf_sim::vmm_guest::GuestSetup;
use serde::Deserialize;

/// The most devices a host serves (all on its reactor's few threads).
pub const MAX_DEVICES: u32 = 1024;

/// A whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seed of the workloads and the guest.
    #[serde(default = "one")]
    pub seed: u64,
    /// Entries per queue.
    #[serde(default = "ring_entries")]
    pub ring_entries: u32,
    /// How long the guest may take before the host answers `Invalid`.
    #[serde(default = "timeout_ms")]
    pub response_timeout_ms: u64,
    /// The guest.
    #[serde(default)]
    pub guest: GuestSection,
    /// Device groups.
    #[serde(rename = "device")]
    pub devices: Vec<DeviceSection>,
    /// Chaos events.
    #[serde(default)]
    pub chaos: Vec<ChaosSection>,
    /// The host's reactor threads (`--threads`; not part of the file).
    #[serde(skip, default = "iopf_endpoint::host::default_threads")]
    pub threads: usize,
}

/// The guest behind the VMM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestSection {
    /// Shortest and longest answer latency, microseconds.
    pub latency_us: [u64; 2],
    /// Share of groups refused.
    pub refuse_rate: f64,
    /// Guest memory per device, in 4 KiB pages.
    pub pages: u64,
    /// Share of answers sent twice.
    pub duplicate_rate: f64,
    /// Share of groups followed by a forged cookie.
    pub forged_rate: f64,
    /// Share of groups followed by a stale replay.
    pub stale_rate: f64,
    /// Share of groups never answered.
    pub silent_rate: f64,
}

impl Default for GuestSection {
    fn default() -> Self {
        Self {
            latency_us: [2, 20],
            refuse_rate: 0.02,
            pages: 4096,
            duplicate_rate: 0.0,
            forged_rate: 0.0,
            stale_rate: 0.0,
            silent_rate: 0.0,
        }
    }
}

/// `count` identical devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// How many.
    #[serde(default = "one_u32")]
    pub count: u32,
    /// Outstanding Page Request Allocation.
    #[serde(default = "allocation")]
    pub allocation: u32,
    /// Their DMA streams.
    #[serde(rename = "stream")]
    pub streams: Vec<StreamSection>,
}

/// One DMA stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// PASID (none: requests without PASID).
    pub pasid: Option<u32>,
    /// `sequential`, `random` or `strided`.
    #[serde(default = "sequential")]
    pub pattern: String,
    /// Stride in bytes, for `strided`.
    #[serde(default = "stride")]
    pub stride: u64,
    /// Base IOVA of the buffer (page aligned); default `(i + 1) << 30` for the stream's index
    /// `i` in its device.
    pub iova: Option<u64>,
    /// Buffer size in pages.
    pub pages: u64,
    /// Bytes per access.
    pub access_len: u32,
    /// Writes (else reads).
    #[serde(default)]
    pub write: bool,
    /// Accesses.
    pub accesses: u32,
    /// Time between accesses, microseconds.
    #[serde(default = "one")]
    pub interval_us: u64,
}

/// A disruption of the multi-process run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosSection {
    /// When, from the start of the run.
    pub at_ms: u64,
    /// `vmm_restart`: the VMM process is killed with SIGKILL and a new one starts after
    /// `down_ms`. `unregister`: the host unregisters device `device`'s handler, and lets its
    /// VMM attach again (a new handler life) after `down_ms`.
    pub kind: String,
    /// Time without a VMM, or without a handler.
    #[serde(default)]
    pub down_ms: u64,
    /// The device (index from 0), for `unregister`.
    #[serde(default)]
    pub device: u32,
    /// Repeat the event every this many milliseconds after `at_ms` (0: once).
    #[serde(default)]
    pub every_ms: u64,
}

/// A chaos event of an `iopf run` scenario that is due (the simulation has its own,
/// `iopf_sim::ChaosEvent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunChaos {
    /// Kill the VMM; start a new one after this long.
    VmmRestart { down_ms: u64 },
    /// Unregister this device's handler; let its VMM attach again after this long.
    Unregister { device: usize, down_ms: u64 },
}

/// The scenario's chaos events on a clock, repeating ones rescheduled as they fire.
#[derive(Debug, Clone)]
pub struct ChaosClock {
    /// (next time, period or 0, event).
    events: Vec<(u64, u64, RunChaos)>,
}

impl ChaosClock {
    /// The events of `chaos` (all kinds).
    pub fn new(chaos: &[ChaosSection]) -> Self {
        let events = chaos
            .iter()
            .filter_map(|c| {
                let event = match c.kind.as_str() {
                    "vmm_restart" => RunChaos::VmmRestart { down_ms: c.down_ms },
                    "unregister" => RunChaos::Unregister {
                        device: c.device as usize,
                        down_ms: c.down_ms,
                    },
                    _ => return None,
                };
                Some((c.at_ms, c.every_ms, event))
            })
            .collect();
        Self { events }
    }

    /// Keeps only the events `keep` accepts.
    pub fn only(mut self, keep: impl Fn(&RunChaos) -> bool) -> Self {
        self.events.retain(|(_, _, e)| keep(e));
        self
    }

    /// The events due at `ms`, in time order. While `paused`, nothing fires: a repeating
    /// event skips the occurrences that fall in the pause, a one-off waits for its end.
    pub fn due(&mut self, ms: u64, paused: bool) -> Vec<RunChaos> {
        let mut fired = Vec::new();
        for (next, every, event) in &mut self.events {
            if *next > ms {
                continue;
            }
            if *every == 0 {
                if !paused {
                    fired.push((*next, *event));
                    *next = u64::MAX;
                }
                continue;
            }
            if !paused {
                fired.push((*next, *event));
            }
            // The next occurrence after `ms` (a slow tick skips, it does not pile up).
            *next += (ms - *next) / *every * *every + *every;
        }
        fired.sort_by_key(|(at, _)| *at);
        fired.into_iter().map(|(_, e)| e).collect()
    }
}

fn one() -> u64 {
    1
}
fn one_u32() -> u32 {
    1
}
fn ring_entries() -> u32 {
    256
}
fn timeout_ms() -> u64 {
    10_000
}
fn allocation() -> u32 {
    64
}
fn sequential() -> String {
    "sequential".into()
}
fn stride() -> u64 {
    12_288
}

/// PASIDs a scenario's streams may use (`0..PASIDS`); the VMM creates each one's address space.
pub const PASIDS: u32 = 64;

/// Guest memory pages a device of section `d` may need at most: the PASID directory, a
/// top-level table for requests without PASID and for each of the `PASIDS` PASIDs, and per
/// stream its buffer, its leaf tables and the table above them (each stream has a 1 GiB
/// aligned window of IOVA space).
fn guest_pages_needed(d: &DeviceSection) -> u64 {
    let streams: u64 = d
        .streams
        .iter()
        .map(|s| s.pages + s.pages.div_ceil(512) + 1)
        .sum();
    1 + 1 + u64::from(PASIDS) + streams
}

/// The scenario `iopf run` uses without `--scenario` (also `scenarios/default.toml`).
pub const DEFAULT: &str = include_str!("../../../scenarios/default.toml");

impl Scenario {
    /// Parses and checks a scenario.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let scenario: Scenario = toml::from_str(text).context("cannot parse the scenario")?;
        scenario.check()?;
        Ok(scenario)
    }

    /// Reads, parses and checks a scenario file (at most 1 MiB).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let what = || format!("cannot read scenario file {}", path.display());
        let len = std::fs::metadata(path).with_context(what)?.len();
        ensure!(
            len <= 1 << 20,
            "scenario file {} is {len} bytes; a scenario is at most 1 MiB",
            path.display()
        );
        let text = std::fs::read_to_string(path).with_context(what)?;
        Self::parse(&text).with_context(|| format!("invalid scenario file {}", path.display()))
    }

    /// Checks a scenario changed after parsing (command-line overrides).
    pub fn check_again(self) -> anyhow::Result<Self> {
        self.check()?;
        Ok(self)
    }

    fn check(&self) -> anyhow::Result<()> {
        iopf_abi::QueueGeometry::new(iopf_abi::QueueKind::Fault, self.ring_entries)?;
        ensure!(
            (1..=600_000).contains(&self.response_timeout_ms),
            "response_timeout_ms must be 1..=600000"
        );
        let g = &self.guest;
        ensure!(
            g.latency_us[0] <= g.latency_us[1] && g.latency_us[1] <= 60_000_000,
            "guest.latency_us must be [min, max] with max <= 60 s"
        );
        for (name, rate) in [
            ("refuse_rate", g.refuse_rate),
            ("duplicate_rate", g.duplicate_rate),
            ("forged_rate", g.forged_rate),
            ("stale_rate", g.stale_rate),
            ("silent_rate", g.silent_rate),
        ] {
            ensure!((0.0..=1.0).contains(&rate), "guest.{name} must be in 0..=1");
        }
        ensure!(
            (16..=262_144).contains(&g.pages),
            "guest.pages must be 16..=262144 (1 GiB)"
        );
        let devices: u32 = self.devices.iter().map(|d| d.count).sum();
        ensure!(
            (1..=MAX_DEVICES).contains(&devices),
            "1 to {MAX_DEVICES} devices in all, not {devices}"
        );
        for (i, d) in self.devices.iter().enumerate() {
            // Each device's guest memory holds its PASID directory, one top-level table per
            // address space, and for each stream its buffer with the tables that map it: the
            // guest must have room for all of it, or it refuses page requests it was meant to
            // answer and the run fails without saying why.
            let need = guest_pages_needed(d);
            ensure!(
                g.pages >= need,
                "guest.pages = {} is too small for [[device]] {i}: its streams need up to {need} \
                 pages of guest memory (buffers, page tables and the PASID directory)",
                g.pages
            );
            ensure!(
                (1..=4096).contains(&d.allocation),
                "allocation must be 1..=4096"
            );
            ensure!(
                (1..=16).contains(&d.streams.len()),
                "1 to 16 streams per device"
            );
            for s in &d.streams {
                ensure!(
                    s.pasid.is_none_or(|p| p < PASIDS),
                    "stream pasid must be below {PASIDS}"
                );
                ensure!(
                    (1..=65_536).contains(&s.pages),
                    "stream pages must be 1..=65536"
                );
                if let Some(iova) = s.iova {
                    ensure!(
                        iova.is_multiple_of(4096),
                        "stream iova {iova:#x} must be page aligned (a multiple of 4096)"
                    );
                    ensure!(
                        iova.checked_add(s.pages * 4096).is_some(),
                        "stream iova {iova:#x} with its {} pages ends beyond 2^64",
                        s.pages
                    );
                }
                ensure!(
                    (8..=65_536).contains(&s.access_len),
                    "access_len must be 8..=65536"
                );
                ensure!(
                    u64::from(s.access_len) <= s.pages * 4096,
                    "access_len = {} is longer than the stream's buffer of {} page(s) ({} bytes)",
                    s.access_len,
                    s.pages,
                    s.pages * 4096
                );
                ensure!(
                    s.accesses <= 10_000_000,
                    "at most 10,000,000 accesses per stream"
                );
                ensure!(
                    s.interval_us <= 1_000_000,
                    "interval_us must be at most 1 s"
                );
                ensure!(
                    matches!(s.pattern.as_str(), "sequential" | "random" | "strided"),
                    "pattern must be sequential, random or strided"
                );
            }
        }
        for c in &self.chaos {
            match c.kind.as_str() {
                "vmm_restart" => {}
                "unregister" => ensure!(
                    c.device < devices,
                    "chaos device {} does not exist",
                    c.device
                ),
                other => bail!("unknown chaos kind {other:?} (known: vmm_restart, unregister)"),
            }
            ensure!(
                c.at_ms <= 3_600_000 && c.down_ms <= 600_000,
                "chaos times out of range"
            );
            ensure!(
                c.every_ms == 0
                    || ((100..=3_600_000).contains(&c.every_ms) && c.down_ms < c.every_ms),
                "chaos every_ms must be 0 (once) or 100..=3600000, and longer than down_ms"
            );
        }
        Ok(())
    }

    /// The chaos of a soak when the scenario has none: every `period`, the VMM is killed and
    /// restarted (after 50 ms); half a period later, and spread over the period's second
    /// half, each device's handler is unregistered (for 30 ms) and its VMM attaches again.
    pub fn soak_chaos(&self, period: Duration) -> Vec<ChaosSection> {
        let every = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
        let devices = u64::from(self.device_count());
        let mut chaos = vec![ChaosSection {
            at_ms: every,
            kind: "vmm_restart".into(),
            down_ms: 50.min(every / 4),
            device: 0,
            every_ms: every,
        }];
        for d in 0..devices {
            chaos.push(ChaosSection {
                at_ms: every / 2 + d * (every / 2) / devices,
                kind: "unregister".into(),
                down_ms: 30.min(every / 4),
                device: d as u32,
                every_ms: every,
            });
        }
        chaos
    }

    /// Devices in all.
    pub fn device_count(&self) -> u32 {
        self.devices.iter().map(|d| d.count).sum()
    }

    /// DMA accesses in all.
    pub fn total_accesses(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| {
                u64::from(d.count) * d.streams.iter().map(|s| u64::from(s.accesses)).sum::<u64>()
            })
            .sum()
    }

    /// The host's configuration.
    pub fn host_config(&self) -> HostConfig {
        let mut workloads = Vec::new();
        for d in &self.devices {
            for _ in 0..d.count {
                let index = workloads.len() as u64;
                workloads.push(Workload {
                    endpoint: EndpointConfig {
                        allocation: d.allocation,
                        ..EndpointConfig::default()
                    },
                    streams: d
                        .streams
                        .iter()
                        .enumerate()
                        .map(|(i, s)| Stream {
                            pasid: s.pasid.and_then(|p| iopf_abi::Pasid::new(p).ok()),
                            // Each stream its own 1 GiB window of IOVA space, unless the
                            // scenario places it.
                            base: s.iova.unwrap_or((i as u64 + 1) << 30),
                            pages: s.pages,
                            pattern: match s.pattern.as_str() {
                                "random" => Pattern::Random,
                                "strided" => Pattern::Strided { stride: s.stride },
                                _ => Pattern::Sequential,
                            },
                            access_len: s.access_len,
                            write: s.write,
                            accesses: s.accesses,
                            interval_ns: s.interval_us * 1000,
                        })
                        .collect(),
                    seed: self.seed.wrapping_add(index),
                });
            }
        }
        HostConfig {
            workloads,
            ring_entries: self.ring_entries,
            device: DeviceConfig {
                response_timeout: Some(Duration::from_millis(self.response_timeout_ms)),
                ..DeviceConfig::default()
            },
            repeat: false,
            threads: self.threads,
        }
    }

    /// The VMM's guest.
    pub fn guest_setup(&self) -> GuestSetup {
        let g = &self.guest;
        GuestSetup {
            guest: GuestConfig {
                latency_ns: (g.latency_us[0] * 1000, g.latency_us[1] * 1000),
                refuse_rate: g.refuse_rate,
                duplicate_rate: g.duplicate_rate,
                forged_rate: g.forged_rate,
                stale_rate: g.stale_rate,
                silent_rate: g.silent_rate,
                ..GuestConfig::default()
            },
            pages: g.pages,
            pasids: PASIDS,
            seed: self.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at_ms: u64, every_ms: u64, kind: &str, device: u32) -> ChaosSection {
        ChaosSection {
            at_ms,
            kind: kind.into(),
            down_ms: 10,
            device,
            every_ms,
        }
    }

    #[test]
    fn chaos_repeats_skips_pauses_and_keeps_one_offs_for_after_them() {
        let restart = RunChaos::VmmRestart { down_ms: 10 };
        let unregister = RunChaos::Unregister {
            device: 1,
            down_ms: 10,
        };
        let mut clock = ChaosClock::new(&[
            event(1000, 1000, "vmm_restart", 0),
            event(1500, 0, "unregister", 1),
        ]);
        assert!(clock.due(999, false).is_empty());
        assert_eq!(clock.due(1000, false), [restart]);
        assert!(clock.due(1001, false).is_empty());
        // Paused at 2000 and 3000: the restarts are skipped, the one-off waits.
        assert!(clock.due(2000, true).is_empty());
        assert!(clock.due(3000, true).is_empty());
        assert_eq!(clock.due(3100, false), [unregister]);
        // A slow tick does not pile occurrences up.
        assert_eq!(clock.due(6500, false), [restart]);
        assert_eq!(clock.due(7000, false), [restart]);
        assert!(clock.due(7999, false).is_empty());
        let only = ChaosClock::new(&[event(0, 0, "vmm_restart", 0), event(0, 0, "unregister", 0)])
            .only(|e| matches!(e, RunChaos::Unregister { .. }));
        assert_eq!(only.clone().due(0, false).len(), 1);
    }

    #[test]
    fn the_soak_chaos_restarts_the_vmm_and_unregisters_every_device_each_period() {
        let s = Scenario::parse(DEFAULT).unwrap();
        let chaos = s.soak_chaos(Duration::from_secs(4));
        assert_eq!(chaos.len(), 1 + s.device_count() as usize);
        assert!(chaos.iter().all(|c| c.every_ms == 4000 && c.down_ms < 4000));
        Scenario::check_again(Scenario { chaos, ..s }).unwrap();
        let e = format!(
            "{:#}",
            Scenario::parse(
                "[[device]]\n[[device.stream]]\npages=1\naccess_len=8\naccesses=1\n[[chaos]]\nat_ms=1\nkind='vmm_restart'\nevery_ms=50\n"
            )
            .unwrap_err()
        );
        assert!(e.contains("every_ms"), "{e}");
    }

    #[test]
    fn a_stream_iova_places_its_buffer_and_the_default_stays() {
        let s = Scenario::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scenarios/direct.toml"
        )))
        .unwrap();
        let bases: Vec<(u64, bool)> = s.host_config().workloads[0]
            .streams
            .iter()
            .map(|st| (st.base, st.pasid.is_none()))
            .collect();
        assert_eq!(bases, [(0x100_0000, true), (0x200_0000, true)]);
        let d = Scenario::parse(DEFAULT).unwrap().host_config();
        let bases: Vec<u64> = d.workloads[0].streams.iter().map(|st| st.base).collect();
        assert_eq!(bases, [1 << 30, 2 << 30]);
    }

    #[test]
    fn the_default_scenario_parses() {
        let s = Scenario::parse(DEFAULT).unwrap();
        assert!(s.device_count() >= 1 && s.total_accesses() > 0);
    }

    #[test]
    fn bad_scenarios_get_clear_errors() {
        for (text, needle) in [
            ("[[device]]\n", "missing field"),
            (
                "bogus = 1\n[[device]]\n[[device.stream]]\npages=1\naccess_len=8\naccesses=1\n",
                "unknown field",
            ),
            (
                "ring_entries = 100\n[[device]]\n[[device.stream]]\npages=1\naccess_len=8\naccesses=1\n",
                "power of two",
            ),
            (
                "[[device]]\ncount = 1025\n[[device.stream]]\npages=1\naccess_len=8\naccesses=1\n",
                "1024 devices",
            ),
            (
                "[[device]]\n[[device.stream]]\npages=1\naccess_len=8\naccesses=1\npattern='zigzag'\n",
                "pattern",
            ),
            (
                "[guest]\nrefuse_rate = 2.0\n[[device]]\n[[device.stream]]\npages=1\naccess_len=8\naccesses=1\n",
                "refuse_rate",
            ),
            (
                "[[device]]\n[[device.stream]]\npages=1\naccess_len=8\naccesses=1\n[[chaos]]\nat_ms=1\nkind='meteor'\n",
                "unknown chaos",
            ),
            (
                "[[device]]\n[[device.stream]]\niova=0x1001\npages=1\naccess_len=8\naccesses=1\n",
                "page aligned",
            ),
            (
                "[[device]]\n[[device.stream]]\niova=0xffff_ffff_ffff_f000\npages=2\naccess_len=8\naccesses=1\n",
                "beyond 2^64",
            ),
            (
                "[[device]]\n[[device.stream]]\npages=1\naccess_len=4904\naccesses=1\n",
                "longer than the stream's buffer of 1 page(s)",
            ),
        ] {
            let e = format!("{:#}", Scenario::parse(text).unwrap_err());
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
