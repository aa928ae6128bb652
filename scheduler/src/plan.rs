//! Plans and their moves, the planner's settings, and the migration cost model.
use serde::{Deserialize, Serialize};

/// Why a move is proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// The host is entering maintenance.
    Maintenance,
    /// A hard rule (must / must-not / keep-together / separate) is broken where the VM runs.
    RuleViolation,
    /// The host's memory or CPU reservations exceed its capacity.
    Overcommit,
    /// A `should` rule is broken where the VM runs.
    Preference,
    /// Load balancing.
    Balance,
}

/// One proposed migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// 1 = mandatory ... 5 = smallest gain. A threshold N applies moves of priority <= N.
    pub priority: u8,
    pub kind: MoveKind,
    pub reason: String,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// Estimated migration time; none if the VM dirties memory faster than the link.
    pub est_migration_s: Option<f64>,
}

/// A VM that should move but cannot, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unresolved {
    pub vm: String,
    pub host: String,
    pub reason: String,
}

/// The result of one balancing pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub threshold: u8,
    /// Imbalance the pass aims at (none for threshold 1: mandatory moves only).
    pub target_imbalance: Option<f64>,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub moves: Vec<Move>,
    pub unresolved: Vec<Unresolved>,
    /// Why the pass stopped balancing.
    pub stop_reason: String,
}

/// Planner settings. `Default` is DRS's default (threshold 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Migration threshold 1 (conservative: mandatory only) .. 5 (aggressive).
    pub threshold: u8,
    /// Moves per pass, all kinds included.
    pub max_moves: usize,
    /// Balancing moves touching one host (as source or destination) per pass.
    pub max_moves_per_host: usize,
    /// A VM migrated less than this long ago (snapshot clock) is not moved for balance.
    pub cooldown_s: f64,
    /// Migration link bandwidth per migration, MiB/s.
    pub bandwidth_mib_s: f64,
    /// Balancing interval: a move's cost is the share of it the migration occupies.
    pub interval_s: f64,
    /// Imbalance a move must gain per interval-share of migration time (cost-benefit filter).
    pub cost_weight: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            threshold: 3,
            max_moves: 64,
            max_moves_per_host: 8,
            cooldown_s: 900.0,
            bandwidth_mib_s: 1000.0,
            interval_s: 300.0,
            cost_weight: 0.05,
        }
    }
}

impl Config {
    pub fn with_threshold(threshold: u8) -> Config {
        Config {
            threshold,
            ..Config::default()
        }
    }

    /// Imbalance at which balancing stops for this threshold (none: balance nothing).
    pub fn target_imbalance(&self) -> Option<f64> {
        match self.threshold {
            0 | 1 => None,
            2 => Some(0.15),
            3 => Some(0.10),
            4 => Some(0.05),
            _ => Some(0.02),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), crate::SchedError> {
        let bad = |m: &str| Err(crate::SchedError::Config(m.to_string()));
        if !(1..=5).contains(&self.threshold) {
            return bad("threshold must be 1..5");
        }
        if !(self.bandwidth_mib_s.is_finite() && self.bandwidth_mib_s > 0.0) {
            return bad("bandwidth_mib_s must be > 0");
        }
        if !(self.interval_s.is_finite() && self.interval_s > 0.0) {
            return bad("interval_s must be > 0");
        }
        if !(self.cost_weight.is_finite() && self.cost_weight >= 0.0) {
            return bad("cost_weight must be >= 0");
        }
        if !self.cooldown_s.is_finite() {
            return bad("cooldown_s must be finite");
        }
        Ok(())
    }

    /// Pre-copy time for `memory_mib` dirtied at `dirty_mib_s`: M / (B - D); none if D >= B.
    pub fn migration_secs(&self, memory_mib: f64, dirty_mib_s: f64) -> Option<f64> {
        let net = self.bandwidth_mib_s - dirty_mib_s;
        (net > 0.0).then(|| memory_mib / net)
    }

    /// Imbalance units a move must gain to pay for its migration time.
    pub fn move_cost(&self, secs: f64) -> f64 {
        self.cost_weight * secs / self.interval_s
    }
}

/// Priority of a balancing move from the imbalance it removes.
pub fn balance_priority(gain: f64) -> u8 {
    if gain >= 0.05 {
        2
    } else if gain >= 0.02 {
        3
    } else if gain >= 0.005 {
        4
    } else {
        5
    }
}
