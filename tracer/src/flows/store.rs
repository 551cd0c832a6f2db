//! Flows in slots handed out in sequence; only the oldest slot is ever emptied, so a flow's slot
//! is found from its id with no tree or hash map per flow, and flows lie next to each other in
//! memory. A flow's id is the slot it was created in. Eviction gives flows that were active
//! since they were last looked at a second chance (CLOCK): such a flow moves to a new slot at
//! the tail, keeps its id, and only moved flows need a map entry (`moved`).
//!
//! Beside each flow sit 8 bytes of address tags (16-bit digests of its source and destination,
//! before and after NAT): `/flows?dst=<ip>` reads those, 8 bytes a flow instead of the flows
//! themselves, and looks at a flow only when its tag matches.
use std::{collections::VecDeque, net::IpAddr};

use super::{Flow, FlowId};

/// Flows per chunk: growth allocates one chunk, never copies the flows already stored.
const CHUNK: usize = 1024;

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

/// Digests of a flow's sources and destinations, as first seen and as translated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tags {
    src: [u16; 2],
    dst: [u16; 2],
}

impl Tags {
    fn of(f: &Flow) -> Tags {
        let (nsrc, ndst) = f.nat.map_or((f.src, f.dst), |n| (n.src, n.dst));
        Tags {
            src: [addr_tag(f.src), addr_tag(nsrc)],
            dst: [addr_tag(f.dst), addr_tag(ndst)],
        }
    }

    fn may_match(&self, src: Option<u16>, dst: Option<u16>) -> bool {
        src.is_none_or(|t| self.src.contains(&t)) && dst.is_none_or(|t| self.dst.contains(&t))
    }
}

#[derive(Default)]
struct Chunk {
    flows: Vec<Option<Flow>>,
    tags: Vec<Tags>,
    /// `last_ns` of the flow when it entered this slot: a flow whose `last_ns` moved on since
    /// was active, and gets a second chance when eviction reaches it.
    entered_ns: Vec<u64>,
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
        let n = self.moved.get(&id).copied().unwrap_or(id);
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
            self.chunks.push_back(Chunk {
                flows: Vec::with_capacity(CHUNK),
                tags: Vec::with_capacity(CHUNK),
                entered_ns: Vec::with_capacity(CHUNK),
            });
        }
        if let Some(chunk) = self.chunks.back_mut() {
            chunk.tags.push(Tags::of(&flow));
            chunk.entered_ns.push(flow.last_ns);
            if flow.id != self.next {
                self.moved.insert(flow.id, self.next);
            } else {
                self.moved.remove(&flow.id);
            }
            chunk.flows.push(Some(flow));
            self.next += 1;
            self.len += 1;
        }
    }

    /// Brings the address tags up to date after the flow's translation changed.
    pub fn retag(&mut self, id: FlowId) {
        let Some((c, i)) = self.slot(id) else {
            return;
        };
        if let Some(chunk) = self.chunks.get_mut(c) {
            let tags = chunk.flows.get(i).and_then(Option::as_ref).map(Tags::of);
            if let (Some(t), Some(slot)) = (tags, chunk.tags.get_mut(i)) {
                *slot = t;
            }
        }
    }

    /// Empties the oldest slot; returns its flow (None for a slot a moved flow left).
    fn take_first(&mut self) -> Option<(Flow, u64)> {
        let (c, i) = self.position(self.first)?;
        let chunk = self.chunks.get_mut(c)?;
        let flow = chunk.flows.get_mut(i)?.take();
        let entered = chunk.entered_ns.get(i).copied().unwrap_or(0);
        self.first += 1;
        if self.first - self.base >= CHUNK as FlowId {
            self.chunks.pop_front();
            self.base += CHUNK as FlowId;
        }
        let flow = flow?;
        self.len -= 1;
        Some((flow, entered))
    }

    /// Removes and returns the least recently active flow, approximately: flows active since
    /// they last entered a slot move to the tail instead (at most `chances` of them per call,
    /// so one eviction never walks the whole table).
    pub fn pop_coldest(&mut self, mut chances: usize) -> Option<Flow> {
        while self.len > 0 {
            let Some((flow, entered)) = self.take_first() else {
                continue;
            };
            if chances > 0 && flow.last_ns > entered {
                chances -= 1;
                self.put(flow);
                continue;
            }
            self.moved.remove(&flow.id);
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

    /// Newest first, only flows that may have `src` / `dst` (as first seen or translated)
    /// going by their tags: a superset of the flows that do.
    pub fn iter_newest_tagged(
        &self,
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
    ) -> impl Iterator<Item = &Flow> {
        let (src, dst) = (src.map(addr_tag), dst.map(addr_tag));
        self.chunks.iter().rev().flat_map(move |c| {
            c.tags
                .iter()
                .zip(&c.flows)
                .rev()
                .filter(move |(t, _)| t.may_match(src, dst))
                .filter_map(|(_, f)| f.as_ref())
        })
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
            .iter_newest_tagged(Some(std::net::IpAddr::from([10, 0, 0, 1])), None)
            .map(|f| f.id)
            .collect();
        assert_eq!(ids, tagged, "every flow carries the tagged source");
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
    fn tags_follow_translation_and_skip_other_addresses() {
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
        let q = |s: &FlowStore, src: Option<IpAddr>, dst: Option<IpAddr>| {
            s.iter_newest_tagged(src, dst)
                .filter(|f| src.is_none_or(|x| f.src == x || f.nat.is_some_and(|n| n.src == x)))
                .map(|f| f.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(q(&s, Some(ip(7)), Some(ip(250))), [7]);
        // Candidates are few: the digest tells 200 addresses apart.
        assert!(s.iter_newest_tagged(Some(ip(7)), None).count() < 5);
        assert_eq!(q(&s, Some(ip(251)), None), Vec::<FlowId>::new());
        // Masquerade flow 9 to 10.0.0.251: found by its translated source once retagged.
        if let Some(f) = s.get_mut(9) {
            f.nat = Some(Nat {
                src: ip(251),
                sport: 6000,
                dst: ip(250),
                dport: 80,
            });
        }
        s.retag(9);
        assert_eq!(q(&s, Some(ip(251)), None), [9]);
        assert_ne!(
            addr_tag(ip(1)),
            addr_tag(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]))
        );
    }
}
