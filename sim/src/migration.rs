//! Migration cost: how long a live migration takes, how long the VM is paused, how many
//! bytes cross the wire. Either CloudSim's constant-rate model or a pre-copy model.
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum MigrationModel {
    /// time = RAM / (share x bandwidth), no downtime modelled (the published baseline).
    Cloudsim { bw_share: f64 },
    /// Iterative pre-copy: copy all memory, then what was dirtied meanwhile, until the rest
    /// fits the downtime target or `max_rounds` is reached; then pause and copy the rest.
    Precopy {
        bw_share: f64,
        max_rounds: u32,
        downtime_target_s: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationCost {
    pub total_s: f64,
    pub downtime_s: f64,
    pub bytes: f64,
    pub rounds: u32,
}

impl MigrationModel {
    pub fn cloudsim() -> Self {
        MigrationModel::Cloudsim { bw_share: 0.5 }
    }
    pub fn precopy() -> Self {
        MigrationModel::Precopy {
            bw_share: 0.5,
            max_rounds: 30,
            downtime_target_s: 0.3,
        }
    }

    /// Cost of moving `ram_mb` that dirties `dirty_mb_s` over a link of `link_mbps` (Mbit/s).
    pub fn cost(&self, ram_mb: f64, dirty_mb_s: f64, link_mbps: f64) -> MigrationCost {
        match *self {
            MigrationModel::Cloudsim { bw_share } => {
                let bw = link_mbps * bw_share / 8.0; // MB/s
                MigrationCost {
                    total_s: ram_mb / bw,
                    downtime_s: 0.0,
                    bytes: ram_mb * 1e6,
                    rounds: 1,
                }
            }
            MigrationModel::Precopy {
                bw_share,
                max_rounds,
                downtime_target_s,
            } => {
                let bw = link_mbps * bw_share / 8.0;
                let mut to_send = ram_mb;
                let (mut total, mut sent, mut rounds) = (0.0, 0.0, 0);
                while rounds < max_rounds.max(1) && to_send / bw > downtime_target_s {
                    let t = to_send / bw;
                    total += t;
                    sent += to_send;
                    rounds += 1;
                    to_send = (dirty_mb_s * t).min(ram_mb);
                }
                let downtime = to_send / bw;
                MigrationCost {
                    total_s: total + downtime,
                    downtime_s: downtime,
                    bytes: (sent + to_send) * 1e6,
                    rounds: rounds + 1,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudsim_model_matches_ram_over_half_bandwidth() {
        let c = MigrationModel::cloudsim().cost(870.0, 0.0, 1000.0);
        assert!((c.total_s - 13.92).abs() < 1e-9);
        assert_eq!(c.downtime_s, 0.0);
    }

    #[test]
    fn precopy_converges_and_dirtier_guests_take_longer() {
        let m = MigrationModel::precopy();
        let idle = m.cost(1024.0, 0.0, 1000.0);
        let busy = m.cost(1024.0, 30.0, 1000.0);
        assert!(busy.total_s > idle.total_s);
        assert!(busy.rounds > idle.rounds);
        assert!(busy.downtime_s <= 0.3 + 1e-9);
        // Dirtying faster than the link: stops at max_rounds with a long pause.
        let hot = m.cost(1024.0, 100.0, 1000.0);
        assert!(hot.downtime_s > 0.3);
        assert_eq!(hot.rounds, 31);
    }
}
