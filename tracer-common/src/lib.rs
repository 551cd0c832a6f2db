//! The kernel ABI: what tracer's kernel programs and its agent both read or write.
//!
//! Every struct here is `#[repr(C)]` plain data: the kernel writes it into a ring buffer or a
//! map and the agent reads the same bytes back, so field order and padding are part of the ABI.
//! A one-byte field that names a kind holds a `#[repr(u8)]` enum below, stored as `u8` (a record
//! must stay valid for any bytes) and converted back once, by the agent's decoder.
#![no_std]

/// Ring buffer the tc programs write [`PacketEvent`]s into.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU counters indexed by the `STAT_*` constants.
pub const STATS_MAP: &str = "STATS";
/// Per-hook flow summary state and request/response turn state (LRU hash maps, sized by the
/// agent's --kernel-flow-entries).
pub const FLOWS_MAP: &str = "FLOWS";
pub const TURNS_MAP: &str = "TURNS";
/// Per-CPU cache in front of FLOWS: [`FLOW_CACHE_SLOTS`] [`CachedFlow`]s a CPU, so the repeated
/// packets of a flow a CPU is busy with skip FLOWS' hash lookup.
pub const FLOW_CACHE_MAP: &str = "FLOW_CACHE";
/// Slots per CPU, a power of two: the slot of a key is a hash of it masked to this.
pub const FLOW_CACHE_SLOTS: u32 = 32;
const _: () = assert!(FLOW_CACHE_SLOTS.is_power_of_two() && FLOW_CACHE_SLOTS > 1);
/// What every tc program returns on every path: TCX_NEXT under TCX, TC_ACT_UNSPEC under a
/// clsact filter (both -1): hand the packet to whatever runs next, decide nothing.
pub const TC_PASS_ON: i32 = -1;
/// Global the agent may set before load: how often a busy flow re-reports its counters.
pub const SUMMARY_INTERVAL_GLOBAL: &str = "SUMMARY_INTERVAL_NS";

/// Offsets the drop tracepoint needs, written by the agent from tracefs and BTF.
pub const DROP_CONF_MAP: &str = "DROP_CONF";

/// Program names in the object file.
pub const PROG_TC_INGRESS: &str = "tracer_tc_ingress";
pub const PROG_TC_EGRESS: &str = "tracer_tc_egress";
/// The same for devices whose frames start at the IP header (tunl0, wireguard.cali): a program
/// per kind of device, so the hot path needs no per-packet lookup of what the device is.
pub const PROG_TC_L3_INGRESS: &str = "tracer_tc_l3_ingress";
pub const PROG_TC_L3_EGRESS: &str = "tracer_tc_l3_egress";
pub const PROG_KFREE_SKB: &str = "tracer_kfree_skb";

pub const STAT_LOST: u32 = 0;
pub const STAT_MALFORMED: u32 = 1;
pub const STAT_PACKETS: u32 = 2;
pub const STAT_RECORDS: u32 = 3;
/// Kernel drops with a reportable reason (before filtering by protocol).
pub const STAT_DROPS: u32 = 4;
/// Gauge, not a counter: ring-buffer bytes not yet consumed, as last seen by this CPU.
pub const STAT_RB_PENDING: u32 = 5;
pub const STAT_COUNT: u32 = 6;

/// A record byte that names no variant of its enum: the kernel and the agent disagree on the ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownValue(pub u8);

/// A `#[repr(u8)]` enum for a one-byte record field. The kernel stores `variant as u8`; the
/// agent converts the byte back once, with `TryFrom<u8>` (by hand rather than num_enum's derive:
/// the kernel build then needs no further crate).
macro_rules! abi_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:literal,)+ }) => {
        $(#[$m])*
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vm])* $v = $n,)+
        }

        impl TryFrom<u8> for $name {
            type Error = UnknownValue;
            fn try_from(b: u8) -> Result<Self, UnknownValue> {
                match b {
                    $($n => Ok($name::$v),)+
                    other => Err(UnknownValue(other)),
                }
            }
        }
    };
}

abi_enum! {
    /// `PacketEvent::kind`.
    RecordKind {
        Packet = 0,
        /// A packet the kernel dropped (`skb:kfree_skb` with a reason).
        Drop = 1,
    }
}

abi_enum! {
    /// `PacketEvent::dir`: the tc hook that saw the packet.
    Direction {
        Ingress = 0,
        Egress = 1,
    }
}

abi_enum! {
    /// `PacketEvent::encap`: what `PacketEvent::inner` holds.
    Encapsulation {
        None = 0,
        Vxlan = 1,
        Ipip = 2,
    }
}

abi_enum! {
    /// `PacketEvent::emit`: why the kernel emitted a record instead of only counting the packet.
    EmitReason {
        First = 1,
        TcpControl = 2,
        Retransmit = 3,
        Periodic = 4,
        /// TCP payload started flowing the other way: a request/response turn.
        Turn = 5,
    }
}

abi_enum! {
    /// `Tuple::family`; a cleared tuple (0) carries no IP packet.
    Family {
        V4 = 4,
        V6 = 6,
    }
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPV6_IN_IP: u8 = 41;
pub const PROTO_ICMPV6: u8 = 58;

pub const VXLAN_PORT: u16 = 4789;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// One IP packet's identity as seen at one hook.
///
/// Addresses are raw network-order bytes (IPv4 in the first four). Ports are host order; for ICMP
/// echo, `sport` holds the echo identifier and `dport` `type << 8 | code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub ip_id: u16,
    /// IP protocol number (`PROTO_*` for those tracer parses).
    pub proto: u8,
    /// A [`Family`].
    pub family: u8,
    /// `TCP_*` bits.
    pub tcp_flags: u8,
    pub ttl: u8,
    /// TCP/UDP payload bytes of this packet.
    pub payload_len: u16,
}

/// One record from a tc hook: a packet, or a summary of the packets of one flow since the last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Bytes summarised in this record (including this packet).
    pub bytes: u64,
    pub ifindex: u32,
    /// `skb->len` of this packet.
    pub len: u32,
    /// Packets summarised in this record (including this packet).
    pub pkts: u32,
    /// VXLAN network identifier when `encap` is [`Encapsulation::Vxlan`].
    pub vni: u32,
    /// A [`Direction`].
    pub dir: u8,
    /// An [`Encapsulation`].
    pub encap: u8,
    /// An [`EmitReason`].
    pub emit: u8,
    /// A [`RecordKind`].
    pub kind: u8,
    /// For drops: the kernel's `enum skb_drop_reason`.
    pub drop_reason: u32,
    /// For drops: kernel address of the function that dropped it.
    pub location: u64,
    /// The packet as the device carries it.
    pub outer: Tuple,
    /// The encapsulated packet, valid when `encap` is not [`Encapsulation::None`].
    pub inner: Tuple,
}

/// Where to find things for the drop tracepoint; zero `enabled` keeps it silent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropConf {
    pub enabled: u32,
    /// Drops with a reason below this are ignored (2 = NOT_SPECIFIED, the bulk of frees).
    pub min_reason: u32,
    /// Tracepoint record offsets (from the tracefs format file).
    pub tp_skbaddr: u32,
    pub tp_location: u32,
    pub tp_protocol: u32,
    pub tp_reason: u32,
    /// `struct sk_buff` member offsets (from BTF).
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    /// `struct net_device` ifindex offset (from BTF).
    pub dev_ifindex: u32,
    /// Bitmap of reasons that are routine socket housekeeping, not path drops.
    pub ignore: [u64; 4],
    /// Only drops in this network namespace (its inode number); 0 reports every namespace. The
    /// tracepoint is global, but an agent answers for its own node only.
    pub netns_inum: u32,
    /// `sk_buff.sk`, `sock_common.skc_net`, `net_device.nd_net`, `net.ns` + `ns_common.inum`.
    pub skb_sk: u32,
    pub sk_net: u32,
    pub dev_nd_net: u32,
    pub net_inum: u32,
}

/// Key of the kernel's per-flow summary state (FLOWS). The agent purges entries by `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    pub proto: u8,
    /// A [`Direction`].
    pub dir: u8,
    /// An [`Encapsulation`].
    pub encap: u8,
    pub _pad: u8,
}

impl FlowKey {
    /// This key's slot in a CPU's flow cache: a multiplicative hash of the fields that tell a
    /// CPU's flows apart (the address words that differ between pods, IPv4 or IPv6, the ports,
    /// interface and direction), masked to [`FLOW_CACHE_SLOTS`]. Cheap on purpose: it replaces
    /// FLOWS' hash of all 44 bytes on the path of every packet.
    #[inline(always)]
    pub fn cache_slot(&self) -> u32 {
        let w = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        let x = w(&self.src, 0)
            ^ w(&self.src, 12)
            ^ (w(&self.dst, 0) ^ w(&self.dst, 12)).rotate_left(16)
            ^ (((self.sport as u32) << 16) | self.dport as u32)
            ^ self.ifindex.wrapping_mul(0x9E37_79B1)
            ^ ((self.dir as u32) << 7);
        x.wrapping_mul(0x9E37_79B1) >> (32 - FLOW_CACHE_SLOTS.trailing_zeros())
    }
}

/// Key of the kernel's per-connection turn state (TURNS): both directions on one interface. Its
/// value is the side (0: a->b, 1: b->a) that sent payload last. The agent purges by `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvKey {
    /// The lower (address, port) endpoint first, so both directions share the key.
    pub a: [u8; 16],
    pub b: [u8; 16],
    pub a_port: u16,
    pub b_port: u16,
    pub ifindex: u32,
}

/// Value of the kernel's per-flow summary state (FLOWS); the agent needs only its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowState {
    /// Coarse clock (`bpf_ktime_get_coarse_ns`) of the last record: it only paces summaries.
    pub last_emit_ns: u64,
    pub bytes: u64,
    pub pkts: u32,
    /// Highest TCP sequence end seen, to spot retransmissions.
    pub seq_end: u32,
    /// The acknowledgment number of this direction's last TCP payload packet. While it stays
    /// put the peer has sent nothing new, so a payload packet cannot be a turn and the turn map
    /// is not consulted (bulk transfer: one map operation per packet instead of two).
    pub turn_ack: u32,
    pub _pad: u32,
}

/// [`CachedFlow::held`]: the slot holds nothing.
pub const CACHE_EMPTY: u32 = 0;
/// [`CachedFlow::held`]: the slot holds `key`'s state and FLOWS has all of it.
pub const CACHE_CLEAN: u32 = 1;
/// [`CachedFlow::held`]: the slot holds `key`'s state with changes FLOWS lacks (packets not yet
/// reported, a newer sequence end): they go back into FLOWS when the slot is given to another
/// flow.
pub const CACHE_DIRTY: u32 = 2;

/// One slot of a CPU's flow cache (FLOW_CACHE). While a slot holds a flow, that CPU's packets of
/// the flow update the slot instead of FLOWS; the counts it took over from FLOWS are its own to
/// report, so a flow seen on several CPUs is still counted once. The agent empties the slots of
/// interfaces it lets go of, as it purges FLOWS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CachedFlow {
    pub key: FlowKey,
    /// `CACHE_EMPTY`, `CACHE_CLEAN` or `CACHE_DIRTY`.
    pub held: u32,
    pub st: FlowState,
}

// The kernel writes these bytes and the agent reads them: a size change is an ABI change.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Tuple>() == 52);
    assert!(size_of::<PacketEvent>() == 152);
    assert!(size_of::<DropConf>() == 96);
    assert!(size_of::<FlowKey>() == 44);
    assert!(size_of::<ConvKey>() == 40);
    assert!(size_of::<FlowState>() == 32);
    assert!(size_of::<CachedFlow>() == 80);
    assert!(core::mem::offset_of!(CachedFlow, key) == 0);
};

// SAFETY: plain-old-data, u32 fields only; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for DropConf {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_convert_back_to_the_variant_the_kernel_stored() {
        for d in [Direction::Ingress, Direction::Egress] {
            assert_eq!(Direction::try_from(d as u8), Ok(d));
        }
        assert_eq!(Encapsulation::try_from(2), Ok(Encapsulation::Ipip));
        assert_eq!(EmitReason::try_from(5), Ok(EmitReason::Turn));
        assert_eq!(RecordKind::try_from(1), Ok(RecordKind::Drop));
        assert_eq!(Family::try_from(6), Ok(Family::V6));
        assert_eq!(EmitReason::try_from(0), Err(UnknownValue(0)));
        assert_eq!(Family::try_from(0), Err(UnknownValue(0)));
        assert_eq!(Direction::try_from(9), Err(UnknownValue(9)));
    }
}
