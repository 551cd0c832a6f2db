//! `mtu_mismatch`: a TCP flow whose handshake and small packets got through while a full-size
//! segment was sent again and again with no ACK past it; or a full-size ICMP echo / UDP request
//! left unanswered while smaller ones on the same path were answered (or a too-big message for
//! its addresses was seen). The packets are the symptom; the node's MTUs (pod veth, tunnel,
//! parent NIC, read over netlink), ICMP fragmentation-needed / ICMPv6 packet-too-big messages
//! and `PKT_TOO_BIG` drops say where it stops. Without the packet symptom there is no diagnosis.
use std::net::IpAddr;

use tracer_model::{
    diagnosis::{IfaceMtu, MtuMismatch, TooBigSeen, TunnelHeadroom},
    Cause, Diagnosis, Evidence,
};

use super::{model_side, ms, Context, Findings};
use crate::{
    calico::Role,
    flows::{Flow, Side},
    net::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
    netlink::Link,
};

/// A segment sent this many times again with no ACK past it is stuck, not merely lost once
/// (after a too-big drop that PMTU discovery repairs, the segment is re-sent once, smaller).
const STUCK_AFTER: u32 = 2;
/// TCP options (timestamps, SACK) make a full-size segment's payload up to this much smaller
/// than the MTU minus the bare IP and TCP headers.
const OPTIONS_SLACK: u32 = 40;

/// A request is full size when it is at most this much below its interface's MTU (`ping -M do
/// -s 1472` sends exactly 1500; a UDP application may leave a little room).
const REQUEST_SLACK: u32 = 28;
/// An Ethernet header: what a hook on an Ethernet device counts beyond the IP packet.
const ETH_HLEN: u32 = 14;

/// Bytes a tunnel device's header adds to every packet: felix's own overheads
/// (`felix/dataplane/linux/int_dataplane.go`). VXLAN over IPv4: outer IPv4 20 + UDP 8 + VXLAN 8
/// + inner Ethernet 14; IPIP: an outer IPv4 header.
pub fn tunnel_overhead(name: &str) -> Option<u32> {
    match name {
        "vxlan.calico" => Some(50),
        "vxlan-v6.calico" => Some(70),
        "tunl0" => Some(20),
        "wireguard.cali" => Some(60),
        "wg-v6.cali" => Some(80),
        _ => None,
    }
}

/// A segment of the flow was sent again and again with no ACK past it.
pub fn stuck(flow: &Flow) -> bool {
    flow.stalls().any(|s| s.retransmits >= STUCK_AFTER)
}

pub fn diagnose(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    // A lost record may be the ACK or the reply that moved the flow on.
    if f.lost_records > 0 {
        return None;
    }
    let s = if flow.proto == PROTO_TCP {
        stuck_segment(flow, cx)?
    } else {
        unanswered_request(flow, cx, f)?
    };
    judge_size(flow, cx, &s)
}

/// What the packets show: a full-size packet that did not get through.
struct Symptom {
    /// Its IP size.
    bytes: u32,
    /// The MTU of the interface it was seen on (or the largest on the path).
    sized_for: u32,
    seen_at: String,
    /// TCP: times the segment was sent again; a request: times it was sent.
    times: u32,
    side: Side,
    until_ns: u64,
    /// A request: the largest smaller request on the same path that was answered (IP bytes).
    answered: Option<u32>,
}

/// A TCP segment sent again and again with no ACK past it, after the handshake worked.
fn stuck_segment(flow: &Flow, cx: &Context<'_>) -> Option<Symptom> {
    flow.first_reply_ns()?;
    let stall = flow
        .stalls()
        .filter(|s| s.retransmits >= STUCK_AFTER)
        .max_by_key(|s| s.payload_len)?;
    let headers = if flow.src.is_ipv4() { 40 } else { 60 };
    let bytes = u32::from(stall.payload_len) + headers;
    let mtus = path_mtus(flow, cx);
    let seen_at = cx.facts.name_of(stall.ifindex);
    // Full-size: as large as the interface it was seen on lets a segment be (the sender sized it
    // so). Without that MTU, as large as the largest on the path.
    let sized_for = mtus
        .iter()
        .find(|m| m.iface == seen_at)
        .map(|m| m.mtu)
        .or_else(|| mtus.iter().map(|m| m.mtu).max())?;
    Some(Symptom {
        bytes,
        sized_for,
        seen_at,
        times: stall.retransmits,
        side: stall.side,
        until_ns: stall.last_ns,
        answered: None,
    })
}

/// The IP size of a flow's requests where first seen on this node, and that interface's link.
fn request_size<'a>(flow: &Flow, cx: &'a Context<'_>) -> Option<(u32, u32, &'a Link)> {
    let hop = flow.request_hop()?;
    let link = cx.facts.link(hop.ifindex())?;
    let l2 = if link.l3 { 0 } else { ETH_HLEN };
    let len = hop.bytes_per_packet();
    Some((len.saturating_sub(l2), len, link))
}

/// An ICMP echo or UDP request without reply whose sender was told it is too big (a too-big
/// message to its address after it was sent, announcing less than its size): PMTU discovery
/// answered it. The sender knows; nothing is lost on the way.
pub fn refused_as_too_big(flow: &Flow, cx: &Context<'_>) -> bool {
    if flow.proto == PROTO_TCP || flow.first_reply_ns().is_some() {
        return false;
    }
    let Some((bytes, _, _)) = request_size(flow, cx) else {
        return false;
    };
    cx.too_big
        .iter()
        .any(|t| t.to == flow.src && t.last_ns >= flow.first_ns && t.mtu > 0 && t.mtu < bytes)
}

/// A full-size ICMP echo or UDP request left unanswered while a smaller one on the same path was
/// answered, or a too-big message for its addresses was seen. Alone (no smaller request
/// answered, no too-big message), an unanswered big request says nothing about MTU.
fn unanswered_request(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Symptom> {
    let unanswered = if flow.proto == PROTO_UDP {
        // UDP owes no reply; a request to a port that answered smaller ones is owed one.
        flow.first_reply_ns().is_none()
            && cx.evidence_now_ns().saturating_sub(flow.last_ns) >= cx.rules.no_reply_after_ns
    } else {
        f.no_reply && matches!(flow.proto, PROTO_ICMP | PROTO_ICMPV6)
    };
    if !unanswered {
        return None;
    }
    let hop = flow.request_hop()?;
    let (bytes, len, link) = request_size(flow, cx)?;
    // UDP: the same service (a port that answers); ICMP echo: any.
    let dport = if flow.proto == PROTO_UDP {
        flow.dport
    } else {
        0
    };
    let sized_for = link.mtu?;
    if bytes + REQUEST_SLACK < sized_for {
        return None;
    }
    let answered = cx
        .answered
        .iter()
        .filter(|a| {
            a.proto == flow.proto
                && a.src == flow.src
                && a.dst == flow.dst
                && a.dport == dport
                && a.ifindex == hop.ifindex()
                && a.len < len
        })
        .map(|a| a.len.saturating_sub(len - bytes))
        .max();
    if answered.is_none() && too_big_for(flow, cx, bytes, flow.last_ns).is_empty() {
        return None;
    }
    Some(Symptom {
        bytes,
        sized_for,
        seen_at: link.name.clone(),
        times: u32::try_from(hop.pkts()).unwrap_or(u32::MAX),
        side: Side::Forward,
        until_ns: flow.last_ns,
        answered,
    })
}

fn judge_size(flow: &Flow, cx: &Context<'_>, s: &Symptom) -> Option<Diagnosis> {
    let segment = s.bytes;
    if segment + OPTIONS_SLACK < s.sized_for {
        return None;
    }
    let mtus = path_mtus(flow, cx);
    let tunnel = mtus
        .iter()
        .find(|m| m.role == Role::Tunnel)
        .and_then(|m| Some((m, tunnel_overhead(&m.iface)?)));
    let too_big = too_big_for(flow, cx, segment, s.until_ns);
    let pkt_too_big: u32 = flow
        .drops()
        .iter()
        .filter(|d| cx.reasons.name(d.reason) == "PKT_TOO_BIG")
        .map(|d| d.count)
        .sum();
    let request = flow.proto != PROTO_TCP;

    let mut missing = Vec::new();
    if request && s.answered.is_none() {
        missing
            .push("no smaller request on the same path was seen answered on this node".to_string());
    }
    if too_big.is_empty() {
        missing.push("no ICMP fragmentation-needed / packet-too-big message for the flow's addresses was seen on this node".to_string());
    }
    if pkt_too_big == 0 {
        missing.push("no PKT_TOO_BIG drop of the flow on this node".to_string());
    }
    if tunnel.is_none() {
        missing.push("no Calico tunnel device on the flow's path on this node".to_string());
    }

    let pod = mtus
        .iter()
        .filter(|m| m.role == Role::Workload)
        .max_by_key(|m| m.mtu);
    let parent = tunnel
        .and_then(|(t, _)| tunnel_parent(cx, flow, &t.iface))
        .and_then(|l| Some((l.name.as_str(), l.mtu?)));
    let path_mtu = too_big.iter().map(|t| t.path_mtu).min();
    // A request between nodes does not cross the tunnel, but the tunnel's packets take the
    // same underlay: the node's tunnel headroom is what the fix is about.
    let headroom = tunnel.map(|(t, o)| (t.iface.as_str(), o)).or_else(|| {
        cx.facts
            .links
            .values()
            .filter(|_| request)
            .find_map(|l| Some((l.name.as_str(), tunnel_overhead(&l.name)?)))
    });
    let (why, target) = match (tunnel, pod, parent, path_mtu) {
        (Some((t, _)), Some(p), _, _) if p.mtu > t.mtu => (
            format!(
                "the pod's interface {} has MTU {}, larger than the tunnel {}'s {}: the pod sends packets the tunnel cannot carry",
                p.iface, p.mtu, t.iface, t.mtu
            ),
            t.mtu,
        ),
        (Some((t, o)), _, Some((nic, nic_mtu)), _) if t.mtu + o > nic_mtu => (
            format!(
                "the tunnel {} has MTU {} and its header adds {o} bytes, but its parent {nic} carries only {nic_mtu}",
                t.iface, t.mtu
            ),
            nic_mtu.saturating_sub(o),
        ),
        (Some((t, o)), _, _, Some(pm)) if t.mtu + o > pm => (
            format!(
                "a router on the underlay announced a path MTU of {pm} (ICMP too-big), below the {} bytes the tunnel {} (MTU {}) puts on the wire",
                t.mtu + o,
                t.iface,
                t.mtu
            ),
            pm.saturating_sub(o),
        ),
        (None, _, _, Some(pm)) => (
            format!("a router on the path announced a path MTU of {pm} (ICMP too-big)"),
            pm.saturating_sub(headroom.map_or(0, |(_, o)| o)),
        ),
        (Some((t, o)), _, _, None) => (
            format!(
                "this node's MTUs agree ({} {} + {o} bytes of tunnel header fit its parent), so the underlay between the nodes carries less than the {} bytes the tunnel puts on the wire, and no ICMP too-big came back (a path MTU black hole)",
                t.iface,
                t.mtu,
                t.mtu + o
            ),
            0,
        ),
        // Outside the tunnel (node to node): smaller requests on the same path got through.
        (None, _, _, None) if s.answered.is_some() => (
            format!(
                "{segment} bytes is full size for {} (MTU {}), but the path beyond carries less and no ICMP too-big came back (a path MTU black hole); the tunnel's packets take the same underlay",
                s.seen_at, s.sized_for
            ),
            0,
        ),
        // Nothing on this node or in the ICMP names a smaller MTU, and no tunnel: the symptom
        // alone is not a diagnosis.
        _ => return None,
    };

    let icmp_too_big = too_big
        .iter()
        .map(|t| TooBigSeen {
            after_ms: ms(t.at_ns.saturating_sub(flow.first_ns)),
            from: t.from,
            iface: t.iface.clone(),
            path_mtu: t.path_mtu,
            to: t.to,
        })
        .collect();
    let fix = mtu_fix(headroom, target);
    let symptom = if request {
        let what = if flow.proto == PROTO_UDP {
            "UDP request"
        } else {
            "ICMP echo request"
        };
        let smaller = match s.answered {
            Some(a) => format!("requests of {a} bytes on the same path were answered, but "),
            None => String::new(),
        };
        format!(
            "{smaller}a full-size {what} ({segment} bytes, seen on {}) got no reply ({} sent)",
            s.seen_at, s.times
        )
    } else {
        format!(
            "The connection's handshake and small packets got through, but a full-size segment (at least {segment} bytes, seen on {}) was sent {} more times with no ACK past it",
            s.seen_at, s.times
        )
    };
    let mut summary = format!("{symptom}: {why}.");
    if let Some(c) = summary.get_mut(0..1) {
        c.make_ascii_uppercase();
    }
    Some(Diagnosis {
        cause: Cause::MtuMismatch,
        summary,
        evidence: Evidence::MtuMismatch(MtuMismatch {
            icmp_too_big,
            missing,
            mtus: mtus.clone(),
            pkt_too_big_drops: pkt_too_big,
            segment_bytes: segment,
            segment_retransmits: s.times,
            side: model_side(s.side),
            snat_excluded: None,
            tunnel: tunnel.map(|(t, o)| TunnelHeadroom {
                device: t.iface.clone(),
                overhead: o,
            }),
        }),
        fix,
    })
}

/// The MTU of every interface the flow crossed on this node, and of each tunnel's parent.
fn path_mtus(flow: &Flow, cx: &Context<'_>) -> Vec<IfaceMtu> {
    let mut out: Vec<IfaceMtu> = Vec::new();
    let mut add = |link: &Link, role: Role| {
        if let Some(mtu) = link.mtu {
            if !out.iter().any(|m| m.iface == link.name) {
                out.push(IfaceMtu {
                    iface: link.name.clone(),
                    mtu,
                    role,
                });
            }
        }
    };
    for h in flow.path() {
        let Some(link) = cx.facts.link(h.ifindex) else {
            continue;
        };
        let role = match h.role {
            Some(r) => r,
            None if tunnel_overhead(&link.name).is_some() => Role::Tunnel,
            None if cx.rules.is_workload_iface(&link.name) => Role::Workload,
            None => Role::Host,
        };
        add(link, role);
        if role == Role::Tunnel {
            if let Some(p) = tunnel_parent(cx, flow, &link.name) {
                add(p, Role::Host);
            }
        }
    }
    out
}

/// The device a tunnel's packets leave by: a VXLAN device's parent, or else (tunl0, a VXLAN
/// device without one) the route to the flow's outer destination.
fn tunnel_parent<'a>(cx: &'a Context<'_>, flow: &Flow, tunnel: &str) -> Option<&'a Link> {
    let link = cx.facts.link_by_name(tunnel)?;
    if let Some(p) = link
        .vxlan
        .as_ref()
        .and_then(|v| v.parent_index)
        .and_then(|i| cx.facts.link(i))
    {
        return Some(p);
    }
    let peer = flow
        .path()
        .find_map(|h| h.encap.map(|e| e.outer_dst))
        .or_else(|| {
            let r = cx.facts.route_to(flow.dst)?;
            r.gateway
        })?;
    let oif = cx.facts.route_to(peer)?.oif?;
    cx.facts.link(oif)
}

struct Seen {
    at_ns: u64,
    from: IpAddr,
    to: IpAddr,
    iface: String,
    path_mtu: u32,
}

/// Too-big messages sent to one of the flow's addresses (the pod's, its translation, or the
/// tunnel's outer source) while its `bytes`-byte packet was not getting through (until
/// `until_ns`), announcing an MTU it does not fit.
fn too_big_for(flow: &Flow, cx: &Context<'_>, bytes: u32, until_ns: u64) -> Vec<Seen> {
    let mut ours: Vec<IpAddr> = vec![flow.src, flow.dst];
    ours.extend(flow.nat.iter().flat_map(|n| [n.src, n.dst]));
    ours.extend(
        flow.path()
            .filter_map(|h| h.encap.map(|e| [e.outer_src, e.outer_dst]))
            .flatten(),
    );
    cx.too_big
        .iter()
        .filter(|t| ours.contains(&t.to))
        .filter(|t| t.last_ns >= flow.first_ns && t.first_ns <= until_ns)
        .filter(|t| t.mtu > 0 && t.mtu < bytes + OPTIONS_SLACK + 70)
        .map(|t| Seen {
            at_ns: t.first_ns,
            from: t.from,
            to: t.to,
            iface: cx.facts.name_of(t.ifindex),
            path_mtu: t.mtu,
        })
        .collect()
}

/// Calico's own knobs, for operator and manifest installs, and what value to give them (0: not
/// known from this node, then `<MTU>` stands for it).
fn mtu_fix(tunnel: Option<(&str, u32)>, target: u32) -> String {
    let (lead, value) = if target > 0 {
        (format!("Set Calico's MTU to {target}."), target.to_string())
    } else {
        (
            "Set Calico's MTU (<MTU> below) to the underlay's path MTU minus the tunnel header. Measure the path MTU between two nodes first: `ping -M do -s <size> <other node's address>` from one node; the largest size that passes plus 28 is the path MTU.".to_string(),
            "<MTU>".to_string(),
        )
    };
    let headroom = match tunnel {
        Some((dev, o)) => format!(
            " The tunnel's MTU must leave room for its header: {dev} adds {o} bytes to every packet (VXLAN: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 = 50; IPIP: an outer IPv4 header, 20), so its MTU must be the underlay's path MTU minus {o}, and the pods' MTU no larger than the tunnel's."
        ),
        None => String::new(),
    };
    format!(
        "{lead}{headroom} Operator installs (tigera-operator): set `Installation.spec.calicoNetwork.mtu` (`kubectl patch installation default --type merge -p '{{\"spec\":{{\"calicoNetwork\":{{\"mtu\":{value}}}}}}}'`); the operator passes it to felix and the CNI plugin. Manifest installs (calico.yaml): set the tunnel's MTU in FelixConfiguration (`calicoctl patch felixconfiguration default -p '{{\"spec\":{{\"vxlanMTU\":{value}}}}}'`, or `ipipMTU` for IPIP, `vxlanMTUV6` for IPv6 VXLAN) and `veth_mtu` in the calico-config ConfigMap for the pods. With the MTUs left at 0 felix auto-detects: it takes the smallest MTU of the up interfaces matching `mtuIfacePattern` (default `^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)`) minus the tunnel header and writes it to /var/lib/calico/mtu for the CNI plugin; if the node's NIC is not matched (a bond, a bridge), set `mtuIfacePattern` in FelixConfiguration to match it. Auto-detection cannot see an underlay smaller than the NIC: then set the MTU explicitly. A pod keeps the MTU its veth got when it was created: recreate the pods (`kubectl rollout restart`) after the change."
    )
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use crate::{events::Emit, flows::TooBig};

    const POD: &str = "10.244.228.139";
    const PEER: &str = "10.244.142.36";

    /// A node whose pod veth, vxlan.calico and eth0 have the given MTUs.
    fn node(pod: u32, vxlan: u32, nic: u32) -> NodeFacts {
        let mut f = underlay_node("10.51.0.100", vec![vxlan_link(2, "10.51.0.100")]);
        for (i, m) in [(5, pod), (8, vxlan), (2, nic)] {
            if let Some(l) = f.links.get_mut(&i) {
                l.mtu = Some(m);
            }
        }
        f
    }

    /// A pod's connection through vxlan.calico: handshake answered, then a segment of `payload`
    /// bytes sent `times` more times, and (when `acked`) an ACK past it.
    fn bulk(payload: u16, times: u32, acked: bool) -> FlowTable {
        let mut t = FlowTable::new(10);
        let s = syn(POD, PEER, 8090);
        let outer = |ts: u64, p: Packet| {
            let mut o = obs(ts, 2, Dir::Egress, syn("10.51.0.100", "10.51.0.101", 4789));
            o.outer.proto = 17;
            o.inner = Some((crate::events::Encap::Vxlan, 4096, p));
            o
        };
        for (ts, i, d) in [(1, 5, Dir::Ingress), (2, 8, Dir::Egress)] {
            t.ingest(&obs(ts, i, d, s), &lookup2);
        }
        t.ingest(&outer(3, s), &lookup2);
        let mut sa = crate::testutil::tcp(PEER, 8090, POD, 40000, 0x12, 500, 100);
        t.ingest(&obs(10, 5, Dir::Egress, sa), &lookup2);
        sa.tcp_flags = 0x10;
        let mut data = crate::testutil::tcp(POD, 40000, PEER, 8090, 0x18, 100, 501);
        data.payload_len = payload;
        for n in 0..=times {
            let mut o = obs(1_000_000 * (n as u64 + 1), 5, Dir::Ingress, data);
            if n > 0 {
                o.emit = Emit::Retransmit;
            }
            t.ingest(&o, &lookup2);
            let mut o = obs(1_000_000 * (n as u64 + 1) + 5, 8, Dir::Egress, data);
            if n > 0 {
                o.emit = Emit::Retransmit;
            }
            t.ingest(&o, &lookup2);
        }
        if acked {
            let mut a = sa;
            a.seq = 501;
            a.ack = 100 + u32::from(payload);
            t.ingest(&obs(50_000_000, 5, Dir::Egress, a), &lookup2);
        }
        t
    }

    fn judged(t: &FlowTable, f: &NodeFacts, too_big: &[TooBig]) -> Judgement {
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let c = Context {
            too_big,
            ..cx(&p, f, 10_000_000_000)
        };
        let flow = t.iter_newest_below(u64::MAX).next().map(|(_, f)| f);
        judge(flow.unwrap_or_else(|| unreachable!()), &c)
    }

    #[test]
    fn pod_mtu_above_the_tunnels_is_named_with_every_mtu() {
        let f = node(1500, 1450, 1500);
        let j = judged(&bulk(1448, 4, false), &f, &[]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::MtuMismatch);
        assert_same_json(
            &d.evidence,
            json!({
                "icmp_too_big": [],
                "missing": [
                    "no ICMP fragmentation-needed / packet-too-big message for the flow's addresses was seen on this node",
                    "no PKT_TOO_BIG drop of the flow on this node",
                ],
                "mtus": [
                    {"iface": "calid92900560e3", "mtu": 1500, "role": "workload"},
                    {"iface": "vxlan.calico", "mtu": 1450, "role": "tunnel"},
                    {"iface": "eth0", "mtu": 1500, "role": "host"},
                ],
                "pkt_too_big_drops": 0,
                "segment_bytes": 1488,
                "segment_retransmits": 4,
                "side": "forward",
                "tunnel": {"device": "vxlan.calico", "overhead": 50},
            }),
        );
        assert!(
            d.summary.contains("larger than the tunnel"),
            "{}",
            d.summary
        );
        assert!(d.fix.contains("Set Calico's MTU to 1450."), "{}", d.fix);
        assert!(d.fix.contains("Installation.spec.calicoNetwork.mtu"));
        assert!(d.fix.contains("vxlanMTU"));
    }

    #[test]
    fn underlay_icmp_names_the_path_mtu_and_a_black_hole_is_said_to_be_one() {
        let f = node(1450, 1450, 1500);
        let tb = TooBig {
            first_ns: 2_500_000,
            last_ns: 2_500_000,
            from: ip("10.51.0.1"),
            to: ip("10.51.0.100"),
            ifindex: 2,
            dir: Dir::Ingress,
            mtu: 1400,
        };
        let j = judged(&bulk(1398, 3, false), &f, &[tb]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::MtuMismatch);
        let e = ev(&d.evidence);
        assert_eq!(e["icmp_too_big"][0]["from"], "10.51.0.1");
        assert_eq!(e["icmp_too_big"][0]["iface"], "eth0");
        assert_eq!(e["icmp_too_big"][0]["path_mtu"], 1400);
        assert!(d.fix.contains("Set Calico's MTU to 1350."), "{}", d.fix);
        // No ICMP: the node's MTUs agree, so it is the underlay, and the value is unknown.
        let d = judged(&bulk(1398, 3, false), &f, &[])
            .diagnosis
            .unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::MtuMismatch);
        assert!(d.summary.contains("black hole"), "{}", d.summary);
        assert!(d.fix.contains("ping -M do"), "{}", d.fix);
    }

    /// The node drops a too-big segment (PKT_TOO_BIG) and tells the pod: PMTU discovery at work
    /// when the data then gets through, `mtu_mismatch` (which names the drops) when it stays
    /// stuck; never `kernel_drop` on its own.
    #[test]
    fn pkt_too_big_counts_only_when_the_flow_stays_stuck() {
        let f = node(1500, 1450, 1500);
        let reasons = DropReasons::from_format(
            "__print_symbolic(REC->reason, { 12, \"NETFILTER_DROP\" }, { 93, \"PKT_TOO_BIG\" })",
        );
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        for (times, acked) in [(1, true), (4, false)] {
            let mut t = bulk(1448, times, acked);
            let mut d = obs(
                1_000_002,
                5,
                Dir::Ingress,
                crate::testutil::tcp(POD, 40000, PEER, 8090, 0x18, 100, 501),
            );
            d.drop = Some(crate::events::KernelDrop {
                reason: 93,
                location: 0,
            });
            t.ingest(&d, &lookup2);
            let c = Context {
                reasons: &reasons,
                ..cx(&p, &f, 10_000_000_000)
            };
            let flow = t.iter_newest_below(u64::MAX).next().map(|(_, f)| f);
            let j = judge(flow.unwrap_or_else(|| unreachable!()), &c);
            if acked {
                assert!(!j.verdicts.contains(&Verdict::Dropped), "{j:?}");
                assert!(j.diagnosis.is_none(), "{j:?}");
            } else {
                assert!(j.verdicts.contains(&Verdict::Dropped), "{j:?}");
                let d = j.diagnosis.unwrap_or_else(|| unreachable!());
                assert_eq!(d.cause, Cause::MtuMismatch);
                assert_eq!(ev(&d.evidence)["pkt_too_big_drops"], 1);
            }
        }
    }

    #[test]
    fn no_symptom_no_diagnosis() {
        let f = node(1500, 1450, 1500);
        // Acknowledged after one retransmit: PMTU discovery did its job.
        let j = judged(&bulk(1448, 1, true), &f, &[]);
        assert!(j.diagnosis.is_none(), "{j:?}");
        // Stuck but acknowledged at last.
        let j = judged(&bulk(1448, 4, true), &f, &[]);
        assert!(j.diagnosis.is_none(), "{j:?}");
        // A small segment stuck is not an MTU problem.
        let j = judged(&bulk(200, 4, false), &f, &[]);
        assert!(
            j.diagnosis
                .as_ref()
                .is_none_or(|d| d.cause != Cause::MtuMismatch),
            "{j:?}"
        );
        // Without any MTU read from the node, size cannot be judged: said by silence.
        let j = judged(
            &bulk(1448, 4, false),
            &underlay_node("10.51.0.100", vec![]),
            &[],
        );
        assert!(
            j.diagnosis
                .as_ref()
                .is_none_or(|d| d.cause != Cause::MtuMismatch),
            "{j:?}"
        );
    }

    const NODE: &str = "10.51.0.100";
    const OTHER: &str = "10.51.0.101";

    /// An ICMP echo request (`reply`: its reply) of `ip_bytes` from this node to OTHER on eth0,
    /// ping id `id`, its `n`-th.
    fn echo(id: u16, n: u16, reply: bool) -> crate::events::Packet {
        let mut p = crate::testutil::tcp(NODE, id, OTHER, 0x0800, 0, u32::from(n), 0);
        p.proto = 1;
        if reply {
            (p.src, p.dst) = (p.dst, p.src);
            p.dport = 0;
        }
        p
    }

    /// Pings from NODE to OTHER: `sizes` (IP bytes) each sent twice, answered when `true`; then
    /// the node's facts with eth0 at 1500 and a vxlan.calico.
    fn pings(t: &mut FlowTable, sizes: &[(u16, u32, bool)]) {
        let mut ts = 1_000;
        for &(id, bytes, answered) in sizes {
            for n in 0..2 {
                let mut o = obs(ts, 2, Dir::Egress, echo(id, n, false));
                (o.len, o.bytes) = (bytes + 14, u64::from(bytes + 14));
                t.ingest(&o, &lookup2);
                if answered {
                    let mut o = obs(ts + 500, 2, Dir::Ingress, echo(id, n, true));
                    (o.len, o.bytes) = (bytes + 14, u64::from(bytes + 14));
                    t.ingest(&o, &lookup2);
                }
                ts += 1_000_000;
            }
        }
    }

    fn judged_request(t: &FlowTable, id: u16, too_big: &[TooBig]) -> Judgement {
        let f = node(1500, 1450, 1500);
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let c = Context {
            too_big,
            answered: t.answered(),
            ..cx(&p, &f, 10_000_000_000)
        };
        let flow = t
            .iter_newest()
            .find(|f| f.sport == id)
            .unwrap_or_else(|| unreachable!());
        judge(flow, &c)
    }

    /// Node to node, outside the tunnel: a 1400-byte ping answered, a 1500-byte one (full size
    /// for eth0) not, no ICMP back: a black hole on the underlay, named with eth0's MTU and the
    /// node's tunnel headroom in the fix.
    #[test]
    fn full_size_ping_unanswered_after_a_smaller_one_was_answered() {
        let mut t = FlowTable::new(10);
        pings(&mut t, &[(7, 1400, true), (8, 1500, false)]);
        let j = judged_request(&t, 8, &[]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::MtuMismatch, "{d:?}");
        assert_same_json(
            &d.evidence,
            json!({
                "icmp_too_big": [],
                "missing": [
                    "no ICMP fragmentation-needed / packet-too-big message for the flow's addresses was seen on this node",
                    "no PKT_TOO_BIG drop of the flow on this node",
                    "no Calico tunnel device on the flow's path on this node",
                ],
                "mtus": [{"iface": "eth0", "mtu": 1500, "role": "host"}],
                "pkt_too_big_drops": 0,
                "segment_bytes": 1500,
                "segment_retransmits": 2,
                "side": "forward",
                "tunnel": null,
            }),
        );
        assert!(
            d.summary.starts_with("Requests of 1400 bytes"),
            "{}",
            d.summary
        );
        assert!(d.summary.contains("black hole"), "{}", d.summary);
        assert!(d.fix.contains("vxlan.calico adds 50 bytes"), "{}", d.fix);
        // The small ping itself: answered, nothing to say.
        assert!(judged_request(&t, 7, &[]).diagnosis.is_none());
    }

    /// One unanswered big ping and nothing else: no evidence it is its size (the destination
    /// may just be down), so no `mtu_mismatch`; nor when the smaller ping went unanswered too.
    #[test]
    fn an_unanswered_big_ping_alone_is_not_an_mtu_fault() {
        for sizes in [
            vec![(8, 1500, false)],
            vec![(7, 1400, false), (8, 1500, false)],
            vec![(7, 200, true), (8, 1200, false)],
        ] {
            let mut t = FlowTable::new(10);
            pings(&mut t, &sizes);
            let j = judged_request(&t, 8, &[]);
            let d = j.diagnosis.unwrap_or_else(|| unreachable!());
            assert_eq!(d.cause, Cause::DestinationUnresponsive, "{sizes:?}: {d:?}");
        }
    }

    /// A too-big message to the pinging node itself: PMTU discovery told the sender, which is
    /// an answer (`ping -M do` reports it), not a fault. One to someone else (a tunnel's outer
    /// address, here OTHER's answer never coming) names the path MTU.
    #[test]
    fn a_sender_told_by_icmp_is_answered_and_a_router_names_the_path_mtu() {
        let mut t = FlowTable::new(10);
        pings(&mut t, &[(8, 1500, false)]);
        let told = TooBig {
            first_ns: 2_000,
            last_ns: 2_000,
            from: ip("10.51.0.1"),
            to: ip(NODE),
            ifindex: 2,
            dir: Dir::Ingress,
            mtu: 1400,
        };
        let j = judged_request(&t, 8, &[told]);
        assert!(j.diagnosis.is_none(), "{j:?}");
        assert!(!j.verdicts.contains(&Verdict::NoReply), "{j:?}");
        let for_peer = TooBig {
            to: ip(OTHER),
            ..told
        };
        let d = judged_request(&t, 8, &[for_peer])
            .diagnosis
            .unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::MtuMismatch, "{d:?}");
        let e = ev(&d.evidence);
        assert_eq!(e["icmp_too_big"][0]["path_mtu"], 1400);
        assert_eq!(
            e["missing"][0],
            "no smaller request on the same path was seen answered on this node"
        );
        assert!(d.fix.contains("Set Calico's MTU to 1350."), "{}", d.fix);
    }

    /// UDP: a full-size datagram to a port that answered a smaller one is `mtu_mismatch`; to
    /// another port (one-way by design, say syslog) it is nothing at all.
    #[test]
    fn udp_requests_are_judged_against_the_same_port() {
        let f = node(1500, 1450, 1500);
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let udp = |sport: u16, dport: u16, reply: bool| {
            let mut u = crate::testutil::tcp(NODE, sport, OTHER, dport, 0, 0, 0);
            u.proto = 17;
            if reply {
                (u.src, u.dst, u.sport, u.dport) = (u.dst, u.src, u.dport, u.sport);
            }
            u
        };
        for (big_port, cause) in [(53, Some(Cause::MtuMismatch)), (514, None)] {
            let mut t = FlowTable::new(10);
            let mut send = |ts: u64, p: crate::events::Packet, ifx: u32, dir: Dir, bytes: u32| {
                let mut o = obs(ts, ifx, dir, p);
                (o.len, o.bytes) = (bytes + 14, u64::from(bytes + 14));
                t.ingest(&o, &lookup2);
            };
            send(1_000, udp(40001, 53, false), 2, Dir::Egress, 200);
            send(2_000, udp(40001, 53, true), 2, Dir::Ingress, 600);
            send(3_000, udp(40002, big_port, false), 2, Dir::Egress, 1490);
            send(1_003_000, udp(40002, big_port, false), 2, Dir::Egress, 1490);
            let c = Context {
                answered: t.answered(),
                ..cx(&p, &f, 10_000_000_000)
            };
            let flow = t
                .iter_newest()
                .find(|f| f.sport == 40002)
                .unwrap_or_else(|| unreachable!());
            let j = judge(flow, &c);
            assert_eq!(j.diagnosis.as_ref().map(|d| d.cause), cause, "{j:?}");
            if let Some(d) = j.diagnosis {
                assert!(
                    d.summary.contains("UDP request (1490 bytes"),
                    "{}",
                    d.summary
                );
            }
        }
    }
}
