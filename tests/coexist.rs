//! tracer shares tc hooks with other programs (a CNI's eBPF dataplane, policy programs, other
//! observers) and must never change what they do: a program attached after tracer sees every
//! packet; one before tracer that drops or redirects is obeyed. Checked with real packets
//! between two namespaces, under TCX and under forced legacy clsact filters, with the stand-in
//! programs of tracer-ebpf/src/standins.rs playing the other programs.
use std::time::{Duration, Instant};

use aya::{
    maps::PerCpuArray,
    programs::{
        tc::{NlOptions, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use tracer::{
    calico::Role,
    events::{decode, Dir, Observation},
    hooks::{Hooks, LoadOptions, TcBackend, TcMode, STANDINS_OBJECT},
    netlink::Link,
};
use tracer_lab::netns::{unique_prefix, Netns};

type R = Result<(), Box<dyn std::error::Error>>;
type E = Box<dyn std::error::Error + Send + Sync>;

/// Two namespaces joined by a veth: `a` (10.77.0.1) pings `b` (10.77.0.2); tracer and the
/// stand-ins attach to b's end, `vb`. `sink` (10.77.1.1/24 in b, peer in `c`) receives what a
/// redirector sends away.
struct Pair {
    a: Netns,
    b: Netns,
    c: Netns,
}

fn pair() -> Result<Pair, Box<dyn std::error::Error>> {
    let p = unique_prefix();
    let (a, b, c) = (
        Netns::create(&format!("{p}-a"))?,
        Netns::create(&format!("{p}-b"))?,
        Netns::create(&format!("{p}-c"))?,
    );
    b.ip(&["link", "add", "vb", "type", "veth", "peer", "name", "va"])?;
    b.ip(&["link", "set", "va", "netns", a.name()])?;
    b.ip(&[
        "link", "add", "sink", "type", "veth", "peer", "name", "sinkpeer",
    ])?;
    b.ip(&["link", "set", "sinkpeer", "netns", c.name()])?;
    a.ip(&["addr", "add", "10.77.0.1/24", "dev", "va"])?;
    b.ip(&["addr", "add", "10.77.0.2/24", "dev", "vb"])?;
    b.ip(&["addr", "add", "10.77.1.1/24", "dev", "sink"])?;
    a.ip(&["link", "set", "va", "up"])?;
    b.ip(&["link", "set", "vb", "up"])?;
    b.ip(&["link", "set", "sink", "up"])?;
    c.ip(&["link", "set", "sinkpeer", "up"])?;
    // Warm up ARP so every counted packet is ICMP.
    a.exec(&["ping", "-c", "1", "-W", "2", "10.77.0.2"])?;
    Ok(Pair { a, b, c })
}

fn ifindex(ns: &Netns, name: &str) -> Result<u32, Box<dyn std::error::Error>> {
    Ok(ns
        .exec(&["cat", &format!("/sys/class/net/{name}/ifindex")])?
        .trim()
        .parse()?)
}

fn rx_packets(ns: &Netns, name: &str) -> Result<u64, Box<dyn std::error::Error>> {
    Ok(ns
        .exec(&[
            "cat",
            &format!("/sys/class/net/{name}/statistics/rx_packets"),
        ])?
        .trim()
        .parse()?)
}

/// Pings b from a `n` times; returns how many replies came back.
fn ping(p: &Pair, n: u32) -> u32 {
    let out =
        p.a.command("ping")
            .args(["-c", &n.to_string(), "-i", "0.02", "-W", "1", "10.77.0.2"])
            .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "N packets transmitted, M received"
    text.split(',')
        .find_map(|part| part.trim().strip_suffix(" received"))
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(0)
}

/// tracer's programs, loaded and attached to `vb` inside b (the thread that attaches must be
/// in b's namespace; the objects work from anywhere afterwards).
struct Tracer {
    hooks: Hooks,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
}

fn tracer_on_vb(p: &Pair, mode: TcMode) -> Result<Tracer, Box<dyn std::error::Error>> {
    let index = ifindex(&p.b, "vb")?;
    let t = p.b.run(move || -> Result<Tracer, E> {
        let (mut hooks, ring, _) = Hooks::load_opts(LoadOptions {
            tc_mode: mode,
            ..Default::default()
        })?;
        let link = Link {
            index,
            name: "vb".into(),
            kind: Some("veth".into()),
            master: None,
            up: true,
            l3: false,
            mtu: None,
            vxlan: None,
            addrs: Vec::new(),
        };
        hooks.attach(&link, Role::Workload, tracer_model::AttachHow::Auto)?;
        Ok(Tracer { hooks, ring })
    })?;
    Ok(t.map_err(|e| e.to_string())?)
}

/// Where a stand-in goes relative to tracer on the same hook.
#[derive(Clone, Copy)]
enum Place {
    Before,
    After,
}

/// Loads the stand-ins and attaches `program` to `vb`'s `kind` hook, before or after tracer.
fn standin_on_vb(
    p: &Pair,
    backend: TcBackend,
    program: &'static str,
    kind: TcAttachType,
    place: Place,
    redirect_to: u32,
) -> Result<Ebpf, Box<dyn std::error::Error>> {
    standin_with(p, backend, program, kind, place, redirect_to, [0; 4])
}

/// Like [`standin_on_vb`], with the address the rewriting stand-ins write.
fn standin_with(
    p: &Pair,
    backend: TcBackend,
    program: &'static str,
    kind: TcAttachType,
    place: Place,
    redirect_to: u32,
    rewrite_to: [u8; 4],
) -> Result<Ebpf, Box<dyn std::error::Error>> {
    let ebpf = p.b.run(move || -> Result<Ebpf, E> {
        let rewrite = u32::from_ne_bytes(rewrite_to);
        let mut ebpf = EbpfLoader::new()
            .override_global("REDIRECT_IFINDEX", &redirect_to, true)
            .override_global("REWRITE_V4", &rewrite, true)
            .load(STANDINS_OBJECT)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(program)
            .ok_or("stand-in program missing")?
            .try_into()?;
        prog.load()?;
        let options = match (backend, place) {
            (TcBackend::Tcx, Place::Before) => TcAttachOptions::TcxOrder(LinkOrder::first()),
            (TcBackend::Tcx, Place::After) => TcAttachOptions::TcxOrder(LinkOrder::last()),
            // tracer's clsact filters sit at priority 1 (ingress) and 65535 (egress).
            (TcBackend::Clsact, place) => TcAttachOptions::Netlink(NlOptions {
                priority: match place {
                    Place::Before => 100,
                    Place::After => 200,
                },
                ..Default::default()
            }),
        };
        prog.attach_with_options("vb", kind, options)?;
        Ok(ebpf)
    })?;
    Ok(ebpf.map_err(|e| e.to_string())?)
}

fn seen(ebpf: &mut Ebpf, slot: u32) -> Result<u64, Box<dyn std::error::Error>> {
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map_mut("STANDIN_SEEN").ok_or("no STANDIN_SEEN map")?)?;
    Ok(map.get(&slot, 0)?.iter().sum())
}

/// Detaches inside b: clsact filters are removed by ifindex over a netlink socket of the
/// calling thread's namespace, which must be b's.
fn drop_in_b<T: Send + 'static>(p: &Pair, t: T) -> R {
    p.b.run(move || drop(t))?;
    Ok(())
}

/// tracer's records since the last call: (direction is egress, ICMP) pairs seen on vb.
fn records(t: &mut Tracer, vb: u32) -> Vec<Observation> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        while let Some(item) = t.ring.next() {
            if let Ok(o) = decode(&item) {
                if o.ifindex == vb {
                    out.push(o);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

fn backends() -> Vec<(TcMode, TcBackend)> {
    let mut b = vec![(TcMode::Clsact, TcBackend::Clsact)];
    if tracer::hooks::kernel::has_tcx() {
        b.push((TcMode::Tcx, TcBackend::Tcx));
    }
    b
}

#[test]
fn a_program_after_tracer_sees_every_packet() -> R {
    for (mode, backend) in backends() {
        let p = pair()?;
        let t = tracer_on_vb(&p, mode)?;
        assert_eq!(t.hooks.backend(), backend);
        let mut after_in = standin_on_vb(
            &p,
            backend,
            "standin_pass",
            TcAttachType::Ingress,
            Place::After,
            0,
        )?;
        // tracer is last on clsact egress (priority 65535): nothing can follow it there.
        let mut after_out = match backend {
            TcBackend::Tcx => Some(standin_on_vb(
                &p,
                backend,
                "standin_pass",
                TcAttachType::Egress,
                Place::After,
                0,
            )?),
            TcBackend::Clsact => None,
        };
        let replies = ping(&p, 20);
        assert_eq!(replies, 20, "{backend:?}: tracer must not disturb the ping");
        // Echo requests enter vb (ingress), replies leave it (egress): each stand-in after
        // tracer saw all 20.
        let seen_in = seen(&mut after_in, 0)?;
        assert!(
            seen_in >= 20,
            "{backend:?}: the program after tracer on ingress saw {seen_in} of 20 pings: \
             tracer ended the chain"
        );
        if let Some(after_out) = after_out.as_mut() {
            let seen_out = seen(after_out, 0)?;
            assert!(
                seen_out >= 20,
                "{backend:?}: the program after tracer on egress saw {seen_out} of 20 replies"
            );
        }
        drop_in_b(&p, (t, after_in, after_out))?;
    }
    Ok(())
}

/// What a stand-in before tracer on vb's egress does with the echo replies.
#[derive(Clone, Copy, Debug)]
enum Takes {
    /// Drops them (`standin_drop`, counted in slot 1).
    Drop,
    /// Redirects them to `sink` (`standin_redirect`, slot 2).
    Redirect,
}

#[test]
fn a_program_before_tracer_that_drops_or_redirects_is_obeyed() -> R {
    for takes in [Takes::Drop, Takes::Redirect] {
        for (mode, backend) in backends() {
            let p = pair()?;
            let vb = ifindex(&p.b, "vb")?;
            let sink = ifindex(&p.b, "sink")?;
            let mut t = tracer_on_vb(&p, mode)?;
            // Replies leave through vb's egress, where tracer is last: a program before it wins.
            let (program, slot) = match takes {
                Takes::Drop => ("standin_drop", 1),
                Takes::Redirect => ("standin_redirect", 2),
            };
            let mut other = standin_on_vb(
                &p,
                backend,
                program,
                TcAttachType::Egress,
                Place::Before,
                sink,
            )?;
            let sunk_before = rx_packets(&p.c, "sinkpeer")?;
            records(&mut t, vb);
            let replies = ping(&p, 10);
            let what = format!("{takes:?} under {backend:?}");
            assert_eq!(replies, 0, "{what}: the other program's verdict must stand");
            assert!(seen(&mut other, slot)? >= 10, "{what}: it saw the replies");
            let sunk = rx_packets(&p.c, "sinkpeer")? - sunk_before;
            match takes {
                Takes::Redirect => assert!(sunk >= 10, "{what}: only {sunk} reached the sink"),
                Takes::Drop => assert!(sunk < 10, "{what}: dropped packets reached the sink"),
            }
            let recs = records(&mut t, vb);
            assert!(
                recs.iter().any(|o| o.dir == Dir::Ingress),
                "{what}: tracer saw the requests arrive: {recs:?}"
            );
            assert!(
                recs.iter().all(|o| o.dir != Dir::Egress),
                "{what}: tracer reported replies the other program took away: {recs:?}"
            );
            drop_in_b(&p, (t, other))?;
        }
    }
    Ok(())
}

#[test]
fn tracer_sees_the_wire_side_of_another_programs_nat() -> R {
    // A NAT program (felix's eBPF dataplane) rewrites arriving packets after tracer on ingress
    // and leaving packets before tracer on egress: tracer records both as they were on the wire.
    for (mode, backend) in backends() {
        let p = pair()?;
        let vb = ifindex(&p.b, "vb")?;
        let mut t = tracer_on_vb(&p, mode)?;
        let mut dnat = standin_with(
            &p,
            backend,
            "standin_dnat",
            TcAttachType::Ingress,
            Place::After,
            0,
            [10, 77, 0, 2],
        )?;
        let mut snat = standin_with(
            &p,
            backend,
            "standin_snat",
            TcAttachType::Egress,
            Place::Before,
            0,
            [10, 77, 0, 99],
        )?;
        // a pings an address b does not have (a static neighbour sends it to vb); the DNAT
        // stand-in turns it into b's own address.
        let mac = p.b.exec(&["cat", "/sys/class/net/vb/address"])?;
        p.a.ip(&[
            "neigh",
            "replace",
            "10.77.0.50",
            "lladdr",
            mac.trim(),
            "dev",
            "va",
        ])?;
        records(&mut t, vb);
        let out =
            p.a.command("ping")
                .args(["-c", "3", "-i", "0.05", "-W", "1", "10.77.0.50"])
                .output();
        drop(out);
        assert!(seen(&mut dnat, 3)? >= 3 && seen(&mut snat, 3)? >= 3);
        let recs = records(&mut t, vb);
        let arrived: Vec<_> = recs.iter().filter(|o| o.dir == Dir::Ingress).collect();
        let left: Vec<_> = recs.iter().filter(|o| o.dir == Dir::Egress).collect();
        assert!(
            arrived
                .iter()
                .any(|o| o.outer.dst.to_string() == "10.77.0.50"),
            "{backend:?}: tracer saw the destination before DNAT: {recs:?}"
        );
        assert!(
            left.iter().any(|o| o.outer.src.to_string() == "10.77.0.99"),
            "{backend:?}: tracer saw the source after SNAT: {recs:?}"
        );
        assert!(
            !recs
                .iter()
                .any(|o| o.outer.dst.to_string() == "10.77.0.2" && o.dir == Dir::Ingress),
            "{backend:?}: tracer must not see the rewritten arriving packet: {recs:?}"
        );
        drop_in_b(&p, (t, dnat, snat))?;
    }
    Ok(())
}
