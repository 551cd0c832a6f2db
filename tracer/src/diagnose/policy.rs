//! `denied_by_policy` (verdict `dropped`): felix's packet filter dropped the flow, and the rule's
//! counter names the Calico policy (or the end of a tier, or the endpoint's profiles) that did.
//! The attribution itself (chain names, counters) is `felix_policy`'s; a drop it cannot
//! attribute stays a `kernel_drop` carrying why (`policy` in its evidence).
use tracer_model::{
    diagnosis::{self, PolicyAction, PolicyDirection, PolicyHit, PolicyLookup},
    Cause, Diagnosis, Evidence,
};

use super::{kernel_drop::drop_list, reply_evidence, Context, Findings};
use crate::{flows::Flow, net::proto_name};

/// The kernel's name for a drop by a netfilter rule.
const NETFILTER_DROP: &str = "NETFILTER_DROP";

/// The flow's workload endpoints (host-side veths): those it crossed, and those its addresses
/// are routed to on this node (a packet dropped before the destination pod's veth never
/// crossed it).
fn endpoints(flow: &Flow, cx: &Context<'_>) -> Vec<String> {
    let mut out: Vec<String> = flow
        .path()
        .map(|h| h.iface.name.to_string())
        .filter(|n| cx.rules.is_workload_iface(n))
        .collect();
    for ip in [flow.src, flow.dst] {
        if let Some(oif) = cx.facts.route_to(ip).and_then(|r| r.oif) {
            let name = cx.facts.name_of(oif);
            if cx.rules.is_workload_iface(&name) {
                out.push(name);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// For a flow with a `NETFILTER_DROP` (in felix's eBPF dataplane: a drop by a tc program,
/// `TC_INGRESS`/`TC_EGRESS`): the felix rule that dropped it, or why none is named.
pub fn lookup(
    flow: &Flow,
    cx: &Context<'_>,
    f: &Findings<'_>,
) -> Option<Result<PolicyHit, PolicyLookup>> {
    if cx.policy.ebpf.is_some() {
        let (drop, reason) = f.drops.iter().find_map(|d| {
            let r = cx.reasons.name(d.reason);
            crate::felix_policy::bpf::direction_of_drop(&r).map(|_| (d, r))
        })?;
        return Some(
            cx.policy
                .attribute_bpf(drop.ts_ns, &reason, &endpoints(flow, cx)),
        );
    }
    let drop = f
        .drops
        .iter()
        .find(|d| cx.reasons.name(d.reason) == NETFILTER_DROP)?;
    Some(cx.policy.attribute(drop.ts_ns, &endpoints(flow, cx)))
}

/// Where the operator sees the rule's counter move.
fn counter_hint(hit: &PolicyHit, cx: &Context<'_>) -> String {
    if cx.policy.ebpf.is_some() {
        format!(
            "`bpftool map dump pinned /sys/fs/bpf/tc/globals/{}` (key: FNV-1a 64 of `{}`)",
            crate::felix_policy::bpf::RULE_COUNTERS_MAP,
            hit.chain
        )
    } else {
        format!("`iptables-save -c | grep {}`", hit.chain)
    }
}

pub fn diagnose(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    let hit = lookup(flow, cx, f)?.ok()?;
    let dir = match hit.direction {
        PolicyDirection::Ingress => "ingress",
        PolicyDirection::Egress => "egress",
    };
    let what = format!(
        "{} {}:{} -> {}:{}",
        proto_name(flow.proto),
        flow.src,
        flow.sport,
        flow.dst,
        flow.dport
    );
    let tier = hit.tier.as_deref().unwrap_or("?");
    let (summary, fix) = match hit.action {
        PolicyAction::Deny => {
            let policy = format!(
                "{} {}{}",
                hit.kind.as_deref().unwrap_or("policy"),
                hit.namespace
                    .as_deref()
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default(),
                hit.name.as_deref().unwrap_or("?")
            );
            let rule = match hit.rule_index {
                Some(i) => format!("{dir} rule {i}"),
                None => format!("an {dir} rule"),
            };
            let get = match &hit.namespace {
                Some(ns) if hit.kind.as_deref() == Some("NetworkPolicy") => format!(
                    "calicoctl get networkpolicy -n {ns} {} -o yaml",
                    hit.name.as_deref().unwrap_or("")
                ),
                _ => format!(
                    "calicoctl get globalnetworkpolicy {} -o yaml",
                    hit.name.as_deref().unwrap_or("")
                ),
            };
            (
                format!("{policy} (tier {tier}) denied {what}: {rule} is an explicit Deny."),
                format!(
                    "{policy} in tier {tier} denies this traffic with {rule}{}. If the traffic should pass, narrow that rule (its selector, nets or ports must stop matching this {} to port {}), or change its action; an Allow in a policy of lower order in the same tier, or in an earlier tier, takes effect first. See `{get}` and {}.",
                    hit.rule.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
                    if hit.direction == PolicyDirection::Ingress { format!("source {}", flow.src) } else { format!("destination {}", flow.dst) },
                    flow.dport,
                    counter_hint(&hit, cx),
                ),
            )
        }
        PolicyAction::EndOfTier => {
            let applied = if hit.policies.is_empty() {
                "none listed".into()
            } else {
                hit.policies.join(", ")
            };
            (
                format!("No policy in tier {tier} allowed {what} ({dir}): felix's end-of-tier drop."),
                format!(
                    "Policies of tier {tier} select this endpoint for {dir} ({applied}) but none allowed the packet, so felix dropped it at the end of the tier. Add an {dir} rule allowing {} {} port {} to one of them (its selector/ports must match this traffic), or a policy in tier {tier} that allows it; a Pass rule hands it to the next tier.",
                    proto_name(flow.proto),
                    if hit.direction == PolicyDirection::Ingress { format!("from {}", flow.src) } else { format!("to {}", flow.dst) },
                    flow.dport,
                ),
            )
        }
        PolicyAction::NoProfileMatched => (
            format!("No policy applied to {what} ({dir}) and no profile allowed it: felix's end-of-chain drop."),
            format!(
                "No policy selects this endpoint for {dir}, and its profiles ({}) do not allow the traffic. Add a NetworkPolicy selecting the pod that allows it, or check the namespace's profile (kns.<namespace>).",
                if hit.policies.is_empty() { "none".into() } else { hit.policies.join(", ") }
            ),
        ),
    };
    Some(Diagnosis {
        cause: Cause::DeniedByPolicy,
        summary,
        evidence: Evidence::DeniedByPolicy(diagnosis::DeniedByPolicy {
            drops: drop_list(flow, cx, f),
            policy: hit,
            reply: reply_evidence(flow, cx),
            snat_excluded: None,
        }),
        fix,
    })
}
