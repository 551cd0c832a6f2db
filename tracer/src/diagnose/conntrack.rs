//! `snat_port_exhaustion`: a masqueraded connection the node's conntrack could not insert.
//!
//! felix's natOutgoing rule (`felix/rules/nat.go`) masquerades a pod's connection to an address
//! outside the pools; with FelixConfiguration `natPortRange` it is `MASQUERADE --to-ports
//! MIN-MAX` (nftables `masquerade to :MIN-MAX`) for TCP and UDP. Each connection to one
//! destination address and port needs its own source port of that range for as long as conntrack
//! keeps it (TIME_WAIT: 120 s); when none is free, the tuple clashes at confirmation, the kernel
//! counts `insert_failed` and `drop` and discards the SYN, and the client retransmits into the
//! same wall. The rule asks for the flow's own evidence: unanswered, bound for SNAT on this
//! node, and `insert_failed` moving while it was tried. Unread counters never make this cause.
use tracer_model::{
    diagnosis::{self, NatPorts},
    Cause, Diagnosis, Evidence,
};

use super::{reply_evidence, Context, Findings};
use crate::{conntrack::READ_EVERY, flows::Flow, net::proto_name};

pub fn diagnose(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    // TCP: the only protocol whose unanswered attempt the agent tracks (UDP clashes are
    // resolved by the kernel, `clash_resolve`).
    if flow.proto != 6 || !f.no_reply {
        return None;
    }
    cx.pools.masq_pool_of(flow.src)?;
    if cx.pools.pool_of(flow.dst).is_some() {
        return None;
    }
    let until = flow
        .last_ns
        .saturating_add(2 * READ_EVERY.as_nanos() as u64);
    let moved = cx.conntrack.moved(flow.first_ns, until).ok()??;
    if moved.insert_failed == 0 {
        return None;
    }
    let mut missing = Vec::new();
    let nat_rule = match cx.pools.nat_outgoing_for(flow.src) {
        Some(n) if n.rules > 0 => Some(NatPorts {
            action: n.action.clone().unwrap_or_else(|| "MASQUERADE".into()),
            port_range: n.port_range.clone(),
            random_fully: n.random_fully,
        }),
        _ => {
            missing.push("felix's natOutgoing rule (not read from the dataplane)".into());
            None
        }
    };
    let range = match nat_rule.as_ref().and_then(|n| n.port_range.as_deref()) {
        Some(r) => {
            let ports = r
                .split_once('-')
                .and_then(|(a, b)| Some(b.parse::<u32>().ok()? + 1 - a.parse::<u32>().ok()?))
                .unwrap_or(1);
            format!("natPortRange {r}, {ports} source ports per destination")
        }
        None => "the kernel's whole ephemeral range".into(),
    };
    let random = match &nat_rule {
        Some(n) if !n.random_fully => " The rule lacks --random-fully (felix adds it when iptables is 1.6.2 or later and the kernel 3.14 or later; FelixConfiguration featureDetectOverride can turn it off): without it the kernel searches ports in sequence and parallel connections collide.",
        _ => "",
    };
    let summary = format!(
        "{} {}:{} -> {}:{} was dropped by conntrack: insert_failed rose by {} while it was tried; the masquerade had no free source port to {}:{} ({range}).",
        proto_name(flow.proto),
        flow.src,
        flow.sport,
        flow.dst,
        flow.dport,
        moved.insert_failed,
        flow.dst,
        flow.dport,
    );
    let fix = format!(
        "Every source port of the node's SNAT to {}:{} is held by a connection conntrack still tracks (TIME_WAIT lasts 120 s). Widen FelixConfiguration natPortRange (or unset it: the kernel's whole range), or spread the traffic over more egress addresses (natOutgoingAddress in a per-node FelixConfiguration, or egress gateways); let clients reuse connections (keep-alive, pooling) instead of opening one per request.{random} If conntrack is also full (count {} of nf_conntrack_max {}), raise nf_conntrack_max (kube-proxy's conntrack.maxPerCore).",
        flow.dst, flow.dport, moved.count, moved.max,
    );
    Some(Diagnosis {
        cause: Cause::SnatPortExhaustion,
        summary,
        evidence: Evidence::SnatPortExhaustion(diagnosis::SnatPortExhaustion {
            conntrack: moved,
            destination: flow.dst,
            dport: flow.dport,
            missing,
            nat_rule,
            reply: reply_evidence(flow, cx),
        }),
        fix,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use crate::conntrack::{Counters, Readings, Stats};

    const MS: u64 = 1_000_000;

    /// A pod's SYN to an address outside the pools, seen on its veth and never again (dropped
    /// at conntrack confirmation, before the NIC), judged at 10 s.
    fn judged(readings: &Readings, nat: Option<NatOutgoing>) -> Judgement {
        let mut t = FlowTable::new(10);
        let id = t
            .ingest(
                &obs(
                    1_000,
                    5,
                    Dir::Ingress,
                    syn("10.244.1.5", "203.0.113.7", 443),
                ),
                &lookup,
            )
            .unwrap_or(0);
        let p = Pools {
            nat_outgoing_v4: nat,
            ..pools(&["10.244.0.0/16"], &["10.244.0.0/16"])
        };
        let f = facts();
        let c = Context {
            conntrack: readings,
            ..cx(&p, &f, 10_000 * MS)
        };
        judge(t.get(id).unwrap_or_else(|| unreachable!()), &c)
    }

    fn reading(insert_failed: u64) -> Result<Stats, String> {
        Ok(Stats {
            counters: Counters {
                insert_failed,
                drop: insert_failed,
                ..Counters::default()
            },
            count: 3,
            max: 262144,
        })
    }

    fn felix_rule() -> NatOutgoing {
        NatOutgoing {
            rules: 3,
            action: Some("MASQUERADE".into()),
            port_range: Some("40000-40001".into()),
            random_fully: false,
            ..NatOutgoing::default()
        }
    }

    #[test]
    fn insert_failed_moving_with_the_unanswered_syn_is_the_cause() {
        let mut r = Readings::default();
        r.record(0, reading(7));
        r.record(250 * MS, reading(9));
        r.record(5_000 * MS, reading(9));
        let j = judged(&r, Some(felix_rule()));
        let d = j.diagnosis.unwrap_or_else(|| panic!("no diagnosis"));
        assert_eq!(d.cause, Cause::SnatPortExhaustion);
        let tracer_model::Evidence::SnatPortExhaustion(e) = &d.evidence else {
            panic!("{:?}", d.evidence)
        };
        assert_eq!(e.conntrack.insert_failed, 2);
        assert_eq!(e.conntrack.max, 262144);
        assert_eq!(e.dport, 443);
        assert_eq!(
            e.nat_rule.as_ref().and_then(|n| n.port_range.as_deref()),
            Some("40000-40001")
        );
        assert!(d.summary.contains("2 source ports"), "{}", d.summary);
        assert!(d.fix.contains("natPortRange"), "{}", d.fix);
        assert!(d.fix.contains("--random-fully"), "{}", d.fix);
        // felix's rule unread: said, the cause still rests on the counters.
        let j = judged(&r, None);
        let Some(tracer_model::Evidence::SnatPortExhaustion(e)) = j.diagnosis.map(|d| d.evidence)
        else {
            panic!("no diagnosis without the rule")
        };
        assert_eq!(e.missing.len(), 1);
        assert!(e.nat_rule.is_none());
    }

    #[test]
    fn counters_that_did_not_move_or_were_not_read_blame_nothing() {
        let mut still = Readings::default();
        still.record(0, reading(7));
        still.record(5_000 * MS, reading(7));
        let j = judged(&still, Some(felix_rule()));
        assert_ne!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::SnatPortExhaustion)
        );
        let mut unread = Readings::default();
        unread.record(0, Err("/proc/net/stat/nf_conntrack: No such file".into()));
        let j = judged(&unread, Some(felix_rule()));
        assert_ne!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::SnatPortExhaustion)
        );
        // Moved, but long after the flow's last packet: another flow's.
        let mut later = Readings::default();
        later.record(0, reading(7));
        later.record(2_000 * MS, reading(7));
        later.record(2_250 * MS, reading(9));
        let j = judged(&later, Some(felix_rule()));
        assert_ne!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::SnatPortExhaustion)
        );
    }
}
