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
        }
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
            On::Ratio => self.ratio().is_some_and(|r| t.met(r)),
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
            r.ratio().map(|x| format!("{x:.3}")).unwrap_or_default(),
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
