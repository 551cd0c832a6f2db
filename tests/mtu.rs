//! MTU and encapsulation on the two-node VXLAN lab, in felix's iptables and nftables
//! dataplanes: a switch port smaller than the tunnel assumes, and pods above the tunnel's MTU
//! with the node's ICMP fragmentation-needed dropped (by iptables, or by nft on an nft-only
//! node), must each be named `mtu_mismatch` by the sending node's agent, with the MTUs on its
//! path, for the stalled TCP transfer and for the full-size DF pings of the proof that smaller
//! ones outlived; with PMTU discovery working, nothing may be said, pings included. Each
//! variant's proof (DF pings either side of the limit, a 256 KiB transfer counted by the
//! receiving pod) is checked without tracer.
mod common;

use std::time::Duration;

use common::{query, Agent, TestResult, API_PORT, READY};
use tracer_lab::{
    calico::Dataplane,
    scenario::{mtu::Mtu, ScenarioSpec},
    topo::Cluster,
};
use tracer_model::{Cause, Evidence, Role};

fn agents(lab: &Cluster) -> Result<Vec<Agent>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for n in &lab.nodes {
        let mut a = common::start_on(
            &n.netns,
            &format!("0.0.0.0:{API_PORT}"),
            &["--no-reply-timeout", "2s", "--insecure"],
        )?;
        a.wait_ready(&n.netns, READY)?;
        out.push(a);
    }
    Ok(out)
}

/// Builds the variant in `dp`, drives it with the agents running, proves it without tracer,
/// judges the proof's pings, and returns node1's `mtu_mismatch` evidence for the transfer (None
/// when the variant is healthy and quiet).
fn run(
    s: Mtu,
    dp: Dataplane,
) -> Result<Option<tracer_model::diagnosis::MtuMismatch>, Box<dyn std::error::Error>> {
    let mut cfg = s.config();
    cfg.dataplane = dp;
    let lab = Cluster::build(&cfg)?;
    let agents = agents(&lab)?;
    let found = judged(s, &lab, &agents)?;
    // The packet-level proof, independent of tracer: DF pings either side of the limit and a
    // transfer counted by the receiving pod.
    for line in s.evidence(&lab)? {
        eprintln!("{} ({dp}): {line}", s.name());
    }
    pings_judged(s, &lab, &agents)?;
    Ok(found)
}

/// The proof's full-size `ping -M do` after smaller ones were answered: `mtu_mismatch` where
/// the path is too small (node to node and pod to pod in `mtu-underlay`, pod to pod in
/// `mtu-blackhole`); in `mtu-pmtud` the node's ICMP answered the pod's, and nothing is said.
fn pings_judged(s: Mtu, lab: &Cluster, agents: &[Agent]) -> TestResult {
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let a = lab.first_pod_on(0)?;
    let b = lab.first_pod_on(1)?;
    let q = query("proto=icmp&cause=mtu_mismatch")?;
    let ping = |src: std::net::IpAddr, dst: std::net::IpAddr| {
        agents[0].wait_flow(&n1.netns, &q, Duration::from_secs(10), |f| {
            f.src == src && f.dst == dst
        })
    };
    let evidence = |f: &tracer_model::FlowView| match f.diagnosis.as_ref().map(|d| &d.evidence) {
        Some(Evidence::MtuMismatch(e)) => Ok(e.clone()),
        other => Err(format!("{}: evidence {other:?}", s.name())),
    };
    match s {
        Mtu::Underlay => {
            let f = ping(n1.ip.into(), n2.ip.into())?;
            let e = evidence(&f)?;
            eprintln!(
                "{}: node ping: {}",
                s.name(),
                f.diagnosis.as_ref().map_or("", |d| d.summary.as_str())
            );
            // 1500 bytes, full size for eth0, after 1400 bytes were answered; outside the tunnel.
            assert_eq!(e.segment_bytes, 1500, "{e:?}");
            assert_eq!(mtu_of(&e, Role::Host), vec![("eth0".into(), 1500)], "{e:?}");
            assert!(e.tunnel.is_none() && e.icmp_too_big.is_empty(), "{e:?}");
            let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
            assert!(
                d.summary.starts_with("Requests of 1400 bytes"),
                "{}",
                d.summary
            );
            assert!(d.fix.contains("vxlan.calico adds 50 bytes"), "{}", d.fix);
            let e = evidence(&ping(a.ip().into(), b.ip().into())?)?;
            assert_eq!(e.segment_bytes, 1450, "{e:?}");
            assert_eq!(e.tunnel.as_ref().map(|t| t.overhead), Some(50), "{e:?}");
        }
        Mtu::Blackhole => {
            let e = evidence(&ping(a.ip().into(), b.ip().into())?)?;
            assert_eq!(e.segment_bytes, 1500, "{e:?}");
            assert!(
                e.pkt_too_big_drops > 0 && e.icmp_too_big.is_empty(),
                "{e:?}"
            );
        }
        Mtu::Pmtud => {
            std::thread::sleep(Duration::from_secs(3));
            for (i, a) in agents.iter().enumerate() {
                let d = a.diagnoses(&lab.nodes[i].netns)?;
                assert!(
                    d.causes.is_empty(),
                    "{} {} after the pings: {d:?}",
                    s.name(),
                    lab.nodes[i].name
                );
            }
        }
    }
    Ok(())
}

fn judged(
    s: Mtu,
    lab: &Cluster,
    agents: &[Agent],
) -> Result<Option<tracer_model::diagnosis::MtuMismatch>, Box<dyn std::error::Error>> {
    let report = s.drive(lab)?;
    eprintln!("{}: {report}", s.name());
    let n1 = &lab.nodes[0];
    if s.expected_cause().is_none() {
        assert!(report.attempts.iter().all(|a| a.ok()), "{report}");
        std::thread::sleep(Duration::from_secs(3));
        // PMTU discovery at work: the node dropped the first full-size segments as too big,
        // its ICMP taught the pod, and the data went through smaller. A drop tracer sees, and
        // says nothing about.
        let v = agents[0].flows(&n1.netns, &query("port=9090")?)?;
        let bulk = v
            .flows
            .first()
            .ok_or_else(|| format!("no bulk flow: {v:?}"))?;
        assert!(
            bulk.drops.iter().any(|d| d.reason == "PKT_TOO_BIG"),
            "{bulk:?}"
        );
        assert!(bulk.diagnosis.is_none(), "{bulk:?}");
        for (i, a) in agents.iter().enumerate() {
            let d = a.diagnoses(&lab.nodes[i].netns)?;
            assert!(
                d.causes.is_empty(),
                "{} {}: {d:?}",
                s.name(),
                lab.nodes[i].name
            );
        }
        return Ok(None);
    }
    assert!(report.attempts[0].ok(), "small packets pass: {report}");
    assert!(
        !report.attempts[1].ok(),
        "the bulk transfer stalls: {report}"
    );
    let f = agents[0].wait_flow(
        &n1.netns,
        &query("cause=mtu_mismatch")?,
        Duration::from_secs(10),
        |_| true,
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert_eq!(d.cause, Cause::MtuMismatch);
    eprintln!("{}: {}", s.name(), d.summary);
    assert!(
        d.fix.contains("Installation.spec.calicoNetwork.mtu"),
        "{}",
        d.fix
    );
    assert!(d.fix.contains("vxlanMTU"), "{}", d.fix);
    // The receiving node saw no full-size segment: nothing to say there.
    let d2 = agents[1].diagnoses(&lab.nodes[1].netns)?;
    assert!(
        d2.causes.iter().all(|c| c.cause != Cause::MtuMismatch),
        "{d2:?}"
    );
    match &d.evidence {
        Evidence::MtuMismatch(e) => Ok(Some(e.clone())),
        other => Err(format!("{}: evidence {other:?}", s.name()).into()),
    }
}

fn mtu_of(e: &tracer_model::diagnosis::MtuMismatch, role: Role) -> Vec<(String, u32)> {
    e.mtus
        .iter()
        .filter(|m| m.role == role)
        .map(|m| (m.iface.clone(), m.mtu))
        .collect()
}

/// The MTUs the evidence lists for node1's path: every pod veth, vxlan.calico and eth0.
fn path_mtus(e: &tracer_model::diagnosis::MtuMismatch, pod: u32, tunnel: u32, nic: u32) {
    assert!(
        mtu_of(e, Role::Workload).iter().all(|(_, m)| *m == pod),
        "{e:?}"
    );
    assert_eq!(
        mtu_of(e, Role::Tunnel),
        vec![("vxlan.calico".into(), tunnel)],
        "{e:?}"
    );
    assert!(
        mtu_of(e, Role::Host).contains(&("eth0".into(), nic)),
        "{e:?}"
    );
}

#[test]
fn underlay_smaller_than_the_tunnel_assumes() -> TestResult {
    underlay(Dataplane::Iptables)
}

#[test]
fn underlay_smaller_than_the_tunnel_assumes_nftables() -> TestResult {
    underlay(Dataplane::Nftables)
}

fn underlay(dp: Dataplane) -> TestResult {
    let e = run(Mtu::Underlay, dp)?.ok_or("no evidence")?;
    // Every MTU on node1's path, read from the node: pod veth 1450 = vxlan.calico 1450, NIC 1500.
    path_mtus(&e, 1450, 1450, 1500);
    assert_eq!(e.tunnel.as_ref().map(|t| t.overhead), Some(50), "{e:?}");
    // A switch drops silently: no ICMP, no kernel drop on the node, and that is said.
    assert!(e.icmp_too_big.is_empty(), "{e:?}");
    assert_eq!(e.pkt_too_big_drops, 0, "{e:?}");
    assert_eq!(e.missing.len(), 2, "{e:?}");
    assert!(
        e.segment_bytes + 40 >= 1450 && e.segment_bytes <= 1450,
        "{e:?}"
    );
    assert!(e.segment_retransmits >= 2, "{e:?}");
    Ok(())
}

#[test]
fn pod_mtu_above_the_tunnel_with_icmp_dropped() -> TestResult {
    blackhole(Dataplane::Iptables)
}

/// The host firewall written with nft: an nft-only node.
#[test]
fn pod_mtu_above_the_tunnel_with_icmp_dropped_nftables() -> TestResult {
    blackhole(Dataplane::Nftables)
}

fn blackhole(dp: Dataplane) -> TestResult {
    let e = run(Mtu::Blackhole, dp)?.ok_or("no evidence")?;
    path_mtus(&e, 1500, 1450, 1500);
    // The node dropped the pod's too-big packets itself (ip_forward: PKT_TOO_BIG); its ICMP
    // never left (the firewall), so tracer saw none.
    assert!(e.pkt_too_big_drops > 0, "{e:?}");
    assert!(e.icmp_too_big.is_empty(), "{e:?}");
    assert!(e.segment_bytes > 1450, "{e:?}");
    Ok(())
}

#[test]
fn working_pmtu_discovery_is_not_a_fault() -> TestResult {
    assert!(run(Mtu::Pmtud, Dataplane::Iptables)?.is_none());
    Ok(())
}

#[test]
fn working_pmtu_discovery_is_not_a_fault_nftables() -> TestResult {
    assert!(run(Mtu::Pmtud, Dataplane::Nftables)?.is_none());
    Ok(())
}

/// IPv6, the smallest honest setup (the lab has no IPv6): a sender, a router whose link on to
/// the receiver carries only 1400 bytes, and the receiver, in three namespaces. The router
/// answers the sender's full-size segments with ICMPv6 "packet too big" (MTU 1400); the
/// sender's host firewall (nft, its input hook) drops them after tracer's tc hook saw them, so
/// its TCP never learns and the transfer stalls: `mtu_mismatch` on the sender's agent, naming
/// the packet-too-big with its sender, interface and path MTU.
#[test]
fn ipv6_packet_too_big_names_the_router_and_the_path_mtu() -> TestResult {
    use std::net::{IpAddr, SocketAddr};
    use tracer_lab::{netns::Netns, traffic};

    const SENDER: &str = "fd00:a::1";
    const ROUTER: &str = "fd00:a::2";
    const RECEIVER: &str = "fd00:b::1";
    let p = tracer_lab::netns::unique_prefix();
    let a = Netns::create(&format!("{p}-v6a"))?;
    let r = Netns::create(&format!("{p}-v6r"))?;
    let b = Netns::create(&format!("{p}-v6b"))?;
    for ns in [&a, &r, &b] {
        ns.sysctl("net/ipv6/conf/all/disable_ipv6", "0")?;
        ns.sysctl("net/ipv6/conf/default/disable_ipv6", "0")?;
        // No duplicate address detection: link-local addresses usable at once for ND.
        ns.sysctl("net/ipv6/conf/all/accept_dad", "0")?;
        ns.sysctl("net/ipv6/conf/default/accept_dad", "0")?;
    }
    a.add_veth("eth0", "ra", &r)?;
    b.add_veth("eth0", "rb", &r)?;
    // The router's port towards the receiver carries 1400 bytes; every other MTU is 1500.
    r.ip(&["link", "set", "rb", "mtu", "1400"])?;
    r.sysctl("net/ipv6/conf/all/forwarding", "1")?;
    for (ns, dev, addr) in [
        (&a, "eth0", "fd00:a::1/64"),
        (&r, "ra", "fd00:a::2/64"),
        (&r, "rb", "fd00:b::2/64"),
        (&b, "eth0", "fd00:b::1/64"),
    ] {
        ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    a.ip(&["-6", "route", "add", "default", "via", ROUTER])?;
    b.ip(&["-6", "route", "add", "default", "via", "fd00:b::2"])?;
    a.exec_with_stdin(
        &["nft", "-f", "-"],
        "table ip6 host-firewall {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\ticmpv6 type packet-too-big counter drop\n\t}\n}\n",
    )?;

    let mut agent = common::start_on(
        &a,
        &format!("0.0.0.0:{API_PORT}"),
        &["--no-reply-timeout", "2s", "--insecure"],
    )?;
    agent.wait_ready(&a, READY)?;

    // The proof without tracer: a 1400-byte DF ping passes, the transfer stalls, and the
    // sender's firewall counted the router's packet-too-big.
    let ping = a
        .command("ping")
        .args([
            "-6", "-n", "-M", "do", "-c", "3", "-i", "0.3", "-W", "2", "-s", "1352", RECEIVER,
        ])
        .output()?;
    assert!(ping.status.success(), "{ping:?}");
    let sink = traffic::TcpSink::start(&b, SocketAddr::new(RECEIVER.parse()?, 9090))?;
    let got = traffic::tcp_bulk(&a, &sink, 256 * 1024, Duration::from_secs(4))?;
    assert!(got < 256 * 1024, "the transfer went through: {got} bytes");
    let fw = a.exec(&["nft", "list", "table", "ip6", "host-firewall"])?;
    assert!(!fw.contains("counter packets 0 "), "{fw}");
    eprintln!(
        "ipv6: {got} of 256 KiB delivered; sender's firewall: {}",
        fw.lines()
            .find(|l| l.contains("counter"))
            .unwrap_or("")
            .trim()
    );

    let f = agent.wait_flow(
        &a,
        &query("cause=mtu_mismatch&proto=tcp")?,
        Duration::from_secs(10),
        |f| f.dst == RECEIVER.parse::<IpAddr>().unwrap_or(f.dst),
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    eprintln!("ipv6: {}", d.summary);
    let Evidence::MtuMismatch(e) = &d.evidence else {
        return Err(format!("evidence {:?}", d.evidence).into());
    };
    assert_eq!(e.icmp_too_big.len(), 1, "{e:?}");
    let t = &e.icmp_too_big[0];
    assert_eq!(
        (t.from, t.to, t.iface.as_str(), t.path_mtu),
        (ROUTER.parse()?, SENDER.parse()?, "eth0", 1400),
        "{e:?}"
    );
    assert_eq!(
        mtu_of(&e.clone(), Role::Host),
        vec![("eth0".into(), 1500)],
        "{e:?}"
    );
    assert!(e.segment_bytes > 1400, "{e:?}");
    assert!(d.fix.contains("Set Calico's MTU to 1400."), "{}", d.fix);
    Ok(())
}
