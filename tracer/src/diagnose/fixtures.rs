//! Nodes, pools and flows the rules' tests share, and what those tests use (`use
//! super::super::fixtures::*` is a rule test's one import).
use serde::Serialize;

pub use serde_json::{json, Value};
pub use tracer_model::{Cause, Verdict};

pub use super::{judge, node_findings, Context, Judgement, Rules};
pub use crate::{
    calico::{NatOutgoing, Pools, Role},
    events::{Dir, Packet},
    flows::{FlowTable, Gaps, Iface},
    kernel_names::{DropReasons, Symbols},
    net::{Cidr, IfAddr},
    netlink::{Link, NodeFacts},
    testutil::{ip, obs},
};

/// `left_node_unmasqueraded` of a pod's TCP SYN from port 40000 out of eth0, as `json!` built it.
pub fn left_eth0(src: &str, dst: &str, dport: u16) -> Value {
    json!({
        "iface": "eth0", "dir": "egress", "src": src, "sport": 40000, "dst": dst, "dport": dport,
        "proto": "tcp",
    })
}

/// `reply` of a request unanswered since 1 µs after the flow began, judged at 10 s.
pub fn no_reply_after_10s() -> Value {
    json!({"replied": false, "waited_ms": 9999, "retransmits": 0})
}

/// Evidence (or anything) as the JSON the API serves.
pub fn ev<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// The typed value serialises to exactly the bytes of `old`, the `json!` form the rules built
/// before evidence was typed (a `Value` object serialises with sorted keys).
pub fn assert_same_json<T: Serialize>(typed: &T, old: Value) {
    let new = serde_json::to_string(typed).unwrap_or_default();
    let old = serde_json::to_string(&old).unwrap_or_default();
    assert_eq!(new, old);
}

pub fn facts() -> NodeFacts {
    let mut f = NodeFacts::default();
    let link = |index: u32, name: &str, addrs: Vec<IfAddr>| Link {
        index,
        name: name.into(),
        kind: None,
        master: None,
        up: true,
        l3: false,
        mtu: None,
        vxlan: None,
        addrs,
    };
    f.links.insert(
        2,
        link(
            2,
            "eth0",
            vec![IfAddr {
                ip: ip("192.168.21.10"),
                prefix: 24,
            }],
        ),
    );
    f.links.insert(5, link(5, "calid92900560e3", vec![]));
    f
}

pub fn pools(all: &[&str], masq: &[&str]) -> Pools {
    Pools {
        all: all.iter().filter_map(|c| c.parse().ok()).collect(),
        masq: masq.iter().filter_map(|c| c.parse().ok()).collect(),
        source: "ipset".into(),
        ..Pools::default()
    }
}

pub fn syn(src: &str, dst: &str, dport: u16) -> Packet {
    crate::testutil::tcp(src, 40000, dst, dport, 0x02, 99, 0)
}

pub fn lookup(i: u32) -> std::sync::Arc<Iface> {
    match i {
        2 => Iface::new("eth0", i, Some(Role::Host)),
        5 => Iface::new("calid92900560e3", i, Some(Role::Workload)),
        o => Iface::unnamed(o),
    }
}

/// A pod SYN seen at its veth and leaving eth0 as `out`, optionally answered.
pub fn flow_of(pod_syn: Packet, out: Packet, reply: bool) -> (FlowTable, u64) {
    let mut t = FlowTable::new(10);
    let id = t
        .ingest(&obs(1_000, 5, Dir::Ingress, pod_syn), &lookup)
        .unwrap_or(0);
    t.ingest(&obs(2_000, 2, Dir::Egress, out), &lookup);
    if reply {
        let mut r = out;
        std::mem::swap(&mut r.src, &mut r.dst);
        std::mem::swap(&mut r.sport, &mut r.dport);
        r.tcp_flags = 0x12;
        r.seq = 555;
        r.ack = 100;
        t.ingest(&obs(3_000, 2, Dir::Ingress, r), &lookup);
    }
    (t, id)
}

pub static REASONS: std::sync::LazyLock<DropReasons> = std::sync::LazyLock::new(|| {
    DropReasons::from_format(
        "__print_symbolic(REC->reason, { 12, \"NETFILTER_DROP\" }, { 16, \"IP_RPFILTER\" })",
    )
});
pub static SYMBOLS: std::sync::LazyLock<Symbols> = std::sync::LazyLock::new(Symbols::default);
pub static RULES: std::sync::LazyLock<Rules> = std::sync::LazyLock::new(Rules::default);
pub static NO_GAPS: std::sync::LazyLock<Gaps> = std::sync::LazyLock::new(Gaps::default);

pub fn cx<'a>(pools: &'a Pools, facts: &'a NodeFacts, now: u64) -> Context<'a> {
    Context {
        pools,
        facts,
        now_ns: now,
        rules: &RULES,
        reasons: &REASONS,
        symbols: &SYMBOLS,
        gaps: &NO_GAPS,
        too_big: &[],
        answered: &[],
        policy: &NO_POLICY,
        conntrack: &NO_CONNTRACK,
    }
}

/// No conntrack reading yet.
pub static NO_CONNTRACK: std::sync::LazyLock<crate::conntrack::Readings> =
    std::sync::LazyLock::new(Default::default);

/// No datastore: policies are said missing.
pub static NO_POLICY: std::sync::LazyLock<crate::felix_policy::PolicyView> =
    std::sync::LazyLock::new(|| crate::felix_policy::PolicyView {
        policies_missing: Some("no datastore configured (DATASTORE_TYPE)".into()),
        ..Default::default()
    });
pub fn with_rule(mut p: Pools, rule: NatOutgoing) -> Pools {
    p.nat_outgoing_v4 = Some(NatOutgoing { rules: 1, ..rule });
    p
}

/// Judges a pod SYN that left eth0 un-masqueraded, answered or not.
pub fn unmasqueraded(p: &Pools, src: &str, dst: &str, reply: bool) -> Judgement {
    let f = facts();
    let s = syn(src, dst, 6443);
    let (t, id) = flow_of(s, s, reply);
    let flow = t.get(id).unwrap_or_else(|| unreachable!());
    judge(flow, &cx(p, &f, 10_000_000_000))
}
/// A node on the 10.51.0.0/24 underlay (eth0), default route via 10.51.0.1, plus extras.
pub fn underlay_node(node_ip: &str, extra: Vec<Link>) -> NodeFacts {
    let mut f = NodeFacts::default();
    let mut eth0 = Link {
        index: 2,
        name: "eth0".into(),
        kind: None,
        master: None,
        up: true,
        l3: false,
        mtu: None,
        vxlan: None,
        addrs: vec![IfAddr {
            ip: ip(node_ip),
            prefix: 24,
        }],
    };
    eth0.up = true;
    f.links.insert(2, eth0);
    f.links.insert(
        5,
        Link {
            index: 5,
            name: "calid92900560e3".into(),
            kind: Some("veth".into()),
            master: None,
            up: true,
            l3: false,
            mtu: None,
            vxlan: None,
            addrs: vec![],
        },
    );
    for l in extra {
        f.links.insert(l.index, l);
    }
    let cidr = |s: &str| {
        s.parse::<Cidr>()
            .unwrap_or_else(|_| Cidr::host(ip("0.0.0.0")))
    };
    f.routes.push(crate::netlink::Route {
        dst: cidr("0.0.0.0/0"),
        oif: Some(2),
        gateway: Some(ip("10.51.0.1")),
        pref_src: None,
        table: 254,
        blackhole: false,
    });
    f.routes.push(crate::netlink::Route {
        dst: cidr("10.51.0.0/24"),
        oif: Some(2),
        gateway: None,
        pref_src: None,
        table: 254,
        blackhole: false,
    });
    f
}

pub fn lookup2(i: u32) -> std::sync::Arc<Iface> {
    match i {
        2 => Iface::new("eth0", i, Some(Role::Host)),
        3 => Iface::new("eth1", i, Some(Role::Host)),
        5 => Iface::new("calid92900560e3", i, Some(Role::Workload)),
        7 => Iface::new("nerdctl0", i, Some(Role::Host)),
        8 => Iface::new("vxlan.calico", i, Some(Role::Tunnel)),
        o => Iface::unnamed(o),
    }
}
/// A container bridge at 10.4.0.1/24 (seed 003's `nerdctl0`), no ports yet.
pub fn bridge_link(index: u32, name: &str) -> Link {
    Link {
        index,
        name: name.into(),
        kind: Some("bridge".into()),
        master: None,
        up: true,
        l3: false,
        mtu: None,
        vxlan: None,
        addrs: vec![IfAddr {
            ip: ip("10.4.0.1"),
            prefix: 24,
        }],
    }
}

pub fn vxlan_link(parent: u32, local: &str) -> Link {
    Link {
        index: 8,
        name: "vxlan.calico".into(),
        kind: Some("vxlan".into()),
        master: None,
        up: true,
        l3: false,
        mtu: None,
        vxlan: Some(crate::netlink::VxlanInfo {
            vni: Some(4096),
            parent_index: Some(parent),
            local: Some(ip(local)),
            port: Some(4789),
        }),
        addrs: vec![IfAddr {
            ip: ip("10.244.228.128"),
            prefix: 32,
        }],
    }
}

pub fn vxlan_flow(outer_iface: u32, outer_src: &str, outer_dst: &str) -> FlowTable {
    let mut t = FlowTable::new(10);
    let s = syn("10.244.228.139", "10.244.142.36", 8090);
    t.ingest(&obs(1, 5, Dir::Ingress, s), &lookup2);
    t.ingest(&obs(2, 8, Dir::Egress, s), &lookup2);
    let mut o = obs(3, outer_iface, Dir::Egress, syn(outer_src, outer_dst, 4789));
    o.outer.proto = 17;
    o.inner = Some((crate::events::Encap::Vxlan, 4096, s));
    t.ingest(&o, &lookup2);
    t
}
