//! `tracer-lab run --tracer PATH [--scenario NAME] [--dataplane iptables|nftables] [--keep]
//! [--save-answers DIR]`: builds each scenario's Calico lab in network namespaces, in each of
//! felix's dataplanes, runs a tracer agent on every node, drives the scenario's traffic, proves
//! the fault at the packet level, and reports what tracer diagnosed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use tracer_lab::agent::{Agent, Launch};
use tracer_lab::calico::Dataplane;
use tracer_lab::diagnoses::{self, NodeDiagnoses};
use tracer_lab::netns::Netns;
use tracer_lab::scenario::Scenario;
use tracer_lab::topo::Cluster;
use tracer_model::{defaults::API_PORT, FlowQuery};

/// The lab agents' API token (the `kubectl tracer` step finds it in the stand-in's Secret).
const LAB_TOKEN: &str = "tracer-lab-token";

/// The agents' no-reply timeout in the lab (short, so failed connects are judged quickly).
const NO_REPLY_TIMEOUT: &str = "2s";

const EXIT_LAB_ERROR: u8 = 1;
const EXIT_INTERRUPTED: u8 = 130;

/// The help's tail: every scenario from `Scenario::ALL` (so the list cannot drift), then this.
const AFTER_HELP_TAIL: &str = "\
Dataplanes (default: both, each scenario in iptables then nftables mode; with --keep: iptables):
  iptables          felix's ipsets and iptables chains (cali-nat-outgoing)
  nftables          felix's nft sets and chains in `table ip calico` (nat-cali-nat-outgoing), as
                    Calico v3.32+ programs them with NFTablesMode=Auto on an nftables kube-proxy

Exit status:
  0    every lab came up and reproduced its fault at the packet level (whether or not tracer's
       diagnosis matched: see the summary table)
  1    a lab could not be built, an agent did not start, or a fault did not reproduce
  2    usage error
  130  interrupted (Ctrl-C / SIGTERM); the lab was torn down

Needs root, and bird, birdc, etcd, tcpdump, ip, bridge, iptables, ipset and nft in PATH
(`cargo xtask setup` installs them). Everything runs in network namespaces named tr<pid>...;
nothing is configured in the root namespace.";

/// Width of the scenario list's lines, for a terminal of 100 columns.
const HELP_WIDTH: usize = 100;

fn after_help() -> String {
    let name_w = Scenario::ALL
        .iter()
        .map(|s| s.name().len())
        .max()
        .unwrap_or(0);
    let mut out = String::from("Scenarios (default: all, in this order):\n");
    for s in Scenario::ALL {
        let indent = 2 + name_w + 2;
        let mut line = format!("  {:<name_w$}  ", s.name());
        for word in s.title().split_whitespace() {
            if line.len() > indent && line.len() + 1 + word.len() > HELP_WIDTH {
                out.push_str(line.trim_end());
                out.push('\n');
                line = " ".repeat(indent);
            } else if line.len() > indent {
                line.push(' ');
            }
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(AFTER_HELP_TAIL);
    out
}

#[derive(Debug, Parser)]
#[command(
    name = "tracer-lab",
    version,
    about = "tracer's lab: seed Calico incidents in network namespaces, diagnosed by tracer",
    after_help = after_help()
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the scenario labs, run tracer agents in them, and report what they diagnosed.
    #[command(after_help = after_help())]
    Run(RunArgs),
    /// List the scenarios and the causes tracer should report for them.
    List,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The tracer binary, run as `tracer agent` on every node.
    #[arg(long, value_name = "PATH")]
    tracer: PathBuf,
    /// Run only this scenario (healthy, seed-001, ..., seed-004-passive, mtu-underlay, mtu-blackhole,
    /// mtu-pmtud).
    #[arg(long, value_name = "NAME", value_parser = parse_scenario)]
    scenario: Option<Scenario>,
    /// Run only in this felix dataplane (iptables, nftables); both by default.
    #[arg(long, value_name = "DATAPLANE", value_parser = parse_dataplane)]
    dataplane: Option<Dataplane>,
    /// Leave the lab up after the report, print how to query the agents, and wait for Ctrl-C.
    #[arg(long, requires = "scenario")]
    keep: bool,
    /// Seconds to wait after the traffic before reading the diagnoses (tracer's agents run
    /// with a 2 s no-reply timeout).
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    settle: u64,
    /// Write every agent's JSON answers, as received, to DIR/<scenario>/<node>/*.json
    /// (nftables runs: DIR/<scenario>-nftables/...; compare two builds with
    /// scripts/compare-answers.py).
    #[arg(long, value_name = "DIR")]
    save_answers: Option<PathBuf>,
}

/// What `--save-answers` keeps of each agent: file name and request. (POST /attach is left
/// out: it would change what the agent traces.)
const ANSWERS: [(&str, &str); 4] = [
    ("diagnoses.json", "/diagnoses"),
    ("flows.json", "/flows?limit=1000"),
    ("healthz.json", "/healthz"),
    ("readyz.json", "/readyz"),
];

fn parse_scenario(s: &str) -> Result<Scenario, String> {
    s.parse()
        .map_err(|_| format!("unknown scenario (known: {})", Scenario::names()))
}

fn parse_dataplane(s: &str) -> Result<Dataplane, String> {
    s.parse().map_err(|e: tracer_lab::LabError| e.to_string())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let msg = b"\n[lab] interrupted: tearing down after the current step...\n";
    // SAFETY: write(2) is async-signal-safe; the buffer is a static byte string.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// SIGINT and SIGTERM only set a flag: the lab is torn down by Drop guards as the run unwinds,
/// never by exiting from the handler.
fn install_signal_handlers() -> Result<(), String> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler only touches
        // an atomic and calls write(2).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(format!(
                "installing a signal handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Why a scenario run stopped early.
#[derive(Debug)]
enum Stop {
    /// The lab (or an agent) could not be set up.
    Lab(String),
    Interrupted,
}

impl From<tracer_lab::LabError> for Stop {
    fn from(e: tracer_lab::LabError) -> Stop {
        if interrupted() {
            Stop::Interrupted
        } else {
            Stop::Lab(e.to_string())
        }
    }
}

fn checkpoint() -> Result<(), Stop> {
    if interrupted() {
        Err(Stop::Interrupted)
    } else {
        Ok(())
    }
}

/// One scenario's line of the summary.
#[derive(Debug)]
struct Outcome {
    scenario: Scenario,
    dataplane: Dataplane,
    /// `Ok` if verify proved the fault (or, for healthy, its absence); the reason otherwise.
    reproduced: Result<(), String>,
    /// Cause names reported, with the nodes that reported them and the pods, Services and
    /// nodes the datastore names at the ends of their flows.
    reported: Vec<Reported>,
    /// Agents whose diagnoses could not be read.
    agent_errors: Vec<String>,
}

impl Outcome {
    fn matched(&self) -> bool {
        if !self.agent_errors.is_empty() {
            return false;
        }
        match self.scenario.expected_cause() {
            None => self.reported.is_empty(),
            Some(c) => self.reported.iter().any(|r| r.cause == c.as_str()),
        }
    }

    fn reported_text(&self) -> String {
        let mut parts: Vec<String> = self
            .reported
            .iter()
            .map(|r| {
                let who = if r.names.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.names.join(", "))
                };
                format!("{} [{}]{who}", r.cause, r.nodes.join(","))
            })
            .collect();
        parts.extend(self.agent_errors.iter().map(|n| format!("error on {n}")));
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("; ")
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::List => {
            for s in Scenario::ALL {
                println!(
                    "{:<16} {}\n                 expected: {}",
                    s.name(),
                    s.title(),
                    s.expected_text()
                );
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) => run(&args),
    }
}

fn run(args: &RunArgs) -> ExitCode {
    if let Err(e) = preflight(&args.tracer) {
        eprintln!("tracer-lab: {e}");
        return ExitCode::from(EXIT_LAB_ERROR);
    }
    if let Err(e) = install_signal_handlers() {
        eprintln!("tracer-lab: {e}");
        return ExitCode::from(EXIT_LAB_ERROR);
    }
    let scenarios: Vec<Scenario> = match args.scenario {
        Some(s) => vec![s],
        None => Scenario::ALL.to_vec(),
    };
    let dataplanes: Vec<Dataplane> = match (args.dataplane, args.keep) {
        (Some(d), _) => vec![d],
        (None, true) => vec![Dataplane::Iptables],
        (None, false) => Dataplane::ALL.to_vec(),
    };
    println!(
        "[lab] tracer {} on every node; scenarios: {}; dataplanes: {}",
        args.tracer.display(),
        scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        dataplanes
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut outcomes = Vec::new();
    let mut lab_errors = 0;
    let runs = scenarios
        .iter()
        .flat_map(|s| dataplanes.iter().map(move |d| (*s, *d)));
    for (s, dp) in runs {
        let t = Instant::now();
        match run_scenario(s, dp, args) {
            Ok(o) => {
                if o.reproduced.is_err() {
                    lab_errors += 1;
                }
                println!("[lab] {s} ({dp}) done in {:.1?}", t.elapsed());
                outcomes.push(o);
            }
            Err(Stop::Interrupted) => {
                println!("[lab] {s} ({dp}): interrupted; lab torn down");
                print_summary(&outcomes);
                return ExitCode::from(EXIT_INTERRUPTED);
            }
            Err(Stop::Lab(e)) => {
                eprintln!("[lab] {s} ({dp}): lab error: {e}");
                lab_errors += 1;
                outcomes.push(Outcome {
                    scenario: s,
                    dataplane: dp,
                    reproduced: Err(format!("lab error: {e}")),
                    reported: Vec::new(),
                    agent_errors: Vec::new(),
                });
                // A tracer that does not start will not start in the next lab either.
                if e.contains("tracer agent") {
                    eprintln!("[lab] stopping: the tracer agent itself failed");
                    break;
                }
            }
        }
    }
    print_summary(&outcomes);
    if lab_errors > 0 {
        ExitCode::from(EXIT_LAB_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}

/// Checks what the run needs before touching anything, with messages saying what to do.
fn preflight(tracer: &Path) -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (network namespaces, BIRD, tcpdump, eBPF); try sudo".into());
    }
    match std::fs::metadata(tracer) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        Ok(_) => {
            return Err(format!(
                "--tracer {}: not an executable file",
                tracer.display()
            ))
        }
        Err(e) => {
            return Err(format!(
                "--tracer {}: {e} (build it with `cargo build -p tracer`)",
                tracer.display()
            ))
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = [
        "ip",
        "bridge",
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ipset",
        "nft",
        "tcpdump",
        "bird",
        "birdc",
        "etcd",
    ]
    .into_iter()
    .filter(|tool| !std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
    .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing tools in PATH: {} (`cargo xtask setup` installs them)",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// `kubectl tracer watch pod/...` from outside every node's namespace, as from a laptop: the
/// tracer binary as `kubectl-tracer`, a kubeconfig pointing at the Kubernetes API stand-in on
/// this process's loopback (no kube-apiserver here), which holds the pods, the agent pods and
/// the token Secret, and reaches the agents through pods/proxy from the external host on the
/// LAN. Prints the first flow line streamed back.
fn kubectl_watch(lab: &Cluster, tracer: &Path) -> Result<(), Stop> {
    use std::io::BufRead;
    use tracer_lab::kube::{self, KubeStandin, Store};
    use tracer_model::defaults;

    let lab_err = |what: &str, e: std::io::Error| Stop::Lab(format!("{what}: {e}"));
    let node = lab.nodes.len().saturating_sub(1);
    let mut on = lab.pods_on(node);
    let (Some(pod), Some(peer)) = (on.next(), on.next()) else {
        return Err(Stop::Lab("the node has fewer than two pods".into()));
    };
    let store = Store::new();
    for p in &lab.pods {
        let ip = p.ip().to_string();
        let node = &lab.nodes[p.node].name;
        store.apply(
            "pods",
            kube::pod(&p.pod.namespace, &p.pod.name, node, &ip, &[], None),
        )?;
    }
    for n in &lab.nodes {
        let name = format!("tracer-{}", n.name);
        let ip = n.ip.to_string();
        let agent_pod = kube::agent_pod(defaults::NAMESPACE, &name, &n.name, &ip, API_PORT);
        store.apply("pods", agent_pod)?;
    }
    let token = format!("{LAB_TOKEN}\n");
    let data = [(defaults::TOKEN_SECRET_KEY, token.as_bytes())];
    let secret = kube::secret(defaults::NAMESPACE, defaults::TOKEN_SECRET, &data);
    store.apply("secrets", secret)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(|e| lab_err("the stand-in's loopback listener", e))?;
    let standin = KubeStandin::start_on(listener, store, Some(lab.external.path()))?;
    let kubeconfig = lab.dir.join("kubeconfig.yaml");
    std::fs::write(&kubeconfig, standin.kubeconfig("default"))
        .map_err(|e| lab_err("writing the kubeconfig", e))?;
    let plugin = lab.dir.join("kubectl-tracer");
    let _ = std::fs::remove_file(&plugin);
    // Absolute: the link lives in the lab directory.
    let tracer =
        std::fs::canonicalize(tracer).map_err(|e| lab_err("finding the tracer binary", e))?;
    std::os::unix::fs::symlink(&tracer, &plugin)
        .map_err(|e| lab_err("linking kubectl-tracer", e))?;
    let target = format!("pod/{}", pod.pod.name);
    println!(
        "[lab] kubectl tracer watch {target} -n {} (through the Kubernetes API stand-in at {}, from outside the nodes)",
        pod.pod.namespace,
        standin.url()
    );
    let mut child = std::process::Command::new(&plugin)
        .args(["watch", &target, "-n", &pod.pod.namespace, "-o", "json"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("TRACER_AGENT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| lab_err("starting kubectl-tracer", e))?;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut streamed = None;
    while streamed.is_none() && Instant::now() < deadline {
        tracer_lab::traffic::tcp_probe(pod.netns(), peer.addr(), Duration::from_secs(2))?;
        streamed = rx.recv_timeout(Duration::from_secs(1)).ok();
    }
    // SAFETY: signalling the child this function spawned; it detaches and exits on SIGTERM.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    match streamed {
        Some(line) => {
            println!("        ok  streamed through the API server: {line}");
            Ok(())
        }
        None => Err(Stop::Lab(format!(
            "no flow of {target} streamed within 20 s"
        ))),
    }
}

fn run_scenario(s: Scenario, dataplane: Dataplane, args: &RunArgs) -> Result<Outcome, Stop> {
    println!("\n=== {s} ({dataplane}): {} ===", s.title());
    let mut cfg = s.config();
    cfg.dataplane = dataplane;
    let lab = Cluster::build_with_progress(&cfg, &mut |m| println!("[lab] {m}"))
        .map_err(|e| Stop::from(e).context("building the lab"))?;
    checkpoint()?;

    // As the DaemonSet runs them: on every address of the node, behind a token (which the
    // `kubectl tracer` step reads from the stand-in's Secret).
    let token_file = lab.dir.join("token");
    std::fs::write(&token_file, format!("{LAB_TOKEN}\n"))
        .map_err(|e| Stop::Lab(format!("writing {}: {e}", token_file.display())))?;
    let token_arg = token_file.display().to_string();
    // Declared after `lab`, so the agents stop (and detach) before the lab is torn down.
    let mut agents = Vec::new();
    for n in &lab.nodes {
        let log = lab.dir.join(&format!("tracer-{}.log", n.name));
        println!(
            "[lab] starting tracer agent on {} (ip netns exec {} {} agent --listen 0.0.0.0:{} --token-file {} --no-reply-timeout {} --datastore-type etcdv3 --etcd-endpoints http://{} --nodename {}; log {})",
            n.name,
            n.netns.name(),
            args.tracer.display(),
            API_PORT,
            token_arg,
            NO_REPLY_TIMEOUT,
            lab.etcd_endpoint(),
            n.name,
            log.display()
        );
        // Identity from the lab's etcd, as calico-node reads it: flows and diagnoses name the
        // lab's pods and nodes.
        let etcd = format!("http://{}", lab.etcd_endpoint());
        let mut agent = Launch::with_args(&[
            "--token-file",
            &token_arg,
            "--no-reply-timeout",
            NO_REPLY_TIMEOUT,
        ])
        .args(&["--datastore-type", "etcdv3", "--etcd-endpoints", &etcd])
        .args(&["--nodename", &n.name])
        .listen(std::net::SocketAddr::from(([0, 0, 0, 0], API_PORT)))
        .start(
            &n.netns,
            &format!("tracer agent on {}", n.name),
            &args.tracer,
            &log,
        )?;
        agent.token = Some(LAB_TOKEN.into());
        agents.push(agent);
    }
    println!("[lab] waiting for the agents' /healthz to say ready...");
    for (a, n) in agents.iter_mut().zip(&lab.nodes) {
        a.wait_ready(&n.netns, Duration::from_secs(30))?;
        checkpoint()?;
    }

    if s.name() == "healthy" {
        kubectl_watch(&lab, &args.tracer).map_err(|e| e.context("kubectl tracer watch"))?;
        checkpoint()?;
    }

    println!("[lab] driving {s}'s traffic...");
    let report = s.drive(&lab)?;
    for line in report.to_string().lines() {
        println!("        {line}");
    }
    checkpoint()?;

    println!("[lab] proving the fault at the packet level (tcpdump, BIRD, {dataplane} counters; no tracer)...");
    let reproduced = match s.evidence(&lab) {
        Ok(ev) => {
            for line in ev {
                println!("        ok  {line}");
            }
            Ok(())
        }
        Err(e) => {
            checkpoint()?;
            println!("        NOT REPRODUCED: {e}");
            Err(e.to_string())
        }
    };

    println!(
        "[lab] waiting {}s for tracer's no-reply timeouts...",
        args.settle
    );
    sleep_interruptible(Duration::from_secs(args.settle))?;

    let mut reported: Vec<Reported> = Vec::new();
    let mut agent_errors = Vec::new();
    println!();
    for (a, n) in agents.iter().zip(&lab.nodes) {
        match diagnoses::read(a, &n.netns) {
            Ok(d) => {
                print!("{}", diagnoses::render(&n.name, &d));
                note_causes(&mut reported, &n.name, &d);
            }
            Err(e) => {
                println!("tracer on {}: could not read its diagnoses: {e}", n.name);
                agent_errors.push(n.name.clone());
            }
        }
        if let Some(dir) = &args.save_answers {
            let run = match dataplane {
                Dataplane::Iptables => s.name().to_string(),
                Dataplane::Nftables => format!("{s}-{dataplane}"),
            };
            save_answers(&dir.join(run).join(&n.name), a, &n.name, &n.netns)?;
        }
        if let Some(v) = s.expected_verdict() {
            let q = FlowQuery {
                verdict: Some(v),
                limit: Some(1),
                ..FlowQuery::default()
            };
            // An agent that does not know the verdict answers 400: nothing to count.
            if let Ok(page) = a.flows(&n.netns, &q) {
                println!("  flows with verdict {v}: {}", page.matched);
            }
        }
    }
    let outcome = Outcome {
        scenario: s,
        dataplane,
        reproduced,
        reported,
        agent_errors,
    };
    println!(
        "\n[lab] {s} ({dataplane}): expected {}, tracer reported {} -> {}",
        s.expected_text(),
        outcome.reported_text(),
        if outcome.matched() {
            "match"
        } else {
            "no match"
        }
    );

    if args.keep {
        print_keep_help(s, &lab, &args.tracer);
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Ctrl-C is how --keep ends: not an interruption of the run.
        INTERRUPTED.store(false, Ordering::SeqCst);
    }
    println!("[lab] tearing down {s}'s lab...");
    drop(agents);
    drop(lab);
    Ok(outcome)
}

impl Stop {
    fn context(self, what: &str) -> Stop {
        match self {
            Stop::Lab(e) => Stop::Lab(format!("{what}: {e}")),
            other => other,
        }
    }
}

/// One reported cause of the summary.
#[derive(Debug)]
struct Reported {
    cause: String,
    nodes: Vec<String>,
    /// `ns/pod -> service ns/name` for each cause group whose flow ends the datastore names.
    names: Vec<String>,
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

fn note_causes(reported: &mut Vec<Reported>, node: &str, d: &NodeDiagnoses) {
    for c in d.cause_names() {
        let r = match reported.iter().position(|r| r.cause == c) {
            Some(i) => &mut reported[i],
            None => {
                reported.push(Reported {
                    cause: c.to_string(),
                    nodes: Vec::new(),
                    names: Vec::new(),
                });
                let last = reported.len() - 1;
                &mut reported[last]
            }
        };
        push_unique(&mut r.nodes, node.to_string());
        for g in d.causes.iter().filter(|g| g.cause.as_str() == c) {
            if let Some(e) = &g.endpoints {
                push_unique(
                    &mut r.names,
                    format!("{} -> {}", e.src.label(), e.dst.label()),
                );
            }
        }
    }
}

/// Writes the agent's answers (see [`ANSWERS`]) into `dir`, bodies exactly as received.
fn save_answers(dir: &Path, a: &Agent, node: &str, ns: &Netns) -> Result<(), Stop> {
    let io = |e: std::io::Error| Stop::Lab(format!("--save-answers {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    for (file, path) in ANSWERS {
        let r = a.get(ns, path)?;
        if r.status != 200 {
            println!("  {path} on {node} answered {} (saved as is)", r.status);
        }
        std::fs::write(dir.join(file), &r.body).map_err(io)?;
    }
    Ok(())
}

fn sleep_interruptible(d: Duration) -> Result<(), Stop> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        checkpoint()?;
        std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
    }
    checkpoint()
}

fn print_keep_help(s: Scenario, lab: &Cluster, tracer_bin: &Path) {
    println!("\n[lab] {s}'s lab is up. Query the agents:");
    let dst = s.focus(lab).map(|ip| ip.to_string()).unwrap_or_default();
    for n in &lab.nodes {
        let ns = n.netns.name();
        println!(
            "  ip netns exec {ns} curl -s -H 'Authorization: Bearer {LAB_TOKEN}' '127.0.0.1:{}/flows?dst={dst}'",
            API_PORT
        );
        println!(
            "  ip netns exec {ns} {} flows --dst {dst} --token-file {}",
            tracer_bin.display(),
            lab.dir.join("token").display()
        );
        println!(
            "  ip netns exec {ns} curl -s -H 'Authorization: Bearer {LAB_TOKEN}' 127.0.0.1:{}/diagnoses",
            API_PORT
        );
        if let Some(sock) = n.bird_socket() {
            println!("  birdc -s {} show protocols", sock.display());
        }
    }
    for p in &lab.pods {
        println!(
            "  pod {} ({}) on {}: ip netns exec {} ...",
            p.full_name(),
            p.ip(),
            lab.nodes[p.node].name,
            p.netns().name()
        );
    }
    println!("  logs: {}", lab.dir.path().display());
    println!("[lab] press Ctrl-C to tear the lab down.");
}

fn print_summary(outcomes: &[Outcome]) {
    if outcomes.is_empty() {
        return;
    }
    let header = [
        "scenario",
        "dataplane",
        "fault reproduced",
        "expected cause",
        "tracer reported",
        "match",
    ];
    let rows: Vec<[String; 6]> = outcomes
        .iter()
        .map(|o| {
            [
                o.scenario.name().to_string(),
                o.dataplane.to_string(),
                match &o.reproduced {
                    Ok(()) => "yes".into(),
                    Err(_) => "NO".into(),
                },
                o.scenario.expected_text(),
                o.reported_text(),
                if o.matched() { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 6]| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("\n{}", line(header));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-")
    );
    for r in &rows {
        println!("{}", line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]));
    }
    for o in outcomes {
        if let Err(e) = &o.reproduced {
            println!("  {} ({}): {e}", o.scenario, o.dataplane);
        }
    }
}
