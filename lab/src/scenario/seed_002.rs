//! Seed 002: the IPPool contains the host network, so felix does not masquerade pod traffic
//! to the apiserver, and the replies die at the gateway.

use std::net::IpAddr;
use std::time::Duration;

use tracer_model::{Cause, Verdict};

use super::common::{
    check, cross_pair, lines_summary, run_probes, Probe, TrafficReport, BLACKHOLE, WORKING,
};
use super::ScenarioSpec;
use crate::calico;
use crate::topo::{Cluster, ClusterConfig, NodeConfig, PodConfig};
use crate::traffic::{self, Capture};
use crate::{LabError, Pool};

/// Seed 002: the pool contains the host LAN.
pub struct Seed002;

impl ScenarioSpec for Seed002 {
    fn name(&self) -> &'static str {
        "seed-002"
    }

    fn title(&self) -> &'static str {
        "IPPool 192.168.0.0/16 contains the host LAN 192.168.21.0/24: pod -> apiserver is not SNATed"
    }

    fn expected_cause(&self) -> Option<Cause> {
        Some(Cause::IppoolOverlapsHostNetwork)
    }

    fn expected_verdict(&self) -> Option<Verdict> {
        Some(Verdict::SnatSkipped)
    }

    /// The cause alone: no other seed reports it, and the verdict is only counted.
    fn expected_text(&self) -> String {
        Cause::IppoolOverlapsHostNetwork.to_string()
    }

    /// The apiserver, which the pod cannot reach.
    fn focus(&self, lab: &Cluster) -> Option<IpAddr> {
        Some(lab.apiserver_addr().ip())
    }

    /// Seed 002's addresses on two VXLAN nodes (the incident's cluster used IPIP, which this
    /// kernel cannot do; the NAT decision is the same).
    fn config(&self) -> ClusterConfig {
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
    fn drive(&self, lab: &Cluster) -> Result<TrafficReport, LabError> {
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

    /// The pod's SYN leaves node1's NIC with the pod's source address, the apiserver's SYN-ACK
    /// goes to the gateway (which cannot route it), MASQUERADE never fires, and the connect
    /// times out.
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError> {
        let a = lab.first_pod_on(0)?;
        let n1 = &lab.nodes[0];
        let api = lab.apiserver_addr();
        let pod_ip = a.ip();
        let syn_out = Capture::start(
            &n1.netns,
            &n1.nic,
            Some("out"),
            Some(1),
            &traffic::syn_filter(pod_ip, api),
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
            format!(
                "{} masquerade fired ({masq_before} -> {masq_after})",
                lab.config.dataplane.nat_outgoing_chain()
            )
        })?;
        check(
            !lab.apiserver.peers().iter().any(|p| p.ip() == pod_ip),
            || "the apiserver accepted the pod's connection".into(),
        )?;
        ev.push(format!(
            "{} ({}) masquerade: {masq_after} packets (pool {} contains {}); {}",
            lab.config.dataplane.nat_outgoing_chain(),
            lab.config.dataplane,
            lab.config.pool.cidr,
            api.ip(),
            att[0]
        ));
        Ok(ev)
    }
}
