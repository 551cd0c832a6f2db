//! The hand-written writer against serde_json, for flows with every optional part, both address
//! families, and strings holding quotes, backslashes, control bytes and any Unicode.
use std::net::IpAddr;

use proptest::{collection::vec, option, prelude::*, sample::select};

use super::super::{
    Counters, DropView, EvidenceGap, Exchanges, FlowView, FlowsPage, Hop, HopEncap, Nat, TcpSummary,
};
use crate::{Dir, Encap, Role, Side, Verdict};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.@-]{0,15}",
        "[a-z\"\\\\\\x00-\\x1f\\x7f]{0,8}",
        any::<String>(),
    ]
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
        // IPv4-mapped and short IPv6 forms.
        any::<u32>().prop_map(|v| IpAddr::from(std::net::Ipv4Addr::from(v).to_ipv6_mapped())),
        any::<u16>().prop_map(|v| IpAddr::from([0, 0, 0, 0, 0, 0, 0, v])),
    ]
}

fn ms() -> impl Strategy<Value = f64> {
    prop_oneof![
        (0u64..10_000_000).prop_map(|n| (n as f64 / 1e6 * 1000.0).round() / 1000.0),
        any::<f64>(),
    ]
}

fn nat() -> impl Strategy<Value = Nat> {
    (addr(), any::<u16>(), addr(), any::<u16>()).prop_map(|(src, sport, dst, dport)| Nat {
        src,
        sport,
        dst,
        dport,
    })
}

fn hop() -> impl Strategy<Value = Hop> {
    (
        (
            text(),
            any::<u32>(),
            option::of(select(Role::ALL)),
            select(Dir::ALL),
            select(Side::ALL),
            nat(),
        ),
        option::of(
            (
                select(Encap::ALL),
                option::of(any::<u32>()),
                addr(),
                addr(),
                any::<u16>(),
                any::<u16>(),
            )
                .prop_map(
                    |(kind, vni, outer_src, outer_dst, outer_sport, outer_dport)| HopEncap {
                        kind,
                        vni,
                        outer_src,
                        outer_dst,
                        outer_sport,
                        outer_dport,
                    },
                ),
        ),
        (any::<u64>(), any::<u64>(), any::<u32>(), ms(), text()),
    )
        .prop_map(
            |(
                (iface, ifindex, role, dir, side, t),
                encap,
                (pkts, bytes, retransmits, t_ms, tcp_flags),
            )| Hop {
                iface,
                ifindex,
                role,
                dir,
                side,
                src: t.src,
                sport: t.sport,
                dst: t.dst,
                dport: t.dport,
                encap,
                pkts,
                bytes,
                retransmits,
                t_ms,
                tcp_flags,
            },
        )
}

fn drop_view() -> impl Strategy<Value = DropView> {
    (
        text(),
        option::of(text()),
        option::of(text()),
        select(Side::ALL),
        any::<u32>(),
        ms(),
    )
        .prop_map(|(reason, iface, function, side, count, t_ms)| DropView {
            reason,
            iface,
            function,
            side,
            count,
            t_ms,
        })
}

fn flow() -> impl Strategy<Value = FlowView> {
    (
        (
            any::<u64>(),
            text(),
            nat(),
            text(),
            text(),
            option::of(nat()),
        ),
        (
            vec(hop(), 0..5),
            any::<(u64, u64, u64, u64)>(),
            option::of(ms()),
            option::of(
                (any::<[bool; 4]>(), any::<u32>(), option::of(ms())).prop_map(
                    |([syn, syn_ack, fin, rst], retransmits, handshake_ms)| TcpSummary {
                        syn,
                        syn_ack,
                        fin,
                        rst,
                        retransmits,
                        handshake_ms,
                    },
                ),
            ),
            option::of(
                (any::<u32>(), option::of(ms()), option::of(ms()), ms()).prop_map(
                    |(count, p50_ms, p90_ms, max_ms)| Exchanges {
                        count,
                        p50_ms,
                        p90_ms,
                        max_ms,
                    },
                ),
            ),
        ),
        (
            vec(drop_view(), 0..3),
            vec(select(Verdict::ALL), 0..4),
            option::of(any::<u64>()),
        ),
    )
        .prop_map(
            |(
                (id, proto, t, first_seen, last_seen, nat),
                (path, (fp, fb, rp, rb), reply_after_ms, tcp, exchanges),
                (drops, verdicts, lost),
            )| FlowView {
                id,
                proto,
                src: t.src,
                sport: t.sport,
                dst: t.dst,
                dport: t.dport,
                first_seen,
                last_seen,
                nat,
                path,
                forward: Counters {
                    pkts: fp,
                    bytes: fb,
                },
                reverse: Counters {
                    pkts: rp,
                    bytes: rb,
                },
                reply_after_ms,
                tcp,
                exchanges,
                drops,
                verdicts,
                // Written by serde_json itself; the API goldens hold flows with each of them.
                diagnosis: None,
                snat_excluded: None,
                evidence_incomplete: lost.map(|lost_records| EvidenceGap { lost_records }),
                endpoints: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_page_is_written_as_serde_json_writes_it(
        flows in vec(flow(), 0..4),
        matched in any::<usize>(),
        truncated in any::<bool>(),
    ) {
        let page = FlowsPage { flows, matched, truncated };
        let mut ours = Vec::new();
        page.write_json(&mut ours).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let theirs = serde_json::to_vec(&page).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
    }
}
