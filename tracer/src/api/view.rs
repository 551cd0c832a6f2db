//! The JSON shape of a flow. Field names are API: add, never rename.
//!
//! Serialized straight from the flow (no intermediate `serde_json::Value`): `/flows` renders up
//! to `limit` of these while holding the flow table.
use std::net::IpAddr;

use serde::Serialize;
use serde_json::Value;
use tracer_common::{PROTO_TCP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};
use tracer_model::Verdict;

use crate::{
    calico::Role,
    clock::Clock,
    diagnose::{Context, Diagnosis, Judgement, SnatExclusion},
    events::Dir,
    flows::{Flow, HopEncap, HopView, Iface, Nat, Side},
    net::proto_name,
};

#[derive(Serialize)]
pub struct FlowView<'a> {
    id: u64,
    proto: String,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    first_seen: String,
    last_seen: String,
    nat: Option<Nat>,
    path: Vec<HopJson<'a>>,
    forward: Counters,
    reverse: Counters,
    reply_after_ms: Option<f64>,
    tcp: Option<TcpJson>,
    exchanges: Option<ExchangesJson>,
    drops: Vec<DropJson>,
    verdicts: &'a [Verdict],
    diagnosis: &'a Option<Diagnosis>,
    /// Present only with the `snat_excluded` verdict: which felix setting skipped masquerade.
    #[serde(skip_serializing_if = "Option::is_none")]
    snat_excluded: Option<&'a SnatExclusion>,
    /// Present only when records were lost while the flow ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    evidence_incomplete: Option<EvidenceGap>,
}

/// Why a flow's evidence may be partial.
#[derive(Serialize)]
struct EvidenceGap {
    /// Records the kernel dropped (ring buffer full) while the flow ran; any of them could be
    /// this flow's.
    lost_records: u64,
}

#[derive(Serialize)]
struct HopJson<'a> {
    iface: &'a Iface,
    ifindex: u32,
    role: Option<Role>,
    dir: Dir,
    side: Side,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    encap: Option<&'a HopEncap>,
    pkts: u64,
    bytes: u64,
    retransmits: u32,
    t_ms: f64,
    tcp_flags: String,
}

#[derive(Serialize)]
struct Counters {
    pkts: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct TcpJson {
    syn: bool,
    syn_ack: bool,
    fin: bool,
    rst: bool,
    retransmits: u32,
    handshake_ms: Option<f64>,
}

#[derive(Serialize)]
struct ExchangesJson {
    count: u32,
    p50_ms: Option<f64>,
    p90_ms: Option<f64>,
    max_ms: f64,
}

#[derive(Serialize)]
struct DropJson {
    reason: String,
    iface: Option<String>,
    function: Option<String>,
    side: Side,
    count: u32,
    t_ms: f64,
}

impl<'a> FlowView<'a> {
    pub fn new(f: &'a Flow, j: &'a Judgement, clock: &Clock, cx: &Context<'_>) -> FlowView<'a> {
        let (fp, fb) = f.counters(Side::Forward);
        let (rp, rb) = f.counters(Side::Reverse);
        let mut hops: Vec<HopView<'a>> = f.path().collect();
        hops.sort_by_key(|h| h.first_ns);
        let since_start = |ns: u64| ms_f(ns.saturating_sub(f.first_ns));
        FlowView {
            id: f.id,
            proto: proto_name(f.proto),
            src: f.src,
            sport: f.sport,
            dst: f.dst,
            dport: f.dport,
            first_seen: clock.rfc3339(f.first_ns),
            last_seen: clock.rfc3339(f.last_ns),
            nat: f.nat,
            path: hops
                .iter()
                .map(|h| HopJson {
                    iface: h.iface,
                    ifindex: h.ifindex,
                    role: h.role,
                    dir: h.dir,
                    side: h.side,
                    src: h.src,
                    sport: h.sport,
                    dst: h.dst,
                    dport: h.dport,
                    encap: h.encap,
                    pkts: h.hop.pkts(),
                    bytes: h.hop.bytes,
                    retransmits: h.hop.retransmits(),
                    t_ms: since_start(h.first_ns),
                    tcp_flags: tcp_flags(h.hop.tcp_flags_seen),
                })
                .collect(),
            forward: Counters {
                pkts: fp,
                bytes: fb,
            },
            reverse: Counters {
                pkts: rp,
                bytes: rb,
            },
            reply_after_ms: f.first_reply_ns().map(since_start),
            tcp: (f.proto == PROTO_TCP).then(|| TcpJson {
                syn: f.tcp.syn,
                syn_ack: f.tcp.syn_ack,
                fin: f.tcp.fin,
                rst: f.tcp.rst,
                retransmits: f.retransmits(),
                handshake_ms: f.handshake_ns().map(ms_f),
            }),
            exchanges: (f.exchanges.count > 0).then(|| ExchangesJson {
                count: f.exchanges.count,
                p50_ms: f.exchanges.quantile_us(0.5).map(|u| f64::from(u) / 1000.0),
                p90_ms: f.exchanges.quantile_us(0.9).map(|u| f64::from(u) / 1000.0),
                max_ms: ms_f(f.exchanges.max_ns()),
            }),
            drops: f
                .drops()
                .iter()
                .map(|d| DropJson {
                    reason: cx.reasons.name(d.reason),
                    iface: (d.ifindex != 0).then(|| cx.facts.name_of(d.ifindex)),
                    function: cx.symbols.name(d.location),
                    side: d.side,
                    count: d.count,
                    t_ms: since_start(d.ts_ns),
                })
                .collect(),
            verdicts: &j.verdicts,
            diagnosis: &j.diagnosis,
            snat_excluded: j.snat_excluded.as_ref(),
            evidence_incomplete: (j.lost_records > 0).then_some(EvidenceGap {
                lost_records: j.lost_records,
            }),
        }
    }
}

/// The flow as a JSON value (single flows and watch streams, which compare answers).
pub fn flow_json(f: &Flow, j: &Judgement, clock: &Clock, cx: &Context<'_>) -> Value {
    serde_json::to_value(FlowView::new(f, j, clock, cx)).unwrap_or(Value::Null)
}

fn ms_f(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}

/// tcpdump-style flag letters.
pub fn tcp_flags(f: u8) -> String {
    let mut s = String::new();
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
