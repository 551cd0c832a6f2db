//! felix's policy chains in the filter table (iptables dataplane), and the policy objects as
//! Calico's etcdv3 datastore holds them.
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

use sha2::{Digest, Sha256};

use crate::{
    calico::{restore_felix_table, FelixRule},
    netns::Netns,
    LabError,
};

const MARK_ACCEPT: u32 = 0x10000;
const MARK_PASS: u32 = 0x20000;
const MARK_DROP: u32 = 0x40000;
/// `felix/iptables/table.go` `MaxChainNameLength`.
const MAX_CHAIN: usize = 28;

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
    fn matches(&self) -> String {
        let mut m = vec!["-p tcp".to_string()];
        if let Some(n) = &self.src_net {
            m.push(format!("--source {n}"));
        }
        if let Some(n) = &self.dst_net {
            m.push(format!("--destination {n}"));
        }
        if let Some(p) = self.dst_port {
            m.push(format!("-m multiport --destination-ports {p}"));
        }
        m.join(" ")
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

    /// felix's chain for this policy in its direction.
    pub fn chain(&self) -> String {
        let prefix = match self.direction {
            Direction::Ingress => "cali-pi-",
            Direction::Egress => "cali-po-",
        };
        length_limited_id(prefix, &self.id(), MAX_CHAIN)
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

    /// The policy chain (`PolicyToIptablesChains` + `ProtoRulesToIptablesRules`).
    fn rendered(&self) -> Vec<FelixRule> {
        let mut out = Vec::new();
        for r in &self.rules {
            let mark = if r.deny { MARK_DROP } else { MARK_ACCEPT };
            out.push(FelixRule::new(
                &r.matches(),
                &format!("--jump MARK --set-mark {mark:#x}/{mark:#x}"),
            ));
            let action = if r.deny {
                "--jump DROP"
            } else {
                "--jump RETURN"
            };
            out.push(FelixRule::new(
                &format!("-m mark --mark {mark:#x}/{mark:#x}"),
                action,
            ));
        }
        // Trailing RETURNs are no-ops: felix strips them.
        while out.last().is_some_and(|r| r.action == "--jump RETURN") {
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
            first.matches = format!("-m comment --comment \"{comment}\" {}", first.matches);
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

fn comment(text: &str, rest: &str) -> String {
    if rest.is_empty() {
        format!("-m comment --comment \"{text}\"")
    } else {
        format!("-m comment --comment \"{text}\" {rest}")
    }
}

/// `endpointIptablesChain` for one direction of `ep`.
fn endpoint_chain(ep: &LabEndpoint, dir: Direction) -> Vec<FelixRule> {
    let mut r = vec![
        FelixRule::new(
            "-m conntrack --ctstate RELATED,ESTABLISHED",
            "--jump ACCEPT",
        ),
        FelixRule::new("-m conntrack --ctstate INVALID", "--jump DROP"),
        FelixRule::new(
            "",
            &format!("--jump MARK --set-mark 0/{:#x}", MARK_ACCEPT | MARK_PASS),
        ),
    ];
    if dir == Direction::Egress {
        r.push(FelixRule::new(
            &comment(
                "DROP VXLAN encapped packets originating in workloads",
                "-p 17 -m multiport --destination-ports 4789",
            ),
            "--jump DROP",
        ));
        r.push(FelixRule::new(
            &comment(
                "DROP IPinIP encapped packets originating in workloads",
                "-p 4",
            ),
            "--jump DROP",
        ));
    }
    let mut tiers: Vec<&str> = Vec::new();
    for p in ep.policies.iter().filter(|p| p.direction == dir) {
        if !tiers.contains(&p.tier.as_str()) {
            tiers.push(&p.tier);
        }
    }
    for tier in tiers {
        r.push(FelixRule::new(
            &comment(&format!("Start of tier {tier}"), ""),
            &format!("--jump MARK --set-mark 0/{MARK_PASS:#x}"),
        ));
        for p in ep
            .policies
            .iter()
            .filter(|p| p.direction == dir && p.tier == tier)
        {
            r.push(FelixRule::new(
                &format!("-m mark --mark 0/{MARK_PASS:#x}"),
                &format!("--jump {}", p.chain()),
            ));
            r.push(FelixRule::new(
                &comment(
                    "Return if policy accepted",
                    &format!("-m mark --mark {MARK_ACCEPT:#x}/{MARK_ACCEPT:#x}"),
                ),
                "--jump RETURN",
            ));
        }
        r.push(FelixRule::new(
            &comment(
                &format!("End of tier {tier}. DROP if no policies passed packet"),
                &format!("-m mark --mark 0/{MARK_PASS:#x}"),
            ),
            "--jump DROP",
        ));
    }
    r.push(FelixRule::new(
        "",
        &format!("--jump {}", profile_chain(&ep.namespace, dir)),
    ));
    r.push(FelixRule::new(
        &comment(
            "Return if profile accepted",
            &format!("-m mark --mark {MARK_ACCEPT:#x}/{MARK_ACCEPT:#x}"),
        ),
        "--jump RETURN",
    ));
    r.push(FelixRule::new(
        &comment("DROP if no profiles matched", ""),
        "--jump DROP",
    ));
    r
}

/// The namespace's profile `kns.<ns>` (allow all): `ProfileChainName`.
fn profile_chain(namespace: &str, dir: Direction) -> String {
    let prefix = match dir {
        Direction::Ingress => "cali-pri-",
        Direction::Egress => "cali-pro-",
    };
    length_limited_id(prefix, &format!("kns.{namespace}"), MAX_CHAIN)
}

fn endpoint_chain_name(prefix: &str, veth: &str) -> String {
    length_limited_id(prefix, veth, MAX_CHAIN)
}

/// Writes felix's filter chains for `endpoints` into `node` (iptables-restore --noflush: the
/// chains felix owns are rewritten; the FORWARD jump is added once). Calling it again replaces
/// them, as a felix resync after a policy change does (counters start again at 0).
pub fn write_felix_filter(node: &Netns, endpoints: &[LabEndpoint]) -> Result<(), LabError> {
    let mut chains: Vec<(String, Vec<FelixRule>)> = Vec::new();
    let mut from = Vec::new();
    let mut to = Vec::new();
    for ep in endpoints {
        let fw = endpoint_chain_name("cali-fw-", &ep.veth);
        let tw = endpoint_chain_name("cali-tw-", &ep.veth);
        from.push(FelixRule::new(
            &format!("--in-interface {}", ep.veth),
            &format!("--goto {fw}"),
        ));
        to.push(FelixRule::new(
            &format!("--out-interface {}", ep.veth),
            &format!("--goto {tw}"),
        ));
        chains.push((fw, endpoint_chain(ep, Direction::Egress)));
        chains.push((tw, endpoint_chain(ep, Direction::Ingress)));
        for dir in [Direction::Ingress, Direction::Egress] {
            let name = profile_chain(&ep.namespace, dir);
            if !chains.iter().any(|(c, _)| *c == name) {
                let d = if dir == Direction::Ingress {
                    "ingress"
                } else {
                    "egress"
                };
                chains.push((
                    name,
                    vec![FelixRule::new(
                        &comment(&format!("Profile kns.{} {d}", ep.namespace), ""),
                        &format!("--jump MARK --set-mark {MARK_ACCEPT:#x}/{MARK_ACCEPT:#x}"),
                    )],
                ));
            }
        }
        for p in &ep.policies {
            if !chains.iter().any(|(c, _)| *c == p.chain()) {
                chains.push((p.chain(), p.rendered()));
            }
        }
    }
    for list in [&mut from, &mut to] {
        list.push(FelixRule::new(
            &comment("Unknown interface", ""),
            "--jump DROP",
        ));
    }
    chains.push(("cali-from-wl-dispatch".into(), from));
    chains.push(("cali-to-wl-dispatch".into(), to));
    chains.push((
        "cali-FORWARD".into(),
        vec![
            FelixRule::new("", &format!("--jump MARK --set-mark 0/{:#x}", 0xe0000)),
            FelixRule::new("--in-interface cali+", "--jump cali-from-wl-dispatch"),
            FelixRule::new("--out-interface cali+", "--jump cali-to-wl-dispatch"),
            FelixRule::new(
                &comment(
                    "Policy explicitly accepted packet.",
                    &format!("-m mark --mark {MARK_ACCEPT:#x}/{MARK_ACCEPT:#x}"),
                ),
                "--jump ACCEPT",
            ),
        ],
    ));
    let jump = (
        "FORWARD".to_string(),
        FelixRule::new("", "--jump cali-FORWARD"),
    );
    restore_felix_table(node, "filter", &chains, &[jump])
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
        let r = p.rendered();
        assert_eq!(r.len(), 3);
        assert!(r[0].matches.starts_with("-m comment --comment \"NetworkPolicy ns/x ingress\" -p tcp --source 10.0.0.1/32 -m multiport --destination-ports 80"));
        assert_eq!(r[1].action, "--jump DROP");
        assert_eq!(r[2].action, "--jump MARK --set-mark 0x10000/0x10000");
    }
}
