//! Calico's view of the node: IP pools (from felix's ipsets) and which interface plays which role.
use std::{net::IpAddr, time::Duration};

use serde::Serialize;
use sha1::{Digest, Sha1};

use crate::{
    net::{Cidr, NetError},
    netlink::{Link, NodeFacts},
};

/// felix's ipset of all IPv4 pools; `cali40network-ip-pools` is the same set in newer felix.
pub const ALL_POOLS_SETS_V4: &[&str] = &["cali40all-ipam-pools", "cali40network-ip-pools"];
pub const MASQ_POOLS_SETS_V4: &[&str] = &["cali40masq-ipam-pools"];
pub const ALL_POOLS_SETS_V6: &[&str] = &["cali60all-ipam-pools", "cali60network-ip-pools"];
pub const MASQ_POOLS_SETS_V6: &[&str] = &["cali60masq-ipam-pools"];

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
}

/// The node's IP pools as felix programmed them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pools {
    /// Every pool (felix's `all-ipam-pools` sets): destinations here are not masqueraded.
    pub all: Vec<Cidr>,
    /// Pools with natOutgoing (felix's `masq-ipam-pools` sets).
    pub masq: Vec<Cidr>,
    /// Where the pools came from: "ipset", "flags", or "none".
    pub source: String,
    /// Sets that were looked for and not found, for the operator's benefit.
    pub missing_sets: Vec<String>,
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
}

/// Reads felix's pool ipsets in the agent's network namespace. Pools given on the command line
/// (`--pool`, `--masq-pool`) are added, which covers nodes where the sets do not exist.
/// `ipset` runs at most `deadline` in all (then it is killed and the sets count as unreadable):
/// a wedged netfilter must not stop the sync loop.
pub async fn read_pools(flag_all: &[Cidr], flag_masq: &[Cidr], deadline: Duration) -> Pools {
    let mut pools = Pools::default();
    let until = tokio::time::Instant::now() + deadline;
    for (sets, dst_all) in [
        (ALL_POOLS_SETS_V4, true),
        (ALL_POOLS_SETS_V6, true),
        (MASQ_POOLS_SETS_V4, false),
        (MASQ_POOLS_SETS_V6, false),
    ] {
        let mut found = false;
        for set in sets {
            match ipset_members(set, until).await {
                Ok(Some(members)) => {
                    found = true;
                    let target = if dst_all {
                        &mut pools.all
                    } else {
                        &mut pools.masq
                    };
                    target.extend(members);
                }
                Ok(None) => {}
                Err(e @ CalicoError::IpsetTimeout) => {
                    tracing::warn!(set, error = %e, "cannot read ipset");
                }
                Err(e) => {
                    tracing::debug!(set, error = %e, "cannot read ipset");
                }
            }
        }
        if !found {
            pools.missing_sets.push(sets.join("|"));
        }
    }
    let from_ipset = !pools.is_empty();
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
    pools.source = match (from_ipset, flag_all.is_empty() && flag_masq.is_empty()) {
        (true, true) => "ipset",
        (true, false) => "ipset+flags",
        (false, false) => "flags",
        (false, true) => "none",
    }
    .to_string();
    pools
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
    veth_name_with_prefix("cali", namespace, pod)
}

/// As libcalico-go's `VethNameForWorkload`: the prefix, then always 11 hex digits of the sha1,
/// whatever the prefix's length. `prefix` may be felix's whole comma-separated
/// `FELIX_INTERFACEPREFIX` list: the first entry names new veths.
pub fn veth_name_with_prefix(prefix: &str, namespace: &str, pod: &str) -> String {
    let first = prefix.split(',').next().unwrap_or("").trim();
    let first = if first.is_empty() { "cali" } else { first };
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

/// The part an interface plays on the packet path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A pod's host-side veth (`cali*`).
    Workload,
    /// tunl0, vxlan.calico, vxlan-v6.calico, wireguard.cali.
    Tunnel,
    /// A host NIC (or any interface holding a host address, such as a stray bridge).
    Host,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Workload => "workload",
            Role::Tunnel => "tunnel",
            Role::Host => "host",
        }
    }
}

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
            workload_prefixes: vec!["cali".into()],
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
}
