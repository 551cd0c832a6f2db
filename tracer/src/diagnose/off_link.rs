//! `node_address_on_wrong_interface`, seen from the other side: a peer node whose address this
//! node reaches only through a gateway, off its underlay (the peer autodetected its address on
//! the wrong interface and advertised it).
use std::net::IpAddr;

use tracer_model::{
    diagnosis::{OffLinkPeer, Route, UnackedOffLinkPeer},
    Cause, Diagnosis, Evidence,
};

use super::{join, service_name, strings, wrong_source::autodetect_fix, Context, Findings};
use crate::{
    calico::Role,
    events::Dir,
    flows::{Flow, Side},
    net::Cidr,
};

/// An unanswered tunnel or BGP peer that this node can only reach through a gateway, while its
/// other peers share the node's underlay subnet.
pub fn diagnose_unanswered_peer(
    flow: &Flow,
    cx: &Context<'_>,
    f: &Findings<'_>,
) -> Option<Diagnosis> {
    if !f.no_reply {
        return None;
    }
    let (peer, port, iface) = flow.path().find_map(|h| {
        if h.side != Side::Forward || h.dir != Dir::Egress || h.role != Some(Role::Host) {
            return None;
        }
        match h.encap {
            Some(e) => Some((e.outer_dst, e.outer_dport, h.iface.to_string())),
            None if flow.dport == 179 => Some((h.dst, 179, h.iface.to_string())),
            None => None,
        }
    })?;
    let off = off_link(cx, peer)?;
    Some(Diagnosis {
        cause: Cause::NodeAddressOnWrongInterface,
        summary: format!(
            "The peer node's address {peer}{} is not on this node's underlay {} ({}): it is reached only through the gateway {}, and nothing came back. The peer most likely autodetected its node address on the wrong interface (a container bridge or a second NIC) and advertised it.",
            service_name(port),
            join(&off.underlay),
            off.dev,
            off.gateway,
        ),
        evidence: Evidence::OffLinkPeer(OffLinkPeer {
            dport: port,
            left_via: iface,
            peer_address: peer,
            route: off.route(),
            snat_excluded: None,
            underlay_subnets: strings(&off.underlay),
        }),
        fix: off_link_fix(peer, &off.underlay),
    })
}

/// A peer address this node reaches only through a gateway, off the underlay of the route's
/// device.
struct OffLink {
    route_dst: Cidr,
    gateway: IpAddr,
    dev: String,
    underlay: Vec<Cidr>,
}

impl OffLink {
    fn route(&self) -> Route {
        Route {
            dev: Some(self.dev.clone()),
            dst: self.route_dst.to_string(),
            via: Some(self.gateway),
        }
    }
}

fn off_link(cx: &Context<'_>, peer: IpAddr) -> Option<OffLink> {
    let route = cx.facts.route_to(peer)?;
    let gateway = route.gateway?;
    let egress = cx.facts.link(route.oif?)?;
    let underlay: Vec<Cidr> = egress
        .addrs
        .iter()
        .filter(|a| a.ip.is_ipv4() == peer.is_ipv4() && !a.is_host())
        .map(|a| a.network())
        .collect();
    if underlay.is_empty() || underlay.iter().any(|c| c.contains(peer)) {
        return None;
    }
    Some(OffLink {
        route_dst: route.dst,
        gateway,
        dev: egress.name.clone(),
        underlay,
    })
}

fn off_link_fix(peer: IpAddr, underlay: &[Cidr]) -> String {
    format!(
        "On the node that owns {peer} (`calicoctl get nodes -o wide`, or the projectcalico.org/IPv4Address annotations), pin address autodetection to the interface on {}: {}",
        join(underlay),
        autodetect_fix("<its NIC>", None)
    )
}

/// A BGP connection from a peer that this node answered but that never completed: the SYN came
/// in from an address off the underlay, the SYN-ACK went out through the gateway, and no ACK
/// came back within the no-reply timeout. confd's v3.22+ mesh makes the smaller address passive,
/// so when the peer that dials uses the wrong source, this is all the passive node sees: it
/// never dials, so [`diagnose_unanswered_peer`] has nothing to judge.
pub fn diagnose_unacked_peer(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    // A lost record may be the ACK.
    if f.lost_records > 0 {
        return None;
    }
    if flow.dport != 179 || !flow.tcp.syn || !flow.tcp.syn_ack || flow.tcp.rst || flow.tcp.fin {
        return None;
    }
    let answered = flow.first_reply_ns()?;
    if cx.evidence_now_ns().saturating_sub(answered) < cx.rules.no_reply_after_ns {
        return None;
    }
    // Any ACK from the peer means the handshake completed (or at least the path back works).
    if flow
        .hops()
        .any(|h| h.side == Side::Forward && h.tcp_flags_seen & tracer_common::TCP_ACK != 0)
    {
        return None;
    }
    let arrived = flow
        .path()
        .find(|h| h.side == Side::Forward && h.dir == Dir::Ingress && h.role == Some(Role::Host))?;
    let peer = arrived.src;
    let off = off_link(cx, peer)?;
    Some(Diagnosis {
        cause: Cause::NodeAddressOnWrongInterface,
        summary: format!(
            "The peer at {peer} dials this node's BGP port on {}, but {peer} is not on this node's underlay {} ({}): the answer (SYN-ACK) goes through the gateway {} and the handshake never completes. The peer most likely autodetected its node address on the wrong interface (a container bridge or a second NIC) and uses it as its BGP source; this node is the mesh's passive side (confd renders `passive on` toward the greater address), so it never dials.",
            arrived.iface,
            join(&off.underlay),
            off.dev,
            off.gateway,
        ),
        evidence: Evidence::UnackedOffLinkPeer(UnackedOffLinkPeer {
            arrived_on: arrived.iface.name.to_string(),
            dport: 179,
            peer_address: peer,
            retransmits: flow.retransmits(),
            route: off.route(),
            snat_excluded: None,
            underlay_subnets: strings(&off.underlay),
        }),
        fix: off_link_fix(peer, &off.underlay),
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    /// confd's v3.22+ mesh: the node with the smaller address is passive. When the peer dials
    /// from an address off the underlay, the passive node only answers, through its gateway.
    #[test]
    fn seed_004_passive_side_answers_an_off_link_peer() {
        let f = underlay_node("10.51.0.100", vec![]);
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let ingest = |peer: &str, acked: bool| {
            let mut t = FlowTable::new(10);
            let s = syn(peer, "10.51.0.100", 179);
            let id = t.ingest(&obs(1, 2, Dir::Ingress, s), &lookup2).unwrap_or(0);
            let mut r = s;
            std::mem::swap(&mut r.src, &mut r.dst);
            std::mem::swap(&mut r.sport, &mut r.dport);
            r.tcp_flags = 0x12;
            t.ingest(&obs(2, 2, Dir::Egress, r), &lookup2);
            if acked {
                let mut a = s;
                a.tcp_flags = 0x10;
                a.seq = 100;
                t.ingest(&obs(3, 2, Dir::Ingress, a), &lookup2);
            }
            (t, id)
        };
        let (t, id) = ingest("10.66.0.66", false);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        // Before the timeout: nothing yet.
        assert!(judge(flow, &cx(&p, &f, 1_000_000_000)).diagnosis.is_none());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::Replied]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::NodeAddressOnWrongInterface);
        assert_eq!(ev(&d.evidence)["peer_address"], "10.66.0.66");
        assert_eq!(ev(&d.evidence)["arrived_on"], "eth0");
        assert_eq!(ev(&d.evidence)["route"]["via"], "10.51.0.1");
        assert_same_json(
            &d.evidence,
            json!({
                "peer_address": "10.66.0.66",
                "dport": 179,
                "arrived_on": "eth0",
                "retransmits": 0,
                "route": {"dst": "0.0.0.0/0", "via": "10.51.0.1", "dev": "eth0"},
                "underlay_subnets": ["10.51.0.0/24"],
            }),
        );
        assert!(d.fix.contains("owns 10.66.0.66"), "{}", d.fix);
        // Completed handshakes, and unanswered ones from peers on the underlay, are not it.
        let (t, id) = ingest("10.66.0.66", true);
        let j = judge(
            t.get(id).unwrap_or_else(|| unreachable!()),
            &cx(&p, &f, 10_000_000_000),
        );
        assert!(j.diagnosis.is_none(), "{j:?}");
        let (t, id) = ingest("10.51.0.101", false);
        let j = judge(
            t.get(id).unwrap_or_else(|| unreachable!()),
            &cx(&p, &f, 10_000_000_000),
        );
        assert!(j.diagnosis.is_none(), "{j:?}");
    }
}
