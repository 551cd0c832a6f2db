//! Property tests over everything the network or a user hands the agent: ring-buffer records,
//! HTTP query strings, BTF blobs, ipset and tracefs text. None may panic; valid input must
//! round-trip.
use proptest::prelude::*;
use tracer::{
    btf::Btf,
    calico::{check_iface_name, parse_ipset_save},
    events::{decode, encode},
    hooks::drops::field_offsets,
    kernel_names::DropReasons,
    net::Cidr,
};
use tracer_common::PacketEvent;
use tracer_model::FlowQuery;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decoder_round_trips_valid_records(
        src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sport in any::<u16>(), dport in any::<u16>(),
        seq in any::<u32>(), flags in any::<u8>(), dir in 0u8..2, ts in any::<u64>(),
    ) {
        let mut ev = PacketEvent { ts_ns: ts, dir, pkts: 1, ..Default::default() };
        ev.outer.src[..4].copy_from_slice(&src);
        ev.outer.dst[..4].copy_from_slice(&dst);
        ev.outer.family = tracer_common::Family::V4 as u8;
        ev.outer.proto = tracer_common::PROTO_TCP;
        ev.outer.sport = sport;
        ev.outer.dport = dport;
        ev.outer.seq = seq;
        ev.outer.tcp_flags = flags;
        let o = decode(&encode(&ev)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(o.outer.sport, sport);
        prop_assert_eq!(o.outer.seq, seq);
        prop_assert_eq!(o.ts_ns, ts);
        prop_assert_eq!(o.outer.src.to_string(), std::net::Ipv4Addr::from(src).to_string());
    }

    #[test]
    fn query_parser_never_panics(q in ".{0,300}") {
        let _ = FlowQuery::parse(Some(&q));
    }

    #[test]
    fn query_parser_rejects_unknown_keys(k in "[a-z]{1,12}", v in "[a-z0-9]{0,8}") {
        let known = ["dst", "src", "pod", "port", "proto", "verdict", "cause", "since", "limit"];
        prop_assume!(!known.contains(&k.as_str()));
        let q = format!("{k}={v}");
        prop_assert!(FlowQuery::parse(Some(&q)).is_err());
    }

    #[test]
    fn cidr_filters_round_trip(a in any::<[u8; 4]>(), p in 0u8..=32) {
        let text = format!("{}/{}", std::net::Ipv4Addr::from(a), p);
        let c: Cidr = text.parse().map_err(|e: tracer::net::NetError| TestCaseError::fail(e.to_string()))?;
        prop_assert!(c.contains(std::net::IpAddr::from(a)));
        let q = FlowQuery::parse(Some(&format!("dst={}", text.replace('/', "%2F"))))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(q.dst, Some(c));
    }

    #[test]
    fn btf_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Btf::parse(&bytes);
        // With a valid header in front, the type section is the fuzzed part.
        let mut b = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&bytes);
        if let Ok(btf) = Btf::parse(&b) {
            let _ = btf.member_offset("sk_buff", "head");
        }
    }

    #[test]
    fn text_parsers_never_panic(text in ".{0,400}") {
        let _ = parse_ipset_save(&text);
        let _ = field_offsets(&text);
        let _ = DropReasons::from_format(&text).name(12);
        let _ = check_iface_name(&text);
    }
}
