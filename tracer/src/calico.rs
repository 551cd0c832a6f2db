//! Calico's view of the node: IP pools (from felix's nft sets or ipsets) and which interface
//! plays which role.
use std::{net::IpAddr, time::Duration};

use serde::Serialize;
use sha1::{Digest, Sha1};

use crate::{
    net::{Cidr, NetError},
    netlink::{Link, NodeFacts},
    nftables,
};

/// felix's default InterfacePrefix: pods' host-side veths are named `cali<11 hex digits>`.
pub const DEFAULT_INTERFACE_PREFIX: &str = "cali";

/// felix's ipset of the IPv4 pools whose destinations are not masqueraded: `all-ipam-pools` up to
/// v3.32.0 (every pool), `network-ip-pools` from v3.32.1 (LoadBalancer-only pools left out).
pub const ALL_POOLS_SETS_V4: &[&str] = &["cali40all-ipam-pools", "cali40network-ip-pools"];
pub const MASQ_POOLS_SETS_V4: &[&str] = &["cali40masq-ipam-pools"];
pub const ALL_POOLS_SETS_V6: &[&str] = &["cali60all-ipam-pools", "cali60network-ip-pools"];
pub const MASQ_POOLS_SETS_V6: &[&str] = &["cali60masq-ipam-pools"];
/// felix's ipsets of every node's address (`IPSetIDAllHostNets`), which
/// `NATOutgoingExclusions=IPPoolsAndHostIPs` adds to the natOutgoing rule's exclusions.
pub const ALL_HOSTS_SET_V4: &str = "cali40all-hosts-net";
pub const ALL_HOSTS_SET_V6: &str = "cali60all-hosts-net";
/// felix's nat chain holding the natOutgoing MASQUERADE/SNAT rule(s) (`ChainNATOutgoing`).
pub const NAT_OUTGOING_CHAIN: &str = "cali-nat-outgoing";

/// Calico's tunnel devices. (`wg-v6.cali` is the IPv6 WireGuard device.)
pub const TUNNEL_IFACES: &[&str] = &[
    "tunl0",
    "vxlan.calico",
    "vxlan-v6.calico",
    "wireguard.cali",
    "wg-v6.cali",
];

#[derive(Debug, thiserror::Error)]
pub enum CalicoError {
    #[error("bad interface name {0:?}: 1-15 characters, no '/', ':' or whitespace")]
    BadIfaceName(String),
    #[error("running ipset: {0} (is the ipset tool installed?)")]
    IpsetExec(std::io::Error),
    #[error("ipset did not answer in time; killed")]
    IpsetTimeout,
    #[error("bad pool {0}")]
    BadPool(#[from] NetError),
    #[error("cannot read {NAT_OUTGOING_CHAIN}: {0}")]
    NatChain(String),
}

/// The node's IP pools as felix programmed them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pools {
    /// Every pool (felix's `all-ipam-pools` sets): destinations here are not masqueraded.
    pub all: Vec<Cidr>,
    /// Pools with natOutgoing (felix's `masq-ipam-pools` sets).
    pub masq: Vec<Cidr>,
    /// Where the pools came from: "nftables", "ipset", either with "+flags", "flags", or
    /// "none".
    pub source: String,
    /// The felix dataplane the sets and rules were read from (which commands a fix names).
    #[serde(skip)]
    pub dataplane: Dataplane,
    /// Sets that were looked for and not found, for the operator's benefit.
    pub missing_sets: Vec<String>,
    /// LoadBalancer-only pools that felix's natOutgoing rule still leaves un-masqueraded: in
    /// `all-ipam-pools` (what v3.32.0's rule names) but not in `network-ip-pools`, where both
    /// sets exist. Empty when that cannot be told.
    pub lb_only: Vec<Cidr>,
    /// felix's IPv4 natOutgoing rule as read from the node; `None` when unknown.
    pub nat_outgoing_v4: Option<NatOutgoing>,
    /// felix's IPv6 natOutgoing rule as read from the node; `None` when unknown.
    pub nat_outgoing_v6: Option<NatOutgoing>,
    /// Members of `cali40all-hosts-net` / `cali60all-hosts-net`, read only when the rule of that
    /// family excludes host IPs; `None` when not read or unreadable. Shown as a count: a big
    /// cluster has thousands of nodes.
    #[serde(serialize_with = "member_count")]
    pub host_nets_v4: Option<Vec<Cidr>>,
    #[serde(serialize_with = "member_count")]
    pub host_nets_v6: Option<Vec<Cidr>>,
    /// Why a natOutgoing rule is unknown, for the operator's benefit.
    pub nat_outgoing_errors: Vec<String>,
    /// felix's eBPF dataplane, when detected (set by the sync loop): the rules then leave
    /// [`crate::felix_bpf::OFF_CAUSES`] alone.
    #[serde(skip)]
    pub ebpf: Option<crate::felix_bpf::EbpfMode>,
}

impl From<&Pools> for tracer_model::health::PoolsView {
    fn from(p: &Pools) -> Self {
        let nat = |n: &Option<NatOutgoing>| {
            n.as_ref().map(|n| tracer_model::health::NatOutgoingView {
                rules: n.rules,
                pool_set: n.pool_set.clone(),
                excludes_host_ips: n.excludes_host_ips,
                out_iface: n.out_iface.clone(),
                out_iface_negated: n.out_iface_negated,
            })
        };
        tracer_model::health::PoolsView {
            all: p.all.clone(),
            masq: p.masq.clone(),
            source: p.source.clone(),
            missing_sets: p.missing_sets.clone(),
            lb_only: p.lb_only.clone(),
            nat_outgoing_v4: nat(&p.nat_outgoing_v4),
            nat_outgoing_v6: nat(&p.nat_outgoing_v6),
            host_nets_v4: p.host_nets_v4.as_ref().map(Vec::len),
            host_nets_v6: p.host_nets_v6.as_ref().map(Vec::len),
            nat_outgoing_errors: p.nat_outgoing_errors.clone(),
        }
    }
}

fn member_count<S: serde::Serializer>(v: &Option<Vec<Cidr>>, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&v.as_ref().map(Vec::len), s)
}

/// What felix's natOutgoing rule (`felix/rules/nat.go`) leaves alone on purpose, read from its
/// `cali-nat-outgoing` chain.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NatOutgoing {
    /// MASQUERADE/SNAT rules in the chain; 0 when no pool has natOutgoing (felix leaves the
    /// chain empty).
    pub rules: usize,
    /// The pool set whose destinations are not masqueraded (`! --match-set <set> dst`).
    pub pool_set: Option<String>,
    /// `NATOutgoingExclusions=IPPoolsAndHostIPs`: `! --match-set cali40all-hosts-net dst`.
    pub excludes_host_ips: bool,
    /// `IptablesNATOutgoingInterfaceFilter`: the rule's `-o` match, iptables spelling (a
    /// trailing `+` matches any name with that prefix).
    pub out_iface: Option<String>,
    /// `! -o`: felix never writes it, but a hand-edited rule may.
    pub out_iface_negated: bool,
    /// The first rule's target: `MASQUERADE` or `SNAT` (nftables: `masquerade`, `snat`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// FelixConfiguration `natPortRange`: the TCP/UDP rules' `--to-ports` (`to :` in nftables).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_range: Option<String>,
    /// Every rule has `--random-fully` (`fully-random`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub random_fully: bool,
}

impl NatOutgoing {
    /// What the rule leaves alone, without how it translates: felix's rules for TCP and UDP
    /// carry natPortRange's ports, its last one none, and they still agree.
    fn exclusions(&self) -> NatOutgoing {
        NatOutgoing {
            rules: 0,
            action: None,
            port_range: None,
            random_fully: false,
            ..self.clone()
        }
    }

    /// Adds one more translating rule's ports to what was found so far (`self`, or none).
    pub(crate) fn merge(found: Option<NatOutgoing>, rule: NatOutgoing) -> Result<Self, ()> {
        let Some(mut f) = found else {
            return Ok(rule);
        };
        if f.exclusions() != rule.exclusions() {
            return Err(());
        }
        f.port_range = f.port_range.or(rule.port_range);
        f.random_fully &= rule.random_fully;
        Ok(f)
    }

    /// Whether the rule's interface match lets a packet leaving `iface` through (true when the
    /// rule has none).
    pub fn matches_iface(&self, iface: &str) -> bool {
        let Some(m) = &self.out_iface else {
            return true;
        };
        let hit = match m.strip_suffix('+') {
            Some(prefix) => iface.starts_with(prefix),
            None => iface == m,
        };
        hit != self.out_iface_negated
    }
}

impl Pools {
    pub fn pool_of(&self, ip: IpAddr) -> Option<Cidr> {
        self.all
            .iter()
            .filter(|c| c.contains(ip))
            .max_by_key(|c| c.prefix())
            .copied()
    }

    pub fn masq_pool_of(&self, ip: IpAddr) -> Option<Cidr> {
        self.masq.iter().find(|c| c.contains(ip)).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.masq.is_empty()
    }

    /// The LoadBalancer-only pool holding `ip`, if felix's rule still excludes it.
    pub fn lb_only_pool_of(&self, ip: IpAddr) -> Option<Cidr> {
        self.lb_only
            .iter()
            .filter(|c| c.contains(ip))
            .max_by_key(|c| c.prefix())
            .copied()
    }

    /// felix's natOutgoing rule for `ip`'s family, if it was read.
    pub fn nat_outgoing_for(&self, ip: IpAddr) -> Option<&NatOutgoing> {
        match ip {
            IpAddr::V4(_) => self.nat_outgoing_v4.as_ref(),
            IpAddr::V6(_) => self.nat_outgoing_v6.as_ref(),
        }
    }

    /// `all-hosts-net` of `ip`'s family: `None` when it was not (or could not be) read.
    pub fn host_nets_for(&self, ip: IpAddr) -> Option<&[Cidr]> {
        match ip {
            IpAddr::V4(_) => self.host_nets_v4.as_deref(),
            IpAddr::V6(_) => self.host_nets_v6.as_deref(),
        }
    }
}

/// Which of felix's dataplanes the pools and the natOutgoing rule were read from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dataplane {
    /// ipsets and the iptables `cali-nat-outgoing` chain (also the answer when neither was
    /// found: it is what the commands of a fix text then name).
    #[default]
    Iptables,
    /// nft sets and the `nat-cali-nat-outgoing` chain of `table ip calico` / `table ip6 calico`.
    Nftables,
}

impl Dataplane {
    /// felix's natOutgoing chain in this dataplane.
    pub fn nat_outgoing_chain(self) -> &'static str {
        match self {
            Dataplane::Iptables => NAT_OUTGOING_CHAIN,
            Dataplane::Nftables => nftables::NAT_OUTGOING_CHAIN,
        }
    }

    /// The command that lists felix's natOutgoing chain of `ip`'s family.
    pub fn show_nat_outgoing(self, ipv6: bool) -> String {
        match (self, ipv6) {
            (Dataplane::Iptables, false) => format!("iptables -t nat -S {NAT_OUTGOING_CHAIN}"),
            (Dataplane::Iptables, true) => format!("ip6tables -t nat -S {NAT_OUTGOING_CHAIN}"),
            (Dataplane::Nftables, v6) => format!(
                "nft list chain {} {} {}",
                if v6 { "ip6" } else { "ip" },
                nftables::TABLE,
                nftables::NAT_OUTGOING_CHAIN
            ),
        }
    }

    /// The command that lists one of felix's sets.
    pub fn show_set(self, set: &str) -> String {
        match self {
            Dataplane::Iptables => format!("ipset list {set}"),
            Dataplane::Nftables => {
                let family = nftables::Family::of_set(set).unwrap_or(nftables::Family::Ip);
                format!("nft list set {} {} {set}", family.name(), nftables::TABLE)
            }
        }
    }

    /// What felix's sets are called in this dataplane, for prose.
    pub fn set_kind(self) -> &'static str {
        match self {
            Dataplane::Iptables => "ipset",
            Dataplane::Nftables => "nft set",
        }
    }
}

/// Where felix's sets and rule are read from: nfnetlink for the nftables dataplane, the
/// `ipset` and `iptables-save` tools for the iptables one.
enum Reader {
    Iptables,
    Nftables(nftables::Nft),
}

impl Reader {
    /// nftables when felix's `calico` table exists in either family, else iptables (also when
    /// nfnetlink cannot be read: the tools may still work).
    async fn detect(until: tokio::time::Instant) -> Reader {
        let mut nft = match nftables::Nft::open() {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "no nfnetlink; reading ipsets");
                return Reader::Iptables;
            }
        };
        for family in [nftables::Family::Ip, nftables::Family::Ip6] {
            match tokio::time::timeout_at(until, nft.has_table(family)).await {
                Ok(Ok(true)) => return Reader::Nftables(nft),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot list nftables; reading ipsets");
                    return Reader::Iptables;
                }
                Err(_) => {
                    tracing::warn!("nfnetlink did not answer in time; reading ipsets");
                    return Reader::Iptables;
                }
            }
        }
        Reader::Iptables
    }

    fn dataplane(&self) -> Dataplane {
        match self {
            Reader::Iptables => Dataplane::Iptables,
            Reader::Nftables(_) => Dataplane::Nftables,
        }
    }

    /// felix's natOutgoing rule of one family; the error names what was asked.
    async fn rule(&mut self, v6: bool, until: tokio::time::Instant) -> Result<NatOutgoing, String> {
        match self {
            Reader::Iptables => {
                let cmd = if v6 { "ip6tables" } else { "iptables" };
                nat_outgoing_rule(cmd, until)
                    .await
                    .map_err(|e| format!("{cmd}: {e}"))
            }
            Reader::Nftables(nft) => {
                let family = if v6 {
                    nftables::Family::Ip6
                } else {
                    nftables::Family::Ip
                };
                let what = format!(
                    "nft {} {} {}",
                    family.name(),
                    nftables::TABLE,
                    nftables::NAT_OUTGOING_CHAIN
                );
                match tokio::time::timeout_at(
                    until,
                    nft.chain_rules(family, nftables::NAT_OUTGOING_CHAIN),
                )
                .await
                {
                    Err(_) => Err(format!("{what}: nfnetlink did not answer in time")),
                    Ok(Err(e)) => Err(format!("{what}: {e}")),
                    Ok(Ok(None)) => Err(format!("{what}: no such chain")),
                    Ok(Ok(Some(rules))) => nftables::nat_outgoing_of(&rules, family)
                        .map_err(|e| format!("{what}: {e}")),
                }
            }
        }
    }

    /// One set's members, `None` when it is missing or unreadable (logged).
    async fn set(&mut self, set: &str, until: tokio::time::Instant) -> Option<Vec<Cidr>> {
        match self {
            Reader::Iptables => read_set(set, until).await,
            Reader::Nftables(nft) => {
                let family = nftables::Family::of_set(set)?;
                match tokio::time::timeout_at(until, nft.set_members(family, set)).await {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        tracing::warn!(set, error = %e, "cannot read nft set");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(set, "nfnetlink did not answer in time");
                        None
                    }
                }
            }
        }
    }
}

/// Reads felix's pool sets and its natOutgoing rules in the agent's network namespace, from
/// its nftables dataplane when `table ip calico` (or `ip6`) exists, else from its ipsets and
/// iptables. Pools given on the command line (`--pool`, `--masq-pool`) are added, which covers
/// nodes where the sets do not exist. Everything runs within `deadline` (tools are killed,
/// netlink reads abandoned, and what they would have told counts as unknown): a wedged
/// netfilter must not stop the sync loop.
pub async fn read_pools(flag_all: &[Cidr], flag_masq: &[Cidr], deadline: Duration) -> Pools {
    let mut pools = Pools::default();
    let until = tokio::time::Instant::now() + deadline;
    let mut reader = Reader::detect(until).await;
    pools.dataplane = reader.dataplane();
    // The rules first: they name the pool set felix really uses.
    for (v6, hosts_set) in [(false, ALL_HOSTS_SET_V4), (true, ALL_HOSTS_SET_V6)] {
        let rule = match reader.rule(v6, until).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, "natOutgoing rule unknown");
                pools.nat_outgoing_errors.push(e);
                None
            }
        };
        let hosts = match &rule {
            Some(r) if r.excludes_host_ips => reader.set(hosts_set, until).await,
            _ => None,
        };
        if v6 {
            pools.nat_outgoing_v6 = rule;
            pools.host_nets_v6 = hosts;
        } else {
            pools.nat_outgoing_v4 = rule;
            pools.host_nets_v4 = hosts;
        }
    }
    for (sets, rule) in [
        (ALL_POOLS_SETS_V4, pools.nat_outgoing_v4.clone()),
        (ALL_POOLS_SETS_V6, pools.nat_outgoing_v6.clone()),
    ] {
        let (all_ipam, network) = (sets[0], sets[1]);
        let old = reader.set(all_ipam, until).await;
        let new = reader.set(network, until).await;
        if old.is_none() && new.is_none() {
            pools.missing_sets.push(sets.join("|"));
        }
        let rule_set = rule.as_ref().and_then(|r| r.pool_set.as_deref());
        let (used, lb_only) = pool_sets(
            old,
            new,
            rule_set == Some(all_ipam),
            rule_set == Some(network),
        );
        pools.all.extend(used);
        pools.lb_only.extend(lb_only);
    }
    for sets in [MASQ_POOLS_SETS_V4, MASQ_POOLS_SETS_V6] {
        let mut found = false;
        for set in sets {
            if let Some(members) = reader.set(set, until).await {
                found = true;
                pools.masq.extend(members);
            }
        }
        if !found {
            pools.missing_sets.push(sets.join("|"));
        }
    }
    let from_sets = !pools.is_empty();
    for c in flag_all {
        if !pools.all.contains(c) {
            pools.all.push(*c);
        }
    }
    for c in flag_masq {
        if !pools.masq.contains(c) {
            pools.masq.push(*c);
        }
        // A masqueraded pool is a pool.
        if !pools.all.contains(c) {
            pools.all.push(*c);
        }
    }
    // A pool named on the command line is the operator's word that it holds pods.
    pools
        .lb_only
        .retain(|c| !flag_all.contains(c) && !flag_masq.contains(c));
    let sets = match pools.dataplane {
        Dataplane::Iptables => "ipset",
        Dataplane::Nftables => "nftables",
    };
    pools.source = match (from_sets, flag_all.is_empty() && flag_masq.is_empty()) {
        (true, true) => sets.to_string(),
        (true, false) => format!("{sets}+flags"),
        (false, false) => "flags".to_string(),
        (false, true) => "none".to_string(),
    };
    pools
}

/// The pools whose destinations felix's rule leaves un-masqueraded, and the LoadBalancer-only
/// ones among them, from `all-ipam-pools` (`old`) and `network-ip-pools` (`new`). The rule
/// decides which set counts; unknown, both do.
fn pool_sets(
    old: Option<Vec<Cidr>>,
    new: Option<Vec<Cidr>>,
    rule_uses_old: bool,
    rule_uses_new: bool,
) -> (Vec<Cidr>, Vec<Cidr>) {
    // v3.32.1 left LoadBalancer-only pools out of the new set only; where both sets exist
    // the difference is those pools.
    let lb_only: Vec<Cidr> = match (&old, &new) {
        (Some(o), Some(n)) if !rule_uses_new => {
            o.iter().filter(|c| !n.contains(c)).copied().collect()
        }
        _ => Vec::new(),
    };
    let used = if rule_uses_new {
        new.unwrap_or_default()
    } else if rule_uses_old {
        old.unwrap_or_default()
    } else {
        let mut all = old.unwrap_or_default();
        for c in new.unwrap_or_default() {
            if !all.contains(&c) {
                all.push(c);
            }
        }
        all
    };
    (used, lb_only)
}

/// One set's members, `None` when it is missing or unreadable (logged).
async fn read_set(set: &str, until: tokio::time::Instant) -> Option<Vec<Cidr>> {
    match ipset_members(set, until).await {
        Ok(m) => m,
        Err(e @ CalicoError::IpsetTimeout) => {
            tracing::warn!(set, error = %e, "cannot read ipset");
            None
        }
        Err(e) => {
            tracing::debug!(set, error = %e, "cannot read ipset");
            None
        }
    }
}

/// felix's natOutgoing rule from `<cmd>-save -t nat`: unlike `iptables -S`, the save tools
/// take no xtables lock, which a read-only container could not create. felix may program the
/// nft or the legacy backend: the first tool whose output has the chain wins.
async fn nat_outgoing_rule(
    cmd: &str,
    until: tokio::time::Instant,
) -> Result<NatOutgoing, CalicoError> {
    let mut why = Vec::new();
    for bin in [
        format!("{cmd}-save"),
        format!("{cmd}-nft-save"),
        format!("{cmd}-legacy-save"),
    ] {
        let run = tokio::process::Command::new(&bin)
            .args(["-t", "nat"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout_at(until, run).await {
            Err(_) => {
                return Err(CalicoError::NatChain(format!(
                    "{bin} did not answer in time; killed"
                )))
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Ok(Err(e)) => {
                why.push(format!("{bin}: {e}"));
                continue;
            }
            Ok(Ok(out)) => out,
        };
        if out.status.success() {
            match parse_nat_outgoing(&String::from_utf8_lossy(&out.stdout)) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    why.push(format!("{bin}: {e}"));
                    continue;
                }
            }
        }
        let err = String::from_utf8_lossy(&out.stderr);
        why.push(format!(
            "{bin}: {}",
            err.trim().chars().take(160).collect::<String>()
        ));
    }
    if why.is_empty() {
        why.push(format!("no {cmd} binary"));
    }
    Err(CalicoError::NatChain(why.join("; ")))
}

/// Parses the `cali-nat-outgoing` rules out of `iptables-save -t nat` (or `iptables -S`) output;
/// other chains' rules are skipped. Odd input is an error, never a guess: every MASQUERADE/SNAT
/// rule must agree on what it excludes.
pub fn parse_nat_outgoing(text: &str) -> Result<NatOutgoing, String> {
    let mut seen_chain = false;
    let mut found: Option<NatOutgoing> = None;
    let mut rules = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('#') || line.starts_with('*') || line == "COMMIT" {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            seen_chain |= decl.split_whitespace().next() == Some(NAT_OUTGOING_CHAIN);
            continue;
        }
        // Other chains' rules (kube-proxy's, thousands of them) are skipped untokenized.
        let mut head = line.split_whitespace();
        match (head.next(), head.next()) {
            (Some("-N") | Some("-P"), name) => {
                seen_chain |= name == Some(NAT_OUTGOING_CHAIN);
                continue;
            }
            (Some("-A"), Some(NAT_OUTGOING_CHAIN)) => {}
            (Some("-A"), _) => continue,
            _ => return Err(format!("unexpected line {:?}", clip(line))),
        }
        seen_chain = true;
        let words = split_words(line)?;
        let Some(rule) = parse_rule(words.get(2..).unwrap_or_default())? else {
            continue;
        };
        rules += 1;
        found = Some(NatOutgoing::merge(found, rule).map_err(|()| {
            format!(
                "its MASQUERADE/SNAT rules disagree on what they exclude ({:?})",
                clip(line)
            )
        })?);
    }
    if !seen_chain {
        return Err("no such chain in the output".into());
    }
    let mut r = found.unwrap_or_default();
    r.rules = rules;
    Ok(r)
}

/// One `-A` rule's matches: `Some` only for a MASQUERADE/SNAT rule.
fn parse_rule(words: &[String]) -> Result<Option<NatOutgoing>, String> {
    let mut r = NatOutgoing::default();
    let mut target = None;
    let mut negate = false;
    let mut it = words.iter().map(String::as_str);
    let missing = |opt: &str| format!("{opt} without a value");
    while let Some(w) = it.next() {
        match w {
            "!" => {
                negate = true;
                continue;
            }
            "-o" | "--out-interface" => {
                r.out_iface = Some(it.next().ok_or_else(|| missing(w))?.to_string());
                r.out_iface_negated = negate;
            }
            "--match-set" => {
                let set = it.next().ok_or_else(|| missing(w))?;
                let dir = it.next().ok_or_else(|| missing(w))?;
                if negate && dir.starts_with("dst") {
                    if set.ends_with("all-hosts-net") {
                        r.excludes_host_ips = true;
                    } else if set.ends_with("ipam-pools") || set.ends_with("network-ip-pools") {
                        r.pool_set = Some(set.to_string());
                    }
                }
            }
            "-j" | "--jump" => target = Some(it.next().ok_or_else(|| missing(w))?.to_string()),
            "--to-ports" => r.port_range = Some(it.next().ok_or_else(|| missing(w))?.to_string()),
            // SNAT with natOutgoingAddress: `addr:MIN-MAX` (IPv4 only; felix's IPv6 is `[addr]:`).
            "--to-source" => {
                let to = it.next().ok_or_else(|| missing(w))?;
                r.port_range = to.rsplit_once(':').and_then(|(a, p)| {
                    (!a.is_empty() && !p.is_empty() && !p.contains(']')).then(|| p.to_string())
                });
            }
            "--random-fully" => r.random_fully = true,
            _ => {}
        }
        negate = false;
    }
    r.action = target.clone();
    Ok(matches!(target.as_deref(), Some("MASQUERADE") | Some("SNAT")).then_some(r))
}

/// Splits a rule into words; double quotes group (iptables-save quotes comments, `\"` inside).
pub(crate) fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => cur.extend(chars.next()),
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err(format!("unterminated quote in {:?}", clip(line)));
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn clip(line: &str) -> String {
    line.chars().take(120).collect()
}

/// Members of one ipset, `None` when the set does not exist.
async fn ipset_members(
    set: &str,
    until: tokio::time::Instant,
) -> Result<Option<Vec<Cidr>>, CalicoError> {
    let run = tokio::process::Command::new("ipset")
        .args(["save", set])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout_at(until, run)
        .await
        .map_err(|_| CalicoError::IpsetTimeout)?
        .map_err(CalicoError::IpsetExec)?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(Some(parse_ipset_save(&String::from_utf8_lossy(
        &out.stdout,
    ))))
}

/// Parses `ipset save` output: `add <set> <cidr> [options]` lines. Unparseable members are skipped
/// with a warning rather than failing the whole set.
pub fn parse_ipset_save(text: &str) -> Vec<Cidr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            if it.next() != Some("add") {
                return None;
            }
            let _set = it.next()?;
            let member = it.next()?;
            match member.parse::<Cidr>() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(member, error = %e, "skipping ipset member");
                    None
                }
            }
        })
        .collect()
}

/// Calico's host-side veth name for a pod: "cali" + the first 11 hex digits of
/// sha1("<namespace>.<pod>") (felix's default InterfacePrefix).
pub fn veth_name(namespace: &str, pod: &str) -> String {
    veth_name_with_prefix(DEFAULT_INTERFACE_PREFIX, namespace, pod)
}

/// As libcalico-go's `VethNameForWorkload`: the prefix, then always 11 hex digits of the sha1,
/// whatever the prefix's length. `prefix` may be felix's whole comma-separated
/// `FELIX_INTERFACEPREFIX` list: the first entry names new veths.
pub fn veth_name_with_prefix(prefix: &str, namespace: &str, pod: &str) -> String {
    let first = prefix.split(',').next().unwrap_or("").trim();
    let first = if first.is_empty() {
        DEFAULT_INTERFACE_PREFIX
    } else {
        first
    };
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{first}{}", &hex[..11])
}

/// Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace.
pub fn check_iface_name(name: &str) -> Result<(), CalicoError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CalicoError::BadIfaceName(name.to_string()))
    }
}

/// The part an interface plays on the packet path (wire names in the model).
pub use tracer_model::Role;

/// How the agent decides which interfaces to observe.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// felix's InterfacePrefix list (default "cali").
    pub workload_prefixes: Vec<String>,
    /// Host NICs named by the operator; when empty the agent picks them itself.
    pub host_ifaces: Vec<String>,
}

impl Default for RoleConfig {
    fn default() -> Self {
        RoleConfig {
            workload_prefixes: vec![DEFAULT_INTERFACE_PREFIX.into()],
            host_ifaces: Vec::new(),
        }
    }
}

impl RoleConfig {
    /// The role of `link`, or None when the agent should leave it alone.
    pub fn role_of(&self, link: &Link, facts: &NodeFacts) -> Option<Role> {
        if link.name == "lo" || link.name.is_empty() {
            return None;
        }
        if TUNNEL_IFACES.contains(&link.name.as_str()) {
            return Some(Role::Tunnel);
        }
        if self
            .workload_prefixes
            .iter()
            .any(|p| !p.is_empty() && link.name.starts_with(p.as_str()))
        {
            return Some(Role::Workload);
        }
        if !self.host_ifaces.is_empty() {
            return self
                .host_ifaces
                .iter()
                .any(|h| h == &link.name)
                .then_some(Role::Host);
        }
        // Default: anything carrying the default route, a global address, or the VXLAN device's
        // underlay. Enslaved ports (a bridge's veths) are seen through their bridge instead.
        let carries_default = facts.default_route_ifaces().contains(&link.index);
        let has_global = link
            .addrs
            .iter()
            .any(|a| !a.ip.is_loopback() && !is_link_local(a.ip));
        let is_vxlan_parent = facts
            .links
            .values()
            .filter_map(|l| l.vxlan.as_ref())
            .any(|v| v.parent_index == Some(link.index));
        (link.master.is_none() && (carries_default || has_global || is_vxlan_parent))
            .then_some(Role::Host)
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_name_matches_calico() {
        // Expected values from `printf '<ns>.<pod>' | sha1sum`.
        assert_eq!(veth_name("default", "nginx"), "calic440f455693");
        assert_eq!(
            veth_name("kube-system", "calico-kube-controllers-596576f79-j2pkg"),
            "calid92900560e3"
        );
        // Any prefix length keeps 11 hex digits, as libcalico-go does.
        assert_eq!(
            veth_name_with_prefix("lxc", "default", "nginx"),
            "lxcc440f455693"
        );
        // libcalico-go's own test: FELIX_INTERFACEPREFIX="eni,veth,foo" names
        // namespace/podname "eni82111e10a96" (the first prefix of the list).
        assert_eq!(
            veth_name_with_prefix("eni,veth,foo", "namespace", "podname"),
            "eni82111e10a96"
        );
        assert_eq!(
            veth_name_with_prefix("", "namespace", "podname"),
            "cali82111e10a96"
        );
        assert_eq!(
            veth_name_with_prefix("azv", "namespace", "podname").len(),
            14
        );
    }

    #[test]
    fn interface_names_are_checked() {
        for good in [
            "eth0",
            "cali1234567890a",
            "vxlan.calico",
            "wg-v6.cali",
            "enp0s31f6",
        ] {
            assert!(check_iface_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a/b",
            "eth0:1",
            "with space",
            "sixteen-chars-xx",
            ".",
            "..",
            "tab\t",
        ] {
            assert!(check_iface_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ipset_save_parsing() {
        let text =
            "create cali40all-ipam-pools hash:net family inet hashsize 1024 maxelem 1048576\n\
                    add cali40all-ipam-pools 192.168.0.0/16\n\
                    add cali40all-ipam-pools 10.0.0.1\n\
                    add cali40all-ipam-pools garbage\n";
        let got = parse_ipset_save(text);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].to_string(), "192.168.0.0/16");
        assert_eq!(got[1].to_string(), "10.0.0.1/32");
        assert!(parse_ipset_save("").is_empty());
    }

    /// `iptables -S cali-nat-outgoing` as felix's rules print (felix/rules/nat.go: masq set src,
    /// not pool set dst, [not all-hosts-net dst], [-p], [-o]).
    #[test]
    fn nat_outgoing_rule_parsing() {
        let plain = "-N cali-nat-outgoing\n\
            -A cali-nat-outgoing -m comment --comment \"cali:flqWnvo8yq4ULQLa\" -m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j MASQUERADE --random-fully\n";
        let r = parse_nat_outgoing(plain).unwrap_or_default();
        assert_eq!(r.rules, 1);
        assert_eq!(r.pool_set.as_deref(), Some("cali40all-ipam-pools"));
        assert!(!r.excludes_host_ips && r.out_iface.is_none());
        assert!(r.matches_iface("eth1"));

        let both = "-N cali-nat-outgoing\n\
            -A cali-nat-outgoing -o eth+ -m comment --comment \"cali:x \\\"q\\\"\" -m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40network-ip-pools dst -m set ! --match-set cali40all-hosts-net dst -j MASQUERADE --random-fully\n";
        let r = parse_nat_outgoing(both).unwrap_or_default();
        assert_eq!(r.pool_set.as_deref(), Some("cali40network-ip-pools"));
        assert!(r.excludes_host_ips);
        assert_eq!(r.out_iface.as_deref(), Some("eth+"));
        assert!(r.matches_iface("eth0") && r.matches_iface("eth") && !r.matches_iface("bond0"));

        // NATPortRange: tcp/udp SNAT + RETURN pairs, then the catch-all; natOutgoingAddress: SNAT.
        let ports = "-N cali-nat-outgoing\n\
            -A cali-nat-outgoing -o eth0 -p tcp -m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j SNAT --to-source 10.0.0.1:1000-2000\n\
            -A cali-nat-outgoing -o eth0 -p tcp -m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j RETURN\n\
            -A cali-nat-outgoing -o eth0 -m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j SNAT --to-source 10.0.0.1\n";
        let r = parse_nat_outgoing(ports).unwrap_or_default();
        assert_eq!(r.rules, 2);
        assert!(r.matches_iface("eth0") && !r.matches_iface("eth1"));

        // iptables-save -t nat of a whole table: other chains are skipped.
        let save = "# Generated by iptables-save v1.8.9 (nf_tables)\n*nat\n\
            :POSTROUTING ACCEPT [0:0]\n:cali-nat-outgoing - [0:0]\n\
            -A POSTROUTING -m comment --comment \"cali:O3lYWMrLQYEMJtB5\" -j cali-POSTROUTING\n\
            -A KUBE-SVC -p tcp -m comment --comment \"odd \\\"quote -j MASQUERADE\n\
            -A cali-nat-outgoing -o eth1 -m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j MASQUERADE --random-fully\n\
            COMMIT\n# Completed\n";
        let r = parse_nat_outgoing(save).unwrap_or_default();
        assert_eq!((r.rules, r.out_iface.as_deref()), (1, Some("eth1")));
        assert!(parse_nat_outgoing("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n").is_err());

        // Empty chain: no pool has natOutgoing.
        let empty = parse_nat_outgoing("-N cali-nat-outgoing\n").unwrap_or_default();
        assert_eq!(empty, NatOutgoing::default());

        let negated = "-A cali-nat-outgoing ! -o eth1 -m set --match-set cali40masq-ipam-pools src -j MASQUERADE\n";
        let r = parse_nat_outgoing(negated).unwrap_or_default();
        assert!(r.out_iface_negated && !r.matches_iface("eth1") && r.matches_iface("eth0"));
    }

    /// FelixConfiguration natPortRange: felix's five rules (TCP and UDP with the ports, each
    /// followed by a RETURN, then the plain rule) agree on what they exclude.
    #[test]
    fn nat_port_range_is_read() {
        let m = "-m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst";
        let text = format!(
            "-N cali-nat-outgoing\n\
             -A cali-nat-outgoing {m} -p tcp -j MASQUERADE --to-ports 40000-40001 --random-fully\n\
             -A cali-nat-outgoing {m} -p tcp -j RETURN\n\
             -A cali-nat-outgoing {m} -p udp -j MASQUERADE --to-ports 40000-40001 --random-fully\n\
             -A cali-nat-outgoing {m} -p udp -j RETURN\n\
             -A cali-nat-outgoing {m} -j MASQUERADE --random-fully\n"
        );
        let r = parse_nat_outgoing(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.rules, 3);
        assert_eq!(r.port_range.as_deref(), Some("40000-40001"));
        assert!(r.random_fully);
        assert_eq!(r.action.as_deref(), Some("MASQUERADE"));
        assert_eq!(r.pool_set.as_deref(), Some("cali40all-ipam-pools"));
        // natOutgoingAddress: SNAT to the address and the ports; no --random-fully on one rule.
        let snat = format!(
            "-A cali-nat-outgoing {m} -p tcp -j SNAT --to-source 10.0.0.5:40000-40001\n\
             -A cali-nat-outgoing {m} -j SNAT --to-source 10.0.0.5 --random-fully\n"
        );
        let r = parse_nat_outgoing(&snat).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (r.action.as_deref(), r.port_range.as_deref()),
            (Some("SNAT"), Some("40000-40001"))
        );
        assert!(!r.random_fully);
    }

    #[test]
    fn odd_nat_outgoing_output_is_an_error() {
        for bad in [
            "",
            "iptables: No chain/target/match by that name.",
            "-A cali-nat-outgoing -m comment --comment \"unterminated -j MASQUERADE",
            "-A cali-nat-outgoing -o",
            "-A cali-nat-outgoing -j",
            "-A cali-nat-outgoing -m set --match-set onlyname",
            "-A cali-nat-outgoing -o eth0 -j MASQUERADE\n-A cali-nat-outgoing -o eth1 -j MASQUERADE",
            "\u{0}\u{1}garbage",
            "-N other-chain\n-A other-chain -j MASQUERADE",
        ] {
            assert!(parse_nat_outgoing(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lb_only_pools_from_both_sets() {
        let c = |s: &str| s.parse::<Cidr>().ok();
        let old: Vec<Cidr> = ["10.244.0.0/16", "10.10.10.0/24"]
            .iter()
            .filter_map(|s| c(s))
            .collect();
        let new: Vec<Cidr> = ["10.244.0.0/16"].iter().filter_map(|s| c(s)).collect();
        // v3.32.0's rule (all-ipam-pools) with network-ip-pools also present.
        let (used, lb) = pool_sets(Some(old.clone()), Some(new.clone()), true, false);
        assert_eq!(used, old);
        assert_eq!(lb, vec![old[1]]);
        // v3.32.1's rule: the LoadBalancer pool is masqueraded, a stale old set is ignored.
        let (used, lb) = pool_sets(Some(old.clone()), Some(new.clone()), false, true);
        assert_eq!(used, new);
        assert!(lb.is_empty());
        // Rule unknown: the union, and the difference where both exist.
        let (used, lb) = pool_sets(Some(old.clone()), Some(new.clone()), false, false);
        assert_eq!(used, old);
        assert_eq!(lb, vec![old[1]]);
        // Only one set: nothing can be told about LoadBalancer-only pools.
        let (used, lb) = pool_sets(Some(old.clone()), None, true, false);
        assert_eq!(used, old);
        assert!(lb.is_empty());
    }
}
