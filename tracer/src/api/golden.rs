//! Golden answers: the API's exact bytes for synthetic flows that cover every verdict and every
//! cause, compared with the files in tracer/tests/golden/. Those files are the contract: any
//! difference fails. A missing file is written, and `TRACER_BLESS=1` rewrites them all.
//!
//! Everything is fixed: observation times, "now" (pinned with [`FIXED_NOW_NS`]) and the
//! wall-clock anchor, so two runs render the same bytes.
use std::{
    path::PathBuf,
    time::{Duration, UNIX_EPOCH},
};

use serde_json::{json, Value};
use tracer_model::{AttachHow, FlowQuery, Role};

use crate::{
    calico::{NatOutgoing, Pools},
    clock::{Clock, FIXED_NOW_NS},
    diagnose::Rules,
    events::{Dir, Emit, Encap, KernelDrop, Packet},
    flows::CounterRead,
    hooks::TcBackend,
    kernel_names::{DropReasons, Symbols},
    net::{Cidr, IfAddr},
    netlink::{Link, NodeFacts, Route, VxlanInfo},
    state::{DropTracing, Shared, StateConfig},
    testutil::{ip, obs, tcp},
};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// The agent started at 10 s (monotonic), at this wall-clock time.
const START: u64 = 10 * S;
const START_WALL_S: u64 = 1_750_000_000;
/// Flows start at 20 s; every answer is rendered at 100 s.
const T0: u64 = 20 * S;
const NOW: u64 = 100 * S;

const ETH0: u32 = 2;
const ETH1: u32 = 3;
const VETH: u32 = 5;
const BRIDGE: u32 = 7;
const VXLAN: u32 = 8;

/// A case: its name (of its files) and the agent it builds (a node and its traffic).
type Case = (&'static str, fn() -> Shared);

const CASES: &[Case] = &[
    ("snat-applied", snat_applied),
    ("ippool-overlaps-host-network", ippool_overlap),
    ("nat-outgoing-disabled", nat_outgoing_disabled),
    ("masquerade-not-applied", masquerade_not_applied),
    ("snat-excluded", snat_excluded),
    ("kernel-drop", kernel_drop),
    ("denied-by-policy", denied_by_policy),
    ("mtu-mismatch", mtu_mismatch),
    ("snat-port-exhaustion", snat_port_exhaustion),
    ("wrong-source-address", wrong_source_address),
    ("off-link-peer-unacked", off_link_peer_unacked),
    ("wrong-parent-device", wrong_parent_device),
    ("vxlan-healthy", vxlan_healthy),
    ("datastore-latency", datastore_latency),
    ("pod-route-missing", pod_route_missing),
    ("destination-unresponsive", destination_unresponsive),
    ("evidence-incomplete", evidence_incomplete),
    ("ebpf-mode", ebpf_mode),
    // Identity on: endpoints on flows and groups, names in the diagnosis text.
    ("snat-applied-named", || named(snat_applied())),
    ("masquerade-not-applied-named", || {
        named(masquerade_not_applied())
    }),
];

#[test]
fn answers_match_the_golden_files() {
    FIXED_NOW_NS.with(|n| n.set(Some(NOW)));
    let mut answers = Vec::new();
    let (mut verdicts, mut causes) = (Vec::new(), Vec::new());
    for (name, build) in CASES {
        let s = build();
        let all = FlowQuery::parse(None).unwrap_or_else(|e| panic!("{e}"));
        let flows = super::flows_page_json(&s.flows(&all));
        let page: Value = serde_json::from_slice(&flows).unwrap_or_default();
        for f in page["flows"].as_array().into_iter().flatten() {
            verdicts.extend(f["verdicts"].as_array().into_iter().flatten().cloned());
            causes.push(f["diagnosis"]["cause"].clone());
        }
        let newest = page["flows"][0]["id"].as_u64().unwrap_or(0);
        let diagnoses = s.diagnoses();
        for d in &diagnoses.node_findings {
            causes.push(json!(d.cause));
        }
        answers.push((format!("{name}.flows"), flows));
        answers.push((format!("{name}.flow"), bytes(&s.flow(newest))));
        answers.push((format!("{name}.diagnoses"), bytes(&diagnoses)));
    }
    // /healthz and /readyz of a running agent, with and without the token.
    let s = vxlan_healthy();
    s.liveness().reader_beat(NOW - 200 * MS);
    s.liveness().sync_done(NOW - 4 * S);
    s.set_tc_backend(TcBackend::Tcx);
    s.set_drop_tracing(DropTracing {
        enabled: true,
        error: None,
    });
    for (name, detail) in [("", true), ("-open", false)] {
        answers.push((format!("healthz{name}"), bytes(&s.health(detail).1)));
        answers.push((format!("readyz{name}"), bytes(&s.readiness(detail))));
    }
    let ebpf = ebpf_mode();
    ebpf.liveness().reader_beat(NOW - 200 * MS);
    ebpf.liveness().sync_done(NOW - 4 * S);
    answers.push(("healthz-ebpf".into(), bytes(&ebpf.health(true).1)));
    let s = named(s);
    answers.push(("healthz-named".into(), bytes(&s.health(true).1)));
    FIXED_NOW_NS.with(|n| n.set(None));

    for v in tracer_model::Verdict::ALL {
        assert!(verdicts.contains(&json!(v)), "no case has verdict {v}");
    }
    for c in tracer_model::Cause::ALL {
        assert!(causes.contains(&json!(c)), "no case has cause {c}");
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("TRACER_BLESS").is_some_and(|v| v == "1");
    let mut failed = Vec::new();
    for (name, got) in answers {
        let path = dir.join(format!("{name}.json"));
        match std::fs::read(&path) {
            Ok(want) if !bless => {
                if want != got {
                    failed.push(mismatch(&path, &want, &got));
                }
            }
            _ => {
                std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
                std::fs::write(&path, &got).unwrap_or_else(|e| panic!("{e}"));
                eprintln!("golden: wrote {}", path.display());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{}\n{} answer(s) differ from the golden files. If the change is intended (an API \
         change, documented), rerun with TRACER_BLESS=1 and commit the files.",
        failed.join("\n"),
        failed.len()
    );
}

/// The body the API sends for an answer other than `/flows`.
fn bytes(v: &impl serde::Serialize) -> Vec<u8> {
    super::sorted_json(v)
}

/// Where two answers part, with some context of each.
fn mismatch(path: &std::path::Path, want: &[u8], got: &[u8]) -> String {
    let at = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let around = |b: &[u8]| {
        let from = at.saturating_sub(80);
        String::from_utf8_lossy(&b[from..(at + 80).min(b.len())]).into_owned()
    };
    format!(
        "{}: differs at byte {at}\n  want ...{}...\n  got  ...{}...",
        path.display(),
        around(want),
        around(got)
    )
}

// ---- nodes ----

fn link(index: u32, name: &str, kind: Option<&str>, addr: Option<(&str, u8)>) -> Link {
    Link {
        index,
        name: name.into(),
        kind: kind.map(str::to_string),
        master: None,
        up: true,
        l3: false,
        mtu: None,
        vxlan: None,
        addrs: addr
            .map(|(a, prefix)| IfAddr { ip: ip(a), prefix })
            .into_iter()
            .collect(),
    }
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap_or_else(|_| Cidr::host(ip("0.0.0.0")))
}

fn route(dst: &str, gateway: Option<&str>) -> Route {
    Route {
        dst: cidr(dst),
        oif: Some(ETH0),
        gateway: gateway.map(ip),
        pref_src: None,
        table: 254,
        blackhole: false,
    }
}

/// A node with `eth0` at `node_ip`/24 (and routes: that subnet, default via `gateway`), a
/// pod's veth, and `extra` links.
fn node(node_ip: &str, gateway: Option<&str>, extra: Vec<Link>) -> NodeFacts {
    let mut f = NodeFacts::default();
    for l in [
        link(ETH0, "eth0", None, Some((node_ip, 24))),
        link(VETH, "calid92900560e3", Some("veth"), None),
    ]
    .into_iter()
    .chain(extra)
    {
        f.links.insert(l.index, l);
    }
    if let Some(gw) = gateway {
        let net = node_ip.rsplit_once('.').map_or(node_ip, |(net, _)| net);
        f.routes = vec![
            route("0.0.0.0/0", Some(gw)),
            route(&format!("{net}.0/24"), None),
        ];
    }
    f
}

fn pools(all: &[&str], masq: &[&str]) -> Pools {
    Pools {
        all: all.iter().map(|c| cidr(c)).collect(),
        masq: masq.iter().map(|c| cidr(c)).collect(),
        source: "ipset".into(),
        ..Pools::default()
    }
}

fn vxlan_link(parent: u32, local: &str) -> Link {
    Link {
        vxlan: Some(VxlanInfo {
            vni: Some(4096),
            parent_index: Some(parent),
            local: Some(ip(local)),
            port: Some(4789),
        }),
        ..link(
            VXLAN,
            "vxlan.calico",
            Some("vxlan"),
            Some(("10.244.228.128", 32)),
        )
    }
}

/// An agent on `facts` and `pools`, traced interfaces attached, clock anchored.
fn agent(facts: NodeFacts, pools: Pools, rules: Rules) -> Shared {
    let mut s = Shared::new(&StateConfig {
        rules,
        ..StateConfig::default()
    });
    s.anchor_clock(Clock::anchored(
        START,
        UNIX_EPOCH + Duration::from_secs(START_WALL_S),
    ));
    s.preload_symbols(Symbols::default());
    s.set_reasons(DropReasons::from_format(
        "__print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 12, \"NETFILTER_DROP\" })",
    ));
    let attached = [
        (ETH0, "eth0", Role::Host),
        (ETH1, "eth1", Role::Host),
        (VETH, "calid92900560e3", Role::Workload),
        (BRIDGE, "nerdctl0", Role::Host),
        (VXLAN, "vxlan.calico", Role::Tunnel),
    ]
    .into_iter()
    .filter(|(i, ..)| facts.links.contains_key(i))
    .map(|(ifindex, name, role)| crate::hooks::AttachedIface {
        ifindex,
        name: name.into(),
        role,
        how: AttachHow::Auto,
    })
    .collect();
    s.update_node(facts, pools, attached);
    s
}

// ---- traffic ----

/// A SYN; its sequence number and IP ID follow the source port, so that two flows' packets
/// never look like one packet translated.
fn syn(src: &str, sport: u16, dst: &str, dport: u16) -> Packet {
    Packet {
        ip_id: sport,
        ..tcp(src, sport, dst, dport, 0x02, u32::from(sport) * 10, 0)
    }
}

/// `p` the other way, with `flags`.
fn back(p: Packet, flags: u8) -> Packet {
    Packet {
        src: p.dst,
        dst: p.src,
        sport: p.dport,
        dport: p.sport,
        tcp_flags: flags,
        seq: 5000,
        ack: p.seq + 1,
        ..p
    }
}

/// Observations `(ms after T0, interface, direction, packet)`.
fn send(s: &Shared, seen: &[(u64, u32, Dir, Packet)]) {
    let batch: Vec<_> = seen
        .iter()
        .map(|&(ms, i, d, p)| obs(T0 + ms * MS, i, d, p))
        .collect();
    s.ingest(&batch, 0);
}

/// A pod's SYN at its veth, leaving eth0 as `out`, answered or not.
fn pod_syn(s: &Shared, pod: Packet, out: Packet, answered: bool) {
    send(
        s,
        &[(0, VETH, Dir::Ingress, pod), (1, ETH0, Dir::Egress, out)],
    );
    if answered {
        send(
            s,
            &[
                (3, ETH0, Dir::Ingress, back(out, 0x12)),
                (4, VETH, Dir::Egress, back(pod, 0x12)),
            ],
        );
    }
}

const POD: &str = "10.244.1.10";

/// `s` with identity on, as read from a datastore at 90 s: the pod, this node (NODENAME
/// `node-a`) and the master.
fn named(s: Shared) -> Shared {
    use std::sync::Arc;

    use tracer_model::identity::{Endpoint, IdentitySource, NodeRef, PodRef, Workload};

    use crate::identity::{Book, Identities, Kind, Object};
    let mut book = Book::default();
    let pod = Endpoint::Pod(PodRef {
        namespace: "shop".into(),
        name: "web-5d8f-x2x7q".into(),
        workload: Some(Workload {
            kind: "ReplicaSet".into(),
            name: "web-5d8f".into(),
        }),
        node: Some("node-a".into()),
        labels: [("app".to_string(), "web".to_string())].into(),
    });
    for (kind, key, addr, ep) in [
        (Kind::Pod, "shop/web-5d8f-x2x7q", POD, pod),
        (
            Kind::Node,
            "node-a",
            "192.168.21.10",
            Endpoint::Node(NodeRef {
                name: "node-a".into(),
            }),
        ),
        (
            Kind::Node,
            "master",
            "192.168.21.11",
            Endpoint::Node(NodeRef {
                name: "master".into(),
            }),
        ),
    ] {
        book.upsert(
            kind,
            key.into(),
            Object {
                ips: vec![ip(addr)],
                endpoint: Arc::new(ep),
            },
        );
    }
    let ids = Identities::new(IdentitySource::Kubernetes, Some("node-a"));
    FIXED_NOW_NS.with(|n| {
        let was = n.replace(Some(90 * S));
        ids.publish(&book, "test");
        n.set(was);
    });
    s.set_identities(Arc::new(ids));
    s
}

// ---- cases ----

fn snat_applied() -> Shared {
    let s = agent(
        node("192.168.21.10", None, vec![]),
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    let pod = syn(POD, 40000, "192.168.21.11", 6443);
    // Masqueraded: same packet (sequence number, IP ID), the node's address and port.
    let out = Packet {
        src: ip("192.168.21.10"),
        sport: 61000,
        ..pod
    };
    pod_syn(&s, pod, out, true);
    // The handshake completes and one request is answered, at eth0.
    let mut ack = out;
    (ack.tcp_flags, ack.seq) = (0x10, out.seq + 1);
    let mut req = out;
    (req.tcp_flags, req.seq, req.payload_len) = (0x18, out.seq + 1, 120);
    let mut resp = back(req, 0x18);
    resp.payload_len = 900;
    send(
        &s,
        &[
            (5, ETH0, Dir::Egress, ack),
            (6, ETH0, Dir::Egress, req),
            (9, ETH0, Dir::Ingress, resp),
        ],
    );
    s
}

fn ippool_overlap() -> Shared {
    let s = agent(
        node("192.168.21.10", None, vec![]),
        pools(&["192.168.0.0/16"], &["192.168.0.0/16"]),
        Rules::default(),
    );
    let p = syn("192.168.236.10", 40000, "192.168.21.11", 6443);
    pod_syn(&s, p, p, false);
    s
}

/// Seed 002's flow on a node whose felix runs its eBPF dataplane: what cannot be trusted
/// there is turned off (and said so), not diagnosed.
fn ebpf_mode() -> Shared {
    let mut p = pools(&["192.168.0.0/16"], &["192.168.0.0/16"]);
    p.ebpf = Some(crate::felix_bpf::EbpfMode {
        pinned_maps: vec!["/sys/fs/bpf/tc/globals/cali_v4_routes".into()],
        programs: vec![crate::felix_bpf::FelixProgram {
            iface: "eth0".into(),
            dir: tracer_model::Dir::Ingress,
            program: crate::felix_bpf::PREAMBLE_PROG.into(),
            tracer_first: Some(true),
        }],
    });
    let s = agent(node("192.168.21.10", None, vec![]), p, Rules::default());
    let p = syn("192.168.236.10", 40000, "192.168.21.11", 6443);
    pod_syn(&s, p, p, false);
    s
}

fn nat_outgoing_disabled() -> Shared {
    let s = agent(
        node("192.168.21.10", None, vec![]),
        pools(&["10.244.0.0/16"], &[]),
        Rules::default(),
    );
    let p = syn(POD, 40000, "8.8.8.8", 53);
    pod_syn(&s, p, p, false);
    // A routable pod network: un-NATed and answered is no fault.
    let p = syn(POD, 40001, "1.1.1.1", 443);
    pod_syn(&s, p, p, true);
    s
}

fn masquerade_not_applied() -> Shared {
    let s = agent(
        node("192.168.21.10", None, vec![]),
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    let p = syn(POD, 40000, "8.8.8.8", 443);
    pod_syn(&s, p, p, false);
    s
}

fn snat_excluded() -> Shared {
    let mut p = pools(&["10.244.0.0/16"], &["10.244.0.0/16"]);
    p.nat_outgoing_v4 = Some(NatOutgoing {
        rules: 1,
        pool_set: Some("cali40all-ipam-pools".into()),
        excludes_host_ips: true,
        ..NatOutgoing::default()
    });
    p.host_nets_v4 = Some(vec![cidr("192.168.21.11/32")]);
    let s = agent(node("192.168.21.10", None, vec![]), p, Rules::default());
    let a = syn(POD, 40000, "192.168.21.11", 6443);
    pod_syn(&s, a, a, true);
    // Unanswered: the destination's fault, with the exclusion noted.
    let b = syn(POD, 40001, "192.168.21.11", 10250);
    pod_syn(&s, b, b, false);
    s
}

fn kernel_drop() -> Shared {
    let s = agent(
        node("192.168.21.10", None, vec![]),
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    let p = syn(POD, 40000, "10.244.2.20", 8080);
    let mut dropped = obs(T0 + MS, VETH, Dir::Ingress, p);
    dropped.drop = Some(KernelDrop {
        reason: 12,
        location: 0,
    });
    s.ingest(&[obs(T0, VETH, Dir::Ingress, p), dropped], 0);
    s
}

/// The same drop, with a GlobalNetworkPolicy in tier `security` whose egress Deny rule's
/// counter (felix's chain for it, computed from the policy) moved with the drop.
fn denied_by_policy() -> Shared {
    use crate::felix_policy::{parse_policy, FilterRule, PolicyKind, PolicySet};
    use tracer_model::{diagnosis::PolicyDirection, identity::IdentitySource};
    let s = kernel_drop();
    let ids = crate::identity::Identities::new(IdentitySource::Etcdv3, Some("node-a"));
    let gnp = parse_policy(
        PolicyKind::GlobalNetworkPolicy,
        r#"{"metadata":{"name":"security.deny-8080"},"spec":{"tier":"security","egress":[
            {"action":"Allow","protocol":"UDP","destination":{"ports":[53]}},
            {"action":"Deny","protocol":"TCP","destination":{"ports":[8080]}}]}}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let chain = gnp.chain(PolicyDirection::Egress);
    ids.publish_policies(PolicySet::new([gnp]));
    s.set_identities(std::sync::Arc::new(ids));
    let rules = |dropped| {
        let rule = FilterRule::bare;
        vec![
            rule("cali-fw-calid92900560e3", 1, 1, &chain),
            rule(&chain, 4, dropped, "DROP"),
        ]
    };
    s.record_policy_counters(T0 - S, Ok(rules(0)));
    s.record_policy_counters(T0 + 500 * MS, Ok(rules(1)));
    s
}

/// felix's natOutgoing rule with natPortRange 40000:40001: a pod's SYN to an address outside
/// the pools is seen on its veth only (conntrack dropped it), and `insert_failed` moved.
fn snat_port_exhaustion() -> Shared {
    use crate::calico::NatOutgoing;
    let s = agent(
        node("192.168.21.10", Some("192.168.21.1"), vec![]),
        Pools {
            nat_outgoing_v4: Some(NatOutgoing {
                rules: 3,
                pool_set: Some("cali40all-ipam-pools".into()),
                action: Some("MASQUERADE".into()),
                port_range: Some("40000-40001".into()),
                random_fully: true,
                ..NatOutgoing::default()
            }),
            ..pools(&["10.244.0.0/16"], &["10.244.0.0/16"])
        },
        Rules::default(),
    );
    let p = syn(POD, 40000, "203.0.113.7", 443);
    let mut again = obs(T0 + 1000 * MS, VETH, Dir::Ingress, p);
    again.emit = Emit::Retransmit;
    s.ingest(&[obs(T0, VETH, Dir::Ingress, p), again], 0);
    let read = crate::conntrack::test_stats;
    s.record_conntrack(T0 - 100 * MS, read(4));
    s.record_conntrack(T0 + 150 * MS, read(5));
    s.record_conntrack(T0 + 1150 * MS, read(6));
    s.record_conntrack(NOW - 100 * MS, read(6));
    s
}

/// A pod whose MTU (1500) is above vxlan.calico's (1450): the handshake passes, a full-size
/// segment is sent again and again; the node's frag-needed to the pod is seen on its veth.
fn mtu_mismatch() -> Shared {
    let mut vx = vxlan_link(ETH0, "10.51.0.100");
    vx.mtu = Some(1450);
    let mut f = node("10.51.0.100", Some("10.51.0.1"), vec![vx]);
    for l in f.links.values_mut() {
        l.mtu = l.mtu.or(Some(1500));
    }
    let s = agent(
        f,
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    let p = vxlan_syn(&s, ETH0, "10.51.0.100", "10.51.0.101");
    send(&s, &[(4, VETH, Dir::Egress, back(p, 0x12))]);
    let data = Packet {
        tcp_flags: 0x18,
        seq: p.seq + 1,
        ack: 5001,
        payload_len: 1448,
        ..p
    };
    let too_big = Packet {
        proto: 1,
        sport: 0,
        dport: 0x0304,
        seq: 1450,
        ack: 0,
        tcp_flags: 0,
        payload_len: 0,
        ..syn("10.51.0.100", 0, "10.244.228.139", 0)
    };
    let mut seen = vec![obs(T0 + 10 * MS, VETH, Dir::Ingress, data)];
    seen.push(obs(T0 + 11 * MS, VETH, Dir::Egress, too_big));
    for n in 1..=3 {
        let mut o = obs(T0 + (200 * n) * MS, VETH, Dir::Ingress, data);
        o.emit = Emit::Retransmit;
        seen.push(o);
    }
    s.ingest(&seen, 0);
    s
}

/// Seed 004: BGP dialled from a second NIC's address.
fn wrong_source_address() -> Shared {
    let eth1 = link(ETH1, "eth1", None, Some(("10.0.0.66", 24)));
    let s = agent(
        node("10.51.0.101", Some("10.51.0.1"), vec![eth1]),
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    let p = syn("10.0.0.66", 40000, "10.51.0.100", 179);
    send(&s, &[(0, ETH0, Dir::Egress, p)]);
    s
}

/// Seed 004, the passive side: an off-link peer never acknowledges the SYN-ACK.
fn off_link_peer_unacked() -> Shared {
    let s = agent(
        node("10.51.0.100", Some("10.51.0.1"), vec![]),
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    let p = syn("10.66.0.66", 40000, "10.51.0.100", 179);
    send(
        &s,
        &[
            (0, ETH0, Dir::Ingress, p),
            (1, ETH0, Dir::Egress, back(p, 0x12)),
        ],
    );
    s
}

/// A pod's SYN through vxlan.calico, the outer packet leaving `outer_iface`.
fn vxlan_syn(s: &Shared, outer_iface: u32, outer_src: &str, outer_dst: &str) -> Packet {
    let p = syn("10.244.228.139", 40000, "10.244.142.36", 8090);
    let mut outer = obs(
        T0 + 2 * MS,
        outer_iface,
        Dir::Egress,
        syn(outer_src, 51000, outer_dst, 4789),
    );
    outer.outer.proto = 17;
    outer.inner = Some((Encap::Vxlan, 4096, p));
    s.ingest(
        &[
            obs(T0, VETH, Dir::Ingress, p),
            obs(T0 + MS, VXLAN, Dir::Egress, p),
            outer,
        ],
        0,
    );
    p
}

/// Seed 003: the VXLAN parent is a container bridge.
fn wrong_parent_device() -> Shared {
    let bridge = link(BRIDGE, "nerdctl0", Some("bridge"), Some(("10.4.0.1", 24)));
    let port = Link {
        master: Some(BRIDGE),
        ..link(9, "veth-ctr", Some("veth"), None)
    };
    let s = agent(
        node(
            "10.51.0.101",
            Some("10.51.0.1"),
            vec![bridge, port, vxlan_link(BRIDGE, "10.4.0.1")],
        ),
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    vxlan_syn(&s, BRIDGE, "10.4.0.1", "10.51.0.100");
    s
}

fn vxlan_healthy() -> Shared {
    let s = agent(
        node(
            "10.51.0.100",
            Some("10.51.0.1"),
            vec![vxlan_link(ETH0, "10.51.0.100")],
        ),
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    let p = vxlan_syn(&s, ETH0, "10.51.0.100", "10.51.0.101");
    send(&s, &[(4, VETH, Dir::Egress, back(p, 0x12))]);
    s
}

/// Seed 001: etcd 150 ms away, with calico-node's liveness budget known.
fn datastore_latency() -> Shared {
    let s = agent(
        node("10.51.0.100", Some("10.51.0.1"), vec![]),
        pools(&[], &[]),
        Rules {
            liveness_budget_ns: Some(3 * S),
            ..Rules::default()
        },
    );
    let p = syn("10.51.0.100", 40000, "10.51.0.10", 2379);
    let mut seen = vec![
        (0, ETH0, Dir::Egress, p),
        (1, ETH0, Dir::Ingress, back(p, 0x12)),
    ];
    for i in 0..20u32 {
        let at = 2 + 151 * u64::from(i);
        let mut q = p;
        (q.tcp_flags, q.seq, q.payload_len) = (0x18, 10 + i, 80);
        let mut a = back(p, 0x18);
        (a.seq, a.payload_len) = (100 + i, 400);
        seen.extend([
            (at, ETH0, Dir::Egress, q),
            (at + 150, ETH0, Dir::Ingress, a),
        ]);
    }
    send(&s, &seen);
    s
}

fn pod_route_missing() -> Shared {
    let s = agent(
        node("10.51.0.100", Some("10.51.0.1"), vec![]),
        pools(&["10.244.0.0/16"], &["10.244.0.0/16"]),
        Rules::default(),
    );
    let p = syn("10.244.142.36", 40000, "10.244.228.139", 8090);
    pod_syn(&s, p, p, false);
    s
}

fn destination_unresponsive() -> Shared {
    let s = agent(
        node("192.168.21.10", None, vec![]),
        pools(&[], &[]),
        Rules::default(),
    );
    let p = syn("192.168.21.10", 40000, "192.168.21.50", 2379);
    send(&s, &[(0, ETH0, Dir::Egress, p)]);
    s
}

/// The ring overflowed while the reply was due.
fn evidence_incomplete() -> Shared {
    let s = destination_unresponsive();
    let mut gaps = s.gaps_mut();
    gaps.look(T0 - S, CounterRead::at(T0 - S, 0));
    gaps.look(T0 + 2 * S, CounterRead::at(T0 + 2 * S, 7));
    drop(gaps);
    s
}
