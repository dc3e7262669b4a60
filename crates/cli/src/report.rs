//! The HTML report of `iopf run --report DIR`: the headline figures, charts drawn with
//! `plotters` as inline SVG (round-trip latency, throughput over time, the host's own answers
//! and the refusals by reason), per-device and counter tables, and the raw counters in a
//! collapsed block. One self-contained file: inline CSS and SVG, no script, no external file.

use std::fmt::Write;

use anyhow::anyhow;
use hdrhistogram::Histogram;
use iopf_core::DeviceCounters;
use iopf_endpoint::HostReport;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Width of every chart, in CSS pixels.
const WIDTH: u32 = 1000;
/// The font of every chart (the browser picks the face).
const FONT: &str = "sans-serif";
/// Latency bars.
const GREEN: RGBColor = RGBColor(0x3a, 0x9a, 0x6a);
/// The throughput line (and, lighter, its area).
const BLUE: RGBColor = RGBColor(0x2f, 0x6f, 0xc0);
/// Auto-responses.
const ORANGE: RGBColor = RGBColor(0xe0, 0x8a, 0x1e);
/// Refusals.
const RED: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
/// Percentile markers.
const MARKERS: [RGBColor; 4] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x8e, 0x44, 0xad),
    RGBColor(0xc0, 0x39, 0x2b),
    RGBColor(0x22, 0x22, 0x22),
];

/// The page's style sheet.
const CSS: &str = "body{font-family:sans-serif;margin:24px auto;max-width:1060px;color:#222;background:#fff}\
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}\
.sub{color:#666;margin:0 0 16px}\
.cards{display:flex;flex-wrap:wrap;gap:10px}\
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px}\
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}\
.card.bad{border-color:#c0392b;background:#fdecea}\
figure{margin:8px 0}svg{display:block}\
table{border-collapse:collapse;font-size:12px;margin:6px 0}\
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}\
th{background:#f3f5f8}td:first-child,th:first-child{text-align:left}\
.tables{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}\
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}";

// Writing into a `String` cannot fail: the `fmt::Result`s of `write!` below are ignored.

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A chart-drawing error as `anyhow` (plotters' errors borrow nothing but are not `Sync`).
fn drawn<T, E: std::fmt::Display>(r: Result<T, E>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow!("draw a chart: {e}"))
}

/// Draws `draw` on a white `WIDTH` x `height` SVG and returns the SVG text.
fn svg(
    height: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
        drawn(root.fill(&WHITE))?;
        draw(&root)?;
        drawn(root.present())?;
    }
    Ok(out)
}

/// A count or rate for an axis: 950, 1.2k, 35k, 1.5M.
fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Microseconds, readably: 0.5 µs, 85 µs, 1 ms, 2.7 ms.
fn micros(us: f64) -> String {
    let (v, unit) = if us >= 1000.0 {
        (us / 1000.0, "ms")
    } else {
        (us, "µs")
    };
    if v >= 10.0 || v == v.trunc() {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// Buckets per doubling of the latency histogram.
const PER_OCTAVE: f64 = 4.0;

/// The round-trip latency on log-spaced buckets (four per doubling), with p50, p90, p99 and
/// the maximum marked and labelled.
fn latency_svg(latency: &Histogram<u64>) -> anyhow::Result<String> {
    svg(380, |root| {
        let us = |ns: u64| (ns as f64 / 1000.0).max(0.1);
        let bucket = |v: f64| (v.log2() * PER_OCTAVE).floor() as i64;
        let edge = |b: i64| (b as f64 / PER_OCTAVE).exp2();
        let caption = format!(
            "Page request round trip: group sent to response received ({} groups)",
            latency.len()
        );
        if latency.is_empty() {
            let chart = ChartBuilder::on(root)
                .caption(caption, (FONT, 18))
                .margin(12)
                .build_cartesian_2d(0.0..1.0, 0.0..1.0);
            let chart = drawn(chart)?;
            return drawn(chart.plotting_area().draw(&Text::new(
                "no round trips were recorded",
                (0.4, 0.5),
                (FONT, 14),
            )));
        }
        let (first, last) = (bucket(us(latency.min())), bucket(us(latency.max())));
        // Bounded: `first..=last` spans at most log2(u64::MAX ns) * PER_OCTAVE buckets.
        let mut counts = vec![0u64; (last - first + 1) as usize];
        for v in latency.iter_recorded() {
            let b = bucket(us(v.value_iterated_to())).clamp(first, last);
            counts[(b - first) as usize] += v.count_at_value();
        }
        let top = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
        let mut chart = drawn(
            ChartBuilder::on(root)
                .caption(caption, (FONT, 18))
                .margin(12)
                .x_label_area_size(48)
                .y_label_area_size(64)
                .build_cartesian_2d((edge(first)..edge(last + 1)).log_scale(), 0.0..top * 1.55),
        )?;
        drawn(
            chart
                .configure_mesh()
                .x_desc("round trip (log scale)")
                .y_desc("groups")
                .axis_desc_style((FONT, 14))
                .label_style((FONT, 12))
                .x_label_formatter(&|v| micros(*v))
                .y_label_formatter(&|v| human(*v))
                .light_line_style(WHITE.mix(0.0))
                .draw(),
        )?;
        drawn(chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let b = first + i as i64;
            Rectangle::new([(edge(b), 0.0), (edge(b + 1), c as f64)], GREEN.filled())
        })))?;
        // Markers: a line each, named with its value in the legend (top left, where the bars
        // leave room), so that close percentiles never make labels overlap.
        let marks = [
            ("p50", latency.value_at_quantile(0.5)),
            ("p90", latency.value_at_quantile(0.9)),
            ("p99", latency.value_at_quantile(0.99)),
            ("max", latency.max()),
        ];
        for ((name, ns), color) in marks.iter().zip(MARKERS) {
            let x = us(*ns);
            drawn(chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, top * 1.45)],
                color.stroke_width(2),
            ))))?
            .label(format!("{name} {}", micros(x)))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        drawn(
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK.mix(0.3))
                .label_font((FONT, 13))
                .draw(),
        )?;
        Ok(())
    })
}

/// Most points of the throughput chart: the samples are binned into at most this many
/// intervals of equal length, so that the line shows the trend rather than sampling jitter.
const THROUGHPUT_BINS: usize = 150;

/// Groups answered per second in equal intervals of the run, from the progress samples
/// (seconds since start, groups answered so far; in time order): (interval end, rate).
fn rates(samples: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let Some(&(t_end, _)) = samples.last() else {
        return Vec::new();
    };
    let bins = samples.len().saturating_sub(1).min(THROUGHPUT_BINS);
    if bins == 0 || t_end <= 0.0 {
        return Vec::new();
    }
    // Groups answered at time t, interpolated between the samples around it.
    let at = |t: f64| -> f64 {
        let i = samples.partition_point(|s| s.0 < t);
        match (
            i.checked_sub(1).and_then(|j| samples.get(j)),
            samples.get(i),
        ) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                a.1 as f64 + (b.1 as f64 - a.1 as f64) * (t - a.0) / (b.0 - a.0)
            }
            (_, Some(b)) => b.1 as f64,
            (Some(a), None) => a.1 as f64,
            (None, None) => 0.0,
        }
    };
    let width = t_end / bins as f64;
    (1..=bins)
        .map(|k| {
            let (t0, t1) = ((k - 1) as f64 * width, k as f64 * width);
            (t1, ((at(t1) - at(t0)) / width).max(0.0))
        })
        .collect()
}

/// Groups answered per second over time.
fn throughput_svg(samples: &[(f64, u64)], secs: f64, groups: u64) -> anyhow::Result<String> {
    svg(340, |root| {
        let rates = rates(samples);
        let t_max = rates.last().map_or(secs, |r| r.0).max(1e-3);
        let r_max = rates.iter().map(|r| r.1).fold(1.0, f64::max);
        let mean = groups as f64 / secs.max(1e-9);
        let mut chart = drawn(
            ChartBuilder::on(root)
                .caption(
                    format!(
                        "Page request groups answered per second ({} intervals of {})",
                        rates.len(),
                        micros(rates.first().map_or(0.0, |r| r.0) * 1e6)
                    ),
                    (FONT, 18),
                )
                .margin(12)
                .x_label_area_size(48)
                .y_label_area_size(64)
                .build_cartesian_2d(0.0..t_max, 0.0..r_max.max(mean) * 1.15),
        )?;
        drawn(
            chart
                .configure_mesh()
                .x_desc("time since start (s)")
                .y_desc("groups / s")
                .axis_desc_style((FONT, 14))
                .label_style((FONT, 12))
                .y_label_formatter(&|v| human(*v))
                .light_line_style(WHITE.mix(0.0))
                .draw(),
        )?;
        let mut points = vec![(0.0, rates.first().map_or(0.0, |r| r.1))];
        points.extend(rates.iter().copied());
        drawn(chart.draw_series(AreaSeries::new(points.clone(), 0.0, BLUE.mix(0.18))))?;
        drawn(chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2))))?;
        drawn(chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, mean), (t_max, mean)],
            MARKERS[3].stroke_width(1),
        ))))?;
        let style =
            TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Right, VPos::Bottom));
        drawn(chart.draw_series(std::iter::once(Text::new(
            format!("mean {} groups/s ", human(mean)),
            (t_max, mean),
            style,
        ))))?;
        Ok(())
    })
}

/// The host's own answers and the refusals, by reason: (label, count, is a refusal).
fn reasons(c: &DeviceCounters) -> Vec<(&'static str, u64, bool)> {
    let a = &c.responses.auto;
    let r = &c.refused;
    vec![
        ("no handler", a.no_handler, false),
        ("not attached", a.not_attached, false),
        ("queue full", a.queue_full, false),
        ("pending limit", a.pending_limit, false),
        ("group too large", a.group_too_large, false),
        ("unregister", a.unregister, false),
        ("VMM gone", a.vmm_gone, false),
        ("queue broken", a.queue_broken, false),
        ("timeout", a.timeout, false),
        ("device reset", a.reset, false),
        ("malformed", r.malformed, true),
        ("bad version", r.bad_version, true),
        ("unknown cookie", r.unknown_cookie, true),
        ("cookie mismatch", r.mismatch, true),
        ("FAILURE code", r.failure_code, true),
    ]
}

/// Auto-responses and refusals by reason, as horizontal bars with their counts.
fn reasons_svg(c: &DeviceCounters) -> anyhow::Result<String> {
    let rows = reasons(c);
    let n = rows.len() as i32;
    svg(110 + 24 * rows.len() as u32, |root| {
        let top = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1) as f64;
        let mut chart = drawn(
            ChartBuilder::on(root)
                .caption(
                    "Groups the host answered itself (orange) and responses it refused (red), by reason",
                    (FONT, 18),
                )
                .margin(12)
                .x_label_area_size(48)
                .y_label_area_size(190)
                // Integer ranges include their end: `0..n - 1` holds the n rows.
                .build_cartesian_2d(0.0..top * 1.12, (0..n - 1).into_segmented()),
        )?;
        let labels: Vec<String> = rows
            .iter()
            .map(|(name, _, refused)| {
                let kind = if *refused { "refused" } else { "auto" };
                format!("{kind}: {name}")
            })
            .collect();
        drawn(
            chart
                .configure_mesh()
                .x_desc("groups (auto-responses) or responses (refusals)")
                .axis_desc_style((FONT, 14))
                .label_style((FONT, 12))
                .y_labels(rows.len())
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                        usize::try_from(n - 1 - i)
                            .ok()
                            .and_then(|row| labels.get(row).cloned())
                            .unwrap_or_default()
                    }
                    SegmentValue::Last => String::new(),
                })
                .x_label_formatter(&|v| human(*v))
                .disable_y_mesh()
                .light_line_style(WHITE.mix(0.0))
                .draw(),
        )?;
        drawn(
            chart.draw_series(
                plotters::series::Histogram::horizontal(&chart)
                    .margin(4)
                    .style_func(|y, _| {
                        let refused = match y {
                            SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => {
                                usize::try_from(n - 1 - *i)
                                    .ok()
                                    .and_then(|row| rows.get(row))
                                    .is_some_and(|r| r.2)
                            }
                            SegmentValue::Last => false,
                        };
                        if refused { RED } else { ORANGE }.filled()
                    })
                    .data(
                        rows.iter()
                            .enumerate()
                            .map(|(i, r)| (n - 1 - i as i32, r.1 as f64)),
                    ),
            ),
        )?;
        let style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        drawn(
            chart.draw_series(
                rows.iter()
                    .enumerate()
                    .filter(|(_, r)| r.1 > 0)
                    .map(|(i, r)| {
                        Text::new(
                            format!(" {}", r.1),
                            (r.1 as f64, SegmentValue::CenterOf(n - 1 - i as i32)),
                            style.clone(),
                        )
                    }),
            ),
        )?;
        Ok(())
    })
}

/// One row per device: what its fault core counted and what its endpoint's DMA did.
fn devices_table(report: &HostReport) -> String {
    let mut t = String::from(
        "<table id=\"devices\"><tr><th>device</th><th>page requests</th><th>groups</th>\
         <th>guest success</th><th>guest invalid</th><th>guest failure</th><th>auto-responses</th>\
         <th>refused</th><th>unanswered</th><th>unrecoverable</th><th>DMA completed</th>\
         <th>DMA failed</th><th>bytes verified</th><th>bytes differ</th></tr>",
    );
    for d in &report.devices {
        let c = &d.core;
        let g = &c.responses.guest;
        let auto = c.answered() - g.success - g.invalid - g.failure;
        let engine = report.engines.iter().find(|e| e.device == d.device);
        let [completed, failed, verified, differ] = engine.map_or_else(
            || ["-".to_string(), "-".into(), "-".into(), "-".into()],
            |e| {
                [
                    e.endpoint.completed.to_string(),
                    e.endpoint
                        .accesses
                        .saturating_sub(e.endpoint.completed)
                        .to_string(),
                    e.memory.bytes_verified.to_string(),
                    e.memory.bytes_mismatched.to_string(),
                ]
            },
        );
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{auto}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{completed}</td><td>{failed}</td>\
             <td>{verified}</td><td>{differ}</td></tr>",
            d.device,
            c.page_requests,
            c.groups,
            g.success,
            g.invalid,
            g.failure,
            c.refused_total(),
            c.groups.saturating_sub(c.answered()),
            c.unrecoverable,
        );
    }
    t.push_str("</table>");
    t
}

/// A two-column table of named counters.
fn counter_table(title: &str, rows: &[(&str, u64)]) -> String {
    let mut t = format!("<table><tr><th>{}</th><th>count</th></tr>", escape(title));
    for (name, v) in rows {
        let _ = write!(t, "<tr><td>{}</td><td>{v}</td></tr>", escape(name));
    }
    t.push_str("</table>");
    t
}

/// The fault core's counters, all devices, as readable tables.
fn counters_tables(c: &DeviceCounters) -> String {
    let g = &c.responses.guest;
    let mut out = String::from("<div class=\"tables\">");
    out.push_str(&counter_table(
        "faults",
        &[
            ("page requests", c.page_requests),
            (
                "page requests dropped before their group completed",
                c.partial_dropped,
            ),
            ("groups completed", c.groups),
            ("groups delivered to the VMM", c.groups_delivered),
            ("unrecoverable faults", c.unrecoverable),
            ("unrecoverable faults delivered", c.unrecoverable_delivered),
            ("unrecoverable faults lost", c.lost),
            ("handlers registered", c.registrations),
            ("handlers unregistered", c.unregistrations),
        ],
    ));
    out.push_str(&counter_table(
        "responses from the guest",
        &[
            ("SUCCESS", g.success),
            ("INVALID", g.invalid),
            ("FAILURE", g.failure),
        ],
    ));
    let rows = reasons(c);
    let auto: Vec<(&str, u64)> = rows.iter().filter(|r| !r.2).map(|r| (r.0, r.1)).collect();
    let refused: Vec<(&str, u64)> = rows.iter().filter(|r| r.2).map(|r| (r.0, r.1)).collect();
    out.push_str(&counter_table("answered by the host (INVALID)", &auto));
    out.push_str(&counter_table("responses refused", &refused));
    out.push_str("</div>");
    out
}

/// The whole page.
pub fn html(
    report: &HostReport,
    latency: &Histogram<u64>,
    samples: &[(f64, u64)],
    secs: f64,
) -> anyhow::Result<String> {
    let c = &report.core;
    let unanswered = c.groups.saturating_sub(c.answered());
    let q = |x: f64| micros(latency.value_at_quantile(x) as f64 / 1000.0);
    let mut cards = String::new();
    for (value, label, bad) in [
        (report.engines.len().to_string(), "devices", false),
        (format!("{secs:.2} s"), "run time", false),
        (c.page_requests.to_string(), "page requests", false),
        (c.groups.to_string(), "groups", false),
        (unanswered.to_string(), "unanswered groups", unanswered > 0),
        (c.refused_total().to_string(), "refused responses", false),
        (q(0.5), "p50 round trip", false),
        (q(0.99), "p99 round trip", false),
        (
            format!("{}/s", human(c.groups as f64 / secs.max(1e-9))),
            "groups answered",
            false,
        ),
    ] {
        let class = if bad { "card bad" } else { "card" };
        let _ = write!(
            cards,
            "<div class=\"{class}\"><b>{}</b><span>{label}</span></div>",
            escape(&value)
        );
    }
    let raw = serde_json::to_string_pretty(&serde_json::json!({
        "core": c, "devices": report.devices, "engines": report.engines,
    }))?;
    let disconnects: String = report
        .disconnects
        .iter()
        .map(|d| format!("<li>{}</li>", escape(d)))
        .collect();
    Ok(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>iopf run report</title>\
         <style>{CSS}</style></head><body>\n\
         <h1>iopf run</h1><p class=\"sub\">I/O page faults from simulated PCIe devices to a VMM over \
         vfio-user, and page responses back.</p>\n\
         <div class=\"cards\">{cards}</div>\n\
         <h2>Round-trip latency</h2><figure id=\"latency\">{}</figure>\n\
         <h2>Throughput</h2><figure id=\"throughput\">{}</figure>\n\
         <h2>Auto-responses and refusals</h2><figure id=\"reasons\">{}</figure>\n\
         <h2>Devices</h2>{}\n\
         <h2>Fault core counters, all devices</h2>{}\n\
         <h2>VMM connections</h2><ul>{disconnects}</ul>\n\
         <details><summary>Raw counters (JSON)</summary><pre>{}</pre></details>\n\
         </body></html>\n",
        latency_svg(latency)?,
        throughput_svg(samples, secs, c.groups)?,
        reasons_svg(c)?,
        devices_table(report),
        counters_tables(c),
        escape(&raw),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(human(950.0), "950");
        assert_eq!(human(1500.0), "1.5k");
        assert_eq!(human(35_000.0), "35k");
        assert_eq!(human(2_500_000.0), "2.5M");
        assert_eq!(human(0.5), "0.5");
        assert_eq!(micros(2717.7), "2.7 ms");
        assert_eq!(micros(85.4), "85 µs");
        assert_eq!(micros(1000.0), "1 ms");
        assert_eq!(micros(0.84), "0.8 µs");
    }

    #[test]
    fn throughput_is_binned_from_the_samples() {
        // 100 groups per second for one second, sampled every 10 ms.
        let samples: Vec<(f64, u64)> = (0..=100).map(|i| (i as f64 / 100.0, i)).collect();
        let r = rates(&samples);
        assert_eq!(r.len(), 100);
        assert!(
            r.iter().all(|&(_, rate)| (rate - 100.0).abs() < 1e-6),
            "{r:?}"
        );
        assert!(rates(&[]).is_empty() && rates(&[(0.0, 0)]).is_empty());
    }

    #[test]
    fn every_chart_draws_even_without_data() {
        let latency = Histogram::<u64>::new(3).unwrap();
        let empty = DeviceCounters::default();
        for svg in [
            latency_svg(&latency).unwrap(),
            throughput_svg(&[], 0.0, 0).unwrap(),
            reasons_svg(&empty).unwrap(),
        ] {
            assert!(
                svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{svg}"
            );
        }
    }
}
