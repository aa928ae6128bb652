//! Host power model: measured watts at 0, 10, ..., 100 % CPU load, linear in between
//! (the SPECpower tables CloudSim ships for its PlanetLab experiments).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerModel {
    /// Watts at 0 %, 10 %, ..., 100 % utilisation.
    pub watts: [f64; 11],
}

impl PowerModel {
    /// HP ProLiant ML110 G4 (Xeon 3040), as used by Beloglazov & Buyya 2012.
    pub const ML110_G4: PowerModel = PowerModel {
        watts: [
            86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
        ],
    };
    /// HP ProLiant ML110 G5 (Xeon 3075).
    pub const ML110_G5: PowerModel = PowerModel {
        watts: [
            93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
        ],
    };

    /// Power draw at `utilization` (0..=1, clamped) of a powered-on host.
    pub fn watts_at(&self, utilization: f64) -> f64 {
        let u = utilization.clamp(0.0, 1.0) * 10.0;
        let lo = (u.floor() as usize).min(10);
        let hi = (u.ceil() as usize).min(10);
        if lo == hi {
            return self.watts[lo];
        }
        self.watts[lo] + (self.watts[hi] - self.watts[lo]) * (u - lo as f64)
    }

    /// Energy in joules over `dt` seconds while utilisation moves from `from` to `to`:
    /// the trapezoid of the two power draws. A host at 0 % at the start of the interval is
    /// switched off and draws nothing (the convention of the published baseline).
    pub fn energy_joules(&self, from: f64, to: f64, dt: f64) -> f64 {
        if from <= 0.0 {
            return 0.0;
        }
        (self.watts_at(from) + self.watts_at(to)) / 2.0 * dt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_between_measured_points() {
        let m = PowerModel::ML110_G4;
        assert_eq!(m.watts_at(0.0), 86.0);
        assert_eq!(m.watts_at(1.0), 117.0);
        assert!((m.watts_at(0.05) - 87.7).abs() < 1e-9);
        assert!((m.watts_at(0.95) - 115.5).abs() < 1e-9);
    }

    #[test]
    fn energy_is_trapezoid_and_zero_when_off() {
        let m = PowerModel::ML110_G5;
        assert_eq!(m.energy_joules(0.0, 0.5, 300.0), 0.0);
        let e = m.energy_joules(0.5, 1.0, 300.0);
        assert!((e - (116.0 + 135.0) / 2.0 * 300.0).abs() < 1e-9);
    }
}
