//! `destination_unresponsive`: the fallback for an unanswered request no other rule explains.
use tracer_model::{
    diagnosis::{DestinationUnresponsive, HopSeen},
    Cause, Diagnosis, Evidence,
};

use super::{model_dir, ms, reply_evidence, route_evidence, Context, Findings};
use crate::{
    flows::{Flow, Side},
    net::proto_name,
};

/// The rule: any unanswered request, named by where it was last seen.
pub fn diagnose(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    f.no_reply.then(|| diagnosis(flow, cx))
}

fn diagnosis(flow: &Flow, cx: &Context<'_>) -> Diagnosis {
    let last_fwd = flow.path().rev().find(|h| h.side == Side::Forward);
    let route = cx
        .facts
        .route_to(flow.nat.map(|n| n.dst).unwrap_or(flow.dst));
    Diagnosis {
        cause: Cause::DestinationUnresponsive,
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
        evidence: Evidence::DestinationUnresponsive(DestinationUnresponsive {
            last_forward_hop: last_fwd.map(|h| HopSeen {
                dir: model_dir(h.dir),
                dst: h.dst,
                iface: h.iface.name.to_string(),
                src: h.src,
            }),
            reply: reply_evidence(flow, cx),
            route: route.map(|r| route_evidence(cx, r)),
            snat_excluded: None,
        }),
        fix: "Check that the destination is up and listening, and that its return path to this \
              node (routes, firewalls, security groups) is open."
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    #[test]
    fn unanswered_non_pod_flow_names_last_hop() {
        let f = facts();
        let p = pools(&[], &[]);
        let s = syn("192.168.21.10", "192.168.21.50", 2379);
        let mut t = FlowTable::new(10);
        let id = t.ingest(&obs(1, 2, Dir::Egress, s), &lookup).unwrap_or(0);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::NoReply]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::DestinationUnresponsive);
        assert_eq!(ev(&d.evidence)["last_forward_hop"]["iface"], "eth0");
        assert_same_json(
            &d.evidence,
            json!({
                "last_forward_hop": {
                    "iface": "eth0", "dir": "egress", "src": "192.168.21.10", "dst": "192.168.21.50",
                },
                "route": null,
                "reply": no_reply_after_10s(),
            }),
        );
    }
}
