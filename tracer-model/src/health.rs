//! `/healthz` and `/readyz`. Without the token the agent sends only the fixed words (status,
//! ready, checks); with it, the detail sections too.
use serde::{Deserialize, Serialize};

use crate::{attach::Attachment, Cause, Cidr, Dir, Verdict};

/// `/healthz`'s overall word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Starting,
    /// A check failed: the agent answers 503.
    Failing,
    /// The kernel cannot run tracer's programs; the agent stays up to say so.
    Unsupported,
}

/// What `/healthz` says about each part: fixed words, never error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checks {
    pub reader: ReaderCheck,
    pub node_sync: SyncCheck,
}

impl Checks {
    pub fn failing(&self) -> bool {
        matches!(self.reader, ReaderCheck::Stalled | ReaderCheck::Stopped)
            || self.node_sync == SyncCheck::Stuck
    }
}

/// The ring-buffer reader thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReaderCheck {
    Ok,
    Starting,
    Stalled,
    Stopped,
    Unsupported,
}

/// The loop that reads the node and makes the attachments match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncCheck {
    Ok,
    Starting,
    Stuck,
    Unsupported,
}

/// How the tc programs attach on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcBackend {
    Tcx,
    Clsact,
}

impl TcBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            TcBackend::Tcx => "tcx",
            TcBackend::Clsact => "clsact",
        }
    }
}

/// The body of `/healthz`. The server sends its keys sorted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: Status,
    pub ready: bool,
    pub checks: Checks,
    /// Only with the token, and only when the kernel cannot run the programs: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsupported: Option<String>,
    /// Verdicts and causes the agent does not judge on this node, and why (fixed words, sent
    /// without the token too). Empty unless felix's eBPF dataplane was detected.
    #[serde(default)]
    pub turned_off: Vec<TurnedOff>,
    /// The detail sections, sent only to callers with the token.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<HealthDetail>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthDetail {
    pub tc: Option<TcBackend>,
    pub drops: DropTracing,
    pub attached: Vec<Attachment>,
    pub pools: PoolsView,
    /// felix's eBPF dataplane, when detected: what gave it away.
    #[serde(default)]
    pub ebpf_dataplane: Option<EbpfDataplaneView>,
    pub kernel: KernelStats,
    pub reader: ReaderStats,
    pub node_sync_age_ms: Option<u64>,
    pub flows: TableStats,
    pub api: ApiStats,
    pub uptime_s: u64,
    /// Where pod, Service and node names come from, and how fresh they are.
    #[serde(default = "crate::identity::IdentityHealth::off")]
    pub identity: crate::identity::IdentityHealth,
    /// The flow log's counts, when `--flow-log` is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_log: Option<crate::FlowLogStats>,
}

/// Verdicts and causes that cannot be trusted in the node's dataplane: they are never reported
/// (and never replaced by another answer) while it lasts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnedOff {
    /// The dataplane that turns them off: `calico-ebpf`.
    pub dataplane: String,
    pub verdicts: Vec<Verdict>,
    pub causes: Vec<Cause>,
    /// Why, in fixed words.
    pub why: String,
}

/// What showed that felix runs its eBPF dataplane on this node.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbpfDataplaneView {
    /// felix's pinned maps found (paths, e.g. `/sys/fs/bpf/tc/globals/cali_v4_routes`).
    pub pinned_maps: Vec<String>,
    /// felix's programs found on the hooks of the host interfaces tracer watches (TCX only).
    pub programs: Vec<FelixProgramView>,
}

/// One of felix's programs on a hook tracer shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FelixProgramView {
    pub iface: String,
    pub dir: Dir,
    /// The kernel's name for it (15 characters: `cali_tc_preambl`).
    pub program: String,
    /// Whether tracer runs before it on this hook (`None`: tracer is not on the hook).
    pub tracer_first: Option<bool>,
}

/// Whether kernel drops are traced, and why not.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropTracing {
    pub enabled: bool,
    pub error: Option<String>,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStats {
    pub packets: u64,
    pub records: u64,
    pub lost: u64,
    pub malformed: u64,
    /// Kernel drops seen by the tracepoint (of any packet, traced or not).
    pub drops: u64,
    /// Ring-buffer bytes the agent had not consumed yet, as last seen by the kernel.
    pub ringbuf_pending_bytes: u64,
}

/// The ring-buffer reader.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderStats {
    pub records: u64,
    pub decode_errors: u64,
    /// ms since the reader last finished a drain.
    #[serde(default)]
    pub idle_ms: Option<u64>,
}

/// The flow table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStats {
    pub flows: usize,
    pub observations: u64,
    pub nat_matches: u64,
    pub evicted: u64,
    /// Neighbour discovery / link-scope multicast records, not tracked.
    pub ignored: u64,
    /// Kernel drops attributed to a flow, and those of packets no hook had seen.
    pub drops: u64,
    pub unmatched_drops: u64,
}

/// What the API is doing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiStats {
    pub connections: u64,
    pub connections_rejected: u64,
    pub watchers: u64,
    pub watchers_rejected: u64,
}

/// The node's IP pools as felix programmed them.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolsView {
    /// Every pool (felix's `all-ipam-pools` sets).
    pub all: Vec<Cidr>,
    /// Pools with natOutgoing (felix's `masq-ipam-pools` sets).
    pub masq: Vec<Cidr>,
    /// Where the pools came from: "ipset", "flags", or "none".
    pub source: String,
    /// Sets that were looked for and not found.
    pub missing_sets: Vec<String>,
    /// LoadBalancer-only pools that felix's natOutgoing rule leaves un-masqueraded.
    pub lb_only: Vec<Cidr>,
    pub nat_outgoing_v4: Option<NatOutgoingView>,
    pub nat_outgoing_v6: Option<NatOutgoingView>,
    /// Members of `cali40all-hosts-net` (a count: a big cluster has thousands of nodes).
    pub host_nets_v4: Option<usize>,
    pub host_nets_v6: Option<usize>,
    pub nat_outgoing_errors: Vec<String>,
}

/// What felix's natOutgoing rule leaves alone on purpose.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatOutgoingView {
    pub rules: usize,
    pub pool_set: Option<String>,
    pub excludes_host_ips: bool,
    pub out_iface: Option<String>,
    pub out_iface_negated: bool,
}

/// The body of `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    /// With the token: interfaces attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drops: Option<DropTracing>,
}
