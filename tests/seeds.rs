//! The seed incidents on the two-node lab, end to end: real BIRD, real etcd, felix's VXLAN
//! device and NAT rules; tracer agents on both nodes must name each incident's cause, and stay
//! quiet on the healthy cluster.
mod common;

use std::{process::Command, time::Duration};

use common::{has_verdict, query, Agent, FlowView, TestResult, API_PORT, READY};
use serde_json::Value;
use tracer_lab::{
    scenario::{self, ScenarioSpec},
    topo::Cluster,
};
use tracer_model::{Cause, DiagnosesAnswer, Evidence, Verdict};

/// Agents on every node, reachable across the underlay (for `tracer flows --agents`).
fn agents(lab: &Cluster, extra: &[&str]) -> Result<Vec<Agent>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for n in &lab.nodes {
        // Reachable from the other lab nodes without a token: say so explicitly.
        let mut args = vec!["--no-reply-timeout", "2s", "--insecure"];
        args.extend_from_slice(extra);
        let mut a = common::start_on(&n.netns, &format!("0.0.0.0:{API_PORT}"), &args)?;
        a.wait_ready(&n.netns, READY)?;
        out.push(a);
    }
    Ok(out)
}

fn causes(d: &DiagnosesAnswer) -> Vec<Cause> {
    d.causes.iter().map(|g| g.cause).collect()
}

fn cause(f: &FlowView) -> Option<Cause> {
    f.diagnosis.as_ref().map(|d| d.cause)
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
        let d = a.diagnoses(ns)?;
        assert!(causes(&d).is_empty(), "{}: {d:?}", lab.nodes[i].name);
        assert!(d.node_findings.is_empty(), "{d:?}");
    }
    // confd's v3.22+ mesh: ce-demo-2 (the greater address) dialed ce-demo-1, which only
    // answered; a completed passive-side handshake is no fault. (The session may predate the
    // agents: then BIRD's keepalives on it are all there is to see.)
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let v = agents[0].flows(&n1.netns, &query(&format!("port=179&src={}", n1.ip))?)?;
    assert!(
        v.flows.iter().all(|f| f.dport != 179),
        "ce-demo-1 must not dial ce-demo-2: {v:?}"
    );
    let v = agents[0].flows(&n1.netns, &query(&format!("port=179&src={}", n2.ip))?)?;
    assert!(v.flows.iter().all(|f| f.diagnosis.is_none()), "{v:?}");
    // Cross-node pod traffic was seen encapsulated and answered on node1.
    let v = agents[0].flows(&lab.nodes[0].netns, &query("verdict=encapsulated")?)?;
    let f = v
        .flows
        .first()
        .ok_or_else(|| format!("no encapsulated flow: {v:?}"))?;
    assert!(has_verdict(f, Verdict::Replied), "{f:?}");
    assert!(
        f.path
            .iter()
            .any(|h| h.encap.as_ref().and_then(|e| e.vni) == Some(4096)),
        "{f:?}"
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
        &query(&format!("port=179&src={}", n2.ip))?,
        Duration::from_secs(10),
        |f| f.dport == 179 && has_verdict(f, Verdict::Replied),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    for (i, a) in agents.iter().enumerate() {
        let ns = &lab.nodes[i].netns;
        let d = a.diagnoses(ns)?;
        assert!(causes(&d).is_empty(), "{}: {d:?}; {f:?}", lab.nodes[i].name);
    }
    let v = agents[0].flows(&n1.netns, &query(&format!("port=179&dst={}", n2.ip))?)?;
    assert!(
        v.flows.iter().all(|f| f.dport != 179),
        "ce-demo-1 is passive, it must not dial: {v:?}"
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
        &query("port=2379&verdict=slow_response")?,
        Duration::from_secs(10),
        |_| true,
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert_eq!(d.cause, Cause::DatastoreLatency, "{f:?}");
    let Evidence::DatastoreLatency(e) = &d.evidence else {
        return Err(format!("not datastore evidence: {f:?}").into());
    };
    assert!(e.p50_ms >= 140.0, "{f:?}");
    assert!(e.exchanges >= 5, "{f:?}");
    assert!(e.budget.is_some(), "{f:?}");
    assert!(d.fix.contains("livenessProbe"), "{f:?}");
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
        &query("cause=node_address_on_wrong_interface")?,
        Duration::from_secs(10),
        |_| true,
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    let named_bridge = match &d.evidence {
        Evidence::WrongSource(e) => e.source_iface == "nerdctl0",
        Evidence::WrongParent(e) => e.parent_device == "nerdctl0",
        _ => false,
    };
    assert!(named_bridge, "{f:?}");
    assert!(d.fix.contains(&format!("interface=^{}$", n2.nic)), "{f:?}");
    assert!(
        has_verdict(&f, Verdict::WrongSourceAddress) || has_verdict(&f, Verdict::WrongParentDevice),
        "{f:?}"
    );
    let d = agents[1].diagnoses(&n2.netns)?;
    let finding = d
        .node_findings
        .iter()
        .find(|x| matches!(&x.evidence, Evidence::BridgeParent(e) if e.parent_device == "nerdctl0"))
        .ok_or_else(|| format!("no bridge finding: {d:?}"))?;
    assert_eq!(finding.cause, Cause::NodeAddressOnWrongInterface);
    // node1: its VXLAN goes to the peer's advertised 10.4.0.1, off its underlay.
    let n1 = &lab.nodes[0];
    // Wire format: the agent itself refuses it (the client-side query type cannot say it).
    let r = agents[0].get(&n1.netns, "/flows?verdict=encapsulated&verdict_ignored=0")?;
    assert_eq!(r.status, 400, "unknown parameters are refused");
    // node1's BGP session to 10.4.0.1 has the same cause: wait for the tunnel's flow.
    let f = agents[0].wait_flow(
        &n1.netns,
        &query("cause=node_address_on_wrong_interface")?,
        Duration::from_secs(10),
        |f| has_verdict(f, Verdict::Encapsulated),
    )?;
    let peer = match f.diagnosis.as_ref().map(|d| &d.evidence) {
        Some(Evidence::OffLinkPeer(e)) => Some(e.peer_address),
        Some(Evidence::UnackedOffLinkPeer(e)) => Some(e.peer_address),
        _ => None,
    };
    assert_eq!(
        peer.map(|p| p.to_string()).as_deref(),
        Some("10.4.0.1"),
        "{f:?}"
    );
    assert!(
        has_verdict(&f, Verdict::Encapsulated) && has_verdict(&f, Verdict::NoReply),
        "{f:?}"
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
        &query("port=179&verdict=wrong_source_address")?,
        Duration::from_secs(15),
        |f| cause(f) == Some(Cause::NodeAddressOnWrongInterface),
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    let Evidence::WrongSource(e) = &d.evidence else {
        return Err(format!("not wrong source evidence: {f:?}").into());
    };
    assert_eq!(e.source.to_string(), wrong, "{f:?}");
    assert_eq!(e.egress_iface, n2.nic, "{f:?}");
    assert!(d.summary.contains("BGP"), "{f:?}");
    // k8smaster2 is passive: it never dials, it answers 10.66.0.66 through its gateway and the
    // handshake never completes.
    let n1 = &lab.nodes[0];
    let f = agents[0].wait_flow(
        &n1.netns,
        &query(&format!("port=179&src={wrong}"))?,
        Duration::from_secs(15),
        |f| cause(f) == Some(Cause::NodeAddressOnWrongInterface),
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    let Evidence::UnackedOffLinkPeer(e) = &d.evidence else {
        return Err(format!("not unacked peer evidence: {f:?}").into());
    };
    assert_eq!(e.peer_address.to_string(), wrong, "{f:?}");
    assert_eq!(e.arrived_on, n1.nic, "{f:?}");
    assert!(d.fix.contains(&format!("owns {wrong}")), "{f:?}");

    // One query across both nodes: merged, each flow naming its node; a dead agent is reported,
    // not fatal.
    let urls = lab
        .nodes
        .iter()
        .map(|n| format!("http://{}:{API_PORT}", n.ip))
        .chain(std::iter::once(format!(
            "http://{}:{API_PORT}",
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
    // The gateway runs no agent: a partial answer, exit status 3, the silent node named.
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("did not answer"), "{stderr}");
    // The CLI's JSON lines (flows plus `node`), read as JSON.
    let flows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for n in &lab.nodes {
        let url = format!("http://{}:{API_PORT}", n.ip);
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
        &query(&format!("port=179&dst={wrong}"))?,
        Duration::from_secs(15),
        |f| cause(f) == Some(Cause::NodeAddressOnWrongInterface),
    )?;
    assert!(has_verdict(&f, Verdict::NoReply), "{f:?}");
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    let Evidence::OffLinkPeer(e) = &d.evidence else {
        return Err(format!("not off-link peer evidence: {f:?}").into());
    };
    assert_eq!(e.peer_address.to_string(), wrong, "{f:?}");
    assert_eq!(
        e.route.via.map(|v| v.to_string()),
        Some(lab.gateway_ip()?.to_string()),
        "{f:?}"
    );
    assert!(
        d.summary.contains("BGP") && d.fix.contains(&format!("owns {wrong}")),
        "{f:?}"
    );
    // k8smater1 is passive and nothing reaches 10.0.0.66: it sees no BGP at all, so it must not
    // blame BGP itself; its pods' traffic only says the block route is missing.
    let v = agents[1].flows(&n2.netns, &query("port=179")?)?;
    assert!(v.flows.is_empty(), "{v:?}");
    let d = agents[1].diagnoses(&n2.netns)?;
    assert!(
        causes(&d)
            .iter()
            .all(|c| matches!(c, Cause::PodRouteMissing | Cause::DestinationUnresponsive)),
        "{d:?}"
    );
    Ok(())
}
