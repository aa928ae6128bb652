//! Parameter sweeps: every policy on every fleet (a PlanetLab day, say) under every seed, run
//! in parallel on all cores, gathered into one table (CSV and markdown) and one bar chart per
//! metric, so policies are compared in one command.
use crate::fleet::Fleet;
use crate::metrics::Report;
use crate::{policy, Result, SimError};
use plotters::prelude::*;
use rayon::prelude::*;
use std::fmt::Write;

/// One run of the sweep.
#[derive(Debug, Clone)]
pub struct Cell {
    pub fleet: String,
    pub policy: String,
    pub seed: u64,
    pub report: Report,
}

/// How a metric is read off a report.
pub type MetricFn = fn(&Report) -> f64;

/// The metrics tabulated and plotted: (column name, axis label, value).
pub const METRICS: [(&str, &str, MetricFn); 6] = [
    ("energy_kwh", "energy (kWh)", |r| r.energy_kwh),
    ("slatah_pct", "SLATAH (%)", |r| 100.0 * r.slatah),
    ("pdm_pct", "PDM (%)", |r| 100.0 * r.pdm),
    ("esv", "ESV (energy x SLAV)", |r| r.esv),
    ("migrations", "migrations", |r| r.migrations as f64),
    ("active_hosts", "mean active hosts", |r| r.mean_active_hosts),
];

/// Runs every (fleet, policy, seed) on rayon's pool. Cells come back in (fleet, policy,
/// seed) order whatever the scheduling, so the table is the same on any number of cores.
pub fn run(fleets: &[(String, Fleet)], policies: &[String], seeds: &[u64]) -> Result<Vec<Cell>> {
    for p in policies {
        if policy::by_name(p).is_none() {
            return Err(SimError::Invalid(format!("unknown policy {p:?}")));
        }
    }
    let jobs: Vec<(usize, &String, u64)> = (0..fleets.len())
        .flat_map(|f| {
            policies
                .iter()
                .flat_map(move |p| seeds.iter().map(move |&s| (f, p, s)))
        })
        .collect();
    jobs.par_iter()
        .map(|&(f, p, seed)| {
            let mut pol = policy::by_name_seeded(p, seed)
                .ok_or_else(|| SimError::Invalid(format!("unknown policy {p:?}")))?;
            let mut report = crate::run(&fleets[f].1, pol.as_mut(), seed, &mut |_, _| {})?;
            report.timeline.clear(); // not tabulated; keeps a large sweep's memory flat
            Ok(Cell {
                fleet: fleets[f].0.clone(),
                policy: p.clone(),
                seed,
                report,
            })
        })
        .collect()
}

/// One row per cell: fleet, policy, seed, then every metric.
pub fn csv(cells: &[Cell]) -> String {
    let mut out = String::from("fleet,policy,seed");
    for (name, _, _) in METRICS {
        out.push(',');
        out.push_str(name);
    }
    out.push('\n');
    for c in cells {
        let _ = write!(out, "{},{},{}", c.fleet, c.policy, c.seed);
        for (_, _, f) in METRICS {
            let _ = write!(out, ",{}", f(&c.report));
        }
        out.push('\n');
    }
    out
}

/// The same rows as a markdown table.
pub fn markdown(cells: &[Cell]) -> String {
    let mut out = String::from("| fleet | policy | seed |");
    for (_, label, _) in METRICS {
        let _ = write!(out, " {label} |");
    }
    out.push_str("\n|---|---|---|");
    out.push_str(&"---|".repeat(METRICS.len()));
    out.push('\n');
    for c in cells {
        let _ = write!(out, "| {} | {} | {} |", c.fleet, c.policy, c.seed);
        for (_, _, f) in METRICS {
            let _ = write!(out, " {} |", fmt(f(&c.report)));
        }
        out.push('\n');
    }
    out
}

fn draw_err(e: impl std::fmt::Display) -> String {
    format!("drawing the chart: {e}")
}

fn fmt(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else if x.abs() < 0.01 {
        format!("{x:.3e}")
    } else if x.abs() < 1.0 {
        format!("{x:.4}")
    } else {
        format!("{x:.2}")
    }
}

/// A grouped bar chart of one metric as SVG: one group per policy, one bar per fleet (the
/// mean over seeds).
pub fn plot(cells: &[Cell], metric: usize) -> std::result::Result<String, String> {
    let (_, label, value) = METRICS
        .get(metric)
        .ok_or_else(|| format!("no metric {metric}"))?;
    let mut policies: Vec<&str> = Vec::new();
    let mut fleets: Vec<&str> = Vec::new();
    for c in cells {
        if !policies.contains(&c.policy.as_str()) {
            policies.push(&c.policy);
        }
        if !fleets.contains(&c.fleet.as_str()) {
            fleets.push(&c.fleet);
        }
    }
    let mean = |p: &str, f: &str| {
        let v: Vec<f64> = cells
            .iter()
            .filter(|c| c.policy == p && c.fleet == f)
            .map(|c| value(&c.report))
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let top = cells
        .iter()
        .map(|c| value(&c.report))
        .fold(0.0f64, f64::max)
        .max(1e-12)
        * 1.1;
    let mut svg = String::new();
    {
        let width = (160 + 60 * policies.len() as u32).max(480);
        let root = SVGBackend::with_string(&mut svg, (width, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(*label, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(70)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..policies.len() as f64, 0f64..top)
            .map_err(draw_err)?;
        let names = policies.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(policies.len() * 2 + 1)
            .x_label_formatter(&move |x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    names.get(i).map(|s| s.to_string()).unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(*label)
            .draw()
            .map_err(draw_err)?;
        let w = 0.8 / fleets.len().max(1) as f64;
        for (j, f) in fleets.iter().enumerate() {
            let color = Palette99::pick(j).to_rgba();
            let bars = policies.iter().enumerate().map(|(i, p)| {
                let x0 = i as f64 + 0.1 + j as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w, mean(p, f))], color.filled())
            });
            chart
                .draw_series(bars)
                .map_err(draw_err)?
                .label(*f)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_tables_every_cell_in_order_and_plots_each_metric() {
        let fleets: Vec<(String, Fleet)> = [3, 4]
            .iter()
            .map(|&s| (format!("f{s}"), Fleet::synthetic(6, 30, 0.1, s).unwrap()))
            .collect();
        let policies: Vec<String> = ["none", "thr-rs"].map(String::from).into();
        let cells = run(&fleets, &policies, &[1, 2]).unwrap();
        assert_eq!(cells.len(), 8);
        let order: Vec<(&str, &str, u64)> = cells
            .iter()
            .map(|c| (c.fleet.as_str(), c.policy.as_str(), c.seed))
            .collect();
        assert_eq!(order[0], ("f3", "none", 1));
        assert_eq!(order[3], ("f3", "thr-rs", 2));
        assert_eq!(order[7], ("f4", "thr-rs", 2));
        // Each cell equals the same run made alone.
        let mut alone = policy::by_name_seeded("thr-rs", 2).unwrap();
        let r = crate::run(&fleets[1].1, alone.as_mut(), 2, &mut |_, _| {}).unwrap();
        assert_eq!(cells[7].report.energy_kwh, r.energy_kwh);
        assert_eq!(cells[7].report.migrations, r.migrations);
        let csv = csv(&cells);
        assert_eq!(csv.lines().count(), 9);
        assert!(csv.starts_with("fleet,policy,seed,energy_kwh,"));
        assert_eq!(markdown(&cells).lines().count(), 10);
        for m in 0..METRICS.len() {
            let svg = plot(&cells, m).unwrap();
            assert!(svg.contains("<svg") && svg.contains("thr-rs"), "metric {m}");
        }
        assert!(run(&fleets, &["magic".to_string()], &[1]).is_err());
    }
}
