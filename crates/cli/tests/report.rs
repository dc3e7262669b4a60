//! `iopf run --report DIR` writes a page that a browser shows with its charts: the test runs a
//! small workload with a misbehaving guest (so that there are refusals and timeouts to chart),
//! loads the page in headless Chromium, and checks both the DOM Chromium built (three chart
//! SVGs with titles and axis labels, the percentile markers, the per-device table) and a
//! screenshot (the charts' colours drawn in quantity, not a blank page).
//!
//! Chromium is the Debian package `chromium` (`scripts/setup` installs it), or the binary
//! named by `IOPF_CHROMIUM`. Without it the test is ignored, except in CI (`CI=true`), where
//! it runs and fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The guest refuses, duplicates, forges and replays answers, and leaves a few groups silent
/// (answered by the host at the timeout).
const SCENARIO: &str = r#"
seed = 7
response_timeout_ms = 50

[guest]
latency_us = [2, 50]
duplicate_rate = 0.1
forged_rate = 0.1
stale_rate = 0.1
silent_rate = 0.02

[[device]]
count = 2

[[device.stream]]
pasid = 1
pattern = "strided"
stride = 12288
pages = 512
access_len = 4096
write = true
accesses = 1500
interval_us = 5
"#;

/// Window size of the screenshot.
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 2000;

/// Colours the charts fill with (crates/cli/src/report.rs): latency bars, the throughput
/// line, refusal bars.
const GREEN: [u8; 3] = [0x3a, 0x9a, 0x6a];
const BLUE: [u8; 3] = [0x2f, 0x6f, 0xc0];
const RED: [u8; 3] = [0xc0, 0x39, 0x2b];

fn chromium() -> PathBuf {
    std::env::var_os("IOPF_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Headless Chromium on `page` with `args`, in a fresh profile; bounded by `timeout`.
fn browse(profile: &Path, page: &Path, args: &[String]) -> Output {
    let out = Command::new("timeout")
        .arg("120")
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap_or_else(|e| panic!("start {}: {e}", chromium().display()));
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Pixels of `rgba` within a small distance of `color`.
fn count_near(rgba: &[[u8; 4]], color: [u8; 3]) -> usize {
    rgba.iter()
        .filter(|p| (0..3).all(|i| p[i].abs_diff(color[i]) <= 6))
        .count()
}

/// Decodes an RGB or RGBA PNG into RGBA pixels.
fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<[u8; 4]>) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("a sane PNG size")];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected screenshot colour type {other:?}"),
    };
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2], p.get(3).copied().unwrap_or(255)])
        .collect();
    (info.width, info.height, pixels)
}

/// The SVG inside `<figure id="{id}">` of `dom`.
fn figure_svg<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<figure id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no {id} chart in the DOM:\n{dom}"));
    let rest = &dom[start..];
    let rest = &rest[..rest.find("</figure>").expect("the figure ends")];
    let svg = rest
        .find("<svg")
        .unwrap_or_else(|| panic!("the {id} chart has no SVG"));
    let end = rest
        .rfind("</svg>")
        .unwrap_or_else(|| panic!("the {id} SVG is cut"));
    &rest[svg..end]
}

/// The trimmed contents of the `<text>` elements of `svg`.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

#[test]
#[cfg_attr(
    iopf_no_chromium,
    ignore = "needs Chromium (/usr/bin/chromium or IOPF_CHROMIUM; scripts/setup installs it)"
)]
fn report_renders_its_charts_in_a_browser() {
    assert!(
        chromium().is_file(),
        "{} is missing (scripts/setup installs the chromium package)",
        chromium().display()
    );
    // Removed however the test ends.
    let tmp = tempfile::Builder::new()
        .prefix("iopf-test-report-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let scenario = dir.join("scenario.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let report_dir = dir.join("report");
    let run = Command::new(env!("CARGO_BIN_EXE_iopf"))
        .args(["run", "--json", "--scenario"])
        .arg(&scenario)
        .arg("--report")
        .arg(&report_dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "iopf run failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let page = report_dir.join("report.html");
    let html = std::fs::read_to_string(&page).expect("the report page");
    // Self-contained: nothing fetched, nothing run.
    for banned in ["<script", "src=", "href=", "<link", "@import", "url("] {
        assert!(!html.contains(banned), "the page contains {banned:?}");
    }

    // The DOM Chromium built from the page.
    let dom = browse(&dir.join("profile-dom"), &page, &["--dump-dom".to_string()]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    // Each chart: an SVG with its title, axis labels and marks, as <text> elements.
    let charts: [(&str, &[&str]); 3] = [
        (
            "latency",
            &[
                "Page request round trip",
                "round trip (log scale)",
                "groups",
                "p50 ",
                "p90 ",
                "p99 ",
                "max ",
            ],
        ),
        (
            "throughput",
            &[
                "Page request groups answered per second",
                "time since start (s)",
                "groups / s",
                "mean ",
            ],
        ),
        (
            "reasons",
            &[
                "by reason",
                "groups (auto-responses) or responses (refusals)",
                // Rows of both kinds.
                "refused: unknown cookie",
                "auto: timeout",
            ],
        ),
    ];
    for (figure, wanted) in charts {
        let svg = figure_svg(&dom, figure);
        let texts = texts(svg);
        for want in wanted {
            assert!(
                texts
                    .iter()
                    .any(|t| t.starts_with(want) || t.ends_with(want)),
                "the {figure} chart lacks a text {want:?}: {texts:?}"
            );
        }
    }
    // The per-device table.
    for row in ["<table id=\"devices\">", "<tr><td>1</td>", "<tr><td>2</td>"] {
        assert!(dom.contains(row), "the DOM lacks {row:?}:\n{dom}");
    }
    // The raw counters only in a collapsed block, after the tables.
    let raw = dom.find("<details>").expect("a <details> block");
    assert!(
        dom[raw..].contains("Raw counters (JSON)") && !dom[..raw].contains("<pre>"),
        "raw JSON outside the collapsed block"
    );

    // What Chromium drew.
    let shot = dir.join("report.png");
    browse(
        &dir.join("profile-shot"),
        &page,
        &[
            format!("--screenshot={}", shot.display()),
            format!("--window-size={WIDTH},{HEIGHT}"),
        ],
    );
    let (w, h, pixels) = decode(&std::fs::read(&shot).expect("the screenshot"));
    assert_eq!((w, h), (WIDTH, HEIGHT), "screenshot size");
    let distinct: std::collections::HashSet<[u8; 4]> = pixels.iter().copied().collect();
    assert!(
        distinct.len() > 200,
        "a nearly blank screenshot: {} colours",
        distinct.len()
    );
    // Latency bars, the throughput line, the refusal bar: each drawn over a real area.
    for (name, color, least) in [
        ("latency bars", GREEN, 5000),
        ("throughput line", BLUE, 500),
        ("refusal bars", RED, 3000),
    ] {
        let n = count_near(&pixels, color);
        assert!(
            n >= least,
            "{name}: {n} pixels of {color:?}, expected {least}+"
        );
    }
}
