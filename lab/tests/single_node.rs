//! Seed 002 and its healthy control, observed at the packet level with no tracer code involved.
//! Needs root (namespaces, iptables, tcpdump); every test builds its own uniquely named lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use tracer_lab::calico::{self, Pool};
use tracer_lab::netns;
use tracer_lab::topo::{SingleNode, POD_NAME, POD_NAMESPACE};
use tracer_lab::traffic::{self, Capture};

const BLACKHOLE_TIMEOUT: Duration = Duration::from_secs(2);
const WORKING_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn healthy_pod_reaches_apiserver_and_service_through_masquerade() {
    let lab = SingleNode::build(&SingleNode::healthy()).unwrap();
    let pod = &lab.pod.netns;
    let vip = lab.service_addr().unwrap();

    assert!(traffic::tcp_probe(pod, lab.apiserver_addr(), WORKING_TIMEOUT).unwrap());
    assert!(traffic::tcp_probe(pod, vip, WORKING_TIMEOUT).unwrap());

    // One MASQUERADE hit per connection (nat rules see a connection's first packet only).
    let masq = calico::nat_outgoing_packets(&lab.node).unwrap();
    assert_eq!(masq, 2, "cali-nat-outgoing MASQUERADE packets");
    // And the receiving side agrees: the apiserver saw the node's address, not the pod's.
    let node_ip = IpAddr::V4(lab.node_ip().unwrap());
    let peers = lab.apiserver_server.peers();
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(peers.iter().all(|p| p.ip() == node_ip), "{peers:?}");
}

#[test]
fn seed_002_pod_to_apiserver_leaves_unmasqueraded_and_times_out() {
    let lab = SingleNode::build(&SingleNode::seed_002()).unwrap();
    let pod_ip = lab.pod.ip;
    let api = lab.apiserver_addr();
    let syn_out = Capture::start(
        &lab.node,
        &lab.node_nic,
        Some("out"),
        Some(1),
        &traffic::syn_filter(pod_ip, api),
    )
    .unwrap();
    // The SYN-ACK goes to the apiserver's default gateway, which cannot route it back.
    let synack_at_gw = Capture::start(
        &lab.gateway,
        "eth0",
        Some("in"),
        Some(1),
        &format!("tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack) and dst host {pod_ip}"),
    )
    .unwrap();

    assert!(!traffic::tcp_probe(&lab.pod.netns, api, BLACKHOLE_TIMEOUT).unwrap());

    let syn = syn_out.finish(WORKING_TIMEOUT);
    assert_eq!(syn.len(), 1, "SYN leaving the node's eth0: {syn:?}");
    assert!(
        syn[0].contains(&format!("IP {pod_ip}."))
            && syn[0].contains(&format!("> {}.{}: Flags [S]", api.ip(), api.port())),
        "the SYN left with the pod's source address: {}",
        syn[0]
    );
    let synack = synack_at_gw.finish(WORKING_TIMEOUT);
    eprintln!("node eth0 out: {syn:?}\ngateway eth0 in: {synack:?}");
    assert_eq!(
        synack.len(),
        1,
        "SYN-ACK arriving at the gateway: {synack:?}"
    );
    assert!(
        synack[0].contains(&format!("IP {}.{} > {pod_ip}.", api.ip(), api.port())),
        "{}",
        synack[0]
    );

    assert_eq!(calico::nat_outgoing_packets(&lab.node).unwrap(), 0);
    assert!(lab.apiserver_server.peers().is_empty());

    // The incident's symptom: the pod's `dial tcp 10.96.0.1:443: i/o timeout`...
    let vip = lab.service_addr().unwrap();
    assert!(!traffic::tcp_probe(&lab.pod.netns, vip, BLACKHOLE_TIMEOUT).unwrap());
    // ...while the same Service works from the node itself (the write-up's curl on the node).
    assert!(traffic::tcp_probe(&lab.node, vip, WORKING_TIMEOUT).unwrap());
    assert_eq!(calico::nat_outgoing_packets(&lab.node).unwrap(), 0);
}

#[test]
fn veth_name_is_calicos_sha1_formula() {
    let key = "kube-system.calico-kube-controllers-596576f79-j2pkg";
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("printf '%s' '{key}' | sha1sum"))
        .output()
        .unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    let expected = format!("cali{}", &hex[..11]);
    assert_eq!(
        calico::veth_name("kube-system", "calico-kube-controllers-596576f79-j2pkg"),
        expected
    );
    assert_eq!(expected, "calid92900560e3");
}

#[test]
fn pod_is_wired_like_calico_cni() {
    let lab = SingleNode::build(&SingleNode::healthy()).unwrap();
    let veth = calico::veth_name(POD_NAMESPACE, POD_NAME);
    assert_eq!(lab.pod.veth, veth);

    let link = lab.node.ip(&["-o", "link", "show", &veth]).unwrap();
    assert!(link.contains("link/ether ee:ee:ee:ee:ee:ee"), "{link}");
    let addrs = lab.node.ip(&["-o", "-4", "addr", "show", &veth]).unwrap();
    assert!(addrs.trim().is_empty(), "host veth has no address: {addrs}");
    let route = lab.node.ip(&["route", "get", "10.244.1.10"]).unwrap();
    assert!(route.contains(&format!("dev {veth}")), "{route}");
    let proxy_arp = lab
        .node
        .exec(&["cat", &format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp")])
        .unwrap();
    assert_eq!(proxy_arp.trim(), "1");

    let pod_routes = lab.pod.netns.ip(&["route"]).unwrap();
    assert!(
        pod_routes.contains("default via 169.254.1.1 dev eth0"),
        "{pod_routes}"
    );
    let pod_addr = lab
        .pod
        .netns
        .ip(&["-o", "-4", "addr", "show", "eth0"])
        .unwrap();
    assert!(pod_addr.contains("10.244.1.10/32"), "{pod_addr}");
}

/// felix's rules as `iptables-save` prints them on a real Calico (VXLAN) node.
const FELIX_NAT_LINES: &[&str] = &[
    r#"-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING"#,
    r#"-A OUTPUT -m comment --comment "cali:tVnHkvAo15HuiPy0" -j cali-OUTPUT"#,
    r#"-A POSTROUTING -m comment --comment "cali:O3lYWMrLQYEMJtB5" -j cali-POSTROUTING"#,
    r#"-A cali-OUTPUT -m comment --comment "cali:GBTAv2p5CwevEyJm" -j cali-fip-dnat"#,
    r#"-A cali-POSTROUTING -m comment --comment "cali:Z-c7XtVd2Bq7s_hA" -j cali-fip-snat"#,
    r#"-A cali-POSTROUTING -m comment --comment "cali:nYKhEzDlr11Jccal" -j cali-nat-outgoing"#,
    r#"-A cali-POSTROUTING -o vxlan.calico -m comment --comment "cali:e9dnSgSVNmIcpVhP" -m addrtype ! --src-type LOCAL --limit-iface-out -m addrtype --src-type LOCAL -j MASQUERADE --random-fully"#,
    r#"-A cali-PREROUTING -m comment --comment "cali:r6XmIziWUJsdOK6Z" -j cali-fip-dnat"#,
    r#"-A cali-nat-outgoing -m comment --comment "cali:flqWnvo8yq4ULQLa" -m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j MASQUERADE --random-fully"#,
];

#[test]
fn felix_nat_rules_and_ipsets_are_felixs() {
    let lab = SingleNode::build(&SingleNode::seed_002()).unwrap();
    let save = lab.node.exec(&["iptables-save", "-t", "nat"]).unwrap();
    for line in FELIX_NAT_LINES {
        assert_eq!(
            save.lines().filter(|l| l == line).count(),
            1,
            "missing {line}\nin:\n{save}"
        );
    }
    // felix's jumps come first in the kernel chains, kube-proxy's after.
    let prerouting: Vec<&str> = save
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING"))
        .collect();
    assert!(prerouting[0].contains("cali-PREROUTING"), "{prerouting:?}");
    assert!(
        save.contains("-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp")
            && save.contains("--dport 443 -j DNAT --to-destination 192.168.21.11:6443"),
        "{save}"
    );

    for set in [calico::ALL_POOLS_SET, calico::MASQ_POOLS_SET] {
        let list = lab.node.exec(&["ipset", "list", set]).unwrap();
        assert!(list.contains("Type: hash:net"), "{list}");
        assert!(
            list.contains("Header: family inet hashsize 1024 maxelem 1048576"),
            "{list}"
        );
        assert!(list.contains("\n192.168.0.0/16"), "{list}");
    }

    // A resync with other pools rewrites sets and chains without duplicating the jumps.
    calico::write_felix_nat(
        &lab.node,
        &[
            Pool::new("10.244.0.0/16", true),
            Pool::new("10.245.0.0/16", false),
        ],
    )
    .unwrap();
    let save = lab.node.exec(&["iptables-save", "-t", "nat"]).unwrap();
    for line in FELIX_NAT_LINES {
        assert_eq!(save.lines().filter(|l| l == line).count(), 1, "{line}");
    }
    let all = lab
        .node
        .exec(&["ipset", "list", calico::ALL_POOLS_SET])
        .unwrap();
    let masq = lab
        .node
        .exec(&["ipset", "list", calico::MASQ_POOLS_SET])
        .unwrap();
    assert!(
        all.contains("10.244.0.0/16")
            && all.contains("10.245.0.0/16")
            && !all.contains("192.168.0.0/16")
    );
    assert!(masq.contains("10.244.0.0/16") && !masq.contains("10.245.0.0/16"));
}

#[test]
fn namespaces_are_deleted_on_drop_and_on_panic() {
    let lab = SingleNode::build(&SingleNode::healthy()).unwrap();
    let names = lab.netns_names();
    assert_eq!(names.len(), 5);
    let listed = netns::list().unwrap();
    assert!(
        names.iter().all(|n| listed.contains(n)),
        "{names:?} in {listed:?}"
    );
    drop(lab);
    let listed = netns::list().unwrap();
    assert!(!names.iter().any(|n| listed.contains(n)), "{listed:?}");

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let result = std::panic::catch_unwind(move || {
        let lab = SingleNode::build(&SingleNode::seed_002()).unwrap();
        *seen2.lock().unwrap() = lab.netns_names();
        panic!("test failure while the lab is up");
    });
    assert!(result.is_err());
    let names = seen.lock().unwrap().clone();
    assert_eq!(names.len(), 5);
    let listed = netns::list().unwrap();
    assert!(!names.iter().any(|n| listed.contains(n)), "{listed:?}");
}

#[test]
fn build_rejects_addresses_outside_the_lab_ranges() {
    let mut cfg = SingleNode::healthy();
    cfg.host_subnet = "172.16.0.0/24".into();
    assert!(SingleNode::build(&cfg).is_err());
    let mut cfg = SingleNode::healthy();
    cfg.pod_ip = "10.99.0.1".into(); // outside its pool
    assert!(SingleNode::build(&cfg).is_err());
    let mut cfg = SingleNode::healthy();
    cfg.service_vip = Some(("8.8.8.8".into(), 443));
    assert!(SingleNode::build(&cfg).is_err());
}

#[test]
fn service_vip_is_reachable_only_via_dnat() {
    // Sanity of the DNAT itself: without a Service, the VIP leads nowhere.
    let mut cfg = SingleNode::healthy();
    cfg.service_vip = None;
    let lab = SingleNode::build(&cfg).unwrap();
    let vip: SocketAddr = "10.96.0.1:443".parse().unwrap();
    assert!(!traffic::tcp_probe(&lab.node, vip, Duration::from_millis(500)).unwrap());
    calico::write_service_dnat(&lab.node, "10.96.0.1", 443, "192.168.21.11", 6443).unwrap();
    assert!(traffic::tcp_probe(&lab.node, vip, WORKING_TIMEOUT).unwrap());
}
