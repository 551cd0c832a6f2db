//! Section 3: time to verdict. The real agent in the node namespace, a pod connecting to the
//! apiserver, and a tight poll of `/flows?dst=<apiserver>` over one keep-alive connection made
//! inside the node namespace.
use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use tracer_lab::{
    daemon::LabDir,
    http::Connection,
    topo::{SingleNode, SingleNodeConfig},
};
use tracer_model::{FlowsPage, Verdict};

use crate::{
    agent,
    report::{median, quantile, On, Row, Target},
    Opts,
};

const SECTION: &str = "3 time to verdict";
const POLL: Duration = Duration::from_millis(2);
const NO_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let n_ok = if opts.quick { 3 } else { 10 };
    let n_fail = if opts.quick { 2 } else { 5 };
    let (snat, rtt_a) = measure(opts, SingleNode::healthy(), Verdict::SnatApplied, n_ok)?;
    let (no_reply, rtt_b) = measure(opts, SingleNode::seed_002(), Verdict::NoReply, n_fail)?;
    let no_reply: Vec<f64> = no_reply
        .iter()
        .map(|t| t - NO_REPLY_TIMEOUT.as_secs_f64() * 1e3)
        .collect();
    let rtt = median(&[rtt_a, rtt_b]);
    eprintln!("  snat_applied ms: {snat:.1?}\n  no_reply - 1 s ms: {no_reply:.1?}");
    Ok(vec![
        Row::new(
            SECTION,
            format!(
                "pod connect -> snat_applied in /flows (median of {}, max {:.1} ms)",
                snat.len(),
                quantile(&snat, 1.0)
            ),
            median(&snat),
            "ms",
        )
        .baseline(rtt)
        .target(Target::AtMost(100.0), On::Value, "<= 100 ms"),
        Row::new(
            SECTION,
            format!(
                "SYN -> no_reply in /flows minus the 1 s timeout (median of {}, max {:.1} ms)",
                no_reply.len(),
                quantile(&no_reply, 1.0)
            ),
            median(&no_reply),
            "ms",
        )
        .baseline(rtt)
        .target(Target::AtMost(100.0), On::Value, "<= 100 ms"),
    ])
}

/// Connects `n` times from the pod to the apiserver and times each until a new flow with
/// `verdict` is listed. Returns the times (ms) and the median /flows round trip (ms): the
/// baseline, i.e. how fast an answer can be seen at all.
fn measure(
    opts: &Opts,
    cfg: SingleNodeConfig,
    verdict: Verdict,
    n: usize,
) -> Result<(Vec<f64>, f64)> {
    let lab = SingleNode::build(&cfg)?;
    let dir = LabDir::create(&lab.prefix)?;
    let timeout = format!("{}s", NO_REPLY_TIMEOUT.as_secs());
    let agent = agent::start(
        &lab,
        &opts.tracer,
        &dir.join("agent-verdict.log"),
        &["--no-reply-timeout", &timeout],
    )?;
    let target = lab.apiserver_addr();
    let path = format!("/flows?dst={}", target.ip());
    let mut conn = Connection::open(&lab.node, agent.addr, Duration::from_secs(5))?;
    let mut rtts = Vec::new();
    let mut times = Vec::new();
    for _ in 0..n {
        let known = max_id(&query(&mut conn, &path, &mut rtts)?);
        let t0 = Instant::now();
        let connect = lab
            .pod
            .netns
            .spawn_thread("bench-connect", move || connect(target))?;
        let deadline = t0 + NO_REPLY_TIMEOUT + Duration::from_secs(5);
        let found = loop {
            let page = query(&mut conn, &path, &mut rtts)?;
            let hit = page
                .flows
                .iter()
                .any(|f| f.id > known && f.verdicts.contains(&verdict));
            if hit {
                break Some(t0.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(POLL);
        };
        let _ = connect.join();
        let t = found.ok_or_else(|| anyhow!("no flow with {verdict} appeared in {path}"))?;
        times.push(t.as_secs_f64() * 1e3);
    }
    Ok((times, median(&rtts)))
}

fn connect(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
}

fn query(conn: &mut Connection, path: &str, rtts: &mut Vec<f64>) -> Result<FlowsPage> {
    let t = Instant::now();
    let r = conn.request("GET", path, None)?;
    rtts.push(t.elapsed().as_secs_f64() * 1e3);
    if r.status != 200 {
        bail!("GET {path}: HTTP {}: {}", r.status, r.body);
    }
    Ok(serde_json::from_str(&r.body)?)
}

fn max_id(page: &FlowsPage) -> u64 {
    page.flows.iter().map(|f| f.id).max().unwrap_or(0)
}
