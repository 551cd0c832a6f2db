//! Kernel drops: a NetworkPolicy-style iptables DROP in felix's forward chain is reported on the
//! flow with the kernel's own reason (from `skb:kfree_skb`), where it happened, and a fix.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{query, TestResult, READY};
use tracer_lab::{topo::SingleNode, traffic};
use tracer_model::{Cause, Evidence, Side, Verdict};

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
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    let health = agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let detail = health.detail.ok_or("/healthz without its detail")?;
    assert!(detail.drops.enabled, "{detail:?}");

    let dst: SocketAddr = format!("{}:{}", cfg.apiserver_ip, cfg.apiserver_port).parse()?;
    assert!(!traffic::tcp_probe(
        &lab.pod.netns,
        dst,
        Duration::from_secs(2)
    )?);

    let f = agent.wait_flow(
        &lab.node,
        &query(&format!("dst={}&verdict=dropped", cfg.apiserver_ip))?,
        Duration::from_secs(10),
        |f| f.verdicts.contains(&Verdict::NoReply),
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert_eq!(d.cause, Cause::KernelDrop, "{f:?}");
    let Evidence::KernelDrop(e) = &d.evidence else {
        return Err(format!("not kernel drop evidence: {f:?}").into());
    };
    let drop = e.drops.first().ok_or("no drops in the evidence")?;
    assert_eq!(drop.reason, "NETFILTER_DROP", "{f:?}");
    assert_eq!(
        drop.iface.as_deref(),
        Some(lab.pod.veth.as_str()),
        "dropped as it arrived from the pod: {f:?}"
    );
    assert!(drop.count >= 1);
    assert!(
        drop.function.as_ref().is_some_and(|s| !s.is_empty()),
        "kernel function named: {f:?}"
    );
    assert!(d.fix.contains("NetworkPolicy"));
    // It never left the node.
    let left = f
        .path
        .iter()
        .any(|h| h.iface == "eth0" && h.side == Side::Forward);
    assert!(!left, "{f:?}");
    // /metrics counts it by the kernel's reason, and the flow under its cause.
    let metrics = agent.get(&lab.node, "/metrics")?.text();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("tracer_kernel_drops_by_reason_total{reason=\"NETFILTER_DROP\"} ") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tracer_diagnoses_total{cause=\"kernel_drop\"} ") >= 1.0,
        "{metrics}"
    );
    Ok(())
}
