//! Section 5: a big cluster. N real agents, each in a node namespace of its own on one shared
//! LAN, attached on demand to the node's NIC only (so a hundred fit on this machine), each
//! holding the flows of a few real connections to one address. The real `tracer flows --agents
//! ...` client, run in a client namespace, merges their answers: its wall time per query and its
//! peak RSS (getrusage of the child) are measured against the same client asking one agent.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tracer_lab::{
    agent::{Agent, Launch},
    daemon::{poll, LabDir},
    netns::{unique_prefix, Netns},
};
use tracer_model::{attach::AttachRequest, defaults::API_PORT, FlowQuery};

use crate::{
    report::{quantile, On, Row, Target},
    Opts,
};

const SECTION: &str = "5 big cluster";
/// The address every node's connections go to (the client namespace listens there).
const SINK: Ipv4Addr = Ipv4Addr::new(10, 77, 255, 1);
const SINK_PORT: u16 = 7000;
/// Connections each node makes: flows each agent holds for the query.
const CONNS_PER_NODE: usize = 10;
/// The merged answer's size: every node has more matches than this, so the answer is the same
/// size whatever the node count (what the client's memory should follow).
const LIMIT: usize = 10;

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, (i / 250) as u8, (i % 250 + 1) as u8)
}

struct Lan {
    // Dropped in declaration order: agents before their namespaces.
    agents: Vec<Agent>,
    nodes: Vec<Netns>,
    client: Netns,
    _switch: Netns,
    _dir: LabDir,
}

fn build(opts: &Opts, n: usize) -> Result<Lan> {
    let prefix = unique_prefix();
    let dir = LabDir::create(&format!("{prefix}-cluster"))?;
    let switch = Netns::create(&format!("{prefix}cs"))?;
    switch.ip(&["link", "add", "br0", "type", "bridge"])?;
    switch.ip(&["link", "set", "br0", "up"])?;
    let client = Netns::create(&format!("{prefix}cc"))?;
    let plug = |ns: &Netns, port: &str, addr: Ipv4Addr| -> Result<()> {
        switch.add_veth(port, "eth0", ns)?;
        switch.ip(&["link", "set", port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{addr}/16"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(())
    };
    plug(&client, "pc", SINK)?;
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let ns = Netns::create(&format!("{prefix}c{i}"))?;
        plug(&ns, &format!("p{i}"), node_ip(i))?;
        nodes.push(ns);
    }
    let mut agents = Vec::with_capacity(n);
    for (i, ns) in nodes.iter().enumerate() {
        let listen = SocketAddr::new(IpAddr::V4(node_ip(i)), API_PORT);
        let agent = Launch::with_args(&[
            "--attach",
            "on-demand",
            "--insecure",
            // Small kernel maps and ring: a hundred agents' worth must fit beside each other.
            "--ringbuf-bytes",
            "262144",
            "--kernel-flow-entries",
            "4096",
        ])
        .listen(listen)
        .env("TRACER_LOG", "warn")
        .start(
            ns,
            &format!("agent {i}"),
            &opts.tracer,
            &dir.join(&format!("agent-{i}.log")),
        )?;
        agents.push(agent);
    }
    for (i, (agent, ns)) in agents.iter_mut().zip(&nodes).enumerate() {
        agent
            .wait_ready(ns, Duration::from_secs(60))
            .with_context(|| format!("agent {i}"))?;
        agent.attach(
            ns,
            &AttachRequest::Iface {
                iface: "eth0".into(),
            },
        )?;
    }
    Ok(Lan {
        agents,
        nodes,
        client,
        _switch: switch,
        _dir: dir,
    })
}

impl Lan {
    /// SIGTERM to every agent at once, then the namespaces: one by one, each agent's grace
    /// would add up.
    fn stop(self) {
        for a in &self.agents {
            if let Ok(pid) = libc::pid_t::try_from(a.pid()) {
                // SAFETY: kill(2) on our own child, not yet reaped (the Agent still holds it).
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        drop(self);
    }
}

/// Every node connects to the sink CONNS_PER_NODE times; the sink accepts and closes.
fn traffic(lan: &Lan) -> Result<()> {
    let sink = lan
        .client
        .listen(SocketAddr::new(IpAddr::V4(SINK), SINK_PORT), "sink")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match sink.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        })
    };
    let to = SocketAddr::new(IpAddr::V4(SINK), SINK_PORT);
    let mut result = Ok(());
    for ns in &lan.nodes {
        let made = ns.run(move || -> std::io::Result<()> {
            for _ in 0..CONNS_PER_NODE {
                drop(TcpStream::connect_timeout(&to, Duration::from_secs(2))?);
            }
            Ok(())
        });
        if let Err(e) = made.map_err(anyhow::Error::from).and_then(|r| Ok(r?)) {
            result = Err(e).context(format!("connecting from {}", ns.name()));
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = accepter.join();
    result?;
    // Every agent has read its flows before the clock starts.
    let q = FlowQuery::parse(Some(&format!("dst={SINK}")))?;
    for (agent, ns) in lan.agents.iter().zip(&lan.nodes) {
        let seen = poll(Duration::from_secs(10), Duration::from_millis(50), || {
            agent
                .flows(ns, &q)
                .ok()
                .filter(|p| p.matched >= CONNS_PER_NODE)
        });
        if seen.is_none() {
            bail!("the agent in {} never showed its connections", ns.name());
        }
    }
    Ok(())
}

/// One run of the real client in the client namespace against the first `n` agents: wall
/// time (ms), peak RSS (KiB), flows printed.
fn query(opts: &Opts, lan: &Lan, n: usize) -> Result<(f64, f64, usize)> {
    let urls: Vec<String> = (0..n)
        .map(|i| format!("http://{}:{API_PORT}", node_ip(i)))
        .collect();
    let mut cmd = lan.client.command(&opts.tracer.to_string_lossy());
    cmd.args(["flows", "--agents", &urls.join(",")])
        .args(["--dst", &SINK.to_string(), "--limit", &LIMIT.to_string()])
        .args(["-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let child = cmd.spawn().context("spawning tracer flows")?;
    let pid = child.id() as libc::pid_t;
    // wait4 for the child's own rusage (ip netns exec execs the client, same pid).
    let out = read_all(child)?;
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills; pid is our child, not yet reaped.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("tracer flows over {n} agents failed ({status}): {}", out.1);
    }
    let flows = out.0.lines().filter(|l| !l.trim().is_empty()).count();
    Ok((ms, ru.ru_maxrss as f64, flows))
}

/// The child's stdout and stderr, read to the end (it is reaped by the caller).
fn read_all(mut child: std::process::Child) -> Result<(String, String)> {
    use std::io::Read;
    let mut err_pipe = child.stderr.take().context("no stderr")?;
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("no stdout")?
        .read_to_string(&mut out)?;
    let err = err.join().unwrap_or_default();
    // The Child handle is dropped without wait(): the caller reaps it with wait4.
    std::mem::forget(child);
    Ok((out, err))
}

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let n = if opts.quick { 10 } else { 100 };
    let rounds = if opts.quick { 5 } else { 20 };
    let t = Instant::now();
    let lan = build(opts, n)?;
    eprintln!("  {n} agents up and attached in {:.1?}", t.elapsed());
    let t = Instant::now();
    traffic(&lan)?;
    eprintln!(
        "  {} connections made and seen by their agents in {:.1?}",
        n * CONNS_PER_NODE,
        t.elapsed()
    );
    let rss_agents: Vec<f64> = lan.agents.iter().map(|a| a.rss_kib() as f64).collect();
    // Interleaved so load drifts hit both alike: 1 agent, then all.
    let (mut one_ms, mut one_rss, mut all_ms, mut all_rss) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (ms, rss, flows) = query(opts, &lan, 1)?;
        if flows != LIMIT {
            bail!("one agent answered {flows} flows, not {LIMIT}");
        }
        one_ms.push(ms);
        one_rss.push(rss);
        let (ms, rss, flows) = query(opts, &lan, n)?;
        if flows != LIMIT {
            bail!("{n} agents merged into {flows} flows, not {LIMIT}");
        }
        all_ms.push(ms);
        all_rss.push(rss);
    }
    eprintln!("  1 agent ms: {one_ms:.1?}\n  {n} agents ms: {all_ms:.1?}");
    let t = Instant::now();
    lan.stop();
    eprintln!("  torn down in {:.1?}", t.elapsed());
    let p = |v: &[f64], q: f64| quantile(v, q);
    Ok(vec![
        Row::new(
            SECTION,
            format!(
                "`tracer flows --agents <{n}> --dst <ip> --limit {LIMIT}`, merged, p50 \
                 (baseline: 1 agent; {rounds} runs each, whole client process)"
            ),
            p(&all_ms, 0.5),
            "ms",
        )
        .baseline(p(&one_ms, 0.5)),
        Row::new(
            SECTION,
            format!("  same, p99 over {n} agents"),
            p(&all_ms, 0.99),
            "ms",
        )
        .baseline(p(&one_ms, 0.99))
        .target(Target::AtMost(2000.0), On::Value, "<= 2 s"),
        Row::new(
            SECTION,
            format!(
                "  client peak RSS over {n} agents, same {LIMIT}-flow answer (baseline: 1 agent)"
            ),
            p(&all_rss, 1.0) * 1024.0,
            "B",
        )
        .baseline(p(&one_rss, 1.0) * 1024.0)
        .target(
            Target::AtMost(1.25),
            On::Ratio,
            "<= 1.25x: follows the answer, not the nodes",
        ),
        Row::new(
            SECTION,
            format!("agent RSS, on demand on one NIC, median of {n} (info)"),
            p(&rss_agents, 0.5) * 1024.0,
            "B",
        ),
    ])
}
