//! What the agents on the lab's nodes diagnosed (`/diagnoses`, or flows grouped by cause on
//! agents without it), rendered for the lab's report.

use std::fmt::Write as _;

use serde_json::Value;
use tracer_model::{
    diagnoses::CauseGroup, DiagnosesAnswer, Diagnosis, Evidence, FlowQuery, FlowsPage,
};

use crate::agent::Client;
use crate::http::truncate;
use crate::netns::Netns;
use crate::LabError;

/// Where a node's diagnoses came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The agent's `/diagnoses`.
    Diagnoses,
    /// Faulty flows of `/flows`, grouped by the lab.
    Flows,
}

/// What one agent diagnosed.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeDiagnoses {
    pub source: Source,
    /// Causes of faulty flows, most frequent first.
    pub causes: Vec<CauseGroup>,
    /// What the node's configuration alone shows.
    pub node_findings: Vec<Diagnosis>,
}

impl NodeDiagnoses {
    /// Every cause name, flow causes first.
    pub fn cause_names(&self) -> Vec<&str> {
        self.causes
            .iter()
            .map(|c| c.cause.as_str())
            .chain(self.node_findings.iter().map(|d| d.cause.as_str()))
            .collect()
    }
}

impl From<DiagnosesAnswer> for NodeDiagnoses {
    fn from(a: DiagnosesAnswer) -> NodeDiagnoses {
        NodeDiagnoses {
            source: Source::Diagnoses,
            causes: a.causes,
            node_findings: a.node_findings,
        }
    }
}

/// What the agent diagnosed: `/diagnoses`, or on agents without it (404) the faulty flows of
/// `/flows?limit=50` grouped by cause.
pub fn read(agent: &Client, ns: &Netns) -> Result<NodeDiagnoses, LabError> {
    let r = agent.get(ns, "/diagnoses")?;
    if r.status == 404 {
        let q = FlowQuery {
            limit: Some(50),
            ..FlowQuery::default()
        };
        return Ok(NodeDiagnoses {
            source: Source::Flows,
            causes: group_flows(&agent.flows(ns, &q)?),
            node_findings: Vec::new(),
        });
    }
    agent.diagnoses(ns).map(NodeDiagnoses::from)
}

/// Groups the flows of a `/flows` answer that have a diagnosis by cause (most frequent first),
/// keeping the newest flow's summary, evidence and fix.
pub fn group_flows(page: &FlowsPage) -> Vec<CauseGroup> {
    let mut out: Vec<CauseGroup> = Vec::new();
    for f in &page.flows {
        let Some(d) = &f.diagnosis else {
            continue;
        };
        let incomplete = u64::from(f.evidence_incomplete.is_some());
        match out.iter_mut().find(|c| c.cause == d.cause) {
            Some(c) => {
                c.count += 1;
                c.evidence_incomplete += incomplete;
                if c.example_flows.len() < 5 {
                    c.example_flows.push(f.id);
                }
                if f.first_seen < c.first_seen {
                    c.first_seen = f.first_seen.clone();
                }
                if f.last_seen > c.last_seen {
                    c.last_seen = f.last_seen.clone();
                    c.summary = d.summary.clone();
                    c.fix = d.fix.clone();
                    c.evidence = d.evidence.clone();
                }
            }
            None => out.push(CauseGroup {
                cause: d.cause,
                count: 1,
                first_seen: f.first_seen.clone(),
                last_seen: f.last_seen.clone(),
                summary: d.summary.clone(),
                evidence: d.evidence.clone(),
                fix: d.fix.clone(),
                example_flows: vec![f.id],
                evidence_incomplete: incomplete,
                endpoints: f.endpoints.clone(),
            }),
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.count));
    out
}

/// A readable, indented report of one node's diagnoses.
pub fn render(node: &str, d: &NodeDiagnoses) -> String {
    let mut s = String::new();
    let from = match d.source {
        Source::Diagnoses => "/diagnoses",
        Source::Flows => "/flows, grouped by the lab (agent has no /diagnoses)",
    };
    let _ = writeln!(s, "tracer on {node} ({from}):");
    if d.causes.is_empty() && d.node_findings.is_empty() {
        let _ = writeln!(s, "  nothing wrong found");
        return s;
    }
    for c in &d.causes {
        let flows = c
            .example_flows
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            s,
            "  {} - {} flow(s){}",
            c.cause,
            c.count,
            if flows.is_empty() {
                String::new()
            } else {
                format!(", e.g. {flows}")
            }
        );
        if let Some(e) = &c.endpoints {
            let _ = writeln!(s, "    who:      {} -> {}", e.src.label(), e.dst.label());
        }
        let seen = Some((c.first_seen.as_str(), c.last_seen.as_str()));
        render_body(&mut s, seen, &c.summary, &c.evidence, &c.fix);
    }
    for f in &d.node_findings {
        let _ = writeln!(s, "  {} - from the node's configuration", f.cause);
        render_body(&mut s, None, &f.summary, &f.evidence, &f.fix);
    }
    s
}

fn render_body(
    s: &mut String,
    seen: Option<(&str, &str)>,
    summary: &str,
    evidence: &Evidence,
    fix: &str,
) {
    if let Some((a, b)) = seen {
        let _ = writeln!(s, "    seen:     {a} .. {b}");
    }
    if !summary.is_empty() {
        let _ = writeln!(s, "    why:      {}", wrap(summary, 90, 14));
    }
    for (i, line) in evidence_lines(evidence, 8).iter().enumerate() {
        let label = if i == 0 { "evidence:" } else { "" };
        let _ = writeln!(s, "    {label:<9} {line}");
    }
    if !fix.is_empty() {
        let _ = writeln!(s, "    fix:      {}", wrap(fix, 90, 14));
    }
}

/// `key: value` lines of the evidence as it is on the wire (nested objects flattened with dots,
/// keys sorted, nulls left out), at most `max` of them.
pub fn evidence_lines(e: &Evidence, max: usize) -> Vec<String> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, x, out);
                }
            }
            Value::Null => {}
            Value::String(x) => out.push(format!("{prefix}: {x}")),
            other => out.push(format!("{prefix}: {}", truncate(&other.to_string(), 120))),
        }
    }
    let mut out = Vec::new();
    // Evidence always serialises (string keys only); the wire form is what the lab shows.
    walk(
        "",
        &serde_json::to_value(e).unwrap_or(Value::Null),
        &mut out,
    );
    if out.len() > max {
        let more = out.len() - max;
        out.truncate(max);
        out.push(format!("(+{more} more)"));
    }
    out
}

/// Greedy word wrap; continuation lines indented by `indent` spaces.
fn wrap(text: &str, width: usize, indent: usize) -> String {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let cur = lines.last_mut().map(|l| l.len()).unwrap_or(0);
        if cur > 0 && cur + 1 + word.len() > width {
            lines.push(String::new());
        }
        if let Some(l) = lines.last_mut() {
            if !l.is_empty() {
                l.push(' ');
            }
            l.push_str(word);
        }
    }
    lines.join(&format!("\n{}", " ".repeat(indent)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flow(id: u64, first: &str, last: &str, diagnosis: Value) -> Value {
        json!({"id": id, "proto": "tcp", "src": "10.0.0.1", "sport": 1000, "dst": "10.0.0.2",
            "dport": 80, "first_seen": first, "last_seen": last, "nat": null, "path": [],
            "forward": {"pkts": 1, "bytes": 60}, "reverse": {"pkts": 0, "bytes": 0},
            "reply_after_ms": null, "tcp": null, "exchanges": null, "drops": [], "verdicts": [],
            "diagnosis": diagnosis})
    }

    fn overlap(summary: &str, pool: &str) -> Value {
        json!({"cause": "ippool_overlaps_host_network", "summary": summary, "fix": "f",
            "evidence": {"host_iface": "eth0", "host_subnet": "192.168.1.0/24", "pool": pool}})
    }

    #[test]
    fn groups_flows_by_cause() -> Result<(), serde_json::Error> {
        let page: FlowsPage = serde_json::from_value(json!({"matched": 4, "truncated": false,
        "flows": [
            flow(3, "t1", "t2", Value::Null),
            flow(4, "t1", "t3", overlap("old", "10.0.0.0/8")),
            flow(7, "t0", "t5", overlap("new", "192.168.0.0/16")),
            flow(9, "t1", "t1", json!({"cause": "pod_route_missing", "summary": "s",
                "fix": "", "evidence": {"destination": "10.0.0.2", "pool": "10.0.0.0/8",
                "route_used": {"dev": null, "dst": "default", "via": null}}})),
        ]}))?;
        let c = group_flows(&page);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].cause.as_str(), "ippool_overlaps_host_network");
        assert_eq!(c[0].count, 2);
        assert_eq!(c[0].example_flows, [4, 7]);
        assert_eq!(c[0].summary, "new");
        assert_eq!(c[0].first_seen, "t0");
        assert_eq!(c[0].last_seen, "t5");
        assert!(evidence_lines(&c[0].evidence, 8).contains(&"pool: 192.168.0.0/16".into()));
        assert_eq!(c[1].cause.as_str(), "pod_route_missing");
        Ok(())
    }

    #[test]
    fn renders_diagnoses() -> Result<(), serde_json::Error> {
        let a: DiagnosesAnswer = serde_json::from_value(json!({"causes": [{
            "cause": "datastore_latency", "count": 12, "first_seen": "a", "last_seen": "b",
            "summary": "etcd is slow", "fix": "raise the probe", "evidence_incomplete": 0,
            "evidence": {"budget": null, "datastore": "10.51.0.10:2379", "exchanges": 40,
                "handshake_ms": 0.1, "max_ms": 210.5, "p50_ms": 150.2, "p90_ms": 200.0,
                "total_wait_ms": 6000},
            "example_flows": [1, 2]}],
            "node_findings": [], "flows_judged": 40,
            "evidence": {"complete": true, "lost_records": 0, "flows_with_incomplete_evidence": 0,
                "flows_evicted": 0, "reader_lag_ms": 0}}))?;
        let d = NodeDiagnoses::from(a);
        assert_eq!(d.cause_names(), ["datastore_latency"]);
        let text = render("ce-demo-1", &d);
        assert!(
            text.contains("datastore_latency - 12 flow(s), e.g. 1, 2"),
            "{text}"
        );
        assert!(
            text.contains("evidence: datastore: 10.51.0.10:2379"),
            "{text}"
        );
        assert!(text.contains("p50_ms: 150.2"), "{text}");
        assert!(!text.contains("budget"), "{text}");
        assert!(text.contains("fix:      raise the probe"), "{text}");
        let empty = NodeDiagnoses {
            source: Source::Diagnoses,
            causes: Vec::new(),
            node_findings: Vec::new(),
        };
        assert!(render("n", &empty).contains("nothing wrong found"));
        Ok(())
    }

    #[test]
    fn wraps_long_lines() {
        let w = wrap("aaa bbb ccc ddd", 7, 2);
        assert_eq!(w, "aaa bbb\n  ccc ddd");
    }
}
