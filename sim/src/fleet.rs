//! What is simulated: hosts, VMs with their workloads, timing, migration model and events.
use crate::error::{Result, SimError};
use crate::migration::MigrationModel;
use crate::power::PowerModel;
use crate::trace::Trace;
use crate::workload::{rng, Workload};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HostSpec {
    pub pes: u32,
    pub pe_mips: f64,
    pub ram_mb: u64,
    pub bw_mbps: f64,
    pub power: PowerModel,
}

impl HostSpec {
    pub fn total_mips(&self) -> f64 {
        self.pes as f64 * self.pe_mips
    }
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub pes: u32,
    pub mips: f64,
    pub ram_mb: u64,
    pub bw_mbps: f64,
    /// Memory the guest dirties per second at full CPU demand (pre-copy model only).
    pub dirty_mb_s: f64,
    pub workload: Workload,
}

impl VmSpec {
    pub fn total_mips(&self) -> f64 {
        self.pes as f64 * self.mips
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Fail,
    Recover,
    MaintenanceEnter,
    MaintenanceExit,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HostEvent {
    pub at_s: f64,
    pub host: usize,
    pub kind: EventKind,
}

#[derive(Debug, Clone)]
pub struct Fleet {
    pub hosts: Vec<HostSpec>,
    pub vms: Vec<VmSpec>,
    pub interval_s: f64,
    pub duration_s: f64,
    pub migration: MigrationModel,
    pub events: Vec<HostEvent>,
    /// CloudSim compatibility: memory and bandwidth are reserved at creation only, later
    /// placements ignore them (CloudSim's PlanetLab VMs ask for 0 RAM once running).
    pub cloudsim_ram: bool,
    /// CloudSim's engine semantics: ticks fall 0.1 s after each interval (its cloudlets
    /// start at 0.1 s), and a VM that asks for exactly 0 MIPS at an update while not
    /// migrating is treated as finished and leaves the run for good (getCompletedVms).
    pub cloudsim_engine: bool,
    /// Start VMs round-robin instead of with CloudSim's best fit (large generated fleets).
    pub spread_initial: bool,
    /// How policies that do not place by themselves (none, drs, drs+dpm) start the fleet.
    pub initial_placement: InitialPlacement,
}

/// The starting placement shared by `none`, `drs` and `drs+dpm` (LR-MMT places by itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitialPlacement {
    /// Each VM reserves its full MIPS: no host can ever be over-committed.
    #[default]
    Full,
    /// Each VM is sized by its demand at t = 0 x `DEMAND_HEADROOM` (best fit decreasing,
    /// memory always respected), as a fleet placed by what VMs used when created: hosts
    /// drift into contention as loads rise.
    Demand,
}

/// Headroom over the first demand sample under `InitialPlacement::Demand`.
pub const DEMAND_HEADROOM: f64 = 1.2;

impl std::str::FromStr for InitialPlacement {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(InitialPlacement::Full),
            "demand" => Ok(InitialPlacement::Demand),
            other => Err(format!(
                "unknown initial placement {other:?} (full, demand)"
            )),
        }
    }
}

/// The four VM types of the PlanetLab setup (MIPS, RAM MB), by contiguous quarters of the list.
pub const PLANETLAB_VM_TYPES: [(f64, u64); 4] =
    [(2500.0, 870), (2000.0, 1740), (1000.0, 1740), (500.0, 613)];

impl Fleet {
    /// Beloglazov & Buyya 2012 as CloudSim codes it: `hosts` alternating ML110 G4/G5, one VM
    /// per trace, types by quarters of the list unless `types` gives one per VM.
    pub fn planetlab(traces: Vec<Trace>, types: &[Option<usize>], hosts: usize) -> Result<Fleet> {
        if traces.is_empty() || hosts == 0 {
            return Err(SimError::Invalid(
                "need at least one trace and one host".into(),
            ));
        }
        let hosts = (0..hosts)
            .map(|i| {
                let g5 = i % 2 == 1;
                HostSpec {
                    pes: 2,
                    pe_mips: if g5 { 2660.0 } else { 1860.0 },
                    ram_mb: 4096,
                    bw_mbps: 1000.0,
                    power: if g5 {
                        PowerModel::ML110_G5
                    } else {
                        PowerModel::ML110_G4
                    },
                }
            })
            .collect();
        let quarter = traces.len().div_ceil(4);
        let vms = traces
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let ty = types
                    .get(i)
                    .copied()
                    .flatten()
                    .unwrap_or(i / quarter)
                    .min(3);
                let (mips, ram_mb) = PLANETLAB_VM_TYPES[ty];
                VmSpec {
                    pes: 1,
                    mips,
                    ram_mb,
                    bw_mbps: 100.0,
                    dirty_mb_s: 0.0,
                    workload: t.workload,
                }
            })
            .collect();
        Ok(Fleet {
            hosts,
            vms,
            interval_s: 300.0,
            duration_s: 86_400.0,
            migration: MigrationModel::cloudsim(),
            events: Vec::new(),
            cloudsim_ram: false,
            cloudsim_engine: false,
            spread_initial: false,
            initial_placement: InitialPlacement::Full,
        })
    }

    /// A synthetic fleet: hosts like the PlanetLab ones but with 8 cores and 32 GiB, VMs of the
    /// four types with a mix of diurnal, bursty and random-walk demand, pre-copy migrations.
    pub fn synthetic(hosts: usize, vms: usize, days: f64, seed: u64) -> Result<Fleet> {
        if hosts == 0 || vms == 0 || !positive(days) {
            return Err(SimError::Invalid(
                "synthetic fleet needs hosts, vms and days > 0".into(),
            ));
        }
        let mut r = rng(seed);
        let interval_s = 300.0;
        let hours = (days * 24.0).ceil() as usize + 1;
        let hosts = (0..hosts)
            .map(|i| HostSpec {
                pes: 8,
                pe_mips: if i % 2 == 1 { 2660.0 } else { 1860.0 },
                ram_mb: 32_768,
                bw_mbps: 10_000.0,
                power: if i % 2 == 1 {
                    PowerModel::ML110_G5
                } else {
                    PowerModel::ML110_G4
                },
            })
            .collect();
        let vms = (0..vms)
            .map(|i| {
                let (mips, ram_mb) = PLANETLAB_VM_TYPES[i % 4];
                VmSpec {
                    pes: 1,
                    mips,
                    ram_mb,
                    bw_mbps: 100.0,
                    dirty_mb_s: 40.0,
                    workload: Workload::synthetic(&mut r, interval_s, hours),
                }
            })
            .collect();
        Ok(Fleet {
            hosts,
            vms,
            interval_s,
            duration_s: days * 86_400.0,
            migration: MigrationModel::precopy(),
            events: Vec::new(),
            cloudsim_ram: false,
            cloudsim_engine: false,
            spread_initial: true,
            initial_placement: InitialPlacement::Full,
        })
    }

    /// A fleet from a TOML file (see docs/sim.md for the format); every group gives `count`.
    pub fn from_toml(path: &Path, seed: u64) -> Result<Fleet> {
        Self::from_toml_scaled(path, seed, None)
    }

    /// A generated fleet of the shape a TOML file describes (`tern sim --synthetic --shape`):
    /// `hosts` and `vms` are shared out over the groups by their `share` (or `count`, taken
    /// as a weight), and the run lasts `days`.
    pub fn from_shape(
        path: &Path,
        seed: u64,
        hosts: usize,
        vms: usize,
        days: f64,
    ) -> Result<Fleet> {
        Self::from_toml_scaled(path, seed, Some(Scale { hosts, vms, days }))
    }

    fn from_toml_scaled(path: &Path, seed: u64, scale: Option<Scale>) -> Result<Fleet> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: FleetToml = toml::from_str(&text).map_err(|e| SimError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        cfg.build(seed, scale).map_err(|msg| SimError::Config {
            path: path.to_path_buf(),
            msg,
        })
    }
}

/// Totals a shape file is scaled to.
#[derive(Debug, Clone, Copy)]
struct Scale {
    hosts: usize,
    vms: usize,
    days: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetToml {
    #[serde(default = "default_interval")]
    interval_s: f64,
    #[serde(default)]
    days: Option<f64>,
    #[serde(default)]
    migration: Option<MigrationModel>,
    host: Vec<HostGroup>,
    vm: Vec<VmGroup>,
    #[serde(default)]
    event: Vec<HostEvent>,
}

fn default_interval() -> f64 {
    300.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostGroup {
    #[serde(default)]
    count: Option<usize>,
    #[serde(default)]
    share: Option<f64>,
    pes: u32,
    pe_mips: f64,
    ram_mb: u64,
    bw_mbps: f64,
    power_w: [f64; 11],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmGroup {
    #[serde(default)]
    count: Option<usize>,
    #[serde(default)]
    share: Option<f64>,
    #[serde(default = "one")]
    pes: u32,
    mips: f64,
    ram_mb: u64,
    #[serde(default = "hundred")]
    bw_mbps: f64,
    #[serde(default)]
    dirty_mb_s: f64,
    /// diurnal | bursty | random_walk | trend | mixed
    #[serde(default = "mixed")]
    workload: String,
    /// Weights of the load patterns in this group (instead of one `workload`), e.g.
    /// `{ diurnal = 3, bursty = 1, trend = 1 }`.
    #[serde(default)]
    mix: Option<std::collections::BTreeMap<String, f64>>,
}

fn one() -> u32 {
    1
}
fn hundred() -> f64 {
    100.0
}
fn mixed() -> String {
    "mixed".into()
}

/// Group sizes: each group's `count`, or with a `Scale`, `total` shared out by weight
/// (`share`, else `count`) with the largest remainders rounded up, so the sizes add up.
fn group_sizes(
    groups: &[(Option<usize>, Option<f64>)],
    total: Option<usize>,
    what: &str,
) -> std::result::Result<Vec<usize>, String> {
    let Some(total) = total else {
        return groups
            .iter()
            .map(|&(c, _)| {
                c.ok_or_else(|| {
                    format!("every [[{what}]] needs a count (share is for --synthetic --shape)")
                })
            })
            .collect();
    };
    let weights: Vec<f64> = groups
        .iter()
        .map(|&(c, s)| s.or(c.map(|c| c as f64)).unwrap_or(f64::NAN))
        .collect();
    let sum: f64 = weights.iter().sum();
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || !positive(sum) {
        return Err(format!(
            "every [[{what}]] needs a share (or count) >= 0, and one above 0"
        ));
    }
    let exact: Vec<f64> = weights.iter().map(|w| w / sum * total as f64).collect();
    let mut sizes: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let short = total - sizes.iter().sum::<usize>();
    for &g in order.iter().take(short) {
        sizes[g] += 1;
    }
    Ok(sizes)
}

/// Load pattern names a [[vm]] group takes.
const PATTERNS: [&str; 5] = ["diurnal", "bursty", "random_walk", "trend", "mixed"];

impl VmGroup {
    fn workload(
        &self,
        r: &mut crate::workload::ChaCha8Rng,
        interval_s: f64,
        hours: usize,
    ) -> std::result::Result<Workload, String> {
        let pattern = match &self.mix {
            None => self.workload.clone(),
            Some(mix) => {
                if let Some(bad) = mix.keys().find(|k| !PATTERNS.contains(&k.as_str())) {
                    return Err(format!(
                        "unknown workload {bad:?} in mix ({})",
                        PATTERNS.join(", ")
                    ));
                }
                let total: f64 = mix.values().sum();
                if mix.values().any(|w| !w.is_finite() || *w < 0.0) || !positive(total) {
                    return Err("a vm mix needs weights >= 0, one above 0".into());
                }
                let mut x = rand::Rng::gen_range(r, 0.0..total);
                let mut pick = mix.keys().next().cloned().unwrap_or_default();
                for (name, w) in mix {
                    pick = name.clone();
                    if x < *w {
                        break;
                    }
                    x -= w;
                }
                pick
            }
        };
        Workload::by_pattern(&pattern, r, interval_s, hours)
            .ok_or_else(|| format!("unknown workload {pattern:?} ({})", PATTERNS.join(", ")))
    }
}

impl FleetToml {
    fn build(self, seed: u64, scale: Option<Scale>) -> std::result::Result<Fleet, String> {
        let host_groups: Vec<_> = self.host.iter().map(|g| (g.count, g.share)).collect();
        let host_sizes = group_sizes(&host_groups, scale.map(|s| s.hosts), "host")?;
        let vm_groups: Vec<_> = self.vm.iter().map(|g| (g.count, g.share)).collect();
        let vm_sizes = group_sizes(&vm_groups, scale.map(|s| s.vms), "vm")?;
        let days = match (scale, self.days) {
            (Some(s), _) => s.days,
            (None, Some(d)) => d,
            (None, None) => return Err("missing field `days`".into()),
        };
        if !positive(self.interval_s) || !positive(days) {
            return Err("interval_s and days must be positive".into());
        }
        if days > MAX_DAYS {
            return Err(format!("days = {days} is more than {MAX_DAYS}"));
        }
        for (what, sizes) in [("host", &host_sizes), ("vm", &vm_sizes)] {
            let n = sizes.iter().fold(0usize, |a, &b| a.saturating_add(b));
            if n > MAX_MACHINES {
                return Err(format!("{n} {what}s is more than {MAX_MACHINES}"));
            }
        }
        let mut r = rng(seed);
        let hours = (days * 24.0).ceil() as usize + 1;
        let mut hosts = Vec::new();
        for (g, &n) in self.host.iter().zip(&host_sizes) {
            if g.pes == 0 || !positive(g.pe_mips) || g.ram_mb == 0 || !positive(g.bw_mbps) {
                return Err("every [[host]] needs pes, pe_mips, ram_mb and bw_mbps > 0".into());
            }
            for _ in 0..n {
                hosts.push(HostSpec {
                    pes: g.pes,
                    pe_mips: g.pe_mips,
                    ram_mb: g.ram_mb,
                    bw_mbps: g.bw_mbps,
                    power: PowerModel { watts: g.power_w },
                });
            }
        }
        let mut vms = Vec::new();
        for (g, &n) in self.vm.iter().zip(&vm_sizes) {
            if g.pes == 0 || !positive(g.mips) || g.ram_mb == 0 {
                return Err("every [[vm]] needs pes, mips and ram_mb > 0".into());
            }
            for _ in 0..n {
                let workload = g.workload(&mut r, self.interval_s, hours)?;
                vms.push(VmSpec {
                    pes: g.pes,
                    mips: g.mips,
                    ram_mb: g.ram_mb,
                    bw_mbps: g.bw_mbps,
                    dirty_mb_s: g.dirty_mb_s,
                    workload,
                });
            }
        }
        if hosts.is_empty() || vms.is_empty() {
            return Err("need at least one host and one VM".into());
        }
        for e in &self.event {
            if e.host >= hosts.len() {
                return Err(format!(
                    "event names host {} but there are {}",
                    e.host,
                    hosts.len()
                ));
            }
        }
        Ok(Fleet {
            hosts,
            vms,
            interval_s: self.interval_s,
            duration_s: days * 86_400.0,
            migration: self.migration.unwrap_or_else(MigrationModel::precopy),
            events: self.event,
            cloudsim_ram: false,
            cloudsim_engine: false,
            // Best fit is quadratic in fleet size; generated fleets start round-robin.
            spread_initial: scale.is_some(),
            initial_placement: InitialPlacement::Full,
        })
    }
}

/// Most hosts, and most VMs, a fleet file may describe, and the longest run in days: a file
/// beyond them is refused instead of exhausting memory (or overflowing the hour count).
pub const MAX_MACHINES: usize = 10_000_000;
pub const MAX_DAYS: f64 = 36_600.0;

/// A finite number above zero (NaN and infinity are refused).
pub fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}
