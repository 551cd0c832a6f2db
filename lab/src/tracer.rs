//! tracer agents on the lab's nodes: start them, wait until they are ready, read what they
//! diagnosed (`/diagnoses`, or flows grouped by cause on agents without it) and render it.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::daemon::{poll, Daemon};
use crate::http::{self, Response};
use crate::netns::Netns;
use crate::LabError;

/// The port agents listen on (loopback of their node namespace).
pub const AGENT_PORT: u16 = 9464;
/// The agents' no-reply timeout in the lab (short, so failed connects are judged quickly).
pub const NO_REPLY_TIMEOUT: &str = "2s";

/// A `tracer agent` in a node namespace, log in a file. SIGTERM on drop (it detaches its tc
/// programs), SIGKILL after 5 s.
#[derive(Debug)]
pub struct Agent {
    daemon: Daemon,
    /// The node it runs on.
    pub node: String,
    /// Loopback address it serves its API on, inside the node namespace.
    pub listen: SocketAddr,
}

impl Agent {
    /// `ip netns exec <ns> TRACER agent --listen 127.0.0.1:9464 --no-reply-timeout 2s`.
    pub fn start(ns: &Netns, node: &str, tracer: &Path, log: &Path) -> Result<Agent, LabError> {
        let listen = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, AGENT_PORT));
        let mut cmd = ns.command(&tracer.to_string_lossy());
        cmd.arg("agent")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--no-reply-timeout")
            .arg(NO_REPLY_TIMEOUT)
            .env("TRACER_LOG", "info");
        let daemon = Daemon::spawn_command(
            &format!("tracer agent on {node}"),
            &mut cmd,
            log,
            Duration::from_secs(5),
        )?;
        Ok(Agent {
            daemon,
            node: node.to_string(),
            listen,
        })
    }

    pub fn log_path(&self) -> &Path {
        self.daemon.log_path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.daemon.log_tail(lines)
    }

    /// GET `path` from the agent (from inside its namespace).
    pub fn get(&self, ns: &Netns, path: &str) -> Result<Response, LabError> {
        http::get(ns, self.listen, path, Duration::from_secs(5))
    }

    /// Waits until `/healthz` says `"ready": true`; returns that answer. Fails early if the
    /// agent exits.
    pub fn wait_ready(&mut self, ns: &Netns, timeout: Duration) -> Result<Value, LabError> {
        let mut last = String::from("no answer");
        let mut exited = None;
        let ready = poll(timeout, Duration::from_millis(100), || {
            if let Err(e) = self.daemon.check_running() {
                exited = Some(e);
                return Some(None);
            }
            match http::get(ns, self.listen, "/healthz", Duration::from_secs(1)) {
                Ok(r) => match r.json() {
                    Ok(v) if v["ready"] == Value::Bool(true) => return Some(Some(v)),
                    Ok(v) => last = v.to_string(),
                    Err(_) => last = format!("HTTP {}: {}", r.status, http::truncate(&r.body, 200)),
                },
                Err(e) => last = e.to_string(),
            }
            None
        });
        if let Some(e) = exited {
            return Err(e);
        }
        match ready.flatten() {
            Some(v) => Ok(v),
            None => Err(LabError::Unexpected(format!(
                "tracer agent on {} not ready within {timeout:?}; last /healthz: {}; log:\n{}",
                self.node,
                http::truncate(&last, 300),
                self.log_tail(15)
            ))),
        }
    }

    /// What the agent diagnosed: `/diagnoses`, or on agents without it (404) the faulty flows
    /// of `/flows?limit=50` grouped by cause.
    pub fn diagnoses(&self, ns: &Netns) -> Result<NodeDiagnoses, LabError> {
        let r = self.get(ns, "/diagnoses")?;
        match r.status {
            200 => Ok(NodeDiagnoses {
                source: Source::Diagnoses,
                ..parse_diagnoses(&r.json()?)
            }),
            404 => {
                let f = self.get(ns, "/flows?limit=50")?;
                if f.status != 200 {
                    return Err(api_error(&self.node, "/flows?limit=50", &f));
                }
                Ok(NodeDiagnoses {
                    source: Source::Flows,
                    causes: group_flows(&f.json()?),
                    node_findings: Vec::new(),
                })
            }
            _ => Err(api_error(&self.node, "/diagnoses", &r)),
        }
    }

    /// How many flows carry `verdict` (`/flows?verdict=V`); `None` if the agent does not know
    /// the verdict (400) or answers otherwise.
    pub fn flows_with_verdict(&self, ns: &Netns, verdict: &str) -> Result<Option<u64>, LabError> {
        let r = self.get(ns, &format!("/flows?verdict={verdict}&limit=1"))?;
        if r.status != 200 {
            return Ok(None);
        }
        let v = r.json()?;
        Ok(v["matched"]
            .as_u64()
            .or_else(|| v["flows"].as_array().map(|a| a.len() as u64)))
    }
}

fn api_error(node: &str, path: &str, r: &Response) -> LabError {
    let hint = if r.status == 401 {
        " (the agent wants a bearer token; the lab starts agents without --token-file)"
    } else {
        ""
    };
    LabError::Unexpected(format!(
        "tracer agent on {node}: GET {path} answered {}{hint}: {}",
        r.status,
        http::truncate(&r.body, 300)
    ))
}

/// Where a node's diagnoses came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The agent's `/diagnoses`.
    Diagnoses,
    /// Faulty flows of `/flows`, grouped by the lab.
    Flows,
}

/// One cause an agent reported, with the flows behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub cause: String,
    pub count: u64,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub summary: String,
    pub fix: String,
    pub evidence: Value,
    pub example_flows: Vec<u64>,
}

/// What one agent diagnosed.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeDiagnoses {
    pub source: Source,
    /// Causes of faulty flows, most frequent first.
    pub causes: Vec<Cause>,
    /// What the node's configuration alone shows (`node_findings`, if the agent has them).
    pub node_findings: Vec<Cause>,
}

impl NodeDiagnoses {
    /// Every cause name, flow causes first.
    pub fn cause_names(&self) -> Vec<&str> {
        self.causes
            .iter()
            .chain(&self.node_findings)
            .map(|c| c.cause.as_str())
            .collect()
    }
}

fn str_field(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

fn cause_from(v: &Value) -> Option<Cause> {
    Some(Cause {
        cause: v["cause"].as_str()?.to_string(),
        count: v["count"].as_u64().unwrap_or(1),
        first_seen: v["first_seen"].as_str().map(str::to_string),
        last_seen: v["last_seen"].as_str().map(str::to_string),
        summary: str_field(v, "summary"),
        fix: str_field(v, "fix"),
        evidence: v["evidence"].clone(),
        example_flows: v["example_flows"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default(),
    })
}

/// Parses a `/diagnoses` answer: `{"causes": [...], "node_findings": [...]}`.
pub fn parse_diagnoses(v: &Value) -> NodeDiagnoses {
    let list = |key: &str| -> Vec<Cause> {
        v[key]
            .as_array()
            .map(|a| a.iter().filter_map(cause_from).collect())
            .unwrap_or_default()
    };
    NodeDiagnoses {
        source: Source::Diagnoses,
        causes: list("causes"),
        node_findings: list("node_findings"),
    }
}

/// Groups the flows of a `/flows` answer with a non-null `diagnosis` by cause (most frequent
/// first), keeping the newest flow's summary, evidence and fix.
pub fn group_flows(v: &Value) -> Vec<Cause> {
    let mut out: Vec<Cause> = Vec::new();
    for f in v["flows"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let d = &f["diagnosis"];
        let Some(cause) = d["cause"].as_str() else {
            continue;
        };
        let id = f["id"].as_u64();
        let first = f["first_seen"].as_str().map(str::to_string);
        let last = f["last_seen"].as_str().map(str::to_string);
        match out.iter_mut().find(|c| c.cause == cause) {
            Some(c) => {
                c.count += 1;
                c.example_flows
                    .extend(id.filter(|_| c.example_flows.len() < 5));
                if first.is_some() && (c.first_seen.is_none() || first < c.first_seen) {
                    c.first_seen = first;
                }
                if last > c.last_seen {
                    c.last_seen = last;
                    c.summary = str_field(d, "summary");
                    c.fix = str_field(d, "fix");
                    c.evidence = d["evidence"].clone();
                }
            }
            None => out.push(Cause {
                cause: cause.to_string(),
                count: 1,
                first_seen: first,
                last_seen: last,
                summary: str_field(d, "summary"),
                fix: str_field(d, "fix"),
                evidence: d["evidence"].clone(),
                example_flows: id.into_iter().collect(),
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
        render_body(&mut s, c);
    }
    for c in &d.node_findings {
        let _ = writeln!(s, "  {} - from the node's configuration", c.cause);
        render_body(&mut s, c);
    }
    s
}

fn render_body(s: &mut String, c: &Cause) {
    if let (Some(a), Some(b)) = (&c.first_seen, &c.last_seen) {
        let _ = writeln!(s, "    seen:     {a} .. {b}");
    }
    if !c.summary.is_empty() {
        let _ = writeln!(s, "    why:      {}", wrap(&c.summary, 90, 14));
    }
    for (i, line) in evidence_lines(&c.evidence, 8).iter().enumerate() {
        let label = if i == 0 { "evidence:" } else { "" };
        let _ = writeln!(s, "    {label:<9} {line}");
    }
    if !c.fix.is_empty() {
        let _ = writeln!(s, "    fix:      {}", wrap(&c.fix, 90, 14));
    }
}

/// `key: value` lines of an evidence object (nested objects flattened with dots), at most
/// `max` of them.
pub fn evidence_lines(v: &Value, max: usize) -> Vec<String> {
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
            other => out.push(format!(
                "{prefix}: {}",
                http::truncate(&other.to_string(), 120)
            )),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
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

    #[test]
    fn groups_flows_by_cause() {
        let v = json!({"flows": [
            {"id": 3, "first_seen": "t1", "last_seen": "t2", "diagnosis": null},
            {"id": 4, "first_seen": "t1", "last_seen": "t3", "diagnosis": {
                "cause": "ippool_overlaps_host_network", "summary": "old", "fix": "f", "evidence": {}}},
            {"id": 7, "first_seen": "t0", "last_seen": "t5", "diagnosis": {
                "cause": "ippool_overlaps_host_network", "summary": "new", "fix": "f2",
                "evidence": {"pool": "192.168.0.0/16"}}},
            {"id": 9, "diagnosis": {"cause": "other", "summary": "s", "fix": "", "evidence": null}},
        ]});
        let c = group_flows(&v);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].cause, "ippool_overlaps_host_network");
        assert_eq!(c[0].count, 2);
        assert_eq!(c[0].example_flows, [4, 7]);
        assert_eq!(c[0].summary, "new");
        assert_eq!(c[0].first_seen.as_deref(), Some("t0"));
        assert_eq!(c[0].last_seen.as_deref(), Some("t5"));
        assert_eq!(c[1].cause, "other");
    }

    #[test]
    fn parses_diagnoses_and_renders() {
        let v = json!({"causes": [{"cause": "datastore_latency", "count": 12,
            "first_seen": "a", "last_seen": "b", "summary": "etcd is slow", "fix": "raise the probe",
            "evidence": {"p50_ms": 150.2, "endpoint": {"ip": "10.51.0.10", "port": 2379}},
            "example_flows": [1, 2]}],
            "node_findings": [], "flows_judged": 40});
        let d = parse_diagnoses(&v);
        assert_eq!(d.cause_names(), ["datastore_latency"]);
        let text = render("ce-demo-1", &d);
        assert!(
            text.contains("datastore_latency - 12 flow(s), e.g. 1, 2"),
            "{text}"
        );
        assert!(text.contains("endpoint.port: 2379"), "{text}");
        assert!(text.contains("fix:      raise the probe"), "{text}");
        let empty = parse_diagnoses(&json!({"causes": []}));
        assert!(render("n", &empty).contains("nothing wrong found"));
    }

    #[test]
    fn wraps_long_lines() {
        let w = wrap("aaa bbb ccc ddd", 7, 2);
        assert_eq!(w, "aaa bbb\n  ccc ddd");
    }
}
