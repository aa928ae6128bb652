//! VM selection of Beloglazov & Buyya 2012: which VM leaves an overloaded host. Minimum
//! migration time (MMT), maximum correlation (MC) and random selection (RS, seeded here;
//! CloudSim does not seed it).

/// A VM selection rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    Mmt,
    Mc,
    Rs,
}

impl Selector {
    pub fn by_name(name: &str) -> Option<Selector> {
        Some(match name {
            "mmt" => Selector::Mmt,
            "mc" => Selector::Mc,
            "rs" => Selector::Rs,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Selector::Mmt => "mmt",
            Selector::Mc => "mc",
            Selector::Rs => "rs",
        }
    }
}

/// MMT: the first VM with the least RAM (its migration is the shortest).
pub fn min_migration_time(ram_mb: &[u64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &r) in ram_mb.iter().enumerate() {
        if best.is_none_or(|b| r < ram_mb[b]) {
            best = Some(i);
        }
    }
    best
}

/// MC: the VM whose utilisation history the others' histories explain best (the highest R²
/// of a least-squares fit with intercept on the other VMs' histories), as CloudSim computes
/// it over the common length of the histories. None where CloudSim's regression refuses the
/// data (fewer samples than VMs, one VM, a singular design), so the caller falls back to MMT
/// as CloudSim does. A VM is only picked with R² > 0; otherwise the first one.
pub fn max_correlation(histories: &[&[f64]]) -> Option<usize> {
    let n = histories.len();
    let m = histories.iter().map(|h| h.len()).min()?;
    if n < 2 || m < n {
        return None;
    }
    let (mut best, mut best_r2) = (0, f64::MIN_POSITIVE);
    for i in 0..n {
        // Design: intercept column, then every other VM's history; m rows.
        let mut cols: Vec<Vec<f64>> = vec![vec![1.0; m]];
        cols.extend(
            (0..n)
                .filter(|&j| j != i)
                .map(|j| histories[j][..m].to_vec()),
        );
        let r2 = r_squared(cols, &histories[i][..m])?;
        if r2 > best_r2 {
            best_r2 = r2;
            best = i;
        }
    }
    Some(best)
}

/// R² = 1 - SSR / SST of the least-squares fit of `y` on the columns `cols` (the first one
/// the intercept), solved by Householder QR as commons-math's OLS does; None when a column
/// is exactly dependent on the earlier ones (its QR diagonal is 0: commons-math's singular
/// matrix, threshold 0).
pub fn r_squared(mut cols: Vec<Vec<f64>>, y: &[f64]) -> Option<f64> {
    let m = y.len();
    let p = cols.len();
    let mut qty = y.to_vec();
    for k in 0..p {
        let norm_sq: f64 = cols[k][k..].iter().map(|x| x * x).sum();
        let a = if cols[k][k] > 0.0 {
            -norm_sq.sqrt()
        } else {
            norm_sq.sqrt()
        };
        if a == 0.0 {
            return None;
        }
        cols[k][k] -= a;
        // Reflect the later columns and y by v = cols[k][k..].
        let (head, tail) = cols.split_at_mut(k + 1);
        let v = &head[k][k..];
        let denom = a * v[0];
        for c in tail.iter_mut() {
            let alpha = -v.iter().zip(&c[k..]).map(|(a, b)| a * b).sum::<f64>() / denom;
            for (x, vi) in c[k..].iter_mut().zip(v) {
                *x -= alpha * vi;
            }
        }
        let alpha = -v.iter().zip(&qty[k..]).map(|(a, b)| a * b).sum::<f64>() / denom;
        for (x, vi) in qty[k..].iter_mut().zip(v) {
            *x -= alpha * vi;
        }
    }
    // Residuals are the part of Q'y beyond the p fitted components.
    let ssr: f64 = qty[p.min(m)..].iter().map(|r| r * r).sum();
    let mean = y.iter().sum::<f64>() / m as f64;
    let sst: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    Some(1.0 - ssr / sst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmt_takes_the_first_vm_with_least_ram() {
        assert_eq!(min_migration_time(&[1740, 613, 870, 613]), Some(1));
        assert_eq!(min_migration_time(&[]), None);
    }

    #[test]
    fn r_squared_of_exact_and_noisy_fits() {
        // y = 1 + 2x exactly: R² = 1.
        let x = vec![1.0, 2.0, 3.0, 4.0];
        let y = [3.0, 5.0, 7.0, 9.0];
        let r2 = r_squared(vec![vec![1.0; 4], x.clone()], &y).expect("fit");
        assert!((r2 - 1.0).abs() < 1e-12);
        // y = 1, 3, 2, 4 on x = 1..4: slope 0.8, fitted 1.3, 2.1, 2.9, 3.7; SSR = 1.8, SST = 5.
        let r2 = r_squared(vec![vec![1.0; 4], x], &[1.0, 3.0, 2.0, 4.0]).expect("fit");
        assert!((r2 - 0.64).abs() < 1e-12, "{r2}");
        // A zero column is singular (commons-math refuses it; MC falls back to MMT).
        assert!(r_squared(vec![vec![1.0; 4], vec![0.0; 4]], &y).is_none());
    }

    #[test]
    fn mc_picks_the_vm_the_others_explain_best() {
        // VM 2 = VM 0 + VM 1 exactly; VMs 0 and 1 are only partly explained.
        let a = [0.1, 0.4, 0.2, 0.5, 0.3, 0.1];
        let b = [0.3, 0.1, 0.4, 0.2, 0.2, 0.5];
        let c: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        // With c = a + b each VM is an exact combination of the other two: all R² = 1, the
        // first wins (strictly greater needed to switch).
        assert_eq!(max_correlation(&[&a, &b, &c]), Some(0));
        let d = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3];
        let e: Vec<f64> = d.iter().map(|x| 0.5 * x + 0.1).collect();
        // d and e are perfectly correlated, b is not: d (first of the pair) is picked.
        assert_eq!(max_correlation(&[&b, &d, &e]), Some(1));
        // Too few samples for the regression, or one VM: no pick (fall back to MMT).
        assert_eq!(max_correlation(&[&a[..2], &b[..2], &c[..2]]), None);
        assert_eq!(max_correlation(&[&a]), None);
    }
}
