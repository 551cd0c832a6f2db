//! One connection as it crossed the node: its hops, translations and TCP milestones.
//!
//! The table holds up to --flow-cap of these, so the layout is kept tight: times that are only
//! shown relative to the flow's start are µs offsets, a hop refers to the flow's tuples instead
//! of copying addresses, and what few flows have (drops, tunnel headers, second translations)
//! lives behind one box.
use std::{
    fmt,
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use serde::Serialize;
use tracer_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::{
    calico::Role,
    events::{Dir, Emit, Encap, Observation, Packet},
};

pub type FlowId = u64;

/// Marks an absent absolute timestamp: kernel clocks never reach it.
const NO_NS: u64 = u64::MAX;
/// Marks an absent µs offset.
const NO_US: u32 = u32::MAX;

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

    /// The tuple as a packet on `side` carries it, given the forward one.
    pub fn on(&self, side: Side) -> DirTuple {
        match side {
            Side::Forward => *self,
            Side::Reverse => self.reversed(),
        }
    }
}

/// ICMP echo request and reply share the identifier but not the type, so the flow key keeps the
/// identifier on both sides and drops the type/code the kernel put in `dport`.
fn ports_for_flow(p: &Packet) -> (u16, u16) {
    match p.proto {
        PROTO_ICMP | PROTO_ICMPV6 => (p.sport, p.sport),
        _ => (p.sport, p.dport),
    }
}

/// Which way a packet travels relative to the connection's initiator.
pub use tracer_model::Side;

/// An interface as it was when a flow crossed it. Shared by every hop over it (one allocation
/// per interface), and kept by those hops after the interface is renamed or gone.
#[derive(Debug, PartialEq, Eq)]
pub struct Iface {
    pub name: Box<str>,
    pub ifindex: u32,
    pub role: Option<Role>,
}

/// Interface records alive: interned for attached interfaces, or kept by the hops of flows
/// over interfaces since renamed, deleted or never named.
static LIVE: AtomicUsize = AtomicUsize::new(0);

impl Iface {
    pub fn new(name: &str, ifindex: u32, role: Option<Role>) -> Arc<Iface> {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Arc::new(Iface {
            name: name.into(),
            ifindex,
            role,
        })
    }

    /// An interface the agent has no name for.
    pub fn unnamed(ifindex: u32) -> Arc<Iface> {
        Iface::new(&format!("if{ifindex}"), ifindex, None)
    }

    /// Interface records alive in this process (see `LIVE`).
    pub fn live() -> usize {
        LIVE.load(Ordering::Relaxed)
    }
}

impl Drop for Iface {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Display for Iface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Serialize for Iface {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

/// The outer header of an encapsulated hop (the wire type itself).
pub use tracer_model::flow::HopEncap;

/// Packet counts kept in one word: 40 bits of packets, 24 of retransmissions.
const PKT_BITS: u32 = 40;
const PKT_MASK: u64 = (1 << PKT_BITS) - 1;

/// One place (interface and direction) where the flow's packets were seen.
#[derive(Debug, Clone)]
pub struct Hop {
    pub iface: Arc<Iface>,
    pub bytes: u64,
    counts: u64,
    /// µs after the flow's first record that this hop saw its first (saturating).
    first_us: u32,
    pub dir: Dir,
    pub side: Side,
    /// TCP flags seen here, OR-ed.
    pub tcp_flags_seen: u8,
    /// Which of the flow's tuples (`Flow::tuples`) the packets here carried.
    tuple: u8,
}

impl Hop {
    pub fn ifindex(&self) -> u32 {
        self.iface.ifindex
    }

    pub fn pkts(&self) -> u64 {
        self.counts & PKT_MASK
    }

    pub fn retransmits(&self) -> u32 {
        (self.counts >> PKT_BITS) as u32
    }

    /// Bytes per packet here (as the hook saw them, link header included).
    pub fn bytes_per_packet(&self) -> u32 {
        u32::try_from(self.bytes / self.pkts().max(1)).unwrap_or(u32::MAX)
    }

    fn add_pkts(&mut self, n: u32) {
        let pkts = (self.pkts() + u64::from(n)).min(PKT_MASK);
        self.counts = (self.counts & !PKT_MASK) | pkts;
    }

    fn add_retransmit(&mut self) {
        if u64::from(self.retransmits()) < (1 << (64 - PKT_BITS)) - 1 {
            self.counts += 1 << PKT_BITS;
        }
    }

    fn is(&self, ifindex: u32, dir: Dir, side: Side) -> bool {
        self.iface.ifindex == ifindex && self.dir == dir && self.side == side
    }
}

/// Hops held in the flow itself: a packet crosses 2-4 hooks on a node (the pod's veth both
/// ways, the host's NIC both ways), so most flows need no allocation for their hops; more go
/// to the flow's rare part.
const INLINE_HOPS: usize = 4;

/// A hop with what it refers to resolved: the tuple its packets carried and their tunnel header.
#[derive(Debug, Clone, Copy)]
pub struct HopView<'a> {
    pub hop: &'a Hop,
    pub iface: &'a Iface,
    pub ifindex: u32,
    pub role: Option<Role>,
    pub dir: Dir,
    pub side: Side,
    /// The flow's packet as seen here (the inner packet when encapsulated).
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub encap: Option<&'a HopEncap>,
    /// Nanoseconds (CLOCK_MONOTONIC) of the hop's first record, at µs precision.
    pub first_ns: u64,
}

/// Request/response exchanges timed from payload turns at one interface.
#[derive(Debug, Clone)]
pub struct Exchanges {
    /// When the waiting request was sent; NO_NS while none waits, which is also after the
    /// reverse side spoke last (a turn is a change of the side sending payload).
    request_ns: u64,
    pub total_wait_ns: u64,
    /// From the second exchange on (one exchange is `total_wait_ns`).
    reservoir: Option<Box<Reservoir>>,
    pub count: u32,
    /// Where the exchanges are timed: the flow's first hop, which sees both directions.
    measure_ifindex: u32,
}

/// A uniform sample of response latencies in µs (`count` counts them all), and the largest.
#[derive(Debug, Clone)]
struct Reservoir {
    max_us: u32,
    len: u32,
    samples: [u32; MAX_SAMPLES],
}

/// Latency samples kept per flow: a reservoir, so a long-lived connection stays small.
const MAX_SAMPLES: usize = 32;

impl Default for Exchanges {
    fn default() -> Exchanges {
        Exchanges {
            request_ns: NO_NS,
            total_wait_ns: 0,
            reservoir: None,
            count: 0,
            measure_ifindex: 0,
        }
    }
}

/// The µs an exchange of `ns` is kept as.
fn us_of(ns: u64) -> u32 {
    (ns / 1000).min(u64::from(u32::MAX - 1)) as u32
}

impl Exchanges {
    fn observe(&mut self, ifindex: u32, side: Side, ts_ns: u64) {
        if self.measure_ifindex == 0 {
            self.measure_ifindex = ifindex;
        }
        if self.measure_ifindex != ifindex {
            return;
        }
        match side {
            // The forward side still talking: the same request.
            Side::Forward if self.request_ns != NO_NS => {}
            Side::Forward => self.request_ns = ts_ns,
            Side::Reverse if self.request_ns != NO_NS => {
                let wait = ts_ns.saturating_sub(self.request_ns);
                self.request_ns = NO_NS;
                self.add(wait);
            }
            Side::Reverse => {}
        }
    }

    fn add(&mut self, wait_ns: u64) {
        let us = us_of(wait_ns);
        let first = us_of(self.total_wait_ns);
        self.count = self.count.saturating_add(1);
        self.total_wait_ns = self.total_wait_ns.saturating_add(wait_ns);
        if self.count == 1 {
            return;
        }
        let Some(r) = self.reservoir.as_deref_mut() else {
            // The second exchange: the first one's latency is the total so far.
            let mut samples = [0u32; MAX_SAMPLES];
            samples[0] = first;
            samples[1] = us;
            self.reservoir = Some(Box::new(Reservoir {
                max_us: first.max(us),
                len: 2,
                samples,
            }));
            return;
        };
        r.max_us = r.max_us.max(us);
        let len = r.len as usize;
        if len < MAX_SAMPLES {
            r.samples[len] = us;
            r.len += 1;
            return;
        }
        // Reservoir sampling (Algorithm R): sample i replaces a random slot with probability
        // MAX_SAMPLES / i, from a cheap deterministic hash.
        let count = u64::from(self.count);
        let k = (count.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) % count;
        if let Some(slot) = r.samples.get_mut(k as usize) {
            *slot = us;
        }
    }

    /// The latency samples kept, in µs.
    pub fn samples(&self) -> Vec<u32> {
        match (&self.reservoir, self.count) {
            (Some(r), _) => r.samples[..r.len as usize].to_vec(),
            (None, 1) => vec![(self.total_wait_ns / 1000).min(u64::from(u32::MAX)) as u32],
            (None, _) => Vec::new(),
        }
    }

    /// Latency at quantile `q` (0..=1) in microseconds.
    pub fn quantile_us(&self, q: f64) -> Option<u32> {
        self.quantiles_us([q])[0]
    }

    /// Latencies at several quantiles from one copy and sort of the samples.
    pub fn quantiles_us<const N: usize>(&self, qs: [f64; N]) -> [Option<u32>; N] {
        let mut v = self.samples();
        v.sort_unstable();
        qs.map(|q| {
            let last = v.len().checked_sub(1)?;
            v.get((last as f64 * q.clamp(0.0, 1.0)).round() as usize)
                .copied()
        })
    }

    pub fn max_ns(&self) -> u64 {
        let max_us = match &self.reservoir {
            Some(r) => r.max_us,
            // At most one exchange: its latency is the total.
            None => us_of(self.total_wait_ns),
        };
        u64::from(max_us) * 1000
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
/// Most translated tuples kept per flow beyond the first.
const MAX_EXTRA_TRANSLATIONS: usize = 8;

/// Translation a flow went through on this node, as the forward packet left it (the wire type
/// itself).
pub use tracer_model::flow::Nat;

/// TCP handshake and teardown as seen at the first hop that saw each.
#[derive(Debug, Clone, Copy)]
pub struct TcpMilestones {
    /// µs after the flow's first record.
    syn_us: u32,
    syn_ack_us: u32,
    /// Initial sequence numbers, to tell a retransmitted SYN (or SYN-ACK) from a new connection.
    syn_seq: u32,
    syn_ack_seq: u32,
    pub syn: bool,
    pub syn_ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl Default for TcpMilestones {
    fn default() -> TcpMilestones {
        TcpMilestones {
            syn_us: NO_US,
            syn_ack_us: NO_US,
            syn_seq: 0,
            syn_ack_seq: 0,
            syn: false,
            syn_ack: false,
            fin: false,
            rst: false,
        }
    }
}

impl TcpMilestones {
    /// Sequence number of the connection's SYN, when one was seen.
    pub fn syn_seq(&self) -> Option<u32> {
        self.syn.then_some(self.syn_seq)
    }
}

/// What few flows carry.
#[derive(Debug, Clone, Default)]
struct Rare {
    /// Translated forward tuples beyond the first (`nat`); indexed with their reverses.
    extra_translations: Vec<DirTuple>,
    drops: Vec<DropRecord>,
    /// Tunnel headers, by hop (ifindex, direction, side).
    encaps: Vec<(u32, Dir, Side, HopEncap)>,
    /// Hops beyond the first [`INLINE_HOPS`].
    more_hops: Vec<Hop>,
    /// The latest retransmitted segment of each side (forward, reverse) that no ACK has passed.
    stalls: [Option<Stall>; 2],
}

/// A TCP segment sent again with no ACK from the other side past its start, yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    pub side: Side,
    pub seq: u32,
    /// The largest payload it was sent again with.
    pub payload_len: u16,
    /// Times it was sent again, counted at the one hop that first saw it again (every hop on the
    /// path sees each copy).
    pub retransmits: u32,
    pub ifindex: u32,
    pub dir: Dir,
    pub first_ns: u64,
    pub last_ns: u64,
}

#[derive(Debug, Clone)]
pub struct Flow {
    pub id: FlowId,
    /// Nanoseconds (CLOCK_MONOTONIC) of the first and last record.
    pub first_ns: u64,
    pub last_ns: u64,
    /// The first hops in the order first seen (filled from the front; see `hops()`).
    hops: [Option<Hop>; INLINE_HOPS],
    pub exchanges: Exchanges,
    rare: Option<Box<Rare>>,
    /// The forward tuple as first seen (before any translation on this node).
    pub src: IpAddr,
    pub dst: IpAddr,
    pub nat: Option<Nat>,
    pub tcp: TcpMilestones,
    /// µs after the first record that the first reply came.
    reply_us: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// A reply is owed: TCP opened with a SYN, or an ICMP echo request.
    pub expects_reply: bool,
    /// Written to the flow log already: it never is again.
    pub logged: bool,
    /// `last_ns` moved on since the flow entered its slot in the table: it gets a second
    /// chance when eviction reaches it.
    pub(super) active: bool,
}

/// Most hops kept per flow: a packet crosses a handful of hooks on a node.
const MAX_HOPS: usize = 32;

impl Flow {
    pub fn new(id: FlowId, fwd: DirTuple, ts_ns: u64) -> Flow {
        Flow {
            id,
            first_ns: ts_ns,
            last_ns: ts_ns,
            hops: Default::default(),
            exchanges: Exchanges::default(),
            rare: None,
            src: fwd.src,
            dst: fwd.dst,
            nat: None,
            tcp: TcpMilestones::default(),
            reply_us: NO_US,
            sport: fwd.sport,
            dport: fwd.dport,
            proto: fwd.proto,
            expects_reply: false,
            logged: false,
            active: false,
        }
    }

    /// Moves `last_ns` on to `ts_ns` if that is later.
    fn seen_at(&mut self, ts_ns: u64) {
        if ts_ns > self.last_ns {
            self.last_ns = ts_ns;
            self.active = true;
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

    fn nat_tuple(&self) -> Option<DirTuple> {
        self.nat.map(|n| DirTuple {
            proto: self.proto,
            src: n.src,
            sport: n.sport,
            dst: n.dst,
            dport: n.dport,
        })
    }

    /// Every forward tuple the flow was seen with: as first seen, then each translation.
    pub fn tuples(&self) -> impl Iterator<Item = DirTuple> + '_ {
        std::iter::once(self.forward_tuple())
            .chain(self.nat_tuple())
            .chain(self.extra_translations().iter().copied())
    }

    /// `tuples().nth(pos)` without walking the chain (the tuple index reads one per probe).
    pub fn tuple_at(&self, pos: usize) -> Option<DirTuple> {
        match (pos, self.nat_tuple()) {
            (0, _) => Some(self.forward_tuple()),
            (1, Some(n)) => Some(n),
            (p, nat) => self
                .extra_translations()
                .get(p - 1 - usize::from(nat.is_some()))
                .copied(),
        }
    }

    /// Which side `t` is on, if it is one of the flow's tuples either way round.
    pub fn side_of(&self, t: &DirTuple) -> Option<Side> {
        (0..).map_while(|pos| self.tuple_at(pos)).find_map(|u| {
            if u == *t {
                Some(Side::Forward)
            } else if u.reversed() == *t {
                Some(Side::Reverse)
            } else {
                None
            }
        })
    }

    /// Where the flow's packets were seen, in the order first seen.
    pub fn hops(&self) -> impl DoubleEndedIterator<Item = &Hop> + '_ {
        self.hops
            .iter()
            .flatten()
            .chain(self.rare.iter().flat_map(|r| r.more_hops.iter()))
    }

    fn hop(&self, i: usize) -> Option<&Hop> {
        match i.checked_sub(INLINE_HOPS) {
            None => self.hops.get(i)?.as_ref(),
            Some(j) => self.rare.as_deref()?.more_hops.get(j),
        }
    }

    fn hop_mut(&mut self, i: usize) -> Option<&mut Hop> {
        match i.checked_sub(INLINE_HOPS) {
            None => self.hops.get_mut(i)?.as_mut(),
            Some(j) => self.rare.as_deref_mut()?.more_hops.get_mut(j),
        }
    }

    /// `hops().position(f)` without the chained iterators (asked on every record). The inline
    /// hops fill in order, so the first empty one ends the list.
    fn hop_position(&self, f: impl Fn(&Hop) -> bool) -> Option<usize> {
        for (i, h) in self.hops.iter().enumerate() {
            match h {
                Some(h) if f(h) => return Some(i),
                Some(_) => {}
                None => return None,
            }
        }
        let more = &self.rare.as_deref()?.more_hops;
        more.iter().position(f).map(|j| INLINE_HOPS + j)
    }

    /// Adds a hop; returns its position.
    fn push_hop(&mut self, hop: Hop) -> usize {
        match self.hops.iter().position(Option::is_none) {
            Some(i) => {
                self.hops[i] = Some(hop);
                i
            }
            None => {
                let more = &mut self.rare_mut().more_hops;
                more.push(hop);
                INLINE_HOPS + more.len() - 1
            }
        }
    }

    /// When the first reply was seen (µs precision).
    pub fn first_reply_ns(&self) -> Option<u64> {
        self.at_us(self.reply_us)
    }

    pub fn drops(&self) -> &[DropRecord] {
        self.rare.as_deref().map_or(&[], |r| &r.drops)
    }

    pub fn extra_translations(&self) -> &[DirTuple] {
        self.rare.as_deref().map_or(&[], |r| &r.extra_translations)
    }

    /// Any hop carried the flow inside a tunnel header.
    pub fn encapsulated(&self) -> bool {
        self.rare.as_deref().is_some_and(|r| !r.encaps.is_empty())
    }

    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    fn offset_us(&self, ts_ns: u64) -> u32 {
        (ts_ns.saturating_sub(self.first_ns) / 1000).min(u64::from(NO_US - 1)) as u32
    }

    fn at_us(&self, us: u32) -> Option<u64> {
        (us != NO_US).then(|| self.first_ns + u64::from(us) * 1000)
    }

    /// Where the requests were first seen on this node, outside any tunnel: their size there
    /// is the size the sender gave them.
    pub fn request_hop(&self) -> Option<&Hop> {
        self.hops()
            .filter(|h| h.side == Side::Forward)
            .filter(|h| self.view(h).encap.is_none())
            .min_by_key(|h| h.first_us)
    }

    /// The hops with their tuples and tunnel headers resolved, in the order first seen.
    pub fn path(&self) -> impl DoubleEndedIterator<Item = HopView<'_>> + '_ {
        self.hops().map(move |h| self.view(h))
    }

    pub fn view<'a>(&'a self, h: &'a Hop) -> HopView<'a> {
        let t = self
            .tuples()
            .nth(usize::from(h.tuple))
            .unwrap_or_else(|| self.forward_tuple())
            .on(h.side);
        let encap = self.rare.as_deref().and_then(|r| {
            r.encaps
                .iter()
                .find(|(i, d, s, _)| h.is(*i, *d, *s))
                .map(|(.., e)| e)
        });
        HopView {
            hop: h,
            iface: &h.iface,
            ifindex: h.iface.ifindex,
            role: h.iface.role,
            dir: h.dir,
            side: h.side,
            src: t.src,
            sport: t.sport,
            dst: t.dst,
            dport: t.dport,
            encap,
            first_ns: self.first_ns + u64::from(h.first_us) * 1000,
        }
    }

    /// Adds one observation on `side`; `iface` names the observation's interface and is only
    /// asked for when this is the first record there. Returns whether it was.
    pub fn record(
        &mut self,
        obs: &Observation,
        side: Side,
        iface: impl FnOnce() -> Arc<Iface>,
    ) -> bool {
        let p = *obs.packet();
        self.seen_at(obs.ts_ns);
        if side == Side::Reverse && self.reply_us == NO_US {
            self.reply_us = self.offset_us(obs.ts_ns);
        }
        let syn = p.proto == PROTO_TCP && p.tcp_flags & TCP_SYN != 0;
        let idx = self.hop_position(|h| h.is(obs.ifindex, obs.dir, side));
        // A SYN (or SYN-ACK) again at a hop that already saw it, with the same sequence number.
        let syn_again = syn
            && idx.is_some_and(|i| self.hop(i).is_some_and(|h| h.tcp_flags_seen & TCP_SYN != 0))
            && match side {
                Side::Forward => self.tcp.syn && self.tcp.syn_seq == p.seq,
                Side::Reverse => self.tcp.syn_ack && self.tcp.syn_ack_seq == p.seq,
            };
        if p.proto == PROTO_TCP {
            self.record_tcp(&p, side, obs.ts_ns);
            self.track_stall(&p, side, obs);
            if p.payload_len > 0 {
                self.exchanges.observe(obs.ifindex, side, obs.ts_ns);
            }
        }
        let (idx, new) = match idx {
            Some(i) => (i, false),
            None if self.hops().count() >= MAX_HOPS => return false,
            None => {
                let mut iface = iface();
                if iface.ifindex != obs.ifindex {
                    iface = Iface::unnamed(obs.ifindex);
                }
                let seen = DirTuple::of(&p).on(side);
                let tuple = self.tuples().position(|u| u == seen).unwrap_or(0) as u8;
                if let Some((kind, vni, _)) = &obs.inner {
                    let e = HopEncap {
                        kind: *kind,
                        vni: (*kind == Encap::Vxlan).then_some(*vni),
                        outer_src: obs.outer.src,
                        outer_dst: obs.outer.dst,
                        outer_sport: obs.outer.sport,
                        outer_dport: obs.outer.dport,
                    };
                    self.rare_mut().encaps.push((obs.ifindex, obs.dir, side, e));
                }
                let first_us = self.offset_us(obs.ts_ns);
                let i = self.push_hop(Hop {
                    iface,
                    bytes: 0,
                    counts: 0,
                    first_us,
                    dir: obs.dir,
                    side,
                    tcp_flags_seen: 0,
                    tuple,
                });
                (i, true)
            }
        };
        let first_us = self.offset_us(obs.ts_ns);
        let Some(hop) = self.hop_mut(idx) else {
            return new;
        };
        hop.first_us = hop.first_us.min(first_us);
        hop.add_pkts(obs.pkts);
        hop.bytes = hop.bytes.saturating_add(obs.bytes);
        hop.tcp_flags_seen |= p.tcp_flags;
        if obs.emit == Emit::Retransmit || syn_again {
            hop.add_retransmit();
        }
        new
    }

    fn record_tcp(&mut self, p: &Packet, side: Side, ts: u64) {
        let syn = p.tcp_flags & TCP_SYN != 0;
        let ack = p.tcp_flags & TCP_ACK != 0;
        if syn && !ack && side == Side::Forward {
            if !self.tcp.syn {
                self.tcp.syn_us = self.offset_us(ts);
            }
            self.tcp.syn = true;
            self.tcp.syn_seq = p.seq;
            self.expects_reply = true;
        }
        if syn && ack && side == Side::Reverse {
            if !self.tcp.syn_ack {
                self.tcp.syn_ack_us = self.offset_us(ts);
            }
            self.tcp.syn_ack = true;
            self.tcp.syn_ack_seq = p.seq;
        }
        if p.tcp_flags & TCP_FIN != 0 {
            self.tcp.fin = true;
        }
        if p.tcp_flags & TCP_RST != 0 {
            self.tcp.rst = true;
        }
    }

    /// Follows the latest segment each side sends again until the other side acknowledges past
    /// its start: what is left is data that never got through.
    fn track_stall(&mut self, p: &Packet, side: Side, obs: &Observation) {
        let other = match side {
            Side::Forward => 1,
            Side::Reverse => 0,
        };
        if p.tcp_flags & TCP_ACK != 0 {
            if let Some(r) = self.rare.as_deref_mut() {
                if r.stalls[other].is_some_and(|s| (p.ack.wrapping_sub(s.seq) as i32) > 0) {
                    r.stalls[other] = None;
                }
            }
        }
        if obs.emit != Emit::Retransmit || p.payload_len == 0 {
            return;
        }
        let slot = &mut self.rare_mut().stalls[1 - other];
        match slot {
            Some(s) if s.ifindex != obs.ifindex || s.dir != obs.dir => {}
            Some(s) if s.seq == p.seq => {
                s.retransmits = s.retransmits.saturating_add(1);
                s.payload_len = s.payload_len.max(p.payload_len);
                s.last_ns = s.last_ns.max(obs.ts_ns);
            }
            _ => {
                *slot = Some(Stall {
                    side,
                    seq: p.seq,
                    payload_len: p.payload_len,
                    retransmits: 1,
                    ifindex: obs.ifindex,
                    dir: obs.dir,
                    first_ns: obs.ts_ns,
                    last_ns: obs.ts_ns,
                })
            }
        }
    }

    /// Segments sent again that no ACK has passed yet.
    pub fn stalls(&self) -> impl Iterator<Item = &Stall> + '_ {
        self.rare.iter().flat_map(|r| r.stalls.iter().flatten())
    }

    /// Notes a translated forward tuple; false when the flow keeps no more of them.
    pub(super) fn add_translation(&mut self, fwd: DirTuple) -> bool {
        if self.tuples().any(|u| u == fwd) {
            return true;
        }
        if self.nat.is_none() {
            // Keep the first translation as `nat`: the one closest to the pod.
            self.nat = Some(Nat {
                src: fwd.src,
                sport: fwd.sport,
                dst: fwd.dst,
                dport: fwd.dport,
            });
            return true;
        }
        let rare = self.rare_mut();
        if rare.extra_translations.len() >= MAX_EXTRA_TRANSLATIONS {
            return false;
        }
        rare.extra_translations.push(fwd);
        true
    }

    pub fn record_drop(
        &mut self,
        ts_ns: u64,
        ifindex: u32,
        reason: u32,
        location: u64,
        side: Side,
    ) {
        self.seen_at(ts_ns);
        let drops = &mut self.rare_mut().drops;
        if let Some(d) = drops
            .iter_mut()
            .find(|d| d.reason == reason && d.location == location && d.ifindex == ifindex)
        {
            d.count = d.count.saturating_add(1);
            return;
        }
        if drops.len() < MAX_DROPS {
            drops.push(DropRecord {
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
        self.hops()
            .filter(|h| h.side == side)
            .fold((0, 0), |(p, b), h| (p.max(h.pkts()), b.max(h.bytes)))
    }

    pub fn retransmits(&self) -> u32 {
        self.hops().map(Hop::retransmits).max().unwrap_or(0)
    }

    /// Handshake round trip as seen at the first hop, in nanoseconds (µs precision).
    pub fn handshake_ns(&self) -> Option<u64> {
        match (self.at_us(self.tcp.syn_us), self.at_us(self.tcp.syn_ack_us)) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        }
    }
}

// The table's memory budget (docs/benchmarks.md: at most 350 bytes a flow with four hops, at a
// million flows, the table's indexes included) rests on these sizes: a field added here has to
// pay for itself.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<Hop>() == 32);
    assert!(std::mem::size_of::<Option<Hop>>() == 32);
    assert!(std::mem::size_of::<Exchanges>() == 32);
    assert!(std::mem::size_of::<Flow>() <= 296);
    assert!(std::mem::size_of::<Option<Flow>>() == std::mem::size_of::<Flow>());
};
