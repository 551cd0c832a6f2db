//! Records from the kernel: decoding ring-buffer bytes into observations.
use std::net::IpAddr;

use serde::Serialize;
use tracer_common::{
    Direction, EmitReason, Encapsulation, Family, PacketEvent, RecordKind, Tuple, UnknownValue,
};

use crate::net::ip_from_raw;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes, expected at least {want}")]
    Short { got: usize, want: usize },
    #[error("unknown direction {0}")]
    Direction(u8),
    #[error("unknown encapsulation {0}")]
    Encap(u8),
    #[error("record carries no IP packet (family {0})")]
    Family(u8),
    #[error("unknown record kind {0}")]
    Kind(u8),
}

/// The hook and the tunnel of a record, in the wire vocabulary (converted from the kernel's
/// `Direction`/`Encapsulation` once, in [`from_event`]).
pub use tracer_model::{Dir, Encap};

/// Why the kernel reported this packet rather than only counting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Emit {
    First,
    TcpControl,
    Retransmit,
    Periodic,
    /// TCP payload changed direction: a request/response turn.
    Turn,
    /// A reason this agent does not know (none the kernel writes today).
    Other,
}

impl From<EmitReason> for Emit {
    fn from(e: EmitReason) -> Emit {
        match e {
            EmitReason::First => Emit::First,
            EmitReason::TcpControl => Emit::TcpControl,
            EmitReason::Retransmit => Emit::Retransmit,
            EmitReason::Periodic => Emit::Periodic,
            EmitReason::Turn => Emit::Turn,
        }
    }
}

/// An IP packet's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub ip_id: u16,
    pub ttl: u8,
    pub payload_len: u16,
}

impl Packet {
    fn from_tuple(t: &Tuple) -> Result<Packet, DecodeError> {
        let family =
            Family::try_from(t.family).map_err(|UnknownValue(f)| DecodeError::Family(f))?;
        let src = ip_from_raw(family, &t.src);
        let dst = ip_from_raw(family, &t.dst);
        Ok(Packet {
            src,
            dst,
            sport: t.sport,
            dport: t.dport,
            proto: t.proto,
            tcp_flags: t.tcp_flags,
            seq: t.seq,
            ack: t.ack,
            ip_id: t.ip_id,
            ttl: t.ttl,
            payload_len: t.payload_len,
        })
    }
}

/// One record from one hook.
#[derive(Debug, Clone)]
pub struct Observation {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub dir: Dir,
    pub len: u32,
    pub pkts: u32,
    pub bytes: u64,
    pub emit: Emit,
    /// The packet as the device carries it.
    pub outer: Packet,
    /// The packet inside VXLAN/IPIP.
    pub inner: Option<(Encap, u32, Packet)>,
    /// Set when this record is a kernel drop rather than a packet crossing a hook.
    pub drop: Option<KernelDrop>,
}

/// A packet the kernel freed with a drop reason (`skb:kfree_skb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelDrop {
    /// The kernel's `enum skb_drop_reason` value (names come from tracefs).
    pub reason: u32,
    /// Address of the function that dropped it.
    pub location: u64,
}

impl Observation {
    /// The packet the flow is about: the inner one when encapsulated.
    pub fn packet(&self) -> &Packet {
        match &self.inner {
            Some((_, _, p)) => p,
            None => &self.outer,
        }
    }
}

/// Decodes one ring-buffer record. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Observation, DecodeError> {
    let want = std::mem::size_of::<PacketEvent>();
    if bytes.len() < want {
        return Err(DecodeError::Short {
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: length checked above; PacketEvent is plain data valid for any bit pattern, and
    // read_unaligned copes with the ring buffer's 8-byte alignment.
    let ev: PacketEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PacketEvent>()) };
    from_event(&ev)
}

pub fn from_event(ev: &PacketEvent) -> Result<Observation, DecodeError> {
    let dir = Direction::try_from(ev.dir).map_err(|UnknownValue(d)| DecodeError::Direction(d))?;
    let outer = Packet::from_tuple(&ev.outer)?;
    let encap =
        Encapsulation::try_from(ev.encap).map_err(|UnknownValue(e)| DecodeError::Encap(e))?;
    let inner = match encap {
        Encapsulation::None => None,
        Encapsulation::Vxlan => Some((Encap::Vxlan, ev.vni, Packet::from_tuple(&ev.inner)?)),
        Encapsulation::Ipip => Some((Encap::Ipip, 0, Packet::from_tuple(&ev.inner)?)),
    };
    let drop =
        match RecordKind::try_from(ev.kind).map_err(|UnknownValue(k)| DecodeError::Kind(k))? {
            RecordKind::Packet => None,
            RecordKind::Drop => Some(KernelDrop {
                reason: ev.drop_reason,
                location: ev.location,
            }),
        };
    // Unlike the fields above, an unknown reason leaves the record usable.
    let emit = EmitReason::try_from(ev.emit).map_or(Emit::Other, Emit::from);
    Ok(Observation {
        ts_ns: ev.ts_ns,
        ifindex: ev.ifindex,
        dir: dir.into(),
        len: ev.len,
        pkts: ev.pkts.max(1),
        bytes: ev.bytes,
        emit,
        outer,
        inner,
        drop,
    })
}

/// Builds a kernel-format record; the test suites and the benchmark use it to feed the decoder.
pub fn encode(ev: &PacketEvent) -> Vec<u8> {
    let size = std::mem::size_of::<PacketEvent>();
    let mut out = vec![0u8; size];
    // SAFETY: out has exactly size bytes; PacketEvent is plain data.
    unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<PacketEvent>(), *ev) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::{PROTO_TCP, TCP_SYN};

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[..4].copy_from_slice(&a);
        r
    }

    fn syn() -> PacketEvent {
        PacketEvent {
            ts_ns: 42,
            ifindex: 7,
            dir: Direction::Ingress as u8,
            emit: EmitReason::First as u8,
            pkts: 1,
            outer: Tuple {
                src: v4([192, 168, 236, 10]),
                dst: v4([10, 96, 0, 1]),
                sport: 59894,
                dport: 443,
                proto: PROTO_TCP,
                family: Family::V4 as u8,
                tcp_flags: TCP_SYN,
                seq: 1000,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn decodes_a_record() -> Result<(), DecodeError> {
        let o = decode(&encode(&syn()))?;
        assert_eq!(o.dir, Dir::Ingress);
        assert_eq!(o.outer.src.to_string(), "192.168.236.10");
        assert_eq!(o.outer.dport, 443);
        assert!(o.inner.is_none());
        assert_eq!(o.packet().seq, 1000);
        Ok(())
    }

    #[test]
    fn decodes_vxlan_inner_and_v6() -> Result<(), DecodeError> {
        let mut ev = syn();
        ev.encap = Encapsulation::Vxlan as u8;
        ev.vni = 4096;
        ev.inner = Tuple {
            src: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            dst: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            family: Family::V6 as u8,
            proto: PROTO_TCP,
            ..Default::default()
        };
        let o = decode(&encode(&ev))?;
        let (encap, vni, inner) = o.inner.ok_or(DecodeError::Encap(0))?;
        assert_eq!((encap, vni), (Encap::Vxlan, 4096));
        assert_eq!(inner.dst.to_string(), "fd00::2");
        Ok(())
    }

    #[test]
    fn decodes_a_drop() -> Result<(), DecodeError> {
        let mut ev = syn();
        ev.kind = RecordKind::Drop as u8;
        ev.drop_reason = 12;
        ev.location = 0xffff_ffff_8100_0000;
        let o = decode(&encode(&ev))?;
        assert_eq!(
            o.drop,
            Some(KernelDrop {
                reason: 12,
                location: 0xffff_ffff_8100_0000
            })
        );
        Ok(())
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(matches!(decode(&[]), Err(DecodeError::Short { .. })));
        assert!(matches!(decode(&[0u8; 10]), Err(DecodeError::Short { .. })));
        // All-zero record: family 0 is not an IP packet.
        let zero = vec![0u8; std::mem::size_of::<PacketEvent>()];
        assert_eq!(decode(&zero).err(), Some(DecodeError::Family(0)));
        let mut bad = syn();
        bad.dir = 9;
        assert_eq!(decode(&encode(&bad)).err(), Some(DecodeError::Direction(9)));
        let mut bad = syn();
        bad.kind = 5;
        assert_eq!(decode(&encode(&bad)).err(), Some(DecodeError::Kind(5)));
        let mut bad = syn();
        bad.encap = 77;
        assert_eq!(decode(&encode(&bad)).err(), Some(DecodeError::Encap(77)));
        // Every byte value in every position decodes or errors, never panics.
        let base = encode(&syn());
        for i in 0..base.len() {
            for v in [0u8, 1, 4, 6, 0x7f, 0xff] {
                let mut b = base.clone();
                b[i] = v;
                let _ = decode(&b);
            }
        }
    }
}
