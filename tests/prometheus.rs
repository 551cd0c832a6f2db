//! tracer's Prometheus rules and dashboard (deploy/prometheus/) against Debian's own
//! `promtool` and `prometheus` (extracted by scripts/setup.sh into target/tools/prometheus):
//! the rules check and pass their unit tests; every runbook link lands on a runbook heading; and
//! a real Prometheus, started inside each seed scenario's lab, scrapes both nodes' agents and
//! fires the scenario's alert with the right labels, fires nothing on the healthy cluster, and
//! answers every query of the dashboard.
mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, Res, TestResult, API_PORT, READY};
use serde_json::Value;
use tracer_lab::{
    daemon::{poll, Daemon},
    http,
    netns::Netns,
    scenario::Scenario,
    topo::Cluster,
};
use tracer_model::Cause;

/// Where Prometheus listens, inside node1's namespace.
const PROM_PORT: u16 = 9090;
/// From the drive's end: the agents' 2 s no-reply timeout, a tally tick, a scrape and a rule
/// evaluation (1 s each) leave plenty of margin.
const FIRE_WITHIN: Duration = Duration::from_secs(30);
/// How long the healthy cluster is watched for an alert after its traffic.
const HEALTHY_WATCH: Duration = Duration::from_secs(8);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rules_dir() -> PathBuf {
    repo().join("deploy/prometheus")
}

/// The directory holding `prometheus` and `promtool`.
fn tools() -> Res<PathBuf> {
    let dir = std::env::var_os("TRACER_PROMETHEUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/tools/prometheus"));
    if !dir.join("prometheus").is_file() || !dir.join("promtool").is_file() {
        return Err(format!(
            "no prometheus/promtool in {}: run scripts/setup.sh",
            dir.display()
        )
        .into());
    }
    Ok(dir)
}

fn promtool(args: &[&str]) -> TestResult {
    let out = Command::new(tools()?.join("promtool"))
        .args(args)
        .current_dir(rules_dir())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    Ok(())
}

/// Every alerting rule of rules.yaml: (name, its `cause` label selector if any, runbook_url).
fn alert_rules() -> Res<Vec<(String, Option<String>, String)>> {
    let text = std::fs::read_to_string(rules_dir().join("rules.yaml"))?;
    let docs = yaml_rust2::YamlLoader::load_from_str(&text)?;
    let mut out = Vec::new();
    let groups = docs
        .first()
        .and_then(|d| d["groups"].as_vec())
        .ok_or("rules.yaml: no groups")?;
    for g in groups {
        for r in g["rules"].as_vec().ok_or("a group without rules")? {
            let Some(name) = r["alert"].as_str() else {
                continue;
            };
            let expr = r["expr"].as_str().ok_or("an alert without expr")?;
            let cause = expr
                .split("cause=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(str::to_string);
            let url = r["annotations"]["runbook_url"]
                .as_str()
                .ok_or_else(|| format!("{name}: no runbook_url"))?;
            for key in ["summary", "description"] {
                assert!(
                    r["annotations"][key]
                        .as_str()
                        .is_some_and(|s| !s.is_empty()),
                    "{name}: no {key}"
                );
            }
            out.push((name.to_string(), cause, url.to_string()));
        }
    }
    Ok(out)
}

/// The alert that watches `cause`.
fn alert_for(cause: Cause) -> Res<String> {
    alert_rules()?
        .into_iter()
        .find(|(_, c, _)| c.as_deref() == Some(cause.as_str()))
        .map(|(n, _, _)| n)
        .ok_or_else(|| format!("no alert for {cause}").into())
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() -> TestResult {
    promtool(&["check", "rules", "rules.yaml"])?;
    promtool(&["test", "rules", "rules_test.yaml"])?;
    // Every alert has unit cases of its own.
    let tests = std::fs::read_to_string(rules_dir().join("rules_test.yaml"))?;
    for (name, _, _) in alert_rules()? {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{name} has no unit test"
        );
    }
    Ok(())
}

/// GitHub's heading anchors: lower case, punctuation other than `-` and `_` dropped, spaces
/// to dashes.
fn anchors(markdown: &str) -> Vec<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

#[test]
fn one_alert_per_cause_each_with_a_runbook_section() -> TestResult {
    let rules = alert_rules()?;
    for c in Cause::ALL {
        let n = rules
            .iter()
            .filter(|(_, x, _)| x.as_deref() == Some(c.as_str()))
            .count();
        assert_eq!(n, 1, "alerts for {c}");
    }
    let runbook = std::fs::read_to_string(repo().join("docs/runbook.md"))?;
    let have = anchors(&runbook);
    for (name, _, url) in &rules {
        let (file, anchor) = url
            .split_once('#')
            .ok_or_else(|| format!("{name}: {url} has no anchor"))?;
        assert_eq!(file, "docs/runbook.md", "{name}");
        assert!(
            have.iter().any(|a| a == anchor),
            "{name}: no heading for #{anchor} in docs/runbook.md"
        );
    }
    Ok(())
}

/// A Prometheus server in `ns`, its data in `dir`; stopped (SIGTERM, then SIGKILL) on drop.
struct Prometheus<'a> {
    ns: &'a Netns,
    _daemon: Daemon,
}

impl<'a> Prometheus<'a> {
    /// Scrapes `targets` (node name, address) every second and evaluates rules.yaml every
    /// second.
    fn start(ns: &'a Netns, dir: &Path, targets: &[(String, String)]) -> Res<Prometheus<'a>> {
        std::fs::create_dir_all(dir.join("data"))?;
        let statics: String = targets
            .iter()
            .map(|(node, addr)| {
                format!("      - targets: [\"{addr}\"]\n        labels: {{node: \"{node}\"}}\n")
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: tracer\n    static_configs:\n{statics}",
            rules_dir().join("rules.yaml").display()
        );
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config)?;
        let mut cmd = ns.command(&tools()?.join("prometheus").to_string_lossy());
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
            .arg("--log.level=warn");
        let daemon = Daemon::spawn_command(
            "prometheus",
            &mut cmd,
            &dir.join("prometheus.log"),
            Duration::from_secs(5),
        )?;
        let p = Prometheus {
            ns,
            _daemon: daemon,
        };
        poll(Duration::from_secs(20), Duration::from_millis(200), || {
            p.get("/-/ready").ok().filter(|r| r.status == 200)
        })
        .ok_or("prometheus did not become ready")?;
        Ok(p)
    }

    fn get(&self, path: &str) -> Res<http::Response> {
        let addr = SocketAddr::from(([127, 0, 0, 1], PROM_PORT));
        Ok(http::get(self.ns, addr, path, Duration::from_secs(5))?)
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Res<Vec<Value>> {
        let r = self.get(&format!("/api/v1/query?query={}", encode(promql)))?;
        let v = r.json()?;
        if v["status"] != "success" {
            return Err(format!("{promql}: {}", r.body).into());
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every target has been scraped successfully.
    fn wait_up(&self, n: usize) -> TestResult {
        poll(Duration::from_secs(30), Duration::from_millis(300), || {
            self.query("up == 1").ok().filter(|v| v.len() == n)
        })
        .ok_or_else(|| format!("not all {n} targets up: {:?}", self.query("up")))?;
        Ok(())
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Agents on every node, reachable across the underlay for Prometheus on node1, reading the
/// lab's etcd as calico-node does (`denied_by_policy` names policies from it; without a
/// datastore a policy drop stays an honest `kernel_drop`).
fn agents(lab: &Cluster) -> Res<Vec<Agent>> {
    let mut out = Vec::new();
    let etcd = format!("http://{}", lab.etcd_endpoint());
    for n in &lab.nodes {
        let args = [
            "--no-reply-timeout",
            "2s",
            "--insecure",
            "--datastore-type",
            "etcdv3",
            "--etcd-endpoints",
            &etcd,
            "--nodename",
            &n.name,
        ];
        let mut a = common::start_on(&n.netns, &format!("0.0.0.0:{API_PORT}"), &args)?;
        a.wait_ready(&n.netns, READY)?;
        out.push(a);
    }
    Ok(out)
}

/// The dashboard's panel queries, with Grafana's variables as a user who picks "All" sees them.
fn dashboard_queries() -> Res<Vec<(String, String)>> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(
        rules_dir().join("dashboard.json"),
    )?)?;
    let mut out = Vec::new();
    for p in d["panels"].as_array().ok_or("no panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().ok_or("a target without expr")?;
            let expr = expr
                .replace("$__rate_interval", "15s")
                .replace("$instance", ".*")
                .replace("$job", ".*");
            out.push((p["title"].as_str().unwrap_or_default().to_string(), expr));
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    Ok(out)
}

/// Firing alerts, as (alertname, labels).
fn firing(p: &Prometheus<'_>) -> Res<Vec<(String, Value)>> {
    Ok(p.query("ALERTS{alertstate=\"firing\"}")?
        .into_iter()
        .map(|s| {
            let name = s["metric"]["alertname"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (name, s["metric"].clone())
        })
        .collect())
}

/// One scenario under a fresh Prometheus: its alert fires with the right labels (none for
/// healthy), and the dashboard's queries all answer. Returns what fired.
fn scenario_under_prometheus(s: Scenario) -> Res<Vec<(String, Value)>> {
    let started = Instant::now();
    let lab = Cluster::build(&s.config())?;
    let n1 = &lab.nodes[0];
    let targets: Vec<(String, String)> = lab
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            // node1's agent over loopback, the others across the underlay.
            let ip = if i == 0 {
                "127.0.0.1".to_string()
            } else {
                n.ip.to_string()
            };
            (n.name.clone(), format!("{ip}:{API_PORT}"))
        })
        .collect();
    // Started before the agents: the first scrape, with every cause's counter at 0, comes
    // before any diagnosis (which waits out the no-reply timeout), so increase() sees it.
    let prom = Prometheus::start(&n1.netns, &lab.dir.join("prometheus"), &targets)?;
    let _agents = agents(&lab)?;
    prom.wait_up(targets.len())?;
    let _ = s.drive(&lab)?;
    let fired = match s.expected_cause() {
        Some(cause) => {
            let name = alert_for(cause)?;
            let hit = poll(FIRE_WITHIN, Duration::from_millis(500), || {
                firing(&prom)
                    .ok()?
                    .into_iter()
                    .find(|(n, _)| *n == name)
            })
            .ok_or_else(|| {
                format!(
                    "{s}: {name} did not fire within {FIRE_WITHIN:?}; firing: {:?}; diagnoses counters: {:?}",
                    firing(&prom),
                    prom.query("tracer_diagnoses_total > 0")
                )
            })?;
            let labels = &hit.1;
            assert_eq!(labels["cause"], cause.as_str(), "{s}: {labels}");
            assert_eq!(labels["job"], "tracer", "{s}: {labels}");
            assert!(labels["severity"].is_string(), "{s}: {labels}");
            let (node, instance) = (labels["node"].as_str(), labels["instance"].as_str());
            assert!(
                targets
                    .iter()
                    .any(|(n, a)| Some(n.as_str()) == node && Some(a.as_str()) == instance),
                "{s}: the alert names a node of the lab and its agent: {labels}"
            );
            firing(&prom)?
        }
        None => {
            std::thread::sleep(HEALTHY_WATCH);
            let f = firing(&prom)?;
            assert!(f.is_empty(), "{s}: alerts on a healthy cluster: {f:?}");
            // Nothing pending either: a fault seen but not yet firing would show here.
            let pending = prom.query("ALERTS")?;
            assert!(pending.is_empty(), "{s}: {pending:?}");
            f
        }
    };
    for (title, expr) in dashboard_queries()? {
        let r = prom.query(&expr)?;
        assert!(
            !r.is_empty(),
            "{s}: dashboard panel {title:?}: {expr} returned no data"
        );
    }
    eprintln!(
        "{s}: fired {:?} in {:.0?}",
        fired
            .iter()
            .map(|(n, l)| format!("{n}@{}", l["node"]))
            .collect::<Vec<_>>(),
        started.elapsed()
    );
    Ok(fired)
}

#[test]
fn a_real_prometheus_fires_each_seeds_alert_and_none_for_healthy() -> TestResult {
    for s in Scenario::ALL {
        scenario_under_prometheus(*s)?;
    }
    Ok(())
}
