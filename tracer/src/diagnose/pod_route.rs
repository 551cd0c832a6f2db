//! `pod_route_missing`: a pod address routed to the default route.
use tracer_model::{diagnosis::PodRouteMissing, Cause, Diagnosis, Evidence};

use super::{route_evidence, Context, Findings};
use crate::flows::Flow;

/// A pod destination this node has no route for: it falls to the default route, so the IPAM
/// block's route (from BGP, or felix for VXLAN) is missing.
pub fn diagnose(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    if !f.no_reply {
        return None;
    }
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
        cause: Cause::PodRouteMissing,
        summary: format!(
            "{dst} is a pod address (pool {pool}) but this node has no route for its IPAM block: the kernel sent the request to the default route{}{} and no reply came. Calico installs block routes from BGP (BIRD) or, for VXLAN, from felix; without them pods on other nodes are unreachable.",
            route.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
            dev.as_deref().map(|d| format!(" on {d}")).unwrap_or_default(),
        ),
        evidence: Evidence::PodRouteMissing(PodRouteMissing {
            destination: dst,
            pool: pool.to_string(),
            route_used: route_evidence(cx, route),
            snat_excluded: None,
        }),
        fix: "Check `calicoctl node status` on both nodes: BGP with the destination's node must be Established (if not, look for a BGP diagnosis: a node address on the wrong interface is the usual cause). With VXLAN, check felix is running and `ip route | grep vxlan.calico` lists the block."
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
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
        assert_eq!(d.cause, Cause::PodRouteMissing);
        assert_eq!(ev(&d.evidence)["route_used"]["via"], "10.51.0.1");
        assert_same_json(
            &d.evidence,
            json!({
                "destination": "10.244.228.139",
                "pool": "10.244.0.0/16",
                "route_used": {"dst": "0.0.0.0/0", "via": "10.51.0.1", "dev": "eth0"},
            }),
        );
    }
}
