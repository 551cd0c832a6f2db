//! What Calico writes on a node: veth names (CNI plugin), IPAM-pool ipsets and NAT chains
//! (felix, iptables dataplane), plus a kube-proxy-like Service DNAT.
//!
//! Rule texts and `cali:` comments are felix's own: felix tags each rule with a hash of the
//! chain name, the rules before it and the rule's rendering ([`felix_rule_hashes`]), which this
//! module recomputes instead of hard-coding, so variants (IPIP, VXLAN, no natOutgoing pool)
//! carry the comments felix would give them. The unit tests pin the hashes against
//! `iptables-save` output captured on real Calico nodes.

use std::fmt::Write as _;

use sha1::Sha1;
use sha2::{Digest, Sha224};

use crate::addr::{ensure_lab_cidr, ensure_lab_ip, parse_ip, Cidr};
use crate::netns::Netns;
use crate::LabError;

/// felix's ipset holding every IPv4 IPAM pool, up to v3.32.0 (`IPSetIDAllPools` =
/// "all-ipam-pools").
pub const ALL_POOLS_SET: &str = "cali40all-ipam-pools";
/// Its v3.32.1+ successor (`IPSetIDNetworkPools` = "network-ip-pools"): LoadBalancer-only pools
/// are left out (felix/dataplane/linux/masq_mgr.go `isLoadBalancerOnly`).
pub const NETWORK_POOLS_SET: &str = "cali40network-ip-pools";
/// felix's ipset of every node's IPv4 address (`IPSetIDAllHostNets`).
pub const ALL_HOSTS_SET: &str = "cali40all-hosts-net";
/// felix's ipset holding the IPv4 pools with natOutgoing (`IPSetIDNATOutgoingMasqPools`).
pub const MASQ_POOLS_SET: &str = "cali40masq-ipam-pools";
/// felix's nat chain with the natOutgoing MASQUERADE rule.
pub const NAT_OUTGOING_CHAIN: &str = "cali-nat-outgoing";
/// felix's nat POSTROUTING chain.
pub const POSTROUTING_CHAIN: &str = "cali-POSTROUTING";
/// The chain [`write_service_dnat`] fills, named as kube-proxy's.
pub const KUBE_SERVICES_CHAIN: &str = "KUBE-SERVICES";
/// The MAC Calico's CNI gives every host-side workload veth.
pub const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The next hop Calico's CNI puts in every pod's default route (answered by proxy ARP).
pub const POD_GATEWAY: &str = "169.254.1.1";

/// Calico's host-side veth name: `cali` + the first 11 hex digits of `sha1("<namespace>.<pod>")`.
pub fn veth_name(namespace: &str, pod: &str) -> String {
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    let mut name = String::from("cali");
    for b in digest.iter() {
        let _ = write!(name, "{b:02x}");
    }
    name.truncate(4 + 11);
    name
}

/// An IPv4 IPAM pool as felix sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The pool's CIDR, e.g. "192.168.0.0/16".
    pub cidr: String,
    /// IPPool `natOutgoing`: pod traffic leaving the pools is masqueraded.
    pub nat_outgoing: bool,
    /// IPPool `allowedUses: [LoadBalancer]`: Service LoadBalancer addresses, no pods.
    pub load_balancer_only: bool,
}

impl Pool {
    pub fn new(cidr: &str, nat_outgoing: bool) -> Pool {
        Pool {
            cidr: cidr.to_string(),
            nat_outgoing,
            load_balancer_only: false,
        }
    }

    /// A LoadBalancer-only pool (no natOutgoing: it holds no pods to masquerade).
    pub fn load_balancer(cidr: &str) -> Pool {
        Pool {
            load_balancer_only: true,
            ..Pool::new(cidr, false)
        }
    }
}

/// Which pool set(s) felix programs and its natOutgoing rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolSets {
    /// felix up to v3.32.0: `all-ipam-pools`, every pool (LoadBalancer-only ones too).
    #[default]
    AllIpamPools,
    /// felix from v3.32.1: `network-ip-pools`, LoadBalancer-only pools left out.
    NetworkIpPools,
    /// v3.32.0's set and rule, with v3.32.1's `network-ip-pools` beside it: the difference is
    /// the LoadBalancer-only pools, which the rule still leaves un-masqueraded.
    AllIpamPoolsBesideNetworkIpPools,
}

/// Which dataplane felix programs (`NFTablesMode`; `Auto` follows kube-proxy since v3.32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Dataplane {
    /// ipsets and iptables chains (`ipset restore`, `iptables-restore`).
    #[default]
    Iptables,
    /// nft sets and chains of `table ip calico` (`nft -f -`), felix/nftables/.
    Nftables,
}

impl Dataplane {
    pub const ALL: [Dataplane; 2] = [Dataplane::Iptables, Dataplane::Nftables];

    pub fn as_str(self) -> &'static str {
        match self {
            Dataplane::Iptables => "iptables",
            Dataplane::Nftables => "nftables",
        }
    }

    /// felix's natOutgoing chain in this dataplane, for messages.
    pub fn nat_outgoing_chain(self) -> &'static str {
        match self {
            Dataplane::Iptables => NAT_OUTGOING_CHAIN,
            Dataplane::Nftables => NFT_NAT_OUTGOING_CHAIN,
        }
    }
}

impl std::fmt::Display for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Dataplane {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Dataplane, LabError> {
        Dataplane::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                LabError::Config(format!("unknown dataplane {s:?} (iptables, nftables)"))
            })
    }
}

/// felix configuration that shapes the natOutgoing rule (felix/rules/nat.go).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FelixNat {
    /// The dataplane felix writes the sets and rules into.
    pub dataplane: Dataplane,
    pub pool_sets: PoolSets,
    /// `NATOutgoingExclusions=IPPoolsAndHostIPs`: adds `! --match-set cali40all-hosts-net dst`.
    pub exclude_host_ips: bool,
    /// `IptablesNATOutgoingInterfaceFilter`: adds `--out-interface <this>`.
    pub out_iface: Option<String>,
    /// Every node's address, felix's `cali40all-hosts-net` (written when not empty).
    pub host_ips: Vec<String>,
    /// FelixConfiguration `natPortRange` (MIN, MAX): felix then masquerades TCP and UDP to
    /// these source ports (`--to-ports`; nftables `to :`) and everything else as before.
    pub nat_port_range: Option<(u16, u16)>,
}

impl PoolSets {
    /// Whether felix programs (`all-ipam-pools`, `network-ip-pools`).
    fn sets(self) -> (bool, bool) {
        match self {
            PoolSets::AllIpamPools => (true, false),
            PoolSets::NetworkIpPools => (false, true),
            PoolSets::AllIpamPoolsBesideNetworkIpPools => (true, true),
        }
    }
}

impl FelixNat {
    /// The pool set the rule excludes.
    fn rule_set(&self) -> &'static str {
        match self.pool_sets {
            PoolSets::NetworkIpPools => NETWORK_POOLS_SET,
            _ => ALL_POOLS_SET,
        }
    }
}

/// Which tunnel MASQUERADE rule felix adds to `cali-POSTROUTING` (it masquerades host-sourced
/// traffic leaving through the tunnel device with the tunnel address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encapsulation {
    /// VXLAN (`vxlan.calico`), Calico's default encapsulation for operator installs.
    #[default]
    Vxlan,
    /// IPIP (`tunl0`), as on the seed-002 cluster.
    Ipip,
    /// No encapsulation (BGP-only): no tunnel rule.
    None,
}

/// A rule as felix renders it for hashing: match and action fragments, felix's spelling.
#[derive(Debug, Clone)]
pub(crate) struct FelixRule {
    pub(crate) matches: String,
    pub(crate) action: String,
}

impl FelixRule {
    pub(crate) fn new(matches: &str, action: &str) -> FelixRule {
        FelixRule {
            matches: matches.to_string(),
            action: action.to_string(),
        }
    }

    /// The rule body without `-A chain`, as felix joins its fragments.
    fn body(&self) -> String {
        [self.matches.as_str(), self.action.as_str()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// felix's rule hashes (`Chain.RuleHashes` in felix/iptables): SHA-224 of the chain name, then
/// for each rule `SHA-224(previous hash || "-A <chain> HASH <body>")`, URL-safe base64 cut to 16
/// characters. `bodies` are felix renderings: `--jump X`, `--out-interface X`...
pub fn felix_rule_hashes(chain: &str, bodies: &[&str]) -> Vec<String> {
    let mut prev = Sha224::digest(chain.as_bytes()).to_vec();
    bodies
        .iter()
        .map(|body| {
            let mut h = Sha224::new();
            h.update(&prev);
            h.update(format!("-A {chain} HASH {body}").as_bytes());
            prev = h.finalize().to_vec();
            // 16 base64 characters encode exactly the first 12 bytes.
            base64url(&prev[..12])
        })
        .collect()
}

/// URL-safe base64 without padding, as felix encodes rule hashes.
fn base64url(bytes: &[u8]) -> String {
    crate::http::base64(
        bytes,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        false,
    )
}

/// Renders one chain for `iptables-restore`: `-A`/`-I` lines with felix's `cali:` comments.
pub(crate) fn render_chain(chain: &str, rules: &[FelixRule], insert: bool) -> Vec<String> {
    let bodies: Vec<String> = rules.iter().map(FelixRule::body).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    felix_rule_hashes(chain, &refs)
        .into_iter()
        .zip(&bodies)
        .enumerate()
        .map(|(i, (hash, body))| {
            let op = if insert {
                format!("-I {chain} {}", i + 1)
            } else {
                format!("-A {chain}")
            };
            format!("{op} -m comment --comment \"cali:{hash}\" {body}")
        })
        .collect()
}

/// The nat table felix programs: chains it owns with their rules, and the rules it inserts at
/// the top of kernel chains.
struct FelixNatTable {
    chains: Vec<(&'static str, Vec<FelixRule>)>,
    inserts: Vec<(&'static str, FelixRule)>,
}

/// The nat table of felix (iptables dataplane, MASQUERADE --random-fully supported) for the
/// given pools, encapsulation and natOutgoing settings.
fn felix_nat_table(pools: &[Pool], encap: Encapsulation, felix: &FelixNat) -> FelixNatTable {
    let jump = |target: &str| FelixRule::new("", &format!("--jump {target}"));
    let mut postrouting = vec![jump("cali-fip-snat"), jump(NAT_OUTGOING_CHAIN)];
    let tunnel = match encap {
        Encapsulation::Vxlan => Some("vxlan.calico"),
        Encapsulation::Ipip => Some("tunl0"),
        Encapsulation::None => None,
    };
    if let Some(dev) = tunnel {
        postrouting.push(FelixRule::new(
            &format!(
                "--out-interface {dev} -m addrtype ! --src-type LOCAL --limit-iface-out \
                 -m addrtype --src-type LOCAL"
            ),
            "--jump MASQUERADE --random-fully",
        ));
    }
    // felix leaves the chain empty when no pool has natOutgoing. Match order as
    // makeNATOutgoingRuleIPTables: masq src, not pools dst, [not all-hosts dst], [out iface].
    let nat_outgoing = if pools.iter().any(|p| p.nat_outgoing) {
        let mut matches = format!(
            "-m set --match-set {MASQ_POOLS_SET} src -m set ! --match-set {} dst",
            felix.rule_set()
        );
        if felix.exclude_host_ips {
            let _ = write!(matches, " -m set ! --match-set {ALL_HOSTS_SET} dst");
        }
        // NATOutgoingChain: with natPortRange, TCP and UDP get the ports (then RETURN), the
        // rest the plain rule. The protocol match comes before the interface match.
        let rule = |proto: &str, target: &str| {
            let mut m = matches.clone();
            if !proto.is_empty() {
                let _ = write!(m, " -p {proto}");
            }
            if let Some(iface) = &felix.out_iface {
                let _ = write!(m, " --out-interface {iface}");
            }
            FelixRule::new(&m, target)
        };
        let plain = "--jump MASQUERADE --random-fully";
        match felix.nat_port_range {
            Some((lo, hi)) => {
                let ports = format!("--jump MASQUERADE --to-ports {lo}-{hi} --random-fully");
                let mut rules = Vec::new();
                for proto in ["tcp", "udp"] {
                    rules.push(rule(proto, &ports));
                    rules.push(rule(proto, "--jump RETURN"));
                }
                rules.push(rule("", plain));
                rules
            }
            None => vec![rule("", plain)],
        }
    } else {
        Vec::new()
    };
    let chains = vec![
        ("cali-PREROUTING", vec![jump("cali-fip-dnat")]),
        ("cali-OUTPUT", vec![jump("cali-fip-dnat")]),
        (POSTROUTING_CHAIN, postrouting),
        ("cali-fip-dnat", Vec::new()),
        ("cali-fip-snat", Vec::new()),
        (NAT_OUTGOING_CHAIN, nat_outgoing),
    ];
    let inserts = vec![
        ("PREROUTING", jump("cali-PREROUTING")),
        ("OUTPUT", jump("cali-OUTPUT")),
        ("POSTROUTING", jump(POSTROUTING_CHAIN)),
    ];
    FelixNatTable { chains, inserts }
}

/// Writes felix's IPv4 IPAM-pool ipsets and nat-table chains into `node`, with the VXLAN tunnel
/// rule; see [`write_felix_nat_with`].
pub fn write_felix_nat(node: &Netns, pools: &[Pool]) -> Result<(), LabError> {
    write_felix_nat_with(node, pools, Encapsulation::Vxlan)
}

/// Writes felix's IPv4 IPAM-pool ipsets and nat-table chains into `node`, exactly as felix's
/// iptables dataplane does (same tools too: `ipset restore`, `iptables-restore --noflush`):
///
/// - `cali40all-ipam-pools` (every pool) and `cali40masq-ipam-pools` (pools with natOutgoing),
///   `hash:net family inet hashsize 1024 maxelem 1048576`;
/// - `cali-PREROUTING`/`cali-OUTPUT` -> `cali-fip-dnat`, `cali-POSTROUTING` -> `cali-fip-snat`,
///   `cali-nat-outgoing`, tunnel MASQUERADE; jumps inserted first in PREROUTING, OUTPUT and
///   POSTROUTING;
/// - `-A cali-nat-outgoing -m comment --comment "cali:flqWnvo8yq4ULQLa" -m set --match-set
///   cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j MASQUERADE
///   --random-fully` when a pool has natOutgoing.
///
/// Calling it again replaces the pools and felix's chains (like a felix resync after an IPPool
/// edit) without duplicating the jumps.
pub fn write_felix_nat_with(
    node: &Netns,
    pools: &[Pool],
    encap: Encapsulation,
) -> Result<(), LabError> {
    write_felix_nat_config(node, pools, encap, &FelixNat::default())
}

/// [`write_felix_nat_with`] under non-default felix settings: which pool sets (felix version),
/// `NATOutgoingExclusions`, `IptablesNATOutgoingInterfaceFilter`, and `cali40all-hosts-net`.
pub fn write_felix_nat_config(
    node: &Netns,
    pools: &[Pool],
    encap: Encapsulation,
    felix: &FelixNat,
) -> Result<(), LabError> {
    let mut cidrs = Vec::new();
    for p in pools {
        let c = Cidr::parse(&p.cidr)?;
        ensure_lab_cidr(&c, "IPAM pool")?;
        cidrs.push((format!("{}/{}", c.addr, c.prefix), p));
    }
    let mut hosts = Vec::new();
    for h in &felix.host_ips {
        let ip = parse_ip(h, "host IP")?;
        ensure_lab_ip(ip, "host IP")?;
        hosts.push(ip);
    }
    if let Some(iface) = &felix.out_iface {
        // felix's IfaceParamRegexp: ^[a-zA-Z0-9:._+-]{1,15}$
        let ok = (1..=15).contains(&iface.len())
            && iface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":._+-".contains(c));
        if !ok {
            return Err(LabError::Config(format!(
                "bad IptablesNATOutgoingInterfaceFilter {iface:?}"
            )));
        }
    }
    let (old_set, new_set) = felix.pool_sets.sets();
    if felix.dataplane == Dataplane::Nftables {
        let script = felix_nft_table(pools, encap, felix, &cidrs, &hosts);
        tracing::debug!(netns = node.name(), %script, "lab: felix nftables");
        node.exec_with_stdin(&["nft", "-f", "-"], &script)?;
        return Ok(());
    }

    // ipsets first: iptables refuses rules referencing missing sets.
    let mut ipsets = String::new();
    let mut sets = vec![MASQ_POOLS_SET];
    sets.extend(old_set.then_some(ALL_POOLS_SET));
    sets.extend(new_set.then_some(NETWORK_POOLS_SET));
    sets.extend((!hosts.is_empty() || felix.exclude_host_ips).then_some(ALL_HOSTS_SET));
    for set in sets {
        let _ = writeln!(
            ipsets,
            "create {set} hash:net family inet hashsize 1024 maxelem 1048576"
        );
        let _ = writeln!(ipsets, "flush {set}");
    }
    for (cidr, p) in &cidrs {
        if old_set {
            let _ = writeln!(ipsets, "add {ALL_POOLS_SET} {cidr}");
        }
        if new_set && !p.load_balancer_only {
            let _ = writeln!(ipsets, "add {NETWORK_POOLS_SET} {cidr}");
        }
        if p.nat_outgoing {
            let _ = writeln!(ipsets, "add {MASQ_POOLS_SET} {cidr}");
        }
    }
    for ip in &hosts {
        let _ = writeln!(ipsets, "add {ALL_HOSTS_SET} {ip}");
    }
    node.exec_with_stdin(&["ipset", "-exist", "restore"], &ipsets)?;

    let FelixNatTable { chains, inserts } = felix_nat_table(pools, encap, felix);
    restore_felix_table(node, "nat", &chains, &inserts)
}

/// Writes felix's `cali-` chains of `table` as felix does: each chain declared (under
/// --noflush that creates or flushes it: a clean rewrite), its rules appended, and the jumps
/// from the kernel's chains inserted unless a rule with the same felix comment is there.
pub(crate) fn restore_felix_table<C: AsRef<str>, K: AsRef<str>>(
    node: &Netns,
    table: &str,
    chains: &[(C, Vec<FelixRule>)],
    inserts: &[(K, FelixRule)],
) -> Result<(), LabError> {
    let existing = node.exec(&["iptables-save", "-t", table])?;
    let mut restore = format!("*{table}\n");
    for (chain, _) in chains {
        let _ = writeln!(restore, ":{} - [0:0]", chain.as_ref());
    }
    for (chain, rule) in inserts {
        for line in render_chain(chain.as_ref(), std::slice::from_ref(rule), true) {
            let marker = line.split('"').nth(1).unwrap_or_default();
            if !existing.contains(marker) {
                let _ = writeln!(restore, "{line}");
            }
        }
    }
    for (chain, rules) in chains {
        for line in render_chain(chain.as_ref(), rules, false) {
            let _ = writeln!(restore, "{line}");
        }
    }
    restore.push_str("COMMIT\n");
    tracing::debug!(netns = node.name(), %restore, table, "lab: felix rules");
    node.exec_with_stdin(&["iptables-restore", "-w", "--noflush"], &restore)?;
    Ok(())
}

/// felix's table in nftables mode (`table ip calico`).
pub const NFT_TABLE: &str = "calico";
/// felix's natOutgoing chain in nftables mode: chains carry their hook's prefix.
pub const NFT_NAT_OUTGOING_CHAIN: &str = "nat-cali-nat-outgoing";

/// felix's rule hashes in nftables mode (felix/generictables/rules.go with the nft renderer):
/// as [`felix_rule_hashes`], but each step hashes the rule's nft rendering alone (match,
/// `counter`, action) under the prefixed chain name.
pub fn felix_nft_rule_hashes(chain: &str, bodies: &[&str]) -> Vec<String> {
    let mut prev = Sha224::digest(chain.as_bytes()).to_vec();
    bodies
        .iter()
        .map(|body| {
            let mut h = Sha224::new();
            h.update(&prev);
            h.update(body.as_bytes());
            prev = h.finalize().to_vec();
            base64url(&prev[..12])
        })
        .collect()
}

/// One nft chain's rules with felix's `comment "cali:<hash>;"`.
fn render_nft_chain(chain: &str, bodies: &[String]) -> Vec<String> {
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    felix_nft_rule_hashes(chain, &refs)
        .into_iter()
        .zip(bodies)
        .map(|(hash, body)| format!("{body} comment \"cali:{hash};\""))
        .collect()
}

/// felix's nat part of `table ip calico` (nftables mode, knftables' rendering) as an `nft -f`
/// script that replaces the table: sets with felix's names, `flags interval` for its
/// `hash:net` sets; base chains `nat-PREROUTING` (dstnat), `nat-OUTPUT` (110) and
/// `nat-POSTROUTING` (`srcnat + 10`) jumping to `nat-cali-*`; in `nat-cali-nat-outgoing`
/// `ip saddr @cali40masq-ipam-pools ip daddr != @<pools> [ip daddr != @cali40all-hosts-net]
/// [oifname <filter>] counter masquerade fully-random`. Comments as in
/// felix/fv/cali-nftables-dump.txt (the base chains' jump hashes are taken from it).
fn felix_nft_table(
    pools: &[Pool],
    encap: Encapsulation,
    felix: &FelixNat,
    cidrs: &[(String, &Pool)],
    hosts: &[std::net::Ipv4Addr],
) -> String {
    let (old_set, new_set) = felix.pool_sets.sets();
    let mut sets: Vec<(&str, Vec<String>)> = vec![(
        MASQ_POOLS_SET,
        cidrs
            .iter()
            .filter(|(_, p)| p.nat_outgoing)
            .map(|(c, _)| c.clone())
            .collect(),
    )];
    if old_set {
        sets.push((
            ALL_POOLS_SET,
            cidrs.iter().map(|(c, _)| c.clone()).collect(),
        ));
    }
    if new_set {
        sets.push((
            NETWORK_POOLS_SET,
            cidrs
                .iter()
                .filter(|(_, p)| !p.load_balancer_only)
                .map(|(c, _)| c.clone())
                .collect(),
        ));
    }
    if !hosts.is_empty() || felix.exclude_host_ips {
        sets.push((
            ALL_HOSTS_SET,
            hosts.iter().map(ToString::to_string).collect(),
        ));
    }
    let jump = |target: &str| format!("counter jump {target}");
    let mut postrouting = vec![jump("nat-cali-fip-snat"), jump(NFT_NAT_OUTGOING_CHAIN)];
    let tunnel = match encap {
        Encapsulation::Vxlan => Some("vxlan.calico"),
        Encapsulation::Ipip => Some("tunl0"),
        Encapsulation::None => None,
    };
    if let Some(dev) = tunnel {
        postrouting.push(format!(
            "oifname {dev} fib saddr . oif type != local fib saddr type local counter \
             masquerade fully-random"
        ));
    }
    let nat_outgoing = if pools.iter().any(|p| p.nat_outgoing) {
        let mut m = format!(
            "ip saddr @{MASQ_POOLS_SET} ip daddr != @{}",
            felix.rule_set()
        );
        if felix.exclude_host_ips {
            let _ = write!(m, " ip daddr != @{ALL_HOSTS_SET}");
        }
        let rule = |proto: &str, action: &str| {
            let mut m = m.clone();
            if !proto.is_empty() {
                let _ = write!(m, " meta l4proto {proto}");
            }
            if let Some(iface) = &felix.out_iface {
                // nft's wildcard is `*` where iptables' is `+`.
                let _ = write!(m, " oifname {}", iface.replace('+', "*"));
            }
            format!("{m} counter {action}")
        };
        match felix.nat_port_range {
            Some((lo, hi)) => {
                let ports = format!("masquerade to :{lo}-{hi} fully-random");
                let mut rules = Vec::new();
                for proto in ["tcp", "udp"] {
                    rules.push(rule(proto, &ports));
                    rules.push(rule(proto, "return"));
                }
                rules.push(rule("", "masquerade fully-random"));
                rules
            }
            None => vec![rule("", "masquerade fully-random")],
        }
    } else {
        Vec::new()
    };
    let mut t = String::new();
    // Declaring then deleting the table makes the rewrite work whether or not it exists.
    let _ = writeln!(t, "table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}");
    let _ = writeln!(t, "table ip {NFT_TABLE} {{");
    for (name, members) in &sets {
        let _ = writeln!(t, "\tset {name} {{\n\t\ttype ipv4_addr\n\t\tflags interval");
        if !members.is_empty() {
            let _ = writeln!(t, "\t\telements = {{ {} }}", members.join(", "));
        }
        let _ = writeln!(t, "\t}}");
    }
    let base = [
        (
            "nat-PREROUTING",
            "type nat hook prerouting priority dstnat; policy accept;",
            "nat-cali-PREROUTING",
            "8sk3stC_vMHYORJg",
        ),
        (
            "nat-OUTPUT",
            "type nat hook output priority 110; policy accept;",
            "nat-cali-OUTPUT",
            "MUvsO-9-Ry3DQcZV",
        ),
        (
            "nat-POSTROUTING",
            "type nat hook postrouting priority srcnat + 10; policy accept;",
            "nat-cali-POSTROUTING",
            "z057H0Z77Fcko47w",
        ),
    ];
    for (chain, head, target, hash) in base {
        let _ = writeln!(
            t,
            "\tchain {chain} {{\n\t\t{head}\n\t\t{} comment \"cali:{hash};\"\n\t}}",
            jump(target)
        );
    }
    let chains: Vec<(&str, Vec<String>)> = vec![
        ("nat-cali-PREROUTING", vec![jump("nat-cali-fip-dnat")]),
        ("nat-cali-OUTPUT", vec![jump("nat-cali-fip-dnat")]),
        ("nat-cali-POSTROUTING", postrouting),
        ("nat-cali-fip-dnat", Vec::new()),
        ("nat-cali-fip-snat", Vec::new()),
        (NFT_NAT_OUTGOING_CHAIN, nat_outgoing),
    ];
    for (chain, rules) in &chains {
        let _ = writeln!(t, "\tchain {chain} {{");
        for r in render_nft_chain(chain, rules) {
            let _ = writeln!(t, "\t\t{r}");
        }
        let _ = writeln!(t, "\t}}");
    }
    t.push_str("}\n");
    t
}

/// kube-proxy-like (iptables mode) DNAT of a Service VIP: chain `KUBE-SERVICES`, jumped to from
/// nat PREROUTING (pods' traffic) and OUTPUT (the node's own), with
/// `-d VIP/32 -p tcp --dport PORT -j DNAT --to-destination ENDPOINT:ENDPOINT_PORT`.
/// Several services may be added; the jumps are added once, after felix's.
pub fn write_service_dnat(
    node: &Netns,
    vip: &str,
    port: u16,
    endpoint: &str,
    endpoint_port: u16,
) -> Result<(), LabError> {
    let vip = parse_ip(vip, "service VIP")?;
    let endpoint = parse_ip(endpoint, "service endpoint")?;
    ensure_lab_ip(vip, "service VIP")?;
    ensure_lab_ip(endpoint, "service endpoint")?;

    let existing = node.exec(&["iptables-save", "-t", "nat"])?;
    let mut restore = String::from("*nat\n");
    if !existing.contains(&format!(":{KUBE_SERVICES_CHAIN} ")) {
        let _ = writeln!(restore, ":{KUBE_SERVICES_CHAIN} - [0:0]");
        for hook in ["PREROUTING", "OUTPUT"] {
            let _ = writeln!(
                restore,
                "-A {hook} -m comment --comment \"kubernetes service portals\" -j {KUBE_SERVICES_CHAIN}"
            );
        }
    }
    let _ = writeln!(
        restore,
        "-A {KUBE_SERVICES_CHAIN} -d {vip}/32 -p tcp -m comment --comment \"lab service \
         {vip}:{port} -> {endpoint}:{endpoint_port}\" -m tcp --dport {port} \
         -j DNAT --to-destination {endpoint}:{endpoint_port}"
    );
    restore.push_str("COMMIT\n");
    node.exec_with_stdin(&["iptables-restore", "-w", "--noflush"], &restore)?;
    Ok(())
}

/// Packets that hit the MASQUERADE rule(s) of felix's natOutgoing chain in `node` (first
/// packets of connections only: nat rules see one packet per conntrack entry):
/// `nat-cali-nat-outgoing` of `table ip calico` where felix runs in nftables mode, else
/// `cali-nat-outgoing`.
pub fn nat_outgoing_packets(node: &Netns) -> Result<u64, LabError> {
    if node
        .exec(&["nft", "list", "table", "ip", NFT_TABLE])
        .is_ok()
    {
        return nft_nat_outgoing_packets(node);
    }
    Ok(crate::iptables::counters(node, "nat", NAT_OUTGOING_CHAIN)?
        .iter()
        .filter(|c| c.target == "MASQUERADE")
        .map(|c| c.packets)
        .sum())
}

/// The counters of the masquerade/SNAT rules of `nat-cali-nat-outgoing`, from
/// `nft -j list chain ip calico nat-cali-nat-outgoing`.
fn nft_nat_outgoing_packets(node: &Netns) -> Result<u64, LabError> {
    Ok(nft_masq_packets(&nft_list_chain(
        node,
        NFT_NAT_OUTGOING_CHAIN,
    )?))
}

/// `nft -j list chain ip calico <chain>`, parsed.
pub(crate) fn nft_list_chain(node: &Netns, chain: &str) -> Result<serde_json::Value, LabError> {
    let out = node.exec(&["nft", "-j", "list", "chain", "ip", NFT_TABLE, chain])?;
    serde_json::from_str(&out).map_err(|e| LabError::Unexpected(format!("nft -j output: {e}")))
}

/// Packets counted by the rules of an `nft -j` listing that hold a statement `stmt` matches.
pub(crate) fn nft_counted_packets(
    json: &serde_json::Value,
    stmt: impl Fn(&serde_json::Value) -> bool,
) -> u64 {
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .filter(|e| e.iter().any(&stmt))
        .flat_map(|e| e.iter().filter_map(|x| x["counter"]["packets"].as_u64()))
        .sum()
}

fn nft_masq_packets(json: &serde_json::Value) -> u64 {
    nft_counted_packets(json, |x| {
        x.get("masquerade").is_some() || x.get("snat").is_some()
    })
}

/// felix's VXLAN device (`VXLANTunnelDevice`... `vxlan.calico`).
pub const VXLAN_DEVICE: &str = "vxlan.calico";
/// felix's default `VXLANVNI`.
pub const VXLAN_VNI: u32 = 4096;
/// felix's default `VXLANPort`.
pub const VXLAN_PORT: u16 = 4789;
/// felix's VXLAN MTU for a 1500-byte underlay (1500 - 50).
pub const VXLAN_MTU: u32 = 1450;
/// The kernel route protocol felix tags its blackhole block routes with (`proto 80`).
pub const FELIX_ROUTE_PROTO: &str = "80";

/// A node's VXLAN tunnel endpoint as felix learns it from the datastore
/// (`VXLANTunnelEndpointUpdate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vtep {
    pub node: String,
    /// The VTEP MAC calico-node allocated (`66:...`).
    pub mac: String,
    /// The node's tunnel address (`IPv4VXLANTunnelAddr`), an address of one of its blocks.
    pub tunnel_ip: std::net::Ipv4Addr,
    /// `ParentDeviceIp`: the node's autodetected address, i.e. where peers send VXLAN packets.
    pub parent_ip: std::net::Ipv4Addr,
    /// The node's IPAM block(s), routed through its tunnel address.
    pub blocks: Vec<String>,
}

/// A VTEP MAC in calico-node's style (`66:` then five bytes derived from the node name).
pub fn vtep_mac(node: &str) -> String {
    let d = Sha1::digest(format!("vtep-mac.{node}").as_bytes());
    format!(
        "66:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        d[0], d[1], d[2], d[3], d[4]
    )
}

/// Creates `vxlan.calico` in `node` as felix's vxlan manager does: VNI 4096, dstport 4789,
/// source `local` = the node's autodetected address, `dev` = the interface holding that address
/// (the "parent"), no learning, the VTEP MAC, MTU 1450, and the tunnel address as a /32.
pub fn write_vxlan_device(node: &Netns, parent: &str, vtep: &Vtep) -> Result<(), LabError> {
    let vni = VXLAN_VNI.to_string();
    let port = VXLAN_PORT.to_string();
    let mtu = VXLAN_MTU.to_string();
    let local = vtep.parent_ip.to_string();
    node.ip(&[
        "link",
        "add",
        VXLAN_DEVICE,
        "address",
        &vtep.mac,
        "mtu",
        &mtu,
        "type",
        "vxlan",
        "id",
        &vni,
        "local",
        &local,
        "dev",
        parent,
        "dstport",
        &port,
        "nolearning",
    ])?;
    node.ip(&[
        "addr",
        "add",
        &format!("{}/32", vtep.tunnel_ip),
        "dev",
        VXLAN_DEVICE,
    ])?;
    node.ip(&["link", "set", VXLAN_DEVICE, "up"])?;
    Ok(())
}

/// Programs a remote VTEP into `node` like felix's vxlanfdb and route managers: a permanent
/// ARP entry for its tunnel address, an FDB entry sending its MAC to its parent address, and
/// `<block> via <tunnel addr> dev vxlan.calico onlink` for each of its blocks.
pub fn write_vxlan_peer(node: &Netns, peer: &Vtep) -> Result<(), LabError> {
    let tunnel = peer.tunnel_ip.to_string();
    let dst = peer.parent_ip.to_string();
    node.ip(&[
        "neigh",
        "replace",
        &tunnel,
        "lladdr",
        &peer.mac,
        "dev",
        VXLAN_DEVICE,
        "nud",
        "permanent",
    ])?;
    node.exec(&[
        "bridge",
        "fdb",
        "replace",
        &peer.mac,
        "dev",
        VXLAN_DEVICE,
        "dst",
        &dst,
        "self",
        "permanent",
    ])?;
    for block in &peer.blocks {
        node.ip(&[
            "route",
            "replace",
            block,
            "via",
            &tunnel,
            "dev",
            VXLAN_DEVICE,
            "onlink",
        ])?;
    }
    Ok(())
}

/// felix's blackhole route for a block the node owns (`blackhole <block> proto 80`): pod
/// addresses of the block without a workload are dropped locally instead of leaving the node.
pub fn write_block_blackhole(node: &Netns, block: &str) -> Result<(), LabError> {
    let c = Cidr::parse(block)?;
    ensure_lab_cidr(&c, "IPAM block")?;
    node.ip(&[
        "route",
        "replace",
        "blackhole",
        block,
        "proto",
        FELIX_ROUTE_PROTO,
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_name_matches_calico() {
        // sha1("kube-system.calico-kube-controllers-596576f79-j2pkg") = d92900560e327ba7...
        assert_eq!(
            veth_name("kube-system", "calico-kube-controllers-596576f79-j2pkg"),
            "calid92900560e3"
        );
        assert_eq!(veth_name("a", "b").len(), 15);
    }

    #[test]
    fn base64url_matches_rfc4648() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    fn comments(chain: &str, rules: &[FelixRule]) -> Vec<String> {
        render_chain(chain, rules, false)
            .iter()
            .filter_map(|l| l.split('"').nth(1).map(str::to_string))
            .collect()
    }

    /// The comments felix writes on real nodes (iptables-save of Calico v3.2x clusters; the
    /// seed-002 screenshot has the IPIP ones).
    #[test]
    fn felix_hashes_match_real_nodes() {
        let find = |chains: &[(&str, Vec<FelixRule>)], name: &str| {
            chains
                .iter()
                .find(|(c, _)| *c == name)
                .map(|(_, r)| r.clone())
                .unwrap_or_default()
        };
        let pools = [Pool::new("192.168.0.0/16", true)];
        let FelixNatTable { chains, inserts } =
            felix_nat_table(&pools, Encapsulation::Vxlan, &FelixNat::default());
        assert_eq!(
            comments(POSTROUTING_CHAIN, &find(&chains, POSTROUTING_CHAIN)),
            [
                "cali:Z-c7XtVd2Bq7s_hA",
                "cali:nYKhEzDlr11Jccal",
                "cali:e9dnSgSVNmIcpVhP"
            ]
        );
        assert_eq!(
            comments(NAT_OUTGOING_CHAIN, &find(&chains, NAT_OUTGOING_CHAIN)),
            ["cali:flqWnvo8yq4ULQLa"]
        );
        assert_eq!(
            comments("cali-PREROUTING", &find(&chains, "cali-PREROUTING")),
            ["cali:r6XmIziWUJsdOK6Z"]
        );
        assert_eq!(
            comments("cali-OUTPUT", &find(&chains, "cali-OUTPUT")),
            ["cali:GBTAv2p5CwevEyJm"]
        );
        let inserted: Vec<String> = inserts
            .iter()
            .flat_map(|(c, r)| comments(c, std::slice::from_ref(r)))
            .collect();
        assert_eq!(
            inserted,
            [
                "cali:6gwbT8clXdHdC1b1",
                "cali:tVnHkvAo15HuiPy0",
                "cali:O3lYWMrLQYEMJtB5"
            ]
        );

        let ipip = felix_nat_table(&pools, Encapsulation::Ipip, &FelixNat::default()).chains;
        assert_eq!(
            comments(POSTROUTING_CHAIN, &find(&ipip, POSTROUTING_CHAIN))[2],
            "cali:SXWvdsbh4Mw7wOln"
        );
        let plain = felix_nat_table(
            &[Pool::new("10.244.0.0/16", false)],
            Encapsulation::None,
            &FelixNat::default(),
        )
        .chains;
        assert_eq!(find(&plain, POSTROUTING_CHAIN).len(), 2);
        assert!(find(&plain, NAT_OUTGOING_CHAIN).is_empty());
    }

    /// felix's cali-nat-outgoing rules for `pools` with `felix`'s settings (VXLAN).
    fn nat_outgoing_rules(pools: &[Pool], felix: &FelixNat) -> Vec<FelixRule> {
        felix_nat_table(pools, Encapsulation::Vxlan, felix)
            .chains
            .iter()
            .find(|(c, _)| *c == NAT_OUTGOING_CHAIN)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }

    #[test]
    fn rendered_masquerade_rule_is_felix_text() {
        let rules = nat_outgoing_rules(&[Pool::new("192.168.0.0/16", true)], &FelixNat::default());
        assert_eq!(
            render_chain(NAT_OUTGOING_CHAIN, &rules, false),
            [
                "-A cali-nat-outgoing -m comment --comment \"cali:flqWnvo8yq4ULQLa\" -m set \
              --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools \
              dst --jump MASQUERADE --random-fully"
            ]
        );
        // v3.32.1+ set, NATOutgoingExclusions=IPPoolsAndHostIPs, interface filter: matches in
        // makeNATOutgoingRuleIPTables' order.
        let felix = FelixNat {
            dataplane: Dataplane::Iptables,
            pool_sets: PoolSets::NetworkIpPools,
            exclude_host_ips: true,
            out_iface: Some("eth0".into()),
            host_ips: vec![],
            nat_port_range: None,
        };
        let rules = nat_outgoing_rules(&[Pool::new("10.244.0.0/16", true)], &felix);
        let line = render_chain(NAT_OUTGOING_CHAIN, &rules, false).join("");
        assert!(
            line.ends_with(
                "-m set --match-set cali40masq-ipam-pools src -m set ! --match-set \
                 cali40network-ip-pools dst -m set ! --match-set cali40all-hosts-net dst \
                 --out-interface eth0 --jump MASQUERADE --random-fully"
            ),
            "{line}"
        );
    }

    /// natPortRange: felix's NATOutgoingChain gives TCP and UDP the ports, each followed by a
    /// RETURN, and everything else the plain rule.
    #[test]
    fn nat_port_range_renders_felix_rules() {
        let felix = FelixNat {
            out_iface: Some("eth0".into()),
            nat_port_range: Some((40000, 40001)),
            ..FelixNat::default()
        };
        let rules = nat_outgoing_rules(&[Pool::new("10.244.0.0/16", true)], &felix);
        let lines = render_chain(NAT_OUTGOING_CHAIN, &rules, false);
        assert_eq!(lines.len(), 5, "{lines:?}");
        let set = "-m set --match-set cali40masq-ipam-pools src -m set ! --match-set \
                   cali40all-ipam-pools dst";
        for (i, want) in [
            "-p tcp --out-interface eth0 --jump MASQUERADE --to-ports 40000-40001 --random-fully",
            "-p tcp --out-interface eth0 --jump RETURN",
            "-p udp --out-interface eth0 --jump MASQUERADE --to-ports 40000-40001 --random-fully",
            "-p udp --out-interface eth0 --jump RETURN",
            "--out-interface eth0 --jump MASQUERADE --random-fully",
        ]
        .iter()
        .enumerate()
        {
            assert!(
                lines[i].trim_end().ends_with(&format!("{set} {want}")),
                "{}",
                lines[i]
            );
        }
    }

    /// felix's nftables comments, checked against felix/fv/cali-nftables-dump.txt (its
    /// masquerade rule's hash is that of the `all-ipam-pools` rendering: the dump was edited
    /// when the set was renamed, not regenerated).
    #[test]
    fn felix_nft_hashes_match_the_dump() {
        assert_eq!(
            felix_nft_rule_hashes(
                "nat-cali-POSTROUTING",
                &[
                    "counter jump nat-cali-fip-snat",
                    "counter jump nat-cali-nat-outgoing",
                    "oifname vxlan.calico fib saddr . oif type != local fib saddr type local \
                     counter masquerade fully-random",
                ]
            ),
            ["tyzVzs_JgnIisxS6", "_Ye9aC74uuE93XON", "2Er8attV1nLNdKXr"]
        );
        assert_eq!(
            felix_nft_rule_hashes(
                NFT_NAT_OUTGOING_CHAIN,
                &[
                    "ip saddr @cali40masq-ipam-pools ip daddr != @cali40all-ipam-pools counter \
                   masquerade fully-random"
                ]
            ),
            ["JjuWIaIfSLZi41Xk"]
        );
        assert_eq!(
            felix_nft_rule_hashes("nat-cali-PREROUTING", &["counter jump nat-cali-fip-dnat"]),
            ["4l5hoyVny05ifNh_"]
        );
    }

    #[test]
    fn nft_table_is_felix_text() {
        let pools = [
            Pool::new("10.244.0.0/16", true),
            Pool::load_balancer("10.10.10.0/24"),
        ];
        let felix = FelixNat {
            dataplane: Dataplane::Nftables,
            pool_sets: PoolSets::NetworkIpPools,
            exclude_host_ips: true,
            out_iface: Some("eth+".into()),
            host_ips: vec![],
            nat_port_range: None,
        };
        let cidrs: Vec<(String, &Pool)> = pools.iter().map(|p| (p.cidr.clone(), p)).collect();
        let hosts = ["10.51.0.100"
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST)];
        let t = felix_nft_table(&pools, Encapsulation::Vxlan, &felix, &cidrs, &hosts);
        for want in [
            "\tset cali40network-ip-pools {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/16 }\n\t}",
            "\tset cali40masq-ipam-pools {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/16 }",
            "elements = { 10.51.0.100 }",
            "type nat hook postrouting priority srcnat + 10; policy accept;\n\t\tcounter jump nat-cali-POSTROUTING comment \"cali:z057H0Z77Fcko47w;\"",
            "\t\tip saddr @cali40masq-ipam-pools ip daddr != @cali40network-ip-pools ip daddr != @cali40all-hosts-net oifname eth* counter masquerade fully-random comment \"cali:",
        ] {
            assert!(t.contains(want), "{want:?} not in\n{t}");
        }
        assert!(!t.contains(ALL_POOLS_SET), "{t}");
        // No natOutgoing pool: the chain is empty.
        let t = felix_nft_table(
            &[Pool::new("10.244.0.0/16", false)],
            Encapsulation::None,
            &FelixNat::default(),
            &[],
            &[],
        );
        assert!(t.contains("\tchain nat-cali-nat-outgoing {\n\t}"), "{t}");
    }

    #[test]
    fn nft_counters_are_summed_for_masquerade_rules() {
        let j: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {}}, {"chain": {"name": "nat-cali-nat-outgoing"}},
            {"rule": {"expr": [{"counter": {"packets": 3, "bytes": 180}}, {"masquerade": {"flags": "fully-random"}}]}},
            {"rule": {"expr": [{"counter": {"packets": 7, "bytes": 1}}, {"return": null}]}}]}"#,
        )
        .unwrap_or_default();
        assert_eq!(nft_masq_packets(&j), 3);
    }
}
