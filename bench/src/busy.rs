//! Section 6 (issue 16 §3): a busy node. One node namespace with 250 pod namespaces routed the
//! way felix routes pods (a `cali*` veth each, proxy ARP, a /32 route, the pod's default route
//! via 169.254.1.1), and a server namespace behind the node's NIC. The real agent attaches to
//! all 251 interfaces; the pods open 5,000 new TCP connections a second between them while one
//! pod runs an iperf3 bulk transfer, for 60 s. Measured in that window: the agent's CPU (from
//! /proc), the kernel's time in tracer's tc programs (BPF run-time stats), records/s and
//! records lost (the agent's own counters), its RSS; then, with the load still on,
//! `/flows?dst=<server>` every 250 ms (outside the CPU window: a query's own rendering is not
//! the cost of tracing).
//! Then the same on the legacy tc path (`--tc-mode clsact`).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tracer_lab::{
    agent::{Agent, Launch},
    daemon::{Daemon, LabDir},
    netns::{unique_prefix, Netns},
};
use tracer_model::FlowQuery;

use crate::{
    agent::wait_log,
    datapath::{enable_bpf_stats, prog_run_time, PROG_SCHED_CLS},
    report::{quantile, On, Row, Target},
    Opts,
};

const SECTION: &str = "6 busy node";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const SERVER_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// felix's name for a workload's host-side veth: `cali` and 11 hex digits.
fn veth(i: usize) -> String {
    format!("cali{i:011x}")
}

struct Node {
    // Dropped in declaration order: the server before the namespaces it runs in.
    _iperf: Daemon,
    stop_accept: Arc<AtomicBool>,
    pods: Vec<Netns>,
    node: Netns,
    _server: Netns,
    dir: LabDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_accept.store(true, Ordering::Relaxed);
    }
}

fn build(pods: usize) -> Result<Node> {
    let prefix = unique_prefix();
    let dir = LabDir::create(&format!("{prefix}-busy"))?;
    let node = Netns::create(&format!("{prefix}bn"))?;
    let server = Netns::create(&format!("{prefix}bs"))?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    node.ip(&["link", "set", "lo", "up"])?;
    node.add_veth("eth0", "eth0", &server)?;
    node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
    node.ip(&["link", "set", "eth0", "up"])?;
    server.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", "eth0"])?;
    server.ip(&["link", "set", "eth0", "up"])?;
    server.ip(&["link", "set", "lo", "up"])?;
    server.ip(&["route", "add", "10.200.0.0/16", "via", &NODE_IP.to_string()])?;
    // The node's own default route, as on a real node: proxy ARP answers the pods' ARP for
    // 169.254.1.1 only for an address the node routes out of another interface.
    node.ip(&["route", "add", "default", "via", &SERVER_IP.to_string()])?;
    let mut all = Vec::with_capacity(pods);
    for i in 0..pods {
        let pod = Netns::create(&format!("{prefix}b{i}"))?;
        let cali = veth(i);
        node.add_veth(&cali, "eth0", &pod)?;
        node.sysctl(&format!("net.ipv4.conf.{cali}.proxy_arp"), "1")?;
        node.ip(&["link", "set", &cali, "up"])?;
        node.ip(&["route", "add", &format!("{}/32", pod_ip(i)), "dev", &cali])?;
        pod.ip(&["addr", "add", &format!("{}/32", pod_ip(i)), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["link", "set", "lo", "up"])?;
        pod.ip(&[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        pod.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        all.push(pod);
    }
    // The server: accepts and closes (the load is new connections, not their bytes).
    let listener = server.listen(
        SocketAddr::new(IpAddr::V4(SERVER_IP), SERVER_PORT),
        "busy server",
    )?;
    let stop_accept = Arc::new(AtomicBool::new(false));
    let stop = stop_accept.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => drop(s),
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    });
    let log = dir.join("iperf3-server.log");
    let mut iperf = Daemon::spawn(
        &server,
        "iperf3 server",
        Command::new("iperf3").args(["-s", "--forceflush", "-p", &IPERF_PORT.to_string()]),
        &log,
        Duration::from_secs(2),
    )?;
    wait_log(
        &mut iperf,
        &log,
        "Server listening",
        Duration::from_secs(10),
    )?;
    Ok(Node {
        _iperf: iperf,
        stop_accept,
        pods: all,
        node,
        _server: server,
        dir,
    })
}

/// One agent run's figures.
struct Load {
    conns_per_s: f64,
    failed: u64,
    agent_cpu_pct: f64,
    prog_cpu_pct: f64,
    prog_ns_per_call: f64,
    records_per_s: f64,
    lost: f64,
    rss: f64,
    hwm: f64,
    query_ms: Vec<f64>,
}

/// utime + stime of `pid`, in seconds, with its waited-for children's (cutime + cstime): the
/// agent runs `iptables-save`, `nft` and `ipset` to read felix's state, and what they cost is
/// the agent's cost too.
pub(crate) fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> f64 { f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime, stime, cutime and cstime are fields 14-17; `rest` starts at field 3.
    Ok((ticks(11) + ticks(12) + ticks(13) + ticks(14)) / hz)
}

fn status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn run_load(opts: &Opts, n: &Node, tc_mode: &str, rate: u64, secs: u64) -> Result<Load> {
    let names: Vec<String> = (0..n.pods.len()).map(veth).collect();
    let mut agent: Agent = Launch::with_args(&["--tc-mode", tc_mode])
        .env("TRACER_LOG", "warn")
        .start(
            &n.node,
            "tracer agent",
            &opts.tracer,
            &n.dir.join(&format!("agent-{tc_mode}.log")),
        )?;
    let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
    want.push("eth0");
    agent.wait_attached(&n.node, &want, Duration::from_secs(120))?;

    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let to = SocketAddr::new(IpAddr::V4(SERVER_IP), SERVER_PORT);
    let per_pod = (rate as f64 / n.pods.len() as f64).max(0.1);
    let gap = Duration::from_secs_f64(1.0 / per_pod);
    let mut workers = Vec::with_capacity(n.pods.len());
    for (i, pod) in n.pods.iter().enumerate() {
        let (stop, made, failed) = (stop.clone(), made.clone(), failed.clone());
        workers.push(pod.spawn_thread(&format!("busy-{i}"), move || {
            // Spread the pods' first connects over one gap so the load is even.
            std::thread::sleep(gap.mul_f64((i % 97) as f64 / 97.0));
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                    Ok(s) => {
                        drop(s);
                        made.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                next += gap;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    // Behind: do not make up a burst.
                    next = now;
                }
            }
        })?);
    }
    let bulk = Daemon::spawn(
        &n.pods[0],
        "iperf3 bulk",
        Command::new("iperf3").args([
            "-c",
            &SERVER_IP.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &(secs + 5).to_string(),
        ]),
        &n.dir.join(&format!("iperf3-{tc_mode}.log")),
        Duration::from_secs(2),
    )?;
    // Warm-up: the load reaches its pace before the window opens.
    std::thread::sleep(Duration::from_secs(2));
    let stats = enable_bpf_stats()?;
    let pid = agent.pid();
    let m0 = agent.get(&n.node, "/metrics")?.text();
    let (cpu0, prog0, made0, t0) = (
        cpu_s(pid)?,
        prog_run_time(pid)?,
        made.load(Ordering::Relaxed),
        Instant::now(),
    );
    let failed0 = failed.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(secs));
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, prog1) = (cpu_s(pid)?, prog_run_time(pid)?);
    let made1 = made.load(Ordering::Relaxed);
    let failed1 = failed.load(Ordering::Relaxed);
    let m1 = agent.get(&n.node, "/metrics")?.text();
    drop(stats);
    // Queries after the window, under the same load: a query's own work (rendering up to
    // 1,000 flows) is not the cost of tracing, and would be counted in it.
    let q = FlowQuery::parse(Some(&format!("dst={SERVER_IP}")))?;
    let mut query_ms = Vec::new();
    let tq = Instant::now();
    while tq.elapsed() < Duration::from_secs(secs / 4).max(Duration::from_secs(5)) {
        let t = Instant::now();
        agent.flows(&n.node, &q).context("/flows during the load")?;
        query_ms.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    drop(bulk);
    let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    drop(agent);
    let sched = |m: &std::collections::HashMap<u64, (u64, u64)>| {
        m.get(&PROG_SCHED_CLS).copied().unwrap_or((0, 0))
    };
    let (p0, p1) = (sched(&prog0), sched(&prog1));
    let calls = p1.1.saturating_sub(p0.1) as f64;
    let prog_ns = p1.0.saturating_sub(p0.0) as f64;
    let delta = |name: &str| metric(&m1, name) - metric(&m0, name);
    Ok(Load {
        conns_per_s: made1.saturating_sub(made0) as f64 / wall,
        failed: failed1.saturating_sub(failed0),
        agent_cpu_pct: (cpu1 - cpu0) / wall * 100.0,
        prog_cpu_pct: prog_ns / 1e9 / wall * 100.0,
        prog_ns_per_call: if calls > 0.0 { prog_ns / calls } else { 0.0 },
        records_per_s: delta("tracer_kernel_records_total") / wall,
        lost: delta("tracer_kernel_records_lost_total"),
        rss: rss * 1024.0,
        hwm: hwm * 1024.0,
        query_ms,
    })
}

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let (pods, rate, secs) = if opts.quick {
        (50, 1000, 10)
    } else {
        (250, 5000, 60)
    };
    let t = Instant::now();
    let node = build(pods)?;
    eprintln!("  {pods} pods built in {:.1?}", t.elapsed());
    let mut rows = Vec::new();
    for (mode, label) in [("tcx", "TCX"), ("clsact", "legacy tc (clsact)")] {
        let l = run_load(opts, &node, mode, rate, secs)?;
        eprintln!(
            "  {label}: {:.0} conn/s ({} failed), agent {:.1}% of a core, programs {:.1}% \
             ({:.0} ns a call), {:.0} records/s, {} lost, RSS {:.1} MiB",
            l.conns_per_s,
            l.failed,
            l.agent_cpu_pct,
            l.prog_cpu_pct,
            l.prog_ns_per_call,
            l.records_per_s,
            l.lost,
            l.rss / 1048576.0
        );
        if l.conns_per_s < rate as f64 * 0.5 {
            bail!(
                "{label}: only {:.0} of {rate} connections/s were made: the machine cannot \
                 drive this load, the figures would not mean it",
                l.conns_per_s
            );
        }
        let what = format!(
            "{label}: {pods} pod veths, {:.0} new conn/s ({} failed) + iperf3 bulk, {secs} s",
            l.conns_per_s, l.failed
        );
        rows.push(
            Row::new(
                SECTION,
                format!("{what}: agent CPU, % of one core"),
                l.agent_cpu_pct,
                "%",
            )
            .target(Target::AtMost(10.0), On::Value, "<= 10% of a core"),
        );
        rows.push(
            Row::new(SECTION, "  records lost in the window", l.lost, "rec").target(
                Target::AtMost(0.0),
                On::Value,
                "0",
            ),
        );
        rows.push(Row::new(
            SECTION,
            format!(
                "  kernel CPU in tracer's tc programs, % of one core ({:.0} ns a call; info)",
                l.prog_ns_per_call
            ),
            l.prog_cpu_pct,
            "%",
        ));
        rows.push(Row::new(
            SECTION,
            "  records/s into the agent (info)",
            l.records_per_s,
            "rec/s",
        ));
        rows.push(Row::new(
            SECTION,
            format!(
                "  agent RSS at the end (peak {:.1} MiB; info)",
                l.hwm / 1048576.0
            ),
            l.rss,
            "B",
        ));
        rows.push(Row::new(
            SECTION,
            format!(
                "  /flows?dst=<server> during the load, p99 of {} (p50 {:.2} ms; info)",
                l.query_ms.len(),
                quantile(&l.query_ms, 0.5)
            ),
            quantile(&l.query_ms, 0.99),
            "ms",
        ));
    }
    Ok(rows)
}
