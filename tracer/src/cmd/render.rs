//! Human-readable rendering of the agent's answers for terminals, and the JSON the CLI prints.
use std::fmt::Write;

use serde::Serialize;
use tracer_model::{DiagnosesAnswer, Dir, FlowView, Side};

use super::flows::Merged;

/// JSON with every object's keys sorted, as the agent sends its answers.
pub fn sorted_json<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| "{}".into())
}

/// One line per flow, then a block per diagnosis.
pub fn flows_table(answer: &Merged) -> String {
    let mut out = String::new();
    // Merged answers from several agents name the node; ids are only unique per node.
    let multi = answer.multi;
    if multi {
        let _ = write!(out, "{:<28} ", "NODE");
    }
    let _ = writeln!(
        out,
        "{:>6}  {:<5} {:<43} {:<43} {:<30} PATH",
        "ID", "PROTO", "SOURCE", "DESTINATION", "VERDICTS"
    );
    for nf in &answer.flows {
        let f = &nf.flow;
        let verdicts = f
            .verdicts
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let path = f
            .path
            .iter()
            .map(|h| {
                let arrow = if h.dir == Dir::Ingress { ">" } else { "<" };
                let side = if h.side == Side::Reverse { "r:" } else { "" };
                format!("{side}{}{arrow}", h.iface)
            })
            .collect::<Vec<_>>()
            .join(" ");
        let mut src = format!("{}:{}", f.src, f.sport);
        let mut dst = format!("{}:{}", f.dst, f.dport);
        if let Some(nat) = &f.nat {
            if nat.src != f.src || nat.sport != f.sport {
                src = format!("{src} ({}:{})", nat.src, nat.sport);
            }
            if nat.dst != f.dst || nat.dport != f.dport {
                dst = format!("{dst} ({}:{})", nat.dst, nat.dport);
            }
        }
        if multi {
            let _ = write!(out, "{:<28} ", nf.node);
        }
        let _ = writeln!(
            out,
            "{:>6}  {:<5} {:<43} {:<43} {:<30} {}",
            f.id, f.proto, src, dst, verdicts, path
        );
    }
    for nf in &answer.flows {
        let f = &nf.flow;
        if let Some(d) = &f.diagnosis {
            let node = if multi {
                format!(" on {}", nf.node)
            } else {
                String::new()
            };
            let _ = writeln!(out, "\nflow {}{node}: {}", f.id, d.cause);
            let _ = writeln!(out, "  what:  {}", d.summary);
            let _ = writeln!(out, "  fix:   {}", d.fix);
            let _ = writeln!(out, "  evidence: {}", sorted_json(&d.evidence));
        }
    }
    if answer.flows.is_empty() {
        let _ = writeln!(out, "(no flows match)");
    }
    out
}

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// One line per flow update for `tracer watch`, plus its diagnosis when it has one.
pub fn watch_line(f: &FlowView, color: bool) -> String {
    let (on, off) = match (color, f.is_faulty()) {
        (false, _) => ("", ""),
        (true, true) => (RED, RESET),
        (true, false) => (GREEN, RESET),
    };
    let time = f.last_seen.get(11..23).unwrap_or(&f.last_seen);
    let verdicts: Vec<&str> = f.verdicts.iter().map(|v| v.as_str()).collect();
    let mut out = format!(
        "{time} {:<5} {}:{} -> {}:{} {on}[{}]{off}\n",
        f.proto,
        f.src,
        f.sport,
        f.dst,
        f.dport,
        verdicts.join(",")
    );
    if let Some(d) = &f.diagnosis {
        let (dim, reset) = if color { (DIM, RESET) } else { ("", "") };
        out.push_str(&format!("  {on}{}{off}: {}\n", d.cause, d.summary));
        out.push_str(&format!("  {dim}fix: {}{reset}\n", d.fix));
    }
    out
}

/// `/diagnoses` for a terminal.
pub fn diagnoses(v: &DiagnosesAnswer) -> String {
    let mut out = String::new();
    if v.causes.is_empty() && v.node_findings.is_empty() {
        let _ = writeln!(
            out,
            "No faults{}: {} flows judged, no configuration finding.",
            if v.turned_off.is_empty() {
                ""
            } else {
                " among what is judged here"
            },
            v.flows_judged
        );
    }
    for c in &v.causes {
        let _ = writeln!(
            out,
            "{} — {} flow(s), {} .. {}, e.g. flows {}",
            c.cause,
            c.count,
            c.first_seen,
            c.last_seen,
            sorted_json(&c.example_flows)
        );
        let _ = writeln!(out, "  what:  {}", c.summary);
        let _ = writeln!(out, "  fix:   {}", c.fix);
    }
    for f in &v.node_findings {
        let _ = writeln!(out, "{} (node configuration)", f.cause);
        let _ = writeln!(out, "  what:  {}", f.summary);
        let _ = writeln!(out, "  fix:   {}", f.fix);
    }
    // What this node cannot judge (felix's eBPF dataplane): never silently "no faults".
    for t in &v.turned_off {
        let names: Vec<String> = t
            .verdicts
            .iter()
            .map(|x| x.to_string())
            .chain(t.causes.iter().map(|x| x.to_string()))
            .collect();
        let _ = writeln!(out, "turned off ({}): {}", t.dataplane, names.join(", "));
        let _ = writeln!(out, "  why:   {}", t.why);
    }
    out
}

#[cfg(test)]
mod tests {
    use tracer_model::diagnoses::{DiagnosesAnswer, EvidenceSummary};

    fn answer(turned_off: Vec<tracer_model::health::TurnedOff>) -> DiagnosesAnswer {
        DiagnosesAnswer {
            causes: Vec::new(),
            node_findings: Vec::new(),
            flows_judged: 3,
            evidence: EvidenceSummary {
                complete: true,
                lost_records: 0,
                flows_with_incomplete_evidence: 0,
                flows_evicted: 0,
                reader_lag_ms: 0,
            },
            turned_off,
        }
    }

    #[test]
    fn turned_off_verdicts_are_never_a_plain_no_faults() {
        assert_eq!(
            super::diagnoses(&answer(Vec::new())),
            "No faults: 3 flows judged, no configuration finding.\n"
        );
        let text = super::diagnoses(&answer(tracer::felix_bpf::turned_off()));
        assert!(
            text.starts_with("No faults among what is judged here: 3 flows judged"),
            "{text}"
        );
        assert!(
            text.contains("turned off (calico-ebpf): no_reply, wrong_source_address"),
            "{text}"
        );
        assert_eq!(text.matches("  why:   ").count(), 2, "{text}");
    }
}
