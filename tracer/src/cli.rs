//! Command-line interface.
use std::{net::SocketAddr, time::Duration};
use tracer_model::identity::IdentitySource;

use clap::{Args, Parser, Subcommand, ValueEnum};

use clap::builder::{PossibleValuesParser, TypedValueParser};
use tracer_model::{
    defaults,
    query::{self, FlowQuery, Since},
    Cause, Verdict,
};

use crate::{
    calico::{RoleConfig, DEFAULT_INTERFACE_PREFIX},
    diagnose::{DEFAULT_DATASTORE_PORTS, DEFAULT_NO_REPLY_TIMEOUT, DEFAULT_SLOW_THRESHOLD},
    net::Cidr,
};

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    // A flag given on the command line overrides the same flag from `agent --config`.
    args_override_self = true,
    about = "eBPF packet path tracer for Kubernetes nodes networked by Calico",
    long_about = "tracer follows packets across a Calico node's pod veths, tunnels and host NICs, \
                  correlates them through NAT into flows, and says what went wrong and how to fix it."
)]
pub struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. "info" or "tracer=debug".
    #[arg(long, global = true, env = "TRACER_LOG", default_value = "info")]
    pub log: String,
    /// Log lines as text for a terminal, or as one JSON object per line for log pipelines
    /// (timestamp, level, target, fields, message).
    #[arg(long, global = true, env = "TRACER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: attach to Calico's interfaces and serve the HTTP API.
    Agent(AgentArgs),
    /// Query an agent (or every agent of the DaemonSet) for flows and their diagnoses.
    Flows(FlowsArgs),
    /// Follow one pod's (or interface's) flows live; attaches on demand and detaches on exit.
    Watch(WatchArgs),
    /// What is wrong on a node: faulty flows grouped by cause, and configuration findings.
    Diagnoses(DiagnosesArgs),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// How to reach an agent.
#[derive(Debug, Args, Clone)]
pub struct AgentConn {
    /// Agent base URL.
    #[arg(long, env = "TRACER_AGENT", default_value = defaults::AGENT_URL)]
    pub agent: String,
    /// File with the agent's bearer token (the agent's --token-file). Through the API server
    /// it is read from the Secret kube-system/tracer-token when not given.
    #[arg(long, env = "TRACER_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// `direct`: ask --agent (or, with --all-nodes, the headless Service's addresses).
    /// `apiserver`: find the agents and talk to them through the API server's pods/proxy,
    /// with the kubeconfig's credentials. Default: `apiserver` when run as `kubectl tracer`,
    /// with --kubeconfig or --context, or with KUBECONFIG set outside a pod, unless --agent or
    /// --agents name agents; else `direct`.
    #[arg(long, env = "TRACER_VIA", value_enum)]
    pub via: Option<Via>,
    /// The kubeconfig file (this file only); default: KUBECONFIG's files merged, else
    /// ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use; default: its current-context.
    #[arg(long)]
    pub context: Option<String>,
    /// The namespace the agents' DaemonSet and token Secret are in.
    #[arg(long, default_value = defaults::NAMESPACE)]
    pub agents_namespace: String,
}

/// How the client reaches agents.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Via {
    Direct,
    Apiserver,
}

/// Whether this process runs as the kubectl plugin (`kubectl-tracer`, how kubectl finds
/// plugins on PATH): then it names itself `kubectl tracer`.
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n == "kubectl-tracer")
        })
        .unwrap_or(false)
}

impl AgentConn {
    /// How to reach the agents; `explicit_agents` tells that --agents named some.
    pub fn via(&self, explicit_agents: bool) -> Via {
        if let Some(v) = self.via {
            return v;
        }
        let named = explicit_agents
            || self.agent != defaults::AGENT_URL
            || std::env::var_os("TRACER_AGENT").is_some();
        let kube_asked = self.kubeconfig.is_some() || self.context.is_some();
        // A pod (the agent's own, through kubectl exec) has the in-cluster Service's variables.
        let outside_pod = std::env::var_os("KUBECONFIG").is_some()
            && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none();
        if !named && (invoked_as_plugin() || kube_asked || outside_pod) {
            Via::Apiserver
        } else {
            Via::Direct
        }
    }

    /// The kubeconfig and context the flags name.
    pub fn kubeconfig(&self) -> crate::apiserver::KubeconfigChoice {
        crate::apiserver::KubeconfigChoice {
            file: self.kubeconfig.clone(),
            context: self.context.clone(),
        }
    }

    pub fn token(&self) -> Result<Option<String>, String> {
        match &self.token_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| format!("reading {}: {e}", p.display())),
            None => Ok(None),
        }
    }
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// `pod/NAME` or `iface/NAME`.
    pub target: String,
    /// The pod's namespace; by default the kubeconfig context's namespace, as kubectl.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// felix's InterfacePrefix (a comma-separated list, as FELIX_INTERFACEPREFIX): the first
    /// entry names the pod's veth.
    #[arg(long, env = "FELIX_INTERFACEPREFIX", default_value = DEFAULT_INTERFACE_PREFIX)]
    pub iface_prefix: String,
    #[command(flatten)]
    pub conn: AgentConn,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// How long the agent keeps the attachment if this client vanishes without detaching
    /// (killed, network cut); the client renews it every third of this while it runs.
    #[arg(long, default_value_t = humantime::Duration::from(std::time::Duration::from_secs(defaults::LEASE_TTL_SECONDS)))]
    pub lease_ttl: humantime::Duration,
    /// iface/NAME through the API server: the node whose agent to ask (pod/NAME finds its
    /// node itself).
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Debug, Args)]
pub struct DiagnosesArgs {
    #[command(flatten)]
    pub conn: AgentConn,
    #[command(flatten)]
    pub nodes: NodeSelection,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Which agents a read asks: the one of --agent, explicit URLs, every agent of the DaemonSet,
/// or one node's through the API server. Shared by `flows` and `diagnoses`.
#[derive(Debug, Args)]
pub struct NodeSelection {
    /// Ask every agent of the DaemonSet (found through the headless Service's DNS name, or
    /// listed by the API server) and merge the answers.
    #[arg(long)]
    pub all_nodes: bool,
    /// The DaemonSet's headless Service, for --all-nodes.
    #[arg(long, default_value = defaults::SERVICE)]
    pub service: String,
    /// Port the agents listen on, for --all-nodes.
    #[arg(long, default_value_t = defaults::API_PORT)]
    pub agent_port: u16,
    /// Explicit agent URLs to ask (comma separated) instead of discovery, merged per node.
    #[arg(long, value_delimiter = ',')]
    pub agents: Vec<String>,
    /// Through the API server: ask only this node's agent.
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A YAML file of agent flags (a ConfigMap), e.g. `flow-cap: 50000` or
    /// `host-iface: [eth0, eth1]`: the same names as the flags, without the dashes. Flags on the
    /// command line override it (lists are combined). Read and checked at start.
    #[arg(long, env = "TRACER_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Address to serve the API on (loopback by default; the DaemonSet uses the pod's host network).
    #[arg(long, default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Workload interface prefixes: felix's InterfacePrefix, a comma-separated list
    /// (`cali,tap`), read from FELIX_INTERFACEPREFIX like felix does; or repeat the flag. The
    /// first names pods' veths.
    #[arg(
        long = "iface-prefix",
        env = "FELIX_INTERFACEPREFIX",
        value_delimiter = ',',
        default_values_t = vec![DEFAULT_INTERFACE_PREFIX.to_string()]
    )]
    pub iface_prefixes: Vec<String>,
    /// Host NIC to observe; repeat for several. Default: interfaces with the default route, a
    /// host address, or vxlan.calico's parent.
    #[arg(long = "host-iface")]
    pub host_ifaces: Vec<String>,
    /// IP pool CIDR (added to the pools read from felix's ipsets).
    #[arg(long = "pool")]
    pub pools: Vec<Cidr>,
    /// IP pool CIDR with natOutgoing (added to felix's masq ipset).
    #[arg(long = "masq-pool")]
    pub masq_pools: Vec<Cidr>,
    /// How long a request may wait for its first reply before the flow is `no_reply`.
    #[arg(long, default_value_t = DEFAULT_NO_REPLY_TIMEOUT.into())]
    pub no_reply_timeout: humantime::Duration,
    /// Datastore ports whose exchanges are timed for slow_response (etcd, apiserver, Typha).
    #[arg(long = "datastore-port", default_values_t = DEFAULT_DATASTORE_PORTS)]
    pub datastore_ports: Vec<u16>,
    /// Median exchange latency above which a datastore flow is slow_response.
    #[arg(long, default_value_t = DEFAULT_SLOW_THRESHOLD.into())]
    pub slow_threshold: humantime::Duration,
    /// calico-node's liveness budget (initialDelaySeconds + failureThreshold x periodSeconds,
    /// e.g. 70s for 10 + 6 x 10), to say whether startup at the measured latency fits.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub liveness_budget: Option<Duration>,
    /// Most flows kept in memory; the oldest are evicted beyond it.
    #[arg(long, default_value_t = crate::state::DEFAULT_FLOW_CAP)]
    pub flow_cap: usize,
    /// `auto` attaches to every interface with a role; `on-demand` only to those asked for
    /// with POST /attach (or `tracer watch`).
    #[arg(long, value_enum, default_value_t = crate::agent::AttachMode::Auto)]
    pub attach: crate::agent::AttachMode,
    /// File holding a bearer token every endpoint but /healthz and /readyz then requires.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// Serve a non-loopback --listen address without --token-file. Without this flag the agent
    /// refuses to: anyone who can reach the address could read the node's traffic.
    #[arg(long)]
    pub insecure: bool,
    /// API connections served at once; more are answered 503 and closed. 32 more are kept
    /// for peers on the node itself (the kubelet's probes).
    #[arg(long, default_value_t = crate::api::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,
    /// `/watch` streams open at once; more are refused with 429.
    #[arg(long, default_value_t = crate::api::DEFAULT_MAX_WATCHERS, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub max_watchers: u32,
    /// Ring buffer between kernel and agent, in bytes (power of two, >= 4096). Default 8 MiB.
    #[arg(long)]
    pub ringbuf_bytes: Option<u32>,
    /// How often the kernel re-reports a busy flow's counters.
    #[arg(long, default_value_t = crate::hooks::DEFAULT_SUMMARY_INTERVAL.into())]
    pub summary_interval: humantime::Duration,
    /// How tc programs attach: `auto` (TCX on Linux 6.6+, clsact filters before), `tcx`, or
    /// `clsact` (the legacy path, forced: what 5.11-6.5 kernels use).
    #[arg(long, value_enum, default_value_t = crate::hooks::TcMode::Auto)]
    pub tc_mode: crate::hooks::TcMode,
    /// Entries in each of the kernel's per-hook maps (flow summaries, request/response turns;
    /// LRU, ~100 B each). Size it to the concurrent flows x hooks a packet crosses (2-4).
    #[arg(long, default_value_t = crate::hooks::DEFAULT_KERNEL_FLOW_ENTRIES)]
    pub kernel_flow_entries: u32,
    /// Where felix pins its eBPF dataplane's maps (the host's /sys/fs/bpf/tc/globals): their
    /// presence tells that felix runs in eBPF mode, and its rule counters (`cali_rule_ctrs2`,
    /// opened read-only) name the policy of a drop. No other pin is opened.
    #[arg(long, default_value = crate::felix_bpf::GLOBALS_DIR)]
    pub felix_bpf_dir: std::path::PathBuf,
    /// Where pod, Service and node names come from, as calico-node reads DATASTORE_TYPE:
    /// `kubernetes` (the API server, --kubeconfig or in-cluster) or `etcdv3` (--etcd-endpoints).
    /// Unset: flows carry addresses only.
    #[arg(long, env = "DATASTORE_TYPE", value_parser = parse_datastore_type)]
    pub datastore_type: Option<IdentitySource>,
    /// Calico's ETCD_ENDPOINTS: etcd v3 URLs, comma separated (with --datastore-type etcdv3).
    #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// A kubeconfig for --datastore-type kubernetes (a colon-separated list is merged, as
    /// kubectl merges KUBECONFIG); the pod's service account when unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// This node's name, as calico-node's NODENAME: selects the node's pods and names its
    /// own addresses.
    #[arg(long, env = "NODENAME")]
    pub nodename: Option<String>,
    /// Turn identity off even when DATASTORE_TYPE is set: no datastore connection, no
    /// credentials used, addresses only.
    #[arg(long)]
    pub no_identity: bool,
    /// Write every flow once, as one JSON object per line (the fields of /flows, plus why and
    /// when it was written and the node), to stdout (`-`) or appended to a file. A flow is
    /// written when its verdicts settle, when it is evicted, or at shutdown.
    #[arg(long, env = "TRACER_FLOW_LOG", value_name = "-|PATH")]
    pub flow_log: Option<crate::agent::FlowLogTarget>,
}

fn parse_datastore_type(v: &str) -> Result<IdentitySource, String> {
    match v {
        "kubernetes" => Ok(IdentitySource::Kubernetes),
        "etcdv3" => Ok(IdentitySource::Etcdv3),
        _ => Err(format!(
            "{v:?}: Calico's DATASTORE_TYPE is kubernetes or etcdv3"
        )),
    }
}

impl AgentArgs {
    pub fn to_config(&self) -> Result<crate::agent::AgentConfig, crate::agent::AgentError> {
        let token = match &self.token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| crate::agent::AgentError::Token(p.display().to_string(), e))?
                    .trim()
                    .to_string();
                if t.is_empty() {
                    return Err(crate::agent::AgentError::EmptyToken(
                        p.display().to_string(),
                    ));
                }
                Some(t)
            }
            None => None,
        };
        let source = self
            .datastore_type
            .filter(|_| !self.no_identity)
            .unwrap_or(IdentitySource::Off);
        if source == IdentitySource::Etcdv3 && self.etcd_endpoints.is_empty() {
            return Err(crate::agent::AgentError::Identity(
                "--datastore-type etcdv3 needs --etcd-endpoints (ETCD_ENDPOINTS)".into(),
            ));
        }
        Ok(crate::agent::AgentConfig {
            identity: crate::identity::IdentityConfig {
                source: (source != IdentitySource::Off).then_some(source),
                nodename: self.nodename.clone().filter(|n| !n.is_empty()),
                etcd_endpoints: self.etcd_endpoints.clone(),
                kubeconfig: self.kubeconfig.clone(),
            },
            ringbuf_bytes: self.ringbuf_bytes,
            attach: self.attach,
            token,
            listen: self.listen,
            roles: RoleConfig {
                workload_prefixes: self.iface_prefixes.clone(),
                host_ifaces: self.host_ifaces.clone(),
            },
            pools: self.pools.clone(),
            masq_pools: self.masq_pools.clone(),
            rules: crate::diagnose::Rules {
                no_reply_after_ns: self.no_reply_timeout.as_nanos() as u64,
                datastore_ports: self.datastore_ports.clone(),
                slow_ns: self.slow_threshold.as_nanos() as u64,
                liveness_budget_ns: self.liveness_budget.map(|d| d.as_nanos() as u64),
                workload_prefixes: self.iface_prefixes.clone(),
            },
            flow_cap: self.flow_cap,
            summary_interval: self.summary_interval.into(),
            tc_mode: self.tc_mode,
            kernel_flow_entries: self.kernel_flow_entries,
            felix_bpf_dir: self.felix_bpf_dir.clone(),
            flow_log: self.flow_log.clone(),
            node_name: self.nodename.clone().or_else(host_name),
            insecure: self.insecure,
            api: crate::api::ApiLimits {
                max_connections: self.max_connections as usize,
                max_watchers: self.max_watchers as usize,
            },
            ..Default::default()
        })
    }
}

/// The kernel's host name: the node's name on a pod with the host's UTS namespace
/// (hostNetwork), as a kubelet without --hostname-override names its node.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `-o`: as kubectl names its outputs.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Names where the agent has them (identity on), addresses otherwise.
    Table,
    /// The table plus addresses behind the names and the interfaces crossed.
    Wide,
    /// One JSON object per line, as the agent sent it.
    Json,
    /// One YAML document per object.
    Yaml,
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub conn: AgentConn,
    #[command(flatten)]
    pub nodes: NodeSelection,
    /// Pod as namespace/name, or a name in the kubeconfig context's namespace (as kubectl):
    /// flows through its veth, and with identity on, flows to or from its address.
    #[arg(long, value_parser = pod_arg)]
    pub pod: Option<(String, String)>,
    /// Only flows active since this long ago (5m) or this RFC 3339 time.
    #[arg(long, value_parser = |s: &str| Since::parse(s).map_err(|e| e.to_string()))]
    pub since: Option<Since>,
    /// Destination IP or CIDR (matches before or after NAT).
    #[arg(long)]
    pub dst: Option<Cidr>,
    /// Source IP or CIDR (matches before or after NAT).
    #[arg(long)]
    pub src: Option<Cidr>,
    #[arg(long)]
    pub port: Option<u16>,
    /// tcp, udp, icmp, icmpv6 or a number.
    #[arg(long, value_parser = |s: &str| crate::net::parse_proto(s).map_err(|e| e.to_string()))]
    pub proto: Option<u8>,
    /// Only flows with this verdict, e.g. no_reply.
    #[arg(long, value_parser = verdict_parser())]
    pub verdict: Option<Verdict>,
    /// Only flows diagnosed with this cause.
    #[arg(long, value_parser = cause_parser())]
    pub cause: Option<Cause>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=query::MAX_LIMIT as u64))]
    pub limit: Option<u64>,
    /// Only flows with a pod or Service of this namespace at either end (needs identity on
    /// the agent).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only flows with a pod at either end whose labels match, in kubectl's syntax
    /// (`app=web,tier in (a,b)`; needs identity on the agent).
    #[arg(short = 'l', long, value_parser = |s: &str| tracer_model::identity::Selector::parse(s))]
    pub selector: Option<tracer_model::identity::Selector>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `--pod`: `namespace/name`, or a bare name whose namespace is filled in later (empty here).
fn pod_arg(s: &str) -> Result<(String, String), String> {
    if s.contains('/') {
        return query::pod(s).map_err(|e| e.to_string());
    }
    query::pod(&format!("default/{s}"))
        .map(|(_, name)| (String::new(), name))
        .map_err(|_| format!("{s:?} is not a pod name"))
}

impl FlowsArgs {
    /// The query the flags ask for.
    pub fn query(&self) -> FlowQuery {
        FlowQuery {
            pod: self.pod.clone().map(|(ns, name)| {
                let ns = if ns.is_empty() {
                    self.conn.kubeconfig().namespace()
                } else {
                    ns
                };
                (ns, name)
            }),
            since: self.since,
            dst: self.dst,
            src: self.src,
            port: self.port,
            proto: self.proto,
            verdict: self.verdict,
            cause: self.cause,
            limit: self.limit.map(|l| l as usize),
            namespace: self.namespace.clone(),
            selector: self.selector.clone(),
        }
    }
}

/// `--verdict`: the wire names, offered to shell completion.
fn verdict_parser() -> impl TypedValueParser<Value = Verdict> {
    PossibleValuesParser::new(Verdict::ALL.iter().map(|v| v.as_str()))
        .try_map(|s| s.parse::<Verdict>())
}

/// `--cause`: the wire names, offered to shell completion.
fn cause_parser() -> impl TypedValueParser<Value = Cause> {
    PossibleValuesParser::new(Cause::ALL.iter().map(|c| c.as_str())).try_map(|s| s.parse::<Cause>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_completion_offers_every_verdict_and_cause() {
        use clap::CommandFactory;
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "tracer",
            &mut out,
        );
        let script = String::from_utf8_lossy(&out);
        for name in Verdict::ALL
            .iter()
            .map(|v| v.as_str())
            .chain(Cause::ALL.iter().map(|c| c.as_str()))
        {
            assert!(script.contains(name), "{name} is not completed");
        }
    }

    #[test]
    fn a_bare_pod_name_waits_for_the_kubeconfig_namespace() {
        assert_eq!(pod_arg("web-1"), Ok((String::new(), "web-1".into())));
        assert_eq!(pod_arg("shop/web-1"), Ok(("shop".into(), "web-1".into())));
        assert!(pod_arg("Web_1").is_err());
        assert!(pod_arg("shop/").is_err());
    }

    #[test]
    fn interface_prefixes_are_a_comma_separated_list_like_felixs() {
        let cli = Cli::try_parse_from(["tracer", "agent", "--iface-prefix", "tap,cali"]);
        let Ok(Cli {
            command: Command::Agent(a),
            ..
        }) = cli
        else {
            panic!("agent flags did not parse");
        };
        assert_eq!(a.iface_prefixes, ["tap", "cali"]);
        let cfg = a.to_config().ok();
        let rules = cfg.map(|c| c.rules);
        assert!(
            rules.as_ref().is_some_and(
                |r| r.is_workload_iface("tap82111e10a96") && !r.is_workload_iface("eth0")
            )
        );
    }
}
