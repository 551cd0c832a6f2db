//! SNAT port exhaustion on the two-node lab, in both of felix's dataplanes: with
//! FelixConfiguration natPortRange 40000:40001, a pod's short connections to one external
//! address run out of source ports and conntrack drops their SYNs (`insert_failed`); the node's
//! agent must name `snat_port_exhaustion` with the counters and felix's port range read from
//! the dataplane. With a wide range the same traffic works and nothing may be said. Each
//! variant's proof (connect failures counted by the client, the counters' move, the source
//! ports the destination saw) is checked first, without tracer.
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{query, Agent, TestResult, API_PORT, READY};
use tracer_lab::{
    calico::Dataplane,
    scenario::{
        conntrack::{SnatPorts, DEST_PORT},
        ScenarioSpec,
    },
    topo::Cluster,
};
use tracer_model::{Cause, Evidence};

/// Builds the variant in `dataplane`, starts node1's agent (the masquerading node), drives the
/// traffic and proves the fault without tracer.
fn lab(s: SnatPorts, dataplane: Dataplane) -> Result<(Cluster, Agent), Box<dyn std::error::Error>> {
    let mut cfg = s.config();
    cfg.dataplane = dataplane;
    let lab = Cluster::build(&cfg)?;
    let n1 = &lab.nodes[0];
    let mut agent = common::start_on(
        &n1.netns,
        &format!("0.0.0.0:{API_PORT}"),
        &["--no-reply-timeout", "2s", "--insecure"],
    )?;
    agent.wait_ready(&n1.netns, READY)?;
    let report = s.drive(&lab)?;
    eprintln!("{} ({dataplane}):\n{report}", s.name());
    for line in s.evidence(&lab)? {
        eprintln!("{} ({dataplane}): {line}", s.name());
    }
    Ok((lab, agent))
}

fn exhausted(dataplane: Dataplane) -> TestResult {
    let s = SnatPorts::Narrow;
    let (lab, agent) = lab(s, dataplane)?;
    let n1 = &lab.nodes[0];
    let f = agent.wait_flow(
        &n1.netns,
        &query("cause=snat_port_exhaustion")?,
        Duration::from_secs(10),
        |_| true,
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert_eq!(d.cause, Cause::SnatPortExhaustion);
    eprintln!(
        "{} ({dataplane}): {}\n  fix: {}",
        s.name(),
        d.summary,
        d.fix
    );
    assert!(d.fix.contains("natPortRange"), "{}", d.fix);
    let Evidence::SnatPortExhaustion(e) = &d.evidence else {
        return Err(format!("evidence {:?}", d.evidence).into());
    };
    let external: IpAddr = lab.config.external_ip.parse()?;
    assert_eq!((e.destination, e.dport), (external, DEST_PORT), "{e:?}");
    assert!(e.conntrack.insert_failed >= 1, "{e:?}");
    assert!(e.conntrack.drop >= e.conntrack.insert_failed, "{e:?}");
    assert!(e.conntrack.max > 0, "{e:?}");
    // felix's rule as the agent read it from this dataplane.
    let rule = e.nat_rule.as_ref().ok_or("no NAT rule read")?;
    assert_eq!(rule.port_range.as_deref(), Some("40000-40001"), "{rule:?}");
    assert!(rule.random_fully, "{rule:?}");
    assert!(e.missing.is_empty(), "{e:?}");
    // The connections that got through are not blamed for it, nor for the drop of a later SYN
    // that conntrack dropped on their translated tuple (a new connection: not theirs).
    let answered = agent.flows(&n1.netns, &query(&format!("port={DEST_PORT}"))?)?;
    let ok: Vec<_> = answered
        .flows
        .iter()
        .filter(|f| f.verdicts.contains(&tracer_model::Verdict::Replied))
        .collect();
    assert!(!ok.is_empty(), "{answered:?}");
    assert!(
        ok.iter().all(|f| f
            .diagnosis
            .as_ref()
            .is_none_or(|d| d.cause != Cause::SnatPortExhaustion)),
        "{ok:?}"
    );
    assert!(ok.iter().all(|f| f.drops.is_empty()), "{ok:?}");
    Ok(())
}

fn wide(dataplane: Dataplane) -> TestResult {
    let s = SnatPorts::Wide;
    let (lab, agent) = lab(s, dataplane)?;
    let n1 = &lab.nodes[0];
    // Past the no-reply timeout: anything unanswered would have been judged by now.
    std::thread::sleep(Duration::from_secs(3));
    let flows = agent.flows(&n1.netns, &query(&format!("port={DEST_PORT}"))?)?;
    assert!(flows.flows.len() >= 2, "{flows:?}");
    let d = agent.diagnoses(&n1.netns)?;
    assert!(d.causes.is_empty(), "{} ({dataplane}): {d:?}", s.name());
    Ok(())
}

#[test]
fn narrow_nat_port_range_iptables() -> TestResult {
    exhausted(Dataplane::Iptables)
}

#[test]
fn narrow_nat_port_range_nftables() -> TestResult {
    exhausted(Dataplane::Nftables)
}

#[test]
fn wide_nat_port_range_is_quiet_iptables() -> TestResult {
    wide(Dataplane::Iptables)
}

#[test]
fn wide_nat_port_range_is_quiet_nftables() -> TestResult {
    wide(Dataplane::Nftables)
}
