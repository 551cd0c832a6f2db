//! Section 4: memory per tracked flow and `/flows?dst=` latency at 100k flows.
//!
//! In-process: a FlowTable (exact heap bytes from the counting allocator) and a Shared (the
//! agent's state, the code behind GET /flows) filled with synthetic 4-hop flows. Then the real
//! agent in the lab, fed 100k real UDP flows from the pod: its RSS and its HTTP answer times.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use tracer::{
    agent::AgentConfig,
    api::{metrics::exposition, sorted_json},
    flows::{Flow, FlowTable, Hop, Sample},
    state::Shared,
};
use tracer_lab::{daemon::LabDir, http::Connection, topo::SingleNode};
use tracer_model::{FlowQuery, FlowsPage};

use crate::{
    agent, alloc,
    report::{quantile, On, Row, Target},
    workload, Opts,
};

const SECTION: &str = "4 memory & query";
/// Simulated arrival: one new flow per millisecond, swept every 500 ms like the agent does, so
/// NAT fingerprints hold a realistic 2 s window rather than every packet ever seen.
const FLOW_GAP_NS: u64 = 1_000_000;
const SWEEP_NS: u64 = 500_000_000;

#[derive(Clone, Copy)]
struct TableMem {
    /// Requested heap bytes per flow, and the same in glibc malloc chunks.
    requested: f64,
    chunks: f64,
}

/// Ingests `n` flows (26 records each for TCP, 4 for UDP) into a fresh FlowTable.
fn table_mem(n: u64) -> Result<TableMem> {
    let (l0, c0) = alloc::live();
    let mut t = FlowTable::new(n as usize);
    let mut ts = 1_000_000_000u64;
    let mut next_sweep = ts + SWEEP_NS;
    for i in 0..n {
        ts += FLOW_GAP_NS;
        for (k, p) in workload::flow(i).iter().enumerate() {
            let o = workload::observation(i, p, ts + k as u64 * 50_000);
            t.ingest(&o, &workload::iface);
        }
        if ts >= next_sweep {
            t.sweep(ts);
            next_sweep = ts + SWEEP_NS;
        }
    }
    if t.len() as u64 != n {
        bail!("table holds {} flows, expected {n}", t.len());
    }
    let (l1, c1) = alloc::live();
    drop(t);
    let per = |d: isize| d as f64 / n as f64;
    Ok(TableMem {
        requested: per(l1 - l0),
        chunks: per(c1 - c0),
    })
}

/// Heap bytes per flow of the table's big parts at `n` flows, rebuilt from the public types:
/// the flow slots (`Flow`s in chunks of 1024, with up to 4 hops in place, plus 4 bytes of
/// source tags), the tuple index (one 8-byte entry per tuple pair, as in a `HashSet<u64>`:
/// 1.75 per flow in this workload, 2 for NAT'd flows) and the address index (one 6-byte entry
/// per IPv4 destination, the translated one too where DNAT changed it: 1.75 per flow here).
/// Returns (slots, tuple index, address index).
fn breakdown(n: u64) -> (f64, f64, f64) {
    let (_, c0) = alloc::live();
    let mut index: HashSet<u64> = HashSet::new();
    for i in 0..n {
        let pairs = if i % 4 == 2 { 1 } else { 2 };
        for k in 0..pairs {
            index.insert(i << 4 | k);
        }
    }
    let (_, c1) = alloc::live();
    drop(index);
    (
        (size_of::<Flow>() + 4) as f64,
        (c1 - c0) as f64 / n as f64,
        1.75 * size_of::<([u16; 2], u16)>() as f64,
    )
}

/// The pcap ring's bytes in a table of `n` flows (it is sized from the flow cap, then fixed).
fn ring_bytes(n: u64) -> f64 {
    (FlowTable::new(n as usize).samples().cap() * size_of::<Sample>()) as f64
}

/// Median of `runs` builds: hash tables' capacities depend on their random seeds (tombstones
/// left by the fingerprint sweeps), which moves the total by a few percent from run to run.
fn table_mem_median(n: u64, runs: usize) -> Result<TableMem> {
    let mut all = (0..runs)
        .map(|_| table_mem(n))
        .collect::<Result<Vec<_>>>()?;
    all.sort_by(|a, b| a.chunks.total_cmp(&b.chunks));
    all.get(all.len() / 2)
        .copied()
        .ok_or_else(|| anyhow!("no run"))
}

/// A Shared (the agent's state) holding `n` flows, fed in the reader's batches.
fn shared_with(n: u64) -> Shared {
    shared_fed(n, usize::MAX)
}

/// Like `shared_with`, each flow cut after its first `records` records (2: a SYN at the veth
/// and at the NIC, never answered: the TCP flows become `no_reply` with a diagnosis).
fn shared_fed(n: u64, records: usize) -> Shared {
    let shared = Shared::new(&tracer::state::StateConfig {
        flow_cap: n as usize,
        ..AgentConfig::default().state()
    });
    feed_records(&shared, n, records);
    shared
}

/// Feeds `n` flows' observations to `shared` in the reader's batches.
fn feed(shared: &Shared, n: u64) {
    feed_records(shared, n, usize::MAX);
}

fn feed_records(shared: &Shared, n: u64, records: usize) {
    let mut batch = Vec::with_capacity(4096);
    let mut ts = 1_000_000_000u64;
    for i in 0..n {
        ts += FLOW_GAP_NS;
        for (k, p) in workload::flow(i).iter().enumerate().take(records) {
            batch.push(workload::observation(i, p, ts + k as u64 * 50_000));
        }
        if batch.len() >= 4096 {
            shared.ingest(&batch, 0);
            batch.clear();
        }
    }
    shared.ingest(&batch, 0);
}

/// This thread's CPU time in ms. In-process timings use it, not the wall clock: on a machine
/// shared with other work the wall clock counts the time other processes held the CPU, which
/// made these figures swing by 10x with the load; the CPU time the work took barely moves.
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live struct given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Times GET /flows's one-go work in-process (thread CPU time): `Shared::flows_json`, the
/// views built and written as the API does.
fn time_query(shared: &Shared, query: &str, iters: usize) -> Result<(Vec<f64>, u64)> {
    let q = FlowQuery::parse(Some(query)).map_err(|e| anyhow!("{query}: {e}"))?;
    let ms = timed_runs(shared, &q, iters);
    // Counted after the timed runs, so that the first of them finds the heap as a first
    // answer would.
    Ok((ms, shared.flows(&q).matched as u64))
}

/// The timed runs alone (not inlined: a name for callgrind's `--toggle-collect`).
#[inline(never)]
fn timed_runs(shared: &Shared, q: &FlowQuery, iters: usize) -> Vec<f64> {
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = cpu_ms();
        // What the API's one-go `/flows` does: views built and written a flow at a time.
        let body = shared.flows_json(q);
        ms.push(cpu_ms() - t);
        std::hint::black_box(&body);
    }
    ms
}

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let runs = if opts.quick { 1 } else { 3 };
    let small = table_mem_median(10_000, runs)?;
    let large = table_mem_median(100_000, runs)?;
    let marginal = (large.requested * 100_000.0 - small.requested * 10_000.0) / 90_000.0;
    let ring = ring_bytes(100_000);
    eprintln!(
        "  size_of: Flow {} B, Hop {} B, Sample {} B (pcap ring at 100k: {:.1} MiB, at 10k: \
         {:.1} MiB)",
        size_of::<Flow>(),
        size_of::<Hop>(),
        size_of::<Sample>(),
        ring / 1048576.0,
        ring_bytes(10_000) / 1048576.0,
    );
    let (b_flows, b_index, b_addr) = breakdown(100_000);
    eprintln!(
        "  breakdown per flow at 100k: flow slots (hops in place) {b_flows:.0} B, tuple index \
         {b_index:.0} B, address index {b_addr:.0} B, pcap ring {:.0} B; rest (fingerprints, \
         change log, rare parts, chunk slack) {:.0} B",
        ring / 1e5,
        large.chunks - b_flows - b_index - b_addr - ring / 1e5
    );
    eprintln!(
        "  per flow: 10k {:.0} B requested / {:.0} B in malloc chunks; 100k {:.0} / {:.0}; \
         marginal {marginal:.0} B",
        small.requested, small.chunks, large.requested, large.chunks
    );
    rows.push(
        Row::new(
            SECTION,
            "FlowTable heap per flow at 10k flows (4 hops, 75% NAT; malloc chunks)",
            small.chunks,
            "B",
        )
        .target(Target::AtMost(512.0), On::Value, "<= 512 B"),
    );
    rows.push(
        Row::new(
            SECTION,
            "FlowTable heap per flow at 100k flows (malloc chunks)",
            large.chunks,
            "B",
        )
        .baseline(small.chunks)
        .target(Target::AtMost(512.0), On::Value, "<= 512 B"),
    );
    rows.push(
        Row::new(
            SECTION,
            "  same, requested bytes / marginal 10k->100k (info)",
            marginal,
            "B",
        )
        .baseline(large.requested),
    );
    rows.push(Row::new(
        SECTION,
        format!(
            "  of which at 100k: flow slots {b_flows:.0}, tuple index {b_index:.0}, address \
             index {b_addr:.0}, pcap ring ({:.1} MiB) {:.0} B (info)",
            ring / 1048576.0,
            ring / 1e5
        ),
        b_flows + b_index + b_addr + ring / 1e5,
        "B",
    ));

    let iters = if opts.quick { 50 } else { 200 };
    let s10 = shared_with(10_000);
    let svc = workload::service_ip(24);
    let selective = format!("dst={svc}");
    let (q10, _) = time_query(&s10, &selective, iters)?;
    drop(s10);
    let s100 = shared_with(100_000);
    let (q100, matched) = time_query(&s100, &selective, iters)?;
    let (broad, broad_matched) = time_query(&s100, "dst=10.96.0.0/16", iters / 10)?;
    // An address nothing goes to: the scan alone, no judging or JSON.
    let (scan, _) = time_query(&s100, "dst=10.99.99.99", iters)?;
    // Endpoints that judge every flow: a Prometheus scrape and /diagnoses.
    let timed = |f: &dyn Fn() -> usize| -> Vec<f64> {
        (0..5)
            .map(|_| {
                let t = cpu_ms();
                std::hint::black_box(f());
                cpu_ms() - t
            })
            .collect()
    };
    let metrics = timed(&|| exposition(&s100.census()).len());
    let diagnoses = timed(&|| sorted_json(&s100.diagnoses()).len());
    drop(s100);
    let faulty = shared_fed(100_000, 2);
    let metrics_faulty = timed(&|| exposition(&faulty.census()).len());
    let diagnoses_faulty = timed(&|| sorted_json(&faulty.diagnoses()).len());
    drop(faulty);
    for (what, ms) in [
        ("GET /diagnoses at 100k healthy flows", &diagnoses),
        (
            "GET /diagnoses at 100k flows, 75k unanswered",
            &diagnoses_faulty,
        ),
    ] {
        rows.push(
            Row::new(
                SECTION,
                format!("{what}, median of 5"),
                quantile(ms, 0.5),
                "ms",
            )
            .target(Target::AtMost(20.0), On::Value, "<= 20 ms"),
        );
    }
    // /metrics keeps its counts incrementally: the first scrape judges every flow (the tally
    // starts empty, as after the node changes), later ones only flows changed or due since.
    for (what, ms) in [
        ("GET /metrics at 100k healthy flows", &metrics),
        (
            "GET /metrics at 100k flows, 75k unanswered",
            &metrics_faulty,
        ),
    ] {
        rows.push(Row::new(
            SECTION,
            format!("{what}, first scrape (full tally) (info)"),
            ms.first().copied().unwrap_or(0.0),
            "ms",
        ));
        rows.push(
            Row::new(
                SECTION,
                format!("{what}, later scrapes (nothing changed), median of 4"),
                quantile(ms.get(1..).unwrap_or_default(), 0.5),
                "ms",
            )
            .target(Target::AtMost(20.0), On::Value, "<= 20 ms"),
        );
    }
    rows.push(
        Row::new(
            SECTION,
            format!("Shared::flows + JSON, dst=<one Service IP> ({matched} of 100k match), p50"),
            quantile(&q100, 0.5),
            "ms",
        )
        .baseline(quantile(&q10, 0.5)),
    );
    rows.push(
        Row::new(
            SECTION,
            "  same, p99 (baseline: 10k flows)",
            quantile(&q100, 0.99),
            "ms",
        )
        .baseline(quantile(&q10, 0.99))
        .target(Target::AtMost(5.0), On::Value, "<= 5 ms"),
    );
    rows.push(Row::new(
        SECTION,
        "  same query matching nothing (the scan alone), p50 (info)",
        quantile(&scan, 0.5),
        "ms",
    ));
    rows.push(Row::new(
        SECTION,
        format!("  dst=10.96.0.0/16 ({broad_matched} match, 1000 returned), p99 (info)"),
        quantile(&broad, 0.99),
        "ms",
    ));
    rows.extend(big_table(opts)?);
    rows.extend(real_agent(opts)?);
    Ok(rows)
}

/// A big table: a million flows (300k with --quick), the table's heap per flow and the two
/// /flows queries, by one address and by a /16.
fn big_table(opts: &Opts) -> Result<Vec<Row>> {
    let n: u64 = if opts.quick { 300_000 } else { 1_000_000 };
    let label = if opts.quick { "300k" } else { "1M" };
    let mem = table_mem(n)?;
    eprintln!(
        "  per flow at {label}: {:.0} B requested / {:.0} B in malloc chunks",
        mem.requested, mem.chunks
    );
    let shared = shared_with(n);
    let iters = if opts.quick { 50 } else { 200 };
    let svc = workload::service_ip(24);
    let (one, matched) = time_query(&shared, &format!("dst={svc}"), iters)?;
    let (broad, broad_matched) = time_query(&shared, "dst=10.96.0.0/16", iters / 10)?;
    drop(shared);
    Ok(vec![
        Row::new(
            SECTION,
            format!("big table: FlowTable heap per flow at {label} flows (malloc chunks)"),
            mem.chunks,
            "B",
        )
        .target(Target::AtMost(350.0), On::Value, "<= 350 B"),
        Row::new(
            SECTION,
            format!(
                "big table: dst=<one Service IP> at {label} flows ({matched} match), p99 (p50 \
                 as baseline)"
            ),
            quantile(&one, 0.99),
            "ms",
        )
        .baseline(quantile(&one, 0.5))
        .target(Target::AtMost(5.0), On::Value, "<= 5 ms"),
        Row::new(
            SECTION,
            format!(
                "big table: dst=10.96.0.0/16 at {label} flows ({broad_matched} match, 1000 \
                 returned), p99 (p50 as baseline)"
            ),
            quantile(&broad, 0.99),
            "ms",
        )
        .baseline(quantile(&broad, 0.5))
        .target(Target::AtMost(20.0), On::Value, "<= 20 ms"),
    ])
}

/// The real agent fed `n` real UDP flows from the pod (to 1000 off-LAN addresses, masqueraded:
/// two hooks each): its RSS, and GET /flows?dst= over HTTP.
fn real_agent(opts: &Opts) -> Result<Vec<Row>> {
    let n: u64 = if opts.quick { 20_000 } else { 100_000 };
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let dir = LabDir::create(&lab.prefix)?;
    let agent = agent::start(&lab, &opts.tracer, &dir.join("agent-mem.log"), &[])?;
    let rss_bytes = |pid| tracer_lab::agent::rss_kib(Some(pid)).map(|kib| kib * 1024);
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = rss_bytes(agent.pid())?;

    let t = Instant::now();
    let sent = lab.pod.netns.run(move || udp_flows(n))??;
    let send_time = t.elapsed();
    // Wait until the agent has taken in what the kernel recorded.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_obs = 0;
    let health = loop {
        let h = agent
            .health(&lab.node)?
            .detail
            .ok_or_else(|| anyhow!("/healthz without its detail"))?;
        let obs = h.flows.observations;
        if (h.flows.flows as u64 >= n * 95 / 100 && obs == last_obs) || Instant::now() > deadline {
            break h;
        }
        last_obs = obs;
        std::thread::sleep(Duration::from_millis(200));
    };
    let flows = health.flows.flows;
    let lost = health.kernel.lost;
    let rss_full = rss_bytes(agent.pid())?;
    eprintln!(
        "  real agent: {sent} UDP flows sent in {send_time:.2?}; table {flows} flows, kernel \
         lost {lost}; RSS {:.1} -> {:.1} MiB",
        rss_idle as f64 / 1048576.0,
        rss_full as f64 / 1048576.0
    );

    let drops = health.flows.drops;
    let mut conn = Connection::open(&lab.node, agent.addr, Duration::from_secs(10))?;
    let iters = if opts.quick { 30 } else { 100 };
    let mut ms = Vec::with_capacity(iters);
    let mut matched = 0;
    // The first answer pays one-off costs (with drops seen: loading /proc/kallsyms); kept apart.
    let t = Instant::now();
    conn.request("GET", &format!("/flows?dst={}", udp_dst(1)), None)?;
    let first = t.elapsed().as_secs_f64() * 1e3;
    for k in 0..iters {
        let path = format!("/flows?dst={}", udp_dst(k as u64 * 7));
        let t = Instant::now();
        let r = conn.request("GET", &path, None)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if r.status != 200 {
            bail!("GET {path}: HTTP {}", r.status);
        }
        matched = serde_json::from_str::<FlowsPage>(&r.body)?.matched;
    }
    eprintln!(
        "  HTTP /flows: first {first:.1} ms ({drops} kernel drops matched to flows), then p50 \
         {:.2} p99 {:.2} max {:.2} ms",
        quantile(&ms, 0.5),
        quantile(&ms, 0.99),
        quantile(&ms, 1.0)
    );
    let label = format!("{}k", flows / 1000);
    Ok(vec![
        Row::new(
            SECTION,
            format!("real agent RSS with {label} real UDP flows (baseline: idle)"),
            rss_full as f64,
            "B",
        )
        .baseline(rss_idle as f64),
        Row::new(
            SECTION,
            format!("  real agent RSS delta per flow ({label} flows, 2 hops each; info)"),
            (rss_full as f64 - rss_idle as f64) / flows.max(1) as f64,
            "B",
        ),
        Row::new(
            SECTION,
            format!(
                "real agent HTTP GET /flows?dst=<ip> ({matched} of {label} match), p99 (p50 as \
                 baseline)"
            ),
            quantile(&ms, 0.99),
            "ms",
        )
        .baseline(quantile(&ms, 0.5))
        .target(Target::AtMost(5.0), On::Value, "<= 5 ms"),
        Row::new(
            SECTION,
            if drops > 0 {
                format!("  real agent: first GET /flows ({drops} drops seen: loads kallsyms; info)")
            } else {
                "  real agent: first GET /flows (info)".to_string()
            },
            first,
            "ms",
        ),
    ])
}

/// Destination of UDP flow `k`: 1000 addresses beyond the gateway (it has no route to them, so
/// nothing answers but a rate-limited ICMP error).
fn udp_dst(k: u64) -> Ipv4Addr {
    let d = k % 1000;
    Ipv4Addr::new(10, 50, (d >> 8) as u8, d as u8)
}

/// Sends one datagram on each of `n` connected UDP sockets (connected, so the kernel gives the
/// packets an IP ID and the agent can follow them through MASQUERADE), at ~25k flows/s.
fn udp_flows(n: u64) -> std::io::Result<u64> {
    const RATE: f64 = 25_000.0;
    let start = Instant::now();
    for k in 0..n {
        let dst = SocketAddr::V4(SocketAddrV4::new(udp_dst(k), 10_000 + (k / 1000) as u16));
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(dst)?;
        s.send(&[0u8; 32])?;
        if k % 256 == 0 {
            let due = Duration::from_secs_f64(k as f64 / RATE);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(n)
}

/// Profiling aid: `Shared::flows` + JSON for `dst=<one Service IP>` on `flows` flows, `iters`
/// times. Returns (matched, p50 ms, p99 ms).
pub fn query_in_process(flows: u64, iters: usize) -> Result<(u64, f64, f64)> {
    let shared = shared_with(flows);
    let (ms, matched) = time_query(&shared, &format!("dst={}", workload::service_ip(24)), iters)?;
    Ok((matched, quantile(&ms, 0.5), quantile(&ms, 0.99)))
}

/// Profiling aid: the big table alone (no root, no lab): heap per flow at `flows` flows, then
/// `dst=<one Service IP>` and `dst=10.96.0.0/16` timed `iters` times each (thread CPU time).
pub fn big_table_in_process(flows: u64, iters: usize) -> Result<()> {
    let mem = table_mem(flows)?;
    println!(
        "{flows} flows: heap per flow {:.0} B requested / {:.0} B in malloc chunks",
        mem.requested, mem.chunks
    );
    let shared = shared_with(flows);
    for query in [
        format!("dst={}", workload::service_ip(24)),
        "dst=10.96.0.0/16".to_string(),
        "dst=10.99.99.99".to_string(),
    ] {
        let (ms, matched) = time_query(&shared, &query, iters)?;
        println!(
            "{query}: {matched} match, p50 {:.2} ms, p99 {:.2} ms (CPU)",
            quantile(&ms, 0.5),
            quantile(&ms, 0.99)
        );
    }
    Ok(())
}

/// Identity's cost (issue 14): ingest of `flows` flows and a rendered `/flows?limit=1000`, with
/// identity off and on (every pod and Service address of the workload named). Names are looked
/// up when answers are rendered, so ingest should not move and a flow holds no extra bytes.
/// Returns (ingest ms off, on; render ms p50 off, on).
pub fn identity_in_process(flows: u64, iters: usize) -> Result<(f64, f64, f64, f64)> {
    use std::sync::Arc;

    use tracer::identity::{Book, Identities, Kind, Object};
    use tracer_model::identity::{Endpoint, IdentitySource, PodRef, ServiceRef};

    let mut book = Book::default();
    for i in 0..flows.min(20_000) {
        let (pod, svc) = (workload::pod_ip(i), workload::service_ip(i));
        let ep = Endpoint::Pod(PodRef {
            namespace: "bench".into(),
            name: format!("pod-{pod}"),
            workload: None,
            node: Some("node-a".into()),
            labels: [("app".to_string(), format!("a{}", i % 10))].into(),
        });
        book.upsert(
            Kind::Pod,
            format!("bench/{pod}"),
            Object {
                ips: vec![pod.into()],
                endpoint: Arc::new(ep),
            },
        );
        let ep = Endpoint::Service(ServiceRef {
            namespace: "bench".into(),
            name: format!("svc-{svc}"),
            cluster_ip: Some(svc.into()),
        });
        book.upsert(
            Kind::Service,
            format!("bench/{svc}"),
            Object {
                ips: vec![svc.into()],
                endpoint: Arc::new(ep),
            },
        );
    }
    let ids = Arc::new(Identities::new(IdentitySource::Kubernetes, Some("node-a")));
    ids.publish(&book, "bench");
    let mut ingest = [0.0f64; 2];
    let mut render = [0.0f64; 2];
    // Alternating runs, best of three each: the machine is shared.
    for _ in 0..3 {
        for (k, on) in [(0, false), (1, true)] {
            let t = Instant::now();
            let shared = if on {
                let s = Shared::new(&tracer::state::StateConfig {
                    flow_cap: flows as usize,
                    ..AgentConfig::default().state()
                });
                s.set_identities(Arc::clone(&ids));
                feed(&s, flows);
                s
            } else {
                shared_with(flows)
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            ingest[k] = if ingest[k] == 0.0 {
                ms
            } else {
                ingest[k].min(ms)
            };
            let (r, _) = time_query(&shared, "limit=1000", iters)?;
            let p50 = quantile(&r, 0.5);
            render[k] = if render[k] == 0.0 {
                p50
            } else {
                render[k].min(p50)
            };
        }
    }
    Ok((ingest[0], ingest[1], render[0], render[1]))
}
