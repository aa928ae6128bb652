//! Host overload detection of Beloglazov & Buyya 2012, as CloudSim 4.0 codes it: a static
//! threshold (THR), two adaptive thresholds from the spread of the host's utilisation history
//! (IQR, MAD) and local regression on it (LR, LRR). Pure functions of the history, so each
//! rule is tested on hand-computed inputs.

/// An overload rule and its parameter (threshold or safety parameter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detector {
    /// Overloaded when requested MIPS / capacity > the threshold.
    Thr(f64),
    /// Threshold 1 - s x IQR of the history (at least 12 samples, else THR 0.7).
    Iqr(f64),
    /// Threshold 1 - s x MAD of the history (at least 12 samples, else THR 0.7).
    Mad(f64),
    /// Least squares on the last 10 samples, predicted x s >= 1 (else THR 0.7).
    Lr(f64),
    /// Robust local regression. CloudSim's bisquare weights are never applied (its weighted
    /// regression only weights when 40 % of the weights are zero, and none can be), so it
    /// predicts exactly as LR; kept as its own name to match the published family.
    Lrr(f64),
}

/// The static threshold the adaptive rules fall back to on short histories (CloudSim's
/// examples pass THR 0.7 as the fallback policy).
pub const FALLBACK_THRESHOLD: f64 = 0.7;
/// Samples IQR and MAD need ("12 has been suggested as a safe value").
pub const MIN_SPREAD_SAMPLES: usize = 12;
/// Samples the regression uses.
pub const LR_WINDOW: usize = 10;

impl Detector {
    /// CLI name prefix and CloudSim's default parameter.
    pub fn by_name(name: &str) -> Option<Detector> {
        Some(match name {
            "thr" => Detector::Thr(0.8),
            "iqr" => Detector::Iqr(1.5),
            "mad" => Detector::Mad(2.5),
            "lr" => Detector::Lr(1.2),
            "lrr" => Detector::Lrr(1.2),
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Detector::Thr(_) => "thr",
            Detector::Iqr(_) => "iqr",
            Detector::Mad(_) => "mad",
            Detector::Lr(_) => "lr",
            Detector::Lrr(_) => "lrr",
        }
    }

    /// Whether the host is overloaded. `history`: the host's utilisation samples, most recent
    /// first, zero tail trimmed; `asked`: requested MIPS / capacity now; `intervals`: how many
    /// scheduling intervals the host's largest VM takes to migrate (LR looks that far ahead).
    pub fn overloaded(&self, history: &[f64], asked: f64, intervals: impl Fn() -> f64) -> bool {
        let fallback = asked > FALLBACK_THRESHOLD;
        match *self {
            Detector::Thr(t) => asked > t,
            Detector::Iqr(s) if history.len() >= MIN_SPREAD_SAMPLES => {
                asked > 1.0 - s * iqr(history)
            }
            Detector::Mad(s) if history.len() >= MIN_SPREAD_SAMPLES => {
                asked > 1.0 - s * mad(history)
            }
            Detector::Lr(s) | Detector::Lrr(s) if history.len() >= LR_WINDOW => {
                let (intercept, slope) = least_squares(&history[..LR_WINDOW]);
                let x = LR_WINDOW as f64 + intervals();
                (intercept + slope * x) * s >= 1.0
            }
            _ => fallback,
        }
    }
}

/// Ordinary least squares on `recent_first` taken oldest first at x = 1..=n: (intercept, slope).
pub fn least_squares(recent_first: &[f64]) -> (f64, f64) {
    let n = recent_first.len();
    let (mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0);
    for j in 0..n {
        let x = (j + 1) as f64;
        let y = recent_first[n - 1 - j];
        sx += x;
        sy += y;
        sxx += x * x;
        sxy += x * y;
    }
    let nf = n as f64;
    let slope = (sxy - sx * sy / nf) / (sxx - sx * sx / nf);
    ((sy - slope * sx) / nf, slope)
}

/// The median (mean of the middle two for an even count); 0 for no data.
pub fn median(data: &[f64]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut s = data.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Median absolute deviation from the median.
pub fn mad(data: &[f64]) -> f64 {
    let m = median(data);
    let dev: Vec<f64> = data.iter().map(|x| (m - x).abs()).collect();
    median(&dev)
}

/// Interquartile range with CloudSim's quartile positions: sorted[round(0.25 (n+1)) - 1] and
/// sorted[round(0.75 (n+1)) - 1], rounding halves up as Java's Math.round does.
pub fn iqr(data: &[f64]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut s = data.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    let at = |q: f64| {
        let i = ((q * (n + 1.0) + 0.5).floor() as usize).clamp(1, s.len()) - 1;
        s[i]
    };
    at(0.75) - at(0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_mad_and_iqr_on_hand_computed_data() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        // Deviations from 2: 1, 1, 0, 2, 6 -> median 1.
        assert_eq!(mad(&[1.0, 3.0, 2.0, 4.0, 8.0]), 1.0);
        // n = 12: q1 at round(3.25) - 1 = 2, q3 at round(9.75) - 1 = 9 -> 10 - 3.
        let d: Vec<f64> = (1..=12).map(f64::from).collect();
        assert_eq!(iqr(&d), 7.0);
        // n = 13: round(3.5) = 4 (half up) -> index 3, round(10.5) = 11 -> index 10.
        let d: Vec<f64> = (1..=13).map(f64::from).collect();
        assert_eq!(iqr(&d), 11.0 - 4.0);
    }

    #[test]
    fn thr_compares_the_request_with_its_threshold() {
        let d = Detector::Thr(0.8);
        assert!(!d.overloaded(&[], 0.8, || 0.0));
        assert!(d.overloaded(&[], 0.81, || 0.0));
    }

    #[test]
    fn iqr_and_mad_lower_the_threshold_by_the_spread() {
        // 12 samples alternating 0.5 / 0.7: IQR = 0.2, MAD = 0.1.
        let h: Vec<f64> = (0..12)
            .map(|i| if i % 2 == 0 { 0.5 } else { 0.7 })
            .collect();
        assert!((iqr(&h) - 0.2).abs() < 1e-12);
        assert!((mad(&h) - 0.1).abs() < 1e-12);
        // IQR 1.5: threshold 0.7; MAD 2.5: threshold 0.75.
        assert!(Detector::Iqr(1.5).overloaded(&h, 0.71, || 0.0));
        assert!(!Detector::Iqr(1.5).overloaded(&h, 0.69, || 0.0));
        assert!(Detector::Mad(2.5).overloaded(&h, 0.76, || 0.0));
        assert!(!Detector::Mad(2.5).overloaded(&h, 0.74, || 0.0));
    }

    #[test]
    fn short_histories_fall_back_to_the_static_threshold() {
        let h = [0.1; 11];
        for d in [Detector::Iqr(1.5), Detector::Mad(2.5), Detector::Lr(1.2)] {
            let short = if d == Detector::Lr(1.2) {
                &h[..9]
            } else {
                &h[..]
            };
            assert!(d.overloaded(short, 0.71, || 0.0), "{d:?}");
            assert!(!d.overloaded(short, 0.69, || 0.0), "{d:?}");
        }
    }

    #[test]
    fn lr_extrapolates_the_trend_past_the_migration() {
        // Rising 0.05 per sample, most recent 0.8 (x = 10): at x = 11 the line gives 0.85,
        // x 1.2 = 1.02 -> overloaded; one more interval ahead 0.9 x 1.2 = 1.08.
        let h: Vec<f64> = (0..10).map(|i| 0.8 - 0.05 * i as f64).collect();
        let (a, b) = least_squares(&h);
        assert!((b - 0.05).abs() < 1e-12 && (a + b * 10.0 - 0.8).abs() < 1e-12);
        assert!(Detector::Lr(1.2).overloaded(&h, 0.0, || 1.0));
        assert!(Detector::Lrr(1.2).overloaded(&h, 0.0, || 1.0));
        // Safety 1.1: 0.85 x 1.1 = 0.935, not overloaded.
        assert!(!Detector::Lr(1.1).overloaded(&h, 0.0, || 1.0));
        // A flat 0.8 history: 0.8 x 1.2 = 0.96 < 1.
        assert!(!Detector::Lr(1.2).overloaded(&[0.8; 10], 0.9, || 1.0));
    }
}
