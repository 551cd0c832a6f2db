//! Seed 002 end to end: real programs in the real kernel, felix's real NAT rules, real packets.
//!
//! A pod on a `cali*` veth calls the apiserver Service (kube-proxy DNAT to a host-network
//! address). With a healthy pool felix masquerades and the reply returns; with a pool that
//! overlaps the host network the SYN leaves un-SNATed and the reply is lost at the gateway.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    connect_via_vip, get_json, has_verdict, query, Agent, FlowView, Res, TestResult, API_PORT,
    READY, VIP,
};
use tracer_lab::{topo::SingleNode, traffic};
use tracer_model::{
    diagnosis::{ExclusionEvidence, SnatExclusion},
    Cause, Dir, Evidence, Side, Verdict,
};

/// Nothing wrong on this node: no diagnosis group, no configuration finding.
fn assert_nothing_wrong(agent: &Agent, lab: &SingleNode) -> TestResult {
    let diag = agent.diagnoses(&lab.node)?;
    assert!(diag.causes.is_empty(), "{diag:?}");
    assert!(diag.node_findings.is_empty(), "{diag:?}");
    Ok(())
}

/// Starts an agent, has the pod call the VIP (which must fail here), and returns the agent and
/// the flow once it is `no_reply`.
fn unanswered_vip_flow(lab: &SingleNode) -> Res<(Agent, FlowView)> {
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    assert!(
        !connect_via_vip(lab)?,
        "the VIP must not answer in this lab"
    );
    let f = agent.wait_flow(
        &lab.node,
        &query(&format!("dst={VIP}"))?,
        Duration::from_secs(10),
        |f| has_verdict(f, Verdict::NoReply),
    )?;
    Ok((agent, f))
}

#[test]
fn healthy_pool_is_masqueraded_and_replied() -> TestResult {
    let cfg = SingleNode::healthy();
    let lab = SingleNode::build(&cfg)?;
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;

    assert!(connect_via_vip(&lab)?, "healthy lab must connect");

    let f = agent.wait_flow(
        &lab.node,
        &query(&format!("dst={VIP}&proto=tcp"))?,
        Duration::from_secs(10),
        |f| has_verdict(f, Verdict::Replied) && has_verdict(f, Verdict::SnatApplied),
    )?;
    assert_eq!(f.src.to_string(), lab.pod.ip.to_string());
    let nat = f.nat.ok_or("no NAT")?;
    assert_eq!(nat.src.to_string(), cfg.node_ip);
    assert_eq!(nat.dst.to_string(), cfg.apiserver_ip);
    assert!(!has_verdict(&f, Verdict::SnatSkipped) && !has_verdict(&f, Verdict::NoReply));
    assert!(f.diagnosis.is_none(), "healthy flow diagnosed: {f:?}");
    let path: Vec<(&str, Dir, Side)> = f
        .path
        .iter()
        .map(|h| (h.iface.as_str(), h.dir, h.side))
        .collect();
    let has = |i: &str, d: Dir, s: Side| path.iter().any(|&(a, b, c)| a == i && b == d && c == s);
    assert!(has(&lab.pod.veth, Dir::Ingress, Side::Forward), "{path:?}");
    assert!(has("eth0", Dir::Egress, Side::Forward), "{path:?}");
    assert!(has("eth0", Dir::Ingress, Side::Reverse), "{path:?}");
    assert!(has(&lab.pod.veth, Dir::Egress, Side::Reverse), "{path:?}");

    assert_nothing_wrong(&agent, &lab)?;

    // The translated destination finds the same flow.
    let by_real = agent.wait_flow(
        &lab.node,
        &query(&format!("dst={}", cfg.apiserver_ip))?,
        Duration::from_secs(2),
        |g| g.id == f.id,
    )?;
    assert_eq!(by_real.id, f.id);
    Ok(())
}

#[test]
fn seed_002_overlapping_pool_is_diagnosed() -> TestResult {
    let cfg = SingleNode::seed_002();
    let lab = SingleNode::build(&cfg)?;
    let (agent, f) = unanswered_vip_flow(&lab)?;
    assert!(has_verdict(&f, Verdict::SnatSkipped), "{f:?}");
    assert!(
        !has_verdict(&f, Verdict::SnatApplied) && !has_verdict(&f, Verdict::Replied),
        "{f:?}"
    );
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert_eq!(d.cause, Cause::IppoolOverlapsHostNetwork, "{f:?}");
    let Evidence::PoolOverlap(e) = &d.evidence else {
        return Err(format!("not pool overlap evidence: {d:?}").into());
    };
    assert_eq!(e.pool, "192.168.0.0/16");
    assert_eq!(e.host_subnet, cfg.host_subnet);
    assert_eq!(e.host_iface, "eth0");
    assert_eq!(e.left_node_unmasqueraded.src.to_string(), cfg.pod_ip);
    assert_eq!(e.left_node_unmasqueraded.dst.to_string(), cfg.apiserver_ip);
    assert_eq!(e.pools_source, "ipset");
    assert!(d.fix.contains("192.168.21.0/24"), "{d:?}");
    // DNAT happened (kube-proxy) but no SNAT: the nat view shows the real destination, pod source.
    let nat = f.nat.ok_or("no NAT")?;
    assert_eq!(nat.dst.to_string(), cfg.apiserver_ip);
    assert_eq!(nat.src.to_string(), cfg.pod_ip);

    // The node view groups it by cause and flags the pool from configuration alone.
    let diag = agent.diagnoses(&lab.node)?;
    let group = diag
        .causes
        .iter()
        .find(|g| g.cause == Cause::IppoolOverlapsHostNetwork)
        .ok_or_else(|| format!("no group in {diag:?}"))?;
    assert!(group.count >= 1);
    assert!(group.example_flows.contains(&f.id));
    let finding = diag
        .node_findings
        .iter()
        .find(|g| g.cause == Cause::IppoolOverlapsHostNetwork)
        .ok_or_else(|| format!("no finding in {diag:?}"))?;
    let Evidence::NodePoolOverlap(e) = &finding.evidence else {
        return Err(format!("not node pool overlap evidence: {finding:?}").into());
    };
    assert_eq!(e.host_subnet, cfg.host_subnet);

    // Filtering by verdict and cause finds it; the healthy verdict does not.
    let v = agent.flows(
        &lab.node,
        &query("verdict=snat_skipped&cause=ippool_overlaps_host_network")?,
    )?;
    assert!(v.flows.iter().any(|g| g.id == f.id));
    let v = agent.flows(
        &lab.node,
        &query(&format!("dst={VIP}&verdict=snat_applied"))?,
    )?;
    assert!(v.flows.is_empty(), "{v:?}");
    Ok(())
}

#[test]
fn pool_without_nat_outgoing_is_diagnosed() -> TestResult {
    let mut cfg = SingleNode::healthy();
    cfg.pool.nat_outgoing = false;
    let lab = SingleNode::build(&cfg)?;
    let (_agent, f) = unanswered_vip_flow(&lab)?;
    assert!(has_verdict(&f, Verdict::SnatSkipped), "{f:?}");
    assert_eq!(
        f.diagnosis.as_ref().map(|d| d.cause),
        Some(Cause::NatOutgoingDisabled),
        "{f:?}"
    );
    Ok(())
}

#[test]
// A wire-format test: error bodies are read as raw JSON.
fn bad_queries_get_json_400() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &["eth0"], READY)?;
    for q in [
        "/flows?dst=10.0.0.300",
        "/flows?port=99999",
        "/flows?verdict=nope",
        "/flows?dst=1.1.1.1&dst=2.2.2.2",
        "/flows?x=1",
        "/flows/abc",
    ] {
        let (status, v) = get_json(&agent, &lab.node, q)?;
        assert_eq!(status, 400, "{q}: {v:?}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{q}: {v:?}"
        );
    }
    let (status, v) = get_json(&agent, &lab.node, "/nope")?;
    assert_eq!(status, 404, "{v:?}");
    // Huge query strings and odd paths: clear JSON errors, never a 5xx.
    let huge = format!("/flows?dst={}", "9".repeat(5000));
    for q in [
        huge.as_str(),
        "/flows/1/2/3",
        "/flows/-1",
        "/flows/%00",
        "/%2e%2e/etc/passwd",
        "/flows?dst=1.1.1.1%00",
    ] {
        let (status, v) = get_json(&agent, &lab.node, q)?;
        assert!((400..500).contains(&status), "{q}: {status} {v:?}");
        assert!(v["error"].is_string(), "{q}: {v:?}");
    }
    // Garbage instead of HTTP: the connection is dropped, the agent keeps serving.
    let garbage = lab.node.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", API_PORT))?;
        s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        Ok::<_, std::io::Error>(buf)
    })??;
    assert!(!String::from_utf8_lossy(&garbage).contains(" 500 "));
    assert_eq!(agent.get(&lab.node, "/healthz")?.status, 200);
    assert_eq!(agent.get(&lab.node, "/flows/999999")?.status, 404);
    Ok(())
}

/// A flow felix left un-masqueraded on purpose: answered, `snat_excluded` naming `setting`, no
/// fault verdict, no diagnosis, and nothing on the node's diagnoses page.
fn assert_deliberate(
    agent: &Agent,
    lab: &SingleNode,
    query: &str,
    setting: &str,
) -> Res<(FlowView, SnatExclusion)> {
    let q = common::query(query)?;
    let f = agent.wait_flow(&lab.node, &q, Duration::from_secs(10), |f| {
        has_verdict(f, Verdict::Replied) && has_verdict(f, Verdict::SnatExcluded)
    })?;
    assert_eq!(f.src.to_string(), lab.pod.ip.to_string());
    for v in [Verdict::SnatSkipped, Verdict::SnatApplied, Verdict::NoReply] {
        assert!(!has_verdict(&f, v), "{v:?}: {f:?}");
    }
    assert!(
        f.diagnosis.is_none(),
        "deliberate exclusion diagnosed: {f:?}"
    );
    let x = f.snat_excluded.clone().ok_or("no snat_excluded")?;
    assert_eq!(x.setting, setting, "{f:?}");
    let leaving = match &x.evidence {
        ExclusionEvidence::InterfaceFilter {
            left_node_unmasqueraded,
            ..
        }
        | ExclusionEvidence::HostIps {
            left_node_unmasqueraded,
            ..
        }
        | ExclusionEvidence::LbOnlyPool {
            left_node_unmasqueraded,
            ..
        } => left_node_unmasqueraded,
    };
    assert_eq!(leaving.src.to_string(), lab.pod.ip.to_string());
    // felix's MASQUERADE rule really did not fire.
    assert_eq!(tracer_lab::calico::nat_outgoing_packets(&lab.node)?, 0);
    assert_nothing_wrong(agent, lab)?;
    let v = agent.flows(&lab.node, &common::query("verdict=snat_excluded")?)?;
    assert!(v.flows.iter().any(|g| g.id == f.id));
    Ok((f, x))
}

#[test]
fn host_ip_exclusion_is_not_a_fault() -> TestResult {
    // NATOutgoingExclusions=IPPoolsAndHostIPs: the apiserver is a node (in all-hosts-net) that
    // routes the pool back, so pod -> apiserver Service leaves un-masqueraded and is answered.
    let mut cfg = SingleNode::healthy();
    cfg.felix.exclude_host_ips = true;
    cfg.felix.host_ips = vec![cfg.node_ip.clone(), cfg.apiserver_ip.clone()];
    cfg.apiserver_routes_pool = true;
    let lab = SingleNode::build(&cfg)?;
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    assert!(connect_via_vip(&lab)?, "excluded host must still answer");
    let (f, x) = assert_deliberate(
        &agent,
        &lab,
        &format!("dst={VIP}&proto=tcp"),
        "NATOutgoingExclusions=IPPoolsAndHostIPs",
    )?;
    assert_eq!(
        f.nat.map(|n| n.dst.to_string()),
        Some(cfg.apiserver_ip.clone())
    );
    let ExclusionEvidence::HostIps { host_net, .. } = &x.evidence else {
        return Err(format!("not a host IP exclusion: {x:?}").into());
    };
    assert_eq!(*host_net, format!("{}/32", cfg.apiserver_ip));
    Ok(())
}

#[test]
fn interface_filter_is_not_a_fault() -> TestResult {
    // IptablesNATOutgoingInterfaceFilter=eth1: traffic leaving eth0 is not masqueraded.
    let mut cfg = SingleNode::healthy();
    cfg.felix.out_iface = Some("eth1".into());
    cfg.apiserver_routes_pool = true;
    let lab = SingleNode::build(&cfg)?;
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    assert!(
        connect_via_vip(&lab)?,
        "filtered-out traffic must still be answered"
    );
    let (_, x) = assert_deliberate(
        &agent,
        &lab,
        &format!("dst={VIP}&proto=tcp"),
        "IptablesNATOutgoingInterfaceFilter=eth1",
    )?;
    let ExclusionEvidence::InterfaceFilter {
        out_iface_filter, ..
    } = &x.evidence
    else {
        return Err(format!("not an interface filter exclusion: {x:?}").into());
    };
    assert_eq!(out_iface_filter, "eth1");
    Ok(())
}

#[test]
fn loadbalancer_only_pool_is_not_a_fault() -> TestResult {
    // A LoadBalancer-only pool carved from the host LAN, in all-ipam-pools (v3.32.0's rule)
    // with network-ip-pools beside it. The LoadBalancer address is held by the apiserver host
    // (an external load balancer), which routes the pool back.
    const LB_IP: &str = "192.168.21.200";
    let mut cfg = SingleNode::healthy();
    cfg.extra_pools = vec![tracer_lab::calico::Pool::load_balancer("192.168.21.192/27")];
    cfg.felix.pool_sets = tracer_lab::calico::PoolSets::AllIpamPoolsBesideNetworkIpPools;
    cfg.apiserver_routes_pool = true;
    let lab = SingleNode::build(&cfg)?;
    lab.apiserver
        .ip(&["addr", "add", &format!("{LB_IP}/32"), "dev", "eth0"])?;
    let lb: SocketAddr = format!("{LB_IP}:8443").parse()?;
    let _lb_server = traffic::TcpServer::start(&lab.apiserver, lb)?;
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    assert!(
        traffic::tcp_probe(&lab.pod.netns, lb, Duration::from_secs(2))?,
        "the LoadBalancer address must answer"
    );
    let (_, x) = assert_deliberate(
        &agent,
        &lab,
        &format!("dst={LB_IP}&proto=tcp"),
        "IPPool allowedUses=[LoadBalancer]",
    )?;
    let ExclusionEvidence::LbOnlyPool { lb_only_pool, .. } = &x.evidence else {
        return Err(format!("not a LoadBalancer-only pool exclusion: {x:?}").into());
    };
    assert_eq!(lb_only_pool, "192.168.21.192/27");
    Ok(())
}

#[test]
fn masquerade_not_applied_is_still_diagnosed_with_exclusions() -> TestResult {
    // The exclusion is on but the apiserver is no node (not in all-hosts-net): felix's rule
    // should masquerade, yet another tool's ACCEPT ahead of felix's jump takes the packet first.
    let mut cfg = SingleNode::healthy();
    cfg.felix.exclude_host_ips = true;
    cfg.felix.out_iface = Some("eth+".into());
    cfg.felix.host_ips = vec![cfg.node_ip.clone()];
    let lab = SingleNode::build(&cfg)?;
    lab.node.exec_with_stdin(
        &["iptables-restore", "-w", "--noflush"],
        "*nat\n-I POSTROUTING 1 -m comment --comment \"lab: rogue accept\" -j ACCEPT\nCOMMIT\n",
    )?;
    let (_agent, f) = unanswered_vip_flow(&lab)?;
    assert!(
        has_verdict(&f, Verdict::SnatSkipped) && !has_verdict(&f, Verdict::SnatExcluded),
        "{f:?}"
    );
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert_eq!(d.cause, Cause::MasqueradeNotApplied, "{f:?}");
    let Evidence::MasqueradeNotApplied(e) = &d.evidence else {
        return Err(format!("not masquerade evidence: {d:?}").into());
    };
    let rule = e.nat_outgoing_rule.as_ref().ok_or("no natOutgoing rule")?;
    assert!(rule.excludes_host_ips, "{f:?}");
    assert_eq!(rule.out_iface.as_deref(), Some("eth+"), "{f:?}");
    Ok(())
}
