//! The hosts power-aware best fit rates, indexed so that a search looks at few of them.
//!
//! Idle hosts (usable, nothing planned, measured at 0 %) of one spec rate identically for
//! every VM, so only the lowest-numbered one of each spec is rated. Every other usable host is
//! busy; with buckets on, busy hosts are kept per spec in buckets of planned load, and each
//! bucket has a lower bound on the power rise of any of its hosts for a VM of a given size
//! (the power curve is piecewise linear, so the rise P(x + r) - P(x) over a bucket's loads is
//! smallest at its ends or at a breakpoint). A search rates buckets from the lowest bound up
//! and stops at the first bound above the best rise found, so it finds the host a scan of all
//! hosts finds (the least rise, the lowest number on a tie) while rating few of them.
use crate::power::PowerModel;
use std::collections::BTreeSet;

/// Buckets of planned load per spec.
pub const BUCKETS: usize = 64;
/// Slack on bounds for floating-point rounding (watts).
const SLACK_W: f64 = 1e-9;

const NOWHERE: usize = usize::MAX;

/// Where a host stands for best fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Class {
    /// Down or in maintenance: never a destination.
    Unusable,
    Idle,
    /// Planned load / capacity, its power at that load minus its power now, and LR's
    /// prediction from its history alone where LR would test it (see `LrQuery`).
    Busy {
        load: f64,
        delta_w: f64,
        lr_predicted: Option<f64>,
        /// MIPS and memory (MB) it has left (u64::MAX where memory is not checked).
        available: f64,
        free_ram: u64,
    },
}

/// LR's overload test of the VM being placed, for skipping whole buckets: a host is
/// overloaded with the VM when (its prediction + share x the VM's prediction) x safety >= 1,
/// share = the VM's MIPS over the host's (LR's prediction is linear in the history).
#[derive(Debug, Clone, Copy)]
pub struct LrQuery {
    pub vm_mips: f64,
    pub vm_predicted: f64,
    pub safety: f64,
}

pub struct Candidates {
    /// Each host's spec number.
    pub spec_of: Vec<usize>,
    power: Vec<PowerModel>,
    cap: Vec<f64>,
    /// Per spec: its idle hosts, ordered by number.
    idle: Vec<BTreeSet<usize>>,
    busy: Vec<usize>,
    busy_pos: Vec<usize>,
    buckets: Option<Buckets>,
}

struct Buckets {
    /// [spec][bucket]: busy hosts without an LR prediction.
    hosts: Vec<Vec<Vec<usize>>>,
    /// [spec][bucket]: busy hosts with one, by prediction (so a search takes only those
    /// that can pass LR's test with the VM).
    by_lr: Vec<Vec<BTreeSet<(u64, usize)>>>,
    /// [spec][bucket]: the least of the hosts' `delta_w`.
    min_delta: Vec<Vec<f64>>,
    /// [spec][bucket]: the most MIPS and memory any of the hosts has left: a VM larger than
    /// either fits no host of the bucket.
    max_available: Vec<Vec<f64>>,
    max_free_ram: Vec<Vec<u64>>,
    /// Per host: (spec, bucket, position) or NOWHERE, and the LR prediction it was put in with.
    at: Vec<(usize, usize, usize)>,
    lr_of: Vec<Option<f64>>,
    /// Per host: the class it was put in with.
    class_of: Vec<Class>,
}

impl Candidates {
    /// `specs[h]`: (power model, capacity in MIPS) of host h; hosts with equal specs share a
    /// spec number. Every host starts unusable; `set` classifies it.
    pub fn new(specs: &[(&PowerModel, f64, usize)]) -> Candidates {
        let n_specs = specs.iter().map(|s| s.2 + 1).max().unwrap_or(0);
        let mut power = vec![PowerModel { watts: [0.0; 11] }; n_specs];
        let mut cap = vec![0.0; n_specs];
        for &(p, c, s) in specs {
            power[s] = p.clone();
            cap[s] = c;
        }
        Candidates {
            spec_of: specs.iter().map(|s| s.2).collect(),
            power,
            cap,
            idle: vec![BTreeSet::new(); n_specs],
            busy: Vec::new(),
            busy_pos: vec![NOWHERE; specs.len()],
            buckets: None,
        }
    }

    /// Keeps busy hosts in buckets of planned load from now on (a search then rates few).
    pub fn with_buckets(&mut self) {
        let n_specs = self.cap.len();
        let mut b = Buckets {
            hosts: vec![vec![Vec::new(); BUCKETS]; n_specs],
            min_delta: vec![vec![f64::INFINITY; BUCKETS]; n_specs],
            by_lr: vec![vec![BTreeSet::new(); BUCKETS]; n_specs],
            max_available: vec![vec![f64::NEG_INFINITY; BUCKETS]; n_specs],
            max_free_ram: vec![vec![0; BUCKETS]; n_specs],
            at: vec![(NOWHERE, NOWHERE, NOWHERE); self.spec_of.len()],
            lr_of: vec![None; self.spec_of.len()],
            class_of: vec![Class::Unusable; self.spec_of.len()],
        };
        // Busy hosts are re-inserted by the caller's next `set`; none is kept here.
        for &h in &self.busy {
            b.at[h] = (NOWHERE, NOWHERE, NOWHERE);
        }
        self.buckets = Some(b);
    }

    pub fn set(&mut self, h: usize, class: Class) {
        let spec = self.spec_of[h];
        self.idle[spec].remove(&h);
        let p = std::mem::replace(&mut self.busy_pos[h], NOWHERE);
        if p != NOWHERE {
            self.busy.swap_remove(p);
            if let Some(&moved) = self.busy.get(p) {
                self.busy_pos[moved] = p;
            }
        }
        if let Some(b) = &mut self.buckets {
            b.remove(h);
        }
        match class {
            Class::Unusable => {}
            Class::Idle => {
                self.idle[spec].insert(h);
            }
            Class::Busy { load, .. } => {
                self.busy_pos[h] = self.busy.len();
                self.busy.push(h);
                if let Some(b) = &mut self.buckets {
                    let k = ((load * BUCKETS as f64).floor().max(0.0) as usize).min(BUCKETS - 1);
                    b.insert(h, spec, k, class);
                }
            }
        }
    }

    /// The lowest-numbered idle host of each spec that `excluded` allows.
    pub fn idle_representatives<'a>(
        &'a self,
        excluded: &'a [bool],
    ) -> impl Iterator<Item = usize> + 'a {
        self.idle
            .iter()
            .filter_map(|set| set.iter().copied().find(|&h| !excluded[h]))
    }

    pub fn busy(&self) -> &[usize] {
        &self.busy
    }

    pub fn has_buckets(&self) -> bool {
        self.buckets.is_some()
    }

    /// Non-empty buckets with a lower bound on the power rise of their hosts for a VM of
    /// `req` MIPS, lowest bound first: (bound, spec, bucket). With `lr`, buckets where every
    /// host is surely overloaded with the VM are left out.
    pub fn buckets_by_bound(
        &self,
        req: f64,
        ram: u64,
        lr: Option<LrQuery>,
    ) -> Vec<(f64, usize, usize)> {
        let Some(b) = &self.buckets else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (s, per_spec) in b.hosts.iter().enumerate() {
            let rho = req / self.cap[s];
            for (k, hosts) in per_spec.iter().enumerate() {
                let mut with_lr = b.by_lr[s][k].iter().map(|e| e.0);
                let least_lr = with_lr.next().map(key_value);
                if hosts.is_empty() && least_lr.is_none() {
                    continue;
                }
                let lo = k as f64 / BUCKETS as f64;
                // A host above 1 - rho cannot take the VM (it would pass 100 %).
                if lo > 1.0 - rho + 1e-9
                    || req > b.max_available[s][k]
                    || ram > b.max_free_ram[s][k]
                {
                    continue;
                }
                if let (Some(q), Some(least), true) = (lr, least_lr, hosts.is_empty()) {
                    if least > q.limit(self.cap[s]) {
                        continue;
                    }
                }
                let hi = if k + 1 == BUCKETS {
                    1.0 - rho
                } else {
                    ((k + 1) as f64 / BUCKETS as f64).min(1.0 - rho)
                }
                .max(lo);
                let bound = min_rise(&self.power[s], lo, hi, rho) + b.min_delta[s][k] - SLACK_W;
                out.push((bound, s, k));
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }

    /// The hosts of a bucket that may take the VM: with `lr`, only those whose LR prediction
    /// can pass its test with the VM (and every host without a prediction).
    pub fn bucket(
        &self,
        spec: usize,
        k: usize,
        lr: Option<LrQuery>,
    ) -> impl Iterator<Item = usize> + '_ {
        let b = self.buckets.as_ref();
        let plain = b.map_or(&[][..], |b| b.hosts[spec][k].as_slice());
        let limit = lr.map_or(u64::MAX, |q| value_key(q.limit(self.cap[spec])));
        let ranked = b
            .into_iter()
            .flat_map(move |b| b.by_lr[spec][k].range(..=(limit, usize::MAX)).map(|e| e.1));
        plain.iter().copied().chain(ranked)
    }
}

impl LrQuery {
    /// The highest host prediction that can pass LR's test with this VM on a host of
    /// `cap` MIPS (with slack for rounding: the exact test decides).
    fn limit(&self, cap: f64) -> f64 {
        (1.0 + 1e-9) / self.safety - self.vm_mips / cap * self.vm_predicted + 1e-9
    }
}

/// An order-preserving u64 key of an f64 (total order).
fn value_key(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

fn key_value(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
}

impl Buckets {
    fn remove(&mut self, h: usize) {
        let (s, k, p) = std::mem::replace(&mut self.at[h], (NOWHERE, NOWHERE, NOWHERE));
        if s == NOWHERE {
            return;
        }
        match self.lr_of[h].take() {
            Some(pred) => {
                self.by_lr[s][k].remove(&(value_key(pred), h));
            }
            None => {
                let list = &mut self.hosts[s][k];
                list.swap_remove(p);
                if let Some(&moved) = list.get(p) {
                    self.at[moved].2 = p;
                }
            }
        }
        self.class_of[h] = Class::Unusable;
        // Recompute the bucket's extremes without the host (buckets hold tens of hosts).
        let (mut d, mut a, mut r) = (f64::INFINITY, f64::NEG_INFINITY, 0);
        let ranked = self.by_lr[s][k].iter().map(|e| e.1);
        for x in self.hosts[s][k].iter().copied().chain(ranked) {
            if let Class::Busy {
                delta_w,
                available,
                free_ram,
                ..
            } = self.class_of[x]
            {
                d = d.min(delta_w);
                a = a.max(available);
                r = r.max(free_ram);
            }
        }
        self.min_delta[s][k] = d;
        self.max_available[s][k] = a;
        self.max_free_ram[s][k] = r;
    }

    fn insert(&mut self, h: usize, s: usize, k: usize, class: Class) {
        let Class::Busy {
            delta_w,
            lr_predicted,
            available,
            free_ram,
            ..
        } = class
        else {
            return;
        };
        match lr_predicted {
            Some(pred) => {
                self.at[h] = (s, k, NOWHERE);
                self.by_lr[s][k].insert((value_key(pred), h));
            }
            None => {
                self.at[h] = (s, k, self.hosts[s][k].len());
                self.hosts[s][k].push(h);
            }
        }
        self.lr_of[h] = lr_predicted;
        self.class_of[h] = class;
        let m = &mut self.min_delta[s][k];
        *m = m.min(delta_w);
        let a = &mut self.max_available[s][k];
        *a = a.max(available);
        let r = &mut self.max_free_ram[s][k];
        *r = (*r).max(free_ram);
    }
}

/// The least of P(x + rho) - P(x) for x in [lo, hi]: P is linear between its 10 % points, so
/// the least is at an end or where x or x + rho crosses a 10 % point.
pub fn min_rise(p: &PowerModel, lo: f64, hi: f64, rho: f64) -> f64 {
    let rise = |x: f64| p.watts_at(x + rho) - p.watts_at(x);
    let mut best = rise(lo).min(rise(hi));
    for i in 0..=10 {
        let point = i as f64 / 10.0;
        for x in [point, point - rho] {
            if x > lo && x < hi {
                best = best.min(rise(x));
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_rise_is_a_lower_bound_over_the_interval() {
        let p = PowerModel::ML110_G4;
        for &(lo, hi, rho) in &[(0.0, 0.05, 0.03), (0.58, 0.62, 0.07), (0.7, 0.95, 0.05)] {
            let bound = min_rise(&p, lo, hi, rho);
            let mut seen = f64::INFINITY;
            for i in 0..=1000 {
                let x = lo + (hi - lo) * i as f64 / 1000.0;
                let r = p.watts_at(x + rho) - p.watts_at(x);
                assert!(r >= bound - 1e-9, "{r} below {bound} at {x}");
                seen = seen.min(r);
            }
            assert!(
                (seen - bound).abs() < 1e-6,
                "bound {bound} not reached ({seen})"
            );
        }
    }

    #[test]
    fn value_keys_order_as_the_values() {
        let xs = [-3.5, -0.0, 0.0, 1e-12, 0.83, 1.0, 7.0];
        for w in xs.windows(2) {
            assert!(value_key(w[0]) <= value_key(w[1]), "{w:?}");
        }
        for x in xs {
            assert_eq!(key_value(value_key(x)), x);
        }
    }

    #[test]
    fn buckets_track_moves_between_classes() {
        let g4 = PowerModel::ML110_G4;
        let mut c = Candidates::new(&[(&g4, 1000.0, 0), (&g4, 1000.0, 0), (&g4, 1000.0, 0)]);
        c.with_buckets();
        c.set(0, Class::Idle);
        c.set(
            1,
            Class::Busy {
                load: 0.5,
                delta_w: 0.0,
                lr_predicted: Some(0.8),
                available: 500.0,
                free_ram: 1000,
            },
        );
        c.set(
            2,
            Class::Busy {
                load: 0.99,
                delta_w: 0.0,
                lr_predicted: None,
                available: 10.0,
                free_ram: 1000,
            },
        );
        assert_eq!(c.busy().len(), 2);
        assert_eq!(c.idle_representatives(&[false; 3]).collect::<Vec<_>>(), [0]);
        assert!(c
            .idle_representatives(&[true, false, false])
            .next()
            .is_none());
        // A VM of 10 % fits only host 1's bucket (host 2 would pass 100 %).
        let order = c.buckets_by_bound(100.0, 500, None);
        assert_eq!(order.len(), 1);
        // Too large for what host 1 has left: no bucket.
        assert!(c.buckets_by_bound(600.0, 500, None).is_empty());
        assert!(c.buckets_by_bound(100.0, 2000, None).is_empty());
        assert_eq!(
            c.bucket(order[0].1, order[0].2, None).collect::<Vec<_>>(),
            [1]
        );
        // LR: host 1 predicts 0.8; with a VM predicting 0.5 of its 100 MIPS it reaches
        // (0.8 + 0.1 x 0.5) x 1.2 = 1.02: surely overloaded, its bucket is skipped.
        let q = |p| LrQuery {
            vm_mips: 100.0,
            vm_predicted: p,
            safety: 1.2,
        };
        assert!(c.buckets_by_bound(100.0, 500, Some(q(0.5))).is_empty());
        assert_eq!(c.buckets_by_bound(100.0, 500, Some(q(0.1))).len(), 1);
        c.set(1, Class::Unusable);
        assert!(c.buckets_by_bound(100.0, 500, None).is_empty());
        assert_eq!(c.busy(), [2]);
    }
}
