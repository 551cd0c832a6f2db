//! The kernel programs themselves, fed crafted frames through BPF_PROG_TEST_RUN: parsing of
//! Ethernet/IPv4/IPv6/TCP/UDP/ICMP, VXLAN and IPIP inner packets, malformed input, in-kernel
//! summarisation, and the observe-only verdict. No packet leaves the test.
use std::net::{IpAddr, Ipv4Addr};

mod common;

use aya::maps::{MapData, RingBuf};
use tracer::{
    events::{decode, Emit, Encap, Observation},
    hooks::Hooks,
    synth::{ether, ether_with, ip_packet, ipip, vxlan, L4},
};

type R = Result<(), Box<dyn std::error::Error>>;

/// TCX_NEXT / TC_ACT_UNSPEC (-1) as BPF_PROG_TEST_RUN reports it: "hand it on", the only
/// verdict tracer ever returns.
const PASS_ON: u32 = tracer_common::TC_PASS_ON as u32;
const LOOPBACK_IFINDEX: u32 = 1;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// Moves this test's thread onto `cpu`: BPF_PROG_TEST_RUN runs the program on the calling CPU,
/// and the flow cache in front of FLOWS is per CPU.
fn on_cpu(cpu: usize) -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET bounds-checks `cpu`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the set is a valid cpu_set_t of the size given.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(format!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// Loads the programs with this test's thread kept on the CPU it runs on now, so the packets of
/// a test meet one CPU's flow cache (the tests of the cache itself move on purpose).
fn load(
    summary_interval_ns: u64,
) -> Result<(Hooks, RingBuf<MapData>, tracer::hooks::KernelCounters), Box<dyn std::error::Error>> {
    // SAFETY: no arguments; -1 on failure.
    let cpu = unsafe { libc::sched_getcpu() };
    on_cpu(usize::try_from(cpu).map_err(|_| "sched_getcpu failed")?)?;
    Ok(Hooks::load(summary_interval_ns)?)
}

fn drain(ring: &mut RingBuf<MapData>) -> Vec<Observation> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if let Ok(o) = decode(&item) {
            out.push(o);
        }
    }
    out
}

fn run(
    hooks: &mut Hooks,
    ring: &mut RingBuf<MapData>,
    egress: bool,
    frame: &[u8],
) -> Result<Vec<Observation>, Box<dyn std::error::Error>> {
    let verdict = hooks.test_run(egress, frame, 1)?;
    assert_eq!(verdict, PASS_ON, "tracer must never drop or redirect");
    Ok(drain(ring))
}

fn tcp(sport: u16, dport: u16, flags: u8, seq: u32, payload: usize) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags,
        seq,
        ack: 0,
        payload,
    }
}

#[test]
fn parses_every_layer_the_agent_needs() -> R {
    let (mut hooks, mut ring, _counters) = load(1_000_000_000)?;
    hooks.set_test_l3(false);

    // TCP SYN over IPv4.
    let syn = ether(&ip_packet(
        ip("192.168.236.10"),
        ip("10.96.0.1"),
        0x4242,
        tcp(59894, 443, 0x02, 123_456, 0),
    ));
    let o = run(&mut hooks, &mut ring, false, &syn)?;
    assert_eq!(o.len(), 1);
    let p = o[0].packet();
    assert_eq!(
        (p.src, p.dst, p.sport, p.dport),
        (ip("192.168.236.10"), ip("10.96.0.1"), 59894, 443)
    );
    assert_eq!(
        (p.proto, p.tcp_flags, p.seq, p.ip_id, p.ttl),
        (6, 0x02, 123_456, 0x4242, 64)
    );
    assert_eq!(o[0].emit, Emit::First);
    assert_eq!(o[0].ifindex, LOOPBACK_IFINDEX);
    assert_eq!(o[0].len as usize, syn.len());

    // Every TCP field the agent reads, over IPv4 and IPv6 (each header is read as the words it
    // is made of: a field at the wrong offset or in the wrong byte order shows here).
    for (src, dst, ip_id) in [
        (ip("192.168.236.11"), ip("10.96.0.2"), 0xbeef),
        (ip("fd00:10:244::7"), ip("fd00:10:96::a"), 0),
    ] {
        let seg = ether(&ip_packet(
            src,
            dst,
            ip_id,
            L4::Tcp {
                sport: 0xa1b2,
                dport: 0x0c0d,
                flags: 0x18,
                seq: 0x0102_0304,
                ack: 0xf1e2_d3c4,
                payload: 321,
            },
        ));
        let o = run(&mut hooks, &mut ring, false, &seg)?;
        assert_eq!(o.len(), 1, "{src}");
        let p = o[0].packet();
        assert_eq!(
            (p.src, p.dst, p.sport, p.dport, p.proto),
            (src, dst, 0xa1b2, 0x0c0d, 6)
        );
        assert_eq!(
            (p.seq, p.ack, p.tcp_flags, p.payload_len, p.ip_id, p.ttl),
            (0x0102_0304, 0xf1e2_d3c4, 0x18, 321, ip_id, 64),
            "{src}"
        );
    }

    // UDP over IPv6, egress direction.
    let u6 = ether(&ip_packet(
        ip("fd00::1"),
        ip("fd00::2"),
        0,
        L4::Udp {
            sport: 5353,
            dport: 53,
            payload: 12,
        },
    ));
    let o = run(&mut hooks, &mut ring, true, &u6)?;
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].dir, tracer::events::Dir::Egress);
    let p = o[0].packet();
    assert_eq!(
        (p.src, p.dport, p.proto, p.payload_len),
        (ip("fd00::1"), 53, 17, 12)
    );

    // ICMP echo: identifier in sport, type<<8|code in dport.
    let echo = ether(&ip_packet(
        ip("10.0.0.1"),
        ip("10.0.0.2"),
        7,
        L4::Echo {
            icmp_type: 8,
            id: 0x77,
            seq: 3,
        },
    ));
    let o = run(&mut hooks, &mut ring, false, &echo)?;
    assert_eq!(
        (
            o[0].packet().proto,
            o[0].packet().sport,
            o[0].packet().dport
        ),
        (1, 0x77, 8 << 8)
    );
    assert_eq!(o[0].packet().seq, 3);

    // VXLAN as vxlan.calico sends it between nodes: outer UDP 4789 and the inner pod packet.
    let inner = ether(&ip_packet(
        ip("10.244.1.10"),
        ip("10.244.2.20"),
        9,
        tcp(40000, 8080, 0x02, 1, 0),
    ));
    let vx = ether(&vxlan(
        v4("192.168.21.10"),
        v4("192.168.21.12"),
        51234,
        4096,
        &inner,
    ));
    let o = run(&mut hooks, &mut ring, true, &vx)?;
    assert_eq!(o.len(), 1);
    let (encap, vni, inner_p) = o[0].inner.ok_or("no inner packet")?;
    assert_eq!((encap, vni), (Encap::Vxlan, 4096));
    assert_eq!(
        (inner_p.src, inner_p.dst, inner_p.dport),
        (ip("10.244.1.10"), ip("10.244.2.20"), 8080)
    );
    assert_eq!(
        (o[0].outer.src, o[0].outer.dport, o[0].outer.proto),
        (ip("192.168.21.10"), 4789, 17)
    );

    // IPIP (this kernel has no tunl0: the encapsulated frame is injected instead).
    let inner_ip = ip_packet(
        ip("10.244.1.10"),
        ip("10.244.3.30"),
        11,
        tcp(40001, 80, 0x02, 5, 0),
    );
    let o = run(
        &mut hooks,
        &mut ring,
        true,
        &ether(&ipip(v4("172.17.73.65"), v4("172.17.73.66"), &inner_ip)),
    )?;
    let (encap, _, inner_p) = o[0].inner.ok_or("no inner packet")?;
    assert_eq!(encap, Encap::Ipip);
    assert_eq!((inner_p.dst, inner_p.dport), (ip("10.244.3.30"), 80));
    assert_eq!(o[0].outer.proto, 4);

    // A device without Ethernet (tunl0, wireguard.cali): the frame starts at the IP header.
    hooks.set_test_l3(true);
    let raw = ip_packet(
        ip("10.244.1.10"),
        ip("10.244.9.9"),
        12,
        tcp(40002, 443, 0x02, 77, 0),
    );
    // The test run hands the program the bytes from offset 0, as tunl0's tc hook would.
    let o = run(&mut hooks, &mut ring, false, &raw)?;
    assert_eq!(o.len(), 1, "L3 device frame parsed from offset 0");
    assert_eq!(o[0].packet().dst, ip("10.244.9.9"));
    hooks.set_test_l3(false);
    Ok(())
}

#[test]
fn fragments_and_big_tcp_are_read_for_what_they_are() -> R {
    let (mut hooks, mut ring, counters) = load(1_000_000_000)?;
    hooks.set_test_l3(false);
    let before = counters.read().malformed;

    // A non-first fragment of an IPIP datagram whose bytes happen to look like an IPv4 header:
    // it is the middle of a datagram, never an inner packet.
    let inner = ip_packet(
        ip("10.9.0.1"),
        ip("10.9.0.2"),
        7,
        tcp(1111, 2222, 0x02, 1, 0),
    );
    let mut frag = ipip(v4("192.168.21.10"), v4("192.168.21.12"), &inner);
    frag[6] = 0x00;
    frag[7] = 0x10; // fragment offset 16 (x8 bytes), not the first
    let o = run(&mut hooks, &mut ring, false, &ether(&frag))?;
    assert_eq!(o.len(), 1, "the fragment itself is recorded");
    assert!(
        o[0].inner.is_none(),
        "no inner packet read from a fragment: {o:?}"
    );
    assert_eq!((o[0].outer.sport, o[0].outer.dport), (0, 0));

    // A non-first UDP fragment whose bytes at the "port" offset say 4789: not VXLAN, no ports.
    let vx = vxlan(
        v4("192.168.21.10"),
        v4("192.168.21.12"),
        4000,
        4096,
        &ether(&inner),
    );
    let mut frag = vx.clone();
    frag[4] = 0x00;
    frag[5] = 0x09; // another datagram: a new IP ID
    frag[7] = 0x20;
    let o = run(&mut hooks, &mut ring, false, &ether(&frag))?;
    assert_eq!(o.len(), 1);
    assert!(o[0].inner.is_none() && o[0].outer.dport == 0, "{o:?}");

    // IPv4 BIG TCP: total length 0 on a GSO packet; the length is the frame's.
    let mut big = ip_packet(
        ip("10.0.0.1"),
        ip("10.0.0.2"),
        3,
        tcp(5000, 80, 0x18, 9, 1000),
    );
    big[2] = 0;
    big[3] = 0;
    let o = run(&mut hooks, &mut ring, false, &ether(&big))?;
    assert_eq!(
        o.len(),
        1,
        "a BIG TCP packet is a packet, not a malformed frame"
    );
    assert_eq!(o[0].outer.payload_len, 1000);
    assert_eq!(counters.read().malformed, before);
    Ok(())
}

#[test]
fn malformed_frames_are_counted_not_recorded() -> R {
    let (mut hooks, mut ring, counters) = load(1_000_000_000)?;
    hooks.set_test_l3(false);
    let before = counters.read();

    let good = ip_packet(ip("10.0.0.1"), ip("10.0.0.2"), 1, tcp(1, 2, 0x02, 3, 0));
    // IHL claims 60 bytes of header; the packet ends before the transport header it implies.
    // (A header shorter than 20 bytes is refused by BPF_PROG_TEST_RUN itself.)
    let mut long_ihl = good.clone();
    long_ihl[0] = 0x4f;
    assert!(run(&mut hooks, &mut ring, false, &ether(&long_ihl))?.is_empty());
    // IHL of 3 words (less than the minimum 5).
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x43;
    assert!(run(&mut hooks, &mut ring, false, &ether(&bad_ihl))?.is_empty());
    // Version nibble lies (says 6 in an IPv4 ethertype).
    let mut bad_ver = good.clone();
    bad_ver[0] = 0x65;
    assert!(run(
        &mut hooks,
        &mut ring,
        false,
        &ether_with(pnet_packet::ethernet::EtherTypes::Ipv4, &bad_ver)
    )?
    .is_empty());
    // TCP header cut short.
    assert!(run(&mut hooks, &mut ring, false, &ether(&good[..30]))?.is_empty());
    let after = counters.read();
    assert_eq!(
        after.malformed - before.malformed,
        4,
        "{before:?} -> {after:?}"
    );

    // ARP is not IP: skipped without being called malformed.
    let arp = ether_with(pnet_packet::ethernet::EtherTypes::Arp, &[0u8; 28]);
    assert!(run(&mut hooks, &mut ring, false, &arp)?.is_empty());
    assert_eq!(counters.read().malformed, after.malformed);

    // VXLAN whose inner frame is garbage: the outer packet is still recorded, the inner counted.
    let vx = ether(&vxlan(
        v4("192.168.21.10"),
        v4("192.168.21.12"),
        4000,
        4096,
        &[0xff; 20],
    ));
    let o = run(&mut hooks, &mut ring, true, &vx)?;
    assert_eq!(o.len(), 1);
    assert!(o[0].inner.is_none());
    assert_eq!(o[0].outer.dport, 4789);
    assert_eq!(counters.read().malformed, after.malformed + 1);

    // Random bytes of every small length never break the program.
    let mut seed = 0x9e37_79b9u32;
    for len in 14..200usize {
        let frame: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        assert_eq!(hooks.test_run(false, &frame, 1)?, PASS_ON);
    }
    drain(&mut ring);
    Ok(())
}

#[test]
fn bulk_flow_is_summarised_in_kernel() -> R {
    // A long summary interval so only first/control/retransmit records are emitted.
    let (mut hooks, mut ring, _counters) = load(60_000_000_000)?;
    hooks.set_test_l3(false);
    let data = |seq: u32| {
        ether(&ip_packet(
            ip("10.1.0.1"),
            ip("10.1.0.2"),
            5,
            tcp(33000, 5201, 0x10, seq, 1000),
        ))
    };

    let o = run(&mut hooks, &mut ring, false, &data(1000))?;
    assert_eq!(
        o.len(),
        1,
        "first packet of the flow on this hook is reported"
    );
    for i in 1..=200u32 {
        hooks.test_run(false, &data(1000 + i * 1000), 1)?;
    }
    assert!(drain(&mut ring).is_empty(), "in-order data is only counted");

    // Sequence going backwards with payload looks like a retransmission: reported, with the
    // packets counted since the last record.
    let o = run(&mut hooks, &mut ring, false, &data(5000))?;
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].emit, Emit::Retransmit);
    assert_eq!(o[0].pkts, 201);

    // FIN is always reported.
    let fin = ether(&ip_packet(
        ip("10.1.0.1"),
        ip("10.1.0.2"),
        5,
        tcp(33000, 5201, 0x11, 300_000, 0),
    ));
    let o = run(&mut hooks, &mut ring, false, &fin)?;
    assert_eq!((o.len(), o[0].emit), (1, Emit::TcpControl));

    // The same flow on the other hook (egress) is its own first record.
    let o = run(&mut hooks, &mut ring, true, &data(400_000))?;
    assert_eq!((o.len(), o[0].emit), (1, Emit::First));
    Ok(())
}

/// The CPUs the test may run on, when there are two: the flow cache tests need both.
fn two_cpus() -> Option<(usize, usize)> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it for this thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return None;
    }
    let mut cpus = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
    Some((cpus.next()?, cpus.next()?))
}

/// FLOWS' key of a TCP segment the ingress test program sees, as the kernel builds it.
fn ingress_key(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> tracer_common::FlowKey {
    let addr = |a: Ipv4Addr| {
        let mut r = [0u8; 16];
        r[..4].copy_from_slice(&a.octets());
        r
    };
    tracer_common::FlowKey {
        src: addr(src),
        dst: addr(dst),
        sport,
        dport,
        ifindex: LOOPBACK_IFINDEX,
        proto: tracer_common::PROTO_TCP,
        dir: tracer_common::Direction::Ingress as u8,
        encap: 0,
        _pad: 0,
    }
}

#[test]
fn a_flow_seen_on_two_cpus_is_counted_once() -> R {
    let Some((a, b)) = two_cpus() else {
        eprintln!("SKIP: one CPU; a flow cannot move between CPUs here");
        return Ok(());
    };
    let (mut hooks, mut ring, _counters) = load(60_000_000_000)?;
    hooks.set_test_l3(false);
    let seg = |seq: u32, flags: u8| {
        ether(&ip_packet(
            ip("10.3.0.1"),
            ip("10.3.0.2"),
            5,
            tcp(33100, 5201, flags, seq, 100),
        ))
    };
    on_cpu(a)?;
    let o = run(&mut hooks, &mut ring, false, &seg(1000, 0x10))?;
    assert_eq!((o.len(), o[0].emit), (1, Emit::First));
    for i in 1..=10u32 {
        hooks.test_run(false, &seg(1000 + i * 100, 0x10), 1)?;
    }
    // The flow moves to the other CPU: its slot there starts from FLOWS, where the ten packets
    // CPU a has not reported are not, so the FIN reports only what CPU b saw.
    on_cpu(b)?;
    for i in 11..=15u32 {
        hooks.test_run(false, &seg(1000 + i * 100, 0x10), 1)?;
    }
    assert!(drain(&mut ring).is_empty(), "in-order data is only counted");
    let o = run(&mut hooks, &mut ring, false, &seg(2600, 0x11))?;
    assert_eq!((o.len(), o[0].emit, o[0].pkts), (1, Emit::TcpControl, 6));
    // Back on CPU a, its slot still holds the flow with its ten: the next record reports them.
    on_cpu(a)?;
    let o = run(&mut hooks, &mut ring, false, &seg(2700, 0x11))?;
    assert_eq!((o.len(), o[0].emit, o[0].pkts), (1, Emit::TcpControl, 11));
    // 1 + 6 + 11: each of the 18 packets reported once.
    Ok(())
}

#[test]
fn a_cache_slot_given_to_another_flow_hands_its_state_back() -> R {
    hand_back_case(v4("10.4.0.1"), v4("10.4.0.2"), false)
}

#[test]
fn a_flow_evicted_from_flows_while_cached_comes_back_whole() -> R {
    hand_back_case(v4("10.4.1.1"), v4("10.4.1.2"), true)
}

/// A flow counted in CPU a's slot, then the slot given to another flow, then the first flow's
/// next packet on CPU b: it must find in FLOWS the ten packets and the sequence end CPU a had,
/// also when FLOWS had evicted its entry meanwhile (`evicted`: as LRU pressure would, since a
/// flow busy in a slot never touches its entry).
fn hand_back_case(src: Ipv4Addr, dst: Ipv4Addr, evicted: bool) -> R {
    let Some((a, b)) = two_cpus() else {
        eprintln!("SKIP: one CPU; the hand-back is seen from another CPU");
        return Ok(());
    };
    let first = ingress_key(src, dst, 33200, 5201);
    // Another flow whose key takes the same slot: it evicts the first from CPU a's cache.
    let other = (33201..u16::MAX)
        .find(|&p| ingress_key(src, dst, p, 5201).cache_slot() == first.cache_slot())
        .ok_or("no port collides")?;
    let (mut hooks, mut ring, _counters) = load(60_000_000_000)?;
    hooks.set_test_l3(false);
    let seg = |sport: u16, seq: u32| {
        ether(&ip_packet(
            IpAddr::V4(src),
            IpAddr::V4(dst),
            5,
            tcp(sport, 5201, 0x10, seq, 100),
        ))
    };
    on_cpu(a)?;
    let o = run(&mut hooks, &mut ring, false, &seg(33200, 1000))?;
    assert_eq!((o.len(), o[0].emit), (1, Emit::First));
    for i in 1..=10u32 {
        hooks.test_run(false, &seg(33200, 1000 + i * 100), 1)?;
    }
    if evicted {
        assert_eq!(forget_in_flows(&first)?, 1, "the flow's FLOWS entry");
    }
    let o = run(&mut hooks, &mut ring, false, &seg(other, 1))?;
    assert_eq!((o.len(), o[0].emit), (1, Emit::First));
    // On CPU b the first flow's state comes from FLOWS: with the ten packets and the sequence
    // end CPU a handed back, an old segment is a retransmission reported with all eleven.
    on_cpu(b)?;
    let o = run(&mut hooks, &mut ring, false, &seg(33200, 1500))?;
    assert_eq!((o.len(), o[0].emit, o[0].pkts), (1, Emit::Retransmit, 11));
    Ok(())
}

/// Removes `key` from the FLOWS maps this process holds (each test loads its own; only the one
/// that saw the key has it); returns how many had it.
fn forget_in_flows(key: &tracer_common::FlowKey) -> Result<usize, Box<dyn std::error::Error>> {
    use aya::maps::{HashMap, Map};
    const K: usize = std::mem::size_of::<tracer_common::FlowKey>();
    const V: usize = std::mem::size_of::<tracer_common::FlowState>();
    // SAFETY: FlowKey is 44 bytes of plain data with no implicit padding (its `_pad` is a
    // field), so its bytes are all initialised.
    let bytes: [u8; K] = unsafe { std::mem::transmute(*key) };
    let mut removed = 0;
    for data in common::maps_named("self", tracer_common::FLOWS_MAP)? {
        let mut m: HashMap<MapData, [u8; K], [u8; V]> = HashMap::try_from(Map::LruHashMap(data))?;
        if m.remove(&bytes).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[test]
fn periodic_records_carry_counts() -> R {
    // A zero interval re-reports on every packet; counts must then be 1 each.
    let (mut hooks, mut ring, _counters) = load(0)?;
    hooks.set_test_l3(false);
    let u = ether(&ip_packet(
        ip("10.2.0.1"),
        ip("10.2.0.2"),
        9,
        L4::Udp {
            sport: 4000,
            dport: 4001,
            payload: 100,
        },
    ));
    for _ in 0..5 {
        hooks.test_run(false, &u, 1)?;
    }
    let o = drain(&mut ring);
    assert_eq!(o.len(), 5);
    assert_eq!(o[0].emit, Emit::First);
    assert!(o[1..]
        .iter()
        .all(|x| x.emit == Emit::Periodic && x.pkts == 1));
    Ok(())
}

#[test]
fn kernel_drops_are_reported_with_reason_and_tuple() -> R {
    use std::os::unix::fs::MetadataExt;
    let (mut hooks, mut ring, counters) = load(1_000_000_000)?;
    // A UDP datagram to a closed port is dropped by the kernel with NO_SOCKET; do it inside a
    // namespace of our own, on its loopback. Only that namespace's drops are asked for: the
    // same drop in another namespace is not this agent's business.
    let prefix = tracer_lab::netns::unique_prefix();
    let ns = tracer_lab::netns::Netns::create(&format!("{prefix}-drop"))?;
    let other = tracer_lab::netns::Netns::create(&format!("{prefix}-other"))?;
    let inode = std::fs::metadata(ns.path())?.ino() as u32;
    let reasons = hooks.enable_drops_in(tracer::hooks::drops::NetnsFilter::Inode(inode))?;
    for (n, port) in [(&other, 7u16), (&ns, 9u16)] {
        n.run(move || {
            if let Ok(s) = std::net::UdpSocket::bind("127.0.0.1:0") {
                let _ = s.send_to(b"x", ("127.0.0.1", port));
            }
        })?;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut found = None;
    let mut foreign = false;
    while found.is_none() && std::time::Instant::now() < deadline {
        for o in drain(&mut ring) {
            if o.drop.is_some() && o.packet().proto == 17 {
                foreign |= o.packet().dport == 7;
                if o.packet().dport == 9 {
                    found = Some(o);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = found.ok_or_else(|| {
        format!(
            "no drop record for the UDP datagram to port 9; {:?}",
            counters.read()
        )
    })?;
    assert!(!foreign, "a drop from another namespace was reported");
    let d = o.drop.ok_or("not a drop")?;
    assert_eq!(reasons.name(d.reason), "NO_SOCKET");
    assert_eq!(o.packet().dst, ip("127.0.0.1"));
    assert_ne!(d.location, 0);
    Ok(())
}

#[test]
fn request_response_turns_are_reported() -> R {
    let (mut hooks, mut ring, _counters) = load(60_000_000_000)?;
    hooks.set_test_l3(false);
    // 100-byte segments; each side acknowledges what the other sent, as TCP does.
    let seg = |fwd: bool, seq: u32, ack: u32| {
        let (s, d, sport, dport) = if fwd {
            ("10.3.0.1", "10.3.0.9", 41000, 2379)
        } else {
            ("10.3.0.9", "10.3.0.1", 2379, 41000)
        };
        let l4 = L4::Tcp {
            sport,
            dport,
            flags: 0x18,
            seq,
            ack,
            payload: 100,
        };
        ether(&ip_packet(ip(s), ip(d), 1, l4))
    };
    // First request segment: new on this hook.
    assert_eq!(
        run(&mut hooks, &mut ring, true, &seg(true, 1000, 5000))?[0].emit,
        Emit::First
    );
    // More of the same request: counted only.
    assert!(run(&mut hooks, &mut ring, true, &seg(true, 1100, 5000))?.is_empty());
    // The response starts (its first packet is also the first of that direction).
    assert_eq!(
        run(&mut hooks, &mut ring, false, &seg(false, 5000, 1200))?.len(),
        1
    );
    assert!(run(&mut hooks, &mut ring, false, &seg(false, 5100, 1200))?.is_empty());
    // The next request (acknowledging the response) is a turn.
    let o = run(&mut hooks, &mut ring, true, &seg(true, 1200, 5200))?;
    assert_eq!((o.len(), o[0].emit), (1, Emit::Turn));
    assert_eq!(
        o[0].pkts, 2,
        "the continuation packet is counted into this record"
    );
    let o = run(&mut hooks, &mut ring, false, &seg(false, 5200, 1300))?;
    assert_eq!((o.len(), o[0].emit), (1, Emit::Turn));
    // Payload whose acknowledgment has not moved: the peer sent nothing new, so no turn (the
    // programs skip the turn map for it: bulk transfer one way).
    assert!(run(&mut hooks, &mut ring, false, &seg(false, 5300, 1300))?.is_empty());
    Ok(())
}

/// ICMP too-big messages as routers send them, byte for byte: ICMPv4 "fragmentation needed"
/// (type 3 code 4, next-hop MTU in bytes 6-7) and ICMPv6 "packet too big" (type 2, MTU in bytes
/// 4-7), each quoting the start of the packet it refused. Through the kernel program and the
/// flow table, each is a too-big message from the router to the sender with the MTU it said.
#[test]
fn too_big_messages_carry_their_mtu_through_to_the_flow_table() -> R {
    use tracer::flows::{FlowTable, Iface};
    let (mut hooks, mut ring, _counters) = load(1_000_000_000)?;
    hooks.set_test_l3(false);
    let eth0 = |i: u32| Iface::new("eth0", i, None);

    // IPv4: 10.0.0.254 tells 10.0.0.1 that the next hop carries 1400 bytes.
    let quoted4 = ip_packet(
        ip("10.0.0.1"),
        ip("10.9.0.2"),
        1,
        tcp(40000, 80, 0x10, 1, 0),
    );
    let mut icmp4 = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
    icmp4.extend_from_slice(&quoted4[..28]);
    let sum = inet_checksum(&icmp4, &[]);
    icmp4[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut frame4 = ip_packet(
        ip("10.0.0.254"),
        ip("10.0.0.1"),
        2,
        L4::Udp {
            sport: 0,
            dport: 0,
            payload: 0,
        },
    );
    frame4.truncate(20);
    frame4[9] = 1; // ICMP
    frame4[2..4].copy_from_slice(&((20 + icmp4.len()) as u16).to_be_bytes());
    frame4.extend_from_slice(&icmp4);
    frame4[10..12].copy_from_slice(&[0, 0]);
    let hsum = inet_checksum(&frame4[..20], &[]);
    frame4[10..12].copy_from_slice(&hsum.to_be_bytes());

    // IPv6: fd00:a::2 tells fd00:a::1 that the path carries 1400 bytes.
    let (src6, dst6): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        ("fd00:a::2".parse()?, "fd00:a::1".parse()?);
    let quoted6 = ip_packet(
        ip("fd00:a::1"),
        ip("fd00:b::1"),
        0,
        tcp(40000, 80, 0x10, 1, 1428),
    );
    let mut icmp6 = vec![2, 0, 0, 0, 0, 0, 0x05, 0x78];
    icmp6.extend_from_slice(&quoted6[..1232]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src6.octets());
    pseudo.extend_from_slice(&dst6.octets());
    pseudo.extend_from_slice(&(icmp6.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let sum = inet_checksum(&pseudo, &icmp6);
    icmp6[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut frame6 = vec![0x60, 0, 0, 0];
    frame6.extend_from_slice(&(icmp6.len() as u16).to_be_bytes());
    frame6.extend_from_slice(&[58, 64]);
    frame6.extend_from_slice(&src6.octets());
    frame6.extend_from_slice(&dst6.octets());
    frame6.extend_from_slice(&icmp6);

    for (frame, from, to, proto, dport) in [
        (frame4, "10.0.0.254", "10.0.0.1", 1, 0x0304),
        (frame6, "fd00:a::2", "fd00:a::1", 58, 0x0200),
    ] {
        let o = run(&mut hooks, &mut ring, false, &ether(&frame))?;
        assert_eq!(o.len(), 1, "{from}");
        let p = o[0].packet();
        assert_eq!(
            (p.src, p.dst, p.proto, p.dport),
            (ip(from), ip(to), proto, dport)
        );
        let mut t = FlowTable::new(10);
        t.ingest(&o[0], &eth0);
        let tb = t.too_big();
        assert_eq!(tb.len(), 1, "{from}: {tb:?}");
        assert_eq!((tb[0].from, tb[0].to, tb[0].mtu), (ip(from), ip(to), 1400));
    }
    Ok(())
}

/// The Internet checksum (RFC 1071) over `a` then `b`.
fn inet_checksum(a: &[u8], b: &[u8]) -> u16 {
    let bytes: Vec<u8> = a.iter().chain(b).copied().collect();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
