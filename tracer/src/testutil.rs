//! Builders for synthetic observations, shared by the unit tests.
use std::net::IpAddr;

use crate::events::{Dir, Emit, Observation, Packet};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// A TCP packet.
pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8, seq: u32, ack: u32) -> Packet {
    Packet {
        src: ip(src),
        dst: ip(dst),
        sport,
        dport,
        proto: tracer_common::PROTO_TCP,
        tcp_flags: flags,
        seq,
        ack,
        ip_id: 0x1234,
        ttl: 64,
        payload_len: 0,
    }
}

/// One first-record observation of `p` at a hook.
pub fn obs(ts: u64, ifindex: u32, dir: Dir, p: Packet) -> Observation {
    Observation {
        ts_ns: ts,
        ifindex,
        dir,
        len: 60,
        pkts: 1,
        bytes: 60,
        emit: Emit::First,
        outer: p,
        inner: None,
        drop: None,
    }
}
