//! The seed incidents (and a healthy control) on a [`Cluster`].
//!
//! Each scenario has a configuration (`config()`), traffic that exercises the fault
//! (`drive()`, what tracer should then explain) and a packet-level proof that the fault is
//! really there, independent of tracer (`verify()`, built on tcpdump, BIRD, iptables counters
//! and what servers saw). [`Scenario`] dispatches by name.
//!
//! | scenario | what breaks | expected tracer cause |
//! |---|---|---|
//! | `healthy` | nothing | none |
//! | `seed-001` | datastore 150 ms away: calico-node's startup outlives its liveness budget | `datastore_latency` |
//! | `seed-002` | pool contains the host LAN: pod -> apiserver leaves un-SNATed | `ippool_overlaps_host_network` |
//! | `seed-003` | node2's VXLAN parent is the bridge `nerdctl0` (10.4.0.1) | `node_address_on_wrong_interface` |
//! | `seed-004` | node2's BGP address is its second NIC (10.66.0.66); node2 dials | `node_address_on_wrong_interface` |
//! | `seed-004-passive` | the same with 10.0.0.66, which makes node2 passive; node1 dials it | `node_address_on_wrong_interface` |

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::calico;
use crate::etcd::{self, EtcdClient, Liveness, StartupReport};
use crate::netns::Netns;
use crate::topo::{
    Cluster, ClusterConfig, ClusterPod, ExtraBridge, ExtraNic, NodeConfig, PodConfig, Routing,
};
use crate::traffic::{self, Capture, ProbeOutcome};
use crate::{LabError, Pool};

/// Connects expected to work get this long.
const WORKING: Duration = Duration::from_secs(5);
/// Connects expected to fail get this long (two SYN transmissions; tracer's agent runs with a
/// 2 s no-reply timeout in the lab).
const BLACKHOLE: Duration = Duration::from_secs(2);
/// How long BGP gets to come up where it should.
const BGP_UP: Duration = Duration::from_secs(15);

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

/// The scenarios, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    Healthy,
    Seed001,
    Seed002,
    Seed003,
    Seed004,
    Seed004Passive,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Healthy,
        Scenario::Seed001,
        Scenario::Seed002,
        Scenario::Seed003,
        Scenario::Seed004,
        Scenario::Seed004Passive,
    ];

    /// `healthy`, `seed-001`...
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Seed001 => "seed-001",
            Scenario::Seed002 => "seed-002",
            Scenario::Seed003 => "seed-003",
            Scenario::Seed004 => "seed-004",
            Scenario::Seed004Passive => "seed-004-passive",
        }
    }

    /// One line on what the scenario is.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::Healthy => "two Calico nodes over VXLAN, BGP mesh up, etcd close by",
            Scenario::Seed001 => {
                "far datastore: every etcd answer 150 ms late, calico-node startup outlives its liveness probe"
            }
            Scenario::Seed002 => {
                "IPPool 192.168.0.0/16 contains the host LAN 192.168.21.0/24: pod -> apiserver is not SNATed"
            }
            Scenario::Seed003 => {
                "autodetection picked bridge nerdctl0 (10.4.0.1) on ce-demo-2: VXLAN to that node goes nowhere"
            }
            Scenario::Seed004 => {
                "autodetection picked second NIC eth1 (10.66.0.66) on k8smater1, which dials from it: BGP never establishes, no pod routes"
            }
            Scenario::Seed004Passive => {
                "autodetection picked second NIC eth1 (10.0.0.66) on k8smater1, passive: k8smaster2 dials 10.0.0.66, BGP never establishes"
            }
        }
    }

    /// The cause tracer should report, if any.
    pub fn expected_cause(self) -> Option<&'static str> {
        match self {
            Scenario::Healthy => None,
            Scenario::Seed001 => Some("datastore_latency"),
            Scenario::Seed002 => Some("ippool_overlaps_host_network"),
            Scenario::Seed003 | Scenario::Seed004 | Scenario::Seed004Passive => {
                Some("node_address_on_wrong_interface")
            }
        }
    }

    /// The verdict that distinguishes the expected diagnosis, where there is one.
    pub fn expected_verdict(self) -> Option<&'static str> {
        match self {
            Scenario::Seed002 => Some("snat_skipped"),
            Scenario::Seed003 => Some("wrong_parent_device"),
            Scenario::Seed004 => Some("wrong_source_address"),
            // The other node's off-link-peer diagnosis has no verdict of its own.
            Scenario::Healthy | Scenario::Seed001 | Scenario::Seed004Passive => None,
        }
    }

    pub fn config(self) -> ClusterConfig {
        match self {
            Scenario::Healthy => healthy::config(),
            Scenario::Seed001 => seed_001::config(),
            Scenario::Seed002 => seed_002::config(),
            Scenario::Seed003 => seed_003::config(),
            Scenario::Seed004 => seed_004::config(),
            Scenario::Seed004Passive => seed_004::passive_config(),
        }
    }

    pub fn drive(self, lab: &Cluster) -> Result<TrafficReport, LabError> {
        match self {
            Scenario::Healthy => healthy::drive(lab),
            Scenario::Seed001 => seed_001::drive(lab),
            Scenario::Seed002 => seed_002::drive(lab),
            Scenario::Seed003 => seed_003::drive(lab),
            Scenario::Seed004 | Scenario::Seed004Passive => seed_004::drive(lab),
        }
    }

    /// The packet-level proof; `Err(LabError::Verify)` if the lab does not show the fault (or,
    /// for `healthy`, shows one).
    pub fn verify(self, lab: &Cluster) -> Result<(), LabError> {
        self.evidence(lab).map(|_| ())
    }

    /// Like [`Scenario::verify`], returning what was observed, one finding per line.
    pub fn evidence(self, lab: &Cluster) -> Result<Vec<String>, LabError> {
        match self {
            Scenario::Healthy => healthy::evidence(lab),
            Scenario::Seed001 => seed_001::evidence(lab),
            Scenario::Seed002 => seed_002::evidence(lab),
            Scenario::Seed003 => seed_003::evidence(lab),
            Scenario::Seed004 | Scenario::Seed004Passive => seed_004::evidence(lab),
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Scenario, LabError> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| {
                LabError::Config(format!(
                    "unknown scenario {s:?} (known: {})",
                    Scenario::ALL.map(Scenario::name).join(", ")
                ))
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers.

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), LabError> {
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
struct Probe<'a> {
    what: String,
    from: String,
    ns: &'a Netns,
    to: SocketAddr,
    timeout: Duration,
}

impl<'a> Probe<'a> {
    fn pod(
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

    fn host(what: &str, lab: &'a Cluster, node: usize, to: SocketAddr, timeout: Duration) -> Self {
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
fn run_probes(probes: Vec<Probe<'_>>) -> Result<Vec<Attempt>, LabError> {
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
fn cross_pair(lab: &Cluster) -> Result<(&ClusterPod, &ClusterPod), LabError> {
    Ok((lab.first_pod_on(0)?, lab.first_pod_on(1)?))
}

fn startup(lab: &Cluster) -> Result<StartupReport, LabError> {
    etcd::run_startup(
        &lab.nodes[0].netns,
        lab.etcd_endpoint(),
        &lab.datastore.startup_keys,
        Liveness::seed_001_scaled(),
    )
}

/// Lets packets in flight arrive for `settle`, then stops every capture and returns its lines.
fn finish_all(captures: Vec<Capture>, settle: Duration) -> Vec<Vec<String>> {
    std::thread::sleep(settle);
    captures
        .into_iter()
        .map(|c| c.finish(Duration::ZERO))
        .collect()
}

/// Evidence lines from a tcpdump capture, trimmed.
fn lines_summary(lines: &[String], max: usize) -> String {
    let mut v: Vec<&str> = lines.iter().map(|l| l.trim()).take(max).collect();
    if lines.len() > max {
        v.push("...");
    }
    v.join(" | ")
}

fn route_show(ns: &Netns, prefix: &str) -> Result<String, LabError> {
    Ok(ns.ip(&["route", "show", prefix])?.trim().to_string())
}

// ---------------------------------------------------------------------------------------------

/// The healthy control: everything works.
pub mod healthy {
    use super::*;

    /// Two VXLAN nodes (seed 003's cluster, correctly detected).
    pub fn config() -> ClusterConfig {
        ClusterConfig::two_nodes()
    }

    /// The same cluster routed natively by BIRD (no overlay): pod -> pod needs BGP.
    pub fn bgp_config() -> ClusterConfig {
        ClusterConfig {
            routing: Routing::Bgp,
            ..ClusterConfig::two_nodes()
        }
    }

    /// Waits for BGP, then pod -> pod across nodes both ways, pod -> apiserver directly and via
    /// its Service VIP, and a calico-node-like startup from node1 against etcd.
    pub fn drive(lab: &Cluster) -> Result<TrafficReport, LabError> {
        lab.wait_bgp(BGP_UP)?;
        let (a, b) = cross_pair(lab)?;
        let mut probes = vec![
            Probe::pod("pod -> pod across nodes", lab, a, b.addr(), WORKING),
            Probe::pod("pod -> pod across nodes", lab, b, a.addr(), WORKING),
            Probe::pod(
                "pod -> apiserver (SNAT)",
                lab,
                a,
                lab.apiserver_addr(),
                WORKING,
            ),
        ];
        if let Some(vip) = lab.service_addr() {
            probes.push(Probe::pod("pod -> apiserver Service", lab, a, vip, WORKING));
        }
        let attempts = run_probes(probes)?;
        Ok(TrafficReport {
            attempts,
            startup: Some(startup(lab)?),
        })
    }

    pub fn verify(lab: &Cluster) -> Result<(), LabError> {
        evidence(lab).map(|_| ())
    }

    /// BGP Established on every node; pod -> pod across nodes works, over VXLAN (captured on
    /// node1's NIC) or over BIRD's routes; pod -> apiserver works and is SNATed to node1's
    /// address; node1 reads etcd, and a startup fits the liveness budget.
    pub fn evidence(lab: &Cluster) -> Result<Vec<String>, LabError> {
        let mut ev = Vec::new();
        lab.wait_bgp(BGP_UP)
            .map_err(|e| LabError::Verify(e.to_string()))?;
        ev.push(format!(
            "BGP Established on {}",
            lab.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        ));

        let (a, b) = cross_pair(lab)?;
        let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
        match lab.config.routing {
            Routing::Vxlan => {
                let cap = Capture::start(
                    &n1.netns,
                    &n1.nic,
                    Some("out"),
                    None,
                    &format!("udp dst port {} and dst host {}", calico::VXLAN_PORT, n2.ip),
                )?;
                let att = run_probes(vec![Probe::pod("pod -> pod", lab, a, b.addr(), WORKING)])?;
                check(att.iter().all(Attempt::ok), || format!("{}", att[0]))?;
                let lines = cap.finish(Duration::from_millis(300));
                let text = lines.join("\n");
                check(
                    text.contains(&format!("{}.", b.ip())) && text.contains("vni 4096"),
                    || {
                        format!(
                            "no VXLAN (vni 4096) to {} carrying {} on {} {}: {text}",
                            n2.ip,
                            b.ip(),
                            n1.name,
                            n1.nic
                        )
                    },
                )?;
                ev.push(format!(
                    "{} -> {} connected, carried in VXLAN vni 4096 from {} {} to {}:4789",
                    a.ip(),
                    b.addr(),
                    n1.name,
                    n1.nic,
                    n2.ip
                ));
            }
            Routing::Bgp => {
                let route = route_show(&n1.netns, &n2.block)?;
                check(
                    route.contains(&format!("via {}", n2.ip)) && route.contains("proto bird"),
                    || format!("{} has no BIRD route to {}: {route:?}", n1.name, n2.block),
                )?;
                let att = run_probes(vec![Probe::pod("pod -> pod", lab, a, b.addr(), WORKING)])?;
                check(att.iter().all(Attempt::ok), || format!("{}", att[0]))?;
                ev.push(format!(
                    "{}: {route}; {} -> {} connected",
                    n1.name,
                    a.ip(),
                    b.addr()
                ));
            }
        }
        let back = run_probes(vec![Probe::pod("pod -> pod", lab, b, a.addr(), WORKING)])?;
        check(back.iter().all(Attempt::ok), || format!("{}", back[0]))?;

        let before = calico::nat_outgoing_packets(&n1.netns)?;
        let api = run_probes(vec![Probe::pod(
            "pod -> apiserver",
            lab,
            a,
            lab.apiserver_addr(),
            WORKING,
        )])?;
        check(api.iter().all(Attempt::ok), || format!("{}", api[0]))?;
        let after = calico::nat_outgoing_packets(&n1.netns)?;
        let peers = lab.apiserver.peers();
        check(
            after > before
                && peers.iter().any(|p| p.ip() == n1.ip)
                && !peers.iter().any(|p| p.ip() == a.ip()),
            || {
                format!("pod -> apiserver not masqueraded: MASQUERADE {before} -> {after}, apiserver saw {peers:?}")
            },
        )?;
        ev.push(format!(
            "{} -> {} masqueraded (cali-nat-outgoing +{}), apiserver saw {}",
            a.ip(),
            lab.apiserver_addr(),
            after - before,
            n1.ip
        ));

        let mut client = EtcdClient::connect(&n1.netns, lab.etcd_endpoint(), WORKING)?;
        let key = lab
            .datastore
            .startup_keys
            .first()
            .cloned()
            .unwrap_or_default();
        check(client.get(&key)?.is_some(), || format!("etcd has no {key}"))?;
        let s = startup(lab)?;
        check(s.finished_in_budget, || format!("startup did not fit: {s}"))?;
        ev.push(format!("{} -> etcd {}: {s}", n1.name, lab.etcd_endpoint()));
        Ok(ev)
    }
}

/// Seed 001: the datastore is far away; calico-node's sequential startup reads outlive the
/// liveness probe's budget.
pub mod seed_001 {
    use super::*;

    /// The delay on every etcd answer (a far region's round trip).
    pub const DELAY: Duration = Duration::from_millis(150);

    pub fn config() -> ClusterConfig {
        ClusterConfig {
            datastore_delay: Some(DELAY),
            ..ClusterConfig::two_nodes()
        }
    }

    /// calico-node's startup on node1 (sequential reads on one connection under the scaled
    /// liveness budget), plus a working pod -> pod connection for contrast.
    pub fn drive(lab: &Cluster) -> Result<TrafficReport, LabError> {
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

    pub fn verify(lab: &Cluster) -> Result<(), LabError> {
        evidence(lab).map(|_| ())
    }

    /// On node1's NIC, every etcd request waits at least the injected delay for its answer;
    /// the startup's measured latency is at least the delay, and it does not finish in budget.
    pub fn evidence(lab: &Cluster) -> Result<Vec<String>, LabError> {
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

    /// From `tcpdump -tt -n` lines: for each request with payload to `server`, the time until
    /// the next response with payload from it.
    pub fn exchange_gaps(lines: &[String], server: SocketAddr) -> Vec<f64> {
        let srv = format!("{}.{}", server.ip(), server.port());
        let mut gaps = Vec::new();
        let mut pending: Option<f64> = None;
        for l in lines {
            let mut f = l.split_whitespace();
            let Some(ts) = f.next().and_then(|t| t.parse::<f64>().ok()) else {
                continue;
            };
            let (Some(_ip), Some(src), Some(_gt), Some(dst)) =
                (f.next(), f.next(), f.next(), f.next())
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
}

/// Seed 002: the IPPool contains the host network, so felix does not masquerade pod traffic
/// to the apiserver, and the replies die at the gateway.
pub mod seed_002 {
    use super::*;

    /// Seed 002's addresses on two VXLAN nodes (the incident's cluster used IPIP, which this
    /// kernel cannot do; the NAT decision is the same).
    pub fn config() -> ClusterConfig {
        ClusterConfig {
            lan: "192.168.21.0/24".into(),
            gateway_ip: "192.168.21.1".into(),
            external_ip: "192.168.21.11".into(),
            pool: Pool::new("192.168.0.0/16", true),
            nodes: vec![
                NodeConfig {
                    name: "k8s-node1".into(),
                    ip: "192.168.21.21".into(),
                    block: "192.168.236.0/26".into(),
                    vtep_mac: None,
                    pods: vec![PodConfig::new(
                        "calico-system",
                        "calico-kube-controllers-596576f79-j2pkg",
                        "192.168.236.10",
                    )],
                    extra_bridge: None,
                    extra_nic: None,
                    autodetect_iface: None,
                },
                NodeConfig {
                    name: "k8s-node2".into(),
                    ip: "192.168.21.22".into(),
                    block: "192.168.36.64/26".into(),
                    vtep_mac: None,
                    pods: vec![PodConfig::new(
                        "calico-system",
                        "csi-node-driver-kb896",
                        "192.168.36.66",
                    )],
                    extra_bridge: None,
                    extra_nic: None,
                    autodetect_iface: None,
                },
            ],
            ..ClusterConfig::two_nodes()
        }
    }

    /// calico-kube-controllers -> 10.96.0.1:443 and -> 192.168.21.11:6443 (both time out),
    /// the node itself -> the Service (works), pod -> pod across nodes (works).
    pub fn drive(lab: &Cluster) -> Result<TrafficReport, LabError> {
        let (a, b) = cross_pair(lab)?;
        let mut probes = vec![
            Probe::pod("pod -> apiserver", lab, a, lab.apiserver_addr(), BLACKHOLE),
            Probe::pod("pod -> pod across nodes", lab, a, b.addr(), WORKING),
        ];
        if let Some(vip) = lab.service_addr() {
            probes.push(Probe::pod(
                "pod -> apiserver Service",
                lab,
                a,
                vip,
                BLACKHOLE,
            ));
            probes.push(Probe::host(
                "node -> apiserver Service",
                lab,
                0,
                vip,
                WORKING,
            ));
        }
        Ok(TrafficReport {
            attempts: run_probes(probes)?,
            startup: None,
        })
    }

    pub fn verify(lab: &Cluster) -> Result<(), LabError> {
        evidence(lab).map(|_| ())
    }

    /// The pod's SYN leaves node1's NIC with the pod's source address, the apiserver's SYN-ACK
    /// goes to the gateway (which cannot route it), MASQUERADE never fires, and the connect
    /// times out.
    pub fn evidence(lab: &Cluster) -> Result<Vec<String>, LabError> {
        let a = lab.first_pod_on(0)?;
        let n1 = &lab.nodes[0];
        let api = lab.apiserver_addr();
        let pod_ip = a.ip();
        let syn_out = Capture::start(
            &n1.netns,
            &n1.nic,
            Some("out"),
            Some(1),
            &crate::traffic::syn_filter(pod_ip, api),
        )?;
        let synack_at_gw = Capture::start(
            &lab.gateway,
            "eth0",
            Some("in"),
            Some(1),
            &format!(
                "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack) and dst host {pod_ip}"
            ),
        )?;
        let masq_before = calico::nat_outgoing_packets(&n1.netns)?;
        let att = run_probes(vec![Probe::pod("pod -> apiserver", lab, a, api, BLACKHOLE)])?;
        let mut ev = Vec::new();
        check(!att[0].ok(), || {
            format!("pod reached the apiserver: {}", att[0])
        })?;
        let syn = syn_out.finish(Duration::from_secs(1));
        check(
            syn.first()
                .is_some_and(|l| l.contains(&format!("IP {pod_ip}."))),
            || {
                format!(
                    "no SYN from {pod_ip} leaving {} {}: {syn:?}",
                    n1.name, n1.nic
                )
            },
        )?;
        ev.push(format!(
            "{} {} out: {}",
            n1.name,
            n1.nic,
            lines_summary(&syn, 1)
        ));
        let synack = synack_at_gw.finish(Duration::from_secs(1));
        check(!synack.is_empty(), || {
            format!("no SYN-ACK for {pod_ip} reached the gateway: {synack:?}")
        })?;
        ev.push(format!(
            "gateway eth0 in (no route back to the pool): {}",
            lines_summary(&synack, 1)
        ));
        let masq_after = calico::nat_outgoing_packets(&n1.netns)?;
        check(masq_after == masq_before, || {
            format!("cali-nat-outgoing MASQUERADE fired ({masq_before} -> {masq_after})")
        })?;
        check(
            !lab.apiserver.peers().iter().any(|p| p.ip() == pod_ip),
            || "the apiserver accepted the pod's connection".into(),
        )?;
        ev.push(format!(
            "cali-nat-outgoing MASQUERADE: {masq_after} packets (pool {} contains {}); {}",
            lab.config.pool.cidr,
            api.ip(),
            att[0]
        ));
        Ok(ev)
    }
}

/// Seed 003: ce-demo-2's VXLAN parent is the bridge nerdctl0 (10.4.0.1), and the other node
/// sends VXLAN for it to 10.4.0.1, which nothing routes.
pub mod seed_003 {
    use super::*;

    pub const BRIDGE: &str = "nerdctl0";

    pub fn config() -> ClusterConfig {
        let mut cfg = ClusterConfig::two_nodes();
        // The write-up's NIC name.
        cfg.nic = "ens160".into();
        let n2 = &mut cfg.nodes[1];
        n2.extra_bridge = Some(ExtraBridge {
            name: BRIDGE.into(),
            address: "10.4.0.1/24".into(),
            container_veth: "veth76f5219b".into(),
            container_ip: "10.4.0.2".into(),
        });
        n2.autodetect_iface = Some(BRIDGE.into());
        cfg
    }

    /// ce-demo-1 pod -> web-shop on ce-demo-2 (hangs, the incident's curl), the reverse (hangs),
    /// and a same-node connection for contrast.
    pub fn drive(lab: &Cluster) -> Result<TrafficReport, LabError> {
        let (a, b) = cross_pair(lab)?;
        let mut probes = vec![
            Probe::pod("pod -> pod across nodes", lab, a, b.addr(), BLACKHOLE),
            Probe::pod("pod -> pod across nodes", lab, b, a.addr(), BLACKHOLE),
        ];
        if let Some(c) = lab.pods_on(0).nth(1) {
            probes.push(Probe::pod(
                "pod -> pod on the same node",
                lab,
                a,
                c.addr(),
                WORKING,
            ));
        }
        Ok(TrafficReport {
            attempts: run_probes(probes)?,
            startup: None,
        })
    }

    pub fn verify(lab: &Cluster) -> Result<(), LabError> {
        evidence(lab).map(|_| ())
    }

    /// ce-demo-2's vxlan.calico is `local 10.4.0.1 dev nerdctl0` and ce-demo-1's FDB sends its
    /// MAC to 10.4.0.1. ce-demo-1 -> ce-demo-2: the inner SYN enters ce-demo-1's vxlan.calico,
    /// leaves its NIC as UDP 4789 to 10.4.0.1, dies at the gateway, and no SYN-ACK ever comes
    /// back. ce-demo-2 -> ce-demo-1: ce-demo-2's VXLAN leaves its LAN NIC (not nerdctl0: felix's
    /// FDB entries carry no device, so the outer route lookup is unconstrained) with source
    /// 10.4.0.1; ce-demo-1 answers to 10.4.0.1, so ce-demo-2 never gets the SYN-ACK either.
    pub fn evidence(lab: &Cluster) -> Result<Vec<String>, LabError> {
        let (a, b) = cross_pair(lab)?;
        let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
        let wrong = n2.autodetected_ip;
        let mut ev = Vec::new();

        let link = n2.netns.ip(&["-d", "link", "show", calico::VXLAN_DEVICE])?;
        let want = format!("local {wrong} dev {}", n2.autodetected_iface);
        check(link.contains(&want), || {
            format!("{} vxlan.calico is not `{want}`: {link}", n2.name)
        })?;
        ev.push(format!(
            "{} vxlan.calico: vxlan id 4096 {want} (its LAN address is {} on {})",
            n2.name, n2.ip, n2.nic
        ));
        let fdb = n1
            .netns
            .exec(&["bridge", "fdb", "show", "dev", calico::VXLAN_DEVICE])?;
        let mac = n2.vtep.as_ref().map(|v| v.mac.clone()).unwrap_or_default();
        check(fdb.contains(&format!("{mac} dst {wrong}")), || {
            format!("{} FDB: {fdb}", n1.name)
        })?;
        ev.push(format!(
            "{} FDB: {mac} dst {wrong} (what {} advertised)",
            n1.name, n2.name
        ));

        let syn = "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn";
        let synack = "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)";
        let vxlan_to_wrong = format!("udp dst port {} and dst host {wrong}", calico::VXLAN_PORT);
        let caps = [
            // node1 -> node2
            (
                &n1.netns,
                calico::VXLAN_DEVICE,
                None,
                format!("{syn} and dst host {}", b.ip()),
            ),
            (
                &n1.netns,
                n1.nic.as_str(),
                Some("out"),
                vxlan_to_wrong.clone(),
            ),
            (&lab.gateway, "eth0", Some("in"), vxlan_to_wrong),
            (
                &n1.netns,
                calico::VXLAN_DEVICE,
                None,
                format!("{synack} and src host {}", b.ip()),
            ),
            // node2 -> node1
            (
                &n2.netns,
                n2.nic.as_str(),
                Some("out"),
                format!("udp dst port {} and dst host {}", calico::VXLAN_PORT, n1.ip),
            ),
            (
                &n2.netns,
                n2.autodetected_iface.as_str(),
                None,
                format!("udp port {}", calico::VXLAN_PORT),
            ),
            (
                &n2.netns,
                calico::VXLAN_DEVICE,
                None,
                format!("{synack} and src host {}", a.ip()),
            ),
        ];
        let mut running = Vec::new();
        for (ns, iface, dir, filter) in &caps {
            running.push(Capture::start(ns, iface, *dir, None, filter)?);
        }
        let att = run_probes(vec![
            Probe::pod("pod -> pod", lab, a, b.addr(), BLACKHOLE),
            Probe::pod("pod -> pod", lab, b, a.addr(), BLACKHOLE),
        ])?;
        let got = finish_all(running, Duration::from_millis(300));
        check(att.iter().all(|x| !x.ok()), || {
            format!("cross-node traffic works: {att:?}")
        })?;

        let [syn_in, vx_out, at_gw, synack_back, n2_out, on_bridge, n2_synack] = &got[..] else {
            return Err(LabError::Unexpected("capture count".into()));
        };
        check(!syn_in.is_empty(), || {
            format!("no SYN to {} entered {} vxlan.calico", b.ip(), n1.name)
        })?;
        ev.push(format!(
            "{} vxlan.calico: {}",
            n1.name,
            lines_summary(syn_in, 1)
        ));
        check(!vx_out.is_empty(), || {
            format!("no VXLAN to {wrong} left {} {}", n1.name, n1.nic)
        })?;
        ev.push(format!(
            "{} {} out: {}",
            n1.name,
            n1.nic,
            lines_summary(vx_out, 2)
        ));
        check(!at_gw.is_empty(), || {
            format!("the VXLAN to {wrong} did not reach the gateway")
        })?;
        ev.push(format!(
            "gateway (no route to {wrong}) in: {}",
            lines_summary(at_gw, 2)
        ));
        check(synack_back.is_empty(), || {
            format!("{} answered: {synack_back:?}", b.ip())
        })?;
        ev.push(format!(
            "{} vxlan.calico: no SYN-ACK from {} ever",
            n1.name,
            b.ip()
        ));
        let wrong_src = format!("IP {wrong}.");
        check(n2_out.iter().any(|l| l.contains(&wrong_src)), || {
            format!(
                "no VXLAN from {wrong} to {} on {} {}: {n2_out:?}",
                n1.ip, n2.name, n2.nic
            )
        })?;
        ev.push(format!(
            "{} {} out (source is the bridge's address): {}",
            n2.name,
            n2.nic,
            lines_summary(n2_out, 2)
        ));
        check(on_bridge.is_empty(), || {
            format!("VXLAN on {}: {on_bridge:?}", n2.autodetected_iface)
        })?;
        check(n2_synack.is_empty(), || {
            format!("{} answered {}: {n2_synack:?}", a.ip(), n2.name)
        })?;
        ev.push(format!(
            "{} vxlan.calico: no SYN-ACK from {} (it went to {wrong})",
            n2.name,
            a.ip()
        ));
        Ok(ev)
    }
}

/// Seed 004: k8smater1's BGP address is its second NIC's, which the other node cannot reach:
/// BGP never establishes, and no pod routes are exchanged. Two variants, as confd's v3.22+ mesh
/// lets only the greater address (compared as strings) dial: in `seed-004` the misdetected
/// node dials from the wrong address; in `seed-004-passive` (the write-up's 10.0.0.66, smaller
/// than any 10.51.x or 172.17.x address) it only listens, and the other node dials it.
pub mod seed_004 {
    use super::*;
    use crate::bird::mesh_passive;

    /// How long the lab waits for a BGP session that must not come up (the dialing BIRD waits
    /// confd's `connect delay time 2`, then retries every `connect retry time 5`).
    pub const BGP_WAIT: Duration = Duration::from_secs(8);

    /// `seed-004`'s second NIC: "10.66.0.66" > "10.51.0.100", so k8smater1 dials.
    pub const ACTIVE_NIC: &str = "10.66.0.66/24";
    /// `seed-004-passive`'s second NIC, the write-up's: "10.0.0.66" < "10.51.0.100", so
    /// k8smater1 is passive and k8smaster2 dials 10.0.0.66.
    pub const PASSIVE_NIC: &str = "10.0.0.66/24";

    /// Two BGP-routed nodes, seed 004's names; k8smater1 has eth1 10.66.0.66/24 on a LAN of
    /// its own, and autodetection picked it.
    pub fn config() -> ClusterConfig {
        config_with(ACTIVE_NIC)
    }

    /// The same with eth1 10.0.0.66/24: the misdetected node is the passive side.
    pub fn passive_config() -> ClusterConfig {
        config_with(PASSIVE_NIC)
    }

    fn config_with(second_nic: &str) -> ClusterConfig {
        let mut cfg = ClusterConfig {
            routing: Routing::Bgp,
            ..ClusterConfig::two_nodes()
        };
        cfg.nodes[0].name = "k8smaster2".into();
        cfg.nodes[0].pods = vec![PodConfig::new(
            "ci",
            "jenkins-dc995bb85-7w6t8",
            "10.244.142.36",
        )];
        let n2 = &mut cfg.nodes[1];
        n2.name = "k8smater1".into();
        n2.pods = vec![PodConfig::new(
            "kube-system",
            "coredns-7ff77c879f-brsgl",
            "10.244.228.139",
        )];
        n2.extra_nic = Some(ExtraNic {
            name: "eth1".into(),
            address: second_nic.into(),
        });
        n2.autodetect_iface = Some("eth1".into());
        cfg
    }

    /// Pod -> pod across nodes in both directions (no route: fails).
    pub fn drive(lab: &Cluster) -> Result<TrafficReport, LabError> {
        let (a, b) = cross_pair(lab)?;
        Ok(TrafficReport {
            attempts: run_probes(vec![
                Probe::pod("pod -> pod across nodes", lab, a, b.addr(), BLACKHOLE),
                Probe::pod("pod -> pod across nodes", lab, b, a.addr(), BLACKHOLE),
            ])?,
            startup: None,
        })
    }

    pub fn verify(lab: &Cluster) -> Result<(), LabError> {
        evidence(lab).map(|_| ())
    }

    /// The node (index) that dials in a two-node mesh, by confd's rule; the other is passive.
    pub fn dialer(lab: &Cluster) -> usize {
        let (a, b) = (lab.nodes[0].autodetected_ip, lab.nodes[1].autodetected_ip);
        usize::from(mesh_passive(a, b))
    }

    /// The dialing node sends BGP SYNs from its advertised address to the other's out of its
    /// LAN NIC (in `seed-004` from the wrong 10.66.0.66; in `seed-004-passive` to the wrong
    /// 10.0.0.66); the passive node never sends a SYN, and BIRD there says `Passive`; neither
    /// side reaches Established within [`BGP_WAIT`] of the build; neither node has a route to
    /// the other's block, and pod -> pod across nodes fails.
    pub fn evidence(lab: &Cluster) -> Result<Vec<String>, LabError> {
        let (a, b) = cross_pair(lab)?;
        let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
        let d = dialer(lab);
        let (dn, pn) = (&lab.nodes[d], &lab.nodes[1 - d]);
        let (from, to) = (dn.autodetected_ip, pn.autodetected_ip);
        let mut ev = Vec::new();
        let syn = Capture::start(
            &dn.netns,
            &dn.nic,
            Some("out"),
            Some(1),
            &format!(
                "tcp dst port 179 and src host {from} and dst host {to} and tcp[tcpflags] & tcp-syn != 0"
            ),
        )?;
        // Everything BGP on the passive node, on every interface.
        let listener = Capture::start(&pn.netns, "any", None, None, "tcp port 179")?;
        // The cross-node probe runs while BGP gets its chance to come up.
        let (states, att) = std::thread::scope(|scope| {
            let probe = scope
                .spawn(|| run_probes(vec![Probe::pod("pod -> pod", lab, a, b.addr(), BLACKHOLE)]));
            let states = bgp_never_up(lab, lab.remaining_since_build(BGP_WAIT));
            let att = probe
                .join()
                .unwrap_or_else(|_| Err(LabError::Unexpected("probe thread panicked".into())));
            (states, att)
        });
        let (states, att) = (states?, att?);
        ev.push(format!(
            "BGP after {:.1?}: {}",
            lab.built_at.elapsed(),
            lab.nodes
                .iter()
                .zip(&states)
                .map(|(n, s)| format!("{} {s}", n.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        check(states[1 - d] == "Passive", || {
            format!("{} is not passive toward {from}: {states:?}", pn.name)
        })?;
        let syn = syn.finish(Duration::from_secs(5));
        check(
            syn.first()
                .is_some_and(|l| l.contains(&format!("IP {from}."))),
            || {
                format!(
                    "no BGP SYN from {from} to {to} on {} {}: {syn:?}",
                    dn.name, dn.nic
                )
            },
        )?;
        ev.push(format!(
            "{} (dials, {from} > {to} as strings) {} out: {}",
            dn.name,
            dn.nic,
            lines_summary(&syn, 1)
        ));
        let heard = listener.finish(Duration::ZERO);
        let own_syn = format!("IP {to}.");
        check(
            !heard
                .iter()
                .any(|l| l.contains(&own_syn) && l.contains(".179: Flags [S],")),
            || format!("passive {} dialed: {heard:?}", pn.name),
        )?;
        ev.push(format!(
            "{} (passive) sent no SYN; saw: {}",
            pn.name,
            if heard.is_empty() {
                "no BGP packet at all".to_string()
            } else {
                lines_summary(&heard, 2)
            }
        ));
        let r1 = route_show(&n1.netns, &n2.block)?;
        let r2 = route_show(&n2.netns, &n1.block)?;
        check(r1.is_empty() && r2.is_empty(), || {
            format!("pod routes were exchanged: {r1:?} / {r2:?}")
        })?;
        ev.push(format!(
            "no route to {} on {} nor to {} on {}",
            n2.block, n1.name, n1.block, n2.name
        ));
        check(!att[0].ok(), || format!("pod -> pod works: {}", att[0]))?;
        ev.push(att[0].to_string());
        Ok(ev)
    }

    /// Polls every node's BGP state for `wait`; fails as soon as one is Established. Returns
    /// the last states.
    fn bgp_never_up(lab: &Cluster, wait: Duration) -> Result<Vec<String>, LabError> {
        let deadline = Instant::now() + wait;
        loop {
            let states = (0..lab.nodes.len())
                .map(|i| lab.bgp_state(i))
                .collect::<Result<Vec<_>, _>>()?;
            check(!states.iter().any(|s| s == "Established"), || {
                format!("BGP came up: {states:?}")
            })?;
            if Instant::now() >= deadline {
                return Ok(states);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() -> Result<(), LabError> {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>()?, s);
        }
        assert!("seed-005".parse::<Scenario>().is_err());
        Ok(())
    }

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
        let gaps = seed_001::exchange_gaps(&lines, server);
        assert_eq!(gaps.len(), 2);
        assert!(
            (gaps[0] - 0.16).abs() < 1e-6 && (gaps[1] - 0.159).abs() < 1e-6,
            "{gaps:?}"
        );
    }

    #[test]
    fn configs_are_valid_shapes() {
        for s in Scenario::ALL {
            let c = s.config();
            assert_eq!(c.nodes.len(), 2, "{s}");
            assert!(c.nodes.iter().all(|n| !n.pods.is_empty()), "{s}");
        }
        assert_eq!(
            seed_003::config().nodes[1].autodetect_iface.as_deref(),
            Some("nerdctl0")
        );
        assert_eq!(seed_004::config().routing, Routing::Bgp);
        assert_eq!(seed_004::passive_config().routing, Routing::Bgp);
    }
}
