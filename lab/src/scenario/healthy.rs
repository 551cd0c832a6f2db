//! The healthy control: everything works.

use std::time::Duration;

use tracer_model::startup::ReadPattern;
use tracer_model::{Cause, Verdict};

use super::common::{
    check, cross_pair, route_show, run_probes, startup, Attempt, Probe, TrafficReport, BGP_UP,
    WORKING,
};
use super::ScenarioSpec;
use crate::calico;
use crate::etcd::EtcdClient;
use crate::startup::v3_key;
use crate::topo::{Cluster, ClusterConfig, Routing};
use crate::traffic::Capture;
use crate::LabError;

/// Two VXLAN nodes, BGP mesh up, etcd close by: tracer should report nothing.
pub struct Healthy;

impl ScenarioSpec for Healthy {
    fn name(&self) -> &'static str {
        "healthy"
    }

    fn title(&self) -> &'static str {
        "two Calico nodes over VXLAN, BGP mesh up, etcd close by"
    }

    fn expected_cause(&self) -> Option<Cause> {
        None
    }

    fn expected_verdict(&self) -> Option<Verdict> {
        None
    }

    /// Two VXLAN nodes (seed 003's cluster, correctly detected).
    fn config(&self) -> ClusterConfig {
        ClusterConfig::two_nodes()
    }

    /// Waits for BGP, then pod -> pod across nodes both ways, pod -> apiserver directly and via
    /// its Service VIP, and a calico-node-like startup from node1 against etcd.
    fn drive(&self, lab: &Cluster) -> Result<TrafficReport, LabError> {
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
            startup: Some(startup(lab, ReadPattern::CalicoV3Etcdv3)?),
        })
    }

    /// BGP Established on every node; pod -> pod across nodes works, over VXLAN (captured on
    /// node1's NIC) or over BIRD's routes; pod -> apiserver works and is SNATed to node1's
    /// address; node1 reads etcd, and a startup fits the liveness budget.
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError> {
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
            "{} -> {} masqueraded ({} +{}), apiserver saw {}",
            a.ip(),
            lab.apiserver_addr(),
            lab.config.dataplane.nat_outgoing_chain(),
            after - before,
            n1.ip
        ));

        let mut client = EtcdClient::connect(&n1.netns, lab.etcd_endpoint(), WORKING)?;
        let key = v3_key("clusterinformations", None, "default");
        check(client.get(&key)?.is_some(), || format!("etcd has no {key}"))?;
        let s = startup(lab, ReadPattern::CalicoV3Etcdv3)?;
        check(s.finished_in_budget, || format!("startup did not fit: {s}"))?;
        ev.push(format!("{} -> etcd {}: {s}", n1.name, lab.etcd_endpoint()));
        Ok(ev)
    }
}

/// The same cluster routed natively by BIRD (no overlay): pod -> pod needs BGP.
pub fn bgp_config() -> ClusterConfig {
    ClusterConfig {
        routing: Routing::Bgp,
        ..ClusterConfig::two_nodes()
    }
}
