//! Correlation on synthetic observations.
use super::*;
use crate::{
    events::{Dir, Encap},
    testutil::{ip, obs, tcp as pkt},
};

trait Must {
    fn must(self) -> FlowId;
}

impl Must for Option<FlowId> {
    fn must(self) -> FlowId {
        self.unwrap_or(0)
    }
}

const CALI: u32 = 5;
const ETH0: u32 = 2;
const VXLAN: u32 = 9;

fn lookup(i: u32) -> (std::sync::Arc<str>, Option<crate::calico::Role>) {
    use crate::calico::Role;
    match i {
        CALI => ("calid92900560e3".into(), Some(Role::Workload)),
        ETH0 => ("eth0".into(), Some(Role::Host)),
        VXLAN => ("vxlan.calico".into(), Some(Role::Tunnel)),
        other => (format!("if{other}").into(), None),
    }
}

#[test]
fn snat_and_dnat_correlate_into_one_flow() {
    let mut t = FlowTable::new(100);
    // Pod -> Service VIP; kube-proxy DNATs to the apiserver, felix masquerades to the node.
    let syn = pkt("10.244.1.10", 40000, "10.96.0.1", 443, 0x02, 1000, 0);
    let a = t.ingest(&obs(1, CALI, Dir::Ingress, syn), &lookup).must();
    let out = pkt("192.168.21.10", 61000, "192.168.21.11", 6443, 0x02, 1000, 0);
    let b = t.ingest(&obs(2, ETH0, Dir::Egress, out), &lookup).must();
    assert_eq!(a, b, "translated SYN joins the pod's flow");
    let synack_in = pkt(
        "192.168.21.11",
        6443,
        "192.168.21.10",
        61000,
        0x12,
        5000,
        1001,
    );
    let c = t
        .ingest(&obs(3, ETH0, Dir::Ingress, synack_in), &lookup)
        .must();
    let synack_pod = pkt("10.96.0.1", 443, "10.244.1.10", 40000, 0x12, 5000, 1001);
    let d = t
        .ingest(&obs(4, CALI, Dir::Egress, synack_pod), &lookup)
        .must();
    assert_eq!((a, a), (c, d));
    assert_eq!(t.len(), 1);
    let f = t.get(a).unwrap_or_else(|| unreachable!());
    let nat = f.nat.unwrap_or_else(|| unreachable!());
    assert_eq!(
        (nat.src, nat.dst, nat.dport),
        (ip("192.168.21.10"), ip("192.168.21.11"), 6443)
    );
    assert_eq!(f.first_reply_ns, Some(3));
    assert!(f.tcp.syn && f.tcp.syn_ack);
    assert_eq!(f.hops.len(), 4);
    assert_eq!(f.hops.iter().filter(|h| h.side == Side::Reverse).count(), 2);
}

#[test]
fn unnatted_packet_across_hooks_is_one_flow_without_nat() {
    let mut t = FlowTable::new(100);
    let syn = pkt("192.168.236.10", 59894, "192.168.21.11", 6443, 0x02, 7, 0);
    let a = t.ingest(&obs(1, CALI, Dir::Ingress, syn), &lookup).must();
    let b = t.ingest(&obs(2, ETH0, Dir::Egress, syn), &lookup).must();
    // Retransmitted SYN (same ISN) four seconds later stays in the flow and is counted.
    let c = t
        .ingest(&obs(4_000_000_000, CALI, Dir::Ingress, syn), &lookup)
        .must();
    assert_eq!((a, a), (b, c));
    let f = t.get(a).unwrap_or_else(|| unreachable!());
    assert!(f.nat.is_none());
    assert!(f.first_reply_ns.is_none());
    assert!(f.expects_reply);
    assert_eq!(f.retransmits(), 1);
}

#[test]
fn syn_ack_first_orients_the_flow_and_new_isn_starts_a_new_flow() {
    let mut t = FlowTable::new(100);
    let synack = pkt("10.0.0.2", 80, "10.0.0.1", 50000, 0x12, 9, 1);
    let a = t
        .ingest(&obs(1, ETH0, Dir::Ingress, synack), &lookup)
        .must();
    let f = t.get(a).unwrap_or_else(|| unreachable!());
    assert_eq!((f.src, f.dport), (ip("10.0.0.1"), 80));
    let syn1 = pkt("10.0.0.1", 50000, "10.0.0.2", 80, 0x02, 100, 0);
    let b = t.ingest(&obs(2, ETH0, Dir::Egress, syn1), &lookup).must();
    let syn2 = pkt("10.0.0.1", 50000, "10.0.0.2", 80, 0x02, 999_999, 0);
    let c = t.ingest(&obs(3, ETH0, Dir::Egress, syn2), &lookup).must();
    assert_eq!(
        a, b,
        "first SYN on the tuple joins the flow opened by the SYN-ACK"
    );
    assert_ne!(b, c, "a new ISN on a reused tuple is a new connection");
}

#[test]
fn vxlan_inner_packet_joins_the_pod_flow() {
    let mut t = FlowTable::new(100);
    let syn = pkt("10.244.1.10", 40000, "10.244.2.20", 8080, 0x02, 1, 0);
    let a = t.ingest(&obs(1, CALI, Dir::Ingress, syn), &lookup).must();
    let b = t.ingest(&obs(2, VXLAN, Dir::Egress, syn), &lookup).must();
    let mut o = obs(
        3,
        ETH0,
        Dir::Egress,
        pkt("192.168.21.10", 51000, "192.168.21.12", 4789, 0, 0, 0),
    );
    o.outer.proto = 17;
    o.inner = Some((Encap::Vxlan, 4096, syn));
    let c = t.ingest(&o, &lookup).must();
    assert_eq!((a, a), (b, c));
    let f = t.get(a).unwrap_or_else(|| unreachable!());
    let enc = f.hops[2].encap.as_ref().unwrap_or_else(|| unreachable!());
    assert_eq!((enc.vni, enc.outer_dport), (Some(4096), 4789));
    assert!(f.nat.is_none());
}

#[test]
fn icmp_echo_and_reply_pair_up_including_ipv6() {
    let mut t = FlowTable::new(100);
    for (src, dst, proto, req, rep) in [
        ("10.0.0.1", "10.0.0.2", 1u8, 8u16, 0u16),
        ("fd00::1", "fd00::2", 58, 128, 129),
    ] {
        let mut q = pkt(src, 77, dst, req << 8, 0, 1, 0);
        q.proto = proto;
        let mut r = pkt(dst, 77, src, rep << 8, 0, 1, 0);
        r.proto = proto;
        let a = t.ingest(&obs(1, ETH0, Dir::Egress, q), &lookup).must();
        let b = t.ingest(&obs(2, ETH0, Dir::Ingress, r), &lookup).must();
        assert_eq!(a, b);
        let f = t.get(a).unwrap_or_else(|| unreachable!());
        assert!(f.expects_reply && f.first_reply_ns == Some(2));
    }
}

#[test]
fn out_of_order_reply_before_request_still_one_flow() {
    // Records from two CPUs can interleave: the reply may be read before the request.
    let mut t = FlowTable::new(100);
    let synack = pkt("10.0.0.2", 443, "10.0.0.1", 40001, 0x12, 50, 11);
    let syn = pkt("10.0.0.1", 40001, "10.0.0.2", 443, 0x02, 10, 0);
    let a = t
        .ingest(&obs(2, ETH0, Dir::Ingress, synack), &lookup)
        .must();
    let b = t.ingest(&obs(1, ETH0, Dir::Egress, syn), &lookup).must();
    assert_eq!(a, b);
    let f = t.get(a).unwrap_or_else(|| unreachable!());
    assert_eq!((f.src, f.sport), (ip("10.0.0.1"), 40001));
}

#[test]
fn cap_evicts_oldest_and_cleans_index() {
    let mut t = FlowTable::new(3);
    for i in 0..10u16 {
        let p = pkt(
            "10.0.0.1",
            1000 + i,
            "10.0.0.2",
            80,
            0x02,
            u32::from(i) + 1,
            0,
        );
        t.ingest(&obs(u64::from(i), ETH0, Dir::Egress, p), &lookup)
            .must();
    }
    assert_eq!(t.len(), 3);
    assert_eq!(t.stats().evicted, 7);
    assert!(t.index.len() <= 3 * 4);
    t.sweep(u64::MAX);
    assert!(t.fp_snat.is_empty() && t.fp_dnat.is_empty() && t.fp_both.is_empty());
}

#[test]
fn unrelated_flows_to_same_destination_stay_apart() {
    let mut t = FlowTable::new(100);
    let a = t
        .ingest(
            &obs(
                1,
                CALI,
                Dir::Ingress,
                pkt("10.244.1.10", 40000, "1.1.1.1", 443, 0x02, 111, 0),
            ),
            &lookup,
        )
        .must();
    let b = t
        .ingest(
            &obs(
                2,
                CALI,
                Dir::Ingress,
                pkt("10.244.1.11", 40000, "1.1.1.1", 443, 0x02, 222, 0),
            ),
            &lookup,
        )
        .must();
    assert_ne!(a, b);
}

#[test]
fn ipv6_link_control_is_ignored_and_weak_idents_never_match() {
    let mut t = FlowTable::new(100);
    let mut ns = pkt("fe80::1", 0, "ff02::1:ff00:1", 135 << 8, 0, 0, 0);
    ns.proto = 58;
    assert_eq!(t.ingest(&obs(1, CALI, Dir::Ingress, ns), &lookup), None);
    // Two UDP datagrams with IP ID 0 to one server: no fingerprint pairing between them.
    let mut a = pkt("10.0.0.1", 5000, "10.0.0.9", 53, 0, 0, 0);
    a.proto = 17;
    a.ip_id = 0;
    let mut b = a;
    b.src = ip("10.0.0.7");
    let x = t.ingest(&obs(1, CALI, Dir::Ingress, a), &lookup).must();
    let y = t.ingest(&obs(2, ETH0, Dir::Egress, b), &lookup).must();
    assert_ne!(x, y);
    assert_eq!(t.stats().ignored, 1);
}

#[test]
fn kernel_drops_attach_to_the_flow_and_fold() {
    use crate::events::KernelDrop;
    let mut t = FlowTable::new(10);
    let syn = pkt("10.244.1.10", 40000, "10.244.2.20", 8080, 0x02, 1, 0);
    let id = t.ingest(&obs(1, CALI, Dir::Ingress, syn), &lookup).must();
    for ts in 2..5 {
        let mut d = obs(ts, ETH0, Dir::Ingress, syn);
        d.drop = Some(KernelDrop {
            reason: 12,
            location: 0xabc,
        });
        assert_eq!(t.ingest(&d, &lookup), Some(id));
    }
    let mut stray = obs(
        9,
        ETH0,
        Dir::Ingress,
        pkt("1.2.3.4", 1, "5.6.7.8", 2, 0x02, 3, 0),
    );
    stray.drop = Some(KernelDrop {
        reason: 3,
        location: 0,
    });
    assert_eq!(t.ingest(&stray, &lookup), None);
    let f = t.get(id).unwrap_or_else(|| unreachable!());
    assert_eq!(f.drops.len(), 1);
    assert_eq!((f.drops[0].reason, f.drops[0].count), (12, 3));
    assert_eq!(
        (t.stats().drops, t.stats().unmatched_drops, t.len()),
        (3, 1, 1)
    );
}

#[test]
fn request_response_turns_are_timed_at_the_first_hop() {
    let mut t = FlowTable::new(10);
    let syn = pkt("192.168.21.10", 40000, "192.168.21.50", 2379, 0x02, 1, 0);
    let id = t.ingest(&obs(0, ETH0, Dir::Egress, syn), &lookup).must();
    let mut ts = 1_000_000u64;
    for i in 0..5u32 {
        let mut req = pkt(
            "192.168.21.10",
            40000,
            "192.168.21.50",
            2379,
            0x18,
            100 + i,
            0,
        );
        req.payload_len = 60;
        t.ingest(&obs(ts, ETH0, Dir::Egress, req), &lookup);
        // A second request segment before the answer is not a new exchange.
        t.ingest(&obs(ts + 10, ETH0, Dir::Egress, req), &lookup);
        let mut resp = pkt(
            "192.168.21.50",
            2379,
            "192.168.21.10",
            40000,
            0x18,
            900 + i,
            0,
        );
        resp.payload_len = 300;
        ts += 150_000_000;
        t.ingest(&obs(ts, ETH0, Dir::Ingress, resp), &lookup);
        // The same response seen at another interface does not count twice.
        t.ingest(&obs(ts + 5, CALI, Dir::Egress, resp), &lookup);
        ts += 1_000_000;
    }
    let f = t.get(id).unwrap_or_else(|| unreachable!());
    assert_eq!(f.exchanges.count, 5);
    assert_eq!(f.exchanges.quantile_us(0.5), Some(150_000));
    assert_eq!(f.exchanges.max_ns, 150_000_000);
}

#[test]
fn latency_samples_stay_bounded_and_cover_the_whole_connection() {
    let mut t = FlowTable::new(10);
    let syn = pkt("192.168.21.10", 40000, "192.168.21.50", 2379, 0x02, 1, 0);
    let id = t.ingest(&obs(0, ETH0, Dir::Egress, syn), &lookup).must();
    let mut ts = 1_000_000u64;
    // 1000 exchanges whose latency grows: a reservoir keeps late ones too.
    for i in 0..1000u64 {
        let mut req = pkt(
            "192.168.21.10",
            40000,
            "192.168.21.50",
            2379,
            0x18,
            10 + i as u32,
            0,
        );
        req.payload_len = 10;
        t.ingest(&obs(ts, ETH0, Dir::Egress, req), &lookup);
        ts += 1_000 * (i + 1);
        let mut resp = pkt(
            "192.168.21.50",
            2379,
            "192.168.21.10",
            40000,
            0x18,
            900 + i as u32,
            0,
        );
        resp.payload_len = 10;
        t.ingest(&obs(ts, ETH0, Dir::Ingress, resp), &lookup);
        ts += 1_000;
    }
    let f = t.get(id).unwrap_or_else(|| unreachable!());
    assert_eq!(f.exchanges.count, 1000);
    assert_eq!(f.exchanges.latencies_us.len(), 32);
    assert!(
        f.exchanges.latencies_us.iter().any(|us| *us > 500),
        "only early samples: {:?}",
        f.exchanges.latencies_us
    );
}
