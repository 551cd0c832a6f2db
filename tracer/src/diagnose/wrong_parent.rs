//! `node_address_on_wrong_interface` (verdict `wrong_parent_device`): felix built the VXLAN
//! device on an interface that does not lead to the other nodes.
use std::net::IpAddr;

use tracer_model::{diagnosis, Cause, Diagnosis, Evidence};

use super::{wrong_source::autodetect_fix, Context, Findings};
use crate::{
    events::Dir,
    flows::{Flow, HopView, Side},
    net::proto_name,
};

/// The VXLAN device hangs off an interface that does not lead to the peers.
pub struct WrongParent {
    vxlan: String,
    parent: String,
    parent_kind: Option<String>,
    parent_addrs: Vec<String>,
    local: Option<IpAddr>,
    /// Where the kernel routes the peer VTEP, when the peer is known.
    peer: Option<IpAddr>,
    route_iface: Option<String>,
    outer_seen_on: Vec<String>,
}

pub fn find(flow: &Flow, cx: &Context<'_>) -> Option<WrongParent> {
    // The flow entered a VXLAN device on this node...
    let tunnel_hop = flow.path().find(|h| {
        h.side == Side::Forward
            && h.dir == Dir::Egress
            && cx.facts.link(h.ifindex).is_some_and(|l| l.vxlan.is_some())
    })?;
    let vx = cx.facts.link(tunnel_hop.ifindex)?;
    let info = vx.vxlan.as_ref()?;
    let parent = cx.facts.link(info.parent_index?)?;
    let outer: Vec<HopView<'_>> = flow
        .path()
        .filter(|h| h.side == Side::Forward && h.encap.is_some() && h.dir == Dir::Egress)
        .collect();
    let peer = outer.iter().find_map(|h| h.encap.map(|e| e.outer_dst));
    let route_iface = peer
        .and_then(|p| cx.facts.route_to(p))
        .and_then(|r| r.oif)
        .or_else(|| cx.facts.default_route_ifaces().first().copied());
    let mismatch = route_iface.is_some_and(|r| r != parent.index);
    if !parent.is_bridge() && !mismatch {
        return None;
    }
    Some(WrongParent {
        vxlan: vx.name.clone(),
        parent: parent.name.clone(),
        parent_kind: parent.kind.clone(),
        parent_addrs: parent.addrs.iter().map(|a| a.to_string()).collect(),
        local: info.local,
        peer,
        route_iface: route_iface.map(|i| cx.facts.name_of(i)),
        outer_seen_on: outer.iter().map(|h| h.iface.to_string()).collect(),
    })
}

pub fn diagnose(flow: &Flow, _cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    f.wrong_parent.as_ref().map(|w| diagnosis(flow, w))
}

fn diagnosis(flow: &Flow, w: &WrongParent) -> Diagnosis {
    let kind = w
        .parent_kind
        .as_deref()
        .map(|k| format!(" (a {k})"))
        .unwrap_or_default();
    let good = w
        .route_iface
        .clone()
        .unwrap_or_else(|| "the node's NIC".into());
    let outer = if w.outer_seen_on.is_empty() {
        "no encapsulated packet was seen leaving any host interface".to_string()
    } else {
        format!(
            "the encapsulated packets left {}",
            w.outer_seen_on.join(", ")
        )
    };
    Diagnosis {
        cause: Cause::NodeAddressOnWrongInterface,
        summary: format!(
            "{} {}:{} -> {}:{} entered {}, whose parent device is {}{kind} with local address {}; the other nodes are reached through {good}, so {outer} and nothing came back. Calico's address autodetection picked {} for this node, and felix built {} on it.",
            proto_name(flow.proto),
            flow.src,
            flow.sport,
            flow.dst,
            flow.dport,
            w.vxlan,
            w.parent,
            w.local.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            w.parent,
            w.vxlan,
        ),
        evidence: Evidence::WrongParent(diagnosis::WrongParent {
            outer_packets_left: w.outer_seen_on.clone(),
            parent_addresses: w.parent_addrs.clone(),
            parent_device: w.parent.clone(),
            parent_kind: w.parent_kind.clone(),
            peer_vtep: w.peer,
            route_to_peers_via: w.route_iface.clone(),
            snat_excluded: None,
            tunnel_device: w.vxlan.clone(),
            vtep_local: w.local,
        }),
        fix: autodetect_fix(&good, w.peer),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    #[test]
    fn seed_003_vxlan_on_a_bridge() {
        let bridge = bridge_link(7, "nerdctl0");
        let f = underlay_node("10.51.0.101", vec![bridge, vxlan_link(7, "10.4.0.1")]);
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let t = vxlan_flow(7, "10.4.0.1", "10.51.0.100");
        let flow = t.iter_newest().next().unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(
            j.verdicts,
            vec![
                Verdict::Encapsulated,
                Verdict::NoReply,
                Verdict::WrongParentDevice
            ]
        );
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::NodeAddressOnWrongInterface);
        assert_eq!(ev(&d.evidence)["parent_device"], "nerdctl0");
        assert_eq!(ev(&d.evidence)["parent_kind"], "bridge");
        assert_eq!(ev(&d.evidence)["route_to_peers_via"], "eth0");
        assert_eq!(ev(&d.evidence)["outer_packets_left"][0], "nerdctl0");
        assert_same_json(
            &d.evidence,
            json!({
                "tunnel_device": "vxlan.calico",
                "parent_device": "nerdctl0",
                "parent_kind": "bridge",
                "parent_addresses": ["10.4.0.1/24"],
                "vtep_local": "10.4.0.1",
                "peer_vtep": "10.51.0.100",
                "route_to_peers_via": "eth0",
                "outer_packets_left": ["nerdctl0"],
            }),
        );
        assert!(d.fix.contains("interface=^eth0$"));

        // The healthy node sending to that peer's advertised VTEP 10.4.0.1 sees it off-link.
        let f1 = underlay_node("10.51.0.100", vec![vxlan_link(2, "10.51.0.100")]);
        let t = vxlan_flow(2, "10.51.0.100", "10.4.0.1");
        let flow = t.iter_newest().next().unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f1, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::Encapsulated, Verdict::NoReply]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(
            (d.cause, ev(&d.evidence)["peer_address"].as_str()),
            (Cause::NodeAddressOnWrongInterface, Some("10.4.0.1"))
        );

        // Healthy overlay: parent eth0, peer on-link, answered.
        let mut t = vxlan_flow(2, "10.51.0.100", "10.51.0.101");
        let mut r = syn("10.244.142.36", "10.244.228.139", 40000);
        r.sport = 8090;
        r.dport = 40000;
        r.tcp_flags = 0x12;
        t.ingest(&obs(4, 5, Dir::Egress, r), &lookup2);
        let flow = t.iter_newest().next().unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f1, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::Encapsulated, Verdict::Replied]);
        assert!(j.diagnosis.is_none());
    }
}
