//! The statistics of a seed comparison: each side's mean with its 95%
//! interval, and Welch's two-sample t-test of the difference (the two
//! sides draw their random streams independently, so the seeds are not
//! paired).
//!
//! Student's t distribution is computed from the regularized incomplete
//! beta function (a continued fraction) and inverted by bisection, so
//! non-integer degrees of freedom (Welch's) need no table.

use serde::Serialize;

/// Mean, sample standard deviation and the 95% t interval of the mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Their mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator); NaN below 2
    /// values.
    pub sd: f64,
    /// The 95% confidence interval of the mean; NaN below 2 values.
    pub ci95: [f64; 2],
}

impl Summary {
    /// The summary of `values` (NaN fields when there are too few).
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        let mean = if n == 0 {
            f64::NAN
        } else {
            values.iter().sum::<f64>() / n as f64
        };
        let sd = if n < 2 {
            f64::NAN
        } else {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        };
        let half = if n < 2 {
            f64::NAN
        } else {
            t_quantile_975((n - 1) as f64) * sd / (n as f64).sqrt()
        };
        Self {
            n,
            mean,
            sd,
            ci95: [mean - half, mean + half],
        }
    }

    /// Standard error of the mean.
    fn se2(&self) -> f64 {
        self.sd * self.sd / self.n as f64
    }
}

/// Welch's two-sample t-test of `a.mean - b.mean`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Welch {
    /// `a.mean - b.mean`.
    pub diff: f64,
    /// Its 95% confidence interval.
    pub ci95: [f64; 2],
    /// The t statistic.
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value.
    pub p: f64,
}

impl Welch {
    /// The test of two samples' summaries; `None` when either has fewer
    /// than two values or both have no spread.
    pub fn test(a: &Summary, b: &Summary) -> Option<Self> {
        if a.n < 2 || b.n < 2 {
            return None;
        }
        let (va, vb) = (a.se2(), b.se2());
        let se = (va + vb).sqrt();
        if se.is_nan() || se <= 0.0 {
            return None;
        }
        let diff = a.mean - b.mean;
        let df = (va + vb).powi(2) / (va * va / (a.n - 1) as f64 + vb * vb / (b.n - 1) as f64);
        let t = diff / se;
        let half = t_quantile_975(df) * se;
        Some(Self {
            diff,
            ci95: [diff - half, diff + half],
            t,
            df,
            p: t_two_sided_p(t, df),
        })
    }

    /// Whether the interval of the difference contains 0.
    pub fn contains_zero(&self) -> bool {
        self.ci95[0] <= 0.0 && 0.0 <= self.ci95[1]
    }
}

/// `P(|T| >= |t|)` for Student's t with `df` degrees of freedom.
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    if !t.is_finite() {
        return 0.0;
    }
    incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
}

/// The 97.5% quantile of Student's t (the half-width factor of a 95%
/// interval), for any `df > 0`.
pub fn t_quantile_975(df: f64) -> f64 {
    let (mut lo, mut hi) = (0.0_f64, 1.0e3_f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_two_sided_p(mid, df) > 0.05 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, nine coefficients).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function `I_x(a, b)`.
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The continued fraction converges fast for x < (a + 1) / (a + b + 2);
    // use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of the incomplete beta function (modified
/// Lentz's method).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        // Even step.
        let num = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + num / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        f *= d * c;
        // Odd step.
        let num = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + num / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let step = d * c;
        f *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Student's t 97.5% quantiles as printed in statistics tables.
    #[test]
    fn t_quantiles_match_the_tables() {
        for (df, q) in [
            (1.0, 12.706),
            (2.0, 4.303),
            (4.0, 2.776),
            (9.0, 2.262),
            (19.0, 2.093),
            (30.0, 2.042),
            (120.0, 1.980),
            (1e6, 1.960),
        ] {
            let ours = t_quantile_975(df);
            assert!((ours - q).abs() < 1.5e-3, "df {df}: {ours} vs {q}");
        }
        // The Cauchy distribution (df 1) in closed form: P(|T| > 1) = 1/2.
        assert!((t_two_sided_p(1.0, 1.0) - 0.5).abs() < 1e-12);
        // df 2 in closed form: P(|T| > t) = 1 - t / sqrt(2 + t^2).
        for t in [0.3, 1.0, 2.5, 7.0] {
            let exact = 1.0 - t / (2.0_f64 + t * t).sqrt();
            assert!((t_two_sided_p(t, 2.0) - exact).abs() < 1e-12, "t {t}");
        }
    }

    #[test]
    fn ln_gamma_is_the_factorial() {
        let mut f = 1.0_f64;
        for n in 1..20 {
            assert!((ln_gamma(n as f64) - f.ln()).abs() < 1e-10, "n {n}");
            f *= n as f64;
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }

    /// A worked example: the five-seed Alien vs Predator numbers.
    #[test]
    fn welch_on_known_samples() {
        let avp = Summary::of(&[0.925, 0.885, 0.940, 0.905, 0.910]);
        let pt = Summary::of(&[0.915, 0.940, 0.955, 0.950, 0.950]);
        assert!((avp.mean - 0.913).abs() < 1e-12 && (pt.mean - 0.942).abs() < 1e-12);
        let w = Welch::test(&avp, &pt).unwrap();
        // By hand: sd 0.020800 and 0.016047, se of the difference 0.011747.
        assert!((w.t + 0.029 / 0.0117473).abs() < 1e-3, "{w:?}");
        assert!(w.df > 7.0 && w.df < 8.0, "{w:?}");
        assert!(w.p > 0.02 && w.p < 0.06 && !w.contains_zero(), "{w:?}");
        // The interval is the mean -/+ t * se, and symmetric.
        let s = Summary::of(&[1.0, 2.0, 3.0]);
        assert!(
            (s.ci95[1] - 2.0 - 4.303 * 1.0 / 3f64.sqrt()).abs() < 2e-3,
            "{s:?}"
        );
        assert!(Welch::test(&Summary::of(&[1.0]), &s).is_none());
        assert!(Summary::of(&[]).mean.is_nan());
    }
}
