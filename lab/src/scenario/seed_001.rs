//! Seed 001: the datastore is far away (etcd in Singapore, the node in US-East). calico 2.6.5,
//! the seed's version, lists nodes by Getting six keys per node one after the other, so its
//! start-up grows with the cluster and outlives the liveness probe; a Calico v3 calico-node at
//! the same latency lists the nodes in one request and starts in seconds.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tracer_model::startup::{Outcome, ProbeBudget, ReadPattern};
use tracer_model::{Cause, Verdict};

use super::common::{
    check, cross_pair, lines_summary, run_probes, startup, Probe, TrafficReport, WORKING,
};
use super::ScenarioSpec;
use crate::topo::{Cluster, ClusterConfig};
use crate::traffic::Capture;
use crate::LabError;

/// Seed 001: etcd answers 220 ms late.
pub struct Seed001;

/// The delay on every etcd answer: a US-East <-> Singapore round trip (the seed's log shows a
/// Get about every 200 ms). 150 ms would not do: 53 nodes' reads then take 52 s, inside the
/// probe's 60-70 s.
const DELAY: Duration = Duration::from_millis(220);

impl ScenarioSpec for Seed001 {
    fn name(&self) -> &'static str {
        "seed-001"
    }

    fn title(&self) -> &'static str {
        "far datastore: every etcd answer 220 ms late, calico 2.6's per-node start-up reads outlive its liveness probe"
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

    /// calico 2.6.5's start-up stand-in on node1 (sequential exchanges on one connection,
    /// stopped at the lab's cap), plus a working pod -> pod connection for contrast.
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
            startup: Some(startup(lab, ReadPattern::CalicoV2Etcdv2)?),
        })
    }

    /// On node1's NIC, every etcd request of calico 2.6.5's start-up waits at least the
    /// injected delay for its answer, so its exchanges, counted from Calico's source, need more
    /// than the manifests' probe allows even at the smallest gap captured. A v3 start-up at the
    /// same latency fits.
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError> {
        let delay = lab
            .config
            .datastore_delay
            .ok_or_else(|| LabError::Config("seed-001 needs a datastore delay".into()))?;
        let n1 = &lab.nodes[0];
        let ep = lab.etcd_endpoint();
        // Connections to etcd open before the start-up (a tracer agent's own datastore watch,
        // whose pushed events are not answers to requests) are not the start-up's: leave them
        // out of the capture by their local port.
        let others: String = n1
            .netns
            .exec(&["ss", "-Htn", "state", "established", "dst", &ep.to_string()])?
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(2)?
                    .rsplit_once(':')?
                    .1
                    .parse::<u16>()
                    .ok()
            })
            .map(|port| format!(" and not port {port}"))
            .collect();
        let cap = Capture::start_with(
            &n1.netns,
            &n1.nic,
            None,
            None,
            &["-tt"],
            &format!("tcp port {} and host {}{others}", ep.port(), ep.ip()),
        )?;
        let v2 = startup(lab, ReadPattern::CalicoV2Etcdv2)?;
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
        // From the packets alone: the full pattern at the smallest gap seen.
        let manifest = ProbeBudget::manifest();
        let needed = ReadPattern::CalicoV2Etcdv2.exchanges(v2.nodes);
        let floor_s = f64::from(needed) * min_gap;
        check(floor_s >= manifest.kill_by_s, || {
            format!(
                "{needed} exchanges x {min_gap:.3}s = {floor_s:.1}s: inside the probe's {}-{} s",
                manifest.kill_from_s, manifest.kill_by_s
            )
        })?;
        ev.push(format!(
            "{} {}: {} etcd request/response exchanges, each answered after >= {:.0} ms (min {:.1} ms); calico 2.6.5 needs {needed} for {} nodes: >= {floor_s:.1} s, past the manifests' livenessProbe ({}-{} s)",
            n1.name,
            n1.nic,
            gaps.len(),
            delay.as_secs_f64() * 1e3,
            min_gap * 1e3,
            v2.nodes,
            manifest.kill_from_s,
            manifest.kill_by_s,
        ));
        check(v2.min_latency() >= delay, || {
            format!("start-up exchanges faster than the delay: {v2}")
        })?;
        check(
            v2.outcome() == Outcome::Killed && !v2.finished_in_budget,
            || format!("calico 2.6.5's start-up fit the probe anyway: {v2}"),
        )?;
        ev.push(v2.to_string());
        let v3 = startup(lab, ReadPattern::CalicoV3Etcdv3)?;
        check(
            v3.reads_done == v3.reads_needed && v3.outcome() == Outcome::Fits,
            || format!("a v3 start-up should finish at this latency: {v3}"),
        )?;
        ev.push(v3.to_string());
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
