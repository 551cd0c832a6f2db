//! Result rows and the Markdown table they print as.
use std::fmt::Write as _;

/// A target a figure is compared against (never asserted: benchmarks report, they do not fail).
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The figure must be at least this.
    AtLeast(f64),
    /// The figure must be at most this.
    AtMost(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtLeast(t) => v >= t,
            Target::AtMost(t) => v <= t,
        }
    }
}

/// What the target is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    Value,
    Ratio,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub section: &'static str,
    pub metric: String,
    /// The same run's reference figure (what the ratio divides by).
    pub baseline: Option<f64>,
    pub value: f64,
    pub unit: &'static str,
    pub target: Option<(Target, On, String)>,
    /// A condition met or missed besides the numeric target (e.g. "better than tcpdump").
    pub extra: Option<(bool, String)>,
    /// A 95% confidence interval of the ratio: a ratio target is then met only when the whole
    /// interval clears it (the lower bound for an "at least", the upper for an "at most").
    pub ci: Option<(f64, f64)>,
}

impl Row {
    pub fn new(
        section: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            section,
            metric: metric.into(),
            baseline: None,
            value,
            unit,
            target: None,
            extra: None,
            ci: None,
        }
    }

    pub fn ci(mut self, lo: f64, hi: f64) -> Row {
        self.ci = Some((lo, hi));
        self
    }

    pub fn baseline(mut self, b: f64) -> Row {
        self.baseline = Some(b);
        self
    }

    pub fn target(mut self, t: Target, on: On, text: impl Into<String>) -> Row {
        self.target = Some((t, on, text.into()));
        self
    }

    pub fn extra(mut self, met: bool, text: impl Into<String>) -> Row {
        self.extra = Some((met, text.into()));
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .filter(|b| *b != 0.0 && b.is_finite())
            .map(|b| self.value / b)
    }

    /// PASS/MISS, or "" without a target.
    pub fn status(&self) -> &'static str {
        let numeric = self.target.as_ref().map(|(t, on, _)| match on {
            On::Value => t.met(self.value),
            On::Ratio => match (self.ci, t) {
                (Some((lo, _)), Target::AtLeast(_)) => t.met(lo),
                (Some((_, hi)), Target::AtMost(_)) => t.met(hi),
                (None, _) => self.ratio().is_some_and(|r| t.met(r)),
            },
        });
        let extra = self.extra.as_ref().map(|(met, _)| *met);
        match (numeric, extra) {
            (None, None) => "",
            (a, b) if a.unwrap_or(true) && b.unwrap_or(true) => "PASS",
            _ => "MISS",
        }
    }
}

/// Human figure with a sensible number of digits.
pub fn fmt_num(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let a = v.abs();
    let s = if a >= 1e9 {
        format!("{:.2} G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1} k", v / 1e3)
    } else if a >= 100.0 || a == 0.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if unit.is_empty() {
        s
    } else if s.ends_with(['k', 'M', 'G']) {
        format!("{s}{unit}")
    } else {
        format!("{s} {unit}")
    }
}

/// The table, Markdown-formatted (it goes into docs/benchmarks.md as is).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| section | metric | baseline | measured | ratio | target | result |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let target = match (&r.target, &r.extra) {
            (Some((_, _, t)), Some((_, e))) => format!("{t}; {e}"),
            (Some((_, _, t)), None) => t.clone(),
            (None, Some((_, e))) => e.clone(),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.section,
            r.metric,
            r.baseline.map(|b| fmt_num(b, r.unit)).unwrap_or_default(),
            fmt_num(r.value, r.unit),
            match (r.ratio(), r.ci) {
                (Some(x), Some((lo, hi))) => format!("{x:.3} [{lo:.3}, {hi:.3}]"),
                (Some(x), None) => format!("{x:.3}"),
                (None, _) => String::new(),
            },
            target,
            r.status()
        );
    }
    out
}

/// Median of a sample (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// Quantile `q` in 0..=1 (nearest rank on the sorted sample; NaN when empty).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    s[i.min(s.len() - 1)]
}

/// Mean of a sample (NaN when empty).
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// A 95% percentile-bootstrap confidence interval of the mean of `v` (10,000 resamples with a
/// fixed seed, so the same sample always gives the same interval).
pub fn bootstrap_ci(v: &[f64]) -> (f64, f64) {
    if v.len() < 2 {
        let m = mean(v);
        return (m, m);
    }
    // xorshift64*: plenty for resampling indexes, and no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let n = v.len();
    let mut means: Vec<f64> = (0..10_000)
        .map(|_| (0..n).map(|_| v[(next() % n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    (means[249], means[9_749])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_interval_holds_the_mean_and_widens_with_spread() {
        let tight = [1.0, 1.01, 0.99, 1.0, 1.0, 1.01, 0.99, 1.0];
        let wide = [1.0, 1.2, 0.8, 1.1, 0.9, 1.3, 0.7, 1.0];
        let (lo, hi) = bootstrap_ci(&tight);
        assert!(lo <= mean(&tight) && mean(&tight) <= hi);
        let (wlo, whi) = bootstrap_ci(&wide);
        assert!(whi - wlo > 5.0 * (hi - lo), "{wlo}-{whi} vs {lo}-{hi}");
        assert_eq!(bootstrap_ci(&[2.0]), (2.0, 2.0));
    }

    #[test]
    fn a_ratio_target_needs_the_whole_interval() {
        let row = |lo, hi| {
            Row::new("s", "m", 0.99, "")
                .baseline(1.0)
                .target(Target::AtLeast(0.98), On::Ratio, ">= 0.98")
                .ci(lo, hi)
        };
        assert_eq!(row(0.985, 0.995).status(), "PASS");
        assert_eq!(row(0.97, 1.01).status(), "MISS");
    }
}
