//! Flows in slots handed out in sequence; only the oldest slot is ever emptied, so a flow's slot
//! is found from its id with no tree or hash map per flow, and flows lie next to each other in
//! memory. A flow's id is the slot it was created in. Eviction gives flows that were active
//! since they were last looked at a second chance (CLOCK): such a flow moves to a new slot at
//! the tail, keeps its id, and only moved flows need a map entry (`moved`).
//!
//! Each chunk of slots indexes its flows by destination (as first seen and as translated),
//! sorted by address: `/flows?dst=<ip>` and `dst=<prefix>` look up a range in each chunk
//! (a binary search) and read only the flows in it, newest first, and count the matches of a
//! prefix from the index alone. Beside each flow sit 4 bytes of source tags (16-bit digests of
//! its source before and after NAT): `src=<ip>` reads those instead of the flows.
use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv6Addr},
};

use super::{Flow, FlowId};
use crate::net::Cidr;

/// Flows per chunk: growth allocates one chunk, never copies the flows already stored.
const CHUNK: usize = 1024;
/// Words of a bitset over one chunk's slots.
const WORDS: usize = CHUNK / 64;

/// 16-bit digest of an address. Fixed, not keyed: a crafted collision only makes a query look
/// at more flows, never changes its answer.
pub fn addr_tag(ip: IpAddr) -> u16 {
    let folded = match ip {
        IpAddr::V4(a) => u64::from(a.to_bits()),
        IpAddr::V6(a) => {
            let b = a.to_bits();
            (b as u64) ^ ((b >> 64) as u64).rotate_left(17)
        }
    };
    (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as u16
}

/// Digests of a flow's source, as first seen and as translated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tags {
    src: [u16; 2],
}

impl Tags {
    fn of(f: &Flow) -> Tags {
        let nsrc = f.nat.map_or(f.src, |n| n.src);
        Tags {
            src: [addr_tag(f.src), addr_tag(nsrc)],
        }
    }

    fn may_match(&self, src: u16) -> bool {
        self.src.contains(&src)
    }
}

/// Entries `(address, slot in the chunk)` of one address family: sorted up to `sorted`,
/// appended after it (the chunk being filled; translations noted once it was full).
struct Sorted<K> {
    entries: Vec<(K, u16)>,
    sorted: usize,
}

impl<K> Default for Sorted<K> {
    fn default() -> Sorted<K> {
        Sorted {
            entries: Vec::new(),
            sorted: 0,
        }
    }
}

impl<K: Ord + Copy> Sorted<K> {
    fn push(&mut self, key: K, entry: u16) {
        if self.sorted > 0 && self.entries.len() == self.entries.capacity() {
            // A sealed chunk's late translation: grow by a little, not by doubling.
            self.entries.reserve_exact(8);
        }
        self.entries.push((key, entry));
    }

    /// Sorts what was appended and gives back the spare capacity: the chunk is full.
    fn seal(&mut self) {
        self.entries.sort_unstable();
        self.entries.shrink_to_fit();
        self.sorted = self.entries.len();
    }

    /// Marks the slots of the entries with keys in `lo..=hi` in `hits`.
    fn mark(&self, lo: K, hi: K, hits: &mut [u64; WORDS]) {
        let (sorted, appended) = self.entries.split_at(self.sorted.min(self.entries.len()));
        let start = sorted.partition_point(|(k, _)| *k < lo);
        let end = sorted.partition_point(|(k, _)| *k <= hi);
        let in_range = appended.iter().filter(|(k, _)| (lo..=hi).contains(k));
        for (_, e) in sorted
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .chain(in_range)
        {
            let off = usize::from(*e);
            if let Some(w) = hits.get_mut(off / 64) {
                *w |= 1 << (off % 64);
            }
        }
    }
}

/// A chunk's flows by destination address. IPv4 keys are two u16 (6-byte entries, not 8).
#[derive(Default)]
struct DstIndex {
    v4: Sorted<[u16; 2]>,
    v6: Sorted<[u8; 16]>,
}

fn v4_key(a: u32) -> [u16; 2] {
    [(a >> 16) as u16, a as u16]
}

impl DstIndex {
    fn add(&mut self, ip: IpAddr, entry: u16) {
        match ip {
            IpAddr::V4(a) => self.v4.push(v4_key(a.to_bits()), entry),
            IpAddr::V6(a) => self.v6.push(a.octets(), entry),
        }
    }

    /// Indexes the flow in slot `off` by its destinations.
    fn add_flow(&mut self, f: &Flow, off: usize) {
        let off = off as u16;
        self.add(f.dst, off);
        self.add_translated(f, off);
    }

    /// The translated destination, where it differs from the first seen one.
    fn add_translated(&mut self, f: &Flow, off: u16) {
        if let Some(n) = f.nat.filter(|n| n.dst != f.dst) {
            self.add(n.dst, off);
        }
    }

    fn seal(&mut self) {
        self.v4.seal();
        self.v6.seal();
    }

    /// The chunk's slots with a destination in `net`.
    fn hits(&self, net: &Cidr) -> [u64; WORDS] {
        let mut hits = [0u64; WORDS];
        let host_bits = |width: u32| {
            1u128
                .checked_shl(width - u32::from(net.prefix()))
                .map_or(u128::MAX, |b| b - 1)
        };
        match net.addr() {
            IpAddr::V4(a) => {
                let lo = a.to_bits();
                let hi = lo | host_bits(32) as u32;
                self.v4.mark(v4_key(lo), v4_key(hi), &mut hits);
            }
            IpAddr::V6(a) => {
                let lo = a.to_bits();
                let hi = lo | host_bits(128);
                let key = |b: u128| Ipv6Addr::from_bits(b).octets();
                self.v6.mark(key(lo), key(hi), &mut hits);
            }
        }
        hits
    }
}

/// The bits of the word covering slots `start..start + 64` that lie in `lo..hi`.
fn span_mask(start: usize, lo: usize, hi: usize) -> u64 {
    let from = lo.saturating_sub(start).min(64);
    let to = hi.saturating_sub(start).min(64);
    let below = |n: usize| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    if to <= from {
        0
    } else {
        below(to) & !below(from)
    }
}

/// Set bits of a chunk's bitset, highest first.
fn bits_desc(mut hits: [u64; WORDS]) -> impl Iterator<Item = usize> {
    let mut w = WORDS;
    std::iter::from_fn(move || loop {
        let word = hits.get_mut(w.checked_sub(1)?)?;
        if *word == 0 {
            w -= 1;
            continue;
        }
        let bit = 63 - word.leading_zeros() as usize;
        *word &= !(1 << bit);
        return Some((w - 1) * 64 + bit);
    })
}

#[derive(Default)]
struct Chunk {
    flows: Vec<Option<Flow>>,
    tags: Vec<Tags>,
    dsts: DstIndex,
}

pub(super) struct FlowStore {
    chunks: VecDeque<Chunk>,
    /// Slot number of the first slot of `chunks[0]`.
    base: FlowId,
    /// The oldest slot still stored.
    first: FlowId,
    next: FlowId,
    /// Flows living in another slot than their id's (given a second chance): id -> slot.
    moved: super::FastMap<FlowId, FlowId>,
    /// Flows stored (slots left empty by a move do not count).
    len: usize,
}

impl FlowStore {
    pub fn new() -> FlowStore {
        FlowStore {
            chunks: VecDeque::new(),
            base: 1,
            first: 1,
            next: 1,
            moved: Default::default(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The id the next pushed flow must carry.
    pub fn next_id(&self) -> FlowId {
        self.next
    }

    /// Where slot number `n` lives.
    fn position(&self, n: FlowId) -> Option<(usize, usize)> {
        if n < self.first || n >= self.next {
            return None;
        }
        let off = (n - self.base) as usize;
        Some((off / CHUNK, off % CHUNK))
    }

    /// Where flow `id` lives.
    fn slot(&self, id: FlowId) -> Option<(usize, usize)> {
        // A flow only moves once eviction has passed its own slot: from `first` on, every flow
        // is in its own, and the common lookup (a recent flow) skips the map.
        let n = if id >= self.first {
            id
        } else {
            *self.moved.get(&id)?
        };
        self.position(n)
    }

    pub fn get(&self, id: FlowId) -> Option<&Flow> {
        let (c, i) = self.slot(id)?;
        // A slot a moved flow now fills is not reachable by its own number.
        self.chunks
            .get(c)?
            .flows
            .get(i)?
            .as_ref()
            .filter(|f| f.id == id)
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        let (c, i) = self.slot(id)?;
        self.chunks
            .get_mut(c)?
            .flows
            .get_mut(i)?
            .as_mut()
            .filter(|f| f.id == id)
    }

    /// Stores `flow`, which must carry `next_id()`.
    pub fn push(&mut self, flow: Flow) {
        debug_assert_eq!(flow.id, self.next);
        self.put(flow);
    }

    /// Fills the next slot.
    fn put(&mut self, flow: Flow) {
        let off = (self.next - self.base) as usize;
        if off / CHUNK >= self.chunks.len() {
            if let Some(full) = self.chunks.back_mut() {
                full.dsts.seal();
            }
            self.chunks.push_back(Chunk {
                flows: Vec::with_capacity(CHUNK),
                tags: Vec::with_capacity(CHUNK),
                dsts: DstIndex::default(),
            });
        }
        let mut flow = flow;
        // Active from here on is active since it entered this slot.
        flow.active = false;
        if let Some(chunk) = self.chunks.back_mut() {
            chunk.tags.push(Tags::of(&flow));
            chunk.dsts.add_flow(&flow, off % CHUNK);
            // A flow in its own slot is a new one (`push`): never in the map.
            if flow.id != self.next {
                self.moved.insert(flow.id, self.next);
            }
            chunk.flows.push(Some(flow));
            self.next += 1;
            self.len += 1;
        }
    }

    /// Brings the address tags and index up to date after the flow's first translation was
    /// noted (its `nat` goes from None to set, once).
    pub fn retag(&mut self, id: FlowId) {
        let Some((c, i)) = self.slot(id) else {
            return;
        };
        if let Some(chunk) = self.chunks.get_mut(c) {
            let Some(f) = chunk.flows.get(i).and_then(Option::as_ref) else {
                return;
            };
            if let Some(slot) = chunk.tags.get_mut(i) {
                *slot = Tags::of(f);
            }
            chunk.dsts.add_translated(f, i as u16);
        }
    }

    /// Empties the oldest slot; returns its flow (None for a slot a moved flow left) and
    /// whether the flow had moved there.
    fn take_first(&mut self) -> Option<(Flow, bool)> {
        let slot = self.first;
        let (c, i) = self.position(slot)?;
        let chunk = self.chunks.get_mut(c)?;
        let flow = chunk.flows.get_mut(i)?.take();
        self.first += 1;
        if self.first - self.base >= CHUNK as FlowId {
            self.chunks.pop_front();
            self.base += CHUNK as FlowId;
        }
        let flow = flow?;
        self.len -= 1;
        let moved = flow.id != slot;
        Some((flow, moved))
    }

    /// Removes and returns the least recently active flow, approximately: flows active since
    /// they last entered a slot move to the tail instead (at most `chances` of them per call,
    /// so one eviction never walks the whole table).
    pub fn pop_coldest(&mut self, mut chances: usize) -> Option<Flow> {
        while self.len > 0 {
            let Some((flow, moved)) = self.take_first() else {
                continue;
            };
            if chances > 0 && flow.active {
                chances -= 1;
                self.put(flow);
                continue;
            }
            if moved {
                self.moved.remove(&flow.id);
            }
            return Some(flow);
        }
        None
    }

    /// Removes and returns the flow in the oldest slot, active or not.
    #[cfg(test)]
    pub fn pop_oldest(&mut self) -> Option<Flow> {
        self.pop_coldest(0)
    }

    /// The id of the flow eviction would look at first.
    #[cfg(test)]
    pub fn oldest_id(&self) -> Option<FlowId> {
        (self.first..self.next).find_map(|n| {
            let (c, i) = self.position(n)?;
            self.chunks.get(c)?.flows.get(i)?.as_ref().map(|f| f.id)
        })
    }

    /// Most recently (re)placed first.
    pub fn iter_newest(&self) -> impl Iterator<Item = &Flow> {
        self.iter_newest_below(FlowId::MAX).map(|(_, f)| f)
    }

    /// Most recently (re)placed first, the flows in slots below `bound`, with their slot
    /// numbers (to resume a walk from).
    pub fn iter_newest_below(&self, bound: FlowId) -> impl Iterator<Item = (FlowId, &Flow)> {
        let end = bound.min(self.next);
        let base = self.base;
        self.chunks
            .iter()
            .enumerate()
            .rev()
            .flat_map(move |(i, c)| {
                let chunk_base = base + (i * CHUNK) as FlowId;
                let take = end.saturating_sub(chunk_base).min(c.flows.len() as FlowId) as usize;
                c.flows[..take]
                    .iter()
                    .enumerate()
                    .rev()
                    .filter_map(move |(j, f)| f.as_ref().map(|f| (chunk_base + j as FlowId, f)))
            })
    }

    /// Newest first, only flows that may have `src` (as first seen or translated) going by
    /// their tags: a superset of the flows that do.
    pub fn iter_newest_from(&self, src: IpAddr) -> impl Iterator<Item = &Flow> {
        let src = addr_tag(src);
        self.chunks.iter().rev().flat_map(move |c| {
            c.tags
                .iter()
                .zip(&c.flows)
                .rev()
                .filter(move |(t, _)| t.may_match(src))
                .filter_map(|(_, f)| f.as_ref())
        })
    }

    /// The slots of chunk `c` (based at slot `chunk_base`) below `bound` with a flow whose
    /// destination (as first seen or translated) is in `net`.
    fn hits(&self, c: &Chunk, chunk_base: FlowId, net: &Cidr, bound: FlowId) -> [u64; WORDS] {
        let mut hits = c.dsts.hits(net);
        // Only slots from `first` to below `bound` hold flows (the index keeps entries of
        // slots emptied since).
        let lo = self.first.saturating_sub(chunk_base).min(CHUNK as FlowId) as usize;
        let hi = bound
            .min(self.next)
            .saturating_sub(chunk_base)
            .min(CHUNK as FlowId) as usize;
        for (w, word) in hits.iter_mut().enumerate() {
            *word &= span_mask(w * 64, lo, hi);
        }
        hits
    }

    /// Newest first, the flows in slots below `bound` whose destination, as first seen or
    /// translated, is in `net` (exact: from the index, no flow read to find them), with their
    /// slot numbers (to resume a walk from).
    pub fn iter_newest_to<'a>(
        &'a self,
        net: &'a Cidr,
        bound: FlowId,
    ) -> impl Iterator<Item = (FlowId, &'a Flow)> + 'a {
        let base = self.base;
        self.chunks
            .iter()
            .enumerate()
            .rev()
            .filter(move |(i, _)| base + ((i * CHUNK) as FlowId) < bound)
            .flat_map(move |(i, c)| {
                let chunk_base = base + (i * CHUNK) as FlowId;
                bits_desc(self.hits(c, chunk_base, net, bound)).filter_map(move |off| {
                    let f = c.flows.get(off)?.as_ref()?;
                    Some((chunk_base + off as FlowId, f))
                })
            })
    }

    /// Newest first, the flows whose destination, as first seen or translated, is in `net`,
    /// handed to `each` until it returns false; returns how many there are in all (from the
    /// index alone past that point). Each chunk is looked up once.
    pub fn visit_newest_to_counting(
        &self,
        net: &Cidr,
        mut each: impl FnMut(&Flow) -> bool,
    ) -> usize {
        let mut count = 0;
        let mut more = true;
        for (i, c) in self.chunks.iter().enumerate().rev() {
            let chunk_base = self.base + (i * CHUNK) as FlowId;
            let hits = self.hits(c, chunk_base, net, FlowId::MAX);
            count += hits.iter().map(|w| w.count_ones() as usize).sum::<usize>();
            if more {
                for off in bits_desc(hits) {
                    if let Some(f) = c.flows.get(off).and_then(Option::as_ref) {
                        if !each(f) {
                            more = false;
                            break;
                        }
                    }
                }
            }
        }
        count
    }

    /// How many flows have a destination, as first seen or translated, in `net`: from the
    /// index alone (the visit stops at the first flow).
    pub fn count_to(&self, net: &Cidr) -> usize {
        self.visit_newest_to_counting(net, |_| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::DirTuple;

    fn flow(id: FlowId) -> Flow {
        let ip = std::net::IpAddr::from([10, 0, 0, 1]);
        let t = DirTuple {
            proto: tracer_common::PROTO_TCP,
            src: ip,
            sport: 1,
            dst: ip,
            dport: 2,
        };
        Flow::new(id, t, id)
    }

    #[test]
    fn ids_map_to_slots_across_chunks_and_eviction() {
        let mut s = FlowStore::new();
        for _ in 0..3 * CHUNK + 5 {
            let id = s.next_id();
            s.push(flow(id));
        }
        assert_eq!(s.len(), 3 * CHUNK + 5);
        for _ in 0..CHUNK + 7 {
            assert!(s.pop_oldest().is_some());
        }
        assert_eq!(s.len(), 2 * CHUNK - 2);
        assert_eq!(s.chunks.len(), 3, "the emptied chunk is freed");
        let first = s.oldest_id().unwrap_or(0);
        assert_eq!(first, CHUNK as FlowId + 8);
        assert!(s.get(first - 1).is_none() && s.get(s.next_id()).is_none());
        for id in first..s.next_id() {
            assert_eq!(s.get(id).map(|f| f.id), Some(id));
        }
        let ids: Vec<FlowId> = s.iter_newest().map(|f| f.id).collect();
        let below: Vec<FlowId> = s.iter_newest_below(first + 5).map(|(_, f)| f.id).collect();
        assert_eq!(below, (first..first + 5).rev().collect::<Vec<_>>());
        let from_top: Vec<FlowId> = s
            .iter_newest_below(FlowId::MAX)
            .map(|(_, f)| f.id)
            .collect();
        assert_eq!(from_top, ids);
        let across = s.iter_newest_below(2 * CHUNK as FlowId + 3).count() as FlowId;
        assert_eq!(across, 2 * CHUNK as FlowId + 3 - first);
        let tagged: Vec<FlowId> = s
            .iter_newest_from(std::net::IpAddr::from([10, 0, 0, 1]))
            .map(|f| f.id)
            .collect();
        assert_eq!(ids, tagged, "every flow carries the tagged source");
        let host = Cidr::host(std::net::IpAddr::from([10, 0, 0, 1]));
        let indexed: Vec<FlowId> = s
            .iter_newest_to(&host, FlowId::MAX)
            .map(|(_, f)| f.id)
            .collect();
        assert_eq!(ids, indexed, "every flow goes to the indexed destination");
        assert_eq!(s.count_to(&host), ids.len());
        assert_eq!(ids.len(), s.len());
        assert!(ids.windows(2).all(|w| w[0] == w[1] + 1));
        while s.pop_oldest().is_some() {}
        assert_eq!((s.len(), s.iter_newest().count()), (0, 0));
        let id = s.next_id();
        s.push(flow(id));
        assert_eq!(s.get(id).map(|f| f.id), Some(id));
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;
    use crate::flows::DirTuple;

    fn flow(id: FlowId, ts: u64) -> Flow {
        let ip = std::net::IpAddr::from([10, 0, 0, 1]);
        let t = DirTuple {
            proto: tracer_common::PROTO_TCP,
            src: ip,
            sport: (id % 60_000) as u16,
            dst: ip,
            dport: 2,
        };
        Flow::new(id, t, ts)
    }

    #[test]
    fn active_flows_get_a_second_chance_and_keep_their_id() {
        let mut s = FlowStore::new();
        for ts in 0..10u64 {
            let id = s.next_id();
            s.push(flow(id, ts));
        }
        // Flow 1 was active after it was stored; flow 2 was not.
        if let Some(f) = s.get_mut(1) {
            f.last_ns = 100;
            f.active = true;
        }
        let evicted = s.pop_coldest(4).map(|f| f.id);
        assert_eq!(evicted, Some(2), "the idle flow goes, the active one stays");
        assert_eq!(s.len(), 9);
        assert_eq!(
            s.get(1).map(|f| f.id),
            Some(1),
            "found by its id in its new slot"
        );
        assert_eq!(
            s.iter_newest().next().map(|f| f.id),
            Some(1),
            "now the newest"
        );
        // Its new slot's number is not an id of anything.
        assert!(s.get(11).is_none());
        let id = s.next_id();
        assert_eq!(id, 12);
        s.push(flow(id, 200));
        assert_eq!(s.get(12).map(|f| f.id), Some(12));
        // No activity since the move: evicted in turn, and its alias goes with it.
        while s.len() > 1 {
            s.pop_coldest(4);
        }
        assert!(s.get(1).is_none() && s.moved.is_empty());
        assert_eq!(s.get(12).map(|f| f.id), Some(12));
        // Without chances it is plain FIFO.
        assert_eq!(s.pop_oldest().map(|f| f.id), Some(12));
        assert_eq!((s.len(), s.oldest_id()), (0, None));
    }
}

#[cfg(test)]
mod tag_tests {
    use super::*;
    use crate::flows::{DirTuple, Nat};

    #[test]
    fn tags_and_index_follow_translation_and_skip_other_addresses() {
        let mut s = FlowStore::new();
        let ip = |a: u8| IpAddr::from([10, 0, 0, a]);
        for a in 1..=200u8 {
            let t = DirTuple {
                proto: tracer_common::PROTO_TCP,
                src: ip(a),
                sport: 1000,
                dst: ip(250),
                dport: 80,
            };
            let id = s.next_id();
            s.push(Flow::new(id, t, 0));
        }
        let q = |s: &FlowStore, src: IpAddr| {
            s.iter_newest_from(src)
                .filter(|f| f.src == src || f.nat.is_some_and(|n| n.src == src))
                .map(|f| f.id)
                .collect::<Vec<_>>()
        };
        let to = |s: &FlowStore, dst: IpAddr| {
            s.iter_newest_to(&Cidr::host(dst), FlowId::MAX)
                .map(|(_, f)| f.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(q(&s, ip(7)), [7]);
        // Candidates are few: the digest tells 200 addresses apart.
        assert!(s.iter_newest_from(ip(7)).count() < 5);
        assert_eq!(q(&s, ip(251)), Vec::<FlowId>::new());
        assert_eq!(to(&s, ip(250)).len(), 200);
        assert_eq!(to(&s, ip(252)), Vec::<FlowId>::new());
        // Masquerade flow 9 to 10.0.0.251 and DNAT it to 10.0.0.252: found by its translated
        // source and destination once retagged.
        if let Some(f) = s.get_mut(9) {
            f.nat = Some(Nat {
                src: ip(251),
                sport: 6000,
                dst: ip(252),
                dport: 80,
            });
        }
        s.retag(9);
        assert_eq!(q(&s, ip(251)), [9]);
        assert_eq!(to(&s, ip(252)), [9]);
        assert_eq!(
            to(&s, ip(250)).len(),
            200,
            "and by the first seen one still"
        );
        let net = Cidr::new(ip(0), 24).unwrap_or(Cidr::host(ip(0)));
        assert_eq!(
            s.count_to(&net),
            200,
            "one flow counted once for both its destinations"
        );
        assert_ne!(
            addr_tag(ip(1)),
            addr_tag(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]))
        );
    }

    #[test]
    fn span_masks_and_bits() {
        assert_eq!(span_mask(0, 0, 64), u64::MAX);
        assert_eq!(span_mask(64, 0, 64), 0);
        assert_eq!(span_mask(0, 3, 5), 0b11000);
        assert_eq!(span_mask(64, 60, 70), 0b111111);
        let mut hits = [0u64; WORDS];
        hits[0] = 0b101;
        hits[15] = 1 << 63;
        assert_eq!(bits_desc(hits).collect::<Vec<_>>(), [1023, 2, 0]);
    }
}
