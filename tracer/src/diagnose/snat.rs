//! Pod traffic that left the node un-masqueraded: `ippool_overlaps_host_network`,
//! `nat_outgoing_disabled` and `masquerade_not_applied`, and the exclusions felix makes on
//! purpose (`snat_excluded`, not a fault).
use std::net::IpAddr;

use tracer_model::{
    diagnosis::{
        ExclusionEvidence, MasqueradeNotApplied, NatOutgoingDisabled, NatOutgoingRule, PoolOverlap,
    },
    Cause, Diagnosis, Evidence, SnatExclusion,
};

use super::{leaving, reply_evidence, strings, Context, Findings};
use crate::{
    calico::{
        Dataplane, NatOutgoing, Role, ALL_HOSTS_SET_V4, ALL_HOSTS_SET_V6, MASQ_POOLS_SETS_V4,
        MASQ_POOLS_SETS_V6,
    },
    events::Dir,
    flows::{Flow, HopView, Side},
    net::Cidr,
};

/// Where a pod-sourced packet left a host NIC without masquerade.
pub struct Skipped<'a> {
    hop: HopView<'a>,
    src_pool: Cidr,
    dst_pool: Option<Cidr>,
    /// The host subnet (and its interface) that also contains the destination.
    host_subnet: Option<(Cidr, String)>,
    /// Whether felix's own configuration skips masquerade here.
    pub deliberate: Deliberate,
}

pub enum Deliberate {
    No,
    Yes(SnatExclusion),
    /// felix's rule excludes something the agent could not read (why): no confident diagnosis.
    Unknown(String),
}

/// A pod's packet that left a host NIC un-masqueraded, and whether felix meant it.
pub fn skipped<'a>(flow: &'a Flow, cx: &Context<'_>) -> Option<Skipped<'a>> {
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
            let chain = cx.pools.dataplane.nat_outgoing_chain();
            let deliberate = Deliberate::Yes(lb_only_exclusion(flow, &hop, lb, chain));
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
                "Pod {} left {iface} un-masqueraded on purpose: felix's natOutgoing rule only masquerades traffic leaving {not}{filter} (IptablesNATOutgoingInterfaceFilter).",
                flow.src
            ),
            evidence: ExclusionEvidence::InterfaceFilter {
                left_node_unmasqueraded: leaving(flow, hop),
                out_iface_filter: filter.to_string(),
                out_iface_negated: rule.out_iface_negated,
                rule_chain: cx.pools.dataplane.nat_outgoing_chain().into(),
            },
        });
    }
    if rule.excludes_host_ips {
        let Some(nets) = cx.pools.host_nets_for(hop.dst) else {
            return Deliberate::Unknown(format!(
                "felix's rule excludes host IPs but its all-hosts-net {} could not be read",
                cx.pools.dataplane.set_kind()
            ));
        };
        if let Some(net) = nets.iter().find(|c| c.contains(hop.dst)) {
            let set = if hop.dst.is_ipv4() {
                ALL_HOSTS_SET_V4
            } else {
                ALL_HOSTS_SET_V6
            };
            return Deliberate::Yes(SnatExclusion {
                setting: "NATOutgoingExclusions=IPPoolsAndHostIPs".into(),
                summary: format!(
                    "Pod {} reached node address {} un-masqueraded on purpose: felix's natOutgoing rule skips destinations in {set} (NATOutgoingExclusions=IPPoolsAndHostIPs), so that host must route the pod address back.",
                    flow.src, hop.dst
                ),
                evidence: ExclusionEvidence::HostIps {
                    host_net: net.to_string(),
                    ipset: set.into(),
                    left_node_unmasqueraded: leaving(flow, hop),
                    rule_chain: cx.pools.dataplane.nat_outgoing_chain().into(),
                },
            });
        }
    }
    Deliberate::No
}

fn lb_only_exclusion(flow: &Flow, hop: &HopView<'_>, pool: Cidr, chain: &str) -> SnatExclusion {
    SnatExclusion {
        setting: "IPPool allowedUses=[LoadBalancer]".into(),
        summary: format!(
            "Pod {} reached {} un-masqueraded on purpose: it is in the LoadBalancer-only pool {pool}, which felix up to v3.32.0 keeps in all-ipam-pools, whose destinations its natOutgoing rule skips (v3.32.1 masquerades them).",
            flow.src, hop.dst
        ),
        evidence: ExclusionEvidence::LbOnlyPool {
            lb_only_pool: pool.to_string(),
            left_node_unmasqueraded: leaving(flow, hop),
            rule_chain: chain.into(),
        },
    }
}

fn host_subnet_of(cx: &Context<'_>, ip: IpAddr) -> Option<(Cidr, String)> {
    cx.facts
        .connected_subnets()
        .filter(|(c, l)| c.contains(ip) && !cx.rules.is_workload_iface(&l.name))
        .max_by_key(|(c, _)| c.prefix())
        .map(|(c, l)| (c, l.name.clone()))
}

/// The rule: why a pod's packet left un-masqueraded when felix did not mean it to.
pub fn diagnose(flow: &Flow, cx: &Context<'_>, f: &Findings<'_>) -> Option<Diagnosis> {
    let s = f.snat_skipped.as_ref()?;
    let no_reply = f.no_reply;
    match &s.deliberate {
        Deliberate::No => {}
        Deliberate::Unknown(why) => {
            tracing::debug!(flow = flow.id, why, "un-masqueraded flow not diagnosed");
            return None;
        }
        Deliberate::Yes(_) => return None,
    }
    let leaving = leaving(flow, &s.hop);
    let rule = cx.pools.nat_outgoing_for(s.hop.dst).map(rule_evidence);
    let reply = reply_evidence(flow, cx);
    if let (Some(pool), Some((subnet, iface))) = (s.dst_pool, &s.host_subnet) {
        return Some(Diagnosis {
            cause: Cause::IppoolOverlapsHostNetwork,
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
            evidence: Evidence::PoolOverlap(PoolOverlap {
                host_iface: iface.clone(),
                host_subnet: subnet.to_string(),
                left_node_unmasqueraded: leaving,
                masq_pools: strings(&cx.pools.masq),
                pod_pool: s.src_pool.to_string(),
                pool: pool.to_string(),
                pools_source: cx.pools.source.clone(),
                reply,
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
            cause: Cause::NatOutgoingDisabled,
            summary: format!(
                "Pod {} sent to {} outside every IP pool, but its pool {} has natOutgoing disabled \
                 (it is not in felix's masq {}), so the packet left {} with the pod address and \
                 no reply came back.",
                flow.src,
                s.hop.dst,
                s.src_pool,
                cx.pools.dataplane.set_kind(),
                s.hop.iface
            ),
            evidence: Evidence::NatOutgoingDisabled(NatOutgoingDisabled {
                left_node_unmasqueraded: leaving,
                masq_pools: strings(&cx.pools.masq),
                nat_outgoing_rule: rule,
                pod_pool: s.src_pool.to_string(),
                pools_source: cx.pools.source.clone(),
                reply,
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
        cause: Cause::MasqueradeNotApplied,
        summary: format!(
            "Pod {}'s pool {} is marked for natOutgoing, yet its packet to {} left {} with the pod \
             address: felix's {} rule did not apply.",
            flow.src,
            s.src_pool,
            s.hop.dst,
            s.hop.iface,
            match cx.pools.dataplane {
                Dataplane::Iptables => "cali-nat-outgoing MASQUERADE",
                Dataplane::Nftables => "nat-cali-nat-outgoing masquerade",
            }
        ),
        evidence: Evidence::MasqueradeNotApplied(MasqueradeNotApplied {
            left_node_unmasqueraded: leaving,
            nat_outgoing_rule: rule,
            pod_pool: s.src_pool.to_string(),
            reply,
        }),
        fix: masquerade_fix(cx.pools.dataplane, s.hop.dst.is_ipv6()),
    })
}

/// Where to look when felix's masquerade rule did not apply, in the node's dataplane.
fn masquerade_fix(dataplane: Dataplane, ipv6: bool) -> String {
    let masq_set = if ipv6 {
        MASQ_POOLS_SETS_V6[0]
    } else {
        MASQ_POOLS_SETS_V4[0]
    };
    format!(
        "Check `{}` and the {}s it names (`{}`); restart calico-node if felix's rules are missing.",
        dataplane.show_nat_outgoing(ipv6),
        dataplane.set_kind(),
        dataplane.show_set(masq_set)
    )
}

fn rule_evidence(r: &NatOutgoing) -> NatOutgoingRule {
    NatOutgoingRule {
        excludes_host_ips: r.excludes_host_ips,
        out_iface: r.out_iface.clone(),
        out_iface_negated: r.out_iface_negated,
        pool_set: r.pool_set.clone(),
        rules: r.rules as u64,
    }
}

/// How to get rid of a pool that overlaps a host network: an IPPool's CIDR cannot be edited.
pub(super) fn pool_migration_fix(pool: &Cidr, subnet: &Cidr) -> String {
    format!(
        "An IPPool's cidr cannot be changed (libcalico-go refuses the update): migrate the pods to a new pool. 1) Create an IPPool whose cidr overlaps no host network (not {subnet}), with the same natOutgoing, encapsulation and blockSize as {pool}. 2) Disable the old one: `calicoctl patch ippool <name of {pool}> -p '{{\"spec\":{{\"disabled\":true}}}}'` (`calicoctl get ippools -o wide` names it). 3) Recreate the pods that have {pool} addresses (e.g. `kubectl rollout restart` their workloads): they get addresses from the new pool. 4) Delete the old pool. On operator installs (tigera-operator) the operator owns the pools and reconciles them back to `Installation.spec.calicoNetwork.ipPools`: make the change there (add the new pool, set `disabled` on the old one, then remove it) instead of editing IPPools. For new clusters, pick a pod CIDR outside every host network (CALICO_IPV4POOL_CIDR, or the Installation's ipPools)."
    )
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    #[test]
    fn seed_002_overlap_is_named_with_evidence() {
        let f = facts();
        let p = pools(&["192.168.0.0/16"], &["192.168.0.0/16"]);
        let s = syn("192.168.236.10", "192.168.21.11", 6443);
        let (t, id) = flow_of(s, s, false);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        // Before the timeout: skipped SNAT is already visible, no_reply is not.
        let early = judge(flow, &cx(&p, &f, 1_000_000_000));
        assert_eq!(early.verdicts, vec![Verdict::SnatSkipped]);
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::SnatSkipped, Verdict::NoReply]);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::IppoolOverlapsHostNetwork);
        assert_eq!(ev(&d.evidence)["pool"], "192.168.0.0/16");
        assert_eq!(ev(&d.evidence)["host_subnet"], "192.168.21.0/24");
        assert_eq!(ev(&d.evidence)["host_iface"], "eth0");
        assert_eq!(ev(&d.evidence)["left_node_unmasqueraded"]["iface"], "eth0");
        assert_eq!(ev(&d.evidence)["reply"]["replied"], false);
        assert_same_json(
            &d.evidence,
            json!({
                "pool": "192.168.0.0/16",
                "pod_pool": "192.168.0.0/16",
                "host_subnet": "192.168.21.0/24",
                "host_iface": "eth0",
                "left_node_unmasqueraded": left_eth0("192.168.236.10", "192.168.21.11", 6443),
                "masq_pools": ["192.168.0.0/16"],
                "pools_source": "ipset",
                "reply": no_reply_after_10s(),
            }),
        );
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
        assert_eq!(j.verdicts, vec![Verdict::SnatApplied, Verdict::Replied]);
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
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::NatOutgoingDisabled);
        assert_same_json(
            &d.evidence,
            json!({
                "pod_pool": "10.244.0.0/16",
                "masq_pools": [],
                "left_node_unmasqueraded": left_eth0("10.244.1.10", "8.8.8.8", 53),
                "pools_source": "ipset",
                "nat_outgoing_rule": null,
                "reply": no_reply_after_10s(),
            }),
        );
        // Routable pod network: un-NATed and answered is fine.
        let (t, id) = flow_of(s, s, true);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::SnatSkipped, Verdict::Replied]);
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
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::MasqueradeNotApplied);
        assert_same_json(
            &d.evidence,
            json!({
                "pod_pool": "10.244.0.0/16",
                "left_node_unmasqueraded": left_eth0("10.244.1.10", "8.8.8.8", 443),
                "nat_outgoing_rule": null,
                "reply": no_reply_after_10s(),
            }),
        );
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
        assert_eq!(j.verdicts, vec![Verdict::SnatExcluded, Verdict::Replied]);
        assert!(j.diagnosis.is_none(), "{j:?}");
        let x = j.snat_excluded.unwrap_or_else(|| unreachable!());
        assert_eq!(x.setting, "NATOutgoingExclusions=IPPoolsAndHostIPs");
        assert_eq!(ev(&x.evidence)["host_net"], "192.168.21.11/32");
        let host_ips = json!({
            "rule_chain": "cali-nat-outgoing",
            "ipset": "cali40all-hosts-net",
            "host_net": "192.168.21.11/32",
            "left_node_unmasqueraded": left_eth0("10.244.1.10", "192.168.21.11", 6443),
        });
        assert_same_json(&x.evidence, host_ips.clone());
        // Unanswered: no SNAT cause; the missing reply is the destination's, with the note.
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.11", false);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::DestinationUnresponsive);
        assert_eq!(
            ev(&d.evidence)["snat_excluded"]["setting"],
            "NATOutgoingExclusions=IPPoolsAndHostIPs"
        );
        // The note was a `json!` copy of the exclusion: its keys come sorted, unlike the flow's.
        assert_same_json(
            &d.evidence,
            json!({
                "last_forward_hop": {
                    "iface": "eth0", "dir": "egress", "src": "10.244.1.10", "dst": "192.168.21.11",
                },
                "route": null,
                "reply": no_reply_after_10s(),
                "snat_excluded": {
                    "setting": x.setting, "summary": x.summary, "evidence": host_ips,
                },
            }),
        );
        // A destination that is no node address is still felix's to masquerade.
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        assert_eq!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::MasqueradeNotApplied)
        );
        // Excluded host IPs the agent could not read: no confident cause either way.
        p.host_nets_v4 = None;
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.11", false);
        assert!(j.verdicts.contains(&Verdict::SnatSkipped), "{j:?}");
        assert_eq!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::DestinationUnresponsive)
        );
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
            j.diagnosis.is_none() && j.verdicts.contains(&Verdict::SnatExcluded),
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
        assert!(
            j.verdicts.contains(&Verdict::SnatExcluded)
                && !j.verdicts.contains(&Verdict::SnatSkipped)
        );
        assert_ne!(
            j.diagnosis.as_ref().map(|d| d.cause),
            Some(Cause::MasqueradeNotApplied)
        );
        let x = j.snat_excluded.unwrap_or_else(|| unreachable!());
        assert_eq!(x.setting, "IptablesNATOutgoingInterfaceFilter=eth1");
        assert_eq!(ev(&x.evidence)["left_node_unmasqueraded"]["iface"], "eth0");
        assert_same_json(
            &x.evidence,
            json!({
                "rule_chain": "cali-nat-outgoing",
                "out_iface_filter": "eth1",
                "out_iface_negated": false,
                "left_node_unmasqueraded": left_eth0("10.244.1.10", "8.8.8.8", 6443),
            }),
        );
        // Even with natOutgoing off, turning it on would not masquerade traffic leaving eth0.
        let p = with_rule(pools(&["10.244.0.0/16"], &[]), rule("eth1"));
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        assert_ne!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::NatOutgoingDisabled)
        );
        // The filter matches eth0 (iptables' `+` wildcard): the rule should have applied.
        let p = with_rule(pools(&["10.244.0.0/16"], &["10.244.0.0/16"]), rule("eth+"));
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        let d = j.diagnosis.unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::MasqueradeNotApplied);
        assert_same_json(
            &d.evidence,
            json!({
                "pod_pool": "10.244.0.0/16",
                "left_node_unmasqueraded": left_eth0("10.244.1.10", "8.8.8.8", 6443),
                "nat_outgoing_rule": {
                    "rules": 1, "pool_set": null, "excludes_host_ips": false, "out_iface": "eth+",
                    "out_iface_negated": false,
                },
                "reply": no_reply_after_10s(),
            }),
        );
        // An empty chain (no pool has natOutgoing) is still natOutgoing disabled.
        let p = with_rule(pools(&["10.244.0.0/16"], &[]), Default::default());
        let j = unmasqueraded(&p, "10.244.1.10", "8.8.8.8", false);
        assert_eq!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::NatOutgoingDisabled)
        );
    }

    #[test]
    fn loadbalancer_only_pool_is_deliberate() {
        let f = facts();
        let mut p = pools(&["10.244.0.0/16", "192.168.21.192/27"], &["10.244.0.0/16"]);
        // Without knowing it is LoadBalancer-only, it looks like seed 002.
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.200", true);
        assert_eq!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::IppoolOverlapsHostNetwork)
        );
        assert_eq!(node_findings(&cx(&p, &f, 0)).len(), 1);
        p.lb_only = vec!["192.168.21.192/27"
            .parse::<Cidr>()
            .unwrap_or_else(|_| unreachable!())];
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.200", true);
        assert_eq!(j.verdicts, vec![Verdict::SnatExcluded, Verdict::Replied]);
        assert!(j.diagnosis.is_none(), "{j:?}");
        let x = j.snat_excluded.unwrap_or_else(|| unreachable!());
        assert_eq!(ev(&x.evidence)["lb_only_pool"], "192.168.21.192/27");
        assert_same_json(
            &x.evidence,
            json!({
                "rule_chain": "cali-nat-outgoing",
                "lb_only_pool": "192.168.21.192/27",
                "left_node_unmasqueraded": left_eth0("10.244.1.10", "192.168.21.200", 6443),
            }),
        );
        assert!(node_findings(&cx(&p, &f, 0)).is_empty());
        // Unanswered: not a pod without a route, nor a skipped SNAT.
        let j = unmasqueraded(&p, "10.244.1.10", "192.168.21.200", false);
        assert_eq!(
            j.diagnosis.map(|d| d.cause),
            Some(Cause::DestinationUnresponsive)
        );
    }

    #[test]
    fn pod_to_pod_without_encapsulation_is_not_a_skipped_snat() {
        let f = facts();
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let s = syn("10.244.1.10", "10.244.2.20", 8080);
        let (t, id) = flow_of(s, s, true);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let j = judge(flow, &cx(&p, &f, 10_000_000_000));
        assert_eq!(j.verdicts, vec![Verdict::Replied]);
        assert!(j.diagnosis.is_none());
    }

    /// The fix names the commands of the node's dataplane (iptables' text is unchanged).
    #[test]
    fn masquerade_fix_names_the_dataplanes_commands() {
        assert_eq!(
            super::masquerade_fix(crate::calico::Dataplane::Iptables, false),
            "Check `iptables -t nat -S cali-nat-outgoing` and the ipsets it names \
             (`ipset list cali40masq-ipam-pools`); restart calico-node if felix's rules are missing."
        );
        assert_eq!(
            super::masquerade_fix(crate::calico::Dataplane::Nftables, false),
            "Check `nft list chain ip calico nat-cali-nat-outgoing` and the nft sets it names \
             (`nft list set ip calico cali40masq-ipam-pools`); restart calico-node if felix's \
             rules are missing."
        );
        assert!(
            super::masquerade_fix(crate::calico::Dataplane::Nftables, true)
                .contains("`nft list chain ip6 calico nat-cali-nat-outgoing`")
        );
        assert!(
            super::masquerade_fix(crate::calico::Dataplane::Iptables, true)
                .contains("`ip6tables -t nat -S cali-nat-outgoing`")
        );
        let f = facts();
        let mut p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        p.dataplane = crate::calico::Dataplane::Nftables;
        let s = syn("10.244.1.10", "8.8.8.8", 443);
        let (t, id) = flow_of(s, s, false);
        let flow = t.get(id).unwrap_or_else(|| unreachable!());
        let d = judge(flow, &cx(&p, &f, 10_000_000_000))
            .diagnosis
            .unwrap_or_else(|| unreachable!());
        assert_eq!(d.cause, Cause::MasqueradeNotApplied);
        assert!(
            d.summary.contains("nat-cali-nat-outgoing masquerade"),
            "{}",
            d.summary
        );
        assert!(d.fix.contains("nft list chain ip calico"), "{}", d.fix);
    }
}
