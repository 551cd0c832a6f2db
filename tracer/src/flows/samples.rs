//! The most recent kernel records, kept for pcap export: a bounded ring shared by all flows, so
//! a flow's memory does not grow with its packet count.
use std::collections::VecDeque;

use super::{FlowId, Side};
use crate::events::{Dir, Emit, Encap, Observation, Packet};

pub const DEFAULT_SAMPLES: usize = 65_536;

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
    pub inner: Option<(Encap, u32, Packet)>,
}

pub struct Samples {
    ring: VecDeque<Sample>,
    cap: usize,
}

impl Samples {
    pub fn new(cap: usize) -> Samples {
        Samples {
            ring: VecDeque::with_capacity(cap.min(4096)),
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
            inner: obs.inner,
        });
    }

    /// The records of one flow still in the ring, oldest first.
    pub fn of(&self, flow: FlowId) -> Vec<&Sample> {
        self.ring.iter().filter(|s| s.flow == flow).collect()
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}
