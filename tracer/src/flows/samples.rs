//! The most recent kernel records, kept for pcap export: a bounded ring shared by all flows, so
//! a flow's memory does not grow with its packet count.
use std::collections::VecDeque;

use super::{FlowId, Side};
use crate::events::{Dir, Emit, Encap, Observation, Packet};

/// Most records kept: ~3 MiB. Tables with a small flow cap keep fewer (`for_cap`).
pub const MAX_SAMPLES: usize = 32_768;

#[derive(Debug, Clone)]
pub struct Sample {
    pub flow: FlowId,
    pub ts_ns: u64,
    pub ifindex: u32,
    pub dir: Dir,
    pub side: Side,
    pub len: u32,
    pub pkts: u32,
    pub emit: Emit,
    pub outer: Packet,
    /// Boxed: most records carry no tunnel header.
    pub inner: Option<Box<(Encap, u32, Packet)>>,
}

pub struct Samples {
    ring: VecDeque<Sample>,
    cap: usize,
}

impl Samples {
    /// A ring sized for a table of `flow_cap` flows: a record per 4 flows, within bounds.
    pub fn for_cap(flow_cap: usize) -> Samples {
        Samples::new((flow_cap / 4).clamp(1024, MAX_SAMPLES))
    }

    pub fn new(cap: usize) -> Samples {
        Samples {
            // Allocated whole: grown by doubling it would overshoot its cap.
            ring: VecDeque::with_capacity(cap.max(1)),
            cap: cap.max(1),
        }
    }

    pub fn push(&mut self, flow: FlowId, side: Side, obs: &Observation) {
        if self.ring.len() >= self.cap {
            self.ring.pop_front();
        }
        self.ring.push_back(Sample {
            flow,
            ts_ns: obs.ts_ns,
            ifindex: obs.ifindex,
            dir: obs.dir,
            side,
            len: obs.len,
            pkts: obs.pkts,
            emit: obs.emit,
            outer: obs.outer,
            inner: obs.inner.map(Box::new),
        });
    }

    /// The records of one flow still in the ring, oldest first.
    pub fn of(&self, flow: FlowId) -> Vec<&Sample> {
        self.ring.iter().filter(|s| s.flow == flow).collect()
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Most records kept.
    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}
