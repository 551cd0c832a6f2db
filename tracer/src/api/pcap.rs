//! A flow as a pcapng file: one interface per hook, one packet per kernel record.
//!
//! tracer records headers' fields, not packet bytes, so each packet is rebuilt from what was
//! recorded (addresses, ports, TCP flags, sequence numbers, IP ID, TTL, lengths); payloads are
//! zero-filled. Comments say why the kernel reported the packet and how many it stands for.
use std::{borrow::Cow, collections::HashMap, time::Duration};

use pcap_file::{
    pcapng::{
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
        PcapNgWriter,
    },
    DataLink,
};
use tracer_common::{PROTO_TCP, PROTO_UDP};

use crate::{
    clock::Clock,
    events::{Encap, Packet},
    flows::{Sample, Side},
    synth::{ether, ip_packet, ipip, vxlan, L4},
};

#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("writing pcapng: {0}")]
    Write(#[from] pcap_file::PcapError),
}

/// Payload bytes rebuilt per packet at most: enough for Wireshark's dissectors, small files.
const MAX_PAYLOAD: usize = 64;

fn rebuild(p: &Packet) -> Vec<u8> {
    let payload = usize::from(p.payload_len).min(MAX_PAYLOAD);
    let l4 = match p.proto {
        PROTO_TCP => L4::Tcp {
            sport: p.sport,
            dport: p.dport,
            flags: p.tcp_flags,
            seq: p.seq,
            ack: p.ack,
            payload,
        },
        PROTO_UDP => L4::Udp {
            sport: p.sport,
            dport: p.dport,
            payload,
        },
        _ => L4::Echo {
            icmp_type: (p.dport >> 8) as u8,
            id: p.sport,
            seq: p.seq as u16,
        },
    };
    let mut bytes = ip_packet(p.src, p.dst, p.ip_id, l4);
    // Keep the recorded TTL (byte 8 of IPv4, 7 of IPv6); checksums are not recomputed.
    match bytes.first().map(|b| b >> 4) {
        Some(4) if bytes.len() > 8 => bytes[8] = p.ttl,
        Some(6) if bytes.len() > 7 => bytes[7] = p.ttl,
        _ => {}
    }
    bytes
}

fn packet_bytes(s: &Sample) -> Vec<u8> {
    match s.inner.as_deref() {
        Some((Encap::Vxlan, vni, inner)) => match (s.outer.src, s.outer.dst) {
            (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
                vxlan(a, b, s.outer.sport, *vni, &ether(&rebuild(inner)))
            }
            _ => rebuild(&s.outer),
        },
        Some((Encap::Ipip, _, inner)) => match (s.outer.src, s.outer.dst) {
            (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => ipip(a, b, &rebuild(inner)),
            _ => rebuild(&s.outer),
        },
        None => rebuild(&s.outer),
    }
}

/// Writes the samples of one flow as pcapng. `iface` names an ifindex.
pub fn flow_pcapng(
    samples: &[Sample],
    iface: impl Fn(u32) -> String,
    clock: &Clock,
) -> Result<Vec<u8>, PcapError> {
    let mut w = PcapNgWriter::new(Vec::new())?;
    let mut ids: HashMap<(u32, crate::events::Dir), u32> = HashMap::new();
    for s in samples {
        let key = (s.ifindex, s.dir);
        let next = ids.len() as u32;
        let id = match ids.get(&key) {
            Some(id) => *id,
            None => {
                let name = format!("{} {}", iface(s.ifindex), s.dir.as_str());
                w.write_pcapng_block(InterfaceDescriptionBlock {
                    linktype: DataLink::RAW,
                    snaplen: 0,
                    options: vec![
                        InterfaceDescriptionOption::IfName(Cow::Owned(name)),
                        // Nanosecond timestamps, as the kernel records them.
                        InterfaceDescriptionOption::IfTsResol(9),
                    ],
                })?;
                ids.insert(key, next);
                next
            }
        };
        let data = packet_bytes(s);
        let wall = clock
            .wall(s.ts_ns)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let comment = format!(
            "tracer: {:?} record, {} packet(s), {} side{}",
            s.emit,
            s.pkts,
            match s.side {
                Side::Forward => "forward",
                Side::Reverse => "reverse",
            },
            if s.outer.payload_len > 0 {
                format!(", {} payload bytes (zero-filled)", s.outer.payload_len)
            } else {
                String::new()
            }
        );
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: id,
            timestamp: wall,
            original_len: s.len.max(data.len() as u32),
            data: Cow::Owned(data),
            options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment))],
        })?;
    }
    Ok(w.into_inner())
}
