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

/// A UDP datagram with the given IP ID.
fn udp(src: &str, sport: u16, dst: &str, dport: u16, ip_id: u16) -> crate::events::Packet {
    let mut p = pkt(src, sport, dst, dport, 0, 0, 0);
    p.proto = 17;
    p.ip_id = ip_id;
    p
}

/// Ingests `a` at the pod's veth and `b` leaving eth0; returns their flows.
fn at_veth_then_nic(
    t: &mut FlowTable,
    a: crate::events::Packet,
    b: crate::events::Packet,
) -> (FlowId, FlowId) {
    let x = t.ingest(&obs(1, CALI, Dir::Ingress, a), &lookup).must();
    let y = t.ingest(&obs(2, ETH0, Dir::Egress, b), &lookup).must();
    (x, y)
}

/// A payload segment of client 192.168.21.10:40000 <-> etcd 192.168.21.50:2379.
fn etcd(request: bool, seq: u32, payload_len: u16) -> crate::events::Packet {
    let (c, s) = (("192.168.21.10", 40000), ("192.168.21.50", 2379));
    let ((src, sport), (dst, dport)) = if request { (c, s) } else { (s, c) };
    let mut p = pkt(src, sport, dst, dport, 0x18, seq, 0);
    p.payload_len = payload_len;
    p
}

const CALI: u32 = 5;
const ETH0: u32 = 2;
const VXLAN: u32 = 9;

fn lookup(i: u32) -> std::sync::Arc<Iface> {
    use crate::calico::Role;
    match i {
        CALI => Iface::new("calid92900560e3", i, Some(Role::Workload)),
        ETH0 => Iface::new("eth0", i, Some(Role::Host)),
        VXLAN => Iface::new("vxlan.calico", i, Some(Role::Tunnel)),
        other => Iface::unnamed(other),
    }
}

#[test]
fn snat_and_dnat_correlate_into_one_flow() {
    let mut t = FlowTable::new(100);
    // Pod -> Service VIP; kube-proxy DNATs to the apiserver, felix masquerades to the node.
    let syn = pkt("10.244.1.10", 40000, "10.96.0.1", 443, 0x02, 1000, 0);
    let a = t
        .ingest(&obs(1_000, CALI, Dir::Ingress, syn), &lookup)
        .must();
    let out = pkt("192.168.21.10", 61000, "192.168.21.11", 6443, 0x02, 1000, 0);
    let b = t
        .ingest(&obs(2_000, ETH0, Dir::Egress, out), &lookup)
        .must();
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
        .ingest(&obs(3_000, ETH0, Dir::Ingress, synack_in), &lookup)
        .must();
    let synack_pod = pkt("10.96.0.1", 443, "10.244.1.10", 40000, 0x12, 5000, 1001);
    let d = t
        .ingest(&obs(4_000, CALI, Dir::Egress, synack_pod), &lookup)
        .must();
    assert_eq!((a, a), (c, d));
    assert_eq!(t.len(), 1);
    let f = t.get(a).unwrap_or_else(|| unreachable!());
    let nat = f.nat.unwrap_or_else(|| unreachable!());
    assert_eq!(
        (nat.src, nat.dst, nat.dport),
        (ip("192.168.21.10"), ip("192.168.21.11"), 6443)
    );
    assert_eq!(f.first_reply_ns(), Some(3_000));
    assert!(f.tcp.syn && f.tcp.syn_ack);
    assert_eq!(f.hops().count(), 4);
    assert_eq!(f.hops().filter(|h| h.side == Side::Reverse).count(), 2);
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
    assert!(f.first_reply_ns().is_none());
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
    let hop = f.path().nth(2).unwrap_or_else(|| unreachable!());
    let enc = hop.encap.unwrap_or_else(|| unreachable!());
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
        let a = t.ingest(&obs(1_000, ETH0, Dir::Egress, q), &lookup).must();
        let b = t.ingest(&obs(2_000, ETH0, Dir::Ingress, r), &lookup).must();
        assert_eq!(a, b);
        let f = t.get(a).unwrap_or_else(|| unreachable!());
        assert!(f.expects_reply && f.first_reply_ns() == Some(2_000));
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
    assert_eq!(t.index.len(), 3, "one entry per live tuple pair");
    // Fingerprints expire in record time: a sweep far past the last record clears them all.
    t.latest_ns = u64::MAX;
    t.sweep(u64::MAX);
    assert!(t.fingerprints.is_empty());
}

#[test]
fn a_new_flow_is_never_its_own_evictions_victim() {
    // Every flow of a small table active since it entered: second chances move them all
    // behind a new flow, which must still keep its first record, not be evicted empty.
    let mut t = FlowTable::new(2);
    let mut ts = 0u64;
    for i in 0..6u16 {
        let p = pkt(
            "10.0.0.1",
            1000 + i,
            "10.0.0.2",
            80,
            0x02,
            u32::from(i) + 1,
            0,
        );
        ts += 1;
        let id = t.ingest(&obs(ts, ETH0, Dir::Egress, p), &lookup).must();
        // A second record: the flow is active since it entered its slot.
        ts += 1;
        t.ingest(&obs(ts, ETH0, Dir::Egress, p), &lookup).must();
        let pkts = t.get(id).map(|f| f.counters(Side::Forward).0);
        assert_eq!(pkts, Some(2), "flow {i}");
    }
    assert_eq!(t.len(), 2);
    assert!(t.iter_newest().all(|f| f.path().count() == 1));
}

#[test]
fn a_broken_flow_still_sending_survives_a_burst_of_new_tuples() {
    // A pod's SYN that is never answered keeps being retransmitted while someone investigates;
    // meanwhile another pod opens 200k connections. Eviction goes by activity, not age.
    let mut t = FlowTable::new(10_000);
    let broken = pkt("10.0.0.7", 45000, "10.96.0.1", 443, 0x02, 777, 0);
    let id = t.ingest(&obs(1, ETH0, Dir::Egress, broken), &lookup).must();
    let idle = pkt("10.0.0.8", 45001, "10.96.0.1", 443, 0x02, 778, 0);
    let idle_id = t.ingest(&obs(2, ETH0, Dir::Egress, idle), &lookup).must();
    let mut ts = 10u64;
    for i in 0..200_000u32 {
        let p = pkt(
            "10.0.1.9",
            (i % 60_000) as u16 + 1024,
            &format!("10.2.{}.{}", (i / 60_000) % 250, 1 + (i % 250)),
            80,
            0x02,
            i,
            0,
        );
        t.ingest(&obs(ts, CALI, Dir::Ingress, p), &lookup);
        ts += 1_000;
        if i % 2_000 == 0 {
            // The SYN retransmitted: the same flow, still unanswered.
            t.ingest(&obs(ts, ETH0, Dir::Egress, broken), &lookup);
        }
    }
    assert_eq!(t.len(), 10_000);
    let f = t.get(id).map(|f| (f.id, f.src, f.sport));
    assert_eq!(
        f,
        Some((id, ip("10.0.0.7"), 45000)),
        "the broken flow survived under its id"
    );
    assert!(t.get(idle_id).is_none(), "the idle one was evicted");
    // Its tuple still finds it: a later retransmission joins it instead of a new flow.
    let again = t.ingest(&obs(ts + 1, ETH0, Dir::Egress, broken), &lookup);
    assert_eq!(again, Some(id));
    assert!(t.stats().evicted >= 190_000);
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
    let a = udp("10.0.0.1", 5000, "10.0.0.9", 53, 0);
    let b = udp("10.0.0.7", 5000, "10.0.0.9", 53, 0);
    let (x, y) = at_veth_then_nic(&mut t, a, b);
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
    assert_eq!(f.drops().len(), 1);
    assert_eq!((f.drops()[0].reason, f.drops()[0].count), (12, 3));
    assert_eq!(
        (t.stats().drops, t.stats().unmatched_drops, t.len()),
        (3, 1, 1)
    );
}

#[test]
fn a_dropped_syn_of_a_new_connection_on_a_reused_tuple_is_not_the_old_flows() {
    use crate::events::KernelDrop;
    let mut t = FlowTable::new(10);
    // An answered connection on the node's translated tuple ...
    let syn = pkt("192.168.21.10", 40000, "203.0.113.5", 80, 0x02, 1, 0);
    let id = t.ingest(&obs(1, ETH0, Dir::Egress, syn), &lookup).must();
    let syn_ack = pkt("203.0.113.5", 80, "192.168.21.10", 40000, 0x12, 500, 2);
    assert_eq!(
        t.ingest(&obs(2, ETH0, Dir::Ingress, syn_ack), &lookup),
        Some(id)
    );
    // ... then another pod's SYN, translated to the same port, dropped by conntrack.
    let mut clash = obs(
        9,
        ETH0,
        Dir::Egress,
        pkt("192.168.21.10", 40000, "203.0.113.5", 80, 0x02, 77, 0),
    );
    clash.drop = Some(KernelDrop {
        reason: 12,
        location: 0xabc,
    });
    assert_eq!(t.ingest(&clash, &lookup), None);
    // The old flow's own SYN, dropped on a retransmission, is still its own.
    let mut again = obs(10, ETH0, Dir::Egress, syn);
    again.drop = clash.drop;
    assert_eq!(t.ingest(&again, &lookup), Some(id));
    let f = t.get(id).unwrap_or_else(|| unreachable!());
    assert_eq!(f.drops().len(), 1);
    assert_eq!(f.drops()[0].count, 1);
    assert_eq!((t.stats().drops, t.stats().unmatched_drops), (1, 1));
}

#[test]
fn request_response_turns_are_timed_at_the_first_hop() {
    let mut t = FlowTable::new(10);
    let syn = pkt("192.168.21.10", 40000, "192.168.21.50", 2379, 0x02, 1, 0);
    let id = t.ingest(&obs(0, ETH0, Dir::Egress, syn), &lookup).must();
    let mut ts = 1_000_000u64;
    for i in 0..5u32 {
        let req = etcd(true, 100 + i, 60);
        t.ingest(&obs(ts, ETH0, Dir::Egress, req), &lookup);
        // A second request segment before the answer is not a new exchange.
        t.ingest(&obs(ts + 10, ETH0, Dir::Egress, req), &lookup);
        let resp = etcd(false, 900 + i, 300);
        ts += 150_000_000;
        t.ingest(&obs(ts, ETH0, Dir::Ingress, resp), &lookup);
        // The same response seen at another interface does not count twice.
        t.ingest(&obs(ts + 5, CALI, Dir::Egress, resp), &lookup);
        ts += 1_000_000;
    }
    let f = t.get(id).unwrap_or_else(|| unreachable!());
    assert_eq!(f.exchanges.count, 5);
    assert_eq!(f.exchanges.quantile_us(0.5), Some(150_000));
    assert_eq!(f.exchanges.max_ns(), 150_000_000);
}

#[test]
fn latency_samples_stay_bounded_and_cover_the_whole_connection() {
    let mut t = FlowTable::new(10);
    let syn = pkt("192.168.21.10", 40000, "192.168.21.50", 2379, 0x02, 1, 0);
    let id = t.ingest(&obs(0, ETH0, Dir::Egress, syn), &lookup).must();
    let mut ts = 1_000_000u64;
    // 1000 exchanges whose latency grows: a reservoir keeps late ones too.
    for i in 0..1000u64 {
        let req = etcd(true, 10 + i as u32, 10);
        t.ingest(&obs(ts, ETH0, Dir::Egress, req), &lookup);
        ts += 1_000 * (i + 1);
        let resp = etcd(false, 900 + i as u32, 10);
        t.ingest(&obs(ts, ETH0, Dir::Ingress, resp), &lookup);
        ts += 1_000;
    }
    let f = t.get(id).unwrap_or_else(|| unreachable!());
    assert_eq!(f.exchanges.count, 1000);
    let samples = f.exchanges.samples();
    assert_eq!(samples.len(), 32);
    assert!(
        samples.iter().any(|us| *us > 500),
        "only early samples: {samples:?}"
    );
}

#[test]
fn hops_show_the_tuple_their_packets_carried() {
    let mut t = FlowTable::new(100);
    let syn = pkt("10.244.1.10", 40000, "10.96.0.1", 443, 0x02, 1000, 0);
    let id = t
        .ingest(&obs(1_000, CALI, Dir::Ingress, syn), &lookup)
        .must();
    let out = pkt("192.168.21.10", 61000, "192.168.21.11", 6443, 0x02, 1000, 0);
    t.ingest(&obs(2_000, ETH0, Dir::Egress, out), &lookup);
    let back = pkt("192.168.21.11", 6443, "192.168.21.10", 61000, 0x12, 7, 1001);
    t.ingest(&obs(3_000, ETH0, Dir::Ingress, back), &lookup);
    let f = t.get(id).unwrap_or_else(|| unreachable!());
    let path: Vec<(String, Side, String, u16, String, u16, u64)> = f
        .path()
        .map(|h| {
            (
                h.iface.to_string(),
                h.side,
                h.src.to_string(),
                h.sport,
                h.dst.to_string(),
                h.dport,
                h.first_ns,
            )
        })
        .collect();
    assert_eq!(
        path,
        [
            (
                "calid92900560e3".into(),
                Side::Forward,
                "10.244.1.10".into(),
                40000,
                "10.96.0.1".into(),
                443,
                1_000
            ),
            (
                "eth0".into(),
                Side::Forward,
                "192.168.21.10".into(),
                61000,
                "192.168.21.11".into(),
                6443,
                2_000
            ),
            (
                "eth0".into(),
                Side::Reverse,
                "192.168.21.11".into(),
                6443,
                "192.168.21.10".into(),
                61000,
                3_000
            ),
        ]
    );
    // Hop times are kept at µs precision from the flow's first record.
    assert_eq!(f.handshake_ns(), Some(2_000));
}

#[test]
fn one_exchange_needs_no_sample_buffer_and_two_allocate_one() {
    let mut t = FlowTable::new(10);
    let syn = pkt("192.168.21.10", 40000, "192.168.21.50", 2379, 0x02, 1, 0);
    let id = t.ingest(&obs(0, ETH0, Dir::Egress, syn), &lookup).must();
    let mut ts = 1_000_000;
    for (i, wait_ms) in [(0u32, 7u64), (1, 3)] {
        let req = etcd(true, 10 + i, 10);
        t.ingest(&obs(ts, ETH0, Dir::Egress, req), &lookup);
        ts += wait_ms * 1_000_000;
        let resp = etcd(false, 90 + i, 10);
        t.ingest(&obs(ts, ETH0, Dir::Ingress, resp), &lookup);
        let f = t.get(id).unwrap_or_else(|| unreachable!());
        if i == 0 {
            assert_eq!(f.exchanges.samples(), [7_000]);
            assert_eq!(f.exchanges.quantile_us(0.9), Some(7_000));
        }
    }
    let f = t.get(id).unwrap_or_else(|| unreachable!());
    assert_eq!(f.exchanges.samples(), [7_000, 3_000]);
    assert_eq!(
        (
            f.exchanges.count,
            f.exchanges.max_ns(),
            f.exchanges.total_wait_ns
        ),
        (2, 7_000_000, 10_000_000)
    );
}

#[test]
fn a_fingerprint_never_joins_flows_that_share_no_end() {
    // Two UDP datagrams with the same IP ID and length, from different pods to different
    // servers: the second is not the first one translated.
    let mut t = FlowTable::new(100);
    let a = udp("10.244.1.10", 5000, "10.96.0.10", 53, 4242);
    let b = udp("10.244.1.11", 5000, "10.250.0.7", 53, 4242);
    let (x, y) = at_veth_then_nic(&mut t, a, b);
    assert_ne!(x, y);
    // The same datagram DNATed (source kept) does join.
    let c = udp("10.244.1.10", 5000, "10.250.0.9", 53, 4242);
    let z = t.ingest(&obs(3, ETH0, Dir::Egress, c), &lookup).must();
    assert_eq!(x, z);
    assert_eq!(t.stats().nat_matches, 1);
}

#[test]
fn a_late_translated_copy_still_finds_its_flow_after_other_traffic() {
    // The pod's SYN, then a burst of other flows' first packets, then the SYN as it leaves the
    // NIC masqueraded: remembered at its first hop, it still joins.
    let mut t = FlowTable::new(1000);
    let syn = pkt("10.244.1.10", 40000, "1.1.1.1", 443, 0x02, 777, 0);
    let id = t.ingest(&obs(1, CALI, Dir::Ingress, syn), &lookup).must();
    for i in 0..200u16 {
        let p = pkt(
            "10.244.1.12",
            1000 + i,
            "8.8.8.8",
            53,
            0x02,
            5 + u32::from(i),
            0,
        );
        t.ingest(&obs(2 + u64::from(i), CALI, Dir::Ingress, p), &lookup);
    }
    let out = pkt("192.168.21.10", 61000, "1.1.1.1", 443, 0x02, 777, 0);
    assert_eq!(
        t.ingest(&obs(500, ETH0, Dir::Egress, out), &lookup),
        Some(id)
    );
    // Past the fingerprint's lifetime it would not.
    let syn2 = pkt("10.244.1.10", 40001, "1.1.1.1", 443, 0x02, 888, 0);
    let id2 = t
        .ingest(&obs(1_000, CALI, Dir::Ingress, syn2), &lookup)
        .must();
    let out2 = pkt("192.168.21.10", 61001, "1.1.1.1", 443, 0x02, 888, 0);
    let late = 1_000 + FINGERPRINT_TTL_NS + 1;
    assert_ne!(
        t.ingest(&obs(late, ETH0, Dir::Egress, out2), &lookup),
        Some(id2)
    );
}

mod address_index {
    use proptest::prelude::*;

    use super::*;
    use crate::net::Cidr;

    /// Destinations the generated flows go to (a Service range, pods, an outside address,
    /// IPv6), and what DNAT turns them into.
    const DSTS: [&str; 6] = [
        "10.96.0.1",
        "10.96.0.2",
        "10.96.1.9",
        "10.244.2.5",
        "192.168.5.5",
        "fd00::1",
    ];
    const BACKENDS: [&str; 6] = [
        "10.244.3.1",
        "10.244.3.2",
        "10.96.0.1",
        "10.244.2.6",
        "192.168.5.6",
        "fd00::2:1",
    ];

    fn nets() -> Vec<Cidr> {
        let net = |s: &str, p: u8| Cidr::new(ip(s), p).unwrap_or(Cidr::host(ip(s)));
        let mut v: Vec<Cidr> = DSTS
            .iter()
            .chain(&BACKENDS)
            .map(|s| Cidr::host(ip(s)))
            .collect();
        v.extend([
            net("10.96.0.0", 16),
            net("10.96.0.0", 24),
            net("10.244.0.0", 16),
            net("10.0.0.0", 8),
            net("0.0.0.0", 0),
            net("fd00::", 64),
            net("::", 0),
            Cidr::host(ip("10.99.99.99")),
        ]);
        v
    }

    /// One connection: a SYN at the pod's veth, then (for `nat` 1-3) its translated copy
    /// leaving eth0 (1: DNAT, 2: SNAT, 3: both), and for `again` a later packet that makes it
    /// active (a second chance when eviction reaches it).
    fn connect(t: &mut FlowTable, k: usize, (d, nat, again): (usize, u8, bool), ts: u64) {
        let v6 = DSTS[d].contains(':');
        let pod = if v6 { "fd00:1::5" } else { "10.244.1.5" };
        let node = if v6 { "fd00:9::1" } else { "192.168.21.10" };
        let sport = 1024 + k as u16;
        let seq = 1000 + k as u32;
        let syn = pkt(pod, sport, DSTS[d], 80, 0x02, seq, 0);
        t.ingest(&obs(ts, CALI, Dir::Ingress, syn), &lookup);
        let (src, dst) = match nat {
            1 => (pod, BACKENDS[d]),
            2 => (node, DSTS[d]),
            3 => (node, BACKENDS[d]),
            _ => return,
        };
        let out = pkt(src, sport.wrapping_add(7), dst, 8080, 0x02, seq, 0);
        t.ingest(&obs(ts + 10, ETH0, Dir::Egress, out), &lookup);
        if again {
            let ack = pkt(pod, sport, DSTS[d], 80, 0x10, seq + 1, 1);
            t.ingest(&obs(ts + 20, CALI, Dir::Ingress, ack), &lookup);
        }
    }

    /// The flows going to `net`, newest first, read from every flow.
    fn scan(t: &FlowTable, net: &Cidr, bound: FlowId) -> Vec<FlowId> {
        t.iter_newest_below(bound)
            .filter(|(_, f)| net.contains(f.dst) || f.nat.is_some_and(|n| net.contains(n.dst)))
            .map(|(_, f)| f.id)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// The index finds exactly the flows a scan finds, in the same order, and counts them,
        /// through eviction (with second chances that move flows), NAT and chunk boundaries.
        #[test]
        fn index_equals_a_scan(
            conns in prop::collection::vec((0..DSTS.len(), 0u8..4, any::<bool>()), 1..2600),
            cap in 300usize..2200,
            cut in 0u64..3000,
        ) {
            let mut t = FlowTable::new(cap);
            for (k, c) in conns.iter().enumerate() {
                connect(&mut t, k, *c, 1_000_000 * (k as u64 + 1));
            }
            for net in nets() {
                let all = scan(&t, &net, FlowId::MAX);
                let found: Vec<FlowId> =
                    t.iter_newest_to(&net, FlowId::MAX).map(|(_, f)| f.id).collect();
                prop_assert_eq!(&found, &all, "{:?}", net);
                prop_assert_eq!(t.count_to(&net), all.len());
                let mut visited = Vec::new();
                let counted = t.visit_newest_to_counting(&net, |f| {
                    visited.push(f.id);
                    true
                });
                prop_assert_eq!(&visited, &all, "{:?}", net);
                prop_assert_eq!(counted, all.len());
                let below: Vec<FlowId> = t.iter_newest_to(&net, cut).map(|(_, f)| f.id).collect();
                prop_assert_eq!(below, scan(&t, &net, cut));
            }
        }

        /// Every tuple of every flow left, either way round, leads the tuple index to that flow
        /// and the side `side_of` says, through eviction, second chances, NAT and IPv6; and
        /// `tuple_at` reads what `tuples` lists.
        #[test]
        fn tuple_index_finds_every_flows_tuples(
            conns in prop::collection::vec((0..DSTS.len(), 0u8..4, any::<bool>()), 1..2600),
            cap in 300usize..2200,
        ) {
            let mut t = FlowTable::new(cap);
            for (k, c) in conns.iter().enumerate() {
                connect(&mut t, k, *c, 1_000_000 * (k as u64 + 1));
            }
            for f in t.iter_newest() {
                let listed: Vec<DirTuple> = f.tuples().collect();
                let read: Vec<DirTuple> = (0..12).filter_map(|p| f.tuple_at(p)).collect();
                prop_assert_eq!(&read, &listed);
                for u in &listed {
                    for q in [*u, u.reversed()] {
                        let side = f.side_of(&q);
                        prop_assert!(side.is_some());
                        prop_assert_eq!(t.lookup(&q), side.map(|s| (f.id, s)), "{:?}", q);
                    }
                }
            }
        }
    }
}

#[test]
fn evictions_are_listed_while_kept() {
    let mut t = FlowTable::new(2);
    let ids: Vec<FlowId> = (0..5u16)
        .map(|i| {
            // Unrelated connections: no end and no IP ID in common (not one NATed flow).
            let dst = format!("10.96.0.{}", i + 1);
            let mut syn = pkt("10.244.1.10", 40000 + i, &dst, 443, 0x02, 1000, 0);
            syn.ip_id = i;
            t.ingest(&obs(1_000 + u64::from(i), CALI, Dir::Ingress, syn), &lookup)
                .must()
        })
        .collect();
    assert_eq!(t.stats().evicted, 3);
    fn since(t: &FlowTable, seen: u64) -> Option<Vec<FlowId>> {
        t.evicted_since(seen).map(|i| i.collect())
    }
    assert_eq!(since(&t, 0), Some(ids[..3].to_vec()));
    assert_eq!(since(&t, 2), Some(vec![ids[2]]));
    assert_eq!(since(&t, 3), Some(vec![]));
    // A count from another table (more than were evicted) is not answered.
    assert_eq!(since(&t, 4), None);
    for id in &ids[..3] {
        assert!(t.get(*id).is_none());
    }
    // Beyond the ids kept: not answered (the tally then walks its marks).
    for i in 0..EVICTIONS_KEPT as u32 {
        let mut p = pkt("10.244.1.11", 1, "10.96.0.1", 443, 0x02, i, 0);
        p.src = std::net::Ipv4Addr::from(0x0A64_0000 | i).into();
        p.dst = std::net::Ipv4Addr::from(0x0A65_0000 | i).into();
        p.ip_id = i as u16;
        t.ingest(&obs(10_000, CALI, Dir::Ingress, p), &lookup);
    }
    assert_eq!(t.stats().evicted, 3 + EVICTIONS_KEPT as u64);
    assert_eq!(since(&t, 0), None);
    assert_eq!(since(&t, 3).map(|v| v.len()), Some(EVICTIONS_KEPT));
}
