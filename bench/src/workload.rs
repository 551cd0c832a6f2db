//! Synthetic connections as a Calico node sees them, packet by packet and hook by hook: as wire
//! frames for the kernel programs (tracer::synth) or as decoded observations for in-process runs.
//!
//! Flow `i` is one of four kinds (i % 4): two of pod -> Service with kube-proxy DNAT and felix
//! SNAT (both addresses rewritten), one pod -> pod without NAT, one UDP DNS query through a
//! Service (DNAT only). Every tuple is unique in `i`, pre and post NAT.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, OnceLock},
};

use tracer::{
    calico::Role,
    events::{Dir, Emit, Observation, Packet},
    flows::Iface,
    synth::{ether, ip_packet, L4},
};
use tracer_common::{PROTO_TCP, PROTO_UDP};

/// ifindex of the node's eth0 in observations built in-process.
pub const ETH0: u32 = 2;
/// Pods' veths get ifindex CALI_BASE + pod % PODS.
const CALI_BASE: u32 = 100;
const PODS: u32 = 50;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 21, 10);

/// One packet at one hook.
#[derive(Debug, Clone, Copy)]
pub struct Pkt {
    /// At the node's NIC (else at the pod's veth).
    pub host: bool,
    pub egress: bool,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub udp: bool,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub ip_id: u16,
    pub payload: u16,
    /// How many times the hook sees it back to back (a burst of the same flow).
    pub repeat: u32,
}

/// The Service VIP flow `i` talks to: 200 of them, so a `dst=` query matches 1 Service flow in 200.
pub fn service_ip(i: u64) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, 1 + ((i / 4) % 200) as u8)
}

pub fn pod_ip(i: u64) -> Ipv4Addr {
    Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// The pod's veth in observations built in-process.
pub fn pod_ifindex(i: u64) -> u32 {
    CALI_BASE + (i % u64::from(PODS)) as u32
}

/// Interfaces for observations built in-process, shared like the agent's name map.
pub fn iface(ifindex: u32) -> Arc<Iface> {
    static PODS_IFACES: OnceLock<Vec<Arc<Iface>>> = OnceLock::new();
    static ETH0_IFACE: OnceLock<Arc<Iface>> = OnceLock::new();
    if ifindex == ETH0 {
        return ETH0_IFACE
            .get_or_init(|| Iface::new("eth0", ETH0, Some(Role::Host)))
            .clone();
    }
    let pods = PODS_IFACES.get_or_init(|| {
        (0..PODS)
            .map(|k| {
                let i = CALI_BASE + k;
                Iface::new(&format!("cali{i:011x}"), i, Some(Role::Workload))
            })
            .collect()
    });
    ifindex
        .checked_sub(CALI_BASE)
        .and_then(|k| pods.get(k as usize).cloned())
        .unwrap_or_else(|| Iface::unnamed(ifindex))
}

/// Every packet of flow `i` at the pod's veth and the node's NIC, in order.
pub fn flow(i: u64) -> Vec<Pkt> {
    let pod = pod_ip(i);
    let sport = 20_000 + (i % 40_000) as u16;
    let isn = (i as u32).wrapping_mul(2_654_435_761) | 1;
    let irs = isn.rotate_left(13) | 1;
    let id = (i as u16).wrapping_mul(7) | 1;
    let base = Pkt {
        host: false,
        egress: false,
        src: pod,
        dst: pod,
        sport,
        dport: 0,
        udp: false,
        flags: 0,
        seq: 0,
        ack: 0,
        ip_id: id,
        payload: 0,
        repeat: 1,
    };
    match i % 4 {
        0 | 1 => {
            // Pod -> Service:443, DNAT to a backend:6443, SNAT to node:nport.
            let svc = service_ip(i);
            let n = i / 60_000;
            let backend = Ipv4Addr::new(172, 20 + (n >> 8) as u8 % 8, n as u8, 11);
            let nport = 1024 + (i % 60_000) as u16;
            let pod_side = (pod, sport, svc, 443);
            let host_side = (NODE_IP, nport, backend, 6443);
            tcp_exchange(base, pod_side, host_side, isn, irs)
        }
        2 => {
            // Pod -> pod on another node, routed without NAT.
            let peer = Ipv4Addr::new(10, 244, 200, 1 + (i % 250) as u8);
            let t = (pod, sport, peer, 8080);
            tcp_exchange(base, t, t, isn, irs)
        }
        _ => {
            // DNS through the kube-dns Service: DNAT only, the pod's source is kept.
            let svc = Ipv4Addr::new(10, 96, 0, 10);
            let dns = Ipv4Addr::new(10, 250, (i >> 8) as u8, i as u8);
            let q = Pkt {
                udp: true,
                payload: 40,
                ..base
            };
            let r = Pkt {
                ip_id: id.wrapping_add(0x5555) | 1,
                payload: 120,
                ..q
            };
            vec![
                at(q, false, false, (pod, sport, svc, 53)),
                at(q, true, true, (pod, sport, dns, 53)),
                at(r, true, false, (dns, 53, pod, sport)),
                at(r, false, true, (svc, 53, pod, sport)),
            ]
        }
    }
}

type Ends = (Ipv4Addr, u16, Ipv4Addr, u16);

fn at(p: Pkt, host: bool, egress: bool, (src, sport, dst, dport): Ends) -> Pkt {
    Pkt {
        host,
        egress,
        src,
        sport,
        dst,
        dport,
        ..p
    }
}

fn rev((s, sp, d, dp): Ends) -> Ends {
    (d, dp, s, sp)
}

/// Data segments in a response burst.
const BULK: u32 = 8;

/// Handshake, one request/response and a burst of response data, each packet at the pod's veth
/// and at the NIC (`pod` and `host` are the tuple before and after NAT).
fn tcp_exchange(base: Pkt, pod: Ends, host: Ends, isn: u32, irs: u32) -> Vec<Pkt> {
    let t = |flags, seq, ack, id_off: u16, payload, repeat| Pkt {
        flags,
        seq,
        ack,
        ip_id: base.ip_id.wrapping_add(id_off),
        payload,
        repeat,
        ..base
    };
    let (i1, i101) = (isn.wrapping_add(1), isn.wrapping_add(101));
    let (r1, r1001) = (irs.wrapping_add(1), irs.wrapping_add(1001));
    let syn = t(0x02, isn, 0, 0, 0, 1);
    let ack = t(0x10, i1, r1, 1, 0, 1);
    let req = t(0x18, i1, r1, 2, 100, 1);
    let synack = t(0x12, irs, i1, 0x4000, 0, 1);
    let resp = t(0x18, r1, i101, 0x4001, 1000, 1);
    // A burst of response data: distinct segments, as the kernel reports each packet with a
    // summary interval of 0.
    let bulk = (0..BULK).map(|k| {
        let seq = r1001.wrapping_add(k * 1400);
        (false, t(0x10, seq, i101, 0x4002 + k as u16, 1400, 1))
    });
    let mut v = Vec::with_capacity(2 * (5 + BULK as usize));
    // Forward packets: pod veth ingress, then NIC egress (translated).
    // Reverse packets: NIC ingress (translated), then pod veth egress.
    for (fwd, p) in [
        (true, syn),
        (false, synack),
        (true, ack),
        (true, req),
        (false, resp),
    ]
    .into_iter()
    .chain(bulk)
    {
        if fwd {
            v.push(at(p, false, false, pod));
            v.push(at(p, true, true, host));
        } else {
            v.push(at(p, true, false, rev(host)));
            v.push(at(p, false, true, rev(pod)));
        }
    }
    v
}

/// The wire frame of `p` (Ethernet, IPv4, TCP or UDP with zeroed payload).
pub fn frame(p: &Pkt) -> Vec<u8> {
    let l4 = if p.udp {
        L4::Udp {
            sport: p.sport,
            dport: p.dport,
            payload: usize::from(p.payload),
        }
    } else {
        L4::Tcp {
            sport: p.sport,
            dport: p.dport,
            flags: p.flags,
            seq: p.seq,
            ack: p.ack,
            payload: usize::from(p.payload),
        }
    };
    ether(&ip_packet(
        IpAddr::V4(p.src),
        IpAddr::V4(p.dst),
        p.ip_id,
        l4,
    ))
}

/// `p` as the agent would have decoded it from flow `i`'s hook, at `ts_ns`.
pub fn observation(i: u64, p: &Pkt, ts_ns: u64) -> Observation {
    let len = 14 + 20 + if p.udp { 8 } else { 20 } + u32::from(p.payload);
    Observation {
        ts_ns,
        ifindex: if p.host { ETH0 } else { pod_ifindex(i) },
        dir: if p.egress { Dir::Egress } else { Dir::Ingress },
        len,
        pkts: p.repeat,
        bytes: u64::from(len) * u64::from(p.repeat),
        emit: Emit::First,
        outer: Packet {
            src: IpAddr::V4(p.src),
            dst: IpAddr::V4(p.dst),
            sport: p.sport,
            dport: p.dport,
            proto: if p.udp { PROTO_UDP } else { PROTO_TCP },
            tcp_flags: if p.udp { 0 } else { p.flags },
            seq: p.seq,
            ack: p.ack,
            ip_id: p.ip_id,
            ttl: 64,
            payload_len: p.payload,
        },
        inner: None,
        drop: None,
    }
}
