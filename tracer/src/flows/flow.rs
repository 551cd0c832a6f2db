//! One connection as it crossed the node: its hops, translations and TCP milestones.
use std::{net::IpAddr, sync::Arc};

use serde::Serialize;

use crate::{
    calico::Role,
    events::{Dir, Encap, Observation, Packet},
};

pub type FlowId = u64;

/// A directional 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirTuple {
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl DirTuple {
    pub fn of(p: &Packet) -> DirTuple {
        let (sport, dport) = ports_for_flow(p);
        DirTuple {
            proto: p.proto,
            src: p.src,
            sport,
            dst: p.dst,
            dport,
        }
    }

    pub fn reversed(&self) -> DirTuple {
        DirTuple {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// ICMP echo request and reply share the identifier but not the type, so the flow key keeps the
/// identifier on both sides and drops the type/code the kernel put in `dport`.
fn ports_for_flow(p: &Packet) -> (u16, u16) {
    match p.proto {
        1 | 58 => (p.sport, p.sport),
        _ => (p.sport, p.dport),
    }
}

/// Which way a packet travels relative to the connection's initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Forward,
    Reverse,
}

#[derive(Debug, Clone, Serialize)]
pub struct HopEncap {
    #[serde(rename = "type")]
    pub kind: Encap,
    pub vni: Option<u32>,
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    pub outer_sport: u16,
    pub outer_dport: u16,
}

/// One place (interface and direction) where the flow's packets were seen.
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    /// Shared with every other hop on the interface: names are interned by the agent.
    pub iface: Arc<str>,
    pub ifindex: u32,
    pub role: Option<Role>,
    pub dir: Dir,
    pub side: Side,
    /// Nanoseconds (CLOCK_MONOTONIC) of the first and last record here.
    #[serde(skip)]
    pub first_ns: u64,
    #[serde(skip)]
    pub last_ns: u64,
    /// The flow's packet as seen here (the inner packet when encapsulated).
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// Boxed: most hops carry no tunnel header, and a flow keeps several hops.
    pub encap: Option<Box<HopEncap>>,
    pub pkts: u64,
    pub bytes: u64,
    /// TCP flags seen here, OR-ed.
    #[serde(skip)]
    pub tcp_flags_seen: u8,
    pub retransmits: u32,
    /// Sequence number of the last SYN seen here, to count SYN retransmissions.
    #[serde(skip)]
    pub syn_seq: Option<u32>,
}

/// Request/response exchanges timed from payload turns at one interface.
#[derive(Debug, Clone, Default)]
pub struct Exchanges {
    /// Where the exchanges are timed: the flow's first hop, which sees both directions.
    measure_ifindex: Option<u32>,
    last_side: Option<Side>,
    request_ns: Option<u64>,
    /// A uniform sample of response latencies in microseconds; `count` counts them all.
    pub latencies_us: Vec<u32>,
    pub count: u64,
    pub total_wait_ns: u64,
    pub max_ns: u64,
}

/// Latency samples kept per flow: a reservoir, so a long-lived connection stays small.
const MAX_SAMPLES: usize = 32;

impl Exchanges {
    fn observe(&mut self, ifindex: u32, side: Side, ts_ns: u64) {
        if *self.measure_ifindex.get_or_insert(ifindex) != ifindex {
            return;
        }
        if self.last_side == Some(side) {
            return;
        }
        self.last_side = Some(side);
        match side {
            Side::Forward => self.request_ns = Some(ts_ns),
            Side::Reverse => {
                if let Some(req) = self.request_ns.take() {
                    let wait = ts_ns.saturating_sub(req);
                    self.count += 1;
                    self.total_wait_ns += wait;
                    self.max_ns = self.max_ns.max(wait);
                    let us = (wait / 1000).min(u64::from(u32::MAX)) as u32;
                    if self.latencies_us.len() < MAX_SAMPLES {
                        self.latencies_us.push(us);
                    } else {
                        // Reservoir sampling (Algorithm R): sample i replaces a random slot with
                        // probability MAX_SAMPLES / i, from a cheap deterministic hash.
                        let r = (self.count.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) % self.count;
                        if let Some(slot) = self.latencies_us.get_mut(r as usize) {
                            *slot = us;
                        }
                    }
                }
            }
        }
    }

    /// Latency at quantile `q` (0..=1) in microseconds.
    pub fn quantile_us(&self, q: f64) -> Option<u32> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        v.get(i).copied()
    }
}

/// A kernel drop of one of the flow's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropRecord {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub reason: u32,
    pub location: u64,
    pub side: Side,
    /// Drops with the same reason and place are folded into one record.
    pub count: u32,
}

/// Most distinct drop records kept per flow.
const MAX_DROPS: usize = 8;

/// Translation a flow went through on this node, as the forward packet left it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Nat {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TcpMilestones {
    #[serde(skip)]
    pub syn_ns: Option<u64>,
    #[serde(skip)]
    pub syn_ack_ns: Option<u64>,
    pub syn: bool,
    pub syn_ack: bool,
    pub fin: bool,
    pub rst: bool,
    #[serde(skip)]
    pub syn_seq: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Flow {
    pub id: FlowId,
    pub proto: u8,
    /// The forward tuple as first seen (before any translation on this node).
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub first_ns: u64,
    pub last_ns: u64,
    pub hops: Vec<Hop>,
    pub nat: Option<Nat>,
    pub first_reply_ns: Option<u64>,
    pub tcp: TcpMilestones,
    /// A reply is owed: TCP opened with a SYN, or an ICMP echo request.
    pub expects_reply: bool,
    /// Translated forward tuples beyond the first (`nat`), rare; indexed with their reverses.
    pub extra_translations: Vec<DirTuple>,
    pub drops: Vec<DropRecord>,
    pub exchanges: Exchanges,
}

impl Flow {
    pub fn new(id: FlowId, fwd: DirTuple, ts_ns: u64) -> Flow {
        Flow {
            id,
            proto: fwd.proto,
            src: fwd.src,
            sport: fwd.sport,
            dst: fwd.dst,
            dport: fwd.dport,
            first_ns: ts_ns,
            last_ns: ts_ns,
            hops: Vec::new(),
            nat: None,
            first_reply_ns: None,
            tcp: TcpMilestones::default(),
            expects_reply: false,
            extra_translations: Vec::new(),
            drops: Vec::new(),
            exchanges: Exchanges::default(),
        }
    }

    pub fn forward_tuple(&self) -> DirTuple {
        DirTuple {
            proto: self.proto,
            src: self.src,
            sport: self.sport,
            dst: self.dst,
            dport: self.dport,
        }
    }

    /// Adds one observation on `side` at the given interface.
    /// Every tuple this flow is indexed under: both directions, before and after translation.
    pub fn indexed_tuples(&self) -> Vec<DirTuple> {
        let fwd = self.forward_tuple();
        let mut out = vec![fwd, fwd.reversed()];
        if let Some(n) = self.nat {
            let t = DirTuple {
                proto: self.proto,
                src: n.src,
                sport: n.sport,
                dst: n.dst,
                dport: n.dport,
            };
            out.push(t);
            out.push(t.reversed());
        }
        for t in &self.extra_translations {
            out.push(*t);
            out.push(t.reversed());
        }
        out
    }

    pub fn record(&mut self, obs: &Observation, side: Side, iface: &Arc<str>, role: Option<Role>) {
        let p = *obs.packet();
        self.last_ns = self.last_ns.max(obs.ts_ns);
        if side == Side::Reverse && self.first_reply_ns.is_none() {
            self.first_reply_ns = Some(obs.ts_ns);
        }
        if p.proto == 6 {
            self.record_tcp(&p, side, obs.ts_ns);
            if p.payload_len > 0 {
                self.exchanges.observe(obs.ifindex, side, obs.ts_ns);
            }
        }
        let idx = match self
            .hops
            .iter()
            .position(|h| h.ifindex == obs.ifindex && h.dir == obs.dir && h.side == side)
        {
            Some(i) => i,
            None => {
                self.hops.push(Hop {
                    iface: iface.clone(),
                    ifindex: obs.ifindex,
                    role,
                    dir: obs.dir,
                    side,
                    first_ns: obs.ts_ns,
                    last_ns: obs.ts_ns,
                    src: p.src,
                    sport: p.sport,
                    dst: p.dst,
                    dport: p.dport,
                    encap: obs.inner.as_ref().map(|(kind, vni, _)| {
                        Box::new(HopEncap {
                            kind: *kind,
                            vni: (*kind == Encap::Vxlan).then_some(*vni),
                            outer_src: obs.outer.src,
                            outer_dst: obs.outer.dst,
                            outer_sport: obs.outer.sport,
                            outer_dport: obs.outer.dport,
                        })
                    }),
                    pkts: 0,
                    bytes: 0,
                    tcp_flags_seen: 0,
                    retransmits: 0,
                    syn_seq: None,
                });
                self.hops.len() - 1
            }
        };
        let hop = &mut self.hops[idx];
        hop.last_ns = hop.last_ns.max(obs.ts_ns);
        hop.first_ns = hop.first_ns.min(obs.ts_ns);
        hop.pkts += u64::from(obs.pkts);
        hop.bytes += obs.bytes;
        hop.tcp_flags_seen |= p.tcp_flags;
        if obs.emit == crate::events::Emit::Retransmit {
            hop.retransmits += 1;
        }
        if p.proto == 6 && p.tcp_flags & 0x02 != 0 {
            if hop.syn_seq == Some(p.seq) {
                hop.retransmits += 1;
            }
            hop.syn_seq = Some(p.seq);
        }
    }

    fn record_tcp(&mut self, p: &Packet, side: Side, ts: u64) {
        let syn = p.tcp_flags & 0x02 != 0;
        let ack = p.tcp_flags & 0x10 != 0;
        if syn && !ack && side == Side::Forward {
            self.tcp.syn = true;
            self.tcp.syn_ns.get_or_insert(ts);
            self.tcp.syn_seq = Some(p.seq);
            self.expects_reply = true;
        }
        if syn && ack && side == Side::Reverse {
            self.tcp.syn_ack = true;
            self.tcp.syn_ack_ns.get_or_insert(ts);
        }
        if p.tcp_flags & 0x01 != 0 {
            self.tcp.fin = true;
        }
        if p.tcp_flags & 0x04 != 0 {
            self.tcp.rst = true;
        }
    }

    pub fn record_drop(
        &mut self,
        ts_ns: u64,
        ifindex: u32,
        reason: u32,
        location: u64,
        side: Side,
    ) {
        self.last_ns = self.last_ns.max(ts_ns);
        if let Some(d) = self
            .drops
            .iter_mut()
            .find(|d| d.reason == reason && d.location == location && d.ifindex == ifindex)
        {
            d.count = d.count.saturating_add(1);
            return;
        }
        if self.drops.len() < MAX_DROPS {
            self.drops.push(DropRecord {
                ts_ns,
                ifindex,
                reason,
                location,
                side,
                count: 1,
            });
        }
    }

    /// Packets and bytes in one direction: the most any single hop saw (hops see the same packets).
    pub fn counters(&self, side: Side) -> (u64, u64) {
        self.hops
            .iter()
            .filter(|h| h.side == side)
            .fold((0, 0), |(p, b), h| (p.max(h.pkts), b.max(h.bytes)))
    }

    pub fn retransmits(&self) -> u32 {
        self.hops.iter().map(|h| h.retransmits).max().unwrap_or(0)
    }

    /// Handshake round trip as seen at the first hop, in nanoseconds.
    pub fn handshake_ns(&self) -> Option<u64> {
        match (self.tcp.syn_ns, self.tcp.syn_ack_ns) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        }
    }
}
