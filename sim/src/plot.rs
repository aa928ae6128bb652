//! A small SVG chart of a run: load, imbalance and active hosts over time. Plain SVG text, so
//! no fonts or system libraries are needed.
use crate::metrics::Report;
use std::fmt::Write;

const W: f64 = 900.0;
const PANEL_H: f64 = 180.0;
const PAD: f64 = 50.0;

/// Renders one panel per series, stacked.
pub fn svg(report: &Report) -> String {
    let series: [(&str, Vec<f64>); 3] = [
        (
            "load (demand / capacity)",
            report.timeline.iter().map(|p| p.load).collect(),
        ),
        (
            "imbalance (std dev of host load)",
            report.timeline.iter().map(|p| p.imbalance).collect(),
        ),
        (
            "active hosts",
            report
                .timeline
                .iter()
                .map(|p| p.active_hosts as f64)
                .collect(),
        ),
    ];
    let hours: Vec<f64> = report.timeline.iter().map(|p| p.t_s / 3600.0).collect();
    let h_total = PAD + series.len() as f64 * (PANEL_H + PAD);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h_total}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{PAD}" y="25" font-size="15">tern sim: {} on {} hosts, {} VMs</text>"#,
        report.policy, report.hosts, report.vms
    );
    let x_max = hours.last().copied().unwrap_or(1.0).max(1e-9);
    for (i, (label, ys)) in series.iter().enumerate() {
        let top = PAD + i as f64 * (PANEL_H + PAD);
        let y_max = ys.iter().copied().fold(0.0, f64::max).max(1e-9);
        let _ = write!(
            s,
            r#"<rect x="{PAD}" y="{top}" width="{}" height="{PANEL_H}" fill="none" stroke="gray"/>"#,
            W - 2.0 * PAD
        );
        let _ = write!(
            s,
            r#"<text x="{PAD}" y="{}">{label} (max {y_max:.3})</text>"#,
            top - 6.0
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{x_max:.0} h</text>"#,
            W - PAD,
            top + PANEL_H + 15.0
        );
        let mut pts = String::new();
        for (x, y) in hours.iter().zip(ys) {
            let px = PAD + x / x_max * (W - 2.0 * PAD);
            let py = top + PANEL_H - y / y_max * PANEL_H;
            let _ = write!(pts, "{px:.1},{py:.1} ");
        }
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="steelblue" stroke-width="1.5" points="{}"/>"#,
            pts.trim_end()
        );
    }
    s.push_str("</svg>\n");
    s
}
