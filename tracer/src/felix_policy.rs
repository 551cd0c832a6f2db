//! Which felix rule dropped a packet, and which Calico policy it renders.
//!
//! felix renders each policy into one chain per direction and each workload endpoint into a
//! `cali-tw-<iface>` (to the pod: ingress) and `cali-fw-<iface>` (from the pod: egress) chain that
//! jumps to the policy chains tier by tier, ends each tier with a DROP ("End of tier ...") and
//! the endpoint with a DROP ("... if no profiles matched"). Chain names are computed from the
//! policies in the datastore exactly as felix computes them, never guessed from the chains.
//!
//! The dropping rule is found by its counter: on the sync path (never per packet) the agent reads
//! the filter table's counters when traced flows saw new kernel drops, and keeps which felix DROP
//! rules moved between two readings. A drop is attributed to a rule only when exactly one felix
//! DROP rule reachable from the flow's endpoints moved in the interval holding it; otherwise the
//! evidence says why not.
//!
//! Both of felix's netfilter dataplanes: `iptables-save -c -t filter` in iptables mode, `nft list
//! table ip calico` in nftables mode. felix renders the same rules in both (`felix/rules/` is
//! shared); in nftables mode its table layer prefixes the filter chains with `filter-`
//! (`felix/nftables/table_layer.go`), the name limit is knftables' 256 instead of 28 (so policy
//! chains are practically never hashed), every rule carries a `counter`, and the rule comment is
//! `cali:<hash>; <comment>` (`felix/nftables/renderer.go`). nft rules have handles, not
//! positions: a rule's position here is its place in the chain's listing, which is the order
//! the kernel evaluates them in.
//!
//! Calico sources (projectcalico/calico, late 2026): chain prefixes `felix/rules/rule_defs.go`;
//! `PolicyChainName`/`ProfileChainName` and the policy rule rendering in `felix/rules/policy.go`;
//! the endpoint chains in `felix/rules/endpoints.go`; policy ids `felix/types/policy_id.go`;
//! `GetLengthLimitedID` in `libcalico-go/lib/hash/unique_id.go`; the 28-character iptables limit
//! `felix/iptables/table.go`; the v3 -> v1 policy conversion (tier "default" when unset)
//! `libcalico-go/lib/backend/syncersv1/updateprocessors/networkpolicyprocessor.go`.
pub mod bpf;

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracer_model::diagnosis::{PolicyAction, PolicyDirection, PolicyHit, PolicyLookup};

/// `felix/iptables/table.go` `MaxChainNameLength`.
pub const IPTABLES_MAX_CHAIN: usize = 28;
/// `felix/nftables/table.go` `MaxChainNameLength` (knftables' `NameLengthMax`).
pub const NFT_MAX_CHAIN: usize = 256;
/// felix's nft table layer's prefix for the filter table's chains (`filter-cali-FORWARD`).
pub const NFT_FILTER: &str = "filter-";
/// felix's table in nftables mode (IPv4 family, as the iptables reader reads IPv4 only).
const NFT_TABLE: &str = "calico";
pub const POLICY_IN: &str = "cali-pi-";
pub const POLICY_OUT: &str = "cali-po-";
pub const PROFILE_IN: &str = "cali-pri-";
pub const PROFILE_OUT: &str = "cali-pro-";
/// Endpoint chains: to a workload (its ingress) and from it (its egress).
pub const TO_WORKLOAD: &str = "cali-tw-";
pub const FROM_WORKLOAD: &str = "cali-fw-";
/// felix's comment on the end-of-tier DROP: `End of tier <tier>. DROP if no policies passed
/// packet` (`endpointIptablesChain`).
const END_OF_TIER: &str = "End of tier ";
const NO_PROFILE: &str = " if no profiles matched";
/// Counter readings kept (each holds only the DROP rules that moved).
pub const INTERVALS_KEPT: usize = 64;
/// `bpf_ktime_get_coarse_ns` runs up to a tick behind: a drop this close to a reading may
/// belong to either side of it.
const SLACK_NS: u64 = 10_000_000;

/// `libcalico-go/lib/hash/unique_id.go` `GetLengthLimitedID`.
pub fn length_limited_id(prefix: &str, suffix: &str, max: usize) -> String {
    let suffix = if suffix.is_empty() { "_" } else { suffix };
    let total = prefix.len() + suffix.len();
    if total > max || (total == max && suffix.starts_with('_')) {
        let hash = base64url(&Sha256::digest(suffix.as_bytes()));
        let left = max.saturating_sub(1 + prefix.len()).min(hash.len());
        return format!("{prefix}_{}", &hash[..left]);
    }
    format!("{prefix}{suffix}")
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=c.len() {
            out.push(char::from(A[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// The kinds of policy felix renders, with `felix/types/policy_id.go`'s short names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    NetworkPolicy,
    GlobalNetworkPolicy,
    /// Read from the Kubernetes API (KDD); in etcd mode kube-controllers stores them as
    /// NetworkPolicy `knp.default.<name>`.
    KubernetesNetworkPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            PolicyKind::KubernetesNetworkPolicy => "KubernetesNetworkPolicy",
        }
    }

    fn short(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "np",
            PolicyKind::GlobalNetworkPolicy => "gnp",
            PolicyKind::KubernetesNetworkPolicy => "knp",
        }
    }
}

/// One Calico policy as the datastore holds it (projectcalico.org/v3 spec).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
    pub tier: String,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// One v3 policy rule: what felix's rendering and the fix text need of it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Rule {
    pub action: String,
    pub protocol: Option<serde_json::Value>,
    pub ip_version: Option<u8>,
    pub source: Entity,
    pub destination: Entity,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Entity {
    pub nets: Vec<String>,
    pub not_nets: Vec<String>,
    pub selector: Option<String>,
    pub namespace_selector: Option<String>,
    pub ports: Vec<serde_json::Value>,
}

impl Policy {
    /// felix's `PolicyID.ID()`: `<short kind>/[<namespace>/]<name>`.
    pub fn id(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.kind.short(), self.name),
            None => format!("{}/{}", self.kind.short(), self.name),
        }
    }

    /// felix's `PolicyChainName` in the iptables dataplane.
    pub fn chain(&self, dir: PolicyDirection) -> String {
        length_limited_id(Self::prefix(dir), &self.id(), IPTABLES_MAX_CHAIN)
    }

    /// The chain in the nftables dataplane, as listed in `table ip calico`.
    pub fn nft_chain(&self, dir: PolicyDirection) -> String {
        format!(
            "{NFT_FILTER}{}",
            length_limited_id(Self::prefix(dir), &self.id(), NFT_MAX_CHAIN)
        )
    }

    fn prefix(dir: PolicyDirection) -> &'static str {
        match dir {
            PolicyDirection::Ingress => POLICY_IN,
            PolicyDirection::Egress => POLICY_OUT,
        }
    }

    /// `Kind namespace/name`, as felix's chain comment says it.
    pub fn label(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind.as_str(), self.name),
            None => format!("{} {}", self.kind.as_str(), self.name),
        }
    }

    pub fn rules(&self, dir: PolicyDirection) -> &[Rule] {
        match dir {
            PolicyDirection::Ingress => &self.ingress,
            PolicyDirection::Egress => &self.egress,
        }
    }
}

impl Rule {
    fn is_v6_only(nets: &[String]) -> bool {
        !nets.is_empty() && nets.iter().all(|n| n.contains(':'))
    }

    /// How many IPv4 iptables rules felix renders for this rule with flow logs off
    /// (`ProtoRuleToIptablesRules` + `CombineMatchAndActionsForProtoRule`): a mark rule and an
    /// action rule (allow/pass: RETURN, deny: DROP), one LOG rule for `Log`, none for an IPv6
    /// rule. None when felix splits the match into blocks (several nets, over 15 ports, named
    /// ports beside others): their rule count is not modelled.
    pub fn iptables_rules_v4(&self) -> Option<u32> {
        if self.ip_version == Some(6)
            || Self::is_v6_only(&self.source.nets)
            || Self::is_v6_only(&self.destination.nets)
        {
            return Some(0);
        }
        for e in [&self.source, &self.destination] {
            let slots: usize = e
                .ports
                .iter()
                .map(|p| match p {
                    serde_json::Value::String(s) if s.contains(':') => 2,
                    _ => 1,
                })
                .sum();
            let named = e.ports.iter().any(|p| {
                p.as_str()
                    .is_some_and(|s| !s.chars().all(|c| c.is_ascii_digit() || c == ':'))
            });
            if e.nets.len() > 1 || e.nets.len() + e.not_nets.len() > 1 || slots > 15 || named {
                return None;
            }
        }
        Some(match self.action.to_ascii_lowercase().as_str() {
            "log" => 1,
            _ => 2,
        })
    }

    /// The rule as an operator reads it in the policy.
    pub fn describe(&self) -> String {
        let mut s = self.action.clone();
        if let Some(p) = &self.protocol {
            s.push_str(&format!(
                " {}",
                p.as_str().map_or(p.to_string(), str::to_string)
            ));
        }
        for (word, e) in [("from", &self.source), ("to", &self.destination)] {
            let mut parts = Vec::new();
            if let Some(sel) = &e.selector {
                parts.push(format!("selector {sel:?}"));
            }
            if let Some(sel) = &e.namespace_selector {
                parts.push(format!("namespaceSelector {sel:?}"));
            }
            if !e.nets.is_empty() {
                parts.push(format!("nets {}", e.nets.join(",")));
            }
            if !e.not_nets.is_empty() {
                parts.push(format!("notNets {}", e.not_nets.join(",")));
            }
            if !e.ports.is_empty() {
                let ports: Vec<String> = e
                    .ports
                    .iter()
                    .map(|p| p.as_str().map_or(p.to_string(), str::to_string))
                    .collect();
                parts.push(format!("ports {}", ports.join(",")));
            }
            if !parts.is_empty() {
                s.push_str(&format!(" {word} {}", parts.join(" ")));
            }
        }
        s
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Meta {
    name: String,
    namespace: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Spec {
    tier: String,
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
}

#[derive(Deserialize)]
struct Resource {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
}

/// A v3 NetworkPolicy or GlobalNetworkPolicy's JSON (as stored under
/// `/calico/resources/v3/projectcalico.org/{networkpolicies,globalnetworkpolicies}/`).
pub fn parse_policy(kind: PolicyKind, json: &str) -> Result<Policy, serde_json::Error> {
    let r: Resource = serde_json::from_str(json)?;
    Ok(Policy {
        kind,
        namespace: (!r.metadata.namespace.is_empty()).then_some(r.metadata.namespace),
        name: r.metadata.name,
        tier: if r.spec.tier.is_empty() {
            "default".into()
        } else {
            r.spec.tier
        },
        ingress: r.spec.ingress,
        egress: r.spec.egress,
    })
}

/// The policies of the datastore, by the chain names felix gives them.
#[derive(Debug, Default)]
pub struct PolicySet {
    by_chain: HashMap<String, (Arc<Policy>, PolicyDirection)>,
    count: usize,
    /// Kinds of policy the datastore did not serve (e.g. Calico's CRDs not installed): a
    /// chain absent from the set may be one of theirs.
    unread: Vec<String>,
    /// The rule ids felix's eBPF dataplane computes from these policies (flow logs off).
    rule_ids: bpf::RuleIds,
}

impl PolicySet {
    pub fn new(policies: impl IntoIterator<Item = Policy>) -> PolicySet {
        let mut by_chain = HashMap::new();
        let mut count = 0;
        let mut all = Vec::new();
        for p in policies {
            let p = Arc::new(p);
            all.push(Arc::clone(&p));
            count += 1;
            // Both dataplanes' names: which one felix runs is read with the counters.
            for dir in [PolicyDirection::Ingress, PolicyDirection::Egress] {
                by_chain.insert(p.chain(dir), (Arc::clone(&p), dir));
                by_chain.insert(p.nft_chain(dir), (Arc::clone(&p), dir));
            }
        }
        PolicySet {
            by_chain,
            count,
            unread: Vec::new(),
            rule_ids: bpf::RuleIds::new(&all),
        }
    }

    pub fn rule_ids(&self) -> &bpf::RuleIds {
        &self.rule_ids
    }

    /// The set, noting the kinds of policy that could not be read.
    pub fn with_unread(mut self, unread: Vec<String>) -> PolicySet {
        self.unread = unread;
        self
    }

    /// `""`, or why a chain may be missing from the set.
    fn unread_note(&self) -> String {
        if self.unread.is_empty() {
            String::new()
        } else {
            format!("; {}", self.unread.join("; "))
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.by_chain.is_empty()
    }

    pub fn by_chain(&self, chain: &str) -> Option<&(Arc<Policy>, PolicyDirection)> {
        self.by_chain.get(chain)
    }
}

/// One rule of felix's filter table as `iptables-save -c` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    pub chain: String,
    /// From 1, in its chain.
    pub pos: u32,
    pub packets: u64,
    /// `-j`/`-g` target (`DROP`, `RETURN`, a chain), empty when none.
    pub target: String,
    pub comments: Vec<String>,
}

impl FilterRule {
    /// A rule without comments (what tests and fixtures need).
    pub fn bare(chain: &str, pos: u32, packets: u64, target: &str) -> FilterRule {
        FilterRule {
            chain: chain.into(),
            pos,
            packets,
            target: target.into(),
            comments: Vec::new(),
        }
    }
}

/// The `cali-` chains' rules of `iptables-save -c -t filter` output.
pub fn parse_iptables_save(text: &str) -> Vec<FilterRule> {
    let mut rules = Vec::new();
    let mut pos: HashMap<String, u32> = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((counts, rule)) = rest.split_once(']') else {
            continue;
        };
        // iptables-save quotes are always closed: a line that is not is not felix's.
        let Ok(w) = crate::calico::split_words(rule) else {
            continue;
        };
        if w.first().map(String::as_str) != Some("-A") {
            continue;
        }
        let Some(chain) = w.get(1).cloned() else {
            continue;
        };
        let n = pos.entry(chain.clone()).or_default();
        *n += 1;
        if !chain.starts_with("cali-") {
            continue;
        }
        let packets = counts
            .split(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let mut target = String::new();
        let mut comments = Vec::new();
        for (i, word) in w.iter().enumerate() {
            let next = w.get(i + 1).cloned().unwrap_or_default();
            match word.as_str() {
                "-j" | "-g" | "--jump" | "--goto" => target = next,
                "--comment" => comments.push(next),
                _ => {}
            }
        }
        rules.push(FilterRule {
            chain,
            pos: *n,
            packets,
            target,
            comments,
        });
    }
    rules
}

/// felix's filter table with counters, as `iptables-save -c -t filter` prints it (one process,
/// a few ms; called on the sync path when traced flows saw new drops, never per packet).
pub fn read_iptables() -> Result<Vec<FilterRule>, String> {
    let out = std::process::Command::new("iptables-save")
        .args(["-c", "-t", "filter"])
        .output()
        .map_err(|e| format!("iptables-save: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "iptables-save: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_iptables_save(&String::from_utf8_lossy(&out.stdout)))
}

/// The `filter-cali-` chains' rules of `nft list table ip calico` (felix's nftables dataplane),
/// in the same model: `DROP`/`ACCEPT`/`RETURN` or the jumped-to chain as target, the comment
/// split into felix's hash (`cali:<hash>`) and its text, positions from 1 in listing order.
/// The dispatch rules (`iifname vmap @...`) have no target: the endpoint chains are found by
/// name, not through the maps.
pub fn parse_nft_list(text: &str) -> Vec<FilterRule> {
    let mut rules = Vec::new();
    let mut chain: Option<(String, u32)> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            chain = Some((name.trim().to_string(), 0));
            continue;
        }
        if line == "}" {
            chain = None;
            continue;
        }
        let Some((name, pos)) = chain.as_mut() else {
            continue;
        };
        // A base chain's header, not a rule.
        if line.is_empty() || line.starts_with("type ") || line.starts_with("policy ") {
            continue;
        }
        *pos += 1;
        if !name.starts_with(NFT_FILTER) || !base(name).starts_with("cali-") {
            continue;
        }
        // `nft -a` appends the handle.
        let line = line.split(" # handle ").next().unwrap_or(line);
        // knftables replaces quotes in comments: the first ` comment "` starts it.
        let (body, comment) = match format!(" {line}").split_once(" comment \"") {
            Some((b, c)) => (b.trim().to_string(), c.trim_end_matches('"').to_string()),
            None => (line.to_string(), String::new()),
        };
        let words: Vec<&str> = body.split_whitespace().collect();
        let mut packets = 0;
        let mut target = String::new();
        for (i, w) in words.iter().enumerate() {
            let next = words.get(i + 1).copied().unwrap_or_default();
            match *w {
                "counter" if words.get(i + 1) == Some(&"packets") => {
                    packets = words.get(i + 2).and_then(|p| p.parse().ok()).unwrap_or(0);
                }
                "jump" | "goto" => target = next.to_string(),
                "drop" => target = "DROP".into(),
                "accept" => target = "ACCEPT".into(),
                "return" => target = "RETURN".into(),
                "reject" => target = "REJECT".into(),
                _ => {}
            }
        }
        let comments = match comment.split_once("; ") {
            Some((hash, text)) => vec![hash.to_string(), text.to_string()],
            None if comment.is_empty() => vec![],
            None => vec![comment.trim_end_matches(';').to_string()],
        };
        rules.push(FilterRule {
            chain: name.clone(),
            pos: *pos,
            packets,
            target,
            comments,
        });
    }
    rules
}

/// felix's filter chains with counters in nftables mode, as `nft list table ip calico` prints
/// them (one process; called as [`read_iptables`] is, never per packet).
pub fn read_nft() -> Result<Vec<FilterRule>, String> {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "ip", NFT_TABLE])
        .output()
        .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft list table ip {NFT_TABLE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_nft_list(&String::from_utf8_lossy(&out.stdout)))
}

/// A chain's name without the nft table layer's `filter-` prefix: what felix's rules call it.
fn base(chain: &str) -> &str {
    chain.strip_prefix(NFT_FILTER).unwrap_or(chain)
}

/// felix's DROP rules whose packet counter moved between two readings.
#[derive(Debug, Clone)]
pub struct Interval {
    pub from_ns: u64,
    pub to_ns: u64,
    pub moved: Vec<(FilterRule, u64)>,
    /// The chains as read at `to_ns`: what jumped where when the rules moved (felix may have
    /// rewritten them since).
    pub layout: Arc<Vec<FilterRule>>,
}

/// Appends a counter interval, forgetting the oldest beyond `INTERVALS_KEPT` (both the
/// netfilter and the eBPF counters keep the same bounded history).
pub(crate) fn keep_interval<T>(intervals: &mut VecDeque<T>, interval: T) {
    if intervals.len() == INTERVALS_KEPT {
        intervals.pop_front();
    }
    intervals.push_back(interval);
}

/// What the agent has read of felix's rule counters, published for the rules.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// The last reading's rules (the chains' layout and jumps).
    pub layout: Arc<Vec<FilterRule>>,
    pub last_read_ns: Option<u64>,
    pub intervals: VecDeque<Arc<Interval>>,
    /// Why the last reading failed, if it did.
    pub error: Option<String>,
}

impl Counters {
    /// Takes a new reading (read at `at_ns`, before the command ran): the DROP rules that
    /// moved since the previous one make a new interval.
    pub fn record(&mut self, at_ns: u64, rules: Vec<FilterRule>) {
        let rules = Arc::new(rules);
        if let Some(from_ns) = self.last_read_ns {
            let before: HashMap<(&str, u32), (&str, u64)> = self
                .layout
                .iter()
                .map(|r| ((r.chain.as_str(), r.pos), (r.target.as_str(), r.packets)))
                .collect();
            let chains: HashSet<&str> = self.layout.iter().map(|r| r.chain.as_str()).collect();
            let moved: Vec<(FilterRule, u64)> = rules
                .iter()
                .filter(|r| r.target == "DROP")
                .filter_map(|r| {
                    // A chain created since the last reading started at 0. One rewritten in
                    // between (a felix resync) restarted its counters: a rule that was not the
                    // same DROP before is not compared.
                    let p = if chains.contains(r.chain.as_str()) {
                        let (t, p) = before.get(&(r.chain.as_str(), r.pos))?;
                        if *t != "DROP" {
                            return None;
                        }
                        *p
                    } else {
                        0
                    };
                    (r.packets > p).then(|| (r.clone(), r.packets - p))
                })
                .collect();
            if !moved.is_empty() {
                keep_interval(
                    &mut self.intervals,
                    Arc::new(Interval {
                        from_ns,
                        to_ns: at_ns,
                        moved,
                        layout: Arc::clone(&rules),
                    }),
                );
            }
        }
        self.layout = rules;
        self.last_read_ns = Some(at_ns);
        self.error = None;
    }
}

/// What the rules see: the datastore's policies (None without one) and the counters.
#[derive(Debug, Default, Clone)]
pub struct PolicyView {
    pub policies: Option<Arc<PolicySet>>,
    /// Why there are no policies (no datastore configured, not listed yet).
    pub policies_missing: Option<String>,
    pub counters: Arc<Counters>,
    /// felix's eBPF rule counters, in eBPF mode (its netfilter chains then hold no policy).
    pub ebpf: Option<Arc<bpf::Counters>>,
}

/// A DROP rule that moved, by how many packets, with the chains as they were then.
type Moved = (FilterRule, u64, Arc<Vec<FilterRule>>);

/// The chains a packet of the flow can traverse: its endpoints' chains and what they jump to.
fn reachable(layout: &[FilterRule], endpoints: &[String]) -> HashSet<String> {
    let mut jumps: HashMap<&str, Vec<&str>> = HashMap::new();
    for r in layout {
        if base(&r.target).starts_with("cali-") {
            jumps.entry(&r.chain).or_default().push(&r.target);
        }
    }
    let mut reach: HashSet<String> = HashSet::new();
    let mut todo: Vec<String> = endpoints
        .iter()
        .flat_map(|e| {
            [TO_WORKLOAD, FROM_WORKLOAD].into_iter().flat_map(move |p| {
                [
                    length_limited_id(p, e, IPTABLES_MAX_CHAIN),
                    format!("{NFT_FILTER}{}", length_limited_id(p, e, NFT_MAX_CHAIN)),
                ]
            })
        })
        .collect();
    while let Some(ch) = todo.pop() {
        if reach.contains(&ch) {
            continue;
        }
        if let Some(next) = jumps.get(ch.as_str()) {
            todo.extend(next.iter().map(|s| s.to_string()));
        }
        reach.insert(ch);
    }
    reach
}

fn direction_of_chain(chain: &str) -> Option<PolicyDirection> {
    let chain = base(chain);
    if chain.starts_with(TO_WORKLOAD) || chain.starts_with(POLICY_IN) {
        Some(PolicyDirection::Ingress)
    } else if chain.starts_with(FROM_WORKLOAD) || chain.starts_with(POLICY_OUT) {
        Some(PolicyDirection::Egress)
    } else {
        None
    }
}

impl PolicyView {
    /// The felix rule that dropped a packet of a flow at `ts_ns` whose workload endpoints are
    /// `endpoints` (host-side veth names), or why none can be named.
    pub fn attribute(&self, ts_ns: u64, endpoints: &[String]) -> Result<PolicyHit, PolicyLookup> {
        let missing = |m: String| PolicyLookup {
            candidates: vec![],
            missing: vec![m],
        };
        if self.ebpf.is_some() {
            return Err(missing(
                "felix's eBPF dataplane enforces policy in its tc programs, not in netfilter chains".into(),
            ));
        }
        let c = &self.counters;
        if let Some(e) = &c.error {
            return Err(missing(format!("felix's filter rule counters unread: {e}")));
        }
        let Some(last) = c.last_read_ns else {
            return Err(missing("felix's filter rule counters not read yet".into()));
        };
        if ts_ns.saturating_add(SLACK_NS) > last {
            return Err(missing(
                "felix's rule counters not read since the drop yet".into(),
            ));
        }
        let mut moved: BTreeMap<(String, u32), Moved> = BTreeMap::new();
        let mut covered = false;
        for iv in &c.intervals {
            if ts_ns + SLACK_NS > iv.from_ns && ts_ns <= iv.to_ns + SLACK_NS {
                covered = true;
                // Chains a packet of the flow could traverse then.
                let reach = reachable(&iv.layout, endpoints);
                for (r, n) in iv.moved.iter().filter(|(r, _)| reach.contains(&r.chain)) {
                    moved
                        .entry((r.chain.clone(), r.pos))
                        .or_insert_with(|| (r.clone(), 0, Arc::clone(&iv.layout)))
                        .1 += n;
                }
            }
        }
        let candidates: Vec<String> = moved.keys().map(|(c, p)| format!("{c}#{p}")).collect();
        let mut hits = moved.into_values();
        let (rule, packets, layout) = match (hits.next(), hits.next()) {
            (Some(one), None) => one,
            (Some(_), Some(_)) => {
                return Err(PolicyLookup {
                    candidates,
                    missing: vec![
                        "several felix DROP rules on the flow's endpoints moved with the drop: which one dropped this flow's packet is not decided".into(),
                    ],
                })
            }
            (None, _) if endpoints.is_empty() => {
                return Err(missing(
                    "the flow crossed no workload endpoint: felix's policy chains do not apply"
                        .into(),
                ))
            }
            (None, _) if !covered => {
                return Err(missing(
                    "no felix DROP rule counter moved while the drop happened (another table or rule dropped it)".into(),
                ))
            }
            (None, _) => {
                return Err(missing(
                    "no felix DROP rule on the flow's endpoints moved with the drop".into(),
                ))
            }
        };
        self.classify(rule, packets, &layout)
    }

    /// In felix's eBPF dataplane: the rule that dropped a packet at `ts_ns` whose drop reason
    /// is `reason`, at a workload endpoint (`endpoints` as for [`Self::attribute`]).
    pub fn attribute_bpf(
        &self,
        ts_ns: u64,
        reason: &str,
        endpoints: &[String],
    ) -> Result<PolicyHit, PolicyLookup> {
        let missing = |m: &str| PolicyLookup {
            candidates: vec![],
            missing: vec![m.to_string()],
        };
        let Some(counters) = &self.ebpf else {
            return Err(missing("felix's eBPF dataplane not detected"));
        };
        if endpoints.is_empty() {
            return Err(missing(
                "the flow crossed no workload endpoint: felix's workload policy does not apply",
            ));
        }
        let Some(dir) = bpf::direction_of_drop(reason) else {
            return Err(missing("not a tc program's drop"));
        };
        bpf::attribute(
            counters,
            self.policies.as_deref().map(PolicySet::rule_ids),
            self.policies_missing.as_deref(),
            ts_ns,
            dir,
        )
    }

    fn classify(
        &self,
        rule: FilterRule,
        packets: u64,
        layout: &[FilterRule],
    ) -> Result<PolicyHit, PolicyLookup> {
        let cand = vec![format!("{}#{}", rule.chain, rule.pos)];
        let not_policy = |m: String| PolicyLookup {
            candidates: cand.clone(),
            missing: vec![m],
        };
        let Some(direction) = direction_of_chain(&rule.chain) else {
            return Err(not_policy(format!(
                "felix's rule {}#{} dropped it: not a policy chain",
                rule.chain, rule.pos
            )));
        };
        let Some(set) = &self.policies else {
            return Err(not_policy(format!(
                "no policies from the datastore ({}): felix's chain {} is not named",
                self.policies_missing.as_deref().unwrap_or("none read"),
                rule.chain
            )));
        };
        let mut hit = deny_hit(rule.chain.clone(), rule.pos, direction, packets);
        let endpoint_chain = base(&rule.chain).starts_with(TO_WORKLOAD)
            || base(&rule.chain).starts_with(FROM_WORKLOAD);
        if endpoint_chain {
            let tier = rule.comments.iter().find_map(|c| {
                c.strip_prefix(END_OF_TIER)
                    .and_then(|t| t.split_once(". "))
                    .map(|(t, _)| t.to_string())
            });
            let no_profile = rule.comments.iter().any(|c| c.ends_with(NO_PROFILE));
            let layout: Vec<&FilterRule> = layout
                .iter()
                .filter(|r| r.chain == rule.chain && r.pos < rule.pos)
                .collect();
            if let Some(tier) = tier {
                hit.action = PolicyAction::EndOfTier;
                // The policy chains jumped to since this tier's start ("Start of tier <t>").
                let start = format!("Start of tier {tier}");
                let from = layout
                    .iter()
                    .rposition(|r| r.comments.contains(&start))
                    .unwrap_or(0);
                for r in &layout[from..] {
                    if let Some((p, _)) = set.by_chain(&r.target) {
                        hit.policies.push(p.label());
                    } else if base(&r.target).starts_with(POLICY_IN)
                        || base(&r.target).starts_with(POLICY_OUT)
                    {
                        hit.missing.push(format!(
                            "felix's chain {} is no policy of the datastore{}",
                            r.target,
                            set.unread_note()
                        ));
                    }
                }
                hit.tier = Some(tier);
                return Ok(hit);
            }
            if no_profile {
                hit.action = PolicyAction::NoProfileMatched;
                for r in &layout {
                    for pfx in [PROFILE_IN, PROFILE_OUT] {
                        if let Some(name) = base(&r.target).strip_prefix(pfx) {
                            hit.policies.push(if name.starts_with('_') {
                                format!("Profile (chain {})", r.target)
                            } else {
                                format!("Profile {name}")
                            });
                        }
                    }
                }
                return Ok(hit);
            }
            let what = rule.comments.iter().find(|c| !c.starts_with("cali:"));
            return Err(not_policy(format!(
                "felix's endpoint rule {}#{} dropped it ({}): not a policy verdict",
                rule.chain,
                rule.pos,
                what.map_or("conntrack INVALID or encapsulated traffic", String::as_str)
            )));
        }
        let Some((policy, dir)) = set.by_chain(&rule.chain) else {
            return Err(not_policy(format!(
                "felix's chain {} is no policy of the datastore ({} read{})",
                rule.chain,
                set.len(),
                set.unread_note()
            )));
        };
        hit.direction = *dir;
        hit.kind = Some(policy.kind.as_str().into());
        hit.namespace = policy.namespace.clone();
        hit.name = Some(policy.name.clone());
        hit.tier = Some(policy.tier.clone());
        // Which policy rule renders the chain's rule at `pos`.
        let mut next = 1u32;
        for (i, r) in policy.rules(*dir).iter().enumerate() {
            let Some(n) = r.iptables_rules_v4() else {
                hit.missing.push(format!(
                    "rule index: rule {i} of the policy renders to match blocks whose rule count is not modelled"
                ));
                return Ok(hit);
            };
            if rule.pos < next + n {
                if r.action.eq_ignore_ascii_case("deny") {
                    hit.rule_index = u32::try_from(i).ok();
                    hit.rule = Some(r.describe());
                } else {
                    hit.missing.push(format!(
                        "rule index: the chain's rule {} renders the policy's rule {i} ({}), not a Deny: the datastore and felix's chain disagree",
                        rule.pos, r.action
                    ));
                }
                return Ok(hit);
            }
            next += n;
        }
        hit.missing.push(format!(
            "rule index: the policy has fewer rules than felix's chain (rule {}): the datastore and felix's chain disagree",
            rule.pos
        ));
        Ok(hit)
    }
}

/// A Deny hit on `chain` (its rule at `chain_rule`) that names nothing yet: the caller fills
/// in the policy, tier and rule it can tell.
pub(crate) fn deny_hit(
    chain: String,
    chain_rule: u32,
    direction: PolicyDirection,
    packets: u64,
) -> PolicyHit {
    PolicyHit {
        action: PolicyAction::Deny,
        chain,
        chain_rule,
        direction,
        kind: None,
        missing: vec![],
        name: None,
        namespace: None,
        packets,
        policies: vec![],
        rule: None,
        rule_index: None,
        tier: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_felix_names() {
        // Short enough: left as is (unique_id.go).
        assert_eq!(length_limited_id("cali-pi-", "gnp/a", 28), "cali-pi-gnp/a");
        // Too long: "_" + the sha256's base64url, cut to fit.
        let long = length_limited_id("cali-pi-", "np/default/knp.default.deny", 28);
        assert_eq!(long.len(), 28);
        assert!(long.starts_with("cali-pi-_"));
        let h = base64url(&Sha256::digest(b"np/default/knp.default.deny"));
        assert_eq!(&long[9..], &h[..19]);
        // Exactly the limit but starting with the marker: hashed too.
        assert!(length_limited_id("ab", "_cd", 5).starts_with("ab_"));
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn parses_saved_rules_with_quoted_comments() {
        let save = "*filter\n:cali-tw-cali1 - [0:0]\n[3:180] -A cali-tw-cali1 -m comment --comment \"cali:x\" -m comment --comment \"End of tier default. DROP if no policies passed packet\" -m mark --mark 0x0/0x20000 -j DROP\n[0:0] -A FORWARD -j cali-FORWARD\n[1:60] -A cali-tw-cali1 -j cali-pi-_abc\nCOMMIT\n";
        let r = parse_iptables_save(save);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].pos, r[0].packets, r[0].target.as_str()),
            (1, 3, "DROP")
        );
        assert_eq!(
            r[0].comments[1],
            "End of tier default. DROP if no policies passed packet"
        );
        assert_eq!((r[1].pos, r[1].target.as_str()), (2, "cali-pi-_abc"));
    }

    /// felix/fv/cali-nftables-dump.txt's format (`nft list table ip calico`): a base chain
    /// header, sets and maps, the vmap dispatch, `counter packets N bytes M` on each rule and
    /// `comment "cali:<hash>; <text>"`; the endpoint and policy chains as felix renders them.
    const NFT_LISTING: &str = r#"table ip calico {
	set cali40masq-ipam-pools {
		type ipv4_addr
		flags interval
		elements = { 10.244.0.0/16,
			     10.245.0.0/16 }
	}

	map filter-cali-to-wl-dispatch {
		type ifname : verdict
		elements = { "cali0123456789a" : goto filter-cali-tw-cali0123456789a }
	}

	chain filter-FORWARD {
		type filter hook forward priority filter; policy accept;
		counter packets 9 bytes 540 jump filter-cali-FORWARD comment "cali:dpfqBgJrpRwlrqw1;"
		meta mark & 0x00010000 == 0x00010000 counter packets 0 bytes 0 accept comment "cali:yp7iNUYNEhDmKF6E; Policy explicitly accepted packet."
	}

	chain filter-cali-to-wl-dispatch {
		oifname vmap @filter-cali-to-wl-dispatch comment "cali:ljtHSLJQhigspPd1;"
		counter packets 0 bytes 0 drop comment "cali:zeZtiiPDsE6BwqUG; Unknown interface"
	}

	chain filter-cali-tw-cali0123456789a {
		ct state established,related counter packets 4 bytes 240 accept comment "cali:EoT7sG63EVZlYRR8;"
		ct state invalid counter packets 0 bytes 0 drop comment "cali:OFFxvX22_3d1OD6J;"
		counter packets 5 bytes 300 meta mark set meta mark & 0xfffcffff comment "cali:EkzbpSFKJzqIzH88;"
		counter packets 5 bytes 300 meta mark set meta mark & 0xfffdffff comment "cali:aCM8M20bKUR6G9Pe; Start of tier default"
		meta mark & 0x00020000 == 0x00000000 counter packets 5 bytes 300 jump filter-cali-pi-np/shop/knp.default.allow-web comment "cali:K-AE4bNUyaT_dZuj;"
		meta mark & 0x00010000 == 0x00010000 counter packets 2 bytes 120 return comment "cali:gf26GoTNIM8MDx5K; Return if policy accepted"
		meta mark & 0x00020000 == 0x00000000 counter packets 3 bytes 180 drop comment "cali:RY4mCNULXyg7iOT3; End of tier default. DROP if no policies passed packet"
		counter packets 0 bytes 0 jump filter-cali-pri-kns.shop comment "cali:sl-DJWXcFtZCsIwW;"
		meta mark & 0x00010000 == 0x00010000 counter packets 0 bytes 0 return comment "cali:6FJgWfc0m-fdTXeS; Return if profile accepted"
		counter packets 0 bytes 0 drop comment "cali:RzKCfx36nR0eyipz; DROP if no profiles matched"
	}

	chain filter-cali-pi-np/shop/knp.default.allow-web {
		ip saddr 10.244.142.38 tcp dport 8080 counter packets 2 bytes 120 meta mark set meta mark | 0x00010000 comment "cali:1LnhnBSv_O60Gs3h; NetworkPolicy shop/knp.default.allow-web ingress"
	}

	chain nat-cali-nat-outgoing {
		ip saddr @cali40masq-ipam-pools ip daddr != @cali40network-ip-pools counter packets 7 bytes 420 masquerade fully-random comment "cali:JjuWIaIfSLZi41Xk;"
	}
}
"#;

    #[test]
    fn parses_felix_nft_listing() {
        let r = parse_nft_list(NFT_LISTING);
        // filter-FORWARD is no `cali-` chain; the nat chain is not the filter table's.
        assert!(r.iter().all(|r| r.chain.starts_with("filter-cali-")));
        let tw: Vec<&FilterRule> = r
            .iter()
            .filter(|r| r.chain == "filter-cali-tw-cali0123456789a")
            .collect();
        assert_eq!(tw.len(), 10);
        let eot = tw[6];
        assert_eq!((eot.pos, eot.packets, eot.target.as_str()), (7, 3, "DROP"));
        assert_eq!(
            eot.comments,
            [
                "cali:RY4mCNULXyg7iOT3",
                "End of tier default. DROP if no policies passed packet"
            ]
        );
        assert_eq!(tw[4].target, "filter-cali-pi-np/shop/knp.default.allow-web");
        // The vmap rule: no counter, no target; the hash-only comment.
        let d = r
            .iter()
            .find(|r| r.chain == "filter-cali-to-wl-dispatch")
            .map(|r| (r.pos, r.packets, r.target.clone(), r.comments.clone()));
        assert_eq!(
            d,
            Some((
                1,
                0,
                String::new(),
                vec!["cali:ljtHSLJQhigspPd1".to_string()]
            ))
        );
        // With `nft -a`, the handle is not part of the rule.
        let a = parse_nft_list(
            &NFT_LISTING.replace("Unknown interface\"", "Unknown interface\" # handle 12"),
        );
        assert!(a
            .iter()
            .any(|r| r.comments.get(1).map(String::as_str) == Some("Unknown interface")));
    }

    #[test]
    fn nft_end_of_tier_names_the_tier_and_its_policies() {
        let p = parse_policy(
            PolicyKind::NetworkPolicy,
            r#"{"metadata":{"name":"knp.default.allow-web","namespace":"shop"},"spec":{
            "ingress":[{"action":"Allow","protocol":"TCP","source":{"nets":["10.244.142.38/32"]}}]}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.nft_chain(PolicyDirection::Ingress),
            "filter-cali-pi-np/shop/knp.default.allow-web"
        );
        let mut c = Counters::default();
        c.record(
            100,
            parse_nft_list(&NFT_LISTING.replace("packets 3 bytes 180", "packets 0 bytes 0")),
        );
        c.record(200_000_000, parse_nft_list(NFT_LISTING));
        let view = PolicyView {
            policies: Some(Arc::new(PolicySet::new([p]))),
            counters: Arc::new(c),
            ..Default::default()
        };
        let hit = view
            .attribute(50_000_000, &["cali0123456789a".into()])
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(hit.action, PolicyAction::EndOfTier);
        assert_eq!(hit.chain, "filter-cali-tw-cali0123456789a");
        assert_eq!(hit.chain_rule, 7);
        assert_eq!(hit.tier.as_deref(), Some("default"));
        assert_eq!(hit.direction, PolicyDirection::Ingress);
        assert_eq!(hit.policies, ["NetworkPolicy shop/knp.default.allow-web"]);
        assert_eq!(hit.packets, 3);
    }

    fn deny_policy() -> Policy {
        parse_policy(
            PolicyKind::NetworkPolicy,
            r#"{"metadata":{"name":"security.deny","namespace":"ns"},"spec":{"tier":"security",
            "ingress":[{"action":"Allow","protocol":"TCP","source":{"nets":["10.0.0.1/32"]}},
                       {"action":"Deny","protocol":"TCP","destination":{"ports":[8080]}}]}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn one_moved_rule_names_policy_and_rule_index() {
        let p = deny_policy();
        let chain = p.chain(PolicyDirection::Ingress);
        let rule = FilterRule::bare;
        let mut c = Counters::default();
        c.record(
            100,
            vec![
                rule("cali-tw-cali1", 1, 0, &chain),
                rule(&chain, 4, 0, "DROP"),
            ],
        );
        c.record(
            200_000_000,
            vec![
                rule("cali-tw-cali1", 1, 2, &chain),
                rule(&chain, 4, 2, "DROP"),
            ],
        );
        let view = PolicyView {
            policies: Some(Arc::new(PolicySet::new([p]))),
            counters: Arc::new(c.clone()),
            ..Default::default()
        };
        let hit = view
            .attribute(50_000_000, &["cali1".into()])
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(hit.action, PolicyAction::Deny);
        assert_eq!(hit.rule_index, Some(1));
        assert_eq!(hit.tier.as_deref(), Some("security"));
        assert_eq!(hit.direction, PolicyDirection::Ingress);
        assert_eq!(hit.packets, 2);
        // Another endpoint's chains: nothing reachable moved.
        assert!(view.attribute(50_000_000, &["cali2".into()]).is_err());
        // Without the datastore: said missing, never named.
        let bare = PolicyView {
            counters: Arc::new(c),
            policies_missing: Some("identity off".into()),
            ..Default::default()
        };
        let e = bare.attribute(50_000_000, &["cali1".into()]).err();
        assert!(e.is_some_and(|e| e.missing[0].contains("identity off")));
    }

    #[test]
    fn several_moved_rules_are_ambiguous() {
        let rule = |pos, packets| FilterRule {
            chain: "cali-tw-cali1".into(),
            pos,
            packets,
            target: "DROP".into(),
            comments: vec![],
        };
        let mut c = Counters::default();
        c.record(0, vec![rule(1, 0), rule(2, 0)]);
        c.record(100_000_000, vec![rule(1, 1), rule(2, 1)]);
        let view = PolicyView {
            policies: Some(Arc::new(PolicySet::default())),
            counters: Arc::new(c),
            ..Default::default()
        };
        let e = view.attribute(50_000_000, &["cali1".into()]).err();
        assert!(e.is_some_and(|e| e.candidates.len() == 2));
    }
}
