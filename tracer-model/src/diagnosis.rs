//! A diagnosis: why a flow (or the node) went wrong, what shows it, and what to change.
//!
//! Evidence is typed per cause. Its JSON is the agent's API and was first written as sorted
//! `serde_json` objects, so every struct here declares its fields in alphabetical order, and a
//! key that was absent is skipped, never `null`.
//!
//! Addresses are [`IpAddr`]s (they serialise as strings); prefixes (`10.244.0.0/16`) and
//! interface addresses (`10.4.0.1/24`) are strings, as this crate has no CIDR type.
use std::net::IpAddr;

use serde::{Deserialize, Serialize, Serializer};

use crate::startup::StartupProjection;
use crate::{Cause, Dir, Role, Side};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub cause: Cause,
    pub summary: String,
    pub evidence: Evidence,
    pub fix: String,
}

/// What shows a diagnosis, one shape per rule. Untagged: the JSON is the shape's fields alone.
///
/// Deserialising tries the variants in declaration order and takes the first whose required
/// keys are all present, so a shape whose keys contain another's comes before it
/// (`PoolOverlap` before `NodePoolOverlap`, everything with a `reply` before
/// `DestinationUnresponsive`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Evidence {
    /// `ippool_overlaps_host_network`, seen on a flow.
    PoolOverlap(PoolOverlap),
    /// `nat_outgoing_disabled`.
    NatOutgoingDisabled(NatOutgoingDisabled),
    /// `masquerade_not_applied`.
    MasqueradeNotApplied(MasqueradeNotApplied),
    /// `node_address_on_wrong_interface`: a packet left with another interface's address.
    WrongSource(WrongSource),
    /// `node_address_on_wrong_interface`: the VXLAN device's parent does not reach the peers.
    WrongParent(WrongParent),
    /// `node_address_on_wrong_interface`, from the node alone: the VXLAN parent is a container
    /// bridge.
    BridgeParent(BridgeParent),
    /// `datastore_latency`.
    DatastoreLatency(DatastoreLatency),
    /// `node_address_on_wrong_interface`: a peer dials in from an address off the underlay.
    UnackedOffLinkPeer(UnackedOffLinkPeer),
    /// `node_address_on_wrong_interface`: an unanswered peer off the underlay.
    OffLinkPeer(OffLinkPeer),
    /// `denied_by_policy` (before `KernelDrop`: its keys contain KernelDrop's).
    DeniedByPolicy(DeniedByPolicy),
    /// `kernel_drop`.
    KernelDrop(KernelDrop),
    /// `mtu_mismatch`.
    MtuMismatch(MtuMismatch),
    /// `snat_port_exhaustion`.
    SnatPortExhaustion(SnatPortExhaustion),
    /// `pod_route_missing`.
    PodRouteMissing(PodRouteMissing),
    /// `ippool_overlaps_host_network`, from the node alone.
    NodePoolOverlap(NodePoolOverlap),
    /// `destination_unresponsive`.
    DestinationUnresponsive(DestinationUnresponsive),
}

impl Evidence {
    /// Notes that felix left the flow un-masqueraded on purpose, next to another cause (the
    /// destination must then route the pod address back). The SNAT and node shapes never meet
    /// an exclusion: they are left alone.
    pub fn note_exclusion(&mut self, x: SnatExclusion) {
        let slot = match self {
            Evidence::WrongSource(e) => &mut e.snat_excluded,
            Evidence::WrongParent(e) => &mut e.snat_excluded,
            Evidence::DatastoreLatency(e) => &mut e.snat_excluded,
            Evidence::UnackedOffLinkPeer(e) => &mut e.snat_excluded,
            Evidence::OffLinkPeer(e) => &mut e.snat_excluded,
            Evidence::KernelDrop(e) => &mut e.snat_excluded,
            Evidence::DeniedByPolicy(e) => &mut e.snat_excluded,
            Evidence::MtuMismatch(e) => &mut e.snat_excluded,
            Evidence::SnatPortExhaustion(_) => return,
            Evidence::PodRouteMissing(e) => &mut e.snat_excluded,
            Evidence::DestinationUnresponsive(e) => &mut e.snat_excluded,
            Evidence::PoolOverlap(_)
            | Evidence::NatOutgoingDisabled(_)
            | Evidence::MasqueradeNotApplied(_)
            | Evidence::BridgeParent(_)
            | Evidence::NodePoolOverlap(_) => return,
        };
        *slot = Some(x);
    }
}

/// Why felix skipped masquerade on purpose: not a fault, so not a diagnosis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnatExclusion {
    /// The felix setting that did it, e.g. `NATOutgoingExclusions=IPPoolsAndHostIPs`.
    pub setting: String,
    pub summary: String,
    pub evidence: ExclusionEvidence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExclusionEvidence {
    /// `IptablesNATOutgoingInterfaceFilter`: the rule only masquerades traffic leaving some
    /// interfaces.
    InterfaceFilter {
        left_node_unmasqueraded: Leaving,
        out_iface_filter: String,
        out_iface_negated: bool,
        rule_chain: String,
    },
    /// `NATOutgoingExclusions=IPPoolsAndHostIPs`: the destination is a node address.
    HostIps {
        host_net: String,
        ipset: String,
        left_node_unmasqueraded: Leaving,
        rule_chain: String,
    },
    /// A LoadBalancer-only pool, which felix up to v3.32.0 never masquerades to.
    LbOnlyPool {
        lb_only_pool: String,
        left_node_unmasqueraded: Leaving,
        rule_chain: String,
    },
}

/// An exclusion noted in evidence was a `json!` copy, whose keys serialise sorted: `evidence`
/// first, where a flow's own `snat_excluded` has it last.
fn exclusion_sorted<S: Serializer>(x: &Option<SnatExclusion>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Sorted<'a> {
        evidence: &'a ExclusionEvidence,
        setting: &'a str,
        summary: &'a str,
    }
    x.as_ref()
        .map(|x| Sorted {
            evidence: &x.evidence,
            setting: &x.setting,
            summary: &x.summary,
        })
        .serialize(s)
}

/// A pod's packet as it left a host interface without masquerade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaving {
    pub dir: Dir,
    pub dport: u16,
    pub dst: IpAddr,
    pub iface: String,
    pub proto: String,
    pub sport: u16,
    pub src: IpAddr,
}

/// Whether the flow was answered, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Answered {
        after_ms: u64,
        /// Always true.
        replied: bool,
    },
    Unanswered {
        /// Always false.
        replied: bool,
        retransmits: u32,
        waited_ms: u64,
    },
}

impl Reply {
    pub fn answered(after_ms: u64) -> Reply {
        Reply::Answered {
            after_ms,
            replied: true,
        }
    }

    pub fn unanswered(waited_ms: u64, retransmits: u32) -> Reply {
        Reply::Unanswered {
            replied: false,
            retransmits,
            waited_ms,
        }
    }
}

/// felix's natOutgoing rule as read from its `cali-nat-outgoing` chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatOutgoingRule {
    pub excludes_host_ips: bool,
    pub out_iface: Option<String>,
    pub out_iface_negated: bool,
    pub pool_set: Option<String>,
    pub rules: u64,
}

/// A route of the node's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dev: Option<String>,
    pub dst: String,
    pub via: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolOverlap {
    pub host_iface: String,
    pub host_subnet: String,
    pub left_node_unmasqueraded: Leaving,
    pub masq_pools: Vec<String>,
    pub pod_pool: String,
    pub pool: String,
    pub pools_source: String,
    pub reply: Reply,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatOutgoingDisabled {
    pub left_node_unmasqueraded: Leaving,
    pub masq_pools: Vec<String>,
    pub nat_outgoing_rule: Option<NatOutgoingRule>,
    pub pod_pool: String,
    pub pools_source: String,
    pub reply: Reply,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasqueradeNotApplied {
    pub left_node_unmasqueraded: Leaving,
    pub nat_outgoing_rule: Option<NatOutgoingRule>,
    pub pod_pool: String,
    pub reply: Reply,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WrongSource {
    pub destination: IpAddr,
    pub dport: u16,
    pub egress_iface: String,
    pub egress_subnets: Vec<String>,
    pub retransmits: u32,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
    pub source: IpAddr,
    pub source_iface: String,
    pub source_subnet: String,
    /// Whether `source` is a tunnel packet's outer source.
    pub tunnel_outer_header: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WrongParent {
    /// Host interfaces the encapsulated packets left by.
    pub outer_packets_left: Vec<String>,
    pub parent_addresses: Vec<String>,
    pub parent_device: String,
    pub parent_kind: Option<String>,
    pub peer_vtep: Option<IpAddr>,
    pub route_to_peers_via: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
    pub tunnel_device: String,
    pub vtep_local: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeParent {
    pub bridge_ports: Vec<String>,
    pub default_route_via: String,
    pub parent_addresses: Vec<String>,
    pub parent_device: String,
    pub tunnel_device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatastoreLatency {
    pub budget: Option<LivenessBudget>,
    /// `address:port`.
    pub datastore: String,
    pub exchanges: u64,
    pub handshake_ms: Option<f64>,
    pub max_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
    /// calico-node's start-up projected from `p50_ms` and Calico's read patterns, against the
    /// probe budgets of the install kinds it may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<StartupProjection>,
    pub total_wait_ms: u64,
}

/// How many datastore reads of the median latency fit in calico-node's liveness budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LivenessBudget {
    pub liveness_budget_s: f64,
    pub sequential_reads_that_fit: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnackedOffLinkPeer {
    pub arrived_on: String,
    pub dport: u16,
    pub peer_address: IpAddr,
    pub retransmits: u32,
    pub route: Route,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
    pub underlay_subnets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffLinkPeer {
    pub dport: u16,
    pub left_via: String,
    pub peer_address: IpAddr,
    pub route: Route,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
    pub underlay_subnets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelDrop {
    pub drops: Vec<Drop>,
    /// For a `NETFILTER_DROP`: why no Calico policy could be named (said, never guessed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyLookup>,
    pub reply: Reply,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
}

/// A `NETFILTER_DROP` no felix rule could be named for, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyLookup {
    /// felix's DROP rules whose counters moved with the drop (`chain#position`), when several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
    pub missing: Vec<String>,
}

/// felix's packet-filter drops of the flow, and the policy rule whose counter moved with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeniedByPolicy {
    pub drops: Vec<Drop>,
    pub policy: PolicyHit,
    pub reply: Reply,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
}

/// How felix's rules decided the drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    /// A policy rule with `action: Deny`.
    Deny,
    /// felix's end-of-tier drop: no policy of the tier allowed (or passed) the packet.
    EndOfTier,
    /// felix's last rule of the endpoint chain: no policy applied and no profile allowed it.
    NoProfileMatched,
}

/// Which way the policy applies, from the pod's side (felix's `cali-tw-`/`cali-pi-` chains:
/// ingress; `cali-fw-`/`cali-po-`: egress).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyDirection {
    Ingress,
    Egress,
}

/// The felix rule that dropped the flow's packets, and the Calico policy it renders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyHit {
    pub action: PolicyAction,
    /// felix's chain holding the rule (`cali-pi-_...`, `cali-tw-cali...`).
    pub chain: String,
    /// The rule's position in its chain, from 1 (as `iptables -L --line-numbers`).
    pub chain_rule: u32,
    pub direction: PolicyDirection,
    /// `NetworkPolicy`, `GlobalNetworkPolicy` or `KubernetesNetworkPolicy` (`Deny` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// What could not be read (the policy's rule index, the datastore): said, never guessed.
    pub missing: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// How far the rule's packet counter moved in the interval holding the drop.
    pub packets: u64,
    /// The policies the packet went through without a verdict (`end_of_tier`), as
    /// `Kind namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// The denying rule as the policy states it (`Deny` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The rule's index in the policy's `ingress`/`egress` list, from 0 (`Deny` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

/// Packets the kernel dropped with one reason at one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drop {
    pub after_ms: u64,
    pub count: u32,
    /// The kernel function, `symbol+0xoffset`, when kallsyms is readable.
    pub function: Option<String>,
    pub iface: Option<String>,
    /// The kernel's name, e.g. `NETFILTER_DROP` (`REASON_<n>` when unknown).
    pub reason: String,
    pub reason_code: u32,
    pub side: Side,
}

/// Full-size segments that never got through while the flow's small packets did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MtuMismatch {
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" seen for the flow's addresses.
    pub icmp_too_big: Vec<TooBigSeen>,
    /// What was looked for and not seen (said, never guessed).
    pub missing: Vec<String>,
    /// The MTU of each interface on the flow's path on this node, read over netlink.
    pub mtus: Vec<IfaceMtu>,
    /// Packets of the flow the kernel dropped as too big (`PKT_TOO_BIG`).
    pub pkt_too_big_drops: u32,
    /// The stalled segment's IP packet: at least this many bytes (IP and TCP headers without
    /// options, plus its payload).
    pub segment_bytes: u32,
    /// How often the stalled segment was sent again, with no ACK past it.
    pub segment_retransmits: u32,
    /// Which way the stalled segment went.
    pub side: Side,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
    /// The tunnel on the path and the headroom its header needs (VXLAN 50, IPIP 20).
    pub tunnel: Option<TunnelHeadroom>,
}

/// A masqueraded connection the node's conntrack could not insert: the flow's request went
/// unanswered while `insert_failed` moved, its source NAT finding no free source port to the
/// destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnatPortExhaustion {
    /// How the node's conntrack counters moved while the flow was tried.
    pub conntrack: ConntrackMoved,
    pub destination: IpAddr,
    pub dport: u16,
    /// What could not be read (said, never guessed).
    pub missing: Vec<String>,
    /// felix's natOutgoing rule the flow's source matches, as read from the dataplane.
    pub nat_rule: Option<NatPorts>,
    pub reply: Reply,
}

/// The node's conntrack counters (`/proc/net/stat/nf_conntrack`, summed over CPUs) between two
/// readings around the flow, and the table's fill at the later one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackMoved {
    pub clash_resolve: u64,
    /// `nf_conntrack_count` at the later reading.
    pub count: u64,
    pub drop: u64,
    pub early_drop: u64,
    /// Milliseconds between the two readings.
    pub interval_ms: u64,
    /// Connections the kernel could not insert (a tuple clash after NAT).
    pub insert_failed: u64,
    /// `nf_conntrack_max`.
    pub max: u64,
    pub search_restart: u64,
}

/// The source port range of felix's natOutgoing rule (FelixConfiguration `natPortRange`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatPorts {
    /// `MASQUERADE` or `SNAT`.
    pub action: String,
    /// `--to-ports` (nftables: `to :`), e.g. `40000-40001`; none: the kernel's whole range.
    pub port_range: Option<String>,
    /// `--random-fully` (nftables: `fully-random`).
    pub random_fully: bool,
}

/// An interface's MTU, with why it is on the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfaceMtu {
    pub iface: String,
    pub mtu: u32,
    /// `workload` (the pod's veth, host side), `tunnel`, `host` (the tunnel's parent NIC or the
    /// NIC the flow left by).
    pub role: Role,
}

/// An ICMP error saying a packet was too big for the next hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TooBigSeen {
    pub after_ms: u64,
    /// The router (or node) that sent it.
    pub from: IpAddr,
    /// Where tracer saw it.
    pub iface: String,
    /// The next hop's MTU the message announced.
    pub path_mtu: u32,
    pub to: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelHeadroom {
    pub device: String,
    /// Bytes the tunnel header adds to each packet (VXLAN over IPv4 50, IPIP 20).
    pub overhead: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRouteMissing {
    pub destination: IpAddr,
    pub pool: String,
    pub route_used: Route,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodePoolOverlap {
    pub host_iface: String,
    pub host_subnet: String,
    pub pool: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationUnresponsive {
    pub last_forward_hop: Option<HopSeen>,
    pub reply: Reply,
    pub route: Option<Route>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "exclusion_sorted"
    )]
    pub snat_excluded: Option<SnatExclusion>,
}

/// Where a packet was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopSeen {
    pub dir: Dir,
    pub dst: IpAddr,
    pub iface: String,
    pub src: IpAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    fn leaving() -> Leaving {
        Leaving {
            dir: Dir::Egress,
            dport: 6443,
            dst: ip("192.168.21.11"),
            iface: "eth0".into(),
            proto: "tcp".into(),
            sport: 40000,
            src: ip("10.244.1.10"),
        }
    }

    fn route() -> Route {
        Route {
            dev: Some("eth0".into()),
            dst: "0.0.0.0/0".into(),
            via: Some(ip("10.51.0.1")),
        }
    }

    fn exclusion() -> SnatExclusion {
        SnatExclusion {
            setting: "NATOutgoingExclusions=IPPoolsAndHostIPs".into(),
            summary: "on purpose".into(),
            evidence: ExclusionEvidence::HostIps {
                host_net: "192.168.21.11/32".into(),
                ipset: "cali40all-hosts-net".into(),
                left_node_unmasqueraded: leaving(),
                rule_chain: "cali-nat-outgoing".into(),
            },
        }
    }

    /// One value of every shape, as the rules fill them.
    fn every_shape() -> Vec<Evidence> {
        let rule = NatOutgoingRule {
            excludes_host_ips: false,
            out_iface: Some("eth+".into()),
            out_iface_negated: false,
            pool_set: None,
            rules: 1,
        };
        vec![
            Evidence::PoolOverlap(PoolOverlap {
                host_iface: "eth0".into(),
                host_subnet: "192.168.21.0/24".into(),
                left_node_unmasqueraded: leaving(),
                masq_pools: vec!["192.168.0.0/16".into()],
                pod_pool: "192.168.0.0/16".into(),
                pool: "192.168.0.0/16".into(),
                pools_source: "ipset".into(),
                reply: Reply::unanswered(9999, 0),
            }),
            Evidence::NatOutgoingDisabled(NatOutgoingDisabled {
                left_node_unmasqueraded: leaving(),
                masq_pools: vec![],
                nat_outgoing_rule: None,
                pod_pool: "10.244.0.0/16".into(),
                pools_source: "ipset".into(),
                reply: Reply::unanswered(9999, 2),
            }),
            Evidence::MasqueradeNotApplied(MasqueradeNotApplied {
                left_node_unmasqueraded: leaving(),
                nat_outgoing_rule: Some(rule),
                pod_pool: "10.244.0.0/16".into(),
                reply: Reply::unanswered(9999, 0),
            }),
            Evidence::WrongSource(WrongSource {
                destination: ip("10.51.0.100"),
                dport: 179,
                egress_iface: "eth0".into(),
                egress_subnets: vec!["10.51.0.0/24".into()],
                retransmits: 3,
                snat_excluded: None,
                source: ip("10.0.0.66"),
                source_iface: "eth1".into(),
                source_subnet: "10.0.0.0/24".into(),
                tunnel_outer_header: false,
            }),
            Evidence::WrongParent(WrongParent {
                outer_packets_left: vec!["nerdctl0".into()],
                parent_addresses: vec!["10.4.0.1/24".into()],
                parent_device: "nerdctl0".into(),
                parent_kind: Some("bridge".into()),
                peer_vtep: None,
                route_to_peers_via: Some("eth0".into()),
                snat_excluded: None,
                tunnel_device: "vxlan.calico".into(),
                vtep_local: Some(ip("10.4.0.1")),
            }),
            Evidence::BridgeParent(BridgeParent {
                bridge_ports: vec!["veth1".into()],
                default_route_via: "eth0".into(),
                parent_addresses: vec!["10.4.0.1/24".into()],
                parent_device: "nerdctl0".into(),
                tunnel_device: "vxlan.calico".into(),
            }),
            Evidence::DatastoreLatency(DatastoreLatency {
                budget: Some(LivenessBudget {
                    liveness_budget_s: 3.0,
                    sequential_reads_that_fit: 20,
                }),
                datastore: "10.51.0.10:2379".into(),
                exchanges: 20,
                handshake_ms: None,
                max_ms: 150.0,
                p50_ms: 150.0,
                p90_ms: 150.0,
                snat_excluded: None,
                startup: None,
                total_wait_ms: 3000,
            }),
            Evidence::UnackedOffLinkPeer(UnackedOffLinkPeer {
                arrived_on: "eth0".into(),
                dport: 179,
                peer_address: ip("10.66.0.66"),
                retransmits: 0,
                route: route(),
                snat_excluded: None,
                underlay_subnets: vec!["10.51.0.0/24".into()],
            }),
            Evidence::OffLinkPeer(OffLinkPeer {
                dport: 4789,
                left_via: "eth0".into(),
                peer_address: ip("10.4.0.1"),
                route: route(),
                snat_excluded: None,
                underlay_subnets: vec!["10.51.0.0/24".into()],
            }),
            Evidence::KernelDrop(KernelDrop {
                drops: vec![Drop {
                    after_ms: 0,
                    count: 1,
                    function: None,
                    iface: Some("eth0".into()),
                    reason: "NETFILTER_DROP".into(),
                    reason_code: 12,
                    side: Side::Reverse,
                }],
                policy: None,
                reply: Reply::answered(1),
                snat_excluded: None,
            }),
            Evidence::MtuMismatch(MtuMismatch {
                icmp_too_big: vec![TooBigSeen {
                    after_ms: 3,
                    from: ip("10.51.0.1"),
                    iface: "eth0".into(),
                    path_mtu: 1400,
                    to: ip("10.51.0.100"),
                }],
                missing: vec![],
                mtus: vec![IfaceMtu {
                    iface: "vxlan.calico".into(),
                    mtu: 1450,
                    role: Role::Tunnel,
                }],
                pkt_too_big_drops: 0,
                segment_bytes: 1438,
                segment_retransmits: 4,
                side: Side::Forward,
                snat_excluded: None,
                tunnel: Some(TunnelHeadroom {
                    device: "vxlan.calico".into(),
                    overhead: 50,
                }),
            }),
            Evidence::SnatPortExhaustion(SnatPortExhaustion {
                conntrack: ConntrackMoved {
                    clash_resolve: 0,
                    count: 2,
                    drop: 3,
                    early_drop: 0,
                    interval_ms: 1250,
                    insert_failed: 3,
                    max: 262144,
                    search_restart: 0,
                },
                destination: ip("10.51.0.20"),
                dport: 80,
                missing: vec![],
                nat_rule: Some(NatPorts {
                    action: "MASQUERADE".into(),
                    port_range: Some("40000-40001".into()),
                    random_fully: true,
                }),
                reply: Reply::unanswered(3000, 2),
            }),
            Evidence::PodRouteMissing(PodRouteMissing {
                destination: ip("10.244.228.139"),
                pool: "10.244.0.0/16".into(),
                route_used: route(),
                snat_excluded: None,
            }),
            Evidence::NodePoolOverlap(NodePoolOverlap {
                host_iface: "eth0".into(),
                host_subnet: "10.51.0.0/24".into(),
                pool: "10.0.0.0/8".into(),
            }),
            Evidence::DestinationUnresponsive(DestinationUnresponsive {
                last_forward_hop: None,
                reply: Reply::unanswered(9999, 0),
                route: None,
                snat_excluded: Some(exclusion()),
            }),
            Evidence::DeniedByPolicy(DeniedByPolicy {
                drops: vec![],
                policy: PolicyHit {
                    action: PolicyAction::Deny,
                    chain: "cali-pi-_abc".into(),
                    chain_rule: 2,
                    direction: PolicyDirection::Ingress,
                    kind: Some("NetworkPolicy".into()),
                    missing: vec![],
                    name: Some("deny".into()),
                    namespace: Some("ns".into()),
                    packets: 1,
                    policies: vec![],
                    rule: Some("Deny TCP".into()),
                    rule_index: Some(0),
                    tier: Some("default".into()),
                },
                reply: Reply::unanswered(9999, 0),
                snat_excluded: None,
            }),
            Evidence::KernelDrop(KernelDrop {
                drops: vec![],
                policy: Some(PolicyLookup {
                    candidates: vec![],
                    missing: vec!["no datastore".into()],
                }),
                reply: Reply::unanswered(9999, 0),
                snat_excluded: None,
            }),
        ]
    }

    #[test]
    fn every_shape_reads_back_as_itself() {
        for e in every_shape() {
            let json = serde_json::to_string(&e).unwrap_or_default();
            let back: Result<Evidence, _> = serde_json::from_str(&json);
            assert_eq!(back.ok().as_ref(), Some(&e), "{json}");
        }
        let d = Diagnosis {
            cause: Cause::KernelDrop,
            summary: "s".into(),
            evidence: every_shape().swap_remove(9),
            fix: "f".into(),
        };
        let json = serde_json::to_string(&d).unwrap_or_default();
        assert!(json.starts_with(r#"{"cause":"kernel_drop","summary":"s","evidence":{"drops":"#));
        let back: Option<Diagnosis> = serde_json::from_str(&json).ok();
        assert_eq!(back, Some(d));
    }

    #[test]
    fn an_exclusion_noted_in_evidence_has_its_keys_sorted() {
        let mut e = every_shape().swap_remove(3);
        e.note_exclusion(exclusion());
        let json = serde_json::to_string(&e).unwrap_or_default();
        assert!(
            json.contains(r#""snat_excluded":{"evidence":{"host_net""#),
            "{json}"
        );
        assert!(
            json.contains(r#""summary":"on purpose"},"source":"#),
            "{json}"
        );
        // The flow's own exclusion keeps declaration order.
        let own = serde_json::to_string(&exclusion()).unwrap_or_default();
        assert!(own.starts_with(r#"{"setting":"#), "{own}");
        // SNAT shapes never meet an exclusion: the note is not theirs to carry.
        let mut overlap = every_shape().swap_remove(0);
        let before = overlap.clone();
        overlap.note_exclusion(exclusion());
        assert_eq!(overlap, before);
    }
}
