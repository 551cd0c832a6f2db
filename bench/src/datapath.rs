//! Section 1: data-path overhead. iperf3 from the pod through its cali veth, the node and eth0
//! to the apiserver namespace (SingleNode::healthy, masqueraded), with no probes, with the
//! tracer agent, with two tcpdump captures instead, and with an empty tc program on the agent's
//! hooks: what attaching anything costs, which no program of ours can get below.
use std::{
    collections::{HashMap, HashSet},
    os::fd::{FromRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use tracer_lab::{
    daemon::{Daemon, LabDir},
    netns::Netns,
    topo::SingleNode,
};

use crate::{
    agent::{self, output_in, wait_log},
    report::{bootstrap_ci, fmt_num, mean, median, On, Row, Target},
    Opts,
};

const SECTION: &str = "1 data path";
const IPERF_PORT: &str = "5201";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    None,
    Agent,
    Tcpdump,
    Empty,
}

impl Probe {
    fn label(self) -> &'static str {
        match self {
            Probe::None => "(a) no probes",
            Probe::Agent => "(b) tracer agent",
            Probe::Tcpdump => "(c) 2x tcpdump -w",
            Probe::Empty => "(d) empty program",
        }
    }
}

/// What is running for one configuration; dropping it stops it.
enum Running {
    None,
    Agent(tracer_lab::agent::Agent),
    Tcpdump(Vec<Daemon>, Vec<PathBuf>),
    /// Dropping the empty program's TCX links detaches it.
    Empty {
        _links: Vec<OwnedFd>,
    },
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Tcpdump(daemons, files) = self {
            daemons.clear();
            for f in files.iter() {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// One round's figures, indexed like `configs`: (a), (b), (c), (d).
#[derive(Default)]
struct Round {
    tcp: [f64; CONFIGS],
    udp: [f64; CONFIGS],
}

const CONFIGS: usize = 4;

/// More, shorter rounds: the spread is between rounds (what else the machine did meanwhile), not
/// within a run, so rounds narrow the interval more than seconds do.
const ROUNDS: usize = 12;
const SECS: u32 = 3;
/// A round whose no-probe figure is further than this from the median of its neighbours' (the
/// `NEIGHBOURS` rounds before and after it) is redone: the machine changed during the round.
/// Idle, the no-probe UDP rounds of one run spread by about +-15%.
const BASELINE_BOUND: f64 = 0.15;
const NEIGHBOURS: usize = 2;
const TCP_TARGET: f64 = 0.98;
const UDP_TARGET: f64 = 0.95;
/// iperf3's client on CPU 0, its server on CPU 1: the two ends never queue behind each other,
/// and each configuration sees the same placement.
const PIN: &str = "-A 0,1";

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let dir = LabDir::create(&lab.prefix)?;
    let server_ip = lab.config.apiserver_ip.clone();
    let server_log = dir.join("iperf3-server.log");
    let mut server = Daemon::spawn(
        &lab.apiserver,
        "iperf3 server",
        Command::new("iperf3").args(["-s", "--forceflush", "-B", &server_ip, "-p", IPERF_PORT]),
        &server_log,
        Duration::from_secs(2),
    )?;
    wait_log(
        &mut server,
        &server_log,
        "Server listening",
        Duration::from_secs(5),
    )?;

    // The noise-free figures first, so that every live ratio can stand beside them.
    let tc_rows = crate::tccost::rows(SECTION, 1_000_000)?;
    let secs = if opts.quick { 2 } else { SECS };
    let rounds = match opts.rounds {
        Some(n) => n as usize,
        None if opts.quick => 2,
        None => ROUNDS,
    };
    let configs = [Probe::None, Probe::Agent, Probe::Tcpdump, Probe::Empty];
    // (d) goes on the hooks the agent attaches to: learn them from one agent run first.
    let floor = crate::floor::Floor::load()?;
    let hooks_of_agent = {
        let running = start(Probe::Agent, &lab, &dir, opts, None)?;
        match &running {
            Running::Agent(a) => agent_hooks(a.pid())?,
            _ => Vec::new(),
        }
    };
    if hooks_of_agent.is_empty() {
        eprintln!("  (d) skipped: the agent holds no TCX link (clsact filters are not links)");
    }
    let empty = (!hooks_of_agent.is_empty()).then_some((&floor, hooks_of_agent.as_slice()));
    let load_before = crate::load1();
    eprintln!("  load average before: {load_before:.2}; {rounds} rounds, iperf3 pinned: {PIN}");
    let mut kept: Vec<Round> = Vec::new();
    let mut discarded = 0usize;
    let mut run_count = 0usize;
    let mut agent_packets = 0u64;
    loop {
        while kept.len() < rounds {
            let mut round = Round::default();
            // Rotate the order so that each configuration runs first, second and third in turn.
            for k in 0..configs.len() {
                let idx = (k + run_count) % configs.len();
                let probe = configs[idx];
                if probe == Probe::Empty && empty.is_none() {
                    continue;
                }
                let running = start(probe, &lab, &dir, opts, empty)?;
                let tcp = iperf(&lab.pod.netns, &server_ip, secs, false)?;
                let udp = iperf(&lab.pod.netns, &server_ip, secs, true)?;
                if let Running::Agent(a) = &running {
                    // The programs really were in the path: count what they saw.
                    let packets = a.health(&lab.node)?.detail.map_or(0, |d| d.kernel.packets);
                    agent_packets = agent_packets.max(packets);
                }
                drop(running);
                eprintln!(
                    "  round {} {:<18} tcp {:>6.2} Gbit/s  udp64 {:>7.0} pkt/s  (load {:.2})",
                    run_count + 1,
                    probe.label(),
                    tcp / 1e9,
                    udp,
                    crate::load1()
                );
                round.tcp[idx] = tcp;
                round.udp[idx] = udp;
            }
            run_count += 1;
            kept.push(round);
        }
        // The ratios divide by the round's own no-probe figure: when that moved away from its
        // neighbours', something else took the machine during the round. Redo such rounds (up
        // to `rounds` redos in all, then keep what comes and say so).
        let moved = moved_rounds(&kept, BASELINE_BOUND);
        if moved.is_empty() {
            break;
        }
        if discarded + moved.len() > rounds {
            eprintln!(
                "  rounds {moved:?} moved more than {:.0}% from their neighbours, but the redo \
                 budget ({rounds}) is spent: kept",
                BASELINE_BOUND * 100.0
            );
            break;
        }
        for &i in moved.iter().rev() {
            kept.remove(i);
            eprintln!(
                "  kept round {} discarded: its no-probe figures moved more than {:.0}% from \
                 its neighbours' median; redoing it",
                i + 1,
                BASELINE_BOUND * 100.0
            );
        }
        discarded += moved.len();
    }
    let load_after = crate::load1();
    eprintln!("  load average after: {load_after:.2}");
    // The programs' own cost per packet, which the noisy throughput ratios can only hint at:
    // one more agent run with BPF run-time stats on (they add two clock reads per program run,
    // so not during the runs above).
    // What the agent and its programs do during each transfer: hook calls, records and the
    // agent's own CPU (ring reader wakeups and all), per second.
    let mut during: Vec<(&str, Activity)> = Vec::new();
    // Then the empty program on the same hooks during the same transfers (the live floor).
    let mut floor_during: Vec<(f64, f64)> = Vec::new();
    let prog_ns = match enable_bpf_stats() {
        Ok(fd) => {
            let running = start(Probe::Agent, &lab, &dir, opts, None)?;
            let by_type = match &running {
                Running::Agent(a) => {
                    for (what, udp) in [("TCP bulk", false), ("UDP 64 B", true)] {
                        let before = Activity::sample(a, &lab)?;
                        iperf(&lab.pod.netns, &server_ip, 2, udp)?;
                        let after = Activity::sample(a, &lab)?;
                        during.push((what, after.since(&before)));
                    }
                    prog_run_time(a.pid())?
                }
                _ => HashMap::new(),
            };
            drop(running);
            // On the hooks learnt before the rounds, as (d).
            match empty {
                Some((floor, hooks)) => {
                    floor_during = live_floor(&lab, floor, hooks, &server_ip)?;
                }
                None => eprintln!("  live floor skipped: the agent holds no TCX link"),
            }
            drop(fd);
            by_type
        }
        Err(e) => {
            eprintln!("  BPF run-time stats unavailable: {e:#}");
            HashMap::new()
        }
    };
    drop(server);

    let per_config = |f: fn(&Round) -> [f64; CONFIGS], k: usize| -> Vec<f64> {
        kept.iter().map(|r| f(r)[k]).collect()
    };
    let tcp_of = |r: &Round| r.tcp;
    let udp_of = |r: &Round| r.udp;
    // Ratios are paired: each round's probe figure over the same round's no-probe one.
    let ratios = |f: fn(&Round) -> [f64; CONFIGS], k: usize| -> Vec<f64> {
        kept.iter().map(|r| f(r)[k] / f(r)[0]).collect()
    };
    let range = |v: &[f64], scale: f64| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min) / scale;
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max) / scale;
        format!("{lo:.1}-{hi:.1}")
    };
    let test_run = |what: &str| {
        tc_rows
            .iter()
            .find(|r| r.metric.contains(what))
            .map(|r| format!("{:.0} ns", r.value))
            .unwrap_or_else(|| "?".into())
    };
    let mut rows = vec![Row::new(
        SECTION,
        format!(
            "method: {} rounds kept ({discarded} discarded: no-probe moved > {:.0}% from the \
             median of its {NEIGHBOURS}+{NEIGHBOURS} neighbours'), order rotated, iperf3 {PIN}; \
             95% bootstrap CI of the mean per-round ratio; load {load_before:.2} before, \
             {load_after:.2} after",
            kept.len(),
            BASELINE_BOUND * 100.0
        ),
        f64::NAN,
        "",
    )];
    for (name, f, unit, scale, scale_unit, target, beside) in [
        (
            "TCP bulk",
            tcp_of as fn(&Round) -> [f64; CONFIGS],
            "bit/s",
            1e9,
            "Gbit/s",
            TCP_TARGET,
            format!(
                "test run: ACK {}, 1448 B segment {}",
                test_run("TCP ACK"),
                test_run("1448 B")
            ),
        ),
        (
            "UDP 64 B received",
            udp_of,
            "pkt/s",
            1e3,
            "kpkt/s",
            UDP_TARGET,
            format!("test run: {}", test_run("UDP datagram")),
        ),
    ] {
        let a = per_config(f, 0);
        rows.push(Row::new(
            SECTION,
            format!(
                "{name}, (a) no probes, median of {} x {secs} s [rounds: {} {scale_unit}]",
                kept.len(),
                range(&a, scale)
            ),
            median(&a),
            unit,
        ));
        let (rb, rc) = (ratios(f, 1), ratios(f, 2));
        let (blo, bhi) = bootstrap_ci(&rb);
        let (clo, chi) = bootstrap_ci(&rc);
        rows.push(
            Row::new(
                SECTION,
                format!(
                    "{name}, (b) tracer agent: (b)/(a) [rounds: {} {scale_unit}; {beside}]",
                    range(&per_config(f, 1), scale)
                ),
                median(&a) * mean(&rb),
                unit,
            )
            .baseline(median(&a))
            .ci(blo, bhi)
            .target(Target::AtLeast(target), On::Ratio, format!(">= {target}"))
            .extra(blo > chi, format!("CI above tcpdump's ({chi:.3})")),
        );
        rows.push(
            Row::new(
                SECTION,
                format!(
                    "{name}, (c) 2x tcpdump: (c)/(a) [rounds: {} {scale_unit}]",
                    range(&per_config(f, 2), scale)
                ),
                median(&a) * mean(&rc),
                unit,
            )
            .baseline(median(&a))
            .ci(clo, chi),
        );
        if empty.is_some() {
            // (b)/(a) = (d)/(a) x (b)/(d): what any attached program costs, and what tracer's
            // program adds on top of the empty one, each paired within its round.
            let rd = ratios(f, 3);
            let (dlo, dhi) = bootstrap_ci(&rd);
            rows.push(
                Row::new(
                    SECTION,
                    format!(
                        "{name}, (d) empty program on the agent's hooks: (d)/(a), the floor of \
                         any probe [rounds: {} {scale_unit}; by (b)'s rule (lower bound >= \
                         {target}) it would {}; info]",
                        range(&per_config(f, 3), scale),
                        if dlo >= target { "pass" } else { "miss" }
                    ),
                    median(&a) * mean(&rd),
                    unit,
                )
                .baseline(median(&a))
                .ci(dlo, dhi),
            );
            let own: Vec<f64> = kept.iter().map(|r| f(r)[1] / f(r)[3]).collect();
            let (olo, ohi) = bootstrap_ci(&own);
            let d = per_config(f, 3);
            rows.push(
                Row::new(
                    SECTION,
                    format!("{name}, tracer's program over the empty one: (b)/(d) (info)"),
                    median(&d) * mean(&own),
                    unit,
                )
                .baseline(median(&d))
                .ci(olo, ohi),
            );
        }
    }
    rows.push(Row::new(
        SECTION,
        "packets the agent's tc programs saw (one run, sanity)",
        agent_packets as f64,
        "pkt",
    ));
    for (t, what) in [
        (PROG_SCHED_CLS, "tc programs, per hook call"),
        (PROG_TRACEPOINT, "kfree_skb tracepoint, per kernel skb free"),
    ] {
        if let Some(&(ns, cnt)) = prog_ns.get(&t).filter(|(_, c)| *c > 0) {
            let row = Row::new(
                SECTION,
                format!(
                    "run time of the agent's {what} (BPF stats, 2 s TCP + 2 s UDP, {} calls)",
                    fmt_num(cnt as f64, "")
                ),
                ns as f64 / cnt as f64,
                "ns",
            );
            rows.push(if t == PROG_SCHED_CLS {
                row.target(Target::AtMost(130.0), On::Value, "<= 130 ns")
            } else {
                row
            });
        }
    }
    for ((what, d), &(calls, ns)) in during.iter().zip(&floor_during) {
        let tracer = d.prog_ns / d.calls.max(1.0);
        let empty = ns / calls.max(1.0);
        rows.push(Row::new(
            SECTION,
            format!(
                "live floor: empty tc program on the agent's {} hooks during a 2 s {what} ({} \
                 calls; tracer's {tracer:.0} ns = {:.2}x; info)",
                hooks_of_agent.len(),
                fmt_num(calls, ""),
                tracer / empty
            ),
            empty,
            "ns",
        ));
    }
    for (what, d) in &during {
        let per_s = |v: f64| v / d.secs().max(1e-3);
        rows.push(Row::new(
            SECTION,
            format!(
                "agent CPU during a 2 s {what} ({} hook calls/s at {:.0} ns, {} records/s; info)",
                fmt_num(per_s(d.calls), ""),
                d.prog_ns / d.calls.max(1.0),
                fmt_num(per_s(d.records), "")
            ),
            per_s(d.agent_cpu_s) * 100.0,
            "% of a core",
        ));
    }
    // The same programs without traffic or stats overhead: independent of load.
    rows.extend(tc_rows);
    Ok(rows)
}

/// Indexes of the rounds whose no-probe TCP or UDP figure is further than `bound` (relative)
/// from the median of its neighbours' (up to `NEIGHBOURS` rounds either side, in run order).
/// Judged against neighbours rather than against the rounds before: an outlier first round
/// would otherwise become the anchor that every later round is discarded against.
fn moved_rounds(rounds: &[Round], bound: f64) -> Vec<usize> {
    let moved = |i: usize, f: fn(&Round) -> f64| {
        let lo = i.saturating_sub(NEIGHBOURS);
        let hi = (i + NEIGHBOURS + 1).min(rounds.len());
        let around: Vec<f64> = (lo..hi)
            .filter(|&j| j != i)
            .map(|j| f(&rounds[j]))
            .collect();
        let base = median(&around);
        base.is_finite() && base > 0.0 && (f(&rounds[i]) / base - 1.0).abs() > bound
    };
    (0..rounds.len())
        .filter(|&i| moved(i, |r| r.tcp[0]) || moved(i, |r| r.udp[0]))
        .collect()
}

/// Starts one configuration; `empty` is the empty program and the hooks it goes on, for (d).
fn start(
    probe: Probe,
    lab: &SingleNode,
    dir: &LabDir,
    opts: &Opts,
    empty: Option<(&crate::floor::Floor, &[Hook])>,
) -> Result<Running> {
    match probe {
        Probe::None => Ok(Running::None),
        Probe::Empty => {
            let (floor, hooks) = empty.ok_or_else(|| anyhow!("(d) without the agent's hooks"))?;
            Ok(Running::Empty {
                _links: attach_empty(lab, floor, hooks)?,
            })
        }
        Probe::Agent => {
            let a = agent::start(lab, &opts.tracer, &dir.join("agent-dp.log"), &[])?;
            Ok(Running::Agent(a))
        }
        Probe::Tcpdump => {
            let mut daemons = Vec::new();
            let mut files = Vec::new();
            for iface in [lab.pod.veth.as_str(), lab.node_nic.as_str()] {
                let pcap = dir.join(&format!("{iface}.pcap"));
                let log = dir.join(&format!("tcpdump-{iface}.log"));
                // Headers only (-s 128): full 64 KB GSO frames would write GB/s to disk and
                // measure the disk; tracer reads headers only too.
                let mut d = Daemon::spawn(
                    &lab.node,
                    "tcpdump",
                    Command::new("tcpdump")
                        .args(["-i", iface, "-s", "128", "-w"])
                        .arg(&pcap),
                    &log,
                    Duration::from_secs(2),
                )?;
                wait_log(&mut d, &log, "listening on", Duration::from_secs(10))?;
                daemons.push(d);
                files.push(pcap);
            }
            Ok(Running::Tcpdump(daemons, files))
        }
    }
}

/// One iperf3 run from the pod; TCP: received bit/s; UDP (64-byte payloads, unlimited rate):
/// datagrams/s the server received.
fn iperf(pod: &Netns, server: &str, secs: u32, udp: bool) -> Result<f64> {
    let mut last = None;
    // The server takes one test at a time and needs a moment between tests.
    for _ in 0..5 {
        let mut cmd = Command::new("iperf3");
        cmd.args(["-c", server, "-p", IPERF_PORT, "-J", "-t"])
            .arg(secs.to_string())
            .args(PIN.split(' '));
        if udp {
            cmd.args(["-u", "-l", "64", "-b", "0"]);
        }
        match output_in(pod, &mut cmd).and_then(|out| parse(&out, udp)) {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(last.unwrap_or_else(|| anyhow!("iperf3 never ran")))
}

/// Counters of one agent run, to difference over a transfer.
struct Activity {
    /// The interval the counters cover: one instant in a sample, two after `since`.
    from: std::time::Instant,
    at: std::time::Instant,
    agent_cpu_s: f64,
    records: f64,
    /// tc program runs and their run time (ns), while BPF run-time stats are on.
    calls: f64,
    prog_ns: f64,
}

impl Activity {
    fn sample(a: &tracer_lab::agent::Agent, lab: &SingleNode) -> Result<Activity> {
        let records = a.health(&lab.node)?.detail.map_or(0, |d| d.kernel.records);
        let (ns, calls) = prog_run_time(a.pid())?
            .get(&PROG_SCHED_CLS)
            .copied()
            .unwrap_or_default();
        let now = std::time::Instant::now();
        Ok(Activity {
            from: now,
            at: now,
            agent_cpu_s: crate::busy::cpu_s(a.pid())?,
            records: records as f64,
            calls: calls as f64,
            prog_ns: ns as f64,
        })
    }

    fn since(&self, before: &Activity) -> Activity {
        Activity {
            from: before.at,
            at: self.at,
            agent_cpu_s: self.agent_cpu_s - before.agent_cpu_s,
            records: self.records - before.records,
            calls: self.calls - before.calls,
            prog_ns: self.prog_ns - before.prog_ns,
        }
    }

    fn secs(&self) -> f64 {
        self.at.duration_since(self.from).as_secs_f64()
    }
}

/// BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel times every program run while the fd is open.
pub(crate) fn enable_bpf_stats() -> Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr's enable_stats member: { __u32 type }, BPF_STATS_RUN_TIME = 0.
    let attr = [0u32; 4];
    // SAFETY: bpf(2) reads size_of_val(&attr) bytes from a live buffer; returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_ENABLE_STATS");
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF program types, as /proc/PID/fdinfo shows them.
pub(crate) const PROG_SCHED_CLS: u64 = 3;
const PROG_TRACEPOINT: u64 = 5;

/// The /proc/PID/fdinfo texts of the BPF programs process `pid` holds open, one per program.
fn prog_fdinfo(pid: u32) -> Result<Vec<String>> {
    let mut seen = HashSet::new();
    Ok(fdinfo_of(pid, "anon_inode:bpf-prog")?
        .into_iter()
        .filter(|t| seen.insert(fdinfo_field(t, "prog_id")))
        .collect())
}

/// The /proc/PID/fdinfo texts of the descriptors of process `pid` that link to `target`.
fn fdinfo_of(pid: u32, target: &str) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        if !std::fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == target) {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = std::fs::read_to_string(&info) else {
            continue;
        };
        texts.push(text);
    }
    Ok(texts)
}

/// The value of one `key:\tvalue` line of an fdinfo text, trimmed.
fn fdinfo_text<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// One numeric `key:\tvalue` field of an fdinfo text (0 when absent).
pub(crate) fn fdinfo_field(text: &str, key: &str) -> u64 {
    fdinfo_text(text, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Run time (ns) and run count per program type of the programs process `pid` holds open, from
/// /proc/PID/fdinfo (filled while BPF run-time stats are enabled).
pub(crate) fn prog_run_time(pid: u32) -> Result<HashMap<u64, (u64, u64)>> {
    let mut by_type: HashMap<u64, (u64, u64)> = HashMap::new();
    for text in prog_fdinfo(pid)? {
        let e = by_type.entry(fdinfo_field(&text, "prog_type")).or_default();
        e.0 += fdinfo_field(&text, "run_time_ns");
        e.1 += fdinfo_field(&text, "run_cnt");
    }
    Ok(by_type)
}

/// One tc hook: interface index in the node's namespace and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Hook {
    ifindex: u32,
    ingress: bool,
}

/// The TCX hooks process `pid` attached its programs to (in its network namespace), from the
/// fdinfo of the links it holds. Clsact filters (kernels before 6.6) are not links: none found.
fn agent_hooks(pid: u32) -> Result<Vec<Hook>> {
    let mut hooks = Vec::new();
    for text in fdinfo_of(pid, "anon_inode:bpf_link")? {
        if let Some(hook) = tcx_hook(&text) {
            if !hooks.contains(&hook) {
                hooks.push(hook);
            }
        }
    }
    Ok(hooks)
}

/// The hook of a TCX link's fdinfo (`link_type: tcx`, `ifindex: N`, `attach_type: 46 (ingress)`).
fn tcx_hook(fdinfo: &str) -> Option<Hook> {
    let field = |k: &str| fdinfo_text(fdinfo, k);
    if field("link_type")? != "tcx" {
        return None;
    }
    Some(Hook {
        ifindex: field("ifindex")?.parse().ok()?,
        ingress: field("attach_type")?.ends_with("(ingress)"),
    })
}

/// The empty tc program (floor.rs) attached as TCX links on `hooks` in the node's namespace,
/// with BPF run-time stats on (the caller holds them), during the same 2 s TCP bulk and 64 B
/// UDP transfers as the agent's: its run time per call is what the stats' clock pair and a
/// cold skb cost on this machine, whatever the program does. Returns (calls, ns) per transfer.
fn live_floor(
    lab: &SingleNode,
    floor: &crate::floor::Floor,
    hooks: &[Hook],
    server_ip: &str,
) -> Result<Vec<(f64, f64)>> {
    let links = attach_empty(lab, floor, hooks)?;
    let mut out = Vec::new();
    for udp in [false, true] {
        let before = floor.run_stats()?;
        iperf(&lab.pod.netns, server_ip, 2, udp)?;
        let after = floor.run_stats()?;
        out.push(((after.1 - before.1) as f64, (after.0 - before.0) as f64));
    }
    drop(links);
    Ok(out)
}

/// The empty program attached as TCX links on `hooks` in the node's namespace. Dropping the
/// link fds detaches it: nothing stays attached, also on an error after this.
fn attach_empty(
    lab: &SingleNode,
    floor: &crate::floor::Floor,
    hooks: &[Hook],
) -> Result<Vec<OwnedFd>> {
    let prog = floor.raw_fd();
    let hooks = hooks.to_vec();
    lab.node.run(move || {
        hooks
            .iter()
            .map(|h| crate::floor::Floor::attach_tcx(prog, h.ifindex, h.ingress))
            .collect::<Result<Vec<_>>>()
    })?
}

fn parse(json: &str, udp: bool) -> Result<f64> {
    let v: Value = serde_json::from_str(json).context("iperf3 -J output")?;
    let sum = &v["end"]["sum_received"];
    let get = |k: &str| {
        sum[k]
            .as_f64()
            .ok_or_else(|| anyhow!("iperf3: no end.sum_received.{k}: {}", v["error"]))
    };
    if udp {
        Ok(get("bytes")? / 64.0 / get("seconds")?)
    } else {
        get("bits_per_second")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounds(a: &[(f64, f64)]) -> Vec<Round> {
        a.iter()
            .map(|&(tcp, udp)| Round {
                tcp: [tcp, 0.0, 0.0, 0.0],
                udp: [udp, 0.0, 0.0, 0.0],
            })
            .collect()
    }

    #[test]
    fn a_tcx_links_fdinfo_names_its_hook() {
        // /proc/PID/fdinfo of an agent's TCX links (kernel 6.18).
        let link = |ifindex: u32, t: &str| {
            format!(
                "pos:\t0\nflags:\t02000000\nmnt_id:\t16\nino:\t1057\nlink_type:\ttcx\n\
                 link_id:\t4\nprog_tag:\t0d5d2a1d4e8dc6a8\nprog_id:\t27\nifindex:\t{ifindex}\n\
                 attach_type:\t{t}\n"
            )
        };
        let h = |ifindex, ingress| Some(Hook { ifindex, ingress });
        assert_eq!(tcx_hook(&link(3, "46 (ingress)")), h(3, true));
        assert_eq!(tcx_hook(&link(2, "47 (egress)")), h(2, false));
        let tracepoint = "link_type:\ttracepoint\nlink_id:\t5\nprog_id:\t30\n";
        assert_eq!(tcx_hook(tracepoint), None);
    }

    #[test]
    fn an_outlier_first_round_is_the_one_discarded() {
        // The no-probe figures of an idle run whose first round was low (issue 16's run: every
        // later round was discarded against it).
        let r = rounds(&[
            (26.9, 181.0),
            (26.0, 233.6),
            (25.2, 233.0),
            (24.5, 215.4),
            (24.5, 229.8),
            (27.0, 258.3),
        ]);
        assert_eq!(moved_rounds(&r, 0.15), vec![0]);
    }

    #[test]
    fn a_disturbed_middle_round_is_discarded_and_steady_rounds_are_kept() {
        let steady = rounds(&[(25.0, 230.0), (26.0, 220.0), (24.0, 240.0), (25.5, 225.0)]);
        assert!(moved_rounds(&steady, 0.15).is_empty());
        let r = rounds(&[
            (25.0, 230.0),
            (26.0, 220.0),
            (12.0, 225.0),
            (24.0, 240.0),
            (25.5, 225.0),
        ]);
        assert_eq!(moved_rounds(&r, 0.15), vec![2]);
        // A slow drift is not a disturbance: each round is judged by the rounds around it.
        let drift = rounds(&[
            (20.0, 200.0),
            (21.0, 210.0),
            (22.0, 220.0),
            (23.0, 230.0),
            (24.0, 240.0),
            (25.0, 250.0),
            (26.0, 260.0),
        ]);
        assert!(moved_rounds(&drift, 0.15).is_empty());
    }
}
