//! MTU and encapsulation: full-size packets that do not fit the path while small ones pass.
//! Three variants of the two-node VXLAN cluster (vxlan.calico at felix's 1450, NICs at 1500):
//!
//! - `mtu-underlay`: pods at 1450 (Calico's own choice), but ce-demo-2's port on the LAN switch
//!   carries only 1400 bytes: the underlay's path MTU is below the 1500 vxlan.calico assumes.
//!   A switch drops oversized frames silently, so no ICMP comes back. (An L3 router would not
//!   do: Linux sends VXLAN without DF, which felix leaves unset, so a router fragments the outer
//!   packet and the transfer works.)
//! - `mtu-blackhole`: pods at 1500, above the tunnel's 1450; ce-demo-1 drops the ICMP
//!   fragmentation-needed it generates for its pods (a host firewall), so PMTU discovery never
//!   learns: a PMTU black hole.
//! - `mtu-pmtud`: the same pods at 1500 without the firewall rule: the node's ICMP reaches the
//!   pod, which lowers its path MTU and the transfer completes. The healthy control.
//!
//! felix's rules play no part in MTU faults, but the host firewall rule of `mtu-blackhole` is
//! written with the node's own tool: iptables in the iptables dataplane, an nft table
//! (`table ip host-firewall`) on an nft-only node. The variants run in both dataplanes.
//! Every variant's proof is `ping -M do` at sizes either side of the limit and a 256 KiB
//! transfer whose delivered bytes the receiving pod counts. The proof's pings are traffic
//! tracer judges too: in `mtu-underlay` the full-size node-to-node (1500) and pod-to-pod (1450)
//! pings, unanswered after smaller ones were, are `mtu_mismatch`; in `mtu-blackhole` the pod's
//! 1500-byte ping is; in `mtu-pmtud` the node's fragmentation-needed reaches the pod, which
//! answers its big ping: nothing is said.
//!
//! IPv6 is not modelled here (the lab has no IPv6): tests/mtu.rs builds a packet-too-big in
//! three namespaces of its own.

use std::net::SocketAddr;
use std::time::Duration;

use tracer_model::{Cause, Verdict};

use super::common::{check, cross_pair, run_probes, Attempt, Probe, TrafficReport, WORKING};
use super::ScenarioSpec;
use crate::calico::{nft_counted_packets, Dataplane, VXLAN_MTU};
use crate::netns::Netns;
use crate::topo::{Cluster, ClusterConfig, MtuConfig, HOST_FIREWALL_TABLE};
use crate::traffic::{self, ProbeOutcome, TcpSink};
use crate::LabError;

/// One of the MTU variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtu {
    /// The underlay between the nodes carries less than vxlan.calico assumes.
    Underlay,
    /// Pods above the tunnel's MTU, the node's ICMP fragmentation-needed dropped.
    Blackhole,
    /// Pods above the tunnel's MTU, PMTU discovery working: healthy.
    Pmtud,
}

/// What ce-demo-2's switch port carries in `mtu-underlay`.
const SWITCH_MTU: u32 = 1400;
/// The pods' MTU when it is set above the tunnel's.
const BIG_POD_MTU: u32 = 1500;
/// The bulk transfer: large enough to need full-size segments, small enough to finish at once.
const BULK: usize = 256 * 1024;
/// How long the transfer gets.
const BULK_WAIT: Duration = Duration::from_secs(4);
/// The sink's port in node2's first pod.
const SINK_PORT: u16 = 9090;
/// ICMP echo and IPv4 headers: `ping -s N` sends IP packets of N + 28 bytes.
const PING_OVERHEAD: u32 = 28;

impl ScenarioSpec for Mtu {
    fn name(&self) -> &'static str {
        match self {
            Mtu::Underlay => "mtu-underlay",
            Mtu::Blackhole => "mtu-blackhole",
            Mtu::Pmtud => "mtu-pmtud",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Mtu::Underlay => {
                "ce-demo-2's LAN switch port carries 1400 bytes, vxlan.calico assumes 1500: full-size pod packets vanish"
            }
            Mtu::Blackhole => {
                "pods at MTU 1500 over vxlan.calico's 1450, ICMP fragmentation-needed dropped by ce-demo-1's firewall: bulk transfers stall"
            }
            Mtu::Pmtud => {
                "pods at MTU 1500 over vxlan.calico's 1450, PMTU discovery working: transfers complete"
            }
        }
    }

    fn expected_cause(&self) -> Option<Cause> {
        match self {
            Mtu::Underlay | Mtu::Blackhole => Some(Cause::MtuMismatch),
            Mtu::Pmtud => None,
        }
    }

    fn expected_verdict(&self) -> Option<Verdict> {
        None
    }

    fn config(&self) -> ClusterConfig {
        let mtu = match self {
            Mtu::Underlay => MtuConfig {
                pod_mtu: Some(VXLAN_MTU),
                switch_port_mtu: Some((1, SWITCH_MTU)),
                drop_frag_needed_on: None,
                wire_sized_frames: true,
            },
            Mtu::Blackhole => MtuConfig {
                pod_mtu: Some(BIG_POD_MTU),
                switch_port_mtu: None,
                drop_frag_needed_on: Some(0),
                wire_sized_frames: true,
            },
            Mtu::Pmtud => MtuConfig {
                pod_mtu: Some(BIG_POD_MTU),
                switch_port_mtu: None,
                drop_frag_needed_on: None,
                wire_sized_frames: true,
            },
        };
        ClusterConfig {
            mtu,
            ..ClusterConfig::two_nodes()
        }
    }

    /// A connection from node1's pod to node2's pod (small packets: it works), then a 256 KiB
    /// transfer between them (full-size packets: it stalls, except in `mtu-pmtud`).
    fn drive(&self, lab: &Cluster) -> Result<TrafficReport, LabError> {
        let (a, b) = cross_pair(lab)?;
        let mut attempts = run_probes(vec![Probe::pod(
            "pod -> pod across nodes",
            lab,
            a,
            b.addr(),
            WORKING,
        )])?;
        let sink = TcpSink::start(b.netns(), SocketAddr::new(b.addr().ip(), SINK_PORT))?;
        let started = std::time::Instant::now();
        let got = traffic::tcp_bulk(a.netns(), &sink, BULK, BULK_WAIT)?;
        let outcome = if got == BULK as u64 {
            ProbeOutcome::Connected {
                greeting: format!("{got} bytes delivered"),
            }
        } else {
            ProbeOutcome::Failed(format!(
                "stalled: {got} of {BULK} bytes delivered in {BULK_WAIT:?}"
            ))
        };
        attempts.push(Attempt {
            what: "256 KiB pod -> pod across nodes".into(),
            from: format!("{} {}", a.full_name(), a.ip()),
            to: sink.local_addr(),
            outcome,
            elapsed: started.elapsed(),
        });
        Ok(TrafficReport {
            attempts,
            startup: None,
        })
    }

    /// `ping -M do` (DF set) from node1's pod at the largest size that should pass and at the
    /// pod's full size, the transfer's delivered bytes, and per variant: the switch port's MTU
    /// and the node-to-node path MTU, the firewall rule's counter, the pod's learned path MTU.
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError> {
        let (a, b) = cross_pair(lab)?;
        let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
        let mut ev = Vec::new();
        let pod_mtu = link_mtu(a.netns(), "eth0")?;
        ev.push(format!(
            "{} eth0 MTU {pod_mtu}, {} vxlan.calico MTU {}, {} MTU {}",
            a.full_name(),
            n1.name,
            link_mtu(&n1.netns, "vxlan.calico")?,
            n1.nic,
            link_mtu(&n1.netns, &n1.nic)?
        ));
        let fits = match self {
            Mtu::Underlay => SWITCH_MTU - 50,
            Mtu::Blackhole | Mtu::Pmtud => VXLAN_MTU,
        };
        let small = ping_df(a.netns(), &b.ip().to_string(), fits - PING_OVERHEAD)?;
        check(small.ok, || {
            format!("a {fits}-byte ping did not pass: {}", small.out)
        })?;
        ev.push(format!("pod -> pod ping -M do, {fits} bytes: answered"));
        let big = ping_df(a.netns(), &b.ip().to_string(), pod_mtu - PING_OVERHEAD)?;
        check(!big.ok, || {
            format!("a {pod_mtu}-byte ping passed: {}", big.out)
        })?;
        ev.push(format!(
            "pod -> pod ping -M do, {pod_mtu} bytes: no answer ({})",
            big.summary()
        ));
        match self {
            Mtu::Underlay => {
                let port = lab.underlay.ip(&["-o", "link", "show", "node2"])?;
                check(port.contains(&format!("mtu {SWITCH_MTU}")), || {
                    format!("{}'s switch port: {port}", n2.name)
                })?;
                let under = ping_df(&n1.netns, &n2.ip.to_string(), SWITCH_MTU - PING_OVERHEAD)?;
                let over = ping_df(&n1.netns, &n2.ip.to_string(), 1500 - PING_OVERHEAD)?;
                check(under.ok && !over.ok, || {
                    format!("node -> node: {} / {}", under.out, over.out)
                })?;
                ev.push(format!(
                    "{} -> {} ping -M do: {SWITCH_MTU} bytes answered, 1500 bytes not: the underlay path MTU is {SWITCH_MTU}, below {} + 50",
                    n1.name, n2.name, VXLAN_MTU
                ));
            }
            Mtu::Blackhole => {
                let counted = frag_needed_drops(&n1.netns, lab.config.dataplane)?;
                check(counted > 0, || {
                    format!("{}'s firewall dropped no fragmentation-needed", n1.name)
                })?;
                ev.push(format!(
                    "{} OUTPUT ({}): {counted} ICMP fragmentation-needed dropped (never reached the pod)",
                    n1.name, lab.config.dataplane
                ));
            }
            Mtu::Pmtud => {
                let route = a.netns().ip(&["route", "get", &b.ip().to_string()])?;
                check(route.contains(&format!("mtu {VXLAN_MTU}")), || {
                    format!("the pod learned no path MTU: {route}")
                })?;
                ev.push(format!(
                    "{}: ip route get {}: {} (learned from the node's ICMP)",
                    a.full_name(),
                    b.ip(),
                    route.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
        }
        let sink = TcpSink::start(b.netns(), SocketAddr::new(b.addr().ip(), SINK_PORT + 1))?;
        let got = traffic::tcp_bulk(a.netns(), &sink, BULK, BULK_WAIT)?;
        match self {
            Mtu::Underlay | Mtu::Blackhole => {
                check(got < BULK as u64, || {
                    "the 256 KiB transfer completed".into()
                })?;
                ev.push(format!(
                    "256 KiB pod -> pod: {got} bytes delivered in {BULK_WAIT:?} (stalled)"
                ));
            }
            Mtu::Pmtud => {
                check(got == BULK as u64, || {
                    format!("the transfer stalled at {got} bytes")
                })?;
                ev.push(format!("256 KiB pod -> pod: all {got} bytes delivered"));
            }
        }
        Ok(ev)
    }
}

/// A link's MTU, from `ip -o link show`.
fn link_mtu(ns: &Netns, dev: &str) -> Result<u32, LabError> {
    let out = ns.ip(&["-o", "link", "show", dev])?;
    out.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| LabError::Unexpected(format!("no MTU for {dev}: {out}")))
}

struct Ping {
    ok: bool,
    out: String,
}

impl Ping {
    fn summary(&self) -> String {
        self.out
            .lines()
            .find(|l| l.contains("packet loss") || l.contains("mtu"))
            .unwrap_or("")
            .trim()
            .to_string()
    }
}

/// `ping -M do -c 2 -W 1 -s size dst` inside `ns`: whether an answer came.
fn ping_df(ns: &Netns, dst: &str, size: u32) -> Result<Ping, LabError> {
    let size = size.to_string();
    let out = ns
        .command("ping")
        .args([
            "-n", "-M", "do", "-c", "2", "-i", "0.3", "-W", "1", "-s", &size, dst,
        ])
        .output()
        .map_err(|e| LabError::io("running ping", e))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Ping {
        ok: out.status.success(),
        out: text,
    })
}

/// Packets the host firewall's fragmentation-needed DROP rule in OUTPUT has counted, read with
/// the tool that wrote it.
fn frag_needed_drops(ns: &Netns, dp: Dataplane) -> Result<u64, LabError> {
    if dp == Dataplane::Nftables {
        let out = ns.exec(&[
            "nft",
            "-j",
            "list",
            "chain",
            "ip",
            HOST_FIREWALL_TABLE,
            "output",
        ])?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| LabError::Unexpected(format!("nft -j output: {e}")))?;
        return Ok(nft_counted_packets(&json, |x| x.get("drop").is_some()));
    }
    let out = ns.exec(&["iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"])?;
    Ok(out
        .lines()
        .filter(|l| l.contains("DROP") && l.contains("icmptype 3 code 4"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}
