//! The HTML report of `iopf run --report DIR`: the summary, a latency histogram and the
//! throughput over time, as inline SVG (no script, no external file).

use std::fmt::Write;

use hdrhistogram::Histogram;
use iopf_host::HostReport;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Bars of the round-trip latency on log-spaced buckets (1 us .. the maximum).
fn latency_svg(latency: &Histogram<u64>) -> String {
    let (w, h, pad) = (720.0, 240.0, 40.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11">"#
    );
    if latency.is_empty() {
        svg.push_str("<text x=\"10\" y=\"20\">no samples</text></svg>");
        return svg;
    }
    // Buckets: powers of 2^(1/4) of nanoseconds, from 1 us to the maximum.
    let max = latency.max().max(1000) as f64;
    let buckets = ((max / 1000.0).log2() * 4.0).ceil().max(1.0) as usize;
    let mut counts = vec![0u64; buckets + 1];
    for v in latency.iter_recorded() {
        let ns = v.value_iterated_to().max(1000) as f64;
        let b = (((ns / 1000.0).log2() * 4.0).floor() as usize).min(buckets);
        counts[b] += v.count_at_value();
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let bw = (w - 2.0 * pad) / counts.len() as f64;
    for (i, c) in counts.iter().enumerate() {
        let bh = (h - 2.0 * pad) * (*c as f64 / top);
        let x = pad + i as f64 * bw;
        let y = h - pad - bh;
        let _ = write!(
            svg,
            r##"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="#4a7"/>"##,
            (bw - 1.0).max(0.5)
        );
    }
    for (label, frac) in [("1 us", 0.0), (&*format!("{:.0} us", max / 1000.0), 1.0)] {
        let x = pad + frac * (w - 2.0 * pad);
        let _ = write!(
            svg,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            h - pad + 16.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{pad}" y="16">page request round trips, log scale ({} groups)</text></svg>"#,
        latency.len()
    );
    svg
}

/// Groups answered per second over time, from the progress samples.
fn throughput_svg(samples: &[(f64, u64)]) -> String {
    let (w, h, pad) = (720.0, 240.0, 40.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11">"#
    );
    let rates: Vec<(f64, f64)> = samples
        .windows(2)
        .filter(|p| p[1].0 > p[0].0)
        .map(|p| {
            (
                p[1].0,
                (p[1].1.saturating_sub(p[0].1)) as f64 / (p[1].0 - p[0].0),
            )
        })
        .collect();
    let t_max = rates.last().map_or(1.0, |r| r.0).max(1e-3);
    let r_max = rates.iter().map(|r| r.1).fold(1.0, f64::max);
    let points: Vec<String> = rates
        .iter()
        .map(|(t, r)| {
            format!(
                "{:.1},{:.1}",
                pad + t / t_max * (w - 2.0 * pad),
                h - pad - r / r_max * (h - 2.0 * pad)
            )
        })
        .collect();
    let _ = write!(
        svg,
        r##"<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{}"/>"##,
        points.join(" ")
    );
    let _ = write!(
        svg,
        r#"<text x="{pad}" y="16">groups answered per second (peak {r_max:.0}) over {t_max:.2} s</text></svg>"#
    );
    svg
}

/// The whole page.
pub fn html(
    report: &HostReport,
    latency: &Histogram<u64>,
    samples: &[(f64, u64)],
    secs: f64,
) -> String {
    let c = &report.core;
    let summary = serde_json::to_string_pretty(c).unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>iopf run</title></head><body>\
         <h1>iopf run</h1><p>{} devices, {secs:.2} s, {} groups, {} unanswered, p50 {:.1} us, p99 {:.1} us, \
         p99.9 {:.1} us, max {:.1} us</p><h2>Latency</h2>{}<h2>Throughput</h2>{}<h2>Fault core counters</h2><pre>{}</pre>\
         <h2>VMM connections</h2><pre>{}</pre></body></html>\n",
        report.engines.len(),
        c.groups,
        c.groups - c.answered(),
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.value_at_quantile(0.999) as f64 / 1000.0,
        latency.max() as f64 / 1000.0,
        latency_svg(latency),
        throughput_svg(samples),
        escape(&summary),
        escape(&report.disconnects.join("\n")),
    )
}
