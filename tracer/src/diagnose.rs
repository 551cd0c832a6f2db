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
    flows::{DropRecord, Flow, Gaps, HopView, Side},
    hooks::drops::{DropReasons, Symbols},
    net::{proto_name, Cidr},
    netlink::NodeFacts,
};

pub const SNAT_APPLIED: &str = "snat_applied";
pub const SNAT_SKIPPED: &str = "snat_skipped";
/// A pod's packet left un-masqueraded because felix's own configuration says so
/// (`NATOutgoingExclusions`, `IptablesNATOutgoingInterfaceFilter`, a LoadBalancer-only pool):
/// healthy, and the flow carries `snat_excluded` naming the setting.
pub const SNAT_EXCLUDED: &str = "snat_excluded";
pub const REPLIED: &str = "replied";
pub const NO_REPLY: &str = "no_reply";
pub const ENCAPSULATED: &str = "encapsulated";
pub const WRONG_PARENT_DEVICE: &str = "wrong_parent_device";
pub const WRONG_SOURCE_ADDRESS: &str = "wrong_source_address";
pub const DROPPED: &str = "dropped";
pub const SLOW_RESPONSE: &str = "slow_response";
/// Records the flow may depend on were lost (ring buffer full) while it ran: an unanswered
/// request is then not called `no_reply`, since its reply may be among them.
pub const EVIDENCE_INCOMPLETE: &str = "evidence_incomplete";

/// Every verdict, for validating queries.
pub const VERDICTS: &[&str] = &[
    SNAT_APPLIED,
    SNAT_SKIPPED,
    SNAT_EXCLUDED,
    REPLIED,
    NO_REPLY,
    ENCAPSULATED,
    WRONG_PARENT_DEVICE,
    WRONG_SOURCE_ADDRESS,
    DROPPED,
    SLOW_RESPONSE,
    EVIDENCE_INCOMPLETE,
];

pub const IPPOOL_OVERLAPS_HOST_NETWORK: &str = "ippool_overlaps_host_network";
pub const NAT_OUTGOING_DISABLED: &str = "nat_outgoing_disabled";
pub const MASQUERADE_NOT_APPLIED: &str = "masquerade_not_applied";
pub const NODE_ADDRESS_ON_WRONG_INTERFACE: &str = "node_address_on_wrong_interface";
pub const DATASTORE_LATENCY: &str = "datastore_latency";
pub const KERNEL_DROP: &str = "kernel_drop";
pub const DESTINATION_UNRESPONSIVE: &str = "destination_unresponsive";
pub const POD_ROUTE_MISSING: &str = "pod_route_missing";

/// Every cause, for validating queries.
pub const CAUSES: &[&str] = &[
    IPPOOL_OVERLAPS_HOST_NETWORK,
    NAT_OUTGOING_DISABLED,
    MASQUERADE_NOT_APPLIED,
    NODE_ADDRESS_ON_WRONG_INTERFACE,
    DATASTORE_LATENCY,
    KERNEL_DROP,
    DESTINATION_UNRESPONSIVE,
    POD_ROUTE_MISSING,
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

/// Operator-tunable thresholds of the rules.
#[derive(Debug, Clone)]
pub struct Rules {
    /// A request with no reply after this long is `no_reply`.
    pub no_reply_after_ns: u64,
    /// Destination ports of Calico's datastore: etcd, the apiserver (and its Service), Typha.
    pub datastore_ports: Vec<u16>,
    /// A median exchange slower than this is `slow_response`.
    pub slow_ns: u64,
    /// calico-node's liveness budget (initialDelaySeconds + failureThreshold x periodSeconds).
    pub liveness_budget_ns: Option<u64>,
    /// felix's InterfacePrefix list: interfaces named so are pods' veths, never host networks.
    pub workload_prefixes: Vec<String>,
}

impl Rules {
    /// A pod's host-side veth, by felix's InterfacePrefix list.
    pub fn is_workload_iface(&self, name: &str) -> bool {
        self.workload_prefixes
            .iter()
            .any(|p| !p.is_empty() && name.starts_with(p.as_str()))
    }
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            no_reply_after_ns: 3_000_000_000,
            // 443 is left out: it is every HTTPS service. The apiserver Service (10.96.0.1:443)
            // is still covered, as its DNAT target is 6443.
            datastore_ports: vec![2379, 6443, 5473],
            slow_ns: 100_000_000,
            liveness_budget_ns: None,
            workload_prefixes: vec!["cali".into()],
        }
    }
}

/// What the rules need besides the flow.
pub struct Context<'a> {
    pub pools: &'a Pools,
    pub facts: &'a NodeFacts,
    pub now_ns: u64,
    pub rules: &'a Rules,
    /// Names of the kernel's drop reasons (from tracefs).
    pub reasons: &'a DropReasons,
    /// Kernel symbols, to name where a drop happened.
    pub symbols: &'a Symbols,
    /// Lost records and how far the reader has got.
    pub gaps: &'a Gaps,
}

impl Context<'_> {
    /// The latest time the evidence covers: now, unless the reader has not yet read what the
    /// kernel wrote since (then a reply may be waiting in the ring).
    pub fn evidence_now_ns(&self) -> u64 {
        self.gaps
            .drained_ns()
            .map_or(self.now_ns, |d| d.min(self.now_ns))
    }
}

/// Why felix skipped masquerade on purpose: not a fault, so not a diagnosis.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SnatExclusion {
    /// The felix setting that did it, e.g. `NATOutgoingExclusions=IPPoolsAndHostIPs`.
    pub setting: String,
    pub summary: String,
    pub evidence: Value,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Judgement {
    pub verdicts: Vec<&'static str>,
    pub diagnosis: Option<Diagnosis>,
    /// Set with the `snat_excluded` verdict.
    pub snat_excluded: Option<SnatExclusion>,
    /// Records lost (ring buffer full) while the flow ran, if any.
    pub lost_records: u64,
}

pub fn judge(flow: &Flow, cx: &Context<'_>) -> Judgement {
    let mut verdicts = Vec::new();
    let nat_src = flow.nat.filter(|n| n.src != flow.src);
    if nat_src.is_some() {
        verdicts.push(SNAT_APPLIED);
    }
    let unmasqueraded = snat_skipped(flow, cx);
    let (skipped, snat_excluded) = match unmasqueraded {
        Some(Skipped {
            deliberate: Deliberate::Yes(x),
            ..
        }) => (None, Some(x)),
        other => (other, None),
    };
    if snat_excluded.is_some() {
        verdicts.push(SNAT_EXCLUDED);
    }
    if skipped.is_some() {
        verdicts.push(SNAT_SKIPPED);
    }
    if flow.encapsulated() {
        verdicts.push(ENCAPSULATED);
    }
    let seen_until = cx.evidence_now_ns();
    let unanswered = flow.first_reply_ns().is_none()
        && flow.expects_reply
        && seen_until.saturating_sub(flow.first_ns) >= cx.rules.no_reply_after_ns;
    // The flow's records, and a reply owed within the timeout, fall in this span.
    let reply_due = flow
        .first_ns
        .saturating_add(cx.rules.no_reply_after_ns)
        .min(seen_until);
    let lost_records = cx
        .gaps
        .lost_between(flow.first_ns, flow.last_ns.max(reply_due));
    // A reply may be among the lost records: missing evidence is said, never turned into
    // "no reply" and the diagnoses that build on it.
    let no_reply = unanswered && lost_records == 0;
    if flow.first_reply_ns().is_some() {
        verdicts.push(REPLIED);
    } else if no_reply {
        verdicts.push(NO_REPLY);
    }
    if lost_records > 0 {
        verdicts.push(EVIDENCE_INCOMPLETE);
    }
    let drops = significant_drops(flow, cx);
    if !drops.is_empty() {
        verdicts.push(DROPPED);
    }
    // Both address rules judge only unanswered flows (past the no_reply timeout): an odd setup
    // that works is not a fault.
    let wrong_src = no_reply.then(|| wrong_source(flow, cx)).flatten();
    if wrong_src.is_some() {
        verdicts.push(WRONG_SOURCE_ADDRESS);
    }
    let wrong_parent = no_reply.then(|| wrong_parent(flow, cx)).flatten();
    if wrong_parent.is_some() {
        verdicts.push(WRONG_PARENT_DEVICE);
    }
    let slow = slow_exchanges(flow, cx);
    if slow.is_some() {
        verdicts.push(SLOW_RESPONSE);
    }

    // The most specific explanation wins: a misconfiguration names the fix, a drop names the
    // kernel's reason, an unanswered request only says where it was last seen.
    let diagnosis = skipped
        .and_then(|s| snat_diagnosis(flow, cx, &s, no_reply))
        .or_else(|| wrong_src.map(|w| wrong_source_diagnosis(flow, cx, &w)))
        .or_else(|| wrong_parent.map(|w| wrong_parent_diagnosis(flow, cx, &w)))
        .or_else(|| (!drops.is_empty()).then(|| kernel_drop(flow, cx, &drops)))
        .or_else(|| slow.map(|s| slow_diagnosis(flow, cx, &s)))
        .or_else(|| no_reply.then(|| off_link_peer(flow, cx)).flatten())
        .or_else(|| {
            (lost_records == 0)
                .then(|| unacked_off_link_peer(flow, cx))
                .flatten()
        })
        .or_else(|| no_reply.then(|| pod_route_missing(flow, cx)).flatten())
        .or_else(|| no_reply.then(|| unanswered_diagnosis(flow, cx)));
    // An unanswered flow felix left un-masqueraded on purpose: the destination must route the
    // pod address back, which is worth saying next to whatever else went wrong.
    let diagnosis = diagnosis.map(|mut d| {
        if let (Some(x), Some(ev)) = (&snat_excluded, d.evidence.as_object_mut()) {
            ev.insert("snat_excluded".into(), json!(x));
        }
        d
    });
    Judgement {
        verdicts,
        diagnosis,
        snat_excluded,
        lost_records,
    }
}

/// Where a pod-sourced packet left a host NIC without masquerade.
struct Skipped<'a> {
    hop: HopView<'a>,
    src_pool: Cidr,
    dst_pool: Option<Cidr>,
    /// The host subnet (and its interface) that also contains the destination.
    host_subnet: Option<(Cidr, String)>,
    /// Whether felix's own configuration skips masquerade here.
    deliberate: Deliberate,
}

enum Deliberate {
    No,
    Yes(SnatExclusion),
    /// felix's rule excludes something the agent could not read (why): no confident diagnosis.
    Unknown(String),
}

fn snat_skipped<'a>(flow: &'a Flow, cx: &Context<'_>) -> Option<Skipped<'a>> {
    let src_pool = cx.pools.pool_of(flow.src)?;
    // The node's own address inside a pool (seed 002: the host network overlaps it) is host
    // traffic, which felix never masquerades; only pods' is in question.
    if cx.facts.iface_holding(flow.src).is_some() {
        return None;
    }
    flow.path().find_map(|hop| {
        let leaving_host = hop.side == Side::Forward
            && hop.dir == Dir::Egress
            && hop.role == Some(Role::Host)
            && hop.encap.is_none()
            && hop.src == flow.src;
        if !leaving_host {
            return None;
        }
        let host_subnet = host_subnet_of(cx, hop.dst);
        // felix up to v3.32.0 puts LoadBalancer-only pools in all-ipam-pools: their addresses
        // are never masqueraded, whether or not a host subnet holds them.
        if let Some(lb) = cx.pools.lb_only_pool_of(hop.dst) {
            let deliberate = Deliberate::Yes(lb_only_exclusion(flow, &hop, lb));
            return Some(Skipped {
                hop,
                src_pool,
                dst_pool: Some(lb),
                host_subnet,
                deliberate,
            });
        }
        let dst_pool = cx.pools.pool_of(hop.dst);
        // A pool destination outside every host subnet is a pod routed without encapsulation:
        // no SNAT is the right thing there.
        if dst_pool.is_some() && host_subnet.is_none() {
            return None;
        }
        let deliberate = rule_exclusion(flow, cx, &hop);
        Some(Skipped {
            hop,
            src_pool,
            dst_pool,
            host_subnet,
            deliberate,
        })
    })
}

/// felix's natOutgoing rule, as read from the node, leaves this packet alone on purpose. An
/// unread rule excludes nothing that can be shown: the pool rules decide as before.
fn rule_exclusion(flow: &Flow, cx: &Context<'_>, hop: &HopView<'_>) -> Deliberate {
    let Some(rule) = cx.pools.nat_outgoing_for(hop.dst) else {
        return Deliberate::No;
    };
    let iface: &str = &hop.iface.name;
    if let Some(filter) = rule
        .out_iface
        .as_deref()
        .filter(|_| !rule.matches_iface(iface))
    {
        let not = if rule.out_iface_negated { "not " } else { "" };
        return Deliberate::Yes(SnatExclusion {
            setting: format!("IptablesNATOutgoingInterfaceFilter={filter}"),
            summary: format!(
                "Pod {} left {iface} un-masqueraded on purpose: felix's natOutgoing rule only                  masquerades traffic leaving {not}{filter} (IptablesNATOutgoingInterfaceFilter).",
                flow.src
            ),
            evidence: json!({
                "rule_chain": crate::calico::NAT_OUTGOING_CHAIN,
                "out_iface_filter": filter,
                "out_iface_negated": rule.out_iface_negated,
                "left_node_unmasqueraded": leaving_json(flow, hop),
            }),
        });
    }
    if rule.excludes_host_ips {
        let Some(nets) = cx.pools.host_nets_for(hop.dst) else {
            return Deliberate::Unknown(
                "felix's rule excludes host IPs but its all-hosts-net ipset could not be read"
                    .into(),
            );
        };
        if let Some(net) = nets.iter().find(|c| c.contains(hop.dst)) {
            let set = if hop.dst.is_ipv4() {
                crate::calico::ALL_HOSTS_SET_V4
            } else {
                crate::calico::ALL_HOSTS_SET_V6
            };
            return Deliberate::Yes(SnatExclusion {
                setting: "NATOutgoingExclusions=IPPoolsAndHostIPs".into(),
                summary: format!(
                    "Pod {} reached node address {} un-masqueraded on purpose: felix's natOutgoing                      rule skips destinations in {set} (NATOutgoingExclusions=IPPoolsAndHostIPs),                      so that host must route the pod address back.",
                    flow.src, hop.dst
                ),
                evidence: json!({
                    "rule_chain": crate::calico::NAT_OUTGOING_CHAIN,
                    "ipset": set,
                    "host_net": net.to_string(),
                    "left_node_unmasqueraded": leaving_json(flow, hop),
                }),
            });
        }
    }
    Deliberate::No
}

fn lb_only_exclusion(flow: &Flow, hop: &HopView<'_>, pool: Cidr) -> SnatExclusion {
    SnatExclusion {
        setting: "IPPool allowedUses=[LoadBalancer]".into(),
        summary: format!(
            "Pod {} reached {} un-masqueraded on purpose: it is in the LoadBalancer-only pool {pool},              which felix up to v3.32.0 keeps in all-ipam-pools, whose destinations its natOutgoing              rule skips (v3.32.1 masquerades them).",
            flow.src, hop.dst
        ),
        evidence: json!({
            "rule_chain": crate::calico::NAT_OUTGOING_CHAIN,
            "lb_only_pool": pool.to_string(),
            "left_node_unmasqueraded": leaving_json(flow, hop),
        }),
    }
}

fn leaving_json(flow: &Flow, hop: &HopView<'_>) -> Value {
    json!({
        "iface": hop.iface,
        "dir": "egress",
        "src": hop.src.to_string(),
        "sport": hop.sport,
        "dst": hop.dst.to_string(),
        "dport": hop.dport,
        "proto": proto_name(flow.proto),
    })
}

fn host_subnet_of(cx: &Context<'_>, ip: IpAddr) -> Option<(Cidr, String)> {
    cx.facts
        .connected_subnets()
        .filter(|(c, l)| c.contains(ip) && !cx.rules.is_workload_iface(&l.name))
        .max_by_key(|(c, _)| c.prefix())
        .map(|(c, l)| (c, l.name.clone()))
}

fn snat_diagnosis(
    flow: &Flow,
    cx: &Context<'_>,
    s: &Skipped<'_>,
    no_reply: bool,
) -> Option<Diagnosis> {
    match &s.deliberate {
        Deliberate::No => {}
        Deliberate::Unknown(why) => {
            tracing::debug!(flow = flow.id, why, "un-masqueraded flow not diagnosed");
            return None;
        }
        Deliberate::Yes(_) => return None,
    }
    let leaving = leaving_json(flow, &s.hop);
    let rule = cx.pools.nat_outgoing_for(s.hop.dst);
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
            fix: pool_migration_fix(&pool, subnet),
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
                "nat_outgoing_rule": rule,
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
            "nat_outgoing_rule": rule,
            "reply": reply,
        }),
        fix: "Check `iptables -t nat -S cali-nat-outgoing` and the ipsets it names \
              (`ipset list cali40masq-ipam-pools`); restart calico-node if felix's rules are missing."
            .to_string(),
    })
}

fn reply_evidence(flow: &Flow, cx: &Context<'_>) -> Value {
    match flow.first_reply_ns() {
        Some(t) => json!({"replied": true, "after_ms": ms(t.saturating_sub(flow.first_ns))}),
        None => json!({
            "replied": false,
            "waited_ms": ms(cx.now_ns.saturating_sub(flow.first_ns)),
            "retransmits": flow.retransmits(),
        }),
    }
}

/// A pod destination this node has no route for: it falls to the default route, so the IPAM
/// block's route (from BGP, or felix for VXLAN) is missing.
fn pod_route_missing(flow: &Flow, cx: &Context<'_>) -> Option<Diagnosis> {
    let dst = flow.nat.map(|n| n.dst).unwrap_or(flow.dst);
    let pool = cx.pools.pool_of(dst)?;
    // LoadBalancer addresses have no IPAM block routes.
    if cx.pools.lb_only_pool_of(dst).is_some() {
        return None;
    }
    let route = cx.facts.route_to(dst)?;
    if route.dst.prefix() != 0 || route.blackhole {
        return None;
    }
    let dev = route.oif.map(|i| cx.facts.name_of(i));
    Some(Diagnosis {
        cause: POD_ROUTE_MISSING,
        summary: format!(
            "{dst} is a pod address (pool {pool}) but this node has no route for its IPAM block: the kernel sent the request to the default route{}{} and no reply came. Calico installs block routes from BGP (BIRD) or, for VXLAN, from felix; without them pods on other nodes are unreachable.",
            route.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
            dev.as_deref().map(|d| format!(" on {d}")).unwrap_or_default(),
        ),
        evidence: json!({
            "destination": dst.to_string(),
            "pool": pool.to_string(),
            "route_used": {"dst": route.dst.to_string(), "via": route.gateway.map(|g| g.to_string()), "dev": dev},
        }),
        fix: "Check `calicoctl node status` on both nodes: BGP with the destination's node must be Established (if not, look for a BGP diagnosis: a node address on the wrong interface is the usual cause). With VXLAN, check felix is running and `ip route | grep vxlan.calico` lists the block."
            .into(),
    })
}

fn unanswered_diagnosis(flow: &Flow, cx: &Context<'_>) -> Diagnosis {
    let last_fwd = flow.path().rev().find(|h| h.side == Side::Forward);
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
            ms(cx.rules.no_reply_after_ns),
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

/// A packet left a host interface with a source address that lives on another interface.
struct WrongSource {
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

fn wrong_source(flow: &Flow, cx: &Context<'_>) -> Option<WrongSource> {
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

fn service_name(port: u16) -> &'static str {
    match port {
        179 => " (BGP)",
        4789 => " (VXLAN)",
        2379 => " (etcd)",
        6443 => " (apiserver)",
        5473 => " (Typha)",
        _ => "",
    }
}

fn autodetect_fix(good_iface: &str, peer: Option<IpAddr>) -> String {
    let can_reach = peer
        .map(|p| format!(", or `can-reach={p}`"))
        .unwrap_or_default();
    format!(
        "Pin calico-node's node address autodetection to the interface that reaches the other nodes. Manifest installs: set IP_AUTODETECTION_METHOD=interface=^{good_iface}$ on the calico-node DaemonSet (the value is a regular expression: anchor it, or it also matches longer names){can_reach}; `skip-interface=<regex>` (exclude the wrong NIC), `cidr=<the nodes' subnet>` and `kubernetes-internal-ip` (the Node's InternalIP) work too. Operator installs (tigera-operator reverts edits to the DaemonSet): set `spec.calicoNetwork.nodeAddressAutodetectionV4` in the Installation, e.g. `{{interface: \"^{good_iface}$\"}}` (or canReach, skipInterface, cidrs, kubernetes: NodeInternalIP). An `IP=<address>` env on calico-node bypasses autodetection altogether: correct or remove it. Then restart calico-node on the node and check that `calicoctl get node <name> -o yaml` (spec.bgp.ipv4Address), or the projectcalico.org/IPv4Address annotation, shows the {good_iface} address."
    )
}

/// How to get rid of a pool that overlaps a host network: an IPPool's CIDR cannot be edited.
fn pool_migration_fix(pool: &Cidr, subnet: &Cidr) -> String {
    format!(
        "An IPPool's cidr cannot be changed (libcalico-go refuses the update): migrate the pods to a new pool. 1) Create an IPPool whose cidr overlaps no host network (not {subnet}), with the same natOutgoing, encapsulation and blockSize as {pool}. 2) Disable the old one: `calicoctl patch ippool <name of {pool}> -p '{{\"spec\":{{\"disabled\":true}}}}'` (`calicoctl get ippools -o wide` names it). 3) Recreate the pods that have {pool} addresses (e.g. `kubectl rollout restart` their workloads): they get addresses from the new pool. 4) Delete the old pool. On operator installs (tigera-operator) the operator owns the pools and reconciles them back to `Installation.spec.calicoNetwork.ipPools`: make the change there (add the new pool, set `disabled` on the old one, then remove it) instead of editing IPPools. For new clusters, pick a pod CIDR outside every host network (CALICO_IPV4POOL_CIDR, or the Installation's ipPools)."
    )
}

fn wrong_source_diagnosis(flow: &Flow, _cx: &Context<'_>, w: &WrongSource) -> Diagnosis {
    let what = if w.outer { "Its tunnel packets" } else { "It" };
    let port = if w.outer { 4789 } else { flow.dport };
    Diagnosis {
        cause: NODE_ADDRESS_ON_WRONG_INTERFACE,
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
        evidence: json!({
            "egress_iface": w.hop_iface,
            "egress_subnets": w.egress_subnets.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "source": w.src.to_string(),
            "source_iface": w.owner,
            "source_subnet": w.owner_subnet.to_string(),
            "destination": w.dst.to_string(),
            "dport": port,
            "tunnel_outer_header": w.outer,
            "retransmits": flow.retransmits(),
        }),
        fix: autodetect_fix(&w.hop_iface, Some(w.dst)),
    }
}

/// The VXLAN device hangs off an interface that does not lead to the peers.
struct WrongParent {
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

fn wrong_parent(flow: &Flow, cx: &Context<'_>) -> Option<WrongParent> {
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

fn wrong_parent_diagnosis(flow: &Flow, _cx: &Context<'_>, w: &WrongParent) -> Diagnosis {
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
        cause: NODE_ADDRESS_ON_WRONG_INTERFACE,
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
        evidence: json!({
            "tunnel_device": w.vxlan,
            "parent_device": w.parent,
            "parent_kind": w.parent_kind,
            "parent_addresses": w.parent_addrs,
            "vtep_local": w.local.map(|l| l.to_string()),
            "peer_vtep": w.peer.map(|p| p.to_string()),
            "route_to_peers_via": w.route_iface,
            "outer_packets_left": w.outer_seen_on,
        }),
        fix: autodetect_fix(&good, w.peer),
    }
}

/// Exchanges with the datastore that are slow.
struct Slow {
    count: u64,
    p50_us: u32,
    p90_us: u32,
    max_ns: u64,
    total_wait_ns: u64,
}

fn slow_exchanges(flow: &Flow, cx: &Context<'_>) -> Option<Slow> {
    let port = flow.nat.map(|n| n.dport).unwrap_or(flow.dport);
    if !cx.rules.datastore_ports.contains(&port) && !cx.rules.datastore_ports.contains(&flow.dport)
    {
        return None;
    }
    let e = &flow.exchanges;
    let p50 = e.quantile_us(0.5)?;
    if u64::from(p50) * 1000 < cx.rules.slow_ns {
        return None;
    }
    Some(Slow {
        count: u64::from(e.count),
        p50_us: p50,
        p90_us: e.quantile_us(0.9).unwrap_or(p50),
        max_ns: e.max_ns(),
        total_wait_ns: e.total_wait_ns,
    })
}

fn slow_diagnosis(flow: &Flow, cx: &Context<'_>, s: &Slow) -> Diagnosis {
    let dst = flow
        .nat
        .map(|n| (n.dst, n.dport))
        .unwrap_or((flow.dst, flow.dport));
    let p50_ms = f64::from(s.p50_us) / 1000.0;
    let budget = cx.rules.liveness_budget_ns.map(|b| {
        let reads = (b as f64 / 1e6 / p50_ms).floor() as u64;
        json!({
            "liveness_budget_s": b as f64 / 1e9,
            "sequential_reads_that_fit": reads,
        })
    });
    let budget_text = match cx.rules.liveness_budget_ns {
        Some(b) => format!(
            " Within calico-node's liveness budget of {:.0} s only about {} such reads fit; a startup that reads every node's keys needs more as the cluster grows, so the probe kills calico-node before it is ready.",
            b as f64 / 1e9,
            (b as f64 / 1e6 / p50_ms).floor()
        ),
        None => " Startup reads the datastore sequentially (every node's keys), so its duration grows with cluster size times this latency; if it outgrows calico-node's liveness probe, the pod is killed while still starting."
            .into(),
    };
    Diagnosis {
        cause: DATASTORE_LATENCY,
        summary: format!(
            "{} request/response exchanges with the datastore {}:{}{} took a median {:.0} ms (p90 {:.0} ms, max {:.0} ms), {:.1} s of waiting in total.{budget_text}",
            s.count,
            dst.0,
            dst.1,
            service_name(dst.1),
            p50_ms,
            f64::from(s.p90_us) / 1000.0,
            s.max_ns as f64 / 1e6,
            s.total_wait_ns as f64 / 1e9,
        ),
        evidence: json!({
            "datastore": format!("{}:{}", dst.0, dst.1),
            "exchanges": s.count,
            "p50_ms": p50_ms,
            "p90_ms": f64::from(s.p90_us) / 1000.0,
            "max_ms": s.max_ns as f64 / 1e6,
            "total_wait_ms": s.total_wait_ns / 1_000_000,
            "handshake_ms": flow.handshake_ns().map(|n| n as f64 / 1e6),
            "budget": budget,
        }),
        fix: "Give calico-node time to start: raise its livenessProbe initialDelaySeconds and/or failureThreshold (e.g. 60 s and 10). Better, cut the latency: run the datastore (etcd) close to the nodes, or use the Kubernetes datastore with Typha so nodes do not each read a far etcd."
            .into(),
    }
}

/// An unanswered tunnel or BGP peer that this node can only reach through a gateway, while its
/// other peers share the node's underlay subnet.
fn off_link_peer(flow: &Flow, cx: &Context<'_>) -> Option<Diagnosis> {
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
        cause: NODE_ADDRESS_ON_WRONG_INTERFACE,
        summary: format!(
            "The peer node's address {peer}{} is not on this node's underlay {} ({}): it is reached only through the gateway {}, and nothing came back. The peer most likely autodetected its node address on the wrong interface (a container bridge or a second NIC) and advertised it.",
            service_name(port),
            join(&off.underlay),
            off.dev,
            off.gateway,
        ),
        evidence: json!({
            "peer_address": peer.to_string(),
            "dport": port,
            "left_via": iface,
            "route": off.route_json(),
            "underlay_subnets": off.underlay.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
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
    fn route_json(&self) -> Value {
        json!({"dst": self.route_dst.to_string(), "via": self.gateway.to_string(), "dev": self.dev})
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
/// never dials, so [`off_link_peer`] has nothing to judge.
fn unacked_off_link_peer(flow: &Flow, cx: &Context<'_>) -> Option<Diagnosis> {
    const ACK: u8 = 0x10;
    if flow.dport != 179 || !flow.tcp.syn || !flow.tcp.syn_ack || flow.tcp.rst || flow.tcp.fin {
        return None;
    }
    let answered = flow.first_reply_ns()?;
    if cx.evidence_now_ns().saturating_sub(answered) < cx.rules.no_reply_after_ns {
        return None;
    }
    // Any ACK from the peer means the handshake completed (or at least the path back works).
    if flow
        .hops
        .iter()
        .any(|h| h.side == Side::Forward && h.tcp_flags_seen & ACK != 0)
    {
        return None;
    }
    let arrived = flow
        .path()
        .find(|h| h.side == Side::Forward && h.dir == Dir::Ingress && h.role == Some(Role::Host))?;
    let peer = arrived.src;
    let off = off_link(cx, peer)?;
    Some(Diagnosis {
        cause: NODE_ADDRESS_ON_WRONG_INTERFACE,
        summary: format!(
            "The peer at {peer} dials this node's BGP port on {}, but {peer} is not on this node's underlay {} ({}): the answer (SYN-ACK) goes through the gateway {} and the handshake never completes. The peer most likely autodetected its node address on the wrong interface (a container bridge or a second NIC) and uses it as its BGP source; this node is the mesh's passive side (confd renders `passive on` toward the greater address), so it never dials.",
            arrived.iface,
            join(&off.underlay),
            off.dev,
            off.gateway,
        ),
        evidence: json!({
            "peer_address": peer.to_string(),
            "dport": 179,
            "arrived_on": arrived.iface.to_string(),
            "retransmits": flow.retransmits(),
            "route": off.route_json(),
            "underlay_subnets": off.underlay.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        }),
        fix: off_link_fix(peer, &off.underlay),
    })
}

/// Faults visible in the node's configuration alone, before any traffic.
pub fn node_findings(cx: &Context<'_>) -> Vec<Diagnosis> {
    let mut out = Vec::new();
    // A LoadBalancer-only pool holds no pods: carving it from a host network is common and fine.
    for pool in cx
        .pools
        .all
        .iter()
        .filter(|p| !cx.pools.lb_only.contains(p))
    {
        for (subnet, link) in cx.facts.connected_subnets() {
            let tunnel_or_pod = link.vxlan.is_some()
                || crate::calico::TUNNEL_IFACES.contains(&link.name.as_str())
                || cx.rules.is_workload_iface(&link.name);
            if tunnel_or_pod || !pool.overlaps(&subnet) {
                continue;
            }
            out.push(Diagnosis {
                cause: IPPOOL_OVERLAPS_HOST_NETWORK,
                summary: format!(
                    "IP pool {pool} overlaps the host network {subnet} on {}: felix treats every address in it as a pod, so pod traffic to those hosts is not masqueraded and their replies go astray.",
                    link.name
                ),
                evidence: json!({"pool": pool.to_string(), "host_subnet": subnet.to_string(), "host_iface": link.name}),
                fix: pool_migration_fix(pool, &subnet),
            });
        }
    }
    for vx in cx.facts.links.values() {
        let Some(info) = &vx.vxlan else { continue };
        let Some(parent) = info.parent_index.and_then(|i| cx.facts.link(i)) else {
            continue;
        };
        if !parent.is_bridge() {
            continue;
        }
        // A host bridge carrying a physical NIC is a legitimate node interface; a bridge whose
        // ports are all virtual (docker0, nerdctl0, cni0) is a container network.
        let ports: Vec<&crate::netlink::Link> = cx
            .facts
            .links
            .values()
            .filter(|l| l.master == Some(parent.index))
            .collect();
        if ports.iter().any(|p| p.kind.is_none()) {
            continue;
        }
        let good = cx
            .facts
            .default_route_ifaces()
            .first()
            .map(|i| cx.facts.name_of(*i))
            .unwrap_or_else(|| "the node's NIC".into());
        out.push(Diagnosis {
            cause: NODE_ADDRESS_ON_WRONG_INTERFACE,
            summary: format!(
                "{}'s parent device is {}, a bridge with only virtual ports (a container network), with local address {}: tunnel traffic to the other nodes cannot leave this node.",
                vx.name,
                parent.name,
                info.local.map(|l| l.to_string()).unwrap_or_else(|| "-".into())
            ),
            evidence: json!({
                "tunnel_device": vx.name,
                "parent_device": parent.name,
                "parent_addresses": parent.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "bridge_ports": ports.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                "default_route_via": good,
            }),
            fix: autodetect_fix(&good, None),
        });
    }
    out
}

fn join(c: &[Cidr]) -> String {
    c.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Drops that lose a packet on its path. An ICMP echo reply that a raw socket (ping) already
/// took is also "dropped" by the ping-socket layer with NO_SOCKET: that copy does not count;
/// nor does a reply arriving after its socket closed.
fn significant_drops<'f>(flow: &'f Flow, cx: &Context<'_>) -> Vec<&'f DropRecord> {
    flow.drops()
        .iter()
        .filter(|d| {
            let no_socket = cx.reasons.name(d.reason) == "NO_SOCKET";
            // A reply reaching a socket its owner already closed (BGP speakers dialling each
            // other at once, a client that gave up) is not a lost request.
            !(no_socket && (flow.proto == 1 || flow.proto == 58 || d.side == Side::Reverse))
        })
        .collect()
}

fn kernel_drop(flow: &Flow, cx: &Context<'_>, significant: &[&DropRecord]) -> Diagnosis {
    let drops: Vec<Value> = significant
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
    let Some(first) = significant.first() else {
        return unanswered_diagnosis(flow, cx);
    };
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
        "NETFILTER_DROP" => "An iptables/nftables rule dropped it. With Calico's iptables dataplane that is usually a NetworkPolicy (felix's cali-pi-*/cali-po-* chains end in DROP): check `calicoctl get networkpolicy,globalnetworkpolicy -A` and `iptables-save -c | grep DROP` for the rule whose counter rises."
            .into(),
        "IP_RPFILTER" => "Reverse-path filtering: the source is not routed back through the interface it arrived on. Check rp_filter and asymmetric routes (a node address autodetected on the wrong interface produces exactly this)."
            .into(),
        "NO_SOCKET" => "Nothing listens on the destination port: check the pod/service is running and its targetPort."
            .into(),
        "IP_OUTNOROUTES" | "IP_INNOROUTES" => "No route to the destination: check `ip route get` for it and whether Calico programmed the route (BGP established? IPAM block affinity?)."
            .into(),
        "NEIGH_FAILED" | "NEIGH_QUEUEFULL" | "NEIGH_DEAD" | "NEIGH_CREATEFAIL" => "The next hop never answered ARP/ND: check the next hop is up and on the same L2 segment as the egress interface."
            .into(),
        "OTHERHOST" => "The frame was addressed to another host's MAC: check proxy ARP on the cali* interface and the pod's gateway (169.254.1.1)."
            .into(),
        r if r.starts_with("TCP_") => "A TCP-level drop (bad sequence, window, or state): usually a symptom of NAT or conntrack confusion or an asymmetric path; compare the path of both directions."
            .into(),
        _ => format!("Look up drop reason {reason} for this kernel (include/net/dropreason-core.h) and the function that dropped it."),
    }
}

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::{
        events::Packet,
        flows::FlowTable,
        net::IfAddr,
        netlink::Link,
        testutil::{ip, obs},
    };

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
            ..Pools::default()
        }
    }

    fn syn(src: &str, dst: &str, dport: u16) -> Packet {
        crate::testutil::tcp(src, 40000, dst, dport, 0x02, 99, 0)
    }

    fn lookup(i: u32) -> std::sync::Arc<crate::flows::Iface> {
        match i {
            2 => crate::flows::Iface::new("eth0", i, Some(Role::Host)),
            5 => crate::flows::Iface::new("calid92900560e3", i, Some(Role::Workload)),
            o => crate::flows::Iface::unnamed(o),
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
    static RULES: std::sync::LazyLock<Rules> = std::sync::LazyLock::new(Rules::default);
    static NO_GAPS: std::sync::LazyLock<Gaps> = std::sync::LazyLock::new(Gaps::default);

    fn cx<'a>(pools: &'a Pools, facts: &'a NodeFacts, now: u64) -> Context<'a> {
        Context {
            pools,
            facts,
            now_ns: now,
            rules: &RULES,
            reasons: &REASONS,
            symbols: &SYMBOLS,
            gaps: &NO_GAPS,
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

    fn with_rule(mut p: Pools, rule: crate::calico::NatOutgoing) -> Pools {
        p.nat_outgoing_v4 = Some(crate::calico::NatOutgoing { rules: 1, ..rule });
        p
    }

    /// Judges a pod SYN that left eth0 un-masqueraded, answered or not.
    fn unmasqueraded(p: &Pools, src: &str, dst: &str, reply: bool) -> Judgement {
        let f = facts();
        let s = syn(src, dst, 6443);
        let (t, id) = flow_of(s, s, reply);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        judge(flow, &cx(p, &f, 10_000_000_000))
    }

    #[test]
    fn host_ip_exclusion_is_deliberate() {
        let rule = crate::calico::NatOutgoing {
            pool_set: Some("cali40all-ipam-pools".into()),
            excludes_host_ips: true,
            ..Default::default()
        };
        let mut p = with_rule(pools(&["10.244.0.0/16"], &["10.244.0.0/16"]), rule);
        p.host_nets_v4 = Some(vec!["192.168.21.11/32"
            .parse::<Cidr>()
            .unwrap_or_else(|_| unreachable!())]);
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.11", true);
        assert_eq!(j.verdicts, vec![SNAT_EXCLUDED, REPLIED]);
        assert!(j.diagnosis.is_none(), "{j:?}");
        let x = j.snat_excluded.unwrap_or_else(|| unreachable!());
        assert_eq!(x.setting, "NATOutgoingExclusions=IPPoolsAndHostIPs");
        assert_eq!(x.evidence["host_net"], "192.168.21.11/32");
        // Unanswered: no SNAT cause; the missing reply is the destination's, with the note.
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.11", false);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, DESTINATION_UNRESPONSIVE);
        assert_eq!(
            d.evidence["snat_excluded"]["setting"],
            "NATOutgoingExclusions=IPPoolsAndHostIPs"
        );
        // A destination that is no node address is still felix's to masquerade.
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        assert_eq!(j.diagnosis.map(|d| d.cause), Some(MASQUERADE_NOT_APPLIED));
        // Excluded host IPs the agent could not read: no confident cause either way.
        p.host_nets_v4 = None;
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.11", false);
        assert!(j.verdicts.contains(&SNAT_SKIPPED), "{j:?}");
        assert_eq!(j.diagnosis.map(|d| d.cause), Some(DESTINATION_UNRESPONSIVE));
        // Seed 002 with the exclusion on: the pool overlap is no longer why this skipped.
        let rule = crate::calico::NatOutgoing {
            excludes_host_ips: true,
            ..Default::default()
        };
        let mut p = with_rule(pools(&["192.168.0.0/16"], &["192.168.0.0/16"]), rule);
        p.host_nets_v4 = Some(vec!["192.168.21.11/32"
            .parse::<Cidr>()
            .unwrap_or_else(|_| unreachable!())]);
        let j = unmasqueraded(&p, "192.168.236.10", "192.168.21.11", true);
        assert!(
            j.diagnosis.is_none() && j.verdicts.contains(&SNAT_EXCLUDED),
            "{j:?}"
        );
    }

    #[test]
    fn interface_filter_is_deliberate() {
        let rule = |iface: &str| crate::calico::NatOutgoing {
            out_iface: Some(iface.into()),
            ..Default::default()
        };
        let p = with_rule(pools(&["10.244.0.0/16"], &["10.244.0.0/16"]), rule("eth1"));
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        assert!(j.verdicts.contains(&SNAT_EXCLUDED) && !j.verdicts.contains(&SNAT_SKIPPED));
        assert_ne!(
            j.diagnosis.as_ref().map(|d| d.cause),
            Some(MASQUERADE_NOT_APPLIED)
        );
        let x = j.snat_excluded.unwrap_or_else(|| unreachable!());
        assert_eq!(x.setting, "IptablesNATOutgoingInterfaceFilter=eth1");
        assert_eq!(x.evidence["left_node_unmasqueraded"]["iface"], "eth0");
        // Even with natOutgoing off, turning it on would not masquerade traffic leaving eth0.
        let p = with_rule(pools(&["10.244.0.0/16"], &[]), rule("eth1"));
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        assert_ne!(j.diagnosis.map(|d| d.cause), Some(NAT_OUTGOING_DISABLED));
        // The filter matches eth0 (iptables' `+` wildcard): the rule should have applied.
        let p = with_rule(pools(&["10.244.0.0/16"], &["10.244.0.0/16"]), rule("eth+"));
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        assert_eq!(j.diagnosis.map(|d| d.cause), Some(MASQUERADE_NOT_APPLIED));
        // An empty chain (no pool has natOutgoing) is still natOutgoing disabled.
        let p = with_rule(pools(&["10.244.0.0/16"], &[]), Default::default());
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        assert_eq!(j.diagnosis.map(|d| d.cause), Some(NAT_OUTGOING_DISABLED));
    }

    #[test]
    fn loadbalancer_only_pool_is_deliberate() {
        let f = facts();
        let mut p = pools(&["10.244.0.0/16", "192.168.21.192/27"], &["10.244.0.0/16"]);
        // Without knowing it is LoadBalancer-only, it looks like seed 002.
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.200", true);
        assert_eq!(
            j.diagnosis.map(|d| d.cause),
            Some(IPPOOL_OVERLAPS_HOST_NETWORK)
        );
        assert_eq!(node_findings(&cx(&p, &f, 0)).len(), 1);
        p.lb_only = vec!["192.168.21.192/27"
            .parse::<Cidr>()
            .unwrap_or_else(|_| unreachable!())];
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.200", true);
        assert_eq!(j.verdicts, vec![SNAT_EXCLUDED, REPLIED]);
        assert!(j.diagnosis.is_none(), "{j:?}");
        let x = j.snat_excluded.unwrap_or_else(|| unreachable!());
        assert_eq!(x.evidence["lb_only_pool"], "192.168.21.192/27");
        assert!(node_findings(&cx(&p, &f, 0)).is_empty());
        // Unanswered: not a pod without a route, nor a skipped SNAT.
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.200", false);
        assert_eq!(j.diagnosis.map(|d| d.cause), Some(DESTINATION_UNRESPONSIVE));
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

    /// A node on the 10.51.0.0/24 underlay (eth0), default route via 10.51.0.1, plus extras.
    fn underlay_node(node_ip: &str, extra: Vec<Link>) -> NodeFacts {
        let mut f = NodeFacts::default();
        let mut eth0 = Link {
            index: 2,
            name: "eth0".into(),
            kind: None,
            master: None,
            up: true,
            l3: false,
            vxlan: None,
            addrs: vec![IfAddr {
                ip: ip(node_ip),
                prefix: 24,
            }],
        };
        eth0.up = true;
        f.links.insert(2, eth0);
        f.links.insert(
            5,
            Link {
                index: 5,
                name: "calid92900560e3".into(),
                kind: Some("veth".into()),
                master: None,
                up: true,
                l3: false,
                vxlan: None,
                addrs: vec![],
            },
        );
        for l in extra {
            f.links.insert(l.index, l);
        }
        let cidr = |s: &str| {
            s.parse::<Cidr>()
                .unwrap_or_else(|_| Cidr::host(ip("0.0.0.0")))
        };
        f.routes.push(crate::netlink::Route {
            dst: cidr("0.0.0.0/0"),
            oif: Some(2),
            gateway: Some(ip("10.51.0.1")),
            pref_src: None,
            table: 254,
            blackhole: false,
        });
        f.routes.push(crate::netlink::Route {
            dst: cidr("10.51.0.0/24"),
            oif: Some(2),
            gateway: None,
            pref_src: None,
            table: 254,
            blackhole: false,
        });
        f
    }

    fn lookup2(i: u32) -> std::sync::Arc<crate::flows::Iface> {
        match i {
            2 => crate::flows::Iface::new("eth0", i, Some(Role::Host)),
            3 => crate::flows::Iface::new("eth1", i, Some(Role::Host)),
            5 => crate::flows::Iface::new("calid92900560e3", i, Some(Role::Workload)),
            7 => crate::flows::Iface::new("nerdctl0", i, Some(Role::Host)),
            8 => crate::flows::Iface::new("vxlan.calico", i, Some(Role::Tunnel)),
            o => crate::flows::Iface::unnamed(o),
        }
    }

    #[test]
    fn seed_004_bgp_from_second_nic_address() {
        let eth1 = Link {
            index: 3,
            name: "eth1".into(),
            kind: None,
            master: None,
            up: true,
            l3: false,
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
        assert_eq!(j.verdicts, vec![NO_REPLY, WRONG_SOURCE_ADDRESS]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, NODE_ADDRESS_ON_WRONG_INTERFACE);
        assert_eq!(d.evidence["source_iface"], "eth1");
        assert_eq!(d.evidence["egress_iface"], "eth0");
        assert_eq!(d.evidence["egress_subnets"][0], "10.51.0.0/24");
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
        assert_eq!(j.verdicts, vec![NO_REPLY]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, NODE_ADDRESS_ON_WRONG_INTERFACE);
        assert_eq!(d.evidence["route"]["via"], "10.51.0.1");

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
        assert_eq!(j.verdicts, vec![REPLIED]);
        assert!(j.diagnosis.is_none());
    }

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
        assert_eq!(j.verdicts, vec![REPLIED]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, NODE_ADDRESS_ON_WRONG_INTERFACE);
        assert_eq!(d.evidence["peer_address"], "10.66.0.66");
        assert_eq!(d.evidence["arrived_on"], "eth0");
        assert_eq!(d.evidence["route"]["via"], "10.51.0.1");
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

    fn vxlan_link(parent: u32, local: &str) -> Link {
        Link {
            index: 8,
            name: "vxlan.calico".into(),
            kind: Some("vxlan".into()),
            master: None,
            up: true,
            l3: false,
            vxlan: Some(crate::netlink::VxlanInfo {
                vni: Some(4096),
                parent_index: Some(parent),
                local: Some(ip(local)),
                port: Some(4789),
            }),
            addrs: vec![IfAddr {
                ip: ip("10.244.228.128"),
                prefix: 32,
            }],
        }
    }

    fn vxlan_flow(outer_iface: u32, outer_src: &str, outer_dst: &str) -> FlowTable {
        let mut t = FlowTable::new(10);
        let s = syn("10.244.228.139", "10.244.142.36", 8090);
        t.ingest(&obs(1, 5, Dir::Ingress, s), &lookup2);
        t.ingest(&obs(2, 8, Dir::Egress, s), &lookup2);
        let mut o = obs(3, outer_iface, Dir::Egress, syn(outer_src, outer_dst, 4789));
        o.outer.proto = 17;
        o.inner = Some((crate::events::Encap::Vxlan, 4096, s));
        t.ingest(&o, &lookup2);
        t
    }

    #[test]
    fn seed_003_vxlan_on_a_bridge() {
        let bridge = Link {
            index: 7,
            name: "nerdctl0".into(),
            kind: Some("bridge".into()),
            master: None,
            up: true,
            l3: false,
            vxlan: None,
            addrs: vec![IfAddr {
                ip: ip("10.4.0.1"),
                prefix: 24,
            }],
        };
        let f = underlay_node("10.51.0.101", vec![bridge, vxlan_link(7, "10.4.0.1")]);
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let t = vxlan_flow(7, "10.4.0.1", "10.51.0.100");
        let flow = t.iter_newest().next().unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(
            j.verdicts,
            vec![ENCAPSULATED, NO_REPLY, WRONG_PARENT_DEVICE]
        );
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, NODE_ADDRESS_ON_WRONG_INTERFACE);
        assert_eq!(d.evidence["parent_device"], "nerdctl0");
        assert_eq!(d.evidence["parent_kind"], "bridge");
        assert_eq!(d.evidence["route_to_peers_via"], "eth0");
        assert_eq!(d.evidence["outer_packets_left"][0], "nerdctl0");
        assert!(d.fix.contains("interface=^eth0$"));

        // The healthy node sending to that peer's advertised VTEP 10.4.0.1 sees it off-link.
        let f1 = underlay_node("10.51.0.100", vec![vxlan_link(2, "10.51.0.100")]);
        let t = vxlan_flow(2, "10.51.0.100", "10.4.0.1");
        let flow = t.iter_newest().next().unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f1, 10_000_000_000));
        assert_eq!(j.verdicts, vec![ENCAPSULATED, NO_REPLY]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(
            (d.cause, d.evidence["peer_address"].as_str()),
            (NODE_ADDRESS_ON_WRONG_INTERFACE, Some("10.4.0.1"))
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
        assert_eq!(j.verdicts, vec![ENCAPSULATED, REPLIED]);
        assert!(j.diagnosis.is_none());
    }

    #[test]
    fn seed_001_slow_datastore_exchanges() {
        let f = underlay_node("10.51.0.100", vec![]);
        let p = pools(&[], &[]);
        let run = |delay_ns: u64| {
            let mut t = FlowTable::new(10);
            let s = syn("10.51.0.100", "10.51.0.10", 2379);
            let id = t.ingest(&obs(0, 2, Dir::Egress, s), &lookup2).unwrap_or(0);
            let mut r = s;
            std::mem::swap(&mut r.src, &mut r.dst);
            std::mem::swap(&mut r.sport, &mut r.dport);
            r.tcp_flags = 0x12;
            t.ingest(&obs(1_000_000, 2, Dir::Ingress, r), &lookup2);
            let mut ts = 2_000_000;
            for i in 0..20u32 {
                let mut q = s;
                q.tcp_flags = 0x18;
                q.payload_len = 80;
                q.seq = 10 + i;
                t.ingest(&obs(ts, 2, Dir::Egress, q), &lookup2);
                ts += delay_ns;
                let mut a = r;
                a.tcp_flags = 0x18;
                a.payload_len = 400;
                a.seq = 100 + i;
                t.ingest(&obs(ts, 2, Dir::Ingress, a), &lookup2);
                ts += 1_000_000;
            }
            (t, id)
        };
        let (t, id) = run(150_000_000);
        let rules = Rules {
            liveness_budget_ns: Some(3_000_000_000),
            ..Rules::default()
        };
        let c = Context {
            rules: &rules,
            ..cx(&p, &f, 100_000_000_000)
        };
        let j = judge(t.get(id).unwrap_or_else(|| unreachable!()), &c);
        assert_eq!(j.verdicts, vec![REPLIED, SLOW_RESPONSE]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, DATASTORE_LATENCY);
        assert_eq!(d.evidence["exchanges"], 20);
        assert_eq!(d.evidence["p50_ms"], 150.0);
        assert_eq!(d.evidence["budget"]["sequential_reads_that_fit"], 20);
        assert!(d.fix.contains("initialDelaySeconds"));
        // A near datastore is healthy.
        let (t, id) = run(2_000_000);
        let j = judge(
            t.get(id).unwrap_or_else(|| unreachable!()),
            &cx(&p, &f, 100_000_000_000),
        );
        assert_eq!(j.verdicts, vec![REPLIED]);
        assert!(j.diagnosis.is_none());
    }

    #[test]
    fn node_findings_flag_container_bridge_parent_and_overlap_only() {
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let bridge = |idx: u32, name: &str| Link {
            index: idx,
            name: name.into(),
            kind: Some("bridge".into()),
            master: None,
            up: true,
            l3: false,
            vxlan: None,
            addrs: vec![IfAddr {
                ip: ip("10.4.0.1"),
                prefix: 24,
            }],
        };
        let port = |idx: u32, master: u32, kind: Option<&str>| Link {
            index: idx,
            name: format!("port{idx}"),
            kind: kind.map(String::from),
            master: Some(master),
            up: true,
            l3: false,
            vxlan: None,
            addrs: vec![],
        };
        // Container bridge (only veth ports) as the VXLAN parent: flagged.
        let f = underlay_node(
            "10.51.0.101",
            vec![
                bridge(7, "nerdctl0"),
                port(9, 7, Some("veth")),
                vxlan_link(7, "10.4.0.1"),
            ],
        );
        let found = node_findings(&cx(&p, &f, 0));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].evidence["parent_device"], "nerdctl0");
        // A host bridge with a physical NIC in it is a legitimate parent.
        let f = underlay_node(
            "10.51.0.101",
            vec![
                bridge(7, "br0"),
                port(9, 7, None),
                vxlan_link(7, "10.4.0.1"),
            ],
        );
        assert!(node_findings(&cx(&p, &f, 0)).is_empty());
        // Overlap of a pool with the host network.
        let f = underlay_node("10.51.0.101", vec![]);
        let p2 = pools(&["10.0.0.0/8"], &["10.0.0.0/8"]);
        let found = node_findings(&cx(&p2, &f, 0));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].cause, IPPOOL_OVERLAPS_HOST_NETWORK);
        assert!(node_findings(&cx(&p, &f, 0)).is_empty());
    }

    #[test]
    fn pod_block_without_route_is_named() {
        let f = underlay_node("10.51.0.100", vec![]);
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let mut t = FlowTable::new(10);
        let s = syn("10.244.142.36", "10.244.228.139", 8090);
        t.ingest(&obs(1, 5, Dir::Ingress, s), &lookup2);
        let id = t.ingest(&obs(2, 2, Dir::Egress, s), &lookup2).unwrap_or(0);
        let j = judge(
            t.get(id).unwrap_or_else(|| unreachable!()),
            &cx(&p, &f, 10_000_000_000),
        );
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, POD_ROUTE_MISSING);
        assert_eq!(d.evidence["route_used"]["via"], "10.51.0.1");
    }

    #[test]
    fn reply_to_a_closed_socket_is_not_a_drop_verdict() {
        let f = facts();
        let p = pools(&[], &[]);
        let s = syn("192.168.21.10", "192.168.21.11", 179);
        let (mut t, id) = flow_of(s, s, true);
        let mut r = s;
        std::mem::swap(&mut r.src, &mut r.dst);
        std::mem::swap(&mut r.sport, &mut r.dport);
        let mut d = obs(4_000, 2, Dir::Ingress, r);
        // NO_SOCKET is reason 3 on this kernel's table; name it for the test.
        d.drop = Some(crate::events::KernelDrop {
            reason: 12,
            location: 0,
        });
        t.ingest(&d, &lookup);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        // NETFILTER_DROP on the reply still counts...
        assert!(judge(flow, &cx(&p, &f, 10_000_000_000))
            .verdicts
            .contains(&DROPPED));
        // ...NO_SOCKET on the reply does not.
        let reasons =
            DropReasons::from_format("__print_symbolic(REC->reason, { 12, \"NO_SOCKET\" })");
        let c = Context {
            reasons: &reasons,
            ..cx(&p, &f, 10_000_000_000)
        };
        assert!(!judge(flow, &c).verdicts.contains(&DROPPED));
    }

    #[test]
    fn lost_records_are_never_turned_into_no_reply() {
        let f = facts();
        let p = pools(&[], &[]);
        let s = syn("10.1.0.5", "10.2.0.9", 443);
        let (t, id) = flow_of(s, s, false);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let now = 10_000_000_000;
        // Complete evidence: unanswered past the timeout.
        let j = judge(flow, &cx(&p, &f, now));
        assert_eq!(j.verdicts, vec![NO_REPLY]);
        assert!(j.diagnosis.is_some());
        // The ring overflowed while the reply was due: said, not diagnosed.
        let mut gaps = Gaps::default();
        gaps.look(500, 0);
        gaps.look(2_000_000_000, 7);
        let c = Context {
            gaps: &gaps,
            ..cx(&p, &f, now)
        };
        let j = judge(flow, &c);
        assert_eq!(j.verdicts, vec![EVIDENCE_INCOMPLETE]);
        assert_eq!(j.lost_records, 7);
        assert!(j.diagnosis.is_none());
        // A loss long after the reply was due does not matter.
        let mut later = Gaps::default();
        later.look(8_000_000_000, 0);
        later.look(9_000_000_000, 3);
        let c = Context {
            gaps: &later,
            ..cx(&p, &f, now)
        };
        assert_eq!(judge(flow, &c).verdicts, vec![NO_REPLY]);
        // A reader that has not read past the timeout yet: a reply may be waiting in the ring.
        let mut lagging = Gaps::default();
        lagging.look(1_000_000_000, 0);
        let c = Context {
            gaps: &lagging,
            ..cx(&p, &f, now)
        };
        let j = judge(flow, &c);
        assert!(j.verdicts.is_empty() && j.diagnosis.is_none(), "{j:?}");
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
            "masquerade_not_applied",
            "destination_unresponsive",
            "pod_route_missing",
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
