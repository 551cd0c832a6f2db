//! Human-readable rendering of the agent's answers for terminals, and the JSON the CLI prints.
use std::fmt::Write;

use std::net::IpAddr;

use serde::Serialize;
use tracer::cli::Output;
use tracer_model::{DiagnosesAnswer, Dir, Endpoint, FlowView, Side};
use yaml_rust2::{Yaml, YamlEmitter};

use super::flows::Merged;

/// JSON with every object's keys sorted, as the agent sends its answers.
pub fn sorted_json<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| "{}".into())
}

/// YAML of what the agent sent, as one document (`---` first): `-o yaml` prints one per flow,
/// like `-o json` prints one line per flow.
pub fn yaml<T: Serialize>(v: &T) -> String {
    let doc = serde_json::to_value(v).map_or(Yaml::Null, yaml_of);
    let mut out = String::new();
    let mut emitter = YamlEmitter::new(&mut out);
    // Diagnosis text can hold newlines: block scalars keep it readable.
    emitter.multiline_strings(true);
    if emitter.dump(&doc).is_err() {
        return "--- {}\n".into();
    }
    out.push('\n');
    out
}

fn yaml_of(v: serde_json::Value) -> Yaml {
    use serde_json::Value;
    match v {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s),
        Value::Array(a) => Yaml::Array(a.into_iter().map(yaml_of).collect()),
        Value::Object(m) => {
            let mut h = yaml_rust2::yaml::Hash::new();
            for (k, v) in m {
                h.insert(Yaml::String(k), yaml_of(v));
            }
            Yaml::Hash(h)
        }
    }
}

/// One end of a flow in a table: the datastore's name (`ns/pod:port`, `service ns/name:port`,
/// `node name:port`) when the agent has identity on and knows the address, else `ip:port`.
fn end(ep: Option<&Endpoint>, ip: IpAddr, port: u16) -> String {
    match ep.and_then(Endpoint::name) {
        Some(name) => format!("{name}:{port}"),
        None => format!("{ip}:{port}"),
    }
}

/// `ip:port`, with the translated address in parentheses when NAT changed it.
fn addrs(ip: IpAddr, port: u16, nat: Option<(IpAddr, u16)>) -> String {
    match nat {
        Some((nip, nport)) if (nip, nport) != (ip, port) => format!("{ip}:{port} ({nip}:{nport})"),
        _ => format!("{ip}:{port}"),
    }
}

/// The hops as `iface>` (ingress) / `iface<` (egress), `r:` for the reply direction.
fn path(f: &FlowView) -> String {
    f.path
        .iter()
        .map(|h| {
            let arrow = if h.dir == Dir::Ingress { ">" } else { "<" };
            let side = if h.side == Side::Reverse { "r:" } else { "" };
            format!("{side}{}{arrow}", h.iface)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The two ends of a flow as table cells: names where the datastore has them (with the NAT
/// target's name when DNAT/SNAT changed it), addresses otherwise.
fn ends(f: &FlowView) -> (String, String) {
    let eps = f.endpoints.as_ref();
    let nat_src = f.nat.as_ref().map(|n| (n.src, n.sport));
    let nat_dst = f.nat.as_ref().map(|n| (n.dst, n.dport));
    if eps.is_none() {
        return (
            addrs(f.src, f.sport, nat_src),
            addrs(f.dst, f.dport, nat_dst),
        );
    }
    let mut src = end(eps.map(|e| &e.src), f.src, f.sport);
    let mut dst = end(eps.map(|e| &e.dst), f.dst, f.dport);
    if let (Some(n), Some(e)) = (&f.nat, eps) {
        if (n.src, n.sport) != (f.src, f.sport) {
            src = format!("{src} ({})", end(e.nat_src.as_ref(), n.src, n.sport));
        }
        if (n.dst, n.dport) != (f.dst, f.dport) {
            dst = format!("{dst} ({})", end(e.nat_dst.as_ref(), n.dst, n.dport));
        }
    }
    (src, dst)
}

/// One line per flow, then a block per diagnosis. `wide` adds the addresses (when names are
/// shown) and the path of interfaces the flow crossed.
pub fn flows_table(answer: &Merged, wide: bool) -> String {
    let mut out = String::new();
    // Merged answers from several agents name the node; ids are only unique per node.
    let multi = answer.multi;
    let named = answer.flows.iter().any(|nf| nf.flow.endpoints.is_some());
    let mut header = String::new();
    if multi {
        let _ = write!(header, "{:<28} ", "NODE");
    }
    let _ = write!(
        header,
        "{:>6}  {:<5} {:<43} {:<43} {:<30}",
        "ID", "PROTO", "SOURCE", "DESTINATION", "VERDICTS"
    );
    if wide {
        if named {
            let _ = write!(
                header,
                " {:<43} {:<43}",
                "SOURCE ADDRESS", "DESTINATION ADDRESS"
            );
        }
        header.push_str(" PATH");
    }
    let _ = writeln!(out, "{}", header.trim_end());
    for nf in &answer.flows {
        let f = &nf.flow;
        let verdicts = f
            .verdicts
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let (src, dst) = ends(f);
        let mut line = String::new();
        if multi {
            let _ = write!(line, "{:<28} ", nf.node);
        }
        let _ = write!(
            line,
            "{:>6}  {:<5} {:<43} {:<43} {:<30}",
            f.id, f.proto, src, dst, verdicts
        );
        if wide {
            if named {
                let nat_src = f.nat.as_ref().map(|n| (n.src, n.sport));
                let nat_dst = f.nat.as_ref().map(|n| (n.dst, n.dport));
                let _ = write!(
                    line,
                    " {:<43} {:<43}",
                    addrs(f.src, f.sport, nat_src),
                    addrs(f.dst, f.dport, nat_dst)
                );
            }
            let _ = write!(line, " {}", path(f));
        }
        let _ = writeln!(out, "{}", line.trim_end());
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
    } else if answer.matched > answer.flows.len() {
        let _ = writeln!(
            out,
            "\n({} of {} matching flows shown, newest first: narrow the query or raise --limit)",
            answer.flows.len(),
            answer.matched
        );
    }
    out
}

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// A flow update of `tracer watch` in the asked output.
pub fn watch_output(f: &FlowView, output: Output, color: bool) -> String {
    match output {
        Output::Json => format!("{}\n", sorted_json(f)),
        Output::Yaml => yaml(f),
        Output::Table => watch_line(f, color, false),
        Output::Wide => watch_line(f, color, true),
    }
}

/// One line per flow update for `tracer watch`, plus its diagnosis when it has one; `wide`
/// adds the addresses behind the names and the path.
pub fn watch_line(f: &FlowView, color: bool, wide: bool) -> String {
    let (on, off) = match (color, f.is_faulty()) {
        (false, _) => ("", ""),
        (true, true) => (RED, RESET),
        (true, false) => (GREEN, RESET),
    };
    let time = f.last_seen.get(11..23).unwrap_or(&f.last_seen);
    let verdicts: Vec<&str> = f.verdicts.iter().map(|v| v.as_str()).collect();
    let (src, dst) = ends(f);
    let mut out = format!(
        "{time} {:<5} {src} -> {dst} {on}[{}]{off}",
        f.proto,
        verdicts.join(",")
    );
    if wide {
        if f.endpoints.is_some() {
            let _ = write!(out, " {}:{} -> {}:{}", f.src, f.sport, f.dst, f.dport);
        }
        let _ = write!(out, " via {}", path(f));
    }
    out.push('\n');
    if let Some(d) = &f.diagnosis {
        let (dim, reset) = if color { (DIM, RESET) } else { ("", "") };
        out.push_str(&format!("  {on}{}{off}: {}\n", d.cause, d.summary));
        out.push_str(&format!("  {dim}fix: {}{reset}\n", d.fix));
    }
    out
}

/// `/diagnoses` for a terminal; `wide` adds each cause's evidence.
pub fn diagnoses(v: &DiagnosesAnswer, wide: bool) -> String {
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
        if let Some(e) = &c.endpoints {
            let _ = writeln!(out, "  who:   {} -> {}", e.src.label(), e.dst.label());
        }
        let _ = writeln!(out, "  what:  {}", c.summary);
        let _ = writeln!(out, "  fix:   {}", c.fix);
        if wide {
            let _ = writeln!(out, "  evidence: {}", sorted_json(&c.evidence));
        }
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
    use tracer_model::FlowView;

    use super::super::flows::{Merged, NodeFlow};

    fn named_flow() -> Result<FlowView, serde_json::Error> {
        serde_json::from_str(include_str!(
            "../../tests/golden/masquerade-not-applied-named.flow.json"
        ))
    }

    fn merged(flow: FlowView) -> Merged {
        Merged {
            flows: vec![NodeFlow {
                node: "node-a".into(),
                flow,
            }],
            matched: 1,
            ..Merged::default()
        }
    }

    #[test]
    fn tables_name_pods_and_wide_adds_addresses_and_path() -> Result<(), serde_json::Error> {
        let table = super::flows_table(&merged(named_flow()?), false);
        let row = table.lines().nth(1).unwrap_or_default();
        assert!(row.contains("shop/web-5d8f-x2x7q:40000"), "{table}");
        assert!(row.contains("8.8.8.8:443"), "{table}");
        assert!(
            !row.contains("10.244.1.10") && !row.contains("calid92900560e3"),
            "{table}"
        );
        let wide = super::flows_table(&merged(named_flow()?), true);
        let row = wide.lines().nth(1).unwrap_or_default();
        assert!(
            wide.lines().next().unwrap_or_default().ends_with("PATH"),
            "{wide}"
        );
        assert!(row.contains("shop/web-5d8f-x2x7q:40000"), "{wide}");
        assert!(row.contains("10.244.1.10:40000"), "{wide}");
        assert!(row.ends_with("calid92900560e3> eth0<"), "{wide}");
        // Identity off: addresses in the plain table, no address columns twice in wide.
        let mut off = named_flow()?;
        off.endpoints = None;
        let table = super::flows_table(&merged(off.clone()), false);
        assert!(
            table
                .lines()
                .nth(1)
                .unwrap_or_default()
                .contains("10.244.1.10:40000"),
            "{table}"
        );
        let wide = super::flows_table(&merged(off), true);
        assert!(!wide.contains("SOURCE ADDRESS"), "{wide}");
        Ok(())
    }

    #[test]
    fn yaml_holds_what_the_json_holds() -> Result<(), Box<dyn std::error::Error>> {
        let flow = named_flow()?;
        let text = super::yaml(&flow);
        assert!(text.starts_with("---\n"), "{text}");
        let docs = yaml_rust2::YamlLoader::load_from_str(&text)?;
        let doc = docs.first().ok_or("no YAML document")?;
        assert_eq!(doc["endpoints"]["src"]["namespace"].as_str(), Some("shop"));
        assert_eq!(doc["dport"].as_i64(), Some(443));
        assert_eq!(doc["path"][1]["iface"].as_str(), Some("eth0"));
        assert!(doc["nat"].is_null());
        assert_eq!(
            doc["diagnosis"]["cause"].as_str(),
            flow.diagnosis.as_ref().map(|d| d.cause.as_str())
        );
        Ok(())
    }

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
            super::diagnoses(&answer(Vec::new()), false),
            "No faults: 3 flows judged, no configuration finding.\n"
        );
        let off = tracer::felix_bpf::turned_off();
        let groups = off.len();
        let text = super::diagnoses(&answer(off), false);
        assert!(
            text.starts_with("No faults among what is judged here: 3 flows judged"),
            "{text}"
        );
        assert!(
            text.contains("turned off (calico-ebpf): no_reply, wrong_source_address"),
            "{text}"
        );
        assert_eq!(text.matches("  why:   ").count(), groups, "{text}");
    }
}
