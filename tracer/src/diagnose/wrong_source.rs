//! `node_address_on_wrong_interface` (verdict `wrong_source_address`): a packet left a host
//! interface with another interface's address, so its answer cannot come back. The fix text,
//! pinning calico-node's address autodetection, is shared by every rule of this cause.
use std::net::IpAddr;

use tracer_model::{diagnosis, Cause, Diagnosis, Evidence};

use super::{join, service_name, strings, Context, Findings};
use crate::{
    calico::Role,
    events::Dir,
    flows::{Flow, Side},
    net::Cidr,
};

/// A packet left a host interface with a source address that lives on another interface.
pub struct WrongSource {
    hop_iface: String,
    src: IpAddr,
    dst: IpAddr,
    /// Interface holding the source address, and that address's subnet.
    owner: String,
    owner_subnet: Cidr,
    /// The egress interface's own subnets.
    egress_subnets: Vec<Cidr>,
    outer: bool,
}

pub fn find(flow: &Flow, cx: &Context<'_>) -> Option<WrongSource> {
    flow.path().find_map(|hop| {
        if hop.side != Side::Forward || hop.dir != Dir::Egress || hop.role != Some(Role::Host) {
            return None;
        }
        // For tunnelled packets the node address is the outer source.
        let (src, dst, outer) = match hop.encap {
            Some(e) => (e.outer_src, e.outer_dst, true),
            None => (hop.src, hop.dst, false),
        };
        let egress = cx.facts.link(hop.ifindex)?;
        let owner = cx.facts.iface_holding(src)?;
        if owner.index == egress.index {
            return None;
        }
        let egress_subnets: Vec<Cidr> = egress
            .addrs
            .iter()
            .filter(|a| a.ip.is_ipv4() == src.is_ipv4())
            .map(|a| a.network())
            .collect();
        // A source inside the egress interface's subnet can still be answered over it.
        if egress_subnets.is_empty() || egress_subnets.iter().any(|c| c.contains(src)) {
            return None;
        }
        let owner_subnet = owner.addrs.iter().find(|a| a.ip == src)?.network();
        Some(WrongSource {
            hop_iface: hop.iface.to_string(),
            src,
            dst,
            owner: owner.name.clone(),
            owner_subnet,
            egress_subnets,
            outer,
        })
    })
}

/// Pin calico-node's node address autodetection to `good_iface`.
pub(super) fn autodetect_fix(good_iface: &str, peer: Option<IpAddr>) -> String {
    let can_reach = peer
        .map(|p| format!(", or `can-reach={p}`"))
        .unwrap_or_default();
    format!(
        "Pin calico-node's node address autodetection to the interface that reaches the other nodes. Manifest installs: set IP_AUTODETECTION_METHOD=interface=^{good_iface}$ on the calico-node DaemonSet (the value is a regular expression: anchor it, or it also matches longer names){can_reach}; `skip-interface=<regex>` (exclude the wrong NIC), `cidr=<the nodes' subnet>` and `kubernetes-internal-ip` (the Node's InternalIP) work too. Operator installs (tigera-operator reverts edits to the DaemonSet): set `spec.calicoNetwork.nodeAddressAutodetectionV4` in the Installation, e.g. `{{interface: \"^{good_iface}$\"}}` (or canReach, skipInterface, cidrs, kubernetes: NodeInternalIP). An `IP=<address>` env on calico-node bypasses autodetection altogether: correct or remove it. Then restart calico-node on the node and check that `calicoctl get node <name> -o yaml` (spec.bgp.ipv4Address), or the projectcalico.org/IPv4Address annotation, shows the {good_iface} address."
    )
}

pub fn diagnose(flow: &Flow, _cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    f.wrong_source.as_ref().map(|w| diagnosis(flow, w))
}

fn diagnosis(flow: &Flow, w: &WrongSource) -> Diagnosis {
    let what = if w.outer { "Its tunnel packets" } else { "It" };
    let port = if w.outer { 4789 } else { flow.dport };
    Diagnosis {
        cause: Cause::NodeAddressOnWrongInterface,
        summary: format!(
            "Traffic to {}:{}{} left {} with source {}, an address of {} ({}), not of {} ({}). {what} cannot be answered over {}: the peer replies to {} through its own default route. This is the address Calico autodetected for the node (BGP source / node IP), taken from the wrong interface.",
            w.dst,
            port,
            service_name(port),
            w.hop_iface,
            w.src,
            w.owner,
            w.owner_subnet,
            w.hop_iface,
            join(&w.egress_subnets),
            w.hop_iface,
            w.src,
        ),
        evidence: Evidence::WrongSource(diagnosis::WrongSource {
            destination: w.dst,
            dport: port,
            egress_iface: w.hop_iface.clone(),
            egress_subnets: strings(&w.egress_subnets),
            retransmits: flow.retransmits(),
            snat_excluded: None,
            source: w.src,
            source_iface: w.owner.clone(),
            source_subnet: w.owner_subnet.to_string(),
            tunnel_outer_header: w.outer,
        }),
        fix: autodetect_fix(&w.hop_iface, Some(w.dst)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    #[test]
    fn seed_004_bgp_from_second_nic_address() {
        let eth1 = Link {
            index: 3,
            name: "eth1".into(),
            kind: None,
            master: None,
            up: true,
            l3: false,
            mtu: None,
            vxlan: None,
            addrs: vec![IfAddr {
                ip: ip("10.0.0.66"),
                prefix: 24,
            }],
        };
        let f = underlay_node("10.51.0.101", vec![eth1]);
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let mut t = FlowTable::new(10);
        let id = t
            .ingest(
                &obs(1, 2, Dir::Egress, syn("10.0.0.66", "10.51.0.100", 179)),
                &lookup2,
            )
            .unwrap_or(0);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(
            j.verdicts,
            vec![Verdict::NoReply, Verdict::WrongSourceAddress]
        );
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::NodeAddressOnWrongInterface);
        assert_eq!(ev(&d.evidence)["source_iface"], "eth1");
        assert_eq!(ev(&d.evidence)["egress_iface"], "eth0");
        assert_eq!(ev(&d.evidence)["egress_subnets"][0], "10.51.0.0/24");
        assert_same_json(
            &d.evidence,
            json!({
                "egress_iface": "eth0",
                "egress_subnets": ["10.51.0.0/24"],
                "source": "10.0.0.66",
                "source_iface": "eth1",
                "source_subnet": "10.0.0.0/24",
                "destination": "10.51.0.100",
                "dport": 179,
                "tunnel_outer_header": false,
                "retransmits": 0,
            }),
        );
        assert!(d.summary.contains("BGP"), "{}", d.summary);
        assert!(
            d.fix.contains("IP_AUTODETECTION_METHOD=interface=^eth0$"),
            "{}",
            d.fix
        );

        // The other node dials the advertised 10.0.0.66: off its underlay, via the gateway.
        let f1 = underlay_node("10.51.0.100", vec![]);
        let mut t = FlowTable::new(10);
        let id = t
            .ingest(
                &obs(1, 2, Dir::Egress, syn("10.51.0.100", "10.0.0.66", 179)),
                &lookup2,
            )
            .unwrap_or(0);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f1, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::NoReply]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::NodeAddressOnWrongInterface);
        assert_eq!(ev(&d.evidence)["route"]["via"], "10.51.0.1");
        assert_same_json(
            &d.evidence,
            json!({
                "peer_address": "10.0.0.66",
                "dport": 179,
                "left_via": "eth0",
                "route": {"dst": "0.0.0.0/0", "via": "10.51.0.1", "dev": "eth0"},
                "underlay_subnets": ["10.51.0.0/24"],
            }),
        );

        // Answered BGP from the right address: nothing to say.
        let mut t = FlowTable::new(10);
        let s = syn("10.51.0.101", "10.51.0.100", 179);
        let id = t.ingest(&obs(1, 2, Dir::Egress, s), &lookup2).unwrap_or(0);
        let mut r = s;
        std::mem::swap(&mut r.src, &mut r.dst);
        std::mem::swap(&mut r.sport, &mut r.dport);
        r.tcp_flags = 0x12;
        t.ingest(&obs(2, 2, Dir::Ingress, r), &lookup2);
        let j = judge(
            t.get(id).unwrap_or_else(|| unreachable!()),
            &cx(&p, &f, 10_000_000_000),
        );
        assert_eq!(j.verdicts, vec![Verdict::Replied]);
        assert!(j.diagnosis.is_none());
    }
}
