//! Verdicts (what happened to a flow) and diagnoses (why, and what to change).
//!
//! Verdicts come from packets alone; causes join them with node facts (pools, interfaces,
//! routes). [`judge`] works out what the packets show once ([`Findings`]), then asks the rules
//! in [`RULES`] in order: the first diagnosis wins. Each cause's rule, evidence and fix text
//! sit in its own file; adding a cause is one file plus one line in [`RULES`].
use std::time::Duration;

use tracer_model::{
    diagnosis::{Leaving, Reply, Route},
    Verdict,
};
pub use tracer_model::{Diagnosis, SnatExclusion};

use crate::{
    calico::{Pools, DEFAULT_INTERFACE_PREFIX},
    conntrack::Readings,
    events::Dir,
    felix_bpf,
    felix_policy::PolicyView,
    flows::{Answered, DropRecord, Flow, Gaps, HopView, Side, TooBig},
    kernel_names::{DropReasons, Symbols},
    net::{proto_name, Cidr},
    netlink::{NodeFacts, Route as KernelRoute},
};

mod conntrack;
mod datastore;
mod kernel_drop;
mod mtu;
mod node;
mod off_link;
mod pod_route;
mod policy;
mod snat;
mod unanswered;
mod wrong_parent;
mod wrong_source;

#[cfg(test)]
mod fixtures;

pub use node::node_findings;

/// A request with no reply after this long is `no_reply` (`--no-reply-timeout`).
pub const DEFAULT_NO_REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Destination ports of Calico's datastore (`--datastore-port`): etcd, the apiserver, Typha.
/// 443 is left out: it is every HTTPS service. The apiserver Service (10.96.0.1:443) is still
/// covered, as its DNAT target is 6443.
pub const DEFAULT_DATASTORE_PORTS: [u16; 3] = [2379, 6443, 5473];
/// A median datastore exchange slower than this is `slow_response` (`--slow-threshold`).
pub const DEFAULT_SLOW_THRESHOLD: Duration = Duration::from_millis(100);

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
            no_reply_after_ns: DEFAULT_NO_REPLY_TIMEOUT.as_nanos() as u64,
            datastore_ports: DEFAULT_DATASTORE_PORTS.to_vec(),
            slow_ns: DEFAULT_SLOW_THRESHOLD.as_nanos() as u64,
            liveness_budget_ns: None,
            workload_prefixes: vec![DEFAULT_INTERFACE_PREFIX.into()],
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
    /// The latest ICMP too-big messages seen on the node.
    pub too_big: &'a [TooBig],
    /// The largest answered ICMP echo / UDP request per path (`mtu_mismatch` for requests).
    pub answered: &'a [Answered],
    /// Calico's policies and felix's rule counters (`denied_by_policy`).
    pub policy: &'a PolicyView,
    /// The node's conntrack counters as read so far (`snat_port_exhaustion`).
    pub conntrack: &'a Readings,
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

#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdicts: Vec<Verdict>,
    pub diagnosis: Option<Diagnosis>,
    /// Set with the `snat_excluded` verdict.
    pub snat_excluded: Option<SnatExclusion>,
    /// Records lost (ring buffer full) while the flow ran, if any.
    pub lost_records: u64,
}

/// What the packets show, worked out once per flow before any rule runs. Each finding sets
/// a verdict; the rules turn them into a diagnosis.
pub struct Findings<'f> {
    /// Unanswered past the timeout, and no record that could be the reply was lost.
    pub no_reply: bool,
    pub lost_records: u64,
    /// A pod's packet left a host NIC un-masqueraded, felix not meaning to (`snat_skipped`).
    pub snat_skipped: Option<snat::Skipped<'f>>,
    /// Drops that lost a packet on its path (`dropped`).
    pub drops: Vec<&'f DropRecord>,
    /// Only judged when `no_reply` (`wrong_source_address`).
    pub wrong_source: Option<wrong_source::WrongSource>,
    /// Only judged when `no_reply` (`wrong_parent_device`).
    pub wrong_parent: Option<wrong_parent::WrongParent>,
    /// Slow datastore exchanges (`slow_response`).
    pub slow: Option<datastore::Slow>,
}

/// A cause's rule: its diagnosis of the flow, or None to let the next rule speak.
pub type Rule = fn(&Flow, &Context<'_>, &Findings<'_>) -> Option<Diagnosis>;

/// Every rule, most specific first: a misconfiguration names the fix, a drop names the
/// kernel's reason, an unanswered request only says where it was last seen.
pub const RULES: &[Rule] = &[
    snat::diagnose,
    wrong_source::diagnose,
    wrong_parent::diagnose,
    mtu::diagnose,
    conntrack::diagnose,
    policy::diagnose,
    kernel_drop::diagnose,
    datastore::diagnose,
    off_link::diagnose_unanswered_peer,
    off_link::diagnose_unacked_peer,
    pod_route::diagnose,
    unanswered::diagnose,
];

/// Counters read off the data path (felix's rule counters for `denied_by_policy`, conntrack
/// statistics for `snat_port_exhaustion`) explain a drop some time after it: at most a poll
/// (250 ms) plus the read budget's wait later. A flow with drops is judged again once this
/// long has passed since its last record, so a drop first judged `kernel_drop` gets its cause.
pub const COUNTERS_SETTLE_NS: u64 = 2_000_000_000;

/// When time alone, with no new record, can next change `flow`'s judgement: the no-reply
/// timeout after its first packet (`no_reply`) or after its first reply (a handshake left
/// unacknowledged, `off_link`), and for a flow with drops, [`COUNTERS_SETTLE_NS`] after its
/// last record. None when no such moment lies after `seen_until`. A rule that starts to depend
/// on time must be reflected here: the metrics' incremental tally re-judges a flow only when it
/// changes or when this moment passes.
pub fn next_change_ns(flow: &Flow, rules: &Rules, seen_until: u64) -> Option<u64> {
    let settle =
        (!flow.drops().is_empty()).then(|| flow.last_ns.saturating_add(COUNTERS_SETTLE_NS));
    [Some(flow.first_ns), flow.first_reply_ns()]
        .into_iter()
        .flatten()
        .map(|t| t.saturating_add(rules.no_reply_after_ns))
        .chain(settle)
        .filter(|due| *due > seen_until)
        .min()
}

pub fn judge(flow: &Flow, cx: &Context<'_>) -> Judgement {
    let mut verdicts = Vec::new();
    if flow.nat.is_some_and(|n| n.src != flow.src) {
        verdicts.push(Verdict::SnatApplied);
    }
    // felix's eBPF dataplane: what cannot be trusted there is not judged at all
    // (`felix_bpf::turned_off` says why), never answered otherwise.
    let ebpf = cx.pools.ebpf.is_some();
    let (snat_skipped, snat_excluded) = match snat::skipped(flow, cx) {
        _ if ebpf => (None, None),
        Some(snat::Skipped {
            deliberate: snat::Deliberate::Yes(x),
            ..
        }) => (None, Some(x)),
        other => (other, None),
    };
    if snat_excluded.is_some() {
        verdicts.push(Verdict::SnatExcluded);
    }
    if snat_skipped.is_some() {
        verdicts.push(Verdict::SnatSkipped);
    }
    if flow.encapsulated() {
        verdicts.push(Verdict::Encapsulated);
    }
    let seen_until = cx.evidence_now_ns();
    // A request refused as too big, the sender told (PMTU discovery), was answered by the ICMP.
    let unanswered = flow.first_reply_ns().is_none()
        && flow.expects_reply
        && seen_until.saturating_sub(flow.first_ns) >= cx.rules.no_reply_after_ns
        && !mtu::refused_as_too_big(flow, cx);
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
    let no_reply = unanswered && lost_records == 0 && !ebpf;
    if flow.first_reply_ns().is_some() {
        verdicts.push(Verdict::Replied);
    } else if no_reply {
        verdicts.push(Verdict::NoReply);
    }
    if lost_records > 0 {
        verdicts.push(Verdict::EvidenceIncomplete);
    }
    let drops = kernel_drop::significant_drops(flow, cx);
    if !drops.is_empty() {
        verdicts.push(Verdict::Dropped);
    }
    // Both address rules judge only unanswered flows (past the no_reply timeout): an odd setup
    // that works is not a fault.
    let wrong_source = no_reply.then(|| wrong_source::find(flow, cx)).flatten();
    if wrong_source.is_some() {
        verdicts.push(Verdict::WrongSourceAddress);
    }
    let wrong_parent = no_reply.then(|| wrong_parent::find(flow, cx)).flatten();
    if wrong_parent.is_some() {
        verdicts.push(Verdict::WrongParentDevice);
    }
    let slow = datastore::slow_exchanges(flow, cx);
    if slow.is_some() {
        verdicts.push(Verdict::SlowResponse);
    }

    let findings = Findings {
        no_reply,
        lost_records,
        snat_skipped,
        drops,
        wrong_source,
        wrong_parent,
        slow,
    };
    let mut diagnosis = RULES
        .iter()
        .find_map(|rule| rule(flow, cx, &findings))
        .filter(|d| !(ebpf && felix_bpf::is_off_cause(d.cause)));
    if ebpf {
        verdicts.retain(|v| !felix_bpf::is_off_verdict(*v));
    }
    // An unanswered flow felix left un-masqueraded on purpose: the destination must route the
    // pod address back, which is worth saying next to whatever else went wrong.
    if let (Some(d), Some(x)) = (&mut diagnosis, &snat_excluded) {
        d.evidence.note_exclusion(x.clone());
    }
    Judgement {
        verdicts,
        diagnosis,
        snat_excluded,
        lost_records,
    }
}

/// The pod's packet as it left `hop` un-masqueraded.
fn leaving(flow: &Flow, hop: &HopView<'_>) -> Leaving {
    Leaving {
        dir: tracer_model::Dir::Egress,
        dport: hop.dport,
        dst: hop.dst,
        iface: hop.iface.name.to_string(),
        proto: proto_name(flow.proto),
        sport: hop.sport,
        src: hop.src,
    }
}

fn reply_evidence(flow: &Flow, cx: &Context<'_>) -> Reply {
    match flow.first_reply_ns() {
        Some(t) => Reply::answered(ms(t.saturating_sub(flow.first_ns))),
        None => Reply::unanswered(
            ms(cx.now_ns.saturating_sub(flow.first_ns)),
            flow.retransmits(),
        ),
    }
}

fn route_evidence(cx: &Context<'_>, r: &KernelRoute) -> Route {
    Route {
        dev: r.oif.map(|i| cx.facts.name_of(i)),
        dst: r.dst.to_string(),
        via: r.gateway,
    }
}

fn model_dir(d: Dir) -> tracer_model::Dir {
    match d {
        Dir::Ingress => tracer_model::Dir::Ingress,
        Dir::Egress => tracer_model::Dir::Egress,
    }
}

fn model_side(s: Side) -> tracer_model::Side {
    match s {
        Side::Forward => tracer_model::Side::Forward,
        Side::Reverse => tracer_model::Side::Reverse,
    }
}

/// The well-known Calico service on a port, for summaries.
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

fn join(c: &[Cidr]) -> String {
    c.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(|c| c.to_string()).collect()
}

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use crate::flows::CounterRead;

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
        assert_eq!(j.verdicts, vec![Verdict::NoReply]);
        assert!(j.diagnosis.is_some());
        // The ring overflowed while the reply was due: said, not diagnosed.
        let mut gaps = Gaps::default();
        gaps.look(500, CounterRead::at(500, 0));
        gaps.look(2_000_000_000, CounterRead::at(2_000_000_000, 7));
        let c = Context {
            gaps: &gaps,
            ..cx(&p, &f, now)
        };
        let j = judge(flow, &c);
        assert_eq!(j.verdicts, vec![Verdict::EvidenceIncomplete]);
        assert_eq!(j.lost_records, 7);
        assert!(j.diagnosis.is_none());
        // A loss long after the reply was due does not matter.
        let mut later = Gaps::default();
        later.look(8_000_000_000, CounterRead::at(8_000_000_000, 0));
        later.look(9_000_000_000, CounterRead::at(9_000_000_000, 3));
        let c = Context {
            gaps: &later,
            ..cx(&p, &f, now)
        };
        assert_eq!(judge(flow, &c).verdicts, vec![Verdict::NoReply]);
        // A reader that has not read past the timeout yet: a reply may be waiting in the ring.
        let mut lagging = Gaps::default();
        lagging.look(1_000_000_000, CounterRead::at(1_000_000_000, 0));
        let c = Context {
            gaps: &lagging,
            ..cx(&p, &f, now)
        };
        let j = judge(flow, &c);
        assert!(j.verdicts.is_empty() && j.diagnosis.is_none(), "{j:?}");
    }

    /// felix's eBPF dataplane: the seed-002 flow (a pod's packet seen leaving un-translated,
    /// no reply seen) is what tracer sees there of a healthy flow that felix NATs after tracer's
    /// egress hook and whose reply it redirects past tracer's hooks. Off, not diagnosed.
    #[test]
    fn ebpf_mode_turns_off_what_it_cannot_trust_and_nothing_else() {
        let f = facts();
        let mut p = pools(&["192.168.0.0/16"], &["192.168.0.0/16"]);
        let s = syn("192.168.236.10", "192.168.21.11", 6443);
        let (t, id) = flow_of(s, s, false);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let now = 10_000_000_000;
        let j = judge(flow, &cx(&p, &f, now));
        assert_eq!(j.verdicts, vec![Verdict::SnatSkipped, Verdict::NoReply]);
        assert!(j.diagnosis.is_some());
        assert!(!node_findings(&cx(&p, &f, now)).is_empty());
        p.ebpf = Some(crate::felix_bpf::EbpfMode::default());
        let j = judge(flow, &cx(&p, &f, now));
        assert!(j.verdicts.is_empty() && j.diagnosis.is_none(), "{j:?}");
        assert!(node_findings(&cx(&p, &f, now)).is_empty());
        // What stays on: a translation and a reply tracer saw are still reported.
        let s = syn("10.244.1.10", "192.168.21.11", 6443);
        let mut out = s;
        out.src = ip("192.168.21.10");
        out.sport = 61000;
        let (t, id) = flow_of(s, out, true);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let p = Pools {
            ebpf: Some(crate::felix_bpf::EbpfMode::default()),
            ..p
        };
        let j = judge(flow, &cx(&p, &f, now));
        assert_eq!(j.verdicts, vec![Verdict::SnatApplied, Verdict::Replied]);
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
            assert!(v.parse::<Verdict>().is_ok(), "{v}");
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
            assert!(c.parse::<Cause>().is_ok(), "{c}");
        }
    }
}
