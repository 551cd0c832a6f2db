//! Header parsing. tc reads headers in place when they lie in the skb's linear part (nearly
//! always) and through `bpf_skb_load_bytes` otherwise (non-linear skbs); the drop tracepoint
//! reads kernel memory.
use aya_ebpf::programs::TcContext;
use tracer_common::{
    Encapsulation, Family, PacketEvent, Tuple, PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP,
    PROTO_IPV6_IN_IP, PROTO_TCP, PROTO_UDP, VXLAN_PORT,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VXLAN_HLEN: usize = 8;

/// Not an IP packet we can read (ARP, truncated header, bad IHL...).
pub struct Malformed;
/// Not IP at all: nothing to record, nothing wrong.
pub struct NotIp;

/// Where packet bytes come from.
pub trait Source {
    fn load<T>(&self, off: usize) -> Result<T, ()>;
    /// Bytes of the frame from offset 0, where known (0 where not).
    fn frame_len(&self) -> usize;
}

/// A stack buffer for the helpers that copy bytes out, on an 8-byte boundary (see `read_with`).
#[repr(C, align(8))]
struct Aligned<T>(core::mem::MaybeUninit<T>);

/// A `T` read by a helper call that fills `len` bytes at `to` and returns 0 on success (the
/// fallbacks of `Source::load`). The buffer is 8-byte aligned: the program is built to read
/// bytes as wide, possibly misaligned words (fewer instructions per header), and the verifier
/// takes misaligned reads from packets and map values but never from the stack.
#[inline(always)]
fn read_with<T>(fill: impl FnOnce(*mut core::ffi::c_void, u32) -> i64) -> Result<T, ()> {
    let mut buf = Aligned(core::mem::MaybeUninit::<T>::uninit());
    if fill(buf.0.as_mut_ptr().cast(), core::mem::size_of::<T>() as u32) == 0 {
        // SAFETY: the helper filled the buffer: it returned 0.
        Ok(unsafe { buf.0.assume_init() })
    } else {
        Err(())
    }
}

/// Headers lie within this many bytes of the frame's start (Ethernet, VLAN, IP options, outer
/// UDP and VXLAN, inner Ethernet, IP and L4): a bound the verifier can check the offsets by.
const MAX_HEADER_OFFSET: usize = 256;

impl Source for TcContext {
    #[inline(always)]
    fn load<T>(&self, off: usize) -> Result<T, ()> {
        // A helper call per header costs more than the rest of the parse: read in place.
        let (start, end) = (self.data(), self.data_end());
        if off < MAX_HEADER_OFFSET && start + off + core::mem::size_of::<T>() <= end {
            // SAFETY: within [data, data_end), checked just above; unaligned reads are fine.
            return Ok(unsafe { ((start + off) as *const T).read_unaligned() });
        }
        // SAFETY: the helper writes `len` bytes at `to` or fails.
        read_with(|to, len| unsafe {
            aya_ebpf::helpers::generated::bpf_skb_load_bytes(
                self.skb.skb as *const _,
                off as u32,
                to,
                len,
            )
        })
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
}

/// Packet bytes in kernel memory starting at this address (an skb's network header).
pub struct Kernel(pub u64);

impl Source for Kernel {
    #[inline(always)]
    fn load<T>(&self, off: usize) -> Result<T, ()> {
        // SAFETY: the helper writes `len` bytes at `to` or fails.
        read_with(|to, len| unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                to,
                len,
                (self.0 + off as u64) as *const _,
            )
        })
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        0
    }
}

/// Zeroes a tuple with word stores. `*t = Tuple::default()` becomes a call to a byte-by-byte
/// memset loop in BPF (hundreds of instructions per packet); volatile stores cannot be merged
/// into one.
#[inline(always)]
pub fn clear(t: &mut Tuple) {
    const WORDS: usize = core::mem::size_of::<Tuple>() / 4;
    const { assert!(core::mem::size_of::<Tuple>() % 4 == 0) };
    let p = (t as *mut Tuple).cast::<u32>();
    for i in 0..WORDS {
        // SAFETY: within the tuple, which is 4-byte aligned (it holds u32 fields).
        unsafe { p.add(i).write_volatile(0) };
    }
}

pub enum Outcome {
    Skip(NotIp),
    Bad(Malformed),
}

/// Offset of the IP header and its version, after Ethernet and up to one VLAN tag.
#[inline(always)]
fn l2<S: Source>(ctx: &S, off: usize) -> Result<(usize, Family), Outcome> {
    let mut proto = be16(ctx, off + 12)?;
    let mut l3 = off + ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = be16(ctx, l3 + 2)?;
        l3 += 4;
    }
    match proto {
        ETH_P_IP => Ok((l3, Family::V4)),
        ETH_P_IPV6 => Ok((l3, Family::V6)),
        _ => Err(Outcome::Skip(NotIp)),
    }
}

#[inline(always)]
fn be16<S: Source>(ctx: &S, off: usize) -> Result<u16, Outcome> {
    ctx.load::<[u8; 2]>(off)
        .map(u16::from_be_bytes)
        .map_err(|_| Outcome::Bad(Malformed))
}

// Headers read as the integer fields they are made of (network byte order, swapped once with
// `from_be`). Read as byte arrays, LLVM splits them into one load per byte and shifts the bytes
// back together: several times the instructions of the parse.

/// The fixed part of an IPv4 header.
#[repr(C)]
struct Ipv4Header {
    ver_ihl: u8,
    _tos: u8,
    total_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    proto: u8,
    _check: u16,
    src: u32,
    dst: u32,
}

/// An IPv6 header up to its addresses (read separately, as 16 bytes each).
#[repr(C)]
struct Ipv6Header {
    ver_tc: u8,
    _tc_flow: [u8; 3],
    payload_len: u16,
    next: u8,
    hop_limit: u8,
}

#[repr(C)]
struct TcpHeader {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    /// Data offset in the high nibble.
    doff: u8,
    flags: u8,
    _window: u16,
    _check: u16,
    _urgent: u16,
}

#[repr(C)]
struct UdpHeader {
    sport: u16,
    dport: u16,
    len: u16,
    _check: u16,
}

/// ICMP and ICMPv6 echo (the identifier and sequence are read whatever the type: where they
/// mean nothing, nobody looks at them).
#[repr(C)]
struct IcmpEchoHeader {
    icmp_type: u8,
    code: u8,
    _check: u16,
    id: u16,
    seq: u16,
}

const _: () = {
    assert!(core::mem::size_of::<Ipv4Header>() == 20);
    assert!(core::mem::size_of::<Ipv6Header>() == 8);
    assert!(core::mem::size_of::<TcpHeader>() == 20);
    assert!(core::mem::size_of::<UdpHeader>() == 8);
    assert!(core::mem::size_of::<IcmpEchoHeader>() == 8);
};

/// Copies a 16-byte address as two 8-byte words (as bytes, LLVM copies it byte by byte, twice).
#[inline(always)]
fn addr16<S: Source>(ctx: &S, off: usize, to: &mut [u8; 16]) -> Result<(), Outcome> {
    let w: [u64; 2] = ctx.load(off).map_err(|_| Outcome::Bad(Malformed))?;
    let p = to.as_mut_ptr().cast::<u64>();
    // SAFETY: two 8-byte writes within the 16 bytes of `to`; unaligned writes are allowed.
    unsafe {
        p.write_unaligned(w[0]);
        p.add(1).write_unaligned(w[1]);
    }
    Ok(())
}

/// Parses an IP header and its transport header into `t`; returns the L4 offset, and whether
/// the packet is a non-first IPv4 fragment (whose payload starts mid-datagram: no ports, no
/// tunnel header, nothing to parse).
#[inline(always)]
pub fn l3l4<S: Source>(
    ctx: &S,
    off: usize,
    family: Family,
    t: &mut Tuple,
) -> Result<(usize, bool), Outcome> {
    let l4;
    let ip_payload: usize;
    let mut fragment = false;
    if family == Family::V4 {
        let h: Ipv4Header = ctx.load(off).map_err(|_| Outcome::Bad(Malformed))?;
        if h.ver_ihl >> 4 != 4 {
            return Err(Outcome::Bad(Malformed));
        }
        let ihl = ((h.ver_ihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(Outcome::Bad(Malformed));
        }
        let mut total = u16::from_be(h.total_len) as usize;
        if total == 0 {
            // BIG TCP (IPv4, Linux 6.3+): a GSO packet over 64 KiB says 0; its length is the
            // frame's. Where that is unknown the payload length stays 0.
            total = ctx.frame_len().saturating_sub(off).max(ihl);
        }
        if total < ihl {
            return Err(Outcome::Bad(Malformed));
        }
        t.family = Family::V4 as u8;
        t.ip_id = u16::from_be(h.id);
        // A non-first fragment carries no transport header.
        fragment = (u16::from_be(h.frag) & 0x1fff) != 0;
        t.ttl = h.ttl;
        t.proto = h.proto;
        t.src[..4].copy_from_slice(&h.src.to_ne_bytes());
        t.dst[..4].copy_from_slice(&h.dst.to_ne_bytes());
        l4 = off + ihl;
        ip_payload = total - ihl;
    } else {
        let h: Ipv6Header = ctx.load(off).map_err(|_| Outcome::Bad(Malformed))?;
        if h.ver_tc >> 4 != 6 {
            return Err(Outcome::Bad(Malformed));
        }
        t.family = Family::V6 as u8;
        ip_payload = u16::from_be(h.payload_len) as usize;
        // Extension headers are left unparsed: the tuple then has no ports.
        t.proto = h.next;
        t.ttl = h.hop_limit;
        addr16(ctx, off + 8, &mut t.src)?;
        addr16(ctx, off + 24, &mut t.dst)?;
        l4 = off + 40;
    }
    if fragment {
        return Ok((l4, true));
    }
    match t.proto {
        PROTO_TCP => {
            let h: TcpHeader = ctx.load(l4).map_err(|_| Outcome::Bad(Malformed))?;
            t.sport = u16::from_be(h.sport);
            t.dport = u16::from_be(h.dport);
            t.seq = u32::from_be(h.seq);
            t.ack = u32::from_be(h.ack);
            let doff = ((h.doff >> 4) as usize) * 4;
            if doff < 20 {
                return Err(Outcome::Bad(Malformed));
            }
            t.tcp_flags = h.flags;
            t.payload_len = ip_payload.saturating_sub(doff) as u16;
        }
        PROTO_UDP => {
            let h: UdpHeader = ctx.load(l4).map_err(|_| Outcome::Bad(Malformed))?;
            t.sport = u16::from_be(h.sport);
            t.dport = u16::from_be(h.dport);
            t.payload_len = (u16::from_be(h.len) as usize).saturating_sub(8) as u16;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let h: IcmpEchoHeader = ctx.load(l4).map_err(|_| Outcome::Bad(Malformed))?;
            t.dport = ((h.icmp_type as u16) << 8) | h.code as u16;
            t.sport = u16::from_be(h.id);
            t.seq = u16::from_be(h.seq) as u32;
        }
        _ => {}
    }
    Ok((l4, false))
}

/// Parses the packet the device carries and, for VXLAN and IPIP, the packet inside it.
#[inline(always)]
pub fn parse<S: Source>(ctx: &S, l3_device: bool, p: &mut PacketEvent) -> Result<(), Outcome> {
    clear(&mut p.outer);
    // The inner tuple is cleared only where a tunnel is found: the agent reads it only when
    // `encap` says there is one, and most packets have none.
    p.encap = Encapsulation::None as u8;
    p.vni = 0;
    let (l3, family) = if l3_device {
        // tunl0 and wireguard.cali frames start at the IP header. Two bytes, not one: a one-byte
        // bounds check at offset 0 compiles to `data < data_end`, which the verifier does not
        // take as proof of a readable byte.
        let b: [u8; 2] = ctx.load(0).map_err(|_| Outcome::Bad(Malformed))?;
        match b[0] >> 4 {
            4 => (0, Family::V4),
            6 => (0, Family::V6),
            _ => return Err(Outcome::Skip(NotIp)),
        }
    } else {
        l2(ctx, 0)?
    };
    let (l4, fragment) = l3l4(ctx, l3, family, &mut p.outer)?;
    if fragment {
        // Its bytes are the middle of a datagram: not a VXLAN or IPIP header.
        return Ok(());
    }

    if p.outer.proto == PROTO_UDP && p.outer.dport == VXLAN_PORT {
        let vx: [u8; 8] = match ctx.load(l4 + 8) {
            Ok(v) => v,
            Err(_) => return Ok(()),
        };
        // The I flag says the VNI is valid; anything else is not VXLAN we understand.
        if vx[0] & 0x08 == 0 {
            return Ok(());
        }
        p.vni = u32::from_be_bytes([0, vx[4], vx[5], vx[6]]);
        let inner_l2 = l4 + 8 + VXLAN_HLEN;
        // A garbage inner frame leaves the outer record intact and is only counted.
        match l2(ctx, inner_l2) {
            Ok((inner_l3, inner_family)) => {
                clear(&mut p.inner);
                if l3l4(ctx, inner_l3, inner_family, &mut p.inner).is_ok() {
                    p.encap = Encapsulation::Vxlan as u8;
                } else {
                    clear(&mut p.inner);
                    crate::maps::count(tracer_common::STAT_MALFORMED);
                }
            }
            Err(_) => crate::maps::count(tracer_common::STAT_MALFORMED),
        }
    } else if p.outer.proto == PROTO_IPIP || p.outer.proto == PROTO_IPV6_IN_IP {
        let inner_family = if p.outer.proto == PROTO_IPIP {
            Family::V4
        } else {
            Family::V6
        };
        clear(&mut p.inner);
        if l3l4(ctx, l4, inner_family, &mut p.inner).is_ok() {
            p.encap = Encapsulation::Ipip as u8;
        } else {
            clear(&mut p.inner);
            crate::maps::count(tracer_common::STAT_MALFORMED);
        }
    }
    Ok(())
}
