//! Builds real wire-format frames (pnet_packet) for kernel tests, fuzzing and the benchmark.
use std::net::{IpAddr, Ipv4Addr};

use pnet_packet::{
    ethernet::{EtherType, EtherTypes, MutableEthernetPacket},
    ip::{IpNextHeaderProtocol, IpNextHeaderProtocols},
    ipv4::{self, MutableIpv4Packet},
    ipv6::MutableIpv6Packet,
    tcp::MutableTcpPacket,
    udp::MutableUdpPacket,
    vxlan::MutableVxlanPacket,
};

/// The transport part of a synthetic packet.
#[derive(Debug, Clone, Copy)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: usize,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: usize,
    },
    /// ICMP (or ICMPv6) echo: type, identifier, sequence.
    Echo { icmp_type: u8, id: u16, seq: u16 },
}

/// An IP packet (no link header) with the given addresses and transport.
pub fn ip_packet(src: IpAddr, dst: IpAddr, ip_id: u16, l4: L4) -> Vec<u8> {
    let body = l4_bytes(&l4);
    let proto = match (l4, src.is_ipv4()) {
        (L4::Tcp { .. }, _) => IpNextHeaderProtocols::Tcp,
        (L4::Udp { .. }, _) => IpNextHeaderProtocols::Udp,
        (L4::Echo { .. }, true) => IpNextHeaderProtocols::Icmp,
        (L4::Echo { .. }, false) => IpNextHeaderProtocols::Icmpv6,
    };
    wrap_ip(src, dst, ip_id, proto, &body)
}

fn wrap_ip(
    src: IpAddr,
    dst: IpAddr,
    ip_id: u16,
    proto: IpNextHeaderProtocol,
    body: &[u8],
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut buf = vec![0u8; 20 + body.len()];
            if let Some(mut ip) = MutableIpv4Packet::new(&mut buf) {
                ip.set_version(4);
                ip.set_header_length(5);
                ip.set_total_length((20 + body.len()) as u16);
                ip.set_identification(ip_id);
                ip.set_flags(ipv4::Ipv4Flags::DontFragment);
                ip.set_ttl(64);
                ip.set_next_level_protocol(proto);
                ip.set_source(s);
                ip.set_destination(d);
                ip.set_payload(body);
                let c = ipv4::checksum(&ip.to_immutable());
                ip.set_checksum(c);
            }
            buf
        }
        (s, d) => {
            let s6 = match s {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let d6 = match d {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let mut buf = vec![0u8; 40 + body.len()];
            if let Some(mut ip) = MutableIpv6Packet::new(&mut buf) {
                ip.set_version(6);
                ip.set_payload_length(body.len() as u16);
                ip.set_next_header(proto);
                ip.set_hop_limit(64);
                ip.set_source(s6);
                ip.set_destination(d6);
                ip.set_payload(body);
            }
            buf
        }
    }
}

fn l4_bytes(l4: &L4) -> Vec<u8> {
    match *l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            seq,
            ack,
            payload,
        } => {
            let mut buf = vec![0u8; 20 + payload];
            if let Some(mut t) = MutableTcpPacket::new(&mut buf) {
                t.set_source(sport);
                t.set_destination(dport);
                t.set_sequence(seq);
                t.set_acknowledgement(ack);
                t.set_data_offset(5);
                t.set_flags(flags);
                t.set_window(64240);
            }
            buf
        }
        L4::Udp {
            sport,
            dport,
            payload,
        } => {
            let mut buf = vec![0u8; 8 + payload];
            if let Some(mut u) = MutableUdpPacket::new(&mut buf) {
                u.set_source(sport);
                u.set_destination(dport);
                u.set_length((8 + payload) as u16);
            }
            buf
        }
        L4::Echo { icmp_type, id, seq } => {
            let mut b = vec![icmp_type, 0, 0, 0];
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&seq.to_be_bytes());
            b.extend_from_slice(&[0u8; 16]);
            b
        }
    }
}

/// An Ethernet frame around an IP packet (IPv4 or IPv6 by its version nibble).
pub fn ether(ip: &[u8]) -> Vec<u8> {
    let ethertype = match ip.first().map(|b| b >> 4) {
        Some(6) => EtherTypes::Ipv6,
        _ => EtherTypes::Ipv4,
    };
    ether_with(ethertype, ip)
}

pub fn ether_with(ethertype: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 14 + payload.len()];
    if let Some(mut e) = MutableEthernetPacket::new(&mut buf) {
        e.set_destination([0xee, 0xee, 0xee, 0xee, 0xee, 0xee].into());
        e.set_source([0x66, 0x01, 0x02, 0x03, 0x04, 0x05].into());
        e.set_ethertype(ethertype);
        e.set_payload(payload);
    }
    buf
}

/// A VXLAN frame as felix's vxlan.calico sends it: outer UDP to 4789, VNI, inner Ethernet frame.
pub fn vxlan(
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    sport: u16,
    vni: u32,
    inner_frame: &[u8],
) -> Vec<u8> {
    let mut vx = vec![0u8; 8 + inner_frame.len()];
    if let Some(mut v) = MutableVxlanPacket::new(&mut vx) {
        v.set_flags(0x08);
        v.set_vni(vni);
        v.set_payload(inner_frame);
    }
    let mut udp = vec![0u8; 8 + vx.len()];
    if let Some(mut u) = MutableUdpPacket::new(&mut udp) {
        u.set_source(sport);
        u.set_destination(tracer_common::VXLAN_PORT);
        u.set_length((8 + vx.len()) as u16);
        u.set_payload(&vx);
    }
    wrap_ip(
        outer_src.into(),
        outer_dst.into(),
        1,
        IpNextHeaderProtocols::Udp,
        &udp,
    )
}

/// IP-in-IP as tunl0 sends it (protocol 4).
pub fn ipip(outer_src: Ipv4Addr, outer_dst: Ipv4Addr, inner_ip: &[u8]) -> Vec<u8> {
    wrap_ip(
        outer_src.into(),
        outer_dst.into(),
        2,
        IpNextHeaderProtocols::Ipv4,
        inner_ip,
    )
}
