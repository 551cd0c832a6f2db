//! Fills the wire type of a flow ([`tracer_model::FlowView`]) from the flow table.
use tracer_model::flow::{
    tcp_flag_letters, Counters, DropView, EvidenceGap, Exchanges, FlowView, Hop, TcpSummary,
};

use super::names::Naming;
use crate::{
    clock::Clock,
    diagnose::{Context, Judgement},
    flows::{Flow, HopView, Side},
    net::{proto_name, PROTO_TCP},
};

/// The flow as the API sends it.
pub fn flow_view(
    f: &Flow,
    j: Judgement,
    clock: &Clock,
    cx: &Context<'_>,
    names: &Naming,
) -> FlowView {
    let (fp, fb) = f.counters(Side::Forward);
    let (rp, rb) = f.counters(Side::Reverse);
    let mut hops: Vec<HopView<'_>> = f.path().collect();
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
            .map(|h| Hop {
                // `String::from` copies; `to_string` on a `Box<str>` went through `Display`.
                iface: String::from(&*h.iface.name),
                ifindex: h.ifindex,
                role: h.role,
                dir: h.dir,
                side: h.side,
                src: h.src,
                sport: h.sport,
                dst: h.dst,
                dport: h.dport,
                encap: h.encap.cloned(),
                pkts: h.hop.pkts(),
                bytes: h.hop.bytes,
                retransmits: h.hop.retransmits(),
                t_ms: since_start(h.first_ns),
                tcp_flags: tcp_flag_letters(h.hop.tcp_flags_seen),
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
        tcp: (f.proto == PROTO_TCP).then(|| TcpSummary {
            syn: f.tcp.syn,
            syn_ack: f.tcp.syn_ack,
            fin: f.tcp.fin,
            rst: f.tcp.rst,
            retransmits: f.retransmits(),
            handshake_ms: f.handshake_ns().map(ms_f),
        }),
        exchanges: (f.exchanges.count > 0).then(|| {
            let [p50, p90] = f.exchanges.quantiles_us([0.5, 0.9]);
            Exchanges {
                count: f.exchanges.count,
                p50_ms: p50.map(|u| f64::from(u) / 1000.0),
                p90_ms: p90.map(|u| f64::from(u) / 1000.0),
                max_ms: ms_f(f.exchanges.max_ns()),
            }
        }),
        drops: f
            .drops()
            .iter()
            .map(|d| DropView {
                reason: cx.reasons.name(d.reason),
                iface: (d.ifindex != 0).then(|| cx.facts.name_of(d.ifindex)),
                function: cx.symbols.name(d.location),
                side: d.side,
                count: d.count,
                t_ms: since_start(d.ts_ns),
            })
            .collect(),
        evidence_incomplete: (j.lost_records > 0).then_some(EvidenceGap {
            lost_records: j.lost_records,
        }),
        verdicts: j.verdicts,
        diagnosis: j.diagnosis.map(|mut d| {
            d.summary = names.name_text(&d.summary, f.first_ns);
            d
        }),
        snat_excluded: j.snat_excluded.map(|mut x| {
            x.summary = names.name_text(&x.summary, f.first_ns);
            x
        }),
        endpoints: names.endpoints(f, cx.facts),
    }
}

fn ms_f(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}
