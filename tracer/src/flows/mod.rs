//! Correlation: observations from many hooks become one flow per connection, through NAT.
//!
//! The same packet crosses several hooks (pod veth ingress, host NIC egress, ...). Where its tuple
//! is unchanged an index lookup finds the flow. Where felix or kube-proxy rewrote it (SNAT with
//! `--random-fully`, Service DNAT), the tuple is new, so the packet is matched by what NAT leaves
//! alone: TCP sequence and ack numbers, IP ID and payload length, plus whichever side of the tuple
//! did not change.
mod flow;
mod gaps;
mod index;
mod samples;
mod store;

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher,
    net::IpAddr,
    sync::Arc,
};

pub use flow::{
    DirTuple, DropRecord, Exchanges, Flow, FlowId, Hop, HopEncap, HopView, Iface, Nat, Side, Stall,
    TcpMilestones,
};
pub use gaps::{CounterRead, Gaps, LossWindow};
pub use samples::{Sample, Samples};

use crate::events::{Emit, Observation};
use index::TupleIndex;
use store::FlowStore;
use tracer_common::{
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// How long a packet's fingerprint waits for the same packet at a later hook (record time). A
/// packet crosses a node's hooks within microseconds; the slack covers a first packet held
/// while its next hop's neighbour entry resolves.
const FINGERPRINT_TTL_NS: u64 = 1_000_000_000;
/// Active flows one eviction may move to the tail before it evicts regardless: bounds the work
/// (and the table lock) of one record when every flow is busy.
const SECOND_CHANCES: usize = 16;
/// Eviction ids kept for [`FlowTable::evicted_since`]: at 5,000 new flows/s on a full table, 3 s
/// of evictions; the tally reads them every 500 ms.
const EVICTIONS_KEPT: usize = 16_384;
/// How often (record time) expired fingerprints are swept.
const SWEEP_EVERY_NS: u64 = 250_000_000;

/// The hot maps hash on every record: SipHash (std's default, built against HashDoS) cost most
/// of the ingest time; the keys here come from the kernel, not from remote peers directly, and
/// the maps are bounded by the flow cap.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What NAT leaves unchanged in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Ident {
    proto: u8,
    seq: u32,
    ack: u32,
    ip_id: u16,
    payload_len: u16,
    tcp_flags: u8,
}

impl Ident {
    fn of(obs: &Observation) -> Ident {
        let p = obs.packet();
        Ident {
            proto: p.proto,
            seq: p.seq,
            ack: p.ack,
            ip_id: p.ip_id,
            payload_len: p.payload_len,
            tcp_flags: p.tcp_flags,
        }
    }

    /// Distinctive enough to match on alone (both addresses rewritten): TCP's 32-bit sequence.
    fn strong(&self) -> bool {
        self.proto == PROTO_TCP && (self.seq != 0 || self.ack != 0)
    }

    /// Worth matching at all. Without TCP sequence numbers only a non-zero IPv4 ID tells packets
    /// apart (IPv6 has none, and DF packets often carry ID 0).
    fn usable(&self, ipv4: bool) -> bool {
        self.strong() || (ipv4 && self.ip_id != 0)
    }
}

/// Neighbour discovery and multicast listener chatter: not flows anyone asks about.
fn is_link_control(p: &crate::events::Packet) -> bool {
    match p.dst {
        IpAddr::V6(d) => {
            let icmp_type = (p.dport >> 8) as u8;
            d.segments()[0] == 0xff02
                || (p.proto == PROTO_ICMPV6 && matches!(icmp_type, 130..=137 | 143))
        }
        IpAddr::V4(_) => false,
    }
}

/// A packet seen recently, waiting for its translated copy at a later hook.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Flow id shifted left once, the side in the low bit: 16 bytes an entry, not 24.
    flow_side: u64,
    ts_ns: u64,
}

impl Pending {
    fn new(flow: FlowId, side: Side, ts_ns: u64) -> Pending {
        Pending {
            flow_side: flow << 1 | u64::from(side == Side::Reverse),
            ts_ns,
        }
    }

    fn flow(&self) -> FlowId {
        self.flow_side >> 1
    }

    fn side(&self) -> Side {
        if self.flow_side & 1 == 1 {
            Side::Reverse
        } else {
            Side::Forward
        }
    }
}

/// Resolves an ifindex to the interface as it is at the time of the observation.
pub trait IfaceLookup {
    fn iface(&self, ifindex: u32) -> Arc<Iface>;
}

impl<F: Fn(u32) -> Arc<Iface>> IfaceLookup for F {
    fn iface(&self, ifindex: u32) -> Arc<Iface> {
        self(ifindex)
    }
}

pub use tracer_model::health::TableStats;

pub struct FlowTable {
    flows: FlowStore,
    /// Both directions of every tuple of every flow (see `index.rs`).
    index: TupleIndex,
    /// Packets remembered by what NAT leaves unchanged (a digest of their `Ident`); a match is
    /// accepted when the flow's packet kept one end of the tuple (SNAT: the destination, DNAT:
    /// the source), or for TCP on sequence numbers alone (both rewritten).
    fingerprints: FastMap<u64, Pending>,
    digest: foldhash::fast::RandomState,
    cap: usize,
    stats: TableStats,
    /// The newest record time seen: fingerprints expire in record time, so an agent that falls
    /// behind does not lose them.
    latest_ns: u64,
    next_sweep_ns: u64,
    /// The last records, for pcap export.
    samples: Samples,
    /// Bumped on every change; `changes` says which flow changed at which version (bounded).
    version: u64,
    changes: VecDeque<(u64, FlowId)>,
    changes_cap: usize,
    /// Changes up to this version are no longer listed.
    forgotten_upto: u64,
    /// The ids of the last evictions (bounded), so the tally forgets them without a walk.
    evictions: VecDeque<FlowId>,
    /// Drops of traced flows by the kernel's reason number (see [`DROP_REASONS_KEPT`]).
    drops_by_reason: std::collections::BTreeMap<u32, u64>,
    /// With a flow log: flows evicted before they were logged, kept until the agent's tick
    /// logs them (at most `unlogged_cap`; beyond it they are counted in `unlogged_lost`).
    unlogged: Option<Vec<Flow>>,
    unlogged_cap: usize,
    unlogged_lost: u64,
    /// The latest ICMP "fragmentation needed" / ICMPv6 "packet too big" messages, whatever flow
    /// they concern (their quoted packet is not parsed: the rules match them by address).
    too_big: Vec<TooBig>,
    /// The largest answered ICMP echo / UDP request per path, to tell a request too big for
    /// the path from an unanswered one.
    answered: Vec<Answered>,
}

/// ICMP echo or UDP requests from `src` to `dst` (UDP: to port `dport`, else 0) that got a
/// reply: the largest, as first seen on this node (at `ifindex`, `len` bytes as the hook saw
/// them, link header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub last_ns: u64,
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub ifindex: u32,
    pub len: u32,
}

/// Most paths whose answered request sizes are kept (the oldest goes first).
const ANSWERED_KEPT: usize = 64;

/// An ICMP message saying a packet was too big for the next hop, as seen at one hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooBig {
    pub first_ns: u64,
    pub last_ns: u64,
    pub from: IpAddr,
    pub to: IpAddr,
    pub ifindex: u32,
    pub dir: crate::events::Dir,
    /// The next hop's MTU it announced.
    pub mtu: u32,
}

/// Most distinct too-big messages kept (the oldest goes first).
const TOO_BIG_KEPT: usize = 64;

/// The MTU a "fragmentation needed" (ICMP 3/4) or "packet too big" (ICMPv6 2/0) announces. The
/// kernel puts ICMP header bytes 4-5 in `sport` and 6-7 in `seq`: the IPv4 next-hop MTU is bytes
/// 6-7, the IPv6 MTU bytes 4-7.
fn too_big_mtu(p: &crate::events::Packet) -> Option<u32> {
    match (p.proto, p.dport) {
        (PROTO_ICMP, 0x0304) => Some(p.seq & 0xffff),
        (PROTO_ICMPV6, 0x0200) => Some(u32::from(p.sport) << 16 | (p.seq & 0xffff)),
        _ => None,
    }
}

/// Most distinct drop reasons counted apart: the kernel's `skb_drop_reason` enum has about a
/// hundred; any beyond this are counted under [`OTHER_DROP_REASON`], so the metric's
/// cardinality stays bounded whatever the kernel sends.
const DROP_REASONS_KEPT: usize = 128;
/// Where reasons beyond [`DROP_REASONS_KEPT`] are counted.
pub const OTHER_DROP_REASON: u32 = u32::MAX;

/// Bounds of the evicted-unlogged flows kept between two flow-log ticks: the flow cap, within
/// these (a flow is ~200 B plus its hops).
const MIN_UNLOGGED_KEPT: usize = 1024;
const MAX_UNLOGGED_KEPT: usize = 16_384;

/// Most (version, flow) change entries watchers can lag behind before a full rescan.
const CHANGES_KEPT: usize = 65_536;

impl FlowTable {
    pub fn new(cap: usize) -> FlowTable {
        let cap = cap.max(1);
        FlowTable {
            flows: FlowStore::new(),
            index: TupleIndex::new(),
            fingerprints: FastMap::default(),
            digest: foldhash::fast::RandomState::default(),
            cap,
            stats: TableStats::default(),
            latest_ns: 0,
            next_sweep_ns: 0,
            samples: Samples::for_cap(cap),
            version: 0,
            changes: VecDeque::new(),
            changes_cap: cap.clamp(1024, CHANGES_KEPT),
            forgotten_upto: 0,
            evictions: VecDeque::new(),
            drops_by_reason: Default::default(),
            unlogged: None,
            unlogged_cap: cap.clamp(MIN_UNLOGGED_KEPT, MAX_UNLOGGED_KEPT),
            unlogged_lost: 0,
            too_big: Vec::new(),
            answered: Vec::new(),
        }
    }

    /// Keeps flows evicted before they were logged for [`FlowTable::take_unlogged`], so the
    /// flow log sees every flow.
    pub fn keep_unlogged(&mut self) {
        self.unlogged.get_or_insert_with(Vec::new);
    }

    /// Flows evicted before they were logged, since the last call.
    pub fn take_unlogged(&mut self) -> Vec<Flow> {
        self.unlogged
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Flows evicted unlogged that could not be kept (more than the bound between two takes).
    pub fn unlogged_lost(&self) -> u64 {
        self.unlogged_lost
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        self.flows.get_mut(id)
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.len() == 0
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            flows: self.flows.len(),
            ..self.stats
        }
    }

    pub fn get(&self, id: FlowId) -> Option<&Flow> {
        self.flows.get(id)
    }

    /// Newest first.
    pub fn iter_newest(&self) -> impl Iterator<Item = &Flow> {
        self.flows.iter_newest()
    }

    /// Newest first, the flows with ids below `bound` (to walk the table a part at a time).
    pub fn iter_newest_below(&self, bound: FlowId) -> impl Iterator<Item = (FlowId, &Flow)> {
        self.flows.iter_newest_below(bound)
    }

    /// Newest first, a superset of the flows whose source (as first seen or translated) is
    /// `src`: filter them still. Reads 4 bytes per flow, not the flow.
    pub fn iter_newest_from(&self, src: IpAddr) -> impl Iterator<Item = &Flow> {
        self.flows.iter_newest_from(src)
    }

    /// Newest first, exactly the flows with slots below `bound` whose destination (as first
    /// seen or translated) is in `net`, with their slots: found in the address index, no other
    /// flow is read.
    pub fn iter_newest_to<'a>(
        &'a self,
        net: &'a crate::net::Cidr,
        bound: FlowId,
    ) -> impl Iterator<Item = (FlowId, &'a Flow)> + 'a {
        self.flows.iter_newest_to(net, bound)
    }

    /// How many flows have a destination (as first seen or translated) in `net`, counted in
    /// the address index without reading them.
    pub fn count_to(&self, net: &crate::net::Cidr) -> usize {
        self.flows.count_to(net)
    }

    /// Newest first, hands `each` the flows whose destination (as first seen or translated) is
    /// in `net` until it returns false, and counts them all in the address index: one lookup
    /// per chunk for both (`count_to` and `iter_newest_to` each looked the shown chunks up).
    pub fn visit_newest_to_counting(
        &self,
        net: &crate::net::Cidr,
        each: impl FnMut(&Flow) -> bool,
    ) -> usize {
        self.flows.visit_newest_to_counting(net, each)
    }

    /// Drops of traced flows so far, by the kernel's reason number.
    pub fn drops_by_reason(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.drops_by_reason.iter().map(|(r, n)| (*r, *n))
    }

    /// The latest too-big messages, oldest first.
    pub fn too_big(&self) -> &[TooBig] {
        &self.too_big
    }

    /// The largest answered request per path, oldest first.
    pub fn answered(&self) -> &[Answered] {
        &self.answered
    }

    /// A request flow's first reply: remembers how large its requests were where first seen.
    fn note_answered(&mut self, id: FlowId, ts_ns: u64) {
        let Some(f) = self.flows.get(id) else {
            return;
        };
        if !(f.proto == PROTO_UDP || (f.expects_reply && f.proto != PROTO_TCP)) {
            return;
        }
        let Some(h) = f.request_hop() else {
            return;
        };
        let (proto, src, dst, ifindex) = (f.proto, f.src, f.dst, h.ifindex());
        let dport = if proto == PROTO_UDP { f.dport } else { 0 };
        let len = h.bytes_per_packet();
        if let Some(a) = self.answered.iter_mut().find(|a| {
            (a.proto, a.src, a.dst, a.dport, a.ifindex) == (proto, src, dst, dport, ifindex)
        }) {
            a.len = a.len.max(len);
            a.last_ns = ts_ns;
            return;
        }
        if self.answered.len() >= ANSWERED_KEPT {
            self.answered.remove(0);
        }
        self.answered.push(Answered {
            last_ns: ts_ns,
            proto,
            src,
            dst,
            dport,
            ifindex,
            len,
        });
    }

    fn note_too_big(&mut self, obs: &Observation, mtu: u32) {
        let p = obs.packet();
        let same = |t: &&mut TooBig| {
            t.from == p.src
                && t.to == p.dst
                && t.ifindex == obs.ifindex
                && t.dir == obs.dir
                && t.mtu == mtu
        };
        if let Some(t) = self.too_big.iter_mut().find(same) {
            t.last_ns = t.last_ns.max(obs.ts_ns);
            return;
        }
        if self.too_big.len() >= TOO_BIG_KEPT {
            self.too_big.remove(0);
        }
        self.too_big.push(TooBig {
            first_ns: obs.ts_ns,
            last_ns: obs.ts_ns,
            from: p.src,
            to: p.dst,
            ifindex: obs.ifindex,
            dir: obs.dir,
            mtu,
        });
    }

    pub fn samples(&self) -> &Samples {
        &self.samples
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Flows changed after `since`, or None when that is too far back to know (rescan all).
    pub fn changed_since(&self, since: u64) -> Option<Vec<FlowId>> {
        if since < self.forgotten_upto {
            return None;
        }
        let mut ids: Vec<FlowId> = self
            .changes
            .iter()
            .rev()
            .take_while(|(v, _)| *v > since)
            .map(|(_, id)| *id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        Some(ids)
    }

    /// The flows evicted after the first `seen` evictions (`stats().evicted` counts them);
    /// None when that reaches back further than the ids kept.
    pub fn evicted_since(&self, seen: u64) -> Option<impl Iterator<Item = FlowId> + '_> {
        let n = usize::try_from(self.stats.evicted.checked_sub(seen)?).ok()?;
        let skip = self.evictions.len().checked_sub(n)?;
        Some(self.evictions.iter().skip(skip).copied())
    }

    fn touch(&mut self, id: FlowId) {
        self.version += 1;
        // Consecutive records of one flow are one change.
        if let Some(last) = self.changes.back_mut() {
            if last.1 == id {
                last.0 = self.version;
                return;
            }
        }
        if self.changes.len() >= self.changes_cap {
            if let Some((v, _)) = self.changes.pop_front() {
                self.forgotten_upto = v;
            }
        }
        if self.changes.len() == self.changes.capacity() {
            // Grown to its cap exactly, not by doubling past it.
            let want = (self.changes.len() * 2).clamp(1024, self.changes_cap);
            self.changes.reserve_exact(want - self.changes.len());
        }
        self.changes.push_back((self.version, id));
    }

    /// The flow carrying `t`, and on which side.
    fn lookup(&self, t: &DirTuple) -> Option<(FlowId, Side)> {
        self.index.lookup(&self.flows, t)
    }

    /// Adds one observation; returns the flow it was attributed to.
    pub fn ingest(&mut self, obs: &Observation, ifaces: &impl IfaceLookup) -> Option<FlowId> {
        self.stats.observations += 1;
        self.latest_ns = self.latest_ns.max(obs.ts_ns);
        if self.latest_ns >= self.next_sweep_ns {
            self.sweep(self.latest_ns);
        }
        let p = *obs.packet();
        if is_link_control(&p) {
            self.stats.ignored += 1;
            return None;
        }
        let t = DirTuple::of(&p);
        if obs.drop.is_none() {
            if let Some(mtu) = too_big_mtu(&p) {
                self.note_too_big(obs, mtu);
            }
        }
        if let Some(d) = obs.drop {
            // Only drops of traced flows matter; anything else on the node is not ours to report.
            // A dropped SYN that opens a new connection on a reused tuple is not the earlier
            // flow's: after SNAT port reuse, a SYN dropped by conntrack carries the translated
            // tuple of an answered flow (its own flow never saw that tuple).
            let Some((id, side)) = self
                .lookup(&t)
                .filter(|&(id, side)| !self.is_new_connection(id, side, obs))
            else {
                self.stats.unmatched_drops += 1;
                return None;
            };
            if let Some(f) = self.flows.get_mut(id) {
                f.record_drop(obs.ts_ns, obs.ifindex, d.reason, d.location, side);
            }
            self.stats.drops += 1;
            let known = self.drops_by_reason.len() < DROP_REASONS_KEPT
                || self.drops_by_reason.contains_key(&d.reason);
            let key = if known { d.reason } else { OTHER_DROP_REASON };
            *self.drops_by_reason.entry(key).or_default() += 1;
            self.touch(id);
            return Some(id);
        }
        let ident = Ident::of(obs);
        let usable = ident.usable(p.src.is_ipv4());

        let (id, side) = match self.lookup(&t) {
            Some((id, side)) if !self.is_new_connection(id, side, obs) => (id, side),
            Some((old, _)) => {
                self.unindex_id(old);
                self.create(obs, t)
            }
            None => match usable
                .then(|| self.match_translated(ident, &t, obs.ts_ns))
                .flatten()
            {
                Some((id, side)) => {
                    self.stats.nat_matches += 1;
                    self.register_translation(id, side, &t);
                    (id, side)
                }
                None => self.create(obs, t),
            },
        };

        let mut first_reply = false;
        let new_hop = match self.flows.get_mut(id) {
            Some(flow) => {
                first_reply = side == Side::Reverse && flow.first_reply_ns().is_none();
                flow.record(obs, side, || ifaces.iface(obs.ifindex))
            }
            None => false,
        };
        if first_reply {
            self.note_answered(id, obs.ts_ns);
        }
        // Only records that may meet a translated copy at a later hook: the first at each hook,
        // TCP control and retransmissions. Later packets of a known flow find the translated
        // tuple in the index.
        let control = p.proto == PROTO_TCP && p.tcp_flags & (TCP_FIN | TCP_SYN | TCP_RST) != 0;
        if usable && (new_hop || control || obs.emit == Emit::Retransmit) {
            self.remember(ident, id, side, obs.ts_ns);
        }
        self.samples.push(id, side, obs);
        self.touch(id);
        Some(id)
    }

    /// A pure SYN with a new initial sequence on a known tuple is a new connection reusing it.
    fn is_new_connection(&self, id: FlowId, side: Side, obs: &Observation) -> bool {
        let p = obs.packet();
        if p.proto != PROTO_TCP
            || side != Side::Forward
            || p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
        {
            return false;
        }
        match self.flows.get(id) {
            Some(f) => f.tcp.syn_seq().is_some_and(|s| s != p.seq),
            None => false,
        }
    }

    fn create(&mut self, obs: &Observation, t: DirTuple) -> (FlowId, Side) {
        // Room first: with every flow active, eviction would otherwise reach the new flow,
        // still empty, and take it before its first record.
        self.evict_down_to(self.cap - 1);
        let id = self.flows.next_id();
        let side = initiator_side(obs);
        let fwd = t.on(side);
        let mut flow = Flow::new(id, fwd, obs.ts_ns);
        let p = obs.packet();
        // ICMP echo request (v4 type 8, v6 type 128) owes a reply.
        if (p.proto == PROTO_ICMP && p.dport >> 8 == 8)
            || (p.proto == PROTO_ICMPV6 && p.dport >> 8 == 128)
        {
            flow.expects_reply = true;
        }
        self.flows.push(flow);
        self.index.insert(&self.flows, id, 0);
        (id, side)
    }

    /// Evicts by last activity, approximately (CLOCK): a burst of new tuples pushes out idle
    /// flows, not a long-lived one that is still sending (say, a broken connection under
    /// investigation retransmitting its SYN).
    fn evict_down_to(&mut self, keep: usize) {
        while self.flows.len() > keep {
            let Some(f) = self.flows.pop_coldest(SECOND_CHANCES) else {
                break;
            };
            self.unindex(&f);
            self.stats.evicted += 1;
            if self.evictions.len() >= EVICTIONS_KEPT {
                self.evictions.pop_front();
            }
            self.evictions.push_back(f.id);
            if let Some(kept) = self.unlogged.as_mut().filter(|_| !f.logged) {
                if kept.len() < self.unlogged_cap {
                    kept.push(f);
                } else {
                    self.unlogged_lost += 1;
                }
            }
        }
    }

    fn unindex_id(&mut self, id: FlowId) {
        if let Some(f) = self.flows.get(id) {
            self.index.remove(f);
        }
    }

    fn unindex(&mut self, f: &Flow) {
        self.index.remove(f);
    }

    /// Two slots per fingerprint: packets of two flows that look alike to NAT (UDP with the
    /// same IP ID and length) do not push each other out.
    fn fingerprint_keys(&self, ident: Ident) -> [u64; 2] {
        let k = self.digest.hash_one(ident);
        [k, k.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15]
    }

    fn remember(&mut self, ident: Ident, id: FlowId, side: Side, ts_ns: u64) {
        use std::collections::hash_map::Entry;
        let [k0, k1] = self.fingerprint_keys(ident);
        let new = Pending::new(id, side, ts_ns);
        let free =
            |p: &Pending| p.flow() == id || ts_ns.saturating_sub(p.ts_ns) > FINGERPRINT_TTL_NS;
        // The first free key takes it, each key probed once.
        let ts0 = match self.fingerprints.entry(k0) {
            Entry::Vacant(v) => {
                v.insert(new);
                return;
            }
            Entry::Occupied(mut o) if free(o.get()) => {
                o.insert(new);
                return;
            }
            Entry::Occupied(o) => o.get().ts_ns,
        };
        match self.fingerprints.entry(k1) {
            Entry::Vacant(v) => {
                v.insert(new);
            }
            // Both taken by other live flows: replace the older.
            Entry::Occupied(mut o) if free(o.get()) || o.get().ts_ns < ts0 => {
                o.insert(new);
            }
            Entry::Occupied(_) => {
                self.fingerprints.insert(k0, new);
            }
        }
    }

    fn match_translated(&self, ident: Ident, t: &DirTuple, now: u64) -> Option<(FlowId, Side)> {
        self.fingerprint_keys(ident).iter().find_map(|k| {
            let p = self.fingerprints.get(k)?;
            if now.saturating_sub(p.ts_ns) > FINGERPRINT_TTL_NS {
                return None;
            }
            let (id, side) = (p.flow(), p.side());
            let flow = self.flows.get(id)?;
            let kept_one_end = flow.tuples().any(|u| {
                let seen = u.on(side);
                seen.proto == t.proto
                    && ((seen.dst, seen.dport) == (t.dst, t.dport)
                        || (seen.src, seen.sport) == (t.src, t.sport))
            });
            (kept_one_end || ident.strong()).then_some((id, side))
        })
    }

    /// `t` is the flow's packet after translation: index it (both directions), note the NAT.
    fn register_translation(&mut self, id: FlowId, side: Side, t: &DirTuple) {
        let fwd = t.on(side);
        let (kept, first) = match self.flows.get_mut(id) {
            Some(flow) => {
                let had = flow.nat.is_some();
                (flow.add_translation(fwd), !had && flow.nat.is_some())
            }
            None => (false, false),
        };
        let pos = kept
            .then(|| self.flows.get(id)?.tuples().position(|u| u == fwd))
            .flatten();
        if let Some(pos) = pos {
            self.index.insert(&self.flows, id, pos);
        }
        // The addresses queries match are the first seen and the first translation's.
        if first {
            self.flows.retag(id);
        }
    }

    /// Drops fingerprints too old to match anything. `now_ns` is capped by the newest record
    /// seen, so records still queued behind a busy agent keep their fingerprints.
    pub fn sweep(&mut self, now_ns: u64) {
        let now = now_ns.min(self.latest_ns);
        self.fingerprints
            .retain(|_, p| now.saturating_sub(p.ts_ns) <= FINGERPRINT_TTL_NS);
        self.next_sweep_ns = self.latest_ns.saturating_add(SWEEP_EVERY_NS);
    }
}

/// Which side the first packet of a new flow is on.
fn initiator_side(obs: &Observation) -> Side {
    let p = obs.packet();
    match p.proto {
        PROTO_TCP => {
            let syn = p.tcp_flags & TCP_SYN != 0;
            let ack = p.tcp_flags & TCP_ACK != 0;
            if syn && !ack {
                Side::Forward
            } else if syn && ack {
                Side::Reverse
            } else if p.sport < p.dport {
                // Mid-stream: the lower port is most likely the server's.
                Side::Reverse
            } else {
                Side::Forward
            }
        }
        // Echo reply (v4 type 0, v6 type 129).
        PROTO_ICMP if p.dport >> 8 == 0 => Side::Reverse,
        PROTO_ICMPV6 if p.dport >> 8 == 129 => Side::Reverse,
        PROTO_UDP if p.sport < 1024 && p.dport >= 1024 => Side::Reverse,
        _ => Side::Forward,
    }
}

#[cfg(test)]
mod tests;
