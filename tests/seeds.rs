//! The seed incidents on the two-node lab, end to end: real BIRD, real etcd, felix's VXLAN
//! device and NAT rules; tracer agents on both nodes must name each incident's cause, and stay
//! quiet on the healthy cluster.
mod common;

use std::{process::Command, time::Duration};

use common::{has_verdict, Agent, TestResult, AGENT_PORT};
use serde_json::Value;
use tracer_lab::{
    scenario::{self, ScenarioSpec},
    topo::Cluster,
};

/// Agents on every node, reachable across the underlay (for `tracer flows --agents`).
fn agents(lab: &Cluster, extra: &[&str]) -> Result<Vec<Agent>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for n in &lab.nodes {
        // Reachable from the other lab nodes without a token: say so explicitly.
        let mut args = vec!["--no-reply-timeout", "2s", "--insecure"];
        args.extend_from_slice(extra);
        let mut a = Agent::start_on(&n.netns, &format!("0.0.0.0:{AGENT_PORT}"), &args)?;
        a.wait_ready(&n.netns)?;
        out.push(a);
    }
    Ok(out)
}

fn causes(d: &Value) -> Vec<String> {
    d["causes"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|g| g["cause"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn healthy_cluster_raises_no_alarm() -> TestResult {
    let lab = Cluster::build(&scenario::healthy::Healthy.config())?;
    let agents = agents(&lab, &[])?;
    lab.wait_bgp(Duration::from_secs(15))?;
    let report = scenario::healthy::Healthy.drive(&lab)?;
    assert!(
        report.attempts.iter().all(|a| a.ok()),
        "{:?}",
        report.attempts
    );
    std::thread::sleep(Duration::from_secs(3));
    for (i, a) in agents.iter().enumerate() {
        let ns = &lab.nodes[i].netns;
        let (_, d) = a.get(ns, "/diagnoses")?;
        assert!(causes(&d).is_empty(), "{}: {d}", lab.nodes[i].name);
        assert_eq!(d["node_findings"].as_array().map(Vec::len), Some(0), "{d}");
    }
    // confd's v3.22+ mesh: ce-demo-2 (the greater address) dialed ce-demo-1, which only
    // answered; a completed passive-side handshake is no fault. (The session may predate the
    // agents: then BIRD's keepalives on it are all there is to see.)
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let (_, v) = agents[0].get(&n1.netns, &format!("/flows?port=179&src={}", n1.ip))?;
    assert!(
        v["flows"]
            .as_array()
            .is_some_and(|f| f.iter().all(|f| f["dport"] != 179)),
        "ce-demo-1 must not dial ce-demo-2: {v}"
    );
    let (_, v) = agents[0].get(&n1.netns, &format!("/flows?port=179&src={}", n2.ip))?;
    assert!(
        v["flows"]
            .as_array()
            .is_some_and(|f| f.iter().all(|f| f["diagnosis"].is_null())),
        "{v}"
    );
    // Cross-node pod traffic was seen encapsulated and answered on node1.
    let (_, v) = agents[0].get(&lab.nodes[0].netns, "/flows?verdict=encapsulated")?;
    let f = v["flows"]
        .as_array()
        .and_then(|f| f.first())
        .ok_or_else(|| format!("no encapsulated flow: {v}"))?;
    assert!(has_verdict(f, "replied"), "{f}");
    assert!(
        f["path"]
            .as_array()
            .is_some_and(|p| p.iter().any(|h| h["encap"]["vni"] == 4096)),
        "{f}"
    );
    Ok(())
}

/// The BGP-routed healthy cluster under confd's v3.22+ mesh: ce-demo-2 (the greater address)
/// dials, ce-demo-1 only answers. A session restarted while the agents watch is judged
/// healthy on both nodes.
#[test]
fn healthy_bgp_passive_mesh_raises_no_alarm() -> TestResult {
    let lab = Cluster::build(&scenario::healthy::bgp_config())?;
    let agents = agents(&lab, &[])?;
    lab.wait_bgp(Duration::from_secs(15))?;
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    // A new session, its handshake seen by both agents.
    let sock = n2.bird_socket().ok_or("no BIRD on ce-demo-2")?;
    let proto = tracer_lab::bird::mesh_protocol_name(n1.autodetected_ip);
    tracer_lab::bird::birdc(sock, &["restart", &proto])?;
    std::thread::sleep(Duration::from_secs(1));
    lab.wait_bgp(Duration::from_secs(15))?;
    let report = scenario::healthy::Healthy.drive(&lab)?;
    assert!(
        report.attempts.iter().all(|a| a.ok()),
        "{:?}",
        report.attempts
    );
    let f = agents[0].wait_flow(
        &n1.netns,
        &format!("port=179&src={}", n2.ip),
        Duration::from_secs(10),
        |f| f["dport"] == 179 && has_verdict(f, "replied"),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    for (i, a) in agents.iter().enumerate() {
        let ns = &lab.nodes[i].netns;
        let (_, d) = a.get(ns, "/diagnoses")?;
        assert!(causes(&d).is_empty(), "{}: {d}; {f}", lab.nodes[i].name);
    }
    let (_, v) = agents[0].get(&n1.netns, &format!("/flows?port=179&dst={}", n2.ip))?;
    assert!(
        v["flows"]
            .as_array()
            .is_some_and(|f| f.iter().all(|f| f["dport"] != 179)),
        "ce-demo-1 is passive, it must not dial: {v}"
    );
    Ok(())
}

#[test]
fn seed_001_far_datastore_is_datastore_latency() -> TestResult {
    let lab = Cluster::build(&scenario::seed_001::Seed001.config())?;
    // The manifests' liveness budget, as an operator would pass it.
    let agents = agents(&lab, &["--liveness-budget", "70s"])?;
    let report = scenario::seed_001::Seed001.drive(&lab)?;
    let startup = report.startup.ok_or("no startup report")?;
    assert!(
        !startup.finished_in_budget,
        "the lab's startup must outlive its budget: {startup:?}"
    );
    let f = agents[0].wait_flow(
        &lab.nodes[0].netns,
        "port=2379&verdict=slow_response",
        Duration::from_secs(10),
        |_| true,
    )?;
    let d = &f["diagnosis"];
    assert_eq!(d["cause"], "datastore_latency", "{f}");
    assert!(
        d["evidence"]["p50_ms"].as_f64().unwrap_or(0.0) >= 140.0,
        "{f}"
    );
    assert!(d["evidence"]["exchanges"].as_u64().unwrap_or(0) >= 5, "{f}");
    assert!(
        d["evidence"]["budget"]["sequential_reads_that_fit"]
            .as_u64()
            .is_some(),
        "{f}"
    );
    assert!(
        d["fix"].as_str().unwrap_or("").contains("livenessProbe"),
        "{f}"
    );
    Ok(())
}

#[test]
fn seed_003_vxlan_parent_on_a_bridge() -> TestResult {
    let lab = Cluster::build(&scenario::seed_003::Seed003.config())?;
    let agents = agents(&lab, &[])?;
    let _ = scenario::seed_003::Seed003.drive(&lab)?;
    // node2 (the misdetected one): its tunnel traffic carries the bridge's address.
    let n2 = &lab.nodes[1];
    let f = agents[1].wait_flow(
        &n2.netns,
        "cause=node_address_on_wrong_interface",
        Duration::from_secs(10),
        |_| true,
    )?;
    let ev = &f["diagnosis"]["evidence"];
    let named_bridge = ev["source_iface"] == "nerdctl0" || ev["parent_device"] == "nerdctl0";
    assert!(named_bridge, "{f}");
    assert!(
        f["diagnosis"]["fix"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("interface=^{}$", n2.nic)),
        "{f}"
    );
    assert!(
        has_verdict(&f, "wrong_source_address") || has_verdict(&f, "wrong_parent_device"),
        "{f}"
    );
    let (_, d) = agents[1].get(&n2.netns, "/diagnoses")?;
    let finding = d["node_findings"]
        .as_array()
        .and_then(|f| {
            f.iter()
                .find(|x| x["evidence"]["parent_device"] == "nerdctl0")
        })
        .ok_or_else(|| format!("no bridge finding: {d}"))?;
    assert_eq!(finding["cause"], "node_address_on_wrong_interface");
    // node1: its VXLAN goes to the peer's advertised 10.4.0.1, off its underlay.
    let n1 = &lab.nodes[0];
    let f = agents[0].wait_flow(
        &n1.netns,
        "verdict=encapsulated&verdict_ignored=0",
        Duration::from_secs(1),
        |_| true,
    );
    assert!(f.is_err(), "unknown parameters are refused");
    let f = agents[0].wait_flow(
        &n1.netns,
        "cause=node_address_on_wrong_interface",
        Duration::from_secs(10),
        |_| true,
    )?;
    assert_eq!(
        f["diagnosis"]["evidence"]["peer_address"], "10.4.0.1",
        "{f}"
    );
    assert!(
        has_verdict(&f, "encapsulated") && has_verdict(&f, "no_reply"),
        "{f}"
    );
    Ok(())
}

#[test]
fn seed_004_bgp_from_the_second_nic() -> TestResult {
    let lab = Cluster::build(&scenario::seed_004::Seed004::Active.config())?;
    let agents = agents(&lab, &[])?;
    let _ = scenario::seed_004::Seed004::Active.drive(&lab)?;
    // k8smater1's 10.66.0.66 is the greater address: it dials, from the wrong NIC's address.
    let n2 = &lab.nodes[1];
    let wrong = n2.autodetected_ip.to_string();
    assert_eq!(scenario::seed_004::dialer(&lab), 1);
    let f = agents[1].wait_flow(
        &n2.netns,
        "port=179&verdict=wrong_source_address",
        Duration::from_secs(15),
        |f| f["diagnosis"]["cause"] == "node_address_on_wrong_interface",
    )?;
    let ev = &f["diagnosis"]["evidence"];
    assert_eq!(ev["source"], wrong.as_str(), "{f}");
    assert_eq!(ev["egress_iface"], n2.nic, "{f}");
    assert!(
        f["diagnosis"]["summary"]
            .as_str()
            .unwrap_or("")
            .contains("BGP"),
        "{f}"
    );
    // k8smaster2 is passive: it never dials, it answers 10.66.0.66 through its gateway and the
    // handshake never completes.
    let n1 = &lab.nodes[0];
    let f = agents[0].wait_flow(
        &n1.netns,
        &format!("port=179&src={wrong}"),
        Duration::from_secs(15),
        |f| f["diagnosis"]["cause"] == "node_address_on_wrong_interface",
    )?;
    let ev = &f["diagnosis"]["evidence"];
    assert_eq!(ev["peer_address"], wrong.as_str(), "{f}");
    assert_eq!(ev["arrived_on"], n1.nic, "{f}");
    assert!(
        f["diagnosis"]["fix"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("owns {wrong}")),
        "{f}"
    );

    // One query across both nodes: merged, each flow naming its node; a dead agent is reported,
    // not fatal.
    let urls = lab
        .nodes
        .iter()
        .map(|n| format!("http://{}:{AGENT_PORT}", n.ip))
        .chain(std::iter::once(format!(
            "http://{}:{AGENT_PORT}",
            lab.gateway_ip()?
        )))
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            n1.netns.name(),
            env!("CARGO_BIN_EXE_tracer"),
            "flows",
            "--agents",
            &urls,
        ])
        .args(["--port", "179", "-o", "json"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let flows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for n in &lab.nodes {
        let url = format!("http://{}:{AGENT_PORT}", n.ip);
        assert!(
            flows.iter().any(|f| f["node"] == url.as_str()),
            "no flow from {url}: {flows:?}"
        );
    }
    assert!(
        stderr.contains(&lab.gateway_ip()?.to_string()) && stderr.contains("did not answer"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn seed_004_passive_misdetected_node_is_dialed() -> TestResult {
    let lab = Cluster::build(&scenario::seed_004::Seed004::Passive.config())?;
    let agents = agents(&lab, &[])?;
    let _ = scenario::seed_004::Seed004::Passive.drive(&lab)?;
    // k8smater1's 10.0.0.66 is the smaller address: k8smaster2 dials it, off its underlay.
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let wrong = n2.autodetected_ip.to_string();
    assert_eq!(scenario::seed_004::dialer(&lab), 0);
    let f = agents[0].wait_flow(
        &n1.netns,
        &format!("port=179&dst={wrong}"),
        Duration::from_secs(15),
        |f| f["diagnosis"]["cause"] == "node_address_on_wrong_interface",
    )?;
    assert!(has_verdict(&f, "no_reply"), "{f}");
    let d = &f["diagnosis"];
    assert_eq!(d["evidence"]["peer_address"], wrong.as_str(), "{f}");
    assert_eq!(
        d["evidence"]["route"]["via"],
        lab.gateway_ip()?.to_string().as_str(),
        "{f}"
    );
    assert!(
        d["summary"].as_str().unwrap_or("").contains("BGP")
            && d["fix"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("owns {wrong}")),
        "{f}"
    );
    // k8smater1 is passive and nothing reaches 10.0.0.66: it sees no BGP at all, so it must not
    // blame BGP itself; its pods' traffic only says the block route is missing.
    let (_, v) = agents[1].get(&n2.netns, "/flows?port=179")?;
    assert_eq!(v["flows"].as_array().map(Vec::len), Some(0), "{v}");
    let (_, d) = agents[1].get(&n2.netns, "/diagnoses")?;
    assert!(
        causes(&d)
            .iter()
            .all(|c| c == "pod_route_missing" || c == "destination_unresponsive"),
        "{d}"
    );
    Ok(())
}
