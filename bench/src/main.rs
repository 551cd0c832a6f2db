//! tracer's benchmark (`cargo xtask bench`): data-path overhead, agent throughput and loss,
//! time to verdict, memory and query latency, side by side with same-run baselines.
//!
//! Needs root (eBPF, network namespaces). Everything runs in lab namespaces that are deleted on
//! exit and on failure (the lab crate's Drop guards). Nothing asserts: targets print PASS/MISS.
mod agent;
mod alloc;
mod busy;
mod cluster;
mod datapath;
mod floor;
mod memory;
mod records;
mod report;
mod tccost;
mod verdict;
mod workload;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Datapath,
    Records,
    Verdict,
    Memory,
    Cluster,
    Busy,
}

#[derive(Debug, Parser)]
#[command(name = "tracer-bench", about = "tracer's benchmark (needs root)")]
pub struct Opts {
    /// The tracer binary to run as the agent (target/release/tracer).
    #[arg(long, default_value = "target/release/tracer")]
    pub tracer: PathBuf,
    /// A ~1 minute smoke run: shorter iperf3 runs, one round, fewer records and samples.
    #[arg(long)]
    pub quick: bool,
    /// Section 1's measured rounds (default 12, 2 with --quick): more rounds on an idle machine
    /// narrow the ratios' intervals.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    /// Run only these sections (repeatable); all by default.
    #[arg(long = "only", value_enum)]
    only: Vec<Section>,
    /// Profiling aid (no root, no kernel): ingest N synthetic flows' observations with
    /// FlowTable::ingest and print the rate; run it under `valgrind --tool=callgrind` or perf.
    #[arg(long, value_name = "FLOWS", hide = true)]
    profile_ingest: Option<u64>,
    /// Profiling aid (no root): time GET /flows?dst=<one Service IP>'s work in-process on a
    /// table of N synthetic flows.
    #[arg(long, value_name = "FLOWS", hide = true)]
    profile_query: Option<u64>,
    /// Profiling aid (no root): section 4's big table alone: heap per flow and the /flows
    /// queries by one address and by a /16 on a table of N synthetic flows.
    #[arg(long, value_name = "FLOWS", hide = true)]
    profile_big_table: Option<u64>,
    /// Profiling aid (root): the tc program's run time on a known flow's packets, from
    /// BPF_PROG_TEST_RUN with this many repeats (nothing is sent anywhere), next to an empty
    /// program's on the same frame.
    #[arg(long, value_name = "REPEAT", hide = true)]
    profile_tc: Option<u32>,
    /// With --profile-tc: time this build of tracer-ebpf (an object file) instead of the
    /// agent's own, for ablations.
    #[arg(long, value_name = "PATH", hide = true)]
    object: Option<PathBuf>,
    /// Profiling aid (no root): identity's cost on ingest and on a rendered /flows page, with
    /// a table of N synthetic flows, identity off and on.
    #[arg(long, value_name = "FLOWS", hide = true)]
    profile_identity: Option<u64>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1048576.0))
        .unwrap_or_else(|| "?".into());
    format!("nproc {cores}, kernel {kernel}, CPU {cpu}, memory {mem}")
}

type SectionFn = fn(&Opts) -> Result<Vec<report::Row>>;

/// Which tracer was measured: the commit, and how many files under tracer*/ differ from it.
fn source() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "tracer",
                "tracer-ebpf",
                "tracer-common",
            ])
            .map(|s| s.lines().count())
            .unwrap_or(0);
            format!("git {} + {dirty} uncommitted files in tracer*/", rev.trim())
        }
        None => "unknown (not a git checkout)".into(),
    }
}

/// The 1-minute load average: anything else running on 2 cores shows up in every figure.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn run(opts: &Opts) -> Result<()> {
    if !opts.tracer.is_file() {
        bail!(
            "{} is not a file (build it: cargo build --release -p tracer)",
            opts.tracer.display()
        );
    }
    let wanted = |s: Section| opts.only.is_empty() || opts.only.contains(&s);
    let started = Instant::now();
    println!("machine: {}", machine());
    println!("source: {}", source());
    let load = load1();
    println!(
        "load average (1 min) at start: {load:.2}{}",
        if load > 0.5 {
            " -- other processes are busy: expect noisy figures"
        } else {
            ""
        }
    );
    println!(
        "mode: {}\n",
        if opts.quick {
            "--quick (smoke run)"
        } else {
            "full"
        }
    );
    let mut rows = Vec::new();
    let sections: [(Section, &str, SectionFn); 6] = [
        (Section::Records, "2 agent throughput", records::run),
        (Section::Memory, "4 memory & query", memory::run),
        (Section::Verdict, "3 time to verdict", verdict::run),
        (Section::Datapath, "1 data-path overhead", datapath::run),
        (Section::Cluster, "5 big cluster", cluster::run),
        (Section::Busy, "6 busy node", busy::run),
    ];
    for (s, name, f) in sections {
        if !wanted(s) {
            continue;
        }
        eprintln!("== {name}");
        let t = Instant::now();
        let r = f(opts).with_context(|| format!("section {name}"))?;
        eprintln!("   ({name}: {:.1?})", t.elapsed());
        rows.extend(r);
    }
    rows.sort_by_key(|r| r.section);
    println!("{}", report::table(&rows));
    let missed: Vec<&str> = rows
        .iter()
        .filter(|r| r.status() == "MISS")
        .map(|r| r.metric.as_str())
        .collect();
    println!(
        "targets: {} met, {} missed; total {:.0} s; load average at the end {:.2}",
        rows.iter().filter(|r| r.status() == "PASS").count(),
        missed.len(),
        started.elapsed().as_secs_f64(),
        load1()
    );
    for m in missed {
        println!("  MISS: {m}");
    }
    Ok(())
}

/// On SIGINT/SIGTERM, deletes this process's lab namespaces (killing the agents, iperf3s and
/// tcpdumps inside them) and lab directories, then exits; Drop guards cover every other exit.
/// The signals are blocked in every thread and taken by a dedicated one with sigwait(2).
fn cleanup_on_signal() -> Result<()> {
    // SAFETY: sigset_t is plain data; the sigset functions only write the set given to them.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pthread_sigmask only changes this thread's mask (inherited by threads
    // spawned later; child processes get a clean mask from std's spawn).
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        bail!("pthread_sigmask failed ({rc})");
    }
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waits for one of the blocked signals in `set`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            eprintln!("tracer-bench: signal {sig}: removing the lab namespaces and exiting");
            let mine = format!("tr{}", std::process::id());
            let ours = |name: &str| {
                name.strip_prefix(&mine)
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_lowercase()))
            };
            for ns in tracer_lab::netns::list().unwrap_or_default() {
                if ours(&ns) {
                    kill_all_in(&ns);
                    let _ = std::process::Command::new("ip")
                        .args(["netns", "del", &ns])
                        .status();
                }
            }
            if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.strip_prefix("tracer-lab-").is_some_and(ours) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            std::process::exit(130);
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// SIGKILLs every process in namespace `ns` but this one.
fn kill_all_in(ns: &str) {
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        match pid.parse::<libc::pid_t>() {
            Ok(p) if p as u32 != std::process::id() => {
                // SAFETY: kill(2) on a pid `ip netns pids` just listed; a stale one just fails.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            _ => {}
        }
    }
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    if let Err(e) = cleanup_on_signal() {
        eprintln!("tracer-bench: {e:#} (Ctrl-C will leave lab namespaces behind)");
    }
    if let Some(n) = opts.profile_ingest {
        let (records, secs) = records::ingest_in_process(n);
        println!(
            "{records} observations of {n} flows in {secs:.3} s: {:.0} rec/s",
            records as f64 / secs
        );
        return ExitCode::SUCCESS;
    }
    if let Some(n) = opts.profile_tc {
        return match tccost::measure(n, opts.object.as_deref()) {
            Ok(r) => {
                r.print();
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tracer-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(n) = opts.profile_identity {
        return match memory::identity_in_process(n, 20) {
            Ok((i_off, i_on, r_off, r_on)) => {
                println!(
                    "{n} flows: ingest {i_off:.1} ms off, {i_on:.1} ms on ({:+.1}%); \
                     /flows?limit=1000 rendered p50 {r_off:.2} ms off, {r_on:.2} ms on ({:+.1}%); \
                     per-flow bytes added: 0 (names are looked up at render time)",
                    (i_on / i_off - 1.0) * 100.0,
                    (r_on / r_off - 1.0) * 100.0
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tracer-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(n) = opts.profile_big_table {
        return match memory::big_table_in_process(n, 50) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tracer-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(n) = opts.profile_query {
        return match memory::query_in_process(n, 50) {
            Ok((matched, p50, p99)) => {
                println!("{matched} of {n} flows match: p50 {p50:.2} ms, p99 {p99:.2} ms");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tracer-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
