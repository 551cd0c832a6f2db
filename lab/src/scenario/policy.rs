//! `policy`: Calico policies drop two pods' traffic to a database pod on ce-demo-1 while a
//! third pod, held back as the healthy control, is let through (issue 17 §2).
//!
//! - A Calico NetworkPolicy `security.deny-web-b` in tier `security` on the server's ingress:
//!   rule 0 allows the control pod, rule 1 denies `web-b`;
//! - a GlobalNetworkPolicy `deny-web-c-egress` on `web-c`'s egress: rule 0 denies the server.
//!
//! Both are stored in the lab's etcd as calico-apiserver stores them, and rendered into node 1's
//! filter chains exactly as felix renders them in the scenario's dataplane (iptables, or
//! `table ip calico` in nftables mode: [`crate::policy`]). The proof, without tracer: the denied
//! pods' connects time out while the control's connects, and felix's DROP rules' counters moved
//! (read with iptables or `nft -j`). tracer should report `denied_by_policy` naming each policy
//! from the datastore; the control's flow must carry no diagnosis.

use std::net::IpAddr;

use tracer_model::{Cause, Verdict};

use super::common::{check, run_probes, Probe, TrafficReport, BLACKHOLE, WORKING};
use super::ScenarioSpec;
use crate::calico::veth_name;
use crate::policy::{
    drop_packets, write_felix_policy, Direction, Kind, LabEndpoint, LabPolicy, PolicyRule,
};
use crate::topo::{Cluster, ClusterConfig, ClusterPod, PodConfig};
use crate::LabError;

pub const NS: &str = "shop";
pub const SERVER: (&str, &str) = ("db-0", "10.244.142.37");
/// The held-back healthy control.
pub const ALLOWED: (&str, &str) = ("web-allowed", "10.244.142.38");
pub const DENIED_NP: (&str, &str) = ("web-b", "10.244.142.39");
pub const DENIED_GNP: (&str, &str) = ("web-c", "10.244.142.40");

/// Calico policies deny two pods; a third is allowed.
pub struct Policy;

/// A pod's address as a policy rule's net.
pub fn net(pod: (&str, &str)) -> String {
    format!("{}/32", pod.1)
}

/// A Calico NetworkPolicy in tier `security` whose rule 1 denies web-b (tests/policy.rs uses it too).
pub fn tiered_np() -> LabPolicy {
    LabPolicy {
        kind: Kind::NetworkPolicy,
        namespace: Some(NS.into()),
        name: "security.deny-web-b".into(),
        tier: "security".into(),
        direction: Direction::Ingress,
        rules: vec![
            PolicyRule::allow().from(&net(ALLOWED)),
            PolicyRule::deny().from(&net(DENIED_NP)),
            PolicyRule::allow(),
        ],
    }
}

/// A GlobalNetworkPolicy whose rule 0 denies web-c's egress to db-0.
pub fn gnp() -> LabPolicy {
    LabPolicy {
        kind: Kind::GlobalNetworkPolicy,
        namespace: None,
        name: "deny-web-c-egress".into(),
        tier: "default".into(),
        direction: Direction::Egress,
        rules: vec![PolicyRule::deny().to(&net(SERVER)), PolicyRule::allow()],
    }
}

fn pod<'a>(lab: &'a Cluster, p: (&str, &str)) -> Result<&'a ClusterPod, LabError> {
    lab.pods
        .iter()
        .find(|c| c.pod.name == p.0)
        .ok_or_else(|| LabError::Config(format!("no pod {}", p.0)))
}

fn endpoints() -> Vec<LabEndpoint> {
    [
        (SERVER, vec![tiered_np()]),
        (ALLOWED, vec![]),
        (DENIED_NP, vec![]),
        (DENIED_GNP, vec![gnp()]),
    ]
    .into_iter()
    .map(|(p, policies)| LabEndpoint {
        veth: veth_name(NS, p.0),
        namespace: NS.into(),
        policies,
    })
    .collect()
}

impl ScenarioSpec for Policy {
    fn name(&self) -> &'static str {
        "policy"
    }

    fn title(&self) -> &'static str {
        "a tiered Calico NetworkPolicy and a GlobalNetworkPolicy drop two pods' connects to db-0; a third pod is allowed"
    }

    fn expected_cause(&self) -> Option<Cause> {
        Some(Cause::DeniedByPolicy)
    }

    fn expected_verdict(&self) -> Option<Verdict> {
        None
    }

    /// The two-node cluster with the server, the control and the two denied clients on
    /// ce-demo-1 (node 2 keeps its pods).
    fn config(&self) -> ClusterConfig {
        let mut cfg = ClusterConfig::two_nodes();
        cfg.nodes[0].pods = [SERVER, ALLOWED, DENIED_NP, DENIED_GNP]
            .iter()
            .map(|(name, ip)| PodConfig::new(NS, name, ip))
            .collect();
        cfg
    }

    /// Stores the policies in etcd, writes felix's chains for them, then the three clients
    /// connect to the server.
    fn drive(&self, lab: &Cluster) -> Result<TrafficReport, LabError> {
        lab.datastore
            .etcd
            .put_all(&lab.external, &[tiered_np().etcd_kv(), gnp().etcd_kv()])?;
        write_felix_policy(&lab.nodes[0].netns, lab.config.dataplane, &endpoints())?;
        let server = pod(lab, SERVER)?.addr();
        // The denied clients one after the other: drops of both in one counter interval would
        // leave their flows ambiguous (both DROPs are reachable from the server's chains).
        let mut attempts = run_probes(vec![
            Probe::pod(
                "allowed pod -> db-0 (control)",
                lab,
                pod(lab, ALLOWED)?,
                server,
                WORKING,
            ),
            Probe::pod(
                "web-b -> db-0 (tier security denies)",
                lab,
                pod(lab, DENIED_NP)?,
                server,
                BLACKHOLE,
            ),
        ])?;
        attempts.extend(run_probes(vec![Probe::pod(
            "web-c -> db-0 (GlobalNetworkPolicy denies egress)",
            lab,
            pod(lab, DENIED_GNP)?,
            server,
            BLACKHOLE,
        )])?);
        Ok(TrafficReport {
            attempts,
            startup: None,
        })
    }

    /// The control connects; each denied client times out and felix's DROP counters in the
    /// policy's chain moved.
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError> {
        let dp = lab.config.dataplane;
        let n1 = &lab.nodes[0].netns;
        let server = pod(lab, SERVER)?.addr();
        let mut ev = Vec::new();
        let att = run_probes(vec![Probe::pod(
            "control",
            lab,
            pod(lab, ALLOWED)?,
            server,
            WORKING,
        )])?;
        check(att.iter().all(|a| a.ok()), || format!("{}", att[0]))?;
        ev.push(format!("{}", att[0]));
        for (client, p) in [(DENIED_NP, tiered_np()), (DENIED_GNP, gnp())] {
            let chain = p.chain_for(dp);
            let before = drop_packets(n1, dp, &chain)?;
            let att = run_probes(vec![Probe::pod(
                "denied",
                lab,
                pod(lab, client)?,
                server,
                BLACKHOLE,
            )])?;
            check(!att[0].ok(), || {
                format!("{} got through: {}", client.0, att[0])
            })?;
            let after = drop_packets(n1, dp, &chain)?;
            check(after > before, || {
                format!("felix's DROP in {chain} did not move ({before} -> {after}, {dp})")
            })?;
            ev.push(format!(
                "{}; felix's DROP in {chain} ({dp}) counted {} more packet(s)",
                att[0],
                after - before
            ));
        }
        Ok(ev)
    }

    /// The server on ce-demo-1: the denied flows end there.
    fn focus(&self, _lab: &Cluster) -> Option<IpAddr> {
        SERVER.1.parse().ok()
    }
}
