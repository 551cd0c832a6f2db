//! `kernel_drop` (verdict `dropped`): the kernel dropped the flow's packet, with its reason.
use tracer_model::{diagnosis, Cause, Diagnosis, Evidence};

use super::{model_side, ms, reply_evidence, Context, Findings};
use crate::{
    calico::Dataplane,
    flows::{DropRecord, Flow, Side},
    net::{proto_name, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP},
};

/// Drops that lose a packet on its path. An ICMP echo reply that a raw socket (ping) already
/// took is also "dropped" by the ping-socket layer with NO_SOCKET: that copy does not count;
/// nor does a reply arriving after its socket closed.
pub fn significant_drops<'f>(flow: &'f Flow, cx: &Context<'_>) -> Vec<&'f DropRecord> {
    flow.drops()
        .iter()
        .filter(|d| {
            let name = cx.reasons.name(d.reason);
            // A segment too big for the next hop, dropped while ICMP told the sender: PMTU
            // discovery at work. It only matters when the flow then stays stuck (`mtu_mismatch`).
            // An ICMP echo or UDP request refused so (the sender told) is answered, not lost.
            if name == "PKT_TOO_BIG"
                && ((flow.proto == PROTO_TCP && !super::mtu::stuck(flow))
                    || super::mtu::refused_as_too_big(flow, cx))
            {
                return false;
            }
            let no_socket = name == "NO_SOCKET";
            // A reply reaching a socket its owner already closed (BGP speakers dialling each
            // other at once, a client that gave up) is not a lost request.
            !(no_socket
                && (flow.proto == PROTO_ICMP
                    || flow.proto == PROTO_ICMPV6
                    || d.side == Side::Reverse))
        })
        .collect()
}

/// The flow's significant drops as the evidence lists them.
pub(super) fn drop_list(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Vec<diagnosis::Drop> {
    f.drops
        .iter()
        .map(|d| diagnosis::Drop {
            after_ms: ms(d.ts_ns.saturating_sub(flow.first_ns)),
            count: d.count,
            function: cx.symbols.name(d.location),
            iface: (d.ifindex != 0).then(|| cx.facts.name_of(d.ifindex)),
            reason: cx.reasons.name(d.reason),
            reason_code: d.reason,
            side: model_side(d.side),
        })
        .collect()
}

pub fn diagnose(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    let first = f.drops.first()?;
    let drops = drop_list(flow, cx, f);
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
    Some(Diagnosis {
        cause: Cause::KernelDrop,
        summary: format!(
            "The kernel dropped {} {}:{} -> {}:{}{dev}{place}: {reason}.",
            proto_name(flow.proto),
            flow.src,
            flow.sport,
            flow.dst,
            flow.dport,
        ),
        evidence: Evidence::KernelDrop(diagnosis::KernelDrop {
            drops,
            // `policy::diagnose` ran first: a lookup here is one that named no policy.
            policy: super::policy::lookup(flow, cx, f).and_then(Result::err),
            reply: reply_evidence(flow, cx),
            snat_excluded: None,
        }),
        fix: drop_fix(&reason, cx.pools.dataplane),
    })
}

/// What an operator does about the common drop reasons on a Calico node.
fn drop_fix(reason: &str, dataplane: Dataplane) -> String {
    match reason {
        "NETFILTER_DROP" => match dataplane {
            Dataplane::Iptables => "An iptables/nftables rule dropped it. With Calico's iptables dataplane that is usually a NetworkPolicy (felix's cali-pi-*/cali-po-* chains end in DROP): check `calicoctl get networkpolicy,globalnetworkpolicy -A` and `iptables-save -c | grep DROP` for the rule whose counter rises."
                .into(),
            Dataplane::Nftables => "An nftables/iptables rule dropped it. With Calico's nftables dataplane that is usually a NetworkPolicy (felix's filter-cali-pi-*/filter-cali-po-* chains of `table ip calico` end in drop): check `calicoctl get networkpolicy,globalnetworkpolicy -A` and `nft list table ip calico | grep drop` for the rule whose counter rises."
                .into(),
        },
        "TC_INGRESS" | "TC_EGRESS" => "A tc program dropped it (TC_ACT_SHOT). With Calico's eBPF dataplane that is felix's program: usually a NetworkPolicy (check `calicoctl get networkpolicy,globalnetworkpolicy -A` and, with flow logs off, felix's rule counters `bpftool map dump pinned /sys/fs/bpf/tc/globals/cali_rule_ctrs2`), else felix's own checks (`calico-node -bpf counters dump`)."
            .into(),
        "IP_RPFILTER" => "Reverse-path filtering: the source is not routed back through the interface it arrived on. Check rp_filter and asymmetric routes (a node address autodetected on the wrong interface produces exactly this)."
            .into(),
        "NO_SOCKET" => "Nothing listens on the destination port: check the pod/service is running and its targetPort."
            .into(),
        "IP_OUTNOROUTES" | "IP_INNOROUTES" => "No route to the destination: check `ip route get` for it and whether Calico programmed the route (BGP established? IPAM block affinity?)."
            .into(),
        "NEIGH_FAILED" | "NEIGH_QUEUEFULL" | "NEIGH_DEAD" | "NEIGH_CREATEFAIL" => "The next hop never answered ARP/ND: check the next hop is up and on the same L2 segment as the egress interface."
            .into(),
        "PKT_TOO_BIG" => "The packet was larger than the next device's MTU with DF set; the node answered with ICMP fragmentation-needed. A sender that never sends smaller (the ICMP filtered on the way back, or pods whose MTU is above the tunnel's) needs Calico's MTU fixed: see the mtu_mismatch cause (`Installation.spec.calicoNetwork.mtu`, or FelixConfiguration `vxlanMTU`/`ipipMTU` and `veth_mtu`)."
            .into(),
        "OTHERHOST" => "The frame was addressed to another host's MAC: check proxy ARP on the cali* interface and the pod's gateway (169.254.1.1)."
            .into(),
        r if r.starts_with("TCP_") => "A TCP-level drop (bad sequence, window, or state): usually a symptom of NAT or conntrack confusion or an asymmetric path; compare the path of both directions."
            .into(),
        _ => format!("Look up drop reason {reason} for this kernel (include/net/dropreason-core.h) and the function that dropped it."),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
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
        // The counters that may name its policy come later: the tally judges it again then.
        let rules = crate::diagnose::Rules::default();
        assert_eq!(
            crate::diagnose::next_change_ns(flow, &rules, 1_000_000_000),
            Some(2 + crate::diagnose::COUNTERS_SETTLE_NS)
        );
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::NoReply, Verdict::Dropped]);
        let dg = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(dg.cause, Cause::KernelDrop);
        assert_eq!(ev(&dg.evidence)["drops"][0]["reason"], "NETFILTER_DROP");
        assert_eq!(ev(&dg.evidence)["drops"][0]["iface"], "calid92900560e3");
        assert_same_json(
            &dg.evidence,
            json!({
                "drops": [{
                    "reason": "NETFILTER_DROP",
                    "reason_code": 12,
                    "iface": "calid92900560e3",
                    "function": null,
                    "side": "forward",
                    "count": 1,
                    "after_ms": 0,
                }],
                // No counters were read: no policy is named, and that is said.
                "policy": {"missing": ["felix's filter rule counters not read yet"]},
                "reply": no_reply_after_10s(),
            }),
        );
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
        assert!(j.verdicts.contains(&Verdict::Dropped));
        assert_eq!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::IppoolOverlapsHostNetwork)
        );
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
            .contains(&Verdict::Dropped));
        // ...NO_SOCKET on the reply does not.
        let reasons =
            DropReasons::from_format("__print_symbolic(REC->reason, { 12, \"NO_SOCKET\" })");
        let c = Context {
            reasons: &reasons,
            ..cx(&p, &f, 10_000_000_000)
        };
        assert!(!judge(flow, &c).verdicts.contains(&Verdict::Dropped));
    }
}
