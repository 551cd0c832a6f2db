//! felix's policy chains in the filter table, in the iptables dataplane and in the nftables one
//! (`table ip calico`, chains `filter-<name>`), and the policy objects as Calico's etcdv3
//! datastore holds them. One model of felix's rules (`felix/rules/`, which both dataplanes
//! share) rendered two ways: iptables-restore lines, or knftables' nft rules (`counter` on each
//! rule, `comment "cali:<hash>; <comment>"`, the dispatch as verdict maps, names limited to 256
//! characters instead of 28: `felix/nftables/renderer.go`, `match_builder.go`, `actions.go`,
//! `table_layer.go`; checked against felix/fv/cali-nftables-dump.txt, whose dispatch and
//! FORWARD hashes these reproduce).
//!
//! Rendered as felix renders them with its default settings (flow logs off, mark bits from
//! 0x10000: accept 0x10000, pass 0x20000, drop 0x40000, `felix/dataplane/driver.go`): policy
//! chains `cali-pi-`/`cali-po-` + felix's policy id cut to 28 characters
//! (`felix/rules/policy.go` `PolicyChainName`, `libcalico-go/lib/hash/unique_id.go`), each rule a
//! mark rule and an action rule (`CombineMatchAndActionsForProtoRule`, trailing RETURN stripped),
//! the first carrying the chain comment `<Kind> <ns>/<name> ingress`; per-endpoint chains
//! `cali-tw-<veth>`/`cali-fw-<veth>` with conntrack, the encapsulation drops (from workloads),
//! tiers ("Start of tier", jumps, "Return if policy accepted", "End of tier <t>. DROP if no
//! policies passed packet") and profiles (`felix/rules/endpoints.go` `endpointIptablesChain`);
//! the dispatch chains and the jump from FORWARD (`felix/rules/static.go`, `dispatch.go`).
//! Left out: the rest of felix's filter table (host endpoints, failsafes, cali-INPUT/OUTPUT,
//! the cidr-block chain), which changes nothing for pod-to-pod packets here.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::{
    calico::{felix_nft_rule_hashes, restore_felix_table, Dataplane, FelixRule, NFT_TABLE},
    netns::Netns,
    LabError,
};

const MARK_ACCEPT: u32 = 0x10000;
const MARK_PASS: u32 = 0x20000;
const MARK_DROP: u32 = 0x40000;
/// `felix/iptables/table.go` `MaxChainNameLength`.
const MAX_CHAIN: usize = 28;
/// `felix/nftables/table.go` `MaxChainNameLength` = knftables' `NameLengthMax`: in nftables
/// mode felix's names are practically never hashed.
const MAX_NFT_NAME: usize = 256;

/// `libcalico-go/lib/hash/unique_id.go` `GetLengthLimitedID`.
pub fn length_limited_id(prefix: &str, suffix: &str, max: usize) -> String {
    let suffix = if suffix.is_empty() { "_" } else { suffix };
    let total = prefix.len() + suffix.len();
    if total > max || (total == max && suffix.starts_with('_')) {
        let hash = crate::http::base64(
            &Sha256::digest(suffix.as_bytes()),
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
            false,
        );
        let left = max.saturating_sub(1 + prefix.len()).min(hash.len());
        return format!("{prefix}_{}", &hash[..left]);
    }
    format!("{prefix}{suffix}")
}

/// Which Calico resource a policy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// projectcalico.org/v3 NetworkPolicy (a Kubernetes NetworkPolicy too, in etcd mode:
    /// kube-controllers stores it as `knp.default.<name>`,
    /// `kube-controllers/pkg/converter/networkpolicy_converter.go`).
    NetworkPolicy,
    GlobalNetworkPolicy,
    /// A Kubernetes NetworkPolicy as felix gets it from the Kubernetes datastore (v3.32+:
    /// kind `KubernetesNetworkPolicy`, the Kubernetes name, `felix/types/policy_id.go`).
    KubernetesNetworkPolicy,
}

/// Ingress or egress, from the pod's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

/// One policy rule: TCP, an optional source/destination net and destination port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub deny: bool,
    pub src_net: Option<String>,
    pub dst_net: Option<String>,
    pub dst_port: Option<u16>,
}

impl PolicyRule {
    pub fn allow() -> PolicyRule {
        PolicyRule {
            deny: false,
            src_net: None,
            dst_net: None,
            dst_port: None,
        }
    }

    pub fn deny() -> PolicyRule {
        PolicyRule {
            deny: true,
            ..PolicyRule::allow()
        }
    }

    pub fn from(mut self, net: &str) -> PolicyRule {
        self.src_net = Some(net.into());
        self
    }

    pub fn to(mut self, net: &str) -> PolicyRule {
        self.dst_net = Some(net.into());
        self
    }

    pub fn port(mut self, port: u16) -> PolicyRule {
        self.dst_port = Some(port);
        self
    }

    /// The rule in projectcalico.org/v3 JSON.
    pub fn v3(&self) -> serde_json::Value {
        let mut src = serde_json::Map::new();
        let mut dst = serde_json::Map::new();
        if let Some(n) = &self.src_net {
            src.insert("nets".into(), serde_json::json!([n]));
        }
        if let Some(n) = &self.dst_net {
            dst.insert("nets".into(), serde_json::json!([n]));
        }
        if let Some(p) = self.dst_port {
            dst.insert("ports".into(), serde_json::json!([p]));
        }
        serde_json::json!({
            "action": if self.deny { "Deny" } else { "Allow" },
            "protocol": "TCP",
            "source": src,
            "destination": dst,
        })
    }

    /// `CalculateRuleMatch`'s order: protocol, source net, destination net, destination ports.
    fn matches(&self) -> Vec<Match> {
        let mut m = vec![Match::Proto("tcp", 6)];
        if let Some(n) = &self.src_net {
            m.push(Match::SrcNet(n.clone()));
        }
        if let Some(n) = &self.dst_net {
            m.push(Match::DstNet(n.clone()));
        }
        if let Some(p) = self.dst_port {
            m.push(Match::DstPort(p));
        }
        m
    }
}

/// A Calico policy with its rules in one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabPolicy {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
    pub tier: String,
    pub direction: Direction,
    pub rules: Vec<PolicyRule>,
}

impl LabPolicy {
    /// felix's `PolicyID.ID()` (`felix/types/policy_id.go`).
    fn id(&self) -> String {
        let short = match self.kind {
            Kind::NetworkPolicy => "np",
            Kind::GlobalNetworkPolicy => "gnp",
            Kind::KubernetesNetworkPolicy => "knp",
        };
        match &self.namespace {
            Some(ns) => format!("{short}/{ns}/{}", self.name),
            None => format!("{short}/{}", self.name),
        }
    }

    /// felix's chain for this policy in its direction (iptables dataplane).
    pub fn chain(&self) -> String {
        self.chain_for(Dataplane::Iptables)
    }

    /// felix's chain for this policy in `dp` (`PolicyChainName`; in nftables mode without
    /// the table layer's `filter-` prefix).
    pub fn chain_for(&self, dp: Dataplane) -> String {
        let prefix = match self.direction {
            Direction::Ingress => "cali-pi-",
            Direction::Egress => "cali-po-",
        };
        length_limited_id(prefix, &self.id(), max_chain(dp))
    }

    /// The etcdv3 key and JSON value (`libcalico-go/lib/backend/model/resource.go`). A
    /// Kubernetes NetworkPolicy is not stored in etcd by that kind: use a NetworkPolicy named
    /// `knp.default.<name>` for it.
    pub fn etcd_kv(&self) -> (String, String) {
        let (plural, kind) = match self.kind {
            Kind::NetworkPolicy | Kind::KubernetesNetworkPolicy => {
                ("networkpolicies", "NetworkPolicy")
            }
            Kind::GlobalNetworkPolicy => ("globalnetworkpolicies", "GlobalNetworkPolicy"),
        };
        let key = match &self.namespace {
            Some(ns) => format!(
                "/calico/resources/v3/projectcalico.org/{plural}/{ns}/{}",
                self.name
            ),
            None => format!(
                "/calico/resources/v3/projectcalico.org/{plural}/{}",
                self.name
            ),
        };
        let rules: Vec<_> = self.rules.iter().map(PolicyRule::v3).collect();
        let (ingress, egress, types) = match self.direction {
            Direction::Ingress => (rules, vec![], "Ingress"),
            Direction::Egress => (vec![], rules, "Egress"),
        };
        let mut metadata = serde_json::json!({"name": self.name});
        if let Some(ns) = &self.namespace {
            metadata["namespace"] = ns.clone().into();
        }
        let value = serde_json::json!({
            "kind": kind,
            "apiVersion": "projectcalico.org/v3",
            "metadata": metadata,
            "spec": {
                "tier": self.tier,
                "order": 100,
                "ingress": ingress,
                "egress": egress,
                "types": [types],
            },
        });
        (key, value.to_string())
    }

    /// The policy chain (`PolicyToIptablesChains` + `ProtoRulesToIptablesRules`, shared by both
    /// dataplanes).
    fn rendered(&self) -> Vec<Rule> {
        let mut out = Vec::new();
        for r in &self.rules {
            let mark = if r.deny { MARK_DROP } else { MARK_ACCEPT };
            out.push(Rule::new(r.matches(), Act::SetMark(mark)));
            let action = if r.deny { Act::Drop } else { Act::Return };
            out.push(Rule::new(vec![Match::MarkSet(mark)], action));
        }
        // Trailing RETURNs are no-ops: felix strips them.
        while out.last().is_some_and(|r| r.act == Act::Return) {
            out.pop();
        }
        let dir = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let kind = match self.kind {
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            Kind::KubernetesNetworkPolicy => "KubernetesNetworkPolicy",
        };
        let comment = match &self.namespace {
            Some(ns) => format!("{kind} {ns}/{} {dir}", self.name),
            None => format!("{kind} {} {dir}", self.name),
        };
        if let Some(first) = out.first_mut() {
            first.comment = Some(comment);
        }
        out
    }
}

/// A workload endpoint and the policies that select it, in tier order.
#[derive(Debug, Clone)]
pub struct LabEndpoint {
    pub veth: String,
    pub namespace: String,
    pub policies: Vec<LabPolicy>,
}

/// What a felix rule does, rendered in either dataplane's spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Act {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// `SetMaskedMark(m, m)`: sets the bits of `m`.
    SetMark(u32),
    /// `ClearMark(m)`.
    ClearMark(u32),
}

/// One match felix renders (`felix/iptables/match_builder.go`, `felix/nftables/match_builder.go`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Match {
    /// `ConntrackState`: iptables' upper-case state list.
    Ct(&'static str),
    /// `MarkClear(m)`.
    MarkClear(u32),
    /// `MarkSingleBitSet(m)`.
    MarkSet(u32),
    Proto(&'static str, u8),
    SrcNet(String),
    DstNet(String),
    DstPort(u16),
    InIface(String),
    OutIface(String),
}

/// A felix rule of the shared model (`felix/rules/`, used by both renderers).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    comment: Option<String>,
    matches: Vec<Match>,
    act: Act,
}

impl Rule {
    fn new(matches: Vec<Match>, act: Act) -> Rule {
        Rule {
            comment: None,
            matches,
            act,
        }
    }

    fn note(mut self, text: &str) -> Rule {
        self.comment = Some(text.into());
        self
    }

    /// felix/iptables's rendering (without the hash comment, which `render_chain` adds).
    fn iptables(&self) -> FelixRule {
        let mut m: Vec<String> = Vec::new();
        if let Some(c) = &self.comment {
            m.push(format!("-m comment --comment \"{c}\""));
        }
        for x in &self.matches {
            m.push(match x {
                Match::Ct(s) => format!("-m conntrack --ctstate {s}"),
                Match::MarkClear(k) => format!("-m mark --mark 0/{k:#x}"),
                Match::MarkSet(k) => format!("-m mark --mark {k:#x}/{k:#x}"),
                Match::Proto(name, num) => {
                    if *name == "tcp" {
                        "-p tcp".into()
                    } else {
                        format!("-p {num}")
                    }
                }
                Match::SrcNet(n) => format!("--source {n}"),
                Match::DstNet(n) => format!("--destination {n}"),
                Match::DstPort(p) => format!("-m multiport --destination-ports {p}"),
                Match::InIface(i) => format!("--in-interface {i}"),
                Match::OutIface(i) => format!("--out-interface {i}"),
            });
        }
        let action = match &self.act {
            Act::Accept => "--jump ACCEPT".into(),
            Act::Drop => "--jump DROP".into(),
            Act::Return => "--jump RETURN".into(),
            Act::Jump(c) => format!("--jump {c}"),
            Act::Goto(c) => format!("--goto {c}"),
            Act::SetMark(k) => format!("--jump MARK --set-mark {k:#x}/{k:#x}"),
            Act::ClearMark(k) => format!("--jump MARK --set-mark 0/{k:#x}"),
        };
        FelixRule::new(&m.join(" "), &action)
    }

    /// felix/nftables's rendering (`nftRenderer.renderRule`): match clauses, `counter` on
    /// every rule with an action, the action; chains carry the table layer's `filter-` prefix.
    fn nft(&self) -> String {
        let mut m: Vec<String> = Vec::new();
        let mut proto = "tcp";
        for x in &self.matches {
            m.push(match x {
                Match::Ct(s) => format!("ct state {}", s.to_ascii_lowercase()),
                Match::MarkClear(k) => format!("meta mark & {k:#x} == 0"),
                Match::MarkSet(k) => format!("meta mark & {k:#x} == {k:#x}"),
                Match::Proto(name, num) => {
                    proto = name;
                    if name.is_empty() {
                        format!("meta l4proto {num}")
                    } else {
                        format!("meta l4proto {name}")
                    }
                }
                Match::SrcNet(n) => format!("ip saddr {n}"),
                Match::DstNet(n) => format!("ip daddr {n}"),
                Match::DstPort(p) => format!("{proto} dport {p}"),
                // nft's wildcard is `*` where iptables' is `+`.
                Match::InIface(i) => format!("iifname \"{}\"", i.replace('+', "*")),
                Match::OutIface(i) => format!("oifname \"{}\"", i.replace('+', "*")),
            });
        }
        m.push("counter".into());
        m.push(match &self.act {
            Act::Accept => "accept".into(),
            Act::Drop => "drop".into(),
            Act::Return => "return".into(),
            Act::Jump(c) => format!("jump {NFT_FILTER}{c}"),
            Act::Goto(c) => format!("goto {NFT_FILTER}{c}"),
            Act::SetMark(k) => format!("meta mark set mark & {:#x} ^ {k:#x}", !k),
            Act::ClearMark(k) => format!("meta mark set mark & {:#x}", !k),
        });
        m.join(" ")
    }
}

/// felix's nft table layer prefixes the filter table's chains and maps (`table_layer.go`).
pub const NFT_FILTER: &str = "filter-";

/// `endpointIptablesChain` for one direction of `ep` (shared by both renderers).
fn endpoint_chain(ep: &LabEndpoint, dir: Direction, dp: Dataplane) -> Vec<Rule> {
    let mut r = vec![
        Rule::new(vec![Match::Ct("RELATED,ESTABLISHED")], Act::Accept),
        Rule::new(vec![Match::Ct("INVALID")], Act::Drop),
        Rule::new(vec![], Act::ClearMark(MARK_ACCEPT | MARK_PASS)),
    ];
    if dir == Direction::Egress {
        r.push(
            Rule::new(
                vec![Match::Proto("udp", 17), Match::DstPort(4789)],
                Act::Drop,
            )
            .note("DROP VXLAN encapped packets originating in workloads"),
        );
        r.push(
            Rule::new(vec![Match::Proto("", 4)], Act::Drop)
                .note("DROP IPinIP encapped packets originating in workloads"),
        );
    }
    let mut tiers: Vec<&str> = Vec::new();
    for p in ep.policies.iter().filter(|p| p.direction == dir) {
        if !tiers.contains(&p.tier.as_str()) {
            tiers.push(&p.tier);
        }
    }
    for tier in tiers {
        r.push(Rule::new(vec![], Act::ClearMark(MARK_PASS)).note(&format!("Start of tier {tier}")));
        for p in ep
            .policies
            .iter()
            .filter(|p| p.direction == dir && p.tier == tier)
        {
            r.push(Rule::new(
                vec![Match::MarkClear(MARK_PASS)],
                Act::Jump(p.chain_for(dp)),
            ));
            r.push(
                Rule::new(vec![Match::MarkSet(MARK_ACCEPT)], Act::Return)
                    .note("Return if policy accepted"),
            );
        }
        r.push(
            Rule::new(vec![Match::MarkClear(MARK_PASS)], Act::Drop).note(&format!(
                "End of tier {tier}. DROP if no policies passed packet"
            )),
        );
    }
    r.push(Rule::new(
        vec![],
        Act::Jump(profile_chain(&ep.namespace, dir, dp)),
    ));
    r.push(
        Rule::new(vec![Match::MarkSet(MARK_ACCEPT)], Act::Return)
            .note("Return if profile accepted"),
    );
    r.push(Rule::new(vec![], Act::Drop).note("DROP if no profiles matched"));
    r
}

fn max_chain(dp: Dataplane) -> usize {
    match dp {
        Dataplane::Iptables => MAX_CHAIN,
        Dataplane::Nftables => MAX_NFT_NAME,
    }
}

/// The namespace's profile `kns.<ns>` (allow all): `ProfileChainName`.
fn profile_chain(namespace: &str, dir: Direction, dp: Dataplane) -> String {
    let prefix = match dir {
        Direction::Ingress => "cali-pri-",
        Direction::Egress => "cali-pro-",
    };
    length_limited_id(prefix, &format!("kns.{namespace}"), max_chain(dp))
}

/// felix's filter chains for `endpoints` (the shared model), with the dispatch entries
/// (interface, `cali-fw-`/`cali-tw-` chain) for each direction.
struct FilterModel {
    chains: Vec<(String, Vec<Rule>)>,
    from: Vec<(String, String)>,
    to: Vec<(String, String)>,
}

fn filter_model(endpoints: &[LabEndpoint], dp: Dataplane) -> FilterModel {
    let mut chains: Vec<(String, Vec<Rule>)> = Vec::new();
    let mut from = Vec::new();
    let mut to = Vec::new();
    for ep in endpoints {
        // `EndpointChainName` with the dataplane's length limit.
        let fw = length_limited_id("cali-fw-", &ep.veth, max_chain(dp));
        let tw = length_limited_id("cali-tw-", &ep.veth, max_chain(dp));
        from.push((ep.veth.clone(), fw.clone()));
        to.push((ep.veth.clone(), tw.clone()));
        chains.push((fw, endpoint_chain(ep, Direction::Egress, dp)));
        chains.push((tw, endpoint_chain(ep, Direction::Ingress, dp)));
        for dir in [Direction::Ingress, Direction::Egress] {
            let name = profile_chain(&ep.namespace, dir, dp);
            if !chains.iter().any(|(c, _)| *c == name) {
                let d = if dir == Direction::Ingress {
                    "ingress"
                } else {
                    "egress"
                };
                chains.push((
                    name,
                    vec![Rule::new(vec![], Act::SetMark(MARK_ACCEPT))
                        .note(&format!("Profile kns.{} {d}", ep.namespace))],
                ));
            }
        }
        for p in &ep.policies {
            if !chains.iter().any(|(c, _)| *c == p.chain_for(dp)) {
                chains.push((p.chain_for(dp), p.rendered()));
            }
        }
    }
    FilterModel { chains, from, to }
}

/// The rules of `cali-FORWARD` (`StaticFilterForwardChains`, without host endpoints).
fn forward_chain() -> Vec<Rule> {
    vec![
        Rule::new(vec![], Act::ClearMark(0xe0000)),
        Rule::new(
            vec![Match::InIface("cali+".into())],
            Act::Jump("cali-from-wl-dispatch".into()),
        ),
        Rule::new(
            vec![Match::OutIface("cali+".into())],
            Act::Jump("cali-to-wl-dispatch".into()),
        ),
    ]
}

/// Writes felix's filter chains for `endpoints` into `node` in `dp`'s dataplane
/// ([`write_felix_filter`] or [`write_felix_nft_filter`]).
pub fn write_felix_policy(
    node: &Netns,
    dp: Dataplane,
    endpoints: &[LabEndpoint],
) -> Result<(), LabError> {
    match dp {
        Dataplane::Iptables => write_felix_filter(node, endpoints),
        Dataplane::Nftables => write_felix_nft_filter(node, endpoints),
    }
}

/// Writes felix's filter chains for `endpoints` into `node` (iptables-restore --noflush: the
/// chains felix owns are rewritten; the FORWARD jump is added once). Calling it again replaces
/// them, as a felix resync after a policy change does (counters start again at 0).
pub fn write_felix_filter(node: &Netns, endpoints: &[LabEndpoint]) -> Result<(), LabError> {
    let FilterModel {
        chains: model,
        from,
        to,
    } = filter_model(endpoints, Dataplane::Iptables);
    let mut chains: Vec<(String, Vec<FelixRule>)> = model
        .iter()
        .map(|(c, rules)| (c.clone(), rules.iter().map(Rule::iptables).collect()))
        .collect();
    for (name, list, iface) in [
        (
            "cali-from-wl-dispatch",
            from,
            Match::InIface as fn(String) -> Match,
        ),
        ("cali-to-wl-dispatch", to, Match::OutIface),
    ] {
        let mut rules: Vec<FelixRule> = list
            .into_iter()
            .map(|(veth, chain)| Rule::new(vec![iface(veth)], Act::Goto(chain)).iptables())
            .collect();
        rules.push(
            Rule::new(vec![], Act::Drop)
                .note("Unknown interface")
                .iptables(),
        );
        chains.push((name.into(), rules));
    }
    let mut forward: Vec<FelixRule> = forward_chain().iter().map(Rule::iptables).collect();
    forward.push(
        Rule::new(vec![Match::MarkSet(MARK_ACCEPT)], Act::Accept)
            .note("Policy explicitly accepted packet.")
            .iptables(),
    );
    chains.push(("cali-FORWARD".into(), forward));
    let jump = (
        "FORWARD".to_string(),
        FelixRule::new("", "--jump cali-FORWARD"),
    );
    restore_felix_table(node, "filter", &chains, &[jump])
}

/// An nft rule body and its comment (without felix's hash).
type NftRule = (String, Option<String>);

/// felix's filter part of `table ip calico` in nftables mode, as an `nft -f` script that
/// leaves the rest of the table (the nat chains and sets) alone: each chain declared and
/// flushed, then its rules appended with `comment "cali:<hash>; <comment>"`; the dispatch as
/// felix's verdict maps (`iifname vmap @filter-cali-from-wl-dispatch`, elements `goto
/// filter-cali-fw-<iface>`); the base chain `filter-FORWARD` as in
/// felix/fv/cali-nftables-dump.txt (hashes taken from it).
pub fn nft_filter_script(endpoints: &[LabEndpoint]) -> String {
    let FilterModel { chains, from, to } = filter_model(endpoints, Dataplane::Nftables);
    let t = format!("ip {NFT_TABLE}");
    let mut s = format!("add table {t}\n");
    let mut elements = Vec::new();
    let mut rules_of: Vec<(String, Vec<NftRule>)> = chains
        .iter()
        .map(|(c, rules)| {
            (
                format!("{NFT_FILTER}{c}"),
                rules.iter().map(|r| (r.nft(), r.comment.clone())).collect(),
            )
        })
        .collect();
    for (map, list, dir) in [
        ("cali-from-wl-dispatch", &from, "iifname"),
        ("cali-to-wl-dispatch", &to, "oifname"),
    ] {
        let name = format!("{NFT_FILTER}{map}");
        let _ = writeln!(
            s,
            "add map {t} {name} {{ type ifname : verdict; }}\nflush map {t} {name}"
        );
        if !list.is_empty() {
            let elems: Vec<String> = list
                .iter()
                .map(|(veth, chain)| format!("\"{veth}\" : goto {NFT_FILTER}{chain}"))
                .collect();
            // After the chains: an element's goto needs its chain.
            elements.push(format!("add element {t} {name} {{ {} }}", elems.join(", ")));
        }
        rules_of.push((
            name.clone(),
            vec![
                // A vmap rule has no action of its own: no counter.
                (format!("{dir} vmap @{name}"), None),
                (
                    Rule::new(vec![], Act::Drop).nft(),
                    Some("Unknown interface".into()),
                ),
            ],
        ));
    }
    rules_of.push((
        format!("{NFT_FILTER}cali-FORWARD"),
        forward_chain()
            .iter()
            .map(|r| (r.nft(), r.comment.clone()))
            .collect(),
    ));
    // All chains first: a jump needs its target.
    for (chain, _) in &rules_of {
        let _ = writeln!(s, "add chain {t} {chain}\nflush chain {t} {chain}");
    }
    for (chain, rules) in &rules_of {
        let bodies: Vec<&str> = rules.iter().map(|(b, _)| b.as_str()).collect();
        for ((body, note), hash) in rules.iter().zip(felix_nft_rule_hashes(chain, &bodies)) {
            let comment = match note {
                Some(n) => format!("cali:{hash}; {n}"),
                None => format!("cali:{hash};"),
            };
            let _ = writeln!(s, "add rule {t} {chain} {body} comment \"{comment}\"");
        }
    }
    for e in elements {
        let _ = writeln!(s, "{e}");
    }
    // The base chain, as felix's dump has it.
    let fwd = format!("{NFT_FILTER}FORWARD");
    let _ = writeln!(
        s,
        "add chain {t} {fwd} {{ type filter hook forward priority filter; policy accept; }}\n\
         flush chain {t} {fwd}\n\
         add rule {t} {fwd} counter jump {NFT_FILTER}cali-FORWARD comment \"cali:dpfqBgJrpRwlrqw1;\"\n\
         add rule {t} {fwd} meta mark & {MARK_ACCEPT:#x} == {MARK_ACCEPT:#x} counter accept \
         comment \"cali:yp7iNUYNEhDmKF6E; Policy explicitly accepted packet.\"\n\
         add rule {t} {fwd} counter meta mark set mark or {MARK_ACCEPT:#x} comment \"cali:fXaqbwKfGHq5dvHP;\""
    );
    s
}

/// Writes [`nft_filter_script`] into `node` (`nft -f -`, one transaction). Calling it again
/// replaces the chains, as a felix resync does (counters start again at 0).
pub fn write_felix_nft_filter(node: &Netns, endpoints: &[LabEndpoint]) -> Result<(), LabError> {
    let script = nft_filter_script(endpoints);
    tracing::debug!(netns = node.name(), %script, "lab: felix nft filter");
    node.exec_with_stdin(&["nft", "-f", "-"], &script)?;
    Ok(())
}

/// Packets felix's DROP rules of `chain` (felix's name, without the nft prefix) counted in
/// `node`, read with the dataplane's own tool: the drop seen without tracer.
pub fn drop_packets(node: &Netns, dp: Dataplane, chain: &str) -> Result<u64, LabError> {
    match dp {
        Dataplane::Iptables => Ok(crate::iptables::counters(node, "filter", chain)?
            .iter()
            .filter(|r| r.target == "DROP")
            .map(|r| r.packets)
            .sum()),
        Dataplane::Nftables => Ok(crate::calico::nft_counted_packets(
            &crate::calico::nft_list_chain(node, &format!("{NFT_FILTER}{chain}"))?,
            |x| x.get("drop").is_some(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_follow_felix() {
        let p = LabPolicy {
            kind: Kind::GlobalNetworkPolicy,
            namespace: None,
            name: "a".into(),
            tier: "default".into(),
            direction: Direction::Egress,
            rules: vec![PolicyRule::deny()],
        };
        assert_eq!(p.chain(), "cali-po-gnp/a");
        let long = LabPolicy {
            kind: Kind::NetworkPolicy,
            namespace: Some("ns".into()),
            name: "knp.default.allow-web".into(),
            ..p
        };
        assert_eq!(long.chain().len(), 28);
        assert!(long.chain().starts_with("cali-po-_"));
    }

    #[test]
    fn deny_renders_mark_then_drop_and_last_return_is_stripped() {
        let p = LabPolicy {
            kind: Kind::NetworkPolicy,
            namespace: Some("ns".into()),
            name: "x".into(),
            tier: "default".into(),
            direction: Direction::Ingress,
            rules: vec![
                PolicyRule::deny().from("10.0.0.1/32").port(80),
                PolicyRule::allow(),
            ],
        };
        let r: Vec<FelixRule> = p.rendered().iter().map(Rule::iptables).collect();
        assert_eq!(r.len(), 3);
        assert!(r[0].matches.starts_with("-m comment --comment \"NetworkPolicy ns/x ingress\" -p tcp --source 10.0.0.1/32 -m multiport --destination-ports 80"));
        assert_eq!(r[1].action, "--jump DROP");
        assert_eq!(r[2].action, "--jump MARK --set-mark 0x10000/0x10000");
    }
}
#[cfg(test)]
mod nft_tests {
    use super::*;

    #[test]
    fn nft_script_has_felix_names_counters_and_comments() {
        let p = LabPolicy {
            kind: Kind::NetworkPolicy,
            namespace: Some("shop".into()),
            name: "knp.default.allow-web".into(),
            tier: "default".into(),
            direction: Direction::Ingress,
            rules: vec![PolicyRule::allow().from("10.0.0.1/32").port(8080)],
        };
        let eps = [LabEndpoint {
            veth: "cali0123456789a".into(),
            namespace: "shop".into(),
            policies: vec![p.clone()],
        }];
        let s = nft_filter_script(&eps);
        // nft mode: the 256-character limit leaves the id unhashed.
        assert_eq!(
            p.chain_for(Dataplane::Nftables),
            "cali-pi-np/shop/knp.default.allow-web"
        );
        assert!(s.contains("add rule ip calico filter-cali-pi-np/shop/knp.default.allow-web meta l4proto tcp ip saddr 10.0.0.1/32 tcp dport 8080 counter meta mark set mark & 0xfffeffff ^ 0x10000 comment \"cali:"));
        assert!(s.contains("; NetworkPolicy shop/knp.default.allow-web ingress\""));
        assert!(s.contains("meta mark & 0x20000 == 0 counter drop comment \"cali:"));
        assert!(s.contains("; End of tier default. DROP if no policies passed packet\""));
        assert!(s.contains("\"cali0123456789a\" : goto filter-cali-tw-cali0123456789a"));
    }
}
