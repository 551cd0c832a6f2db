//! felix's nftables dataplane (Calico v3.32+ with `NFTablesMode=Auto` on an nftables
//! kube-proxy): the agent reads felix's nft sets and its `nat-cali-nat-outgoing` rule over
//! nfnetlink, in a namespace where the lab wrote them as felix renders them (`nft -f -`), and
//! seed 002 is still diagnosed there.
mod common;

use std::time::Duration;

use common::{connect_via_vip, has_verdict, query, TestResult, READY, VIP};
use tracer::calico::{read_pools, Dataplane, Pools};
use tracer_lab::{
    calico::{self, Dataplane as LabDataplane, Encapsulation, FelixNat, Pool, PoolSets},
    netns::{unique_prefix, Netns},
    topo::SingleNode,
};
use tracer_model::{diagnosis::Evidence, Cause, Verdict};

fn nft_felix(pool_sets: PoolSets) -> FelixNat {
    FelixNat {
        dataplane: LabDataplane::Nftables,
        pool_sets,
        ..FelixNat::default()
    }
}

/// What the agent's reader makes of the namespace, with no pools given on the command line.
fn pools_in(ns: &Netns) -> Result<Pools, Box<dyn std::error::Error>> {
    let pools = ns.run(|| -> std::io::Result<Pools> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(read_pools(&[], &[], Duration::from_secs(5))))
    })??;
    Ok(pools)
}

fn strs<T: ToString>(v: &[T]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

fn namespace() -> Result<Netns, Box<dyn std::error::Error>> {
    Ok(Netns::create(&format!("{}nft", unique_prefix()))?)
}

#[test]
fn felix_nft_sets_and_rule_are_read() -> TestResult {
    let ns = namespace()?;
    // v3.32.1: network-ip-pools, a LoadBalancer-only pool left out of it.
    let pools = [
        Pool::new("10.244.0.0/16", true),
        Pool::new("10.245.0.0/24", false),
        Pool::load_balancer("10.10.10.0/24"),
    ];
    calico::write_felix_nat_config(
        &ns,
        &pools,
        Encapsulation::Vxlan,
        &nft_felix(PoolSets::NetworkIpPools),
    )?;
    let p = pools_in(&ns)?;
    assert_eq!(p.dataplane, Dataplane::Nftables);
    assert_eq!(p.source, "nftables");
    assert_eq!(strs(&p.all), ["10.244.0.0/16", "10.245.0.0/24"], "{p:?}");
    assert_eq!(strs(&p.masq), ["10.244.0.0/16"]);
    assert!(p.lb_only.is_empty());
    let rule = p.nat_outgoing_v4.clone().unwrap_or_default();
    assert_eq!(rule.rules, 1);
    assert_eq!(rule.pool_set.as_deref(), Some("cali40network-ip-pools"));
    assert!(!rule.excludes_host_ips && rule.out_iface.is_none());
    // No `table ip6 calico`: the IPv6 sets and rule are reported missing, nothing else.
    assert_eq!(
        p.missing_sets,
        [
            "cali60all-ipam-pools|cali60network-ip-pools",
            "cali60masq-ipam-pools"
        ]
    );
    assert_eq!(
        p.nat_outgoing_errors.len(),
        1,
        "{:?}",
        p.nat_outgoing_errors
    );
    assert!(p.nat_outgoing_errors[0].contains("ip6 calico"));

    // v3.32.0's rule beside v3.32.1's set: the LoadBalancer-only pool is told apart.
    calico::write_felix_nat_config(
        &ns,
        &pools,
        Encapsulation::Vxlan,
        &nft_felix(PoolSets::AllIpamPoolsBesideNetworkIpPools),
    )?;
    let p = pools_in(&ns)?;
    assert_eq!(
        p.nat_outgoing_v4.as_ref().and_then(|r| r.pool_set.clone()),
        Some("cali40all-ipam-pools".into())
    );
    assert_eq!(strs(&p.lb_only), ["10.10.10.0/24"]);
    assert_eq!(p.all.len(), 3);
    Ok(())
}

#[test]
fn felix_nft_exclusions_and_interface_filter_are_read() -> TestResult {
    let ns = namespace()?;
    let felix = FelixNat {
        exclude_host_ips: true,
        out_iface: Some("eth+".into()),
        host_ips: vec!["10.51.0.100".into(), "10.51.0.101".into()],
        ..nft_felix(PoolSets::NetworkIpPools)
    };
    calico::write_felix_nat_config(
        &ns,
        &[Pool::new("10.244.0.0/16", true)],
        Encapsulation::None,
        &felix,
    )?;
    let p = pools_in(&ns)?;
    let rule = p.nat_outgoing_v4.clone().unwrap_or_default();
    assert!(rule.excludes_host_ips, "{rule:?}");
    assert_eq!(rule.out_iface.as_deref(), Some("eth+"));
    assert!(!rule.out_iface_negated);
    assert!(rule.matches_iface("eth1") && !rule.matches_iface("bond0"));
    let mut hosts = strs(p.host_nets_v4.as_deref().unwrap_or_default());
    hosts.sort();
    assert_eq!(hosts, ["10.51.0.100/32", "10.51.0.101/32"]);

    // An exact interface name.
    let felix = FelixNat {
        out_iface: Some("eth0".into()),
        ..felix
    };
    calico::write_felix_nat_config(
        &ns,
        &[Pool::new("10.244.0.0/16", true)],
        Encapsulation::None,
        &felix,
    )?;
    let rule = pools_in(&ns)?.nat_outgoing_v4.unwrap_or_default();
    assert_eq!(rule.out_iface.as_deref(), Some("eth0"));
    assert!(rule.matches_iface("eth0") && !rule.matches_iface("eth1"));
    Ok(())
}

#[test]
fn odd_felix_tables_are_reported_not_guessed() -> TestResult {
    let ns = namespace()?;
    // A table without felix's sets or natOutgoing chain (felix starting, or partly cleaned up).
    ns.exec_with_stdin(
        &["nft", "-f", "-"],
        "table ip calico {\n\tchain nat-POSTROUTING {\n\t\ttype nat hook postrouting priority srcnat + 10; policy accept;\n\t}\n}\n",
    )?;
    let p = pools_in(&ns)?;
    assert_eq!(p.dataplane, Dataplane::Nftables);
    assert_eq!(p.source, "none");
    assert!(p.nat_outgoing_v4.is_none());
    assert!(
        p.nat_outgoing_errors
            .iter()
            .any(|e| e == "nft ip calico nat-cali-nat-outgoing: no such chain"),
        "{:?}",
        p.nat_outgoing_errors
    );
    assert!(p
        .missing_sets
        .contains(&"cali40all-ipam-pools|cali40network-ip-pools".to_string()));
    assert!(p
        .missing_sets
        .contains(&"cali40masq-ipam-pools".to_string()));

    // An empty chain (no pool has natOutgoing) and non-interval sets of odd shapes, in IPv6.
    ns.exec_with_stdin(
        &["nft", "-f", "-"],
        "table ip6 calico {\n\
         \tset cali60all-ipam-pools {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd00:10::/64, fd00:20::1-fd00:20::6 }\n\t}\n\
         \tset cali60masq-ipam-pools {\n\t\ttype ipv6_addr\n\t\telements = { fd00:10::1 }\n\t}\n\
         \tchain nat-cali-nat-outgoing {\n\t}\n}\n",
    )?;
    let p = pools_in(&ns)?;
    assert_eq!(p.source, "nftables");
    assert_eq!(
        p.nat_outgoing_v6.clone().map(|r| r.rules),
        Some(0),
        "{:?}",
        p.nat_outgoing_errors
    );
    assert_eq!(
        strs(&p.all),
        [
            "fd00:10::/64",
            "fd00:20::1/128",
            "fd00:20::2/127",
            "fd00:20::4/127",
            "fd00:20::6/128"
        ]
    );
    assert_eq!(strs(&p.masq), ["fd00:10::1/128"]);

    // Two masquerade rules that disagree: an error, not a guess.
    ns.exec_with_stdin(
        &["nft", "-f", "-"],
        "table ip calico {\n\
         \tset cali40masq-ipam-pools {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t}\n\
         \tchain nat-cali-nat-outgoing {\n\
         \t\tip saddr @cali40masq-ipam-pools oifname \"eth0\" counter masquerade\n\
         \t\tip saddr @cali40masq-ipam-pools oifname \"eth1\" counter masquerade\n\t}\n}\n",
    )?;
    let p = pools_in(&ns)?;
    assert!(p.nat_outgoing_v4.is_none());
    assert!(
        p.nat_outgoing_errors.iter().any(|e| e.contains("disagree")),
        "{:?}",
        p.nat_outgoing_errors
    );

    // Without felix's table the ipset/iptables reader answers.
    ns.exec(&["nft", "delete", "table", "ip", "calico"])?;
    ns.exec(&["nft", "delete", "table", "ip6", "calico"])?;
    assert_eq!(pools_in(&ns)?.dataplane, Dataplane::Iptables);
    Ok(())
}

fn nft_single_node(
    mut cfg: tracer_lab::topo::SingleNodeConfig,
) -> Result<SingleNode, Box<dyn std::error::Error>> {
    cfg.felix.dataplane = LabDataplane::Nftables;
    Ok(SingleNode::build(&cfg)?)
}

/// The lab's nft masquerade really translates, and the agent sees it applied.
#[test]
fn healthy_pool_is_masqueraded_by_felix_nft_rule() -> TestResult {
    let lab = nft_single_node(SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let before = calico::nat_outgoing_packets(&lab.node)?;
    assert!(connect_via_vip(&lab)?, "healthy lab must connect");
    assert!(calico::nat_outgoing_packets(&lab.node)? > before);
    let f = agent.wait_flow(
        &lab.node,
        &query(&format!("dst={VIP}&proto=tcp"))?,
        Duration::from_secs(10),
        |f| has_verdict(f, Verdict::Replied) && has_verdict(f, Verdict::SnatApplied),
    )?;
    assert!(f.diagnosis.is_none(), "{f:?}");
    let health = agent.health(&lab.node)?;
    let pools = health.detail.map(|d| d.pools).ok_or("no /healthz detail")?;
    assert_eq!(pools.source, "nftables", "{pools:?}");
    Ok(())
}

/// Seed 002 on an nftables node: before, the agent found no pools and blamed the destination.
#[test]
fn seed_002_in_nftables_mode_is_an_overlap() -> TestResult {
    let lab = nft_single_node(SingleNode::seed_002())?;
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let health = agent.health(&lab.node)?;
    let pools = health.detail.map(|d| d.pools).ok_or("no /healthz detail")?;
    assert_eq!(pools.source, "nftables", "{pools:?}");
    assert_eq!(strs(&pools.all), ["192.168.0.0/16"], "{pools:?}");
    assert!(
        !connect_via_vip(&lab)?,
        "the VIP must not answer in seed 002"
    );
    // felix's nft masquerade rule did not fire: the packet-level fact the diagnosis explains.
    assert_eq!(calico::nat_outgoing_packets(&lab.node)?, 0);
    let f = agent.wait_flow(
        &lab.node,
        &query(&format!("dst={VIP}"))?,
        Duration::from_secs(10),
        |f| has_verdict(f, Verdict::NoReply),
    )?;
    assert!(has_verdict(&f, Verdict::SnatSkipped), "{f:?}");
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert_eq!(d.cause, Cause::IppoolOverlapsHostNetwork, "{f:?}");
    let Evidence::PoolOverlap(e) = &d.evidence else {
        return Err(format!("unexpected evidence {:?}", d.evidence).into());
    };
    assert_eq!(e.pools_source, "nftables", "{f:?}");
    assert_eq!(e.pool, "192.168.0.0/16", "{f:?}");
    Ok(())
}
