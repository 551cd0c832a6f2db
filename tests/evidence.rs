//! Missing evidence is said, never turned into a diagnosis: with a ring buffer too small for
//! the traffic (4 KiB), the kernel drops records, replies among them. Every connection here was
//! answered, so any fault tracer reports must carry the evidence_incomplete flag.
mod common;

use std::{net::TcpStream, time::Duration};

use common::{query, Agent, TestResult, READY};
use tracer_lab::topo::SingleNode;

#[test]
fn a_tiny_ring_with_healthy_traffic_yields_no_unflagged_fault() -> TestResult {
    let cfg = SingleNode::healthy();
    let lab = SingleNode::build(&cfg)?;
    let mut agent = common::start(
        &lab.node,
        &["--ringbuf-bytes", "4096", "--no-reply-timeout", "1s"],
    )?;
    agent.wait_attached(
        &lab.node,
        &[lab.pod.veth.as_str(), lab.node_nic.as_str()],
        READY,
    )?;

    // Bursts of short connections from the pod to the apiserver, all answered.
    let addr = lab.apiserver_addr();
    let answered = lab.pod.netns.run(move || {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..300)
                        .filter(|_| {
                            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
                        })
                        .count()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(0))
            .sum::<usize>()
    })?;
    assert!(
        answered >= 1000,
        "only {answered} of 1200 connections were answered"
    );

    // Past the no-reply timeout and a reader tick.
    std::thread::sleep(Duration::from_millis(2_500));
    let d = agent.diagnoses(&lab.node)?;
    let lost = d.evidence.lost_records;
    assert!(
        lost > 0,
        "the 4 KiB ring never overflowed, so this test proved nothing: {d:?}"
    );
    assert!(!d.evidence.complete);
    for c in &d.causes {
        assert_eq!(
            c.evidence_incomplete, c.count,
            "a fault diagnosed on healthy traffic without saying records were lost: {c:?}"
        );
    }
    // No flow is called unanswered: those whose reply may be lost say so instead.
    let flows = agent.flows(&lab.node, &query("verdict=no_reply&limit=1000")?)?;
    for f in &flows.flows {
        assert!(
            f.evidence_incomplete.is_some(),
            "no_reply asserted although {lost} records were lost: {f:?}"
        );
    }
    let partial = agent.flows(&lab.node, &query("verdict=evidence_incomplete&limit=5")?)?;
    assert!(
        partial.matched > 0,
        "lost records left no flow marked: {partial:?}"
    );
    Ok(())
}

/// The ring's pending-bytes gauge, from /metrics.
fn pending(
    agent: &Agent,
    ns: &tracer_lab::netns::Netns,
) -> Result<f64, Box<dyn std::error::Error>> {
    let text = agent.get(ns, "/metrics")?.text();
    text.lines()
        .find_map(|l| l.strip_prefix("tracer_ringbuf_pending_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no tracer_ringbuf_pending_bytes in /metrics:\n{text}").into())
}

#[test]
fn the_pending_bytes_gauge_returns_to_zero_after_a_burst() -> TestResult {
    let cfg = SingleNode::healthy();
    let lab = SingleNode::build(&cfg)?;
    let mut agent = common::start(&lab.node, &[])?;
    agent.wait_attached(
        &lab.node,
        &[lab.pod.veth.as_str(), lab.node_nic.as_str()],
        READY,
    )?;
    let addr = lab.apiserver_addr();
    lab.pod.netns.run(move || {
        for _ in 0..300 {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        }
    })?;
    // A record is over 100 bytes: below that, nothing is pending.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = f64::MAX;
    while std::time::Instant::now() < deadline {
        last = pending(&agent, &lab.node)?;
        if last < 100.0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("the ring went quiet but the gauge still says {last} bytes pending").into())
}
