//! The tuple index: every tuple a flow was seen with (`Flow::tuples`), both directions under
//! one hash. An entry is 8 bytes, the flow's id and which of its tuples it is for, not the tuple
//! or its digest: the hash table re-reads the tuple from the flow when it compares or grows.
//! Two tuples with the same hash are told apart by the tuples themselves, never confused.
use std::{hash::BuildHasher, net::IpAddr};

use hashbrown::HashTable;

use super::{store::FlowStore, DirTuple, Flow, FlowId, Side};

/// Low bits of an entry: the tuple's position in `Flow::tuples` (at most 1 + 1 + 8).
const POS_BITS: u32 = 4;
const POS_MASK: u64 = (1 << POS_BITS) - 1;

pub(super) struct TupleIndex {
    table: HashTable<u64>,
    digest: foldhash::fast::RandomState,
}

/// The tuple entry `e` is for, read from its flow.
fn tuple_of(flows: &FlowStore, e: u64) -> Option<DirTuple> {
    flows.get(e >> POS_BITS)?.tuple_at((e & POS_MASK) as usize)
}

/// The same connection either way round.
fn same_pair(a: &DirTuple, b: &DirTuple) -> bool {
    a == b || a.reversed() == *b
}

/// An end of a tuple as plain integers: cheaper to order and hash than `IpAddr`'s enum. (An
/// IPv4 address and the IPv6 one with the same bits hash alike: the tuples still tell them
/// apart.)
fn end(ip: IpAddr, port: u16) -> (u128, u16) {
    let bits = match ip {
        IpAddr::V4(a) => u128::from(a.to_bits()),
        IpAddr::V6(a) => a.to_bits(),
    };
    (bits, port)
}

/// The hash of `t` and of its reverse: its ends in a canonical order.
fn hash_with(digest: &foldhash::fast::RandomState, t: &DirTuple) -> u64 {
    let a = end(t.src, t.sport);
    let b = end(t.dst, t.dport);
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    digest.hash_one((t.proto, lo, hi))
}

impl TupleIndex {
    pub fn new() -> TupleIndex {
        TupleIndex {
            table: HashTable::new(),
            digest: foldhash::fast::RandomState::default(),
        }
    }

    fn hash(&self, t: &DirTuple) -> u64 {
        hash_with(&self.digest, t)
    }

    /// The flow carrying `t`, and on which side.
    pub fn lookup(&self, flows: &FlowStore, t: &DirTuple) -> Option<(FlowId, Side)> {
        // The side is read while the entry's flow is at hand: one store lookup, not two.
        let mut side = None;
        let e = self.table.find(self.hash(t), |&e| {
            let Some(f) = flows.get(e >> POS_BITS) else {
                return false;
            };
            let pos = (e & POS_MASK) as usize;
            let Some(u) = f.tuple_at(pos) else {
                return false;
            };
            // `side_of` tries the flow's first tuple first: for it, the match says the side.
            side = match pos {
                0 if u == *t => Some(Side::Forward),
                0 if u.reversed() == *t => Some(Side::Reverse),
                0 => None,
                _ if same_pair(&u, t) => f.side_of(t),
                _ => None,
            };
            side.is_some()
        })?;
        Some((e >> POS_BITS, side?))
    }

    /// Indexes tuple `pos` of flow `id`, in place of another flow's entry for the same tuple.
    pub fn insert(&mut self, flows: &FlowStore, id: FlowId, pos: usize) {
        let Some(t) = flows.get(id).and_then(|f| f.tuple_at(pos)) else {
            return;
        };
        let entry = id << POS_BITS | pos as u64;
        let hash = self.hash(&t);
        let same = |&e: &u64| tuple_of(flows, e).is_some_and(|u| same_pair(&u, &t));
        if let Some(e) = self.table.find_mut(hash, same) {
            *e = entry;
            return;
        }
        // Growing rehashes every entry from its flow.
        let digest = &self.digest;
        self.table.insert_unique(hash, entry, |&e| {
            tuple_of(flows, e).map_or(0, |u| hash_with(digest, &u))
        });
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Removes the entries of `f` (other flows' entries for its tuples stay).
    pub fn remove(&mut self, f: &Flow) {
        for (pos, t) in f.tuples().enumerate() {
            let entry = f.id << POS_BITS | pos as u64;
            if let Ok(e) = self.table.find_entry(self.hash(&t), |&e| e == entry) {
                e.remove();
            }
        }
    }
}
