//! Seed 004: k8smater1's BGP address is its second NIC's, which the other node cannot reach:
//! BGP never establishes, and no pod routes are exchanged. Two variants, as confd's v3.22+ mesh
//! lets only the greater address (compared as strings) dial: in `seed-004` the misdetected
//! node dials from the wrong address; in `seed-004-passive` (the write-up's 10.0.0.66, smaller
//! than any 10.51.x or 172.17.x address) it only listens, and the other node dials it.

use std::time::{Duration, Instant};

use tracer_model::{Cause, Verdict};

use super::common::{
    check, cross_pair, lines_summary, route_show, run_probes, Probe, TrafficReport, BLACKHOLE,
};
use super::ScenarioSpec;
use crate::bird::mesh_passive;
use crate::topo::{Cluster, ClusterConfig, ExtraNic, PodConfig, Routing};
use crate::traffic::Capture;
use crate::LabError;

/// Seed 004, in either variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed004 {
    /// `seed-004`: the misdetected node dials from its wrong address.
    Active,
    /// `seed-004-passive`: the misdetected node only listens; the other dials its wrong address.
    Passive,
}

/// How long the lab waits for a BGP session that must not come up (the dialing BIRD waits
/// confd's `connect delay time 2`, then retries every `connect retry time 5`).
const BGP_WAIT: Duration = Duration::from_secs(8);

/// `seed-004`'s second NIC: "10.66.0.66" > "10.51.0.100", so k8smater1 dials.
const ACTIVE_NIC: &str = "10.66.0.66/24";
/// `seed-004-passive`'s second NIC, the write-up's: "10.0.0.66" < "10.51.0.100", so
/// k8smater1 is passive and k8smaster2 dials 10.0.0.66.
const PASSIVE_NIC: &str = "10.0.0.66/24";

impl ScenarioSpec for Seed004 {
    fn name(&self) -> &'static str {
        match self {
            Seed004::Active => "seed-004",
            Seed004::Passive => "seed-004-passive",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Seed004::Active => {
                "autodetection picked second NIC eth1 (10.66.0.66) on k8smater1, which dials from it: BGP never establishes, no pod routes"
            }
            Seed004::Passive => {
                "autodetection picked second NIC eth1 (10.0.0.66) on k8smater1, passive: k8smaster2 dials 10.0.0.66, BGP never establishes"
            }
        }
    }

    fn expected_cause(&self) -> Option<Cause> {
        Some(Cause::NodeAddressOnWrongInterface)
    }

    fn expected_verdict(&self) -> Option<Verdict> {
        match self {
            Seed004::Active => Some(Verdict::WrongSourceAddress),
            // The other node's off-link-peer diagnosis has no verdict of its own.
            Seed004::Passive => None,
        }
    }

    fn config(&self) -> ClusterConfig {
        config_with(match self {
            Seed004::Active => ACTIVE_NIC,
            Seed004::Passive => PASSIVE_NIC,
        })
    }

    /// Pod -> pod across nodes in both directions (no route: fails).
    fn drive(&self, lab: &Cluster) -> Result<TrafficReport, LabError> {
        let (a, b) = cross_pair(lab)?;
        Ok(TrafficReport {
            attempts: run_probes(vec![
                Probe::pod("pod -> pod across nodes", lab, a, b.addr(), BLACKHOLE),
                Probe::pod("pod -> pod across nodes", lab, b, a.addr(), BLACKHOLE),
            ])?,
            startup: None,
        })
    }

    /// The dialing node sends BGP SYNs from its advertised address to the other's out of its
    /// LAN NIC (in `seed-004` from the wrong 10.66.0.66; in `seed-004-passive` to the wrong
    /// 10.0.0.66); the passive node never sends a SYN, and BIRD there says `Passive`; neither
    /// side reaches Established within `BGP_WAIT` of the build; neither node has a route to
    /// the other's block, and pod -> pod across nodes fails.
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError> {
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
}

/// Two BGP-routed nodes, seed 004's names; k8smater1 has eth1 with `second_nic` on a LAN of its
/// own, and autodetection picked it.
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

/// The node (index) that dials in a two-node mesh, by confd's rule; the other is passive.
pub fn dialer(lab: &Cluster) -> usize {
    let (a, b) = (lab.nodes[0].autodetected_ip, lab.nodes[1].autodetected_ip);
    usize::from(mesh_passive(a, b))
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
