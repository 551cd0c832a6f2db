//! Faults visible in the node's configuration alone, before any traffic: a pool overlapping a
//! host network (`ippool_overlaps_host_network`) and a VXLAN device on a container bridge
//! (`node_address_on_wrong_interface`). Their fix texts are their causes', beside the flow rules.
use tracer_model::{
    diagnosis::{BridgeParent, NodePoolOverlap},
    Cause, Diagnosis, Evidence,
};

use super::{snat::pool_migration_fix, strings, wrong_source::autodetect_fix, Context};
use crate::{calico::TUNNEL_IFACES, netlink::Link};

/// Faults visible in the node's configuration alone, before any traffic.
pub fn node_findings(cx: &Context<'_>) -> Vec<Diagnosis> {
    let mut out = findings(cx);
    if cx.pools.ebpf.is_some() {
        out.retain(|d| !crate::felix_bpf::is_off_cause(d.cause));
    }
    out
}

fn findings(cx: &Context<'_>) -> Vec<Diagnosis> {
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
                || TUNNEL_IFACES.contains(&link.name.as_str())
                || cx.rules.is_workload_iface(&link.name);
            if tunnel_or_pod || !pool.overlaps(&subnet) {
                continue;
            }
            out.push(Diagnosis {
                cause: Cause::IppoolOverlapsHostNetwork,
                summary: format!(
                    "IP pool {pool} overlaps the host network {subnet} on {}: felix treats every address in it as a pod, so pod traffic to those hosts is not masqueraded and their replies go astray.",
                    link.name
                ),
                evidence: Evidence::NodePoolOverlap(NodePoolOverlap {
                    host_iface: link.name.clone(),
                    host_subnet: subnet.to_string(),
                    pool: pool.to_string(),
                }),
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
        let ports: Vec<&Link> = cx
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
            cause: Cause::NodeAddressOnWrongInterface,
            summary: format!(
                "{}'s parent device is {}, a bridge with only virtual ports (a container network), with local address {}: tunnel traffic to the other nodes cannot leave this node.",
                vx.name,
                parent.name,
                info.local.map(|l| l.to_string()).unwrap_or_else(|| "-".into())
            ),
            fix: autodetect_fix(&good, None),
            evidence: Evidence::BridgeParent(BridgeParent {
                bridge_ports: ports.iter().map(|p| p.name.clone()).collect(),
                default_route_via: good,
                parent_addresses: strings(&parent.addrs),
                parent_device: parent.name.clone(),
                tunnel_device: vx.name.clone(),
            }),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    #[test]
    fn node_findings_flag_container_bridge_parent_and_overlap_only() {
        let p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
        let port = |idx: u32, master: u32, kind: Option<&str>| Link {
            index: idx,
            name: format!("port{idx}"),
            kind: kind.map(String::from),
            master: Some(master),
            up: true,
            l3: false,
            mtu: None,
            vxlan: None,
            addrs: vec![],
        };
        // Container bridge (only veth ports) as the VXLAN parent: flagged.
        let f = underlay_node(
            "10.51.0.101",
            vec![
                bridge_link(7, "nerdctl0"),
                port(9, 7, Some("veth")),
                vxlan_link(7, "10.4.0.1"),
            ],
        );
        let found = node_findings(&cx(&p, &f, 0));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(ev(&found[0].evidence)["parent_device"], "nerdctl0");
        assert_same_json(
            &found[0].evidence,
            json!({
                "tunnel_device": "vxlan.calico",
                "parent_device": "nerdctl0",
                "parent_addresses": ["10.4.0.1/24"],
                "bridge_ports": ["port9"],
                "default_route_via": "eth0",
            }),
        );
        // A host bridge with a physical NIC in it is a legitimate parent.
        let f = underlay_node(
            "10.51.0.101",
            vec![
                bridge_link(7, "br0"),
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
        assert_eq!(found[0].cause, Cause::IppoolOverlapsHostNetwork);
        assert_same_json(
            &found[0].evidence,
            json!({"pool": "10.0.0.0/8", "host_subnet": "10.51.0.0/24", "host_iface": "eth0"}),
        );
        assert!(node_findings(&cx(&p, &f, 0)).is_empty());
    }
}
