//! The JSON shape of a flow. Field names are API: add, never rename.
use serde_json::{json, Value};

use crate::{
    clock::Clock,
    diagnose::{Context, Judgement},
    flows::{Flow, Side},
    net::proto_name,
};

pub fn flow_json(f: &Flow, j: &Judgement, clock: &Clock, cx: &Context<'_>) -> Value {
    let (fp, fb) = f.counters(Side::Forward);
    let (rp, rb) = f.counters(Side::Reverse);
    let mut hops: Vec<&crate::flows::Hop> = f.hops.iter().collect();
    hops.sort_by_key(|h| h.first_ns);
    let path: Vec<Value> = hops
        .iter()
        .map(|h| {
            let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert(
                    "t_ms".into(),
                    json!(ms_f(h.first_ns.saturating_sub(f.first_ns))),
                );
                m.insert("tcp_flags".into(), json!(tcp_flags(h.tcp_flags_seen)));
            }
            v
        })
        .collect();
    json!({
        "id": f.id,
        "proto": proto_name(f.proto),
        "src": f.src.to_string(),
        "sport": f.sport,
        "dst": f.dst.to_string(),
        "dport": f.dport,
        "first_seen": clock.rfc3339(f.first_ns),
        "last_seen": clock.rfc3339(f.last_ns),
        "nat": f.nat,
        "path": path,
        "forward": {"pkts": fp, "bytes": fb},
        "reverse": {"pkts": rp, "bytes": rb},
        "reply_after_ms": f.first_reply_ns.map(|t| ms_f(t.saturating_sub(f.first_ns))),
        "tcp": if f.proto == 6 {
            json!({
                "syn": f.tcp.syn,
                "syn_ack": f.tcp.syn_ack,
                "fin": f.tcp.fin,
                "rst": f.tcp.rst,
                "retransmits": f.retransmits(),
                "handshake_ms": f.handshake_ns().map(ms_f),
            })
        } else {
            Value::Null
        },
        "exchanges": if f.exchanges.count > 0 {
            json!({
                "count": f.exchanges.count,
                "p50_ms": f.exchanges.quantile_us(0.5).map(|u| f64::from(u) / 1000.0),
                "p90_ms": f.exchanges.quantile_us(0.9).map(|u| f64::from(u) / 1000.0),
                "max_ms": ms_f(f.exchanges.max_ns),
            })
        } else {
            Value::Null
        },
        "drops": f.drops.iter().map(|d| json!({
            "reason": cx.reasons.name(d.reason),
            "iface": (d.ifindex != 0).then(|| cx.facts.name_of(d.ifindex)),
            "function": cx.symbols.name(d.location),
            "side": d.side,
            "count": d.count,
            "t_ms": ms_f(d.ts_ns.saturating_sub(f.first_ns)),
        })).collect::<Vec<_>>(),
        "verdicts": j.verdicts,
        "diagnosis": j.diagnosis,
    })
}

fn ms_f(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}

/// tcpdump-style flag letters.
pub fn tcp_flags(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (0x02, 'S'),
        (0x10, '.'),
        (0x08, 'P'),
        (0x01, 'F'),
        (0x04, 'R'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    s
}
