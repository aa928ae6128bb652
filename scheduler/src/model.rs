//! The snapshot: the serialisable description of a cluster the scheduler plans on.
//! Field names are the JSON format documented in docs/scheduler.md.
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Everything the scheduler needs to know about a cluster at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Seconds on the caller's clock; compared with `Vm::last_migrated_s` for the cooldown.
    #[serde(default)]
    pub now_s: f64,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    #[serde(default)]
    pub pools: Vec<Pool>,
    #[serde(default)]
    pub host_groups: Vec<HostGroup>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub in_flight: Vec<InFlight>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    #[default]
    Connected,
    EnteringMaintenance,
    InMaintenance,
    Down,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Connected => "connected",
            HostState::EnteringMaintenance => "entering-maintenance",
            HostState::InMaintenance => "in-maintenance",
            HostState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub id: String,
    /// Total CPU capacity in MHz (cores x clock).
    pub cpu_mhz: f64,
    pub memory_mib: f64,
    #[serde(default)]
    pub cpu_features: BTreeSet<String>,
    #[serde(default)]
    pub state: HostState,
}

/// Reservation / limit / shares for one resource of a VM (MHz or MiB).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alloc {
    #[serde(default)]
    pub reservation: f64,
    #[serde(default)]
    pub limit: Option<f64>,
    #[serde(default = "default_shares")]
    pub shares: f64,
}

fn default_shares() -> f64 {
    1000.0
}

impl Default for Alloc {
    fn default() -> Self {
        Alloc {
            reservation: 0.0,
            limit: None,
            shares: default_shares(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub id: String,
    /// Current host id (for `place`, ignored).
    #[serde(default)]
    pub host: String,
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Configured memory (what a migration copies).
    pub memory_mib: f64,
    /// CPU demand from load samples.
    #[serde(default)]
    pub cpu_demand_mhz: f64,
    /// Active (recently touched) memory from load samples.
    #[serde(default)]
    pub active_memory_mib: f64,
    /// Pages dirtied per second, in MiB/s: drives migration time.
    #[serde(default)]
    pub dirty_rate_mib_s: f64,
    #[serde(default)]
    pub cpu: Alloc,
    #[serde(default)]
    pub memory: Alloc,
    /// Resource pool id; none = directly under the cluster root.
    #[serde(default)]
    pub pool: Option<String>,
    /// CPU features the guest was started with: every destination must offer them.
    #[serde(default)]
    pub cpu_baseline: BTreeSet<String>,
    #[serde(default)]
    pub do_not_migrate: bool,
    /// When this VM last finished a migration (snapshot clock), for the cooldown.
    #[serde(default)]
    pub last_migrated_s: Option<f64>,
}

fn one() -> u32 {
    1
}

/// Reservation / limit / shares for one resource of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolAlloc {
    #[serde(default)]
    pub reservation: f64,
    #[serde(default)]
    pub limit: Option<f64>,
    #[serde(default = "default_pool_shares")]
    pub shares: f64,
    /// May the pool's children reserve more than the pool's own reservation?
    #[serde(default = "yes")]
    pub expandable: bool,
}

fn default_pool_shares() -> f64 {
    4000.0
}

fn yes() -> bool {
    true
}

impl Default for PoolAlloc {
    fn default() -> Self {
        PoolAlloc {
            reservation: 0.0,
            limit: None,
            shares: default_pool_shares(),
            expandable: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub id: String,
    /// Parent pool id; none = child of the cluster root.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub cpu: PoolAlloc,
    #[serde(default)]
    pub memory: PoolAlloc,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostGroup {
    pub id: String,
    pub hosts: Vec<String>,
}

/// VM-host rule modes; `must_*` are hard constraints, `should_*` preferences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostRuleMode {
    MustRunOn,
    ShouldRunOn,
    MustNotRunOn,
    ShouldNotRunOn,
}

impl HostRuleMode {
    pub fn is_must(self) -> bool {
        matches!(self, HostRuleMode::MustRunOn | HostRuleMode::MustNotRunOn)
    }
    pub fn wants_in_group(self) -> bool {
        matches!(self, HostRuleMode::MustRunOn | HostRuleMode::ShouldRunOn)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// All listed VMs on one host (hard).
    KeepTogether { id: String, vms: Vec<String> },
    /// All listed VMs on different hosts (hard).
    Separate { id: String, vms: Vec<String> },
    /// Listed VMs relative to a host group.
    VmHost {
        id: String,
        vms: Vec<String>,
        group: String,
        mode: HostRuleMode,
    },
}

impl Rule {
    pub fn id(&self) -> &str {
        match self {
            Rule::KeepTogether { id, .. } | Rule::Separate { id, .. } | Rule::VmHost { id, .. } => {
                id
            }
        }
    }
    pub fn vms(&self) -> &[String] {
        match self {
            Rule::KeepTogether { vms, .. }
            | Rule::Separate { vms, .. }
            | Rule::VmHost { vms, .. } => vms,
        }
    }
}

/// A migration already running: the VM counts on both ends and is not moved again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlight {
    pub vm: String,
    pub to: String,
}
