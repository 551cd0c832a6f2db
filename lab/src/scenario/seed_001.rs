//! Seed 001: the datastore is far away; calico-node's sequential startup reads outlive the
//! liveness probe's budget.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tracer_model::{Cause, Verdict};

use super::common::{
    check, cross_pair, lines_summary, run_probes, startup, Probe, TrafficReport, WORKING,
};
use super::ScenarioSpec;
use crate::topo::{Cluster, ClusterConfig};
use crate::traffic::Capture;
use crate::LabError;

/// Seed 001: etcd answers 150 ms late.
pub struct Seed001;

/// The delay on every etcd answer (a far region's round trip).
const DELAY: Duration = Duration::from_millis(150);

impl ScenarioSpec for Seed001 {
    fn name(&self) -> &'static str {
        "seed-001"
    }

    fn title(&self) -> &'static str {
        "far datastore: every etcd answer 150 ms late, calico-node startup outlives its liveness probe"
    }

    fn expected_cause(&self) -> Option<Cause> {
        Some(Cause::DatastoreLatency)
    }

    fn expected_verdict(&self) -> Option<Verdict> {
        None
    }

    /// The datastore.
    fn focus(&self, lab: &Cluster) -> Option<IpAddr> {
        Some(lab.etcd_endpoint().ip())
    }

    fn config(&self) -> ClusterConfig {
        ClusterConfig {
            datastore_delay: Some(DELAY),
            ..ClusterConfig::two_nodes()
        }
    }

    /// calico-node's startup on node1 (sequential reads on one connection under the scaled
    /// liveness budget), plus a working pod -> pod connection for contrast.
    fn drive(&self, lab: &Cluster) -> Result<TrafficReport, LabError> {
        let (a, b) = cross_pair(lab)?;
        let attempts = run_probes(vec![Probe::pod(
            "pod -> pod across nodes",
            lab,
            a,
            b.addr(),
            WORKING,
        )])?;
        Ok(TrafficReport {
            attempts,
            startup: Some(startup(lab)?),
        })
    }

    /// On node1's NIC, every etcd request waits at least the injected delay for its answer;
    /// the startup's measured latency is at least the delay, and it does not finish in budget.
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError> {
        let delay = lab
            .config
            .datastore_delay
            .ok_or_else(|| LabError::Config("seed-001 needs a datastore delay".into()))?;
        let n1 = &lab.nodes[0];
        let ep = lab.etcd_endpoint();
        let cap = Capture::start_with(
            &n1.netns,
            &n1.nic,
            None,
            None,
            &["-tt"],
            &format!("tcp port {} and host {}", ep.port(), ep.ip()),
        )?;
        let s = startup(lab)?;
        let lines = cap.finish(Duration::from_millis(300));
        let gaps = exchange_gaps(&lines, ep);
        let mut ev = Vec::new();
        check(gaps.len() >= 5, || {
            format!(
                "too few etcd exchanges captured on {} {}: {}",
                n1.name,
                n1.nic,
                lines_summary(&lines, 6)
            )
        })?;
        let min_gap = gaps.iter().copied().fold(f64::MAX, f64::min);
        check(min_gap >= delay.as_secs_f64(), || {
            format!("an etcd answer came back after {min_gap:.3}s < the injected {delay:?}")
        })?;
        ev.push(format!(
            "{} {}: {} etcd request/response exchanges, each answered after >= {:.0} ms (min {:.1} ms)",
            n1.name,
            n1.nic,
            gaps.len(),
            delay.as_secs_f64() * 1e3,
            min_gap * 1e3
        ));
        check(s.min_latency() >= delay, || {
            format!("startup reads faster than the delay: {s}")
        })?;
        check(!s.finished_in_budget, || {
            format!("startup fit the budget anyway: {s}")
        })?;
        ev.push(format!("calico-node startup: {s}"));
        Ok(ev)
    }
}

/// From `tcpdump -tt -n` lines: for each request with payload to `server`, the time until
/// the next response with payload from it.
fn exchange_gaps(lines: &[String], server: SocketAddr) -> Vec<f64> {
    let srv = format!("{}.{}", server.ip(), server.port());
    let mut gaps = Vec::new();
    let mut pending: Option<f64> = None;
    for l in lines {
        let mut f = l.split_whitespace();
        let Some(ts) = f.next().and_then(|t| t.parse::<f64>().ok()) else {
            continue;
        };
        let (Some(_ip), Some(src), Some(_gt), Some(dst)) = (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let payload = l
            .rsplit("length ")
            .next()
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if payload == 0 {
            continue;
        }
        if dst.trim_end_matches(':') == srv {
            pending.get_or_insert(ts);
        } else if src == srv {
            if let Some(t0) = pending.take() {
                gaps.push(ts - t0);
            }
        }
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_gaps_pair_requests_with_answers() {
        let server = SocketAddr::from(([10, 51, 0, 10], 2379));
        let lines: Vec<String> = [
            "1700000000.000000 IP 10.51.0.100.40000 > 10.51.0.10.2379: Flags [S], seq 1, win 64240, length 0",
            "1700000000.100000 IP 10.51.0.100.40000 > 10.51.0.10.2379: Flags [P.], seq 1:120, ack 1, length 119",
            "1700000000.101000 IP 10.51.0.10.2379 > 10.51.0.100.40000: Flags [.], ack 120, length 0",
            "1700000000.260000 IP 10.51.0.10.2379 > 10.51.0.100.40000: Flags [P.], seq 1:300, ack 120, length 299",
            "1700000000.261000 IP 10.51.0.100.40000 > 10.51.0.10.2379: Flags [P.], seq 120:239, ack 300, length 119",
            "1700000000.420000 IP 10.51.0.10.2379 > 10.51.0.100.40000: Flags [P.], seq 300:599, ack 239, length 299",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let gaps = exchange_gaps(&lines, server);
        assert_eq!(gaps.len(), 2);
        assert!(
            (gaps[0] - 0.16).abs() < 1e-6 && (gaps[1] - 0.159).abs() < 1e-6,
            "{gaps:?}"
        );
    }
}
