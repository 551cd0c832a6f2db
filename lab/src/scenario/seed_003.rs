//! Seed 003: ce-demo-2's VXLAN parent is the bridge nerdctl0 (10.4.0.1), and the other node
//! sends VXLAN for it to 10.4.0.1, which nothing routes.

use std::time::Duration;

use tracer_model::{Cause, Verdict};

use super::common::{
    check, cross_pair, finish_all, lines_summary, run_probes, Probe, TrafficReport, BLACKHOLE,
    WORKING,
};
use super::ScenarioSpec;
use crate::calico;
use crate::topo::{Cluster, ClusterConfig, ExtraBridge};
use crate::traffic::Capture;
use crate::LabError;

/// Seed 003: ce-demo-2 autodetected the bridge nerdctl0.
pub struct Seed003;

const BRIDGE: &str = "nerdctl0";

impl ScenarioSpec for Seed003 {
    fn name(&self) -> &'static str {
        "seed-003"
    }

    fn title(&self) -> &'static str {
        "autodetection picked bridge nerdctl0 (10.4.0.1) on ce-demo-2: VXLAN to that node goes nowhere"
    }

    fn expected_cause(&self) -> Option<Cause> {
        Some(Cause::NodeAddressOnWrongInterface)
    }

    fn expected_verdict(&self) -> Option<Verdict> {
        Some(Verdict::WrongParentDevice)
    }

    fn config(&self) -> ClusterConfig {
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
    fn drive(&self, lab: &Cluster) -> Result<TrafficReport, LabError> {
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

    /// ce-demo-2's vxlan.calico is `local 10.4.0.1 dev nerdctl0` and ce-demo-1's FDB sends its
    /// MAC to 10.4.0.1. ce-demo-1 -> ce-demo-2: the inner SYN enters ce-demo-1's vxlan.calico,
    /// leaves its NIC as UDP 4789 to 10.4.0.1, dies at the gateway, and no SYN-ACK ever comes
    /// back. ce-demo-2 -> ce-demo-1: ce-demo-2's VXLAN leaves its LAN NIC (not nerdctl0: felix's
    /// FDB entries carry no device, so the outer route lookup is unconstrained) with source
    /// 10.4.0.1; ce-demo-1 answers to 10.4.0.1, so ce-demo-2 never gets the SYN-ACK either.
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError> {
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
