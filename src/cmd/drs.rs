//! `tern drs`: run the DRS scheduler on a cluster snapshot (plan, evacuate, rank) or write an
//! example snapshot. Human output is aligned tables; `--json` prints machine-readable results.
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use tern_scheduler::{Cluster, Config};

#[derive(Args)]
pub struct DrsArgs {
    #[command(subcommand)]
    command: DrsCommand,
}

#[derive(Subcommand)]
enum DrsCommand {
    #[command(flatten)]
    Cluster(super::drs_cluster::ClusterDrsCommand),
    /// Plan one balancing pass: mandatory moves, preferences, then load balancing.
    Plan {
        snapshot: PathBuf,
        /// Migration threshold 1 (mandatory moves only) .. 5 (aggressive).
        #[arg(long, default_value_t = 3)]
        threshold: u8,
        /// Maximum moves in the pass.
        #[arg(long)]
        max_moves: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Plan moving every VM off a host (maintenance mode).
    Evacuate {
        snapshot: PathBuf,
        #[arg(long)]
        host: String,
        #[arg(long)]
        json: bool,
    },
    /// Score every host as a destination for one VM (the migration wizard).
    Rank {
        snapshot: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a realistic, imbalanced example snapshot with pools and rules.
    Example {
        #[arg(long, default_value_t = 64)]
        hosts: usize,
        #[arg(long, default_value_t = 8000)]
        vms: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(args: DrsArgs) -> anyhow::Result<()> {
    match args.command {
        DrsCommand::Cluster(c) => return super::drs_cluster::run_drs(c),
        DrsCommand::Plan {
            snapshot,
            threshold,
            max_moves,
            json,
        } => {
            let cluster = load(&snapshot)?;
            let mut cfg = Config::with_threshold(threshold);
            if let Some(m) = max_moves {
                cfg.max_moves = m;
            }
            let plan = tern_scheduler::balance(&cluster, &cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", human::plan(&plan));
            }
        }
        DrsCommand::Evacuate {
            snapshot,
            host,
            json,
        } => {
            let cluster = load(&snapshot)?;
            let ev = tern_scheduler::evacuate(&cluster, &host, &Config::default())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ev)?);
            } else {
                print!("{}", human::evacuation(&ev));
            }
        }
        DrsCommand::Rank { snapshot, vm, json } => {
            let cluster = load(&snapshot)?;
            let r = tern_scheduler::rank_destinations(&cluster, &vm, &Config::default())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", human::ranking(&r));
            }
        }
        DrsCommand::Example {
            hosts,
            vms,
            seed,
            out,
        } => {
            if hosts == 0 {
                bail!("--hosts must be at least 1");
            }
            let snap = tern_scheduler::example::example(hosts, vms, seed);
            let text = serde_json::to_string(&snap)?;
            match out {
                Some(path) => std::fs::write(&path, text + "\n")
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{text}"),
            }
        }
    }
    Ok(())
}

fn load(path: &Path) -> anyhow::Result<Cluster> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Cluster::from_json(&text).with_context(|| format!("invalid snapshot {}", path.display()))
}

/// Aligned text tables for operators.
mod human {
    use std::fmt::Write;
    use tern_scheduler::{Evacuation, Move, Plan, Ranking, Unresolved};

    pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
        let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for r in rows {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: Vec<&str>, out: &mut String| {
            let n = cells.len();
            for (i, c) in cells.into_iter().enumerate() {
                if i + 1 == n {
                    out.push_str(c);
                } else {
                    let _ = write!(out, "{c:<w$}  ", w = width[i]);
                }
            }
            out.push('\n');
        };
        line(header.to_vec(), &mut out);
        for r in rows {
            line(r.iter().map(String::as_str).collect(), &mut out);
        }
        out
    }

    fn move_rows(moves: &[Move]) -> Vec<Vec<String>> {
        moves
            .iter()
            .map(|m| {
                vec![
                    m.vm.clone(),
                    m.from.clone(),
                    m.to.clone(),
                    m.priority.to_string(),
                    format!("{:.4}", m.imbalance_after),
                    m.est_migration_s
                        .map_or("no converge".into(), |s| format!("{s:.1}s")),
                    m.reason.clone(),
                ]
            })
            .collect()
    }

    const MOVE_HEADER: [&str; 7] = [
        "VM",
        "FROM",
        "TO",
        "PRI",
        "IMBAL AFTER",
        "EST TIME",
        "REASON",
    ];

    fn unresolved(out: &mut String, title: &str, items: &[Unresolved]) {
        if items.is_empty() {
            return;
        }
        let _ = writeln!(out, "\n{title} ({}):", items.len());
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|u| vec![u.vm.clone(), u.host.clone(), u.reason.clone()])
            .collect();
        out.push_str(&table(&["VM", "HOST", "WHY"], &rows));
    }

    pub fn plan(p: &Plan) -> String {
        let mut out = String::new();
        let target = p
            .target_imbalance
            .map_or("none".into(), |t| format!("{t:.4}"));
        let _ = writeln!(
            out,
            "threshold {}  target {target}  imbalance {:.4} -> {:.4}  moves {}",
            p.threshold,
            p.imbalance_before,
            p.imbalance_after,
            p.moves.len()
        );
        let _ = writeln!(out, "stopped: {}\n", p.stop_reason);
        if p.moves.is_empty() {
            out.push_str("no moves\n");
        } else {
            out.push_str(&table(&MOVE_HEADER, &move_rows(&p.moves)));
        }
        unresolved(&mut out, "cannot fix", &p.unresolved);
        out
    }

    pub fn evacuation(e: &Evacuation) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "evacuate {}: {} moves, {} stuck, imbalance {:.4} -> {:.4}\n",
            e.host,
            e.moves.len(),
            e.stuck.len(),
            e.imbalance_before,
            e.imbalance_after
        );
        if !e.moves.is_empty() {
            out.push_str(&table(&MOVE_HEADER, &move_rows(&e.moves)));
        }
        unresolved(&mut out, "cannot move", &e.stuck);
        out
    }

    pub fn ranking(r: &Ranking) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vm {} on {}  imbalance now {:.4}",
            r.vm,
            r.from.as_deref().unwrap_or("-"),
            r.imbalance_now
        );
        if let Some(b) = &r.blocked {
            let _ = writeln!(out, "this VM cannot migrate: {b}");
        }
        out.push('\n');
        let rows: Vec<Vec<String>> = r
            .candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                vec![
                    (i + 1).to_string(),
                    c.host.clone(),
                    format!("{:.2}", c.score),
                    format!("{:.4}", c.imbalance_after),
                    format!("{:.0}%", 100.0 * c.cpu_load_after),
                    format!("{:.0}%", 100.0 * c.memory_load_after),
                    c.reasons
                        .iter()
                        .skip(2)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; "),
                ]
            })
            .collect();
        out.push_str(&table(
            &["#", "HOST", "SCORE", "IMBAL AFTER", "CPU", "MEM", "NOTES"],
            &rows,
        ));
        if !r.excluded.is_empty() {
            let _ = writeln!(out, "\nexcluded ({}):", r.excluded.len());
            let rows: Vec<Vec<String>> = r
                .excluded
                .iter()
                .map(|e| vec![e.host.clone(), e.reasons.join("; ")])
                .collect();
            out.push_str(&table(&["HOST", "WHY"], &rows));
        }
        out
    }
}
