//! `tern sim`: run a fleet under a policy and report energy, SLA and migrations.
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use tern_sim::fleet::Fleet;
use tern_sim::metrics::Report;
use tern_sim::trace;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    #[command(subcommand)]
    sub: Option<SimSub>,
    /// Directory of PlanetLab-format traces (one file per VM, integer CPU % per line).
    #[arg(long, conflicts_with_all = ["synthetic", "config"])]
    trace: Option<PathBuf>,
    /// TSV giving which trace file becomes which VM (columns vm_index, file, vm_type).
    #[arg(long, requires = "trace")]
    vm_order: Option<PathBuf>,
    /// Generate the workload instead of reading traces.
    #[arg(long)]
    synthetic: bool,
    /// Fleet described in a TOML file.
    #[arg(long, conflicts_with = "synthetic")]
    config: Option<PathBuf>,
    /// With --synthetic: the fleet's shape (host types, VM size mix, load patterns) from a
    /// TOML file whose groups give shares; --hosts, --vms and --days set the totals.
    #[arg(long, requires = "synthetic")]
    shape: Option<PathBuf>,
    /// none | drs | drs+dpm | npa | dvfs | DETECTOR-SELECTOR with DETECTOR thr, iqr, mad,
    /// lr or lrr and SELECTOR mmt, mc or rs (Beloglazov & Buyya 2012; lr-mmt is the baseline)
    #[arg(long, default_value = "lr-mmt")]
    policy: String,
    #[arg(long, default_value_t = 800)]
    hosts: usize,
    /// Number of VMs (synthetic only).
    #[arg(long, default_value_t = 1000)]
    vms: usize,
    /// Simulated days (synthetic only).
    #[arg(long, default_value_t = 1.0)]
    days: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the full report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Write an SVG chart of load, imbalance and active hosts.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// CloudSim compatibility: reserve VM memory at creation only, as CloudSim's PlanetLab
    /// runs do (their VMs ask for 0 MB once started; lets hosts hold more memory than they
    /// have), tick at k x interval + 0.1 s and retire a VM that asks for exactly 0 MIPS, as
    /// CloudSim's engine does. Needed to reproduce published numbers.
    #[arg(long)]
    cloudsim_compat: bool,
    /// Starting placement for none, drs and drs+dpm (lr-mmt places by itself): `full`
    /// reserves each VM's full MIPS (no host is ever over-committed); `demand` sizes each VM
    /// by its demand at t = 0 x 1.2, best fit decreasing, memory always respected, so hosts
    /// drift into contention as loads rise.
    #[arg(long, default_value = "full", value_parser = ["full", "demand"])]
    initial_placement: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum SimSub {
    /// Run policies x days (x seeds) on all cores: one table (CSV, markdown) and one chart
    /// per metric.
    Sweep(SweepArgs),
}

#[derive(Args)]
struct SweepArgs {
    /// A day of PlanetLab-format traces (repeat for several days). A file
    /// `cloudsim_vm_order_<day>.tsv` next to the day's folder gives CloudSim's VM order.
    #[arg(long = "trace", required = true)]
    traces: Vec<PathBuf>,
    /// Policies, comma separated (default: every policy).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Seeds 1..=N for each (day, policy).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    #[arg(long, default_value_t = 800)]
    hosts: usize,
    /// CloudSim's memory and engine semantics (see `tern sim --help`).
    #[arg(long)]
    cloudsim_compat: bool,
    /// Folder for sweep.csv, sweep.md and one SVG chart per metric.
    #[arg(long)]
    out: PathBuf,
}

fn sweep(args: SweepArgs) -> anyhow::Result<()> {
    let mut fleets = Vec::new();
    for dir in &args.traces {
        let day = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let order = dir
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("cloudsim_vm_order_{day}.tsv"));
        let (traces, types) = if order.is_file() {
            trace::read_trace_dir_ordered(dir, &order)?
        } else {
            let t = trace::read_trace_dir(dir)?;
            let n = t.len();
            (t, vec![None; n])
        };
        let mut fleet = Fleet::planetlab(traces, &types, args.hosts)?;
        fleet.cloudsim_ram = args.cloudsim_compat;
        fleet.cloudsim_engine = args.cloudsim_compat;
        fleets.push((day, fleet));
    }
    let policies = if args.policies.is_empty() {
        tern_sim::policy::names()
    } else {
        args.policies.clone()
    };
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let seeds: Vec<u64> = (1..=args.seeds).collect();
    let started = std::time::Instant::now();
    let cells = tern_sim::sweep::run(&fleets, &policies, &seeds)?;
    let wall = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let write = |name: &str, text: &str| {
        let p = args.out.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write("sweep.csv", &tern_sim::sweep::csv(&cells))?;
    let md = tern_sim::sweep::markdown(&cells);
    write("sweep.md", &md)?;
    for (m, (name, _, _)) in tern_sim::sweep::METRICS.iter().enumerate() {
        let svg = tern_sim::sweep::plot(&cells, m).map_err(anyhow::Error::msg)?;
        write(&format!("{name}.svg"), &svg)?;
    }
    print!("{md}");
    eprintln!(
        "{} runs on {} threads in {wall:.1} s; tables and charts in {}",
        cells.len(),
        rayon_threads(),
        args.out.display()
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    if let Some(SimSub::Sweep(s)) = args.sub {
        return sweep(s);
    }
    let mut fleet = build_fleet(&args)?;
    fleet.cloudsim_ram = args.cloudsim_compat;
    fleet.cloudsim_engine = args.cloudsim_compat;
    fleet.initial_placement = args.initial_placement.parse().map_err(anyhow::Error::msg)?;
    let mut policy =
        tern_sim::policy::by_name_seeded(&args.policy, args.seed).with_context(|| {
            format!(
                "unknown policy {:?} ({})",
                args.policy,
                tern_sim::policy::names().join(", ")
            )
        })?;
    // Whether the fleet can be served at all is said before the policy runs.
    let commitment = tern_sim::commitment::Commitment::of(&fleet);
    eprintln!("{}", commitment.describe());
    let ticks = (fleet.duration_s / fleet.interval_s) as u64;
    let bar = if args.quiet || ticks < 500 {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(ticks)
    };
    let mut report = tern_sim::run(&fleet, policy.as_mut(), args.seed, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    report.commitment = Some(commitment);
    bar.finish_and_clear();
    if let Some(p) = &args.plot {
        std::fs::write(p, tern_sim::plot::svg(&report))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn build_fleet(args: &SimArgs) -> anyhow::Result<Fleet> {
    if let Some(dir) = &args.trace {
        let (traces, types) = match &args.vm_order {
            Some(order) => trace::read_trace_dir_ordered(dir, order)?,
            None => {
                let t = trace::read_trace_dir(dir)?;
                let n = t.len();
                (t, vec![None; n])
            }
        };
        return Ok(Fleet::planetlab(traces, &types, args.hosts)?);
    }
    if let Some(cfg) = &args.config {
        return Ok(Fleet::from_toml(cfg, args.seed)?);
    }
    if let Some(shape) = &args.shape {
        return Ok(Fleet::from_shape(
            shape, args.seed, args.hosts, args.vms, args.days,
        )?);
    }
    if args.synthetic {
        return Ok(Fleet::synthetic(
            args.hosts, args.vms, args.days, args.seed,
        )?);
    }
    bail!("give --trace DIR, --config FILE or --synthetic")
}

fn print_summary(r: &Report) {
    println!("policy           {}", r.policy);
    println!("hosts / VMs      {} / {}", r.hosts, r.vms);
    println!("simulated        {:.1} h", r.simulated_s / 3600.0);
    println!("energy           {:.2} kWh", r.energy_kwh);
    println!("SLATAH           {:.2} %", r.slatah * 100.0);
    println!("PDM              {:.3} %", r.pdm * 100.0);
    println!("SLAV             {:.6} %", r.slav * 100.0);
    println!("ESV              {:.6}", r.esv);
    println!("migrations       {}", r.migrations);
    println!("bytes moved      {:.1} GB", r.bytes_moved / 1e9);
    println!("unmet demand     {:.3} %", r.unmet_demand * 100.0);
    println!("  by contention  {:.3} %", r.contention_unmet * 100.0);
    println!("mean imbalance   {:.4}", r.mean_imbalance);
    println!("mean active hosts {:.1}", r.mean_active_hosts);
    println!(
        "downtime p50/p99 {:.0} / {:.0} ms",
        r.downtime.p50_ms, r.downtime.p99_ms
    );
}
