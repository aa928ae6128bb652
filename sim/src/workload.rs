//! CPU demand of one VM over time, as a fraction (0..=1) of the VM's MIPS.
//!
//! Trace workloads hold their samples; synthetic ones are computed from a few parameters and
//! a seeded hash, so 200,000 VMs over a week cost a few bytes each instead of gigabytes.
use rand::{Rng, SeedableRng};
pub use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum Workload {
    /// Samples `interval_s` apart; linear in between, the last sample held afterwards.
    Samples {
        samples: Arc<[f64]>,
        interval_s: f64,
    },
    /// Day/night sine around `base` with hash noise on every sample.
    Diurnal {
        base: f32,
        amplitude: f32,
        phase: f32,
        noise: f32,
        seed: u64,
        interval_s: f64,
    },
    /// A quiet `base` with bursts to `peak` in a `burst_prob` share of the samples.
    Bursty {
        base: f32,
        peak: f32,
        burst_prob: f32,
        seed: u64,
        interval_s: f64,
    },
    /// A bounded random walk with hourly steps (stored as percent), linear in between.
    RandomWalk { hourly: Arc<[u8]> },
    /// Demand that grows (or shrinks) steadily: `start` plus `per_day` for every simulated
    /// day, with hash noise on every sample (a service gaining users, a batch backlog).
    Trend {
        start: f32,
        per_day: f32,
        noise: f32,
        seed: u64,
        interval_s: f64,
    },
}

impl Workload {
    /// Demand at time `t` seconds.
    pub fn at(&self, t: f64) -> f64 {
        match self {
            Workload::Samples {
                samples,
                interval_s,
            } => interpolate(samples, *interval_s, t, |v| v),
            Workload::Diurnal {
                base,
                amplitude,
                phase,
                noise,
                seed,
                interval_s,
            } => {
                let k = (t / interval_s).floor() as u64;
                let day = std::f64::consts::TAU * t / 86_400.0;
                let n = (unit_hash(*seed, k) - 0.5) * 2.0 * *noise as f64;
                (*base as f64 + *amplitude as f64 * (day + *phase as f64).sin() + n).clamp(0.0, 1.0)
            }
            Workload::Bursty {
                base,
                peak,
                burst_prob,
                seed,
                interval_s,
            } => {
                let k = (t / interval_s).floor() as u64;
                if unit_hash(*seed, k) < *burst_prob as f64 {
                    *peak as f64
                } else {
                    *base as f64
                }
            }
            Workload::RandomWalk { hourly } => interpolate(hourly, 3600.0, t, |v| v as f64 / 100.0),
            Workload::Trend {
                start,
                per_day,
                noise,
                seed,
                interval_s,
            } => {
                let k = (t / interval_s).floor() as u64;
                let n = (unit_hash(*seed, k) - 0.5) * 2.0 * *noise as f64;
                (*start as f64 + *per_day as f64 * t / 86_400.0 + n).clamp(0.0, 1.0)
            }
        }
    }

    pub fn diurnal(rng: &mut ChaCha8Rng, interval_s: f64) -> Workload {
        Workload::Diurnal {
            base: rng.gen_range(0.2..0.5),
            amplitude: rng.gen_range(0.05..0.3),
            phase: rng.gen_range(0.0..std::f32::consts::TAU),
            noise: rng.gen_range(0.0..0.1),
            seed: rng.gen(),
            interval_s,
        }
    }

    pub fn bursty(rng: &mut ChaCha8Rng, interval_s: f64) -> Workload {
        Workload::Bursty {
            base: rng.gen_range(0.05..0.25),
            peak: rng.gen_range(0.6..1.0),
            burst_prob: rng.gen_range(0.02..0.15),
            seed: rng.gen(),
            interval_s,
        }
    }

    pub fn random_walk(rng: &mut ChaCha8Rng, hours: usize) -> Workload {
        let mut v: i32 = rng.gen_range(10..70);
        let hourly: Vec<u8> = (0..=hours)
            .map(|_| {
                v = (v + rng.gen_range(-8..=8)).clamp(0, 100);
                v as u8
            })
            .collect();
        Workload::RandomWalk {
            hourly: hourly.into(),
        }
    }

    pub fn trend(rng: &mut ChaCha8Rng, interval_s: f64) -> Workload {
        Workload::Trend {
            start: rng.gen_range(0.1..0.5),
            per_day: rng.gen_range(-0.05..0.15),
            noise: rng.gen_range(0.0..0.08),
            seed: rng.gen(),
            interval_s,
        }
    }

    /// A workload of the named pattern: diurnal, bursty, random_walk, trend or mixed (one of
    /// the first three, chosen by the generator).
    pub fn by_pattern(
        pattern: &str,
        rng: &mut ChaCha8Rng,
        interval_s: f64,
        hours: usize,
    ) -> Option<Workload> {
        Some(match pattern {
            "diurnal" => Workload::diurnal(rng, interval_s),
            "bursty" => Workload::bursty(rng, interval_s),
            "random_walk" => Workload::random_walk(rng, hours),
            "trend" => Workload::trend(rng, interval_s),
            "mixed" => Workload::synthetic(rng, interval_s, hours),
            _ => return None,
        })
    }

    /// One of the three synthetic shapes, chosen by the seeded generator.
    pub fn synthetic(rng: &mut ChaCha8Rng, interval_s: f64, hours: usize) -> Workload {
        match rng.gen_range(0..3) {
            0 => Workload::diurnal(rng, interval_s),
            1 => Workload::bursty(rng, interval_s),
            _ => Workload::random_walk(rng, hours),
        }
    }
}

/// Linear interpolation between samples `interval` apart, holding the last one.
fn interpolate<T: Copy>(samples: &[T], interval: f64, t: f64, f: impl Fn(T) -> f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let pos = (t / interval).max(0.0);
    let i = pos.floor() as usize;
    if i + 1 >= samples.len() {
        return f(samples[samples.len() - 1]);
    }
    let frac = pos - i as f64;
    let a = f(samples[i]);
    if frac == 0.0 {
        return a;
    }
    a + (f(samples[i + 1]) - a) * frac
}

/// A deterministic value in [0, 1) from (seed, k): splitmix64.
fn unit_hash(seed: u64, k: u64) -> f64 {
    let mut z = seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_interpolate_and_hold_last() {
        let w = Workload::Samples {
            samples: vec![0.1f64, 0.3, 0.5].into(),
            interval_s: 300.0,
        };
        assert!((w.at(0.0) - 0.1).abs() < 1e-6);
        assert!((w.at(150.0) - 0.2).abs() < 1e-6);
        assert!((w.at(600.0) - 0.5).abs() < 1e-6);
        assert!((w.at(10_000.0) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn trend_moves_by_its_slope_per_day() {
        let w = Workload::Trend {
            start: 0.2,
            per_day: 0.1,
            noise: 0.0,
            seed: 1,
            interval_s: 300.0,
        };
        assert!((w.at(0.0) - 0.2).abs() < 1e-6);
        assert!((w.at(3.0 * 86_400.0) - 0.5).abs() < 1e-6);
        assert_eq!(w.at(100.0 * 86_400.0), 1.0);
    }

    #[test]
    fn synthetic_shapes_stay_in_range_and_repeat_under_a_seed() {
        let mut a = rng(7);
        let mut b = rng(7);
        for i in 0..40 {
            let (wa, wb) = if i % 4 == 3 {
                (
                    Workload::trend(&mut a, 300.0),
                    Workload::trend(&mut b, 300.0),
                )
            } else {
                (
                    Workload::synthetic(&mut a, 300.0, 48),
                    Workload::synthetic(&mut b, 300.0, 48),
                )
            };
            for k in 0..500 {
                let t = k as f64 * 137.0;
                let (x, y) = (wa.at(t), wb.at(t));
                assert!((0.0..=1.0).contains(&x));
                assert_eq!(x, y);
            }
        }
    }
}
