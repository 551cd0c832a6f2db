//! Kernel drops: a NetworkPolicy-style iptables DROP in felix's forward chain is reported on the
//! flow with the kernel's own reason (from `skb:kfree_skb`), where it happened, and a fix.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{has_verdict, Agent, TestResult};
use tracer_lab::{topo::SingleNode, traffic};

#[test]
fn policy_drop_is_reported_with_kernel_reason() -> TestResult {
    let cfg = SingleNode::healthy();
    let lab = SingleNode::build(&cfg)?;
    // felix (iptables dataplane) ends a workload's egress policy chain with this DROP when no
    // policy allowed the packet.
    let fw = format!("cali-fw-{}", lab.pod.veth);
    for rule in [
        vec!["-N", "cali-FORWARD"],
        vec![
            "-I",
            "FORWARD",
            "1",
            "-m",
            "comment",
            "--comment",
            "cali:wUHhoiAYhphO9Mso",
            "-j",
            "cali-FORWARD",
        ],
        vec!["-N", fw.as_str()],
        vec![
            "-A",
            "cali-FORWARD",
            "-i",
            lab.pod.veth.as_str(),
            "-m",
            "comment",
            "--comment",
            "cali:from-wl",
            "-j",
            fw.as_str(),
        ],
        vec![
            "-A",
            fw.as_str(),
            "-m",
            "comment",
            "--comment",
            "cali:Drop if no policies passed packet",
            "-j",
            "DROP",
        ],
    ] {
        let mut args = vec!["iptables", "-w"];
        args.extend(rule);
        lab.node.exec(&args)?;
    }
    let mut agent = Agent::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;
    let (_, health) = agent.get(&lab.node, "/healthz")?;
    assert_eq!(health["drops"]["enabled"], true, "{health}");

    let dst: SocketAddr = format!("{}:{}", cfg.apiserver_ip, cfg.apiserver_port).parse()?;
    assert!(!traffic::tcp_probe(
        &lab.pod.netns,
        dst,
        Duration::from_secs(2)
    )?);

    let f = agent.wait_flow(
        &lab.node,
        &format!("dst={}&verdict=dropped", cfg.apiserver_ip),
        Duration::from_secs(10),
        |f| has_verdict(f, "no_reply"),
    )?;
    let d = &f["diagnosis"];
    assert_eq!(d["cause"], "kernel_drop", "{f}");
    let drop = &d["evidence"]["drops"][0];
    assert_eq!(drop["reason"], "NETFILTER_DROP", "{f}");
    assert_eq!(
        drop["iface"], lab.pod.veth,
        "dropped as it arrived from the pod: {f}"
    );
    assert!(drop["count"].as_u64().unwrap_or(0) >= 1);
    assert!(
        drop["function"].as_str().is_some_and(|s| !s.is_empty()),
        "kernel function named: {f}"
    );
    assert!(d["fix"].as_str().unwrap_or("").contains("NetworkPolicy"));
    // It never left the node.
    let left = f["path"].as_array().is_some_and(|p| {
        p.iter()
            .any(|h| h["iface"] == "eth0" && h["side"] == "forward")
    });
    assert!(!left, "{f}");
    Ok(())
}
