//! `tracer agent --flow-log`: a reader of the log sees every flow the agent had exactly once,
//! with its verdicts, whether it settled in the table, was evicted over `--flow-cap` before it
//! settled, or was still open at SIGTERM; and a log that cannot be opened stops the agent at
//! start with a clear error.
mod common;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{query, Res, TestResult, READY};
use tracer_lab::{netns::Netns, topo::SingleNode, traffic};
use tracer_model::{FlowLogRecord, LogReason, Verdict};

/// A port the lab's apiserver namespace drops SYNs to: connections there go unanswered.
const SILENT_PORT: u16 = 6555;
/// Small enough that the burst below evicts flows before they settle.
const FLOW_CAP: usize = 12;

/// A fresh directory of this test's own under the temp dir.
fn scratch(tag: &str) -> Res<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tracer-flowlog-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Every line of the log, parsed as the model's record (a line that does not parse fails).
fn read_log(path: &Path) -> Res<Vec<FlowLogRecord>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l}").into()))
        .collect()
}

#[test]
fn a_reader_sees_every_flow_exactly_once() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    lab.apiserver.exec(&[
        "iptables",
        "-w",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &SILENT_PORT.to_string(),
        "-j",
        "DROP",
    ])?;
    let dir = scratch("once")?;
    let log = dir.join("flows.ndjson");
    let log_arg = log.to_string_lossy().into_owned();
    let cap = FLOW_CAP.to_string();
    let mut agent = common::start(
        &lab.node,
        &[
            "--no-reply-timeout",
            "2s",
            "--flow-cap",
            &cap,
            "--flow-log",
            &log_arg,
            "--nodename",
            "lab-node-1",
        ],
    )?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let api = lab.apiserver_addr();
    let silent = SocketAddr::new(api.ip(), SILENT_PORT);
    let mut answered = 0;
    let mut answer = |n: usize| -> TestResult {
        for _ in 0..n {
            if !traffic::tcp_probe(&lab.pod.netns, api, Duration::from_secs(2))? {
                return Err("the apiserver did not answer".into());
            }
            answered += 1;
        }
        Ok(())
    };

    // Settled in the table: answered ones, and unanswered ones once the timeout has passed.
    answer(4)?;
    let unanswered = 4;
    for _ in 0..unanswered {
        // Closed before the SYN is retransmitted (1 s): one SYN, one flow.
        assert!(!traffic::tcp_probe(
            &lab.pod.netns,
            silent,
            Duration::from_millis(300)
        )?);
    }
    // Written as they settle, while the agent runs.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = read_log(&log)?;
        let settled = |port: u16| {
            now.iter()
                .filter(|r| r.flow.dport == port && r.logged == LogReason::Settled)
                .count()
        };
        if settled(api.port()) >= 4 && settled(SILENT_PORT) >= unanswered {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("after 15 s: {now:?}\n{}", agent.log_tail(20)).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // A burst over the cap: flows are evicted within the timeout, before they settle.
    answer(3 * FLOW_CAP)?;
    // Still open (unsettled) at SIGTERM.
    answer(3)?;
    let before = agent.flows(&lab.node, &query("limit=1000")?)?;
    let metrics = agent.get(&lab.node, "/metrics")?.text();
    let status = agent.signal_and_wait(libc::SIGTERM)?;
    assert!(status.success(), "{status}; log:\n{}", agent.log());

    let records = read_log(&log)?;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for r in &records {
        *seen.entry(r.flow.id).or_default() += 1;
        assert_eq!(r.node.as_deref(), Some("lab-node-1"), "{r:?}");
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "flows logged more than once: {twice:?}");
    // Every flow the agent had before shutdown is in the log.
    let missing: Vec<u64> = before
        .flows
        .iter()
        .map(|f| f.id)
        .filter(|id| !seen.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "in /flows, not in the log: {missing:?}");
    assert!(!before.truncated);
    // Every connection made is one line, with the right verdicts.
    let to = |port: u16| -> Vec<&FlowLogRecord> {
        records
            .iter()
            .filter(|r| r.flow.dst == api.ip() && r.flow.dport == port)
            .collect()
    };
    // A connection's flow is the one that saw its SYN. A connection still sending when the
    // burst evicted it (eviction is by last activity, approximately) goes on as a new,
    // mid-stream flow: a flow of its own, logged once too, never a second SYN flow.
    let ok = to(api.port());
    let (opened, tails): (Vec<&FlowLogRecord>, Vec<&FlowLogRecord>) =
        ok.iter().partition(|r| r.flow.tcp.is_some_and(|t| t.syn));
    assert_eq!(opened.len(), answered, "one line per answered connection");
    let ports: HashSet<u16> = opened.iter().map(|r| r.flow.sport).collect();
    assert_eq!(ports.len(), answered, "distinct connections");
    for r in &opened {
        assert!(r.flow.verdicts.contains(&Verdict::Replied), "{r:?}");
    }
    for r in &tails {
        assert!(
            ports.contains(&r.flow.sport),
            "a tail of no connection: {r:?}"
        );
    }
    let silent_lines = to(SILENT_PORT);
    assert_eq!(silent_lines.len(), unanswered);
    for r in &silent_lines {
        assert!(r.flow.verdicts.contains(&Verdict::NoReply), "{r:?}");
        assert_eq!(r.logged, LogReason::Settled, "{r:?}");
    }
    // All three ways out were taken.
    let by = |why: LogReason| records.iter().filter(|r| r.logged == why).count();
    eprintln!(
        "flow log: {} lines (settled {}, evicted {}, shutdown {}), {} connection tails",
        records.len(),
        by(LogReason::Settled),
        by(LogReason::Evicted),
        by(LogReason::Shutdown),
        tails.len()
    );
    for why in LogReason::ALL {
        assert!(by(*why) > 0, "no {why} line: {records:?}");
    }
    // Nothing was dropped, and the metrics counted what was written by then.
    assert!(
        metrics.contains("tracer_flow_log_dropped_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("tracer_flow_log_lines_total{logged=\"settled\"}"));
    assert!(agent.log().contains("flow log written"), "{}", agent.log());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_flow_log_that_cannot_be_opened_stops_the_agent_at_start() -> TestResult {
    let ns = Netns::create(&format!("{}-flowlog", tracer_lab::netns::unique_prefix()))?;
    let dir = scratch("bad")?;
    let missing_dir = dir.join("no-such-dir").join("flows.ndjson");
    for bad in [missing_dir.as_path(), dir.as_path()] {
        let bad = bad.to_string_lossy().into_owned();
        let mut agent = common::start(&ns, &["--flow-log", &bad])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = agent.exited() {
                break st;
            }
            if Instant::now() > deadline {
                return Err(format!("agent kept running with --flow-log {bad}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success());
        let log = agent.log();
        assert!(
            log.contains(&format!("opening the flow log {bad}")),
            "{bad}: {log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
