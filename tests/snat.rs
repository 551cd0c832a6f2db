//! Seed 002 end to end: real programs in the real kernel, felix's real NAT rules, real packets.
//!
//! A pod on a `cali*` veth calls the apiserver Service (kube-proxy DNAT to a host-network
//! address). With a healthy pool felix masquerades and the reply returns; with a pool that
//! overlaps the host network the SYN leaves un-SNATed and the reply is lost at the gateway.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{has_verdict, Agent, TestResult};
use tracer_lab::{topo::SingleNode, traffic};

const VIP: &str = "10.96.0.1";

/// Nothing wrong on this node: no diagnosis group, no configuration finding.
fn assert_nothing_wrong(agent: &Agent, lab: &SingleNode) -> TestResult {
    let (_, diag) = agent.get(&lab.node, "/diagnoses")?;
    assert_eq!(diag["causes"].as_array().map(Vec::len), Some(0), "{diag}");
    assert_eq!(
        diag["node_findings"].as_array().map(Vec::len),
        Some(0),
        "{diag}"
    );
    Ok(())
}

fn connect_via_vip(lab: &SingleNode) -> Result<bool, Box<dyn std::error::Error>> {
    let vip: SocketAddr = format!("{VIP}:443").parse()?;
    Ok(traffic::tcp_probe(
        &lab.pod.netns,
        vip,
        Duration::from_secs(2),
    )?)
}

/// Starts an agent, has the pod call the VIP (which must fail here), and returns the agent and
/// the flow once it is `no_reply`.
fn unanswered_vip_flow(
    lab: &SingleNode,
) -> Result<(Agent, serde_json::Value), Box<dyn std::error::Error>> {
    let mut agent = Agent::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;
    assert!(
        !connect_via_vip(lab)?,
        "the VIP must not answer in this lab"
    );
    let f = agent.wait_flow(
        &lab.node,
        &format!("dst={VIP}"),
        Duration::from_secs(10),
        |f| has_verdict(f, "no_reply"),
    )?;
    Ok((agent, f))
}

#[test]
fn healthy_pool_is_masqueraded_and_replied() -> TestResult {
    let cfg = SingleNode::healthy();
    let lab = SingleNode::build(&cfg)?;
    let mut agent = Agent::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;

    assert!(connect_via_vip(&lab)?, "healthy lab must connect");

    let f = agent.wait_flow(
        &lab.node,
        &format!("dst={VIP}&proto=tcp"),
        Duration::from_secs(10),
        |f| has_verdict(f, "replied") && has_verdict(f, "snat_applied"),
    )?;
    assert_eq!(f["src"], lab.pod.ip.to_string());
    assert_eq!(f["nat"]["src"], cfg.node_ip);
    assert_eq!(f["nat"]["dst"], cfg.apiserver_ip);
    assert!(!has_verdict(&f, "snat_skipped") && !has_verdict(&f, "no_reply"));
    assert!(f["diagnosis"].is_null(), "healthy flow diagnosed: {f}");
    let path: Vec<(String, String, String)> = f["path"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|h| {
                    (
                        h["iface"].as_str().unwrap_or("").into(),
                        h["dir"].as_str().unwrap_or("").into(),
                        h["side"].as_str().unwrap_or("").into(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let has = |i: &str, d: &str, s: &str| path.iter().any(|(a, b, c)| a == i && b == d && c == s);
    assert!(has(&lab.pod.veth, "ingress", "forward"), "{path:?}");
    assert!(has("eth0", "egress", "forward"), "{path:?}");
    assert!(has("eth0", "ingress", "reverse"), "{path:?}");
    assert!(has(&lab.pod.veth, "egress", "reverse"), "{path:?}");

    assert_nothing_wrong(&agent, &lab)?;

    // The translated destination finds the same flow.
    let by_real = agent.wait_flow(
        &lab.node,
        &format!("dst={}", cfg.apiserver_ip),
        Duration::from_secs(2),
        |g| g["id"] == f["id"],
    )?;
    assert_eq!(by_real["id"], f["id"]);
    Ok(())
}

#[test]
fn seed_002_overlapping_pool_is_diagnosed() -> TestResult {
    let cfg = SingleNode::seed_002();
    let lab = SingleNode::build(&cfg)?;
    let (agent, f) = unanswered_vip_flow(&lab)?;
    assert!(has_verdict(&f, "snat_skipped"), "{f}");
    assert!(
        !has_verdict(&f, "snat_applied") && !has_verdict(&f, "replied"),
        "{f}"
    );
    let d = &f["diagnosis"];
    assert_eq!(d["cause"], "ippool_overlaps_host_network", "{f}");
    assert_eq!(d["evidence"]["pool"], "192.168.0.0/16");
    assert_eq!(d["evidence"]["host_subnet"], cfg.host_subnet);
    assert_eq!(d["evidence"]["host_iface"], "eth0");
    assert_eq!(d["evidence"]["left_node_unmasqueraded"]["src"], cfg.pod_ip);
    assert_eq!(
        d["evidence"]["left_node_unmasqueraded"]["dst"],
        cfg.apiserver_ip
    );
    assert_eq!(d["evidence"]["pools_source"], "ipset");
    assert!(
        d["fix"].as_str().unwrap_or("").contains("192.168.21.0/24"),
        "{d}"
    );
    // DNAT happened (kube-proxy) but no SNAT: the nat view shows the real destination, pod source.
    assert_eq!(f["nat"]["dst"], cfg.apiserver_ip);
    assert_eq!(f["nat"]["src"], cfg.pod_ip);

    // The node view groups it by cause and flags the pool from configuration alone.
    let (_, diag) = agent.get(&lab.node, "/diagnoses")?;
    let group = diag["causes"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|g| g["cause"] == "ippool_overlaps_host_network")
        })
        .ok_or_else(|| format!("no group in {diag}"))?;
    assert!(group["count"].as_u64().unwrap_or(0) >= 1);
    assert!(group["example_flows"]
        .as_array()
        .is_some_and(|e| e.contains(&f["id"])));
    let finding = diag["node_findings"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|g| g["cause"] == "ippool_overlaps_host_network")
        })
        .ok_or_else(|| format!("no finding in {diag}"))?;
    assert_eq!(finding["evidence"]["host_subnet"], cfg.host_subnet);

    // Filtering by verdict and cause finds it; the healthy verdict does not.
    let (_, v) = agent.get(
        &lab.node,
        "/flows?verdict=snat_skipped&cause=ippool_overlaps_host_network",
    )?;
    assert!(v["flows"]
        .as_array()
        .is_some_and(|a| a.iter().any(|g| g["id"] == f["id"])));
    let (_, v) = agent.get(&lab.node, &format!("/flows?dst={VIP}&verdict=snat_applied"))?;
    assert_eq!(v["flows"].as_array().map(Vec::len), Some(0), "{v}");
    Ok(())
}

#[test]
fn pool_without_nat_outgoing_is_diagnosed() -> TestResult {
    let mut cfg = SingleNode::healthy();
    cfg.pool.nat_outgoing = false;
    let lab = SingleNode::build(&cfg)?;
    let (_agent, f) = unanswered_vip_flow(&lab)?;
    assert!(has_verdict(&f, "snat_skipped"), "{f}");
    assert_eq!(f["diagnosis"]["cause"], "nat_outgoing_disabled", "{f}");
    Ok(())
}

#[test]
fn bad_queries_get_json_400() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = Agent::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &["eth0"])?;
    for q in [
        "/flows?dst=10.0.0.300",
        "/flows?port=99999",
        "/flows?verdict=nope",
        "/flows?dst=1.1.1.1&dst=2.2.2.2",
        "/flows?x=1",
        "/flows/abc",
    ] {
        let (status, v) = agent.get(&lab.node, q)?;
        assert_eq!(status, 400, "{q}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{q}: {v}"
        );
    }
    let (status, v) = agent.get(&lab.node, "/nope")?;
    assert_eq!(status, 404, "{v}");
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
        let (status, v) = agent.get(&lab.node, q)?;
        assert!((400..500).contains(&status), "{q}: {status} {v}");
        assert!(v["error"].is_string(), "{q}: {v}");
    }
    // Garbage instead of HTTP: the connection is dropped, the agent keeps serving.
    let garbage = lab.node.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", common::AGENT_PORT))?;
        s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        Ok::<_, std::io::Error>(buf)
    })??;
    assert!(!String::from_utf8_lossy(&garbage).contains(" 500 "));
    let (status, _) = agent.get(&lab.node, "/healthz")?;
    assert_eq!(status, 200);
    let (status, _) = agent.get(&lab.node, "/flows/999999")?;
    assert_eq!(status, 404);
    Ok(())
}

/// A flow felix left un-masqueraded on purpose: answered, `snat_excluded` naming `setting`, no
/// fault verdict, no diagnosis, and nothing on the node's diagnoses page.
fn assert_deliberate(
    agent: &Agent,
    lab: &SingleNode,
    query: &str,
    setting: &str,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let f = agent.wait_flow(&lab.node, query, Duration::from_secs(10), |f| {
        has_verdict(f, "replied") && has_verdict(f, "snat_excluded")
    })?;
    assert_eq!(f["src"], lab.pod.ip.to_string());
    for v in ["snat_skipped", "snat_applied", "no_reply"] {
        assert!(!has_verdict(&f, v), "{v}: {f}");
    }
    assert!(
        f["diagnosis"].is_null(),
        "deliberate exclusion diagnosed: {f}"
    );
    assert_eq!(f["snat_excluded"]["setting"], setting, "{f}");
    assert_eq!(
        f["snat_excluded"]["evidence"]["left_node_unmasqueraded"]["src"],
        lab.pod.ip.to_string()
    );
    // felix's MASQUERADE rule really did not fire.
    assert_eq!(tracer_lab::calico::nat_outgoing_packets(&lab.node)?, 0);
    assert_nothing_wrong(agent, lab)?;
    let (_, v) = agent.get(&lab.node, "/flows?verdict=snat_excluded")?;
    assert!(v["flows"]
        .as_array()
        .is_some_and(|a| a.iter().any(|g| g["id"] == f["id"])));
    Ok(f)
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
    let mut agent = Agent::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;
    assert!(connect_via_vip(&lab)?, "excluded host must still answer");
    let f = assert_deliberate(
        &agent,
        &lab,
        &format!("dst={VIP}&proto=tcp"),
        "NATOutgoingExclusions=IPPoolsAndHostIPs",
    )?;
    assert_eq!(f["nat"]["dst"], cfg.apiserver_ip);
    assert_eq!(
        f["snat_excluded"]["evidence"]["host_net"],
        format!("{}/32", cfg.apiserver_ip)
    );
    Ok(())
}

#[test]
fn interface_filter_is_not_a_fault() -> TestResult {
    // IptablesNATOutgoingInterfaceFilter=eth1: traffic leaving eth0 is not masqueraded.
    let mut cfg = SingleNode::healthy();
    cfg.felix.out_iface = Some("eth1".into());
    cfg.apiserver_routes_pool = true;
    let lab = SingleNode::build(&cfg)?;
    let mut agent = Agent::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;
    assert!(
        connect_via_vip(&lab)?,
        "filtered-out traffic must still be answered"
    );
    let f = assert_deliberate(
        &agent,
        &lab,
        &format!("dst={VIP}&proto=tcp"),
        "IptablesNATOutgoingInterfaceFilter=eth1",
    )?;
    assert_eq!(f["snat_excluded"]["evidence"]["out_iface_filter"], "eth1");
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
    let mut agent = Agent::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;
    assert!(
        traffic::tcp_probe(&lab.pod.netns, lb, Duration::from_secs(2))?,
        "the LoadBalancer address must answer"
    );
    let f = assert_deliberate(
        &agent,
        &lab,
        &format!("dst={LB_IP}&proto=tcp"),
        "IPPool allowedUses=[LoadBalancer]",
    )?;
    assert_eq!(
        f["snat_excluded"]["evidence"]["lb_only_pool"],
        "192.168.21.192/27"
    );
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
        has_verdict(&f, "snat_skipped") && !has_verdict(&f, "snat_excluded"),
        "{f}"
    );
    let d = &f["diagnosis"];
    assert_eq!(d["cause"], "masquerade_not_applied", "{f}");
    assert_eq!(
        d["evidence"]["nat_outgoing_rule"]["excludes_host_ips"], true,
        "{f}"
    );
    assert_eq!(
        d["evidence"]["nat_outgoing_rule"]["out_iface"], "eth+",
        "{f}"
    );
    Ok(())
}
