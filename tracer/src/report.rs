//! Human-readable rendering of `/flows` answers for terminals.
use std::fmt::Write;

use serde_json::Value;

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
            let _ = writeln!(out, "\nflow {}: {}", s(f, "id"), s(d, "cause"));
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
