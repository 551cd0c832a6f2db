//! Prometheus text exposition.
use std::fmt::Write;

/// One metric family.
pub struct Family<'a> {
    pub name: &'a str,
    pub help: &'a str,
    pub kind: &'a str,
    /// (labels, value); labels as `key="value",...` without braces, empty for none.
    pub samples: Vec<(String, f64)>,
}

pub fn render(families: &[Family<'_>]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, v) in &f.samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{} {}", f.name, v);
            } else {
                let _ = writeln!(out, "{}{{{}}} {}", f.name, labels, v);
            }
        }
    }
    out
}

/// Escapes a label value (backslash, quote, newline).
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exposition_format() {
        let text = render(&[Family {
            name: "tracer_flows_by_verdict",
            help: "Flows by verdict.",
            kind: "gauge",
            samples: vec![(format!("verdict=\"{}\"", label("no\"reply")), 3.0)],
        }]);
        assert!(text.contains("# TYPE tracer_flows_by_verdict gauge\n"));
        assert!(
            text.contains("tracer_flows_by_verdict{verdict=\"no\\\"reply\"} 3\n"),
            "{text}"
        );
    }
}
