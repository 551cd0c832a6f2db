//! Verdicts (what happened to a flow) and diagnoses (why, and what to change).
//!
//! Verdicts come from packets alone; causes join them with node facts (pools, interfaces,
//! routes). Every string here is part of the API: add new ones, never rename.
use std::net::IpAddr;

use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    calico::{Pools, Role},
    events::Dir,
    flows::{Flow, Side},
    hooks::drops::{DropReasons, Symbols},
    net::{proto_name, Cidr},
    netlink::NodeFacts,
};

pub const SNAT_APPLIED: &str = "snat_applied";
pub const SNAT_SKIPPED: &str = "snat_skipped";
pub const REPLIED: &str = "replied";
pub const NO_REPLY: &str = "no_reply";
pub const ENCAPSULATED: &str = "encapsulated";
pub const WRONG_PARENT_DEVICE: &str = "wrong_parent_device";
pub const WRONG_SOURCE_ADDRESS: &str = "wrong_source_address";
pub const DROPPED: &str = "dropped";
pub const SLOW_RESPONSE: &str = "slow_response";

/// Every verdict, for validating queries.
pub const VERDICTS: &[&str] = &[
    SNAT_APPLIED,
    SNAT_SKIPPED,
    REPLIED,
    NO_REPLY,
    ENCAPSULATED,
    WRONG_PARENT_DEVICE,
    WRONG_SOURCE_ADDRESS,
    DROPPED,
    SLOW_RESPONSE,
];

pub const IPPOOL_OVERLAPS_HOST_NETWORK: &str = "ippool_overlaps_host_network";
pub const NAT_OUTGOING_DISABLED: &str = "nat_outgoing_disabled";
pub const MASQUERADE_NOT_APPLIED: &str = "masquerade_not_applied";
pub const NODE_ADDRESS_ON_WRONG_INTERFACE: &str = "node_address_on_wrong_interface";
pub const DATASTORE_LATENCY: &str = "datastore_latency";
pub const KERNEL_DROP: &str = "kernel_drop";
pub const DESTINATION_UNRESPONSIVE: &str = "destination_unresponsive";

/// Every cause, for validating queries.
pub const CAUSES: &[&str] = &[
    IPPOOL_OVERLAPS_HOST_NETWORK,
    NAT_OUTGOING_DISABLED,
    MASQUERADE_NOT_APPLIED,
    NODE_ADDRESS_ON_WRONG_INTERFACE,
    DATASTORE_LATENCY,
    KERNEL_DROP,
    DESTINATION_UNRESPONSIVE,
];

/// Verdicts that mean something went wrong (the rest describe healthy behaviour).
pub const FAULT_VERDICTS: &[&str] = &[
    SNAT_SKIPPED,
    NO_REPLY,
    WRONG_PARENT_DEVICE,
    WRONG_SOURCE_ADDRESS,
    DROPPED,
    SLOW_RESPONSE,
];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Diagnosis {
    pub cause: &'static str,
    pub summary: String,
    pub evidence: Value,
    pub fix: String,
}

/// What the rules need besides the flow.
pub struct Context<'a> {
    pub pools: &'a Pools,
    pub facts: &'a NodeFacts,
    pub now_ns: u64,
    pub no_reply_after_ns: u64,
    /// Names of the kernel's drop reasons (from tracefs).
    pub reasons: &'a DropReasons,
    /// Kernel symbols, to name where a drop happened.
    pub symbols: &'a Symbols,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Judgement {
    pub verdicts: Vec<&'static str>,
    pub diagnosis: Option<Diagnosis>,
}

pub fn judge(flow: &Flow, cx: &Context<'_>) -> Judgement {
    let mut verdicts = Vec::new();
    let nat_src = flow.nat.filter(|n| n.src != flow.src);
    if nat_src.is_some() {
        verdicts.push(SNAT_APPLIED);
    }
    let skipped = snat_skipped(flow, cx);
    if skipped.is_some() {
        verdicts.push(SNAT_SKIPPED);
    }
    if flow.hops.iter().any(|h| h.encap.is_some()) {
        verdicts.push(ENCAPSULATED);
    }
    let no_reply = flow.first_reply_ns.is_none()
        && flow.expects_reply
        && cx.now_ns.saturating_sub(flow.first_ns) >= cx.no_reply_after_ns;
    if flow.first_reply_ns.is_some() {
        verdicts.push(REPLIED);
    } else if no_reply {
        verdicts.push(NO_REPLY);
    }
    if !flow.drops.is_empty() {
        verdicts.push(DROPPED);
    }

    // The most specific explanation wins: a misconfiguration names the fix, a drop names the
    // kernel's reason, an unanswered request only says where it was last seen.
    let diagnosis = skipped
        .and_then(|s| snat_diagnosis(flow, cx, &s, no_reply))
        .or_else(|| (!flow.drops.is_empty()).then(|| kernel_drop(flow, cx)))
        .or_else(|| no_reply.then(|| unanswered(flow, cx)));
    Judgement {
        verdicts,
        diagnosis,
    }
}

/// Where a pod-sourced packet left a host NIC without masquerade.
struct Skipped<'a> {
    hop: &'a crate::flows::Hop,
    src_pool: Cidr,
    dst_pool: Option<Cidr>,
    /// The host subnet (and its interface) that also contains the destination.
    host_subnet: Option<(Cidr, String)>,
}

fn snat_skipped<'a>(flow: &'a Flow, cx: &Context<'_>) -> Option<Skipped<'a>> {
    let src_pool = cx.pools.pool_of(flow.src)?;
    flow.hops.iter().find_map(|hop| {
        let leaving_host = hop.side == Side::Forward
            && hop.dir == Dir::Egress
            && hop.role == Some(Role::Host)
            && hop.encap.is_none()
            && hop.src == flow.src;
        if !leaving_host {
            return None;
        }
        let dst_pool = cx.pools.pool_of(hop.dst);
        let host_subnet = host_subnet_of(cx.facts, hop.dst);
        // A pool destination outside every host subnet is a pod routed without encapsulation:
        // no SNAT is the right thing there.
        if dst_pool.is_some() && host_subnet.is_none() {
            return None;
        }
        Some(Skipped {
            hop,
            src_pool,
            dst_pool,
            host_subnet,
        })
    })
}

fn host_subnet_of(facts: &NodeFacts, ip: IpAddr) -> Option<(Cidr, String)> {
    facts
        .connected_subnets()
        .filter(|(c, l)| c.contains(ip) && !l.name.starts_with("cali"))
        .max_by_key(|(c, _)| c.prefix())
        .map(|(c, l)| (c, l.name.clone()))
}

fn snat_diagnosis(
    flow: &Flow,
    cx: &Context<'_>,
    s: &Skipped<'_>,
    no_reply: bool,
) -> Option<Diagnosis> {
    let leaving = json!({
        "iface": s.hop.iface,
        "dir": "egress",
        "src": s.hop.src.to_string(),
        "sport": s.hop.sport,
        "dst": s.hop.dst.to_string(),
        "dport": s.hop.dport,
        "proto": proto_name(flow.proto),
    });
    let reply = reply_evidence(flow, cx);
    if let (Some(pool), Some((subnet, iface))) = (s.dst_pool, &s.host_subnet) {
        return Some(Diagnosis {
            cause: IPPOOL_OVERLAPS_HOST_NETWORK,
            summary: format!(
                "Pod {} reached {} un-masqueraded: felix skips SNAT for destinations in its IP pools, \
                 and pool {} also contains the host network {} on {}. The packet left {} with the pod \
                 address, so the destination answers a pod address it has no route back to{}.",
                flow.src,
                s.hop.dst,
                pool,
                subnet,
                iface,
                s.hop.iface,
                if no_reply { " and no reply came" } else { "" }
            ),
            evidence: json!({
                "pool": pool.to_string(),
                "pod_pool": s.src_pool.to_string(),
                "host_subnet": subnet.to_string(),
                "host_iface": iface,
                "left_node_unmasqueraded": leaving,
                "masq_pools": cx.pools.masq.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "pools_source": cx.pools.source,
                "reply": reply,
            }),
            fix: format!(
                "Change the IPPool {pool} so it no longer overlaps the host network {subnet} \
                 (`kubectl edit ippool default-ipv4-ippool`, or calicoctl; set CALICO_IPV4POOL_CIDR / \
                 the Installation's ipPools for new clusters), then recreate the pods so they get \
                 addresses from the new pool."
            ),
        });
    }
    if cx.pools.masq_pool_of(flow.src).is_none() {
        // Routable pod networks legitimately run without natOutgoing: only a fault when unanswered.
        if !no_reply {
            return None;
        }
        return Some(Diagnosis {
            cause: NAT_OUTGOING_DISABLED,
            summary: format!(
                "Pod {} sent to {} outside every IP pool, but its pool {} has natOutgoing disabled \
                 (it is not in felix's masq ipset), so the packet left {} with the pod address and \
                 no reply came back.",
                flow.src, s.hop.dst, s.src_pool, s.hop.iface
            ),
            evidence: json!({
                "pod_pool": s.src_pool.to_string(),
                "masq_pools": cx.pools.masq.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "left_node_unmasqueraded": leaving,
                "pools_source": cx.pools.source,
                "reply": reply,
            }),
            fix: format!(
                "Set natOutgoing: true on the IPPool {} (`calicoctl patch ippool <name> -p \
                 '{{\"spec\":{{\"natOutgoing\":true}}}}'`), or make the pod network routable from {}.",
                s.src_pool, s.hop.dst
            ),
        });
    }
    if !no_reply {
        return None;
    }
    Some(Diagnosis {
        cause: MASQUERADE_NOT_APPLIED,
        summary: format!(
            "Pod {}'s pool {} is marked for natOutgoing, yet its packet to {} left {} with the pod \
             address: felix's cali-nat-outgoing MASQUERADE rule did not apply.",
            flow.src, s.src_pool, s.hop.dst, s.hop.iface
        ),
        evidence: json!({
            "pod_pool": s.src_pool.to_string(),
            "left_node_unmasqueraded": leaving,
            "reply": reply,
        }),
        fix: "Check `iptables -t nat -S cali-nat-outgoing` and the ipsets it names \
              (`ipset list cali40masq-ipam-pools`); restart calico-node if felix's rules are missing."
            .to_string(),
    })
}

fn reply_evidence(flow: &Flow, cx: &Context<'_>) -> Value {
    match flow.first_reply_ns {
        Some(t) => json!({"replied": true, "after_ms": ms(t.saturating_sub(flow.first_ns))}),
        None => json!({
            "replied": false,
            "waited_ms": ms(cx.now_ns.saturating_sub(flow.first_ns)),
            "retransmits": flow.retransmits(),
        }),
    }
}

fn unanswered(flow: &Flow, cx: &Context<'_>) -> Diagnosis {
    let last_fwd = flow.hops.iter().rev().find(|h| h.side == Side::Forward);
    let route = cx
        .facts
        .route_to(flow.nat.map(|n| n.dst).unwrap_or(flow.dst));
    Diagnosis {
        cause: DESTINATION_UNRESPONSIVE,
        summary: format!(
            "{} {}:{} -> {}:{} got no reply within {} ms; the last place the request was seen on \
             this node is {}.",
            proto_name(flow.proto),
            flow.src,
            flow.sport,
            flow.dst,
            flow.dport,
            ms(cx.no_reply_after_ns),
            last_fwd
                .map(|h| format!("{} {}", h.iface, h.dir.as_str()))
                .unwrap_or_else(|| "nowhere".into())
        ),
        evidence: json!({
            "last_forward_hop": last_fwd.map(|h| json!({
                "iface": h.iface, "dir": h.dir.as_str(), "src": h.src.to_string(), "dst": h.dst.to_string(),
            })),
            "route": route.map(|r| json!({
                "dst": r.dst.to_string(),
                "via": r.gateway.map(|g| g.to_string()),
                "dev": r.oif.map(|i| cx.facts.name_of(i)),
            })),
            "reply": reply_evidence(flow, cx),
        }),
        fix: "Check that the destination is up and listening, and that its return path to this \
              node (routes, firewalls, security groups) is open."
            .to_string(),
    }
}

fn kernel_drop(flow: &Flow, cx: &Context<'_>) -> Diagnosis {
    let drops: Vec<Value> = flow
        .drops
        .iter()
        .map(|d| {
            json!({
                "reason": cx.reasons.name(d.reason),
                "reason_code": d.reason,
                "iface": (d.ifindex != 0).then(|| cx.facts.name_of(d.ifindex)),
                "function": cx.symbols.name(d.location),
                "side": d.side,
                "count": d.count,
                "after_ms": ms(d.ts_ns.saturating_sub(flow.first_ns)),
            })
        })
        .collect();
    let first = &flow.drops[0];
    let reason = cx.reasons.name(first.reason);
    let place = cx
        .symbols
        .name(first.location)
        .map(|f| format!(" in {f}"))
        .unwrap_or_default();
    let dev = if first.ifindex != 0 {
        format!(" (device {})", cx.facts.name_of(first.ifindex))
    } else {
        String::new()
    };
    Diagnosis {
        cause: KERNEL_DROP,
        summary: format!(
            "The kernel dropped {} {}:{} -> {}:{}{dev}{place}: {reason}.",
            proto_name(flow.proto),
            flow.src,
            flow.sport,
            flow.dst,
            flow.dport,
        ),
        evidence: json!({ "drops": drops, "reply": reply_evidence(flow, cx) }),
        fix: drop_fix(&reason),
    }
}

/// What an operator does about the common drop reasons on a Calico node.
fn drop_fix(reason: &str) -> String {
    match reason {
        "NETFILTER_DROP" => "An iptables/nftables rule dropped it. With Calico's iptables dataplane             that is usually a NetworkPolicy (felix's cali-pi-*/cali-po-* chains end in DROP): check             `calicoctl get networkpolicy,globalnetworkpolicy -A` and `iptables-save -c | grep DROP`             for the rule whose counter rises."
            .into(),
        "IP_RPFILTER" => "Reverse-path filtering: the source is not routed back through the interface             it arrived on. Check rp_filter and asymmetric routes (a node address autodetected on the             wrong interface produces exactly this)."
            .into(),
        "NO_SOCKET" => "Nothing listens on the destination port: check the pod/service is running and             its targetPort."
            .into(),
        "IP_OUTNOROUTES" | "IP_INNOROUTES" => "No route to the destination: check `ip route get` for it             and whether Calico programmed the route (BGP established? IPAM block affinity?)."
            .into(),
        "NEIGH_FAILED" | "NEIGH_QUEUEFULL" | "NEIGH_DEAD" | "NEIGH_CREATEFAIL" => "The next hop never             answered ARP/ND: check the next hop is up and on the same L2 segment as the egress interface."
            .into(),
        "OTHERHOST" => "The frame was addressed to another host's MAC: check proxy ARP on the cali*             interface and the pod's gateway (169.254.1.1)."
            .into(),
        r if r.starts_with("TCP_") => "A TCP-level drop (bad sequence, window, or state): usually a             symptom of NAT or conntrack confusion or an asymmetric path; compare the path of both             directions."
            .into(),
        _ => format!("Look up drop reason {reason} for this kernel (include/net/dropreason-core.h) and the             function that dropped it."),
    }
}

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        events::{Emit, Observation, Packet},
        flows::FlowTable,
        net::IfAddr,
        netlink::Link,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    fn facts() -> NodeFacts {
        let mut f = NodeFacts::default();
        let link = |index: u32, name: &str, addrs: Vec<IfAddr>| Link {
            index,
            name: name.into(),
            kind: None,
            master: None,
            up: true,
            l3: false,
            vxlan: None,
            addrs,
        };
        f.links.insert(
            2,
            link(
                2,
                "eth0",
                vec![IfAddr {
                    ip: ip("192.168.21.10"),
                    prefix: 24,
                }],
            ),
        );
        f.links.insert(5, link(5, "calid92900560e3", vec![]));
        f
    }

    fn pools(all: &[&str], masq: &[&str]) -> Pools {
        Pools {
            all: all.iter().filter_map(|c| c.parse().ok()).collect(),
            masq: masq.iter().filter_map(|c| c.parse().ok()).collect(),
            source: "ipset".into(),
            missing_sets: vec![],
        }
    }

    fn syn(src: &str, dst: &str, dport: u16) -> Packet {
        Packet {
            src: ip(src),
            dst: ip(dst),
            sport: 40000,
            dport,
            proto: 6,
            tcp_flags: 0x02,
            seq: 99,
            ack: 0,
            ip_id: 1,
            ttl: 64,
            payload_len: 0,
        }
    }

    fn obs(ts: u64, ifindex: u32, dir: Dir, p: Packet) -> Observation {
        Observation {
            ts_ns: ts,
            ifindex,
            dir,
            len: 60,
            pkts: 1,
            bytes: 60,
            emit: Emit::First,
            outer: p,
            inner: None,
            drop: None,
        }
    }

    fn lookup(i: u32) -> (String, Option<Role>) {
        match i {
            2 => ("eth0".into(), Some(Role::Host)),
            5 => ("calid92900560e3".into(), Some(Role::Workload)),
            o => (format!("if{o}"), None),
        }
    }

    /// A pod SYN seen at its veth and leaving eth0 as `out`, optionally answered.
    fn flow_of(pod_syn: Packet, out: Packet, reply: bool) -> (FlowTable, u64) {
        let mut t = FlowTable::new(10);
        let id = t
            .ingest(&obs(1_000, 5, Dir::Ingress, pod_syn), &lookup)
            .unwrap_or(0);
        t.ingest(&obs(2_000, 2, Dir::Egress, out), &lookup);
        if reply {
            let mut r = out;
            std::mem::swap(&mut r.src, &mut r.dst);
            std::mem::swap(&mut r.sport, &mut r.dport);
            r.tcp_flags = 0x12;
            r.seq = 555;
            r.ack = 100;
            t.ingest(&obs(3_000, 2, Dir::Ingress, r), &lookup);
        }
        (t, id)
    }

    static REASONS: std::sync::LazyLock<DropReasons> = std::sync::LazyLock::new(|| {
        DropReasons::from_format(
            "__print_symbolic(REC->reason, { 12, \"NETFILTER_DROP\" }, { 16, \"IP_RPFILTER\" })",
        )
    });
    static SYMBOLS: std::sync::LazyLock<Symbols> = std::sync::LazyLock::new(Symbols::default);

    fn cx<'a>(pools: &'a Pools, facts: &'a NodeFacts, now: u64) -> Context<'a> {
        Context {
            pools,
            facts,
            now_ns: now,
            no_reply_after_ns: 3_000_000_000,
            reasons: &REASONS,
            symbols: &SYMBOLS,
        }
    }

    #[test]
    fn seed_002_overlap_is_named_with_evidence() {
        let f = facts();
        let p = pools(&["192.168.0.0/16"], &["192.168.0.0/16"]);
        let s = syn("192.168.236.10", "192.168.21.11", 6443);
        let (t, id) = flow_of(s, s, false);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        // Before the timeout: skipped SNAT is already visible, no_reply is not.
        let early = judge(flow, &cx(&p, &f, 1_000_000_000));
        assert_eq!(early.verdicts, vec![SNAT_SKIPPED]);
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![SNAT_SKIPPED, NO_REPLY]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, IPPOOL_OVERLAPS_HOST_NETWORK);
        assert_eq!(d.evidence["pool"], "192.168.0.0/16");
        assert_eq!(d.evidence["host_subnet"], "192.168.21.0/24");
        assert_eq!(d.evidence["host_iface"], "eth0");
        assert_eq!(d.evidence["left_node_unmasqueraded"]["iface"], "eth0");
        assert_eq!(d.evidence["reply"]["replied"], false);
        assert!(d.fix.contains("192.168.21.0/24"));
    }

    #[test]
    fn masqueraded_and_answered_flow_is_healthy() {
        let f = facts();
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let s = syn("10.244.1.10", "192.168.21.11", 6443);
        let mut out = s;
        out.src = ip("192.168.21.10");
        out.sport = 61000;
        let (t, id) = flow_of(s, out, true);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![SNAT_APPLIED, REPLIED]);
        assert!(j.diagnosis.is_none());
    }

    #[test]
    fn nat_outgoing_disabled_only_when_unanswered() {
        let f = facts();
        let p = pools(&["10.244.0.0/16"], &[]);
        let s = syn("10.244.1.10", "8.8.8.8", 53);
        let (t, id) = flow_of(s, s, false);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.diagnosis.map(|d| d.cause), Some(NAT_OUTGOING_DISABLED));
        // Routable pod network: un-NATed and answered is fine.
        let (t, id) = flow_of(s, s, true);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![SNAT_SKIPPED, REPLIED]);
        assert!(j.diagnosis.is_none());
    }

    #[test]
    fn masq_pool_without_masquerade_is_a_missing_rule() {
        let f = facts();
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let s = syn("10.244.1.10", "8.8.8.8", 443);
        let (t, id) = flow_of(s, s, false);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.diagnosis.map(|d| d.cause), Some(MASQUERADE_NOT_APPLIED));
    }

    #[test]
    fn pod_to_pod_without_encapsulation_is_not_a_skipped_snat() {
        let f = facts();
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let s = syn("10.244.1.10", "10.244.2.20", 8080);
        let (t, id) = flow_of(s, s, true);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![REPLIED]);
        assert!(j.diagnosis.is_none());
    }

    #[test]
    fn unanswered_non_pod_flow_names_last_hop() {
        let f = facts();
        let p = pools(&[], &[]);
        let s = syn("192.168.21.10", "192.168.21.50", 2379);
        let mut t = FlowTable::new(10);
        let id = t.ingest(&obs(1, 2, Dir::Egress, s), &lookup).unwrap_or(0);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![NO_REPLY]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, DESTINATION_UNRESPONSIVE);
        assert_eq!(d.evidence["last_forward_hop"]["iface"], "eth0");
    }

    #[test]
    fn kernel_drop_names_reason_and_fix_unless_a_misconfiguration_explains_more() {
        let f = facts();
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let s = syn("10.244.1.10", "10.244.2.20", 8080);
        let mut t = FlowTable::new(10);
        let id = t.ingest(&obs(1, 5, Dir::Ingress, s), &lookup).unwrap_or(0);
        let mut d = obs(2, 5, Dir::Ingress, s);
        d.drop = Some(crate::events::KernelDrop {
            reason: 12,
            location: 0,
        });
        t.ingest(&d, &lookup);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![NO_REPLY, DROPPED]);
        let dg = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(dg.cause, KERNEL_DROP);
        assert_eq!(dg.evidence["drops"][0]["reason"], "NETFILTER_DROP");
        assert_eq!(dg.evidence["drops"][0]["iface"], "calid92900560e3");
        assert!(dg.fix.contains("NetworkPolicy"));

        // An overlapping pool explains an un-SNATed, dropped flow better than the drop alone.
        let p = pools(&["192.168.0.0/16"], &["192.168.0.0/16"]);
        let s = syn("192.168.236.10", "192.168.21.11", 6443);
        let (mut t, id) = flow_of(s, s, false);
        let mut d = obs(5, 2, Dir::Ingress, s);
        d.drop = Some(crate::events::KernelDrop {
            reason: 16,
            location: 0,
        });
        t.ingest(&d, &lookup);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert!(j.verdicts.contains(&DROPPED));
        assert_eq!(
            j.diagnosis.map(|d| d.cause),
            Some(IPPOOL_OVERLAPS_HOST_NETWORK)
        );
    }

    #[test]
    fn vocabulary_is_stable() {
        for v in [
            "snat_applied",
            "snat_skipped",
            "replied",
            "no_reply",
            "encapsulated",
            "wrong_parent_device",
            "wrong_source_address",
            "dropped",
            "slow_response",
        ] {
            assert!(VERDICTS.contains(&v), "{v}");
        }
        for c in [
            "ippool_overlaps_host_network",
            "nat_outgoing_disabled",
            "node_address_on_wrong_interface",
            "datastore_latency",
            "kernel_drop",
        ] {
            assert!(CAUSES.contains(&c), "{c}");
        }
    }
}
