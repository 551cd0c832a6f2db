//! What every scenario uses: scripted connection attempts run concurrently, the report of a
//! scenario's traffic, and small helpers for its packet-level evidence.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::startup::{self, StartupReport};
use crate::topo::{Cluster, ClusterPod};
use crate::traffic::{self, Capture, ProbeOutcome};
use crate::LabError;
use tracer_model::startup::ReadPattern;

/// Connects expected to work get this long.
pub(super) const WORKING: Duration = Duration::from_secs(5);
/// Connects expected to fail get this long (two SYN transmissions; tracer's agent runs with a
/// 2 s no-reply timeout in the lab).
pub(super) const BLACKHOLE: Duration = Duration::from_secs(2);
/// How long BGP gets to come up where it should.
pub(super) const BGP_UP: Duration = Duration::from_secs(15);

/// One scripted connection attempt and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// What it stands for, e.g. "pod -> pod across nodes".
    pub what: String,
    /// Who connected, e.g. "deepflow-otel-spring-demo/svc-item-... 10.244.142.36 on ce-demo-1".
    pub from: String,
    pub to: SocketAddr,
    pub outcome: ProbeOutcome,
    pub elapsed: Duration,
}

impl Attempt {
    /// The handshake completed and the server's greeting arrived.
    pub fn ok(&self) -> bool {
        matches!(&self.outcome, ProbeOutcome::Connected { greeting } if !greeting.is_empty())
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match &self.outcome {
            ProbeOutcome::Connected { greeting } if !greeting.is_empty() => "connected".into(),
            ProbeOutcome::Connected { .. } => "connected, no greeting".into(),
            ProbeOutcome::TimedOut => "timed out".into(),
            ProbeOutcome::Refused => "refused".into(),
            ProbeOutcome::Failed(e) => format!("failed: {e}"),
        };
        write!(
            f,
            "{}: {} -> {}: {outcome} ({:.2?})",
            self.what, self.from, self.to, self.elapsed
        )
    }
}

/// The traffic a scenario's `drive()` generated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficReport {
    pub attempts: Vec<Attempt>,
    /// The calico-node-like startup against the datastore, where the scenario runs one.
    pub startup: Option<StartupReport>,
}

impl fmt::Display for TrafficReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in &self.attempts {
            writeln!(f, "{a}")?;
        }
        if let Some(s) = &self.startup {
            writeln!(f, "calico-node startup: {s}")?;
        }
        Ok(())
    }
}

/// `Err(LabError::Verify(msg()))` unless `cond` holds.
pub(super) fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), LabError> {
    if cond {
        Ok(())
    } else {
        Err(LabError::Verify(msg()))
    }
}

fn describe(lab: &Cluster, pod: &ClusterPod) -> String {
    format!(
        "{} {} on {}",
        pod.full_name(),
        pod.ip(),
        lab.nodes[pod.node].name
    )
}

/// A planned connection attempt.
pub(super) struct Probe<'a> {
    what: String,
    from: String,
    ns: &'a Netns,
    to: SocketAddr,
    timeout: Duration,
}

impl<'a> Probe<'a> {
    pub(super) fn pod(
        what: &str,
        lab: &Cluster,
        from: &'a ClusterPod,
        to: SocketAddr,
        timeout: Duration,
    ) -> Self {
        Probe {
            what: what.into(),
            from: describe(lab, from),
            ns: from.netns(),
            to,
            timeout,
        }
    }

    pub(super) fn host(
        what: &str,
        lab: &'a Cluster,
        node: usize,
        to: SocketAddr,
        timeout: Duration,
    ) -> Self {
        let n = &lab.nodes[node];
        Probe {
            what: what.into(),
            from: format!("{} host network {}", n.name, n.ip),
            ns: &n.netns,
            to,
            timeout,
        }
    }
}

/// Runs the probes concurrently (failing ones cost their whole timeout) and returns the
/// attempts in order.
pub(super) fn run_probes(probes: Vec<Probe<'_>>) -> Result<Vec<Attempt>, LabError> {
    std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .into_iter()
            .map(|p| {
                s.spawn(move || -> Result<Attempt, LabError> {
                    let start = Instant::now();
                    let outcome = traffic::tcp_connect(p.ns, p.to, p.timeout)?;
                    Ok(Attempt {
                        what: p.what,
                        from: p.from,
                        to: p.to,
                        outcome,
                        elapsed: start.elapsed(),
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(LabError::Unexpected("a probe thread panicked".into())))
            })
            .collect()
    })
}

/// node1's first pod and node2's first pod.
pub(super) fn cross_pair(lab: &Cluster) -> Result<(&ClusterPod, &ClusterPod), LabError> {
    Ok((lab.first_pod_on(0)?, lab.first_pod_on(1)?))
}

/// The calico-node start-up stand-in of `pattern` on node1, joining the lab's datastore (its
/// 53 nodes), stopped at the lab's cap with the rest projected.
pub(super) fn startup(lab: &Cluster, pattern: ReadPattern) -> Result<StartupReport, LabError> {
    let node = &lab.nodes[0];
    let hosts = &lab.datastore.hosts;
    startup::run(
        &node.netns,
        lab.etcd_endpoint(),
        pattern,
        hosts.len() as u32,
        &startup::steps(pattern, &node.name, hosts),
    )
}

/// Lets packets in flight arrive for `settle`, then stops every capture and returns its lines.
pub(super) fn finish_all(captures: Vec<Capture>, settle: Duration) -> Vec<Vec<String>> {
    std::thread::sleep(settle);
    captures
        .into_iter()
        .map(|c| c.finish(Duration::ZERO))
        .collect()
}

/// Evidence lines from a tcpdump capture, trimmed.
pub(super) fn lines_summary(lines: &[String], max: usize) -> String {
    let mut v: Vec<&str> = lines.iter().map(|l| l.trim()).take(max).collect();
    if lines.len() > max {
        v.push("...");
    }
    v.join(" | ")
}

/// `ip route show PREFIX` in `ns`, trimmed (empty if there is no such route).
pub(super) fn route_show(ns: &Netns, prefix: &str) -> Result<String, LabError> {
    Ok(ns.ip(&["route", "show", prefix])?.trim().to_string())
}
