//! Human-readable rendering of `/flows` answers for terminals.
use std::fmt::Write;

use serde_json::Value;
use tracer_model::Verdict;

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// One line per flow, then a block per diagnosis.
pub fn flows_table(answer: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let flows = answer
        .get("flows")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    // Merged answers from several agents name the node; ids are only unique per node.
    let multi = flows.iter().any(|f| f.get("node").is_some());
    if multi {
        let _ = write!(out, "{:<28} ", "NODE");
    }
    let _ = writeln!(
        out,
        "{:>6}  {:<5} {:<43} {:<43} {:<30} PATH",
        "ID", "PROTO", "SOURCE", "DESTINATION", "VERDICTS"
    );
    for f in flows {
        let verdicts = f
            .get("verdicts")
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let path = f
            .get("path")
            .and_then(Value::as_array)
            .map(|p| {
                p.iter()
                    .map(|h| {
                        let arrow = if s(h, "dir") == "ingress" { ">" } else { "<" };
                        let side = if s(h, "side") == "reverse" { "r:" } else { "" };
                        format!("{side}{}{arrow}", s(h, "iface"))
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let mut src = format!("{}:{}", s(f, "src"), s(f, "sport"));
        if let Some(nat) = f.get("nat").filter(|n| !n.is_null()) {
            if s(nat, "src") != s(f, "src") || s(nat, "sport") != s(f, "sport") {
                src = format!("{src} ({}:{})", s(nat, "src"), s(nat, "sport"));
            }
        }
        let mut dst = format!("{}:{}", s(f, "dst"), s(f, "dport"));
        if let Some(nat) = f.get("nat").filter(|n| !n.is_null()) {
            if s(nat, "dst") != s(f, "dst") || s(nat, "dport") != s(f, "dport") {
                dst = format!("{dst} ({}:{})", s(nat, "dst"), s(nat, "dport"));
            }
        }
        if multi {
            let _ = write!(out, "{:<28} ", s(f, "node"));
        }
        let _ = writeln!(
            out,
            "{:>6}  {:<5} {:<43} {:<43} {:<30} {}",
            s(f, "id"),
            s(f, "proto"),
            src,
            dst,
            verdicts,
            path
        );
    }
    for f in flows {
        if let Some(d) = f.get("diagnosis").filter(|d| !d.is_null()) {
            let node = f
                .get("node")
                .map(|_| format!(" on {}", s(f, "node")))
                .unwrap_or_default();
            let _ = writeln!(out, "\nflow {}{node}: {}", s(f, "id"), s(d, "cause"));
            let _ = writeln!(out, "  what:  {}", s(d, "summary"));
            let _ = writeln!(out, "  fix:   {}", s(d, "fix"));
            if let Some(ev) = d.get("evidence") {
                let _ = writeln!(out, "  evidence: {ev}");
            }
        }
    }
    if flows.is_empty() {
        let _ = writeln!(out, "(no flows match)");
    }
    out
}

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// One line per flow update for `tracer watch`, plus its diagnosis when it has one.
pub fn watch_line(f: &Value, color: bool) -> String {
    let verdicts: Vec<&str> = f["verdicts"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let faulty = verdicts
        .iter()
        .any(|v| v.parse::<Verdict>().is_ok_and(Verdict::is_fault));
    let (on, off) = match (color, faulty) {
        (false, _) => ("", ""),
        (true, true) => (RED, RESET),
        (true, false) => (GREEN, RESET),
    };
    let time = s(f, "last_seen");
    let time = time.get(11..23).unwrap_or(&time).to_string();
    let mut out = format!(
        "{time} {:<5} {}:{} -> {}:{} {on}[{}]{off}\n",
        s(f, "proto"),
        s(f, "src"),
        s(f, "sport"),
        s(f, "dst"),
        s(f, "dport"),
        verdicts.join(",")
    );
    if let Some(d) = f.get("diagnosis").filter(|d| !d.is_null()) {
        let (dim, reset) = if color { (DIM, RESET) } else { ("", "") };
        out.push_str(&format!(
            "  {on}{}{off}: {}\n",
            s(d, "cause"),
            s(d, "summary")
        ));
        out.push_str(&format!("  {dim}fix: {}{reset}\n", s(d, "fix")));
    }
    out
}

/// `/diagnoses` for a terminal.
pub fn diagnoses(v: &Value) -> String {
    let mut out = String::new();
    let causes = v["causes"].as_array().cloned().unwrap_or_default();
    let findings = v["node_findings"].as_array().cloned().unwrap_or_default();
    if causes.is_empty() && findings.is_empty() {
        let _ = writeln!(
            out,
            "No faults: {} flows judged, no configuration finding.",
            s(v, "flows_judged")
        );
        return out;
    }
    for c in &causes {
        let _ = writeln!(
            out,
            "{} — {} flow(s), {} .. {}, e.g. flows {}",
            s(c, "cause"),
            s(c, "count"),
            s(c, "first_seen"),
            s(c, "last_seen"),
            c["example_flows"]
        );
        let _ = writeln!(out, "  what:  {}", s(c, "summary"));
        let _ = writeln!(out, "  fix:   {}", s(c, "fix"));
    }
    for f in &findings {
        let _ = writeln!(out, "{} (node configuration)", s(f, "cause"));
        let _ = writeln!(out, "  what:  {}", s(f, "summary"));
        let _ = writeln!(out, "  fix:   {}", s(f, "fix"));
    }
    out
}
