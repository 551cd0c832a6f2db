//! The record layout shared by tracer's kernel programs and its agent.
//!
//! Every type here is `#[repr(C)]` plain data: the kernel writes it into a ring buffer and the
//! agent reads the same bytes back, so field order and padding are part of the ABI.
#![no_std]

/// Ring buffer the tc programs write [`PacketEvent`]s into.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU counters indexed by the `STAT_*` constants.
pub const STATS_MAP: &str = "STATS";
/// Per-hook flow summary state and request/response turn state (LRU hash maps, sized by the
/// agent's --kernel-flow-entries).
pub const FLOWS_MAP: &str = "FLOWS";
pub const TURNS_MAP: &str = "TURNS";
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

/// Record kinds.
pub const KIND_PACKET: u8 = 0;
/// A packet the kernel dropped (`skb:kfree_skb` with a reason).
pub const KIND_DROP: u8 = 1;

pub const STAT_LOST: u32 = 0;
pub const STAT_MALFORMED: u32 = 1;
pub const STAT_PACKETS: u32 = 2;
pub const STAT_RECORDS: u32 = 3;
/// Kernel drops with a reportable reason (before filtering by protocol).
pub const STAT_DROPS: u32 = 4;
/// Gauge, not a counter: ring-buffer bytes not yet consumed, as last seen by this CPU.
pub const STAT_RB_PENDING: u32 = 5;
pub const STAT_COUNT: u32 = 6;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

pub const ENCAP_NONE: u8 = 0;
pub const ENCAP_VXLAN: u8 = 1;
pub const ENCAP_IPIP: u8 = 2;

/// Why the kernel emitted a record instead of only counting the packet.
pub const EMIT_FIRST: u8 = 1;
pub const EMIT_TCP_CONTROL: u8 = 2;
pub const EMIT_RETRANSMIT: u8 = 3;
pub const EMIT_PERIODIC: u8 = 4;
/// TCP payload started flowing the other way: a request/response turn.
pub const EMIT_TURN: u8 = 5;

pub const FAMILY_NONE: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

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
    pub proto: u8,
    pub family: u8,
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
    /// VXLAN network identifier when `encap == ENCAP_VXLAN`.
    pub vni: u32,
    pub dir: u8,
    pub encap: u8,
    pub emit: u8,
    /// `KIND_PACKET` or `KIND_DROP`.
    pub kind: u8,
    /// For drops: the kernel's `enum skb_drop_reason`.
    pub drop_reason: u32,
    /// For drops: kernel address of the function that dropped it.
    pub location: u64,
    /// The packet as the device carries it.
    pub outer: Tuple,
    /// The encapsulated packet, valid when `encap != ENCAP_NONE`.
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

/// What the agent tells the kernel about an interface.
/// Key of the kernel's per-flow summary state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    pub proto: u8,
    pub dir: u8,
    pub encap: u8,
    pub _pad: u8,
}

/// Key of the kernel's per-connection turn state: both directions on one interface.
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

/// Value of the kernel's per-flow summary state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowState {
    /// Coarse clock (`bpf_ktime_get_coarse_ns`) of the last record: it only paces summaries.
    pub last_emit_ns: u64,
    pub bytes: u64,
    pub pkts: u32,
    /// Highest TCP sequence end seen, to spot retransmissions.
    pub seq_end: u32,
}

// SAFETY: plain-old-data, u32 fields only; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for DropConf {}
