//! A flow as `/flows`, `/flows/{id}` and `/watch` send it. Field names are API: add, never
//! rename. The server fills these from its flow table; clients read them back.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    diagnosis::{Diagnosis, SnatExclusion},
    identity::FlowEndpoints,
    Dir, Encap, Role, Side, Verdict,
};

mod json;

pub use json::FlowsPageWriter;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub id: u64,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the protocol number.
    pub proto: String,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// RFC 3339.
    pub first_seen: String,
    pub last_seen: String,
    /// The tuple after SNAT/DNAT, when the flow was translated.
    pub nat: Option<Nat>,
    /// Every (interface, hook, side) the flow crossed, in time order.
    pub path: Vec<Hop>,
    pub forward: Counters,
    pub reverse: Counters,
    pub reply_after_ms: Option<f64>,
    pub tcp: Option<TcpSummary>,
    pub exchanges: Option<Exchanges>,
    pub drops: Vec<DropView>,
    pub verdicts: Vec<Verdict>,
    pub diagnosis: Option<Diagnosis>,
    /// Present only with the `snat_excluded` verdict: which felix setting skipped masquerade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_excluded: Option<SnatExclusion>,
    /// Present only when records were lost while the flow ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_incomplete: Option<EvidenceGap>,
    /// Who the flow's addresses are (pods, Services, nodes); present only while identity is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<FlowEndpoints>,
}

impl FlowView {
    /// Whether any of the flow's verdicts says something went wrong.
    pub fn is_faulty(&self) -> bool {
        self.verdicts.iter().any(|v| v.is_fault())
    }
}

/// The translated tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nat {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// Why a flow's evidence may be partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceGap {
    /// Records the kernel dropped (ring buffer full) while the flow ran; any of them could be
    /// this flow's.
    pub lost_records: u64,
}

/// One interface hook the flow crossed, with the tuple as seen there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hop {
    pub iface: String,
    pub ifindex: u32,
    pub role: Option<Role>,
    pub dir: Dir,
    pub side: Side,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub encap: Option<HopEncap>,
    pub pkts: u64,
    pub bytes: u64,
    pub retransmits: u32,
    /// ms after the flow's first record.
    pub t_ms: f64,
    /// tcpdump-style flag letters seen here.
    pub tcp_flags: String,
}

/// The outer header of an encapsulated hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopEncap {
    #[serde(rename = "type")]
    pub kind: Encap,
    pub vni: Option<u32>,
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    pub outer_sport: u16,
    pub outer_dport: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    pub pkts: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TcpSummary {
    pub syn: bool,
    pub syn_ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub retransmits: u32,
    pub handshake_ms: Option<f64>,
}

/// Request/response exchanges on the flow and how long the answers took.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Exchanges {
    pub count: u32,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub max_ms: f64,
}

/// A kernel drop attributed to the flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DropView {
    /// The kernel's `skb_drop_reason` name, e.g. `NETFILTER_DROP`.
    pub reason: String,
    pub iface: Option<String>,
    /// The kernel function that dropped it, when its symbol is known.
    pub function: Option<String>,
    pub side: Side,
    pub count: u32,
    pub t_ms: f64,
}

/// The body of `GET /flows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowsPage {
    pub flows: Vec<FlowView>,
    /// Flows that matched the query; `limit` of them are in `flows`.
    pub matched: usize,
    pub truncated: bool,
}

/// tcpdump-style flag letters.
pub fn tcp_flag_letters(f: u8) -> String {
    use tracer_common::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};
    // At most five letters: one allocation, not a growth per letter.
    let mut s = String::with_capacity(5);
    for (bit, c) in [
        (TCP_SYN, 'S'),
        (TCP_ACK, '.'),
        (TCP_PSH, 'P'),
        (TCP_FIN, 'F'),
        (TCP_RST, 'R'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    s
}
