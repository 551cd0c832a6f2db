//! Correlation: observations from many hooks become one flow per connection, through NAT.
//!
//! The same packet crosses several hooks (pod veth ingress, host NIC egress, ...). Where its tuple
//! is unchanged an index lookup finds the flow. Where felix or kube-proxy rewrote it (SNAT with
//! `--random-fully`, Service DNAT), the tuple is new, so the packet is matched by what NAT leaves
//! alone: TCP sequence and ack numbers, IP ID and payload length, plus whichever side of the tuple
//! did not change.
mod flow;
mod samples;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

pub use flow::{DirTuple, DropRecord, Exchanges, Flow, FlowId, Hop, HopEncap, Nat, Side};
pub use samples::{Sample, Samples};

use crate::{calico::Role, events::Observation};

/// How long a packet's fingerprint waits for the same packet at a later hook.
const FINGERPRINT_TTL_NS: u64 = 2_000_000_000;

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
        self.proto == 6 && (self.seq != 0 || self.ack != 0)
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
            d.segments()[0] == 0xff02 || (p.proto == 58 && matches!(icmp_type, 130..=137 | 143))
        }
        IpAddr::V4(_) => false,
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    flow: FlowId,
    side: Side,
    ts_ns: u64,
}

/// Resolves an ifindex to the interface's name and role at the time of the observation.
pub trait IfaceLookup {
    fn iface(&self, ifindex: u32) -> (Arc<str>, Option<Role>);
}

impl<F: Fn(u32) -> (Arc<str>, Option<Role>)> IfaceLookup for F {
    fn iface(&self, ifindex: u32) -> (Arc<str>, Option<Role>) {
        self(ifindex)
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct TableStats {
    pub flows: usize,
    pub observations: u64,
    pub nat_matches: u64,
    pub evicted: u64,
    /// Neighbour discovery / link-scope multicast records, not tracked.
    pub ignored: u64,
    /// Kernel drops attributed to a flow, and those of packets no hook had seen.
    pub drops: u64,
    pub unmatched_drops: u64,
}

pub struct FlowTable {
    flows: BTreeMap<FlowId, Flow>,
    index: FastMap<DirTuple, (FlowId, Side)>,
    /// Only the source changed (SNAT): keyed by what stayed, the destination.
    fp_snat: FastMap<(Ident, IpAddr, u16), Pending>,
    /// Only the destination changed (DNAT): keyed by the source.
    fp_dnat: FastMap<(Ident, IpAddr, u16), Pending>,
    /// Both changed: TCP only, on sequence numbers alone.
    fp_both: FastMap<Ident, Pending>,
    next_id: FlowId,
    cap: usize,
    stats: TableStats,
    /// The last records, for pcap export.
    samples: Samples,
    /// Bumped on every change; `changes` says which flow changed at which version (bounded).
    version: u64,
    changes: std::collections::VecDeque<(u64, FlowId)>,
    /// Changes up to this version are no longer listed.
    forgotten_upto: u64,
}

/// How many (version, flow) change entries watchers can lag behind before a full rescan.
const CHANGES_KEPT: usize = 65_536;

impl FlowTable {
    pub fn new(cap: usize) -> FlowTable {
        FlowTable {
            flows: BTreeMap::new(),
            index: FastMap::default(),
            fp_snat: FastMap::default(),
            fp_dnat: FastMap::default(),
            fp_both: FastMap::default(),
            next_id: 1,
            cap: cap.max(1),
            stats: TableStats::default(),
            samples: Samples::new(samples::DEFAULT_SAMPLES),
            version: 0,
            changes: std::collections::VecDeque::new(),
            forgotten_upto: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            flows: self.flows.len(),
            ..self.stats
        }
    }

    pub fn get(&self, id: FlowId) -> Option<&Flow> {
        self.flows.get(&id)
    }

    /// Newest first.
    pub fn iter_newest(&self) -> impl Iterator<Item = &Flow> {
        self.flows.values().rev()
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
            None
        } else {
            {
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
        }
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
        if self.changes.len() >= CHANGES_KEPT {
            if let Some((v, _)) = self.changes.pop_front() {
                self.forgotten_upto = v;
            }
        }
        self.changes.push_back((self.version, id));
    }

    /// Adds one observation; returns the flow it was attributed to.
    pub fn ingest(&mut self, obs: &Observation, ifaces: &impl IfaceLookup) -> Option<FlowId> {
        self.stats.observations += 1;
        let p = *obs.packet();
        if is_link_control(&p) {
            self.stats.ignored += 1;
            return None;
        }
        if let Some(d) = obs.drop {
            // Only drops of traced flows matter; anything else on the node is not ours to report.
            let Some(&(id, side)) = self.index.get(&DirTuple::of(&p)) else {
                self.stats.unmatched_drops += 1;
                return None;
            };
            if let Some(f) = self.flows.get_mut(&id) {
                f.record_drop(obs.ts_ns, obs.ifindex, d.reason, d.location, side);
            }
            self.stats.drops += 1;
            self.touch(id);
            return Some(id);
        }
        let t = DirTuple::of(&p);
        let ident = Ident::of(obs);

        let (id, side) = match self.index.get(&t).copied() {
            Some((id, side)) if !self.is_new_connection(id, side, obs) => (id, side),
            Some((old, _)) => {
                self.unindex(old);
                self.create(obs, t)
            }
            None => match self
                .match_translated(ident, &t, obs.ts_ns)
                .filter(|_| ident.usable(p.src.is_ipv4()))
            {
                Some((id, side)) => {
                    self.stats.nat_matches += 1;
                    self.register_translation(id, side, &t);
                    (id, side)
                }
                None => self.create(obs, t),
            },
        };

        let (iface, role) = ifaces.iface(obs.ifindex);
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.record(obs, side, &iface, role);
        }
        // Only records that may meet a translated copy at a later hook: first packets per hook,
        // TCP control and retransmissions. Periodic summaries and turns of known flows need none.
        let may_translate = !matches!(
            obs.emit,
            crate::events::Emit::Periodic | crate::events::Emit::Turn
        );
        if may_translate && ident.usable(p.src.is_ipv4()) {
            self.remember(ident, &t, id, side, obs.ts_ns);
        }
        self.samples.push(id, side, obs);
        self.touch(id);
        Some(id)
    }

    /// A pure SYN with a new initial sequence on a known tuple is a new connection reusing it.
    fn is_new_connection(&self, id: FlowId, side: Side, obs: &Observation) -> bool {
        let p = obs.packet();
        if p.proto != 6 || side != Side::Forward || p.tcp_flags & 0x12 != 0x02 {
            return false;
        }
        match self.flows.get(&id) {
            Some(f) => f.tcp.syn_seq.is_some_and(|s| s != p.seq),
            None => false,
        }
    }

    fn create(&mut self, obs: &Observation, t: DirTuple) -> (FlowId, Side) {
        let id = self.next_id;
        self.next_id += 1;
        let side = initiator_side(obs);
        let fwd = if side == Side::Forward {
            t
        } else {
            t.reversed()
        };
        let mut flow = Flow::new(id, fwd, obs.ts_ns);
        let p = obs.packet();
        // ICMP echo request (v4 type 8, v6 type 128) owes a reply.
        if (p.proto == 1 && p.dport >> 8 == 8) || (p.proto == 58 && p.dport >> 8 == 128) {
            flow.expects_reply = true;
        }
        self.index.insert(fwd, (id, Side::Forward));
        self.index.insert(fwd.reversed(), (id, Side::Reverse));
        self.flows.insert(id, flow);
        self.evict_over_cap();
        (id, side)
    }

    fn evict_over_cap(&mut self) {
        while self.flows.len() > self.cap {
            let Some((&oldest, _)) = self.flows.iter().next() else {
                break;
            };
            self.unindex(oldest);
            self.flows.remove(&oldest);
            self.stats.evicted += 1;
        }
    }

    fn unindex(&mut self, id: FlowId) {
        if let Some(f) = self.flows.get(&id) {
            for t in f.indexed_tuples() {
                if self.index.get(&t).is_some_and(|(fid, _)| *fid == id) {
                    self.index.remove(&t);
                }
            }
        }
    }

    fn match_translated(&self, ident: Ident, t: &DirTuple, now: u64) -> Option<(FlowId, Side)> {
        let fresh = |p: &Pending| now.saturating_sub(p.ts_ns) <= FINGERPRINT_TTL_NS;
        let live = |p: &Pending| fresh(p) && self.flows.contains_key(&p.flow);
        if let Some(p) = self
            .fp_snat
            .get(&(ident, t.dst, t.dport))
            .filter(|p| live(p))
        {
            return Some((p.flow, p.side));
        }
        if let Some(p) = self
            .fp_dnat
            .get(&(ident, t.src, t.sport))
            .filter(|p| live(p))
        {
            return Some((p.flow, p.side));
        }
        if ident.strong() {
            if let Some(p) = self.fp_both.get(&ident).filter(|p| live(p)) {
                return Some((p.flow, p.side));
            }
        }
        None
    }

    /// `t` is the flow's packet after translation: index it and its reverse, note the NAT.
    fn register_translation(&mut self, id: FlowId, side: Side, t: &DirTuple) {
        let (fwd, rev) = match side {
            Side::Forward => (*t, t.reversed()),
            Side::Reverse => (t.reversed(), *t),
        };
        self.index.insert(fwd, (id, Side::Forward));
        self.index.insert(rev, (id, Side::Reverse));
        if let Some(flow) = self.flows.get_mut(&id) {
            let orig = flow.forward_tuple();
            match flow.nat {
                // Keep the first translation: the one closest to the pod.
                None if fwd != orig => {
                    flow.nat = Some(Nat {
                        src: fwd.src,
                        sport: fwd.sport,
                        dst: fwd.dst,
                        dport: fwd.dport,
                    })
                }
                _ => flow.extra_translations.push(fwd),
            }
        }
    }

    fn remember(&mut self, ident: Ident, t: &DirTuple, flow: FlowId, side: Side, ts_ns: u64) {
        let pending = Pending { flow, side, ts_ns };
        self.fp_snat.insert((ident, t.dst, t.dport), pending);
        self.fp_dnat.insert((ident, t.src, t.sport), pending);
        if ident.strong() {
            self.fp_both.insert(ident, pending);
        }
    }

    /// Drops fingerprints too old to match anything.
    pub fn sweep(&mut self, now_ns: u64) {
        let keep = |p: &Pending| now_ns.saturating_sub(p.ts_ns) <= FINGERPRINT_TTL_NS;
        self.fp_snat.retain(|_, p| keep(p));
        self.fp_dnat.retain(|_, p| keep(p));
        self.fp_both.retain(|_, p| keep(p));
    }
}

/// Which side the first packet of a new flow is on.
fn initiator_side(obs: &Observation) -> Side {
    let p = obs.packet();
    match p.proto {
        6 => {
            let syn = p.tcp_flags & 0x02 != 0;
            let ack = p.tcp_flags & 0x10 != 0;
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
        1 if p.dport >> 8 == 0 => Side::Reverse,
        58 if p.dport >> 8 == 129 => Side::Reverse,
        17 if p.sport < 1024 && p.dport >= 1024 => Side::Reverse,
        _ => Side::Forward,
    }
}

#[cfg(test)]
mod tests;
