//! Issue 17 §2, which Calico policy dropped a flow: felix-style policy chains
//! (`tracer_lab::policy`, in felix's iptables dataplane and again in its nftables one) on node 1 of the two-node lab, the policy objects in the
//! lab's real etcd, and the real agent reading both. Three policies, each denying one client pod
//! while another client pod is allowed:
//! - a Kubernetes NetworkPolicy (in etcd as kube-controllers writes it, `knp.default.<name>`)
//!   allowing only the allowed client: the denied one hits felix's end of tier `default`;
//! - a Calico NetworkPolicy in tier `security` with an explicit Deny as its rule 1;
//! - a GlobalNetworkPolicy denying one client's egress with its rule 0.
//!
//! The denied flow must be `denied_by_policy` naming tier, policy, direction and rule; the
//! allowed flow must not be blamed; without a datastore the drop stays a `kernel_drop` whose
//! evidence says the policy is missing. The drop itself is checked without tracer: the client's
//! connect times out and felix's rule counter moved (read with iptables or nft -j, not with
//! tracer's reader).
//!
//! With `DATASTORE_TYPE=kubernetes` the same policies come from the Kubernetes API **stand-in**
//! (`tracer_lab::kube`; no kube-apiserver installs here): the Kubernetes NetworkPolicy as
//! networking.k8s.io/v1 (felix's `KubernetesNetworkPolicy`, chain id `knp/<ns>/<name>`), the
//! Calico ones as crd.projectcalico.org/v1 CRDs. While the cluster does not serve Calico's CRDs
//! the Kubernetes NetworkPolicy is still named and /healthz says which kinds are unavailable.
mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{query, Agent, Res, TestResult, READY};
use tracer_lab::scenario::policy::{
    gnp, net, tiered_np, ALLOWED, DENIED_GNP, DENIED_NP, NS, SERVER,
};
use tracer_lab::{
    calico::{veth_name, Dataplane as LabDataplane},
    netns::Netns,
    policy::{
        drop_packets, write_felix_policy, Direction, Kind, LabEndpoint, LabPolicy, PolicyRule,
        NFT_FILTER,
    },
    topo::{Cluster, ClusterConfig, PodConfig},
    traffic::tcp_probe,
};
use tracer_lab::{
    daemon::poll,
    kube::{self, KubeStandin, Store, CALICO_CRD_GROUP},
};
use tracer_model::{
    diagnosis::{PolicyAction, PolicyDirection},
    Cause, Evidence, FlowView,
};

const DENIED_KNP: (&str, &str) = ("web-a", "10.244.142.36");

fn config(dp: LabDataplane) -> ClusterConfig {
    let mut cfg = ClusterConfig::two_nodes();
    cfg.dataplane = dp;
    cfg.nodes[0].pods = [SERVER, ALLOWED, DENIED_KNP, DENIED_NP, DENIED_GNP]
        .iter()
        .map(|(name, ip)| PodConfig::new(NS, name, ip))
        .collect();
    cfg
}

fn veth(pod: (&str, &str)) -> String {
    veth_name(NS, pod.0)
}

fn ns_of<'a>(lab: &'a Cluster, pod: (&str, &str)) -> Res<&'a Netns> {
    Ok(lab
        .pods
        .iter()
        .find(|p| p.pod.name == pod.0)
        .ok_or_else(|| format!("no pod {}", pod.0))?
        .netns())
}

fn server_addr(lab: &Cluster) -> Res<SocketAddr> {
    Ok(SocketAddr::new(SERVER.1.parse()?, lab.config.pod_port))
}

/// The endpoints of node 1 with `server_in` on the server's ingress and `egress` on the GNP
/// client's egress.
fn endpoints(server_in: Vec<LabPolicy>, egress: Vec<LabPolicy>) -> Vec<LabEndpoint> {
    let mut out = vec![LabEndpoint {
        veth: veth(SERVER),
        namespace: NS.into(),
        policies: server_in,
    }];
    for c in [ALLOWED, DENIED_KNP, DENIED_NP] {
        out.push(LabEndpoint {
            veth: veth(c),
            namespace: NS.into(),
            policies: vec![],
        });
    }
    out.push(LabEndpoint {
        veth: veth(DENIED_GNP),
        namespace: NS.into(),
        policies: egress,
    });
    out
}

fn knp() -> LabPolicy {
    LabPolicy {
        kind: Kind::NetworkPolicy,
        namespace: Some(NS.into()),
        name: "knp.default.allow-web".into(),
        tier: "default".into(),
        direction: Direction::Ingress,
        rules: vec![PolicyRule::allow()
            .from(&net(ALLOWED))
            .port(tracer_lab::topo::ClusterConfig::two_nodes().pod_port)],
    }
}

fn put(lab: &Cluster, p: &LabPolicy) -> Res<()> {
    lab.datastore.etcd.put_all(&lab.external, &[p.etcd_kv()])?;
    Ok(())
}

fn start(lab: &Cluster, datastore: bool) -> Res<Agent> {
    let n1 = &lab.nodes[0];
    let url = format!("http://{}", lab.etcd_endpoint());
    let mut args = vec!["--no-reply-timeout", "2s"];
    if datastore {
        args.extend([
            "--datastore-type",
            "etcdv3",
            "--etcd-endpoints",
            &url,
            "--nodename",
            &n1.name,
        ]);
    }
    let mut a = common::start(&n1.netns, &args)?;
    a.wait_attached(&n1.netns, &[veth(SERVER).as_str()], READY)?;
    Ok(a)
}

/// `client` connects to the server: true when it got through (checked without tracer).
fn connect(lab: &Cluster, client: (&str, &str)) -> Res<bool> {
    Ok(tcp_probe(
        ns_of(lab, client)?,
        server_addr(lab)?,
        Duration::from_millis(1500),
    )?)
}

fn flow_of(agent: &Agent, lab: &Cluster, client: (&str, &str), cause: Cause) -> Res<FlowView> {
    Ok(agent.wait_flow(
        &lab.nodes[0].netns,
        &query(&format!("src={}/32&dst={}/32", client.1, SERVER.1))?,
        Duration::from_secs(10),
        |f| f.diagnosis.as_ref().is_some_and(|d| d.cause == cause),
    )?)
}

fn hit(f: &FlowView) -> Res<tracer_model::diagnosis::PolicyHit> {
    match f.diagnosis.as_ref().map(|d| &d.evidence) {
        Some(Evidence::DeniedByPolicy(e)) => Ok(e.policy.clone()),
        other => Err(format!("not denied_by_policy: {other:?}").into()),
    }
}

/// The allowed client got through, and its flow is blamed on nothing.
fn allowed_is_not_blamed(agent: &Agent, lab: &Cluster) -> TestResult {
    assert!(connect(lab, ALLOWED)?, "the allowed client is let through");
    common::none_blamed(agent, &lab.nodes[0].netns, ALLOWED.1)
}

/// felix's DROP counters of `chain` in node 1, summed: the drop is felix's, seen without
/// tracer.
fn drops_in(lab: &Cluster, dp: LabDataplane, chain: &str) -> Res<u64> {
    Ok(drop_packets(&lab.nodes[0].netns, dp, chain)?)
}

/// The chain as the node lists it: nftables mode prefixes felix's filter chains.
fn listed(dp: LabDataplane, chain: &str) -> String {
    match dp {
        LabDataplane::Iptables => chain.to_string(),
        LabDataplane::Nftables => format!("{NFT_FILTER}{chain}"),
    }
}

#[test]
fn denied_flows_name_the_policy_and_the_allowed_flow_is_not_blamed() -> TestResult {
    denied_and_allowed(LabDataplane::Iptables)
}

#[test]
fn denied_flows_name_the_policy_in_the_nftables_dataplane() -> TestResult {
    denied_and_allowed(LabDataplane::Nftables)
}

fn denied_and_allowed(dp: LabDataplane) -> TestResult {
    let lab = Cluster::build(&config(dp))?;
    let agent = start(&lab, true)?;
    let n1 = &lab.nodes[0].netns;

    // (a) A Kubernetes NetworkPolicy selecting the server allows only the allowed client: the
    // other one falls off the end of tier "default".
    put(&lab, &knp())?;
    write_felix_policy(n1, dp, &endpoints(vec![knp()], vec![]))?;
    assert!(!connect(&lab, DENIED_KNP)?, "the KNP drops web-a");
    let tw = format!("cali-tw-{}", veth(SERVER));
    assert!(
        drops_in(&lab, dp, &tw)? > 0,
        "felix's end-of-tier DROP moved"
    );
    let f = flow_of(&agent, &lab, DENIED_KNP, Cause::DeniedByPolicy)?;
    let h = hit(&f)?;
    assert_eq!(h.action, PolicyAction::EndOfTier, "{h:?}");
    assert_eq!(h.tier.as_deref(), Some("default"));
    assert_eq!(h.direction, PolicyDirection::Ingress);
    assert_eq!(h.chain, listed(dp, &tw));
    assert_eq!(
        h.policies,
        [format!("NetworkPolicy {NS}/knp.default.allow-web")]
    );
    allowed_is_not_blamed(&agent, &lab)?;

    // (b) A Calico NetworkPolicy in tier "security": its rule 1 denies web-b.
    put(&lab, &tiered_np())?;
    write_felix_policy(n1, dp, &endpoints(vec![tiered_np()], vec![]))?;
    assert!(!connect(&lab, DENIED_NP)?, "the tiered policy drops web-b");
    let np_chain = tiered_np().chain_for(dp);
    assert!(drops_in(&lab, dp, &np_chain)? > 0);
    let f = flow_of(&agent, &lab, DENIED_NP, Cause::DeniedByPolicy)?;
    let h = hit(&f)?;
    assert_eq!(h.action, PolicyAction::Deny, "{h:?}");
    assert_eq!(h.kind.as_deref(), Some("NetworkPolicy"));
    assert_eq!(h.namespace.as_deref(), Some(NS));
    assert_eq!(h.name.as_deref(), Some("security.deny-web-b"));
    assert_eq!(h.tier.as_deref(), Some("security"));
    assert_eq!(h.direction, PolicyDirection::Ingress);
    assert_eq!(h.rule_index, Some(1), "{h:?}");
    assert_eq!(h.chain, listed(dp, &np_chain));
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert!(d.fix.contains("security.deny-web-b"), "{}", d.fix);
    allowed_is_not_blamed(&agent, &lab)?;

    // (c) A GlobalNetworkPolicy denies web-c's egress with its rule 0.
    put(&lab, &gnp())?;
    write_felix_policy(n1, dp, &endpoints(vec![], vec![gnp()]))?;
    assert!(!connect(&lab, DENIED_GNP)?, "the GNP drops web-c");
    assert!(drops_in(&lab, dp, &gnp().chain_for(dp))? > 0);
    let f = flow_of(&agent, &lab, DENIED_GNP, Cause::DeniedByPolicy)?;
    let h = hit(&f)?;
    assert_eq!(h.action, PolicyAction::Deny, "{h:?}");
    assert_eq!(h.kind.as_deref(), Some("GlobalNetworkPolicy"));
    assert_eq!(h.namespace, None);
    assert_eq!(h.name.as_deref(), Some("deny-web-c-egress"));
    assert_eq!(h.direction, PolicyDirection::Egress);
    assert_eq!(h.rule_index, Some(0));
    allowed_is_not_blamed(&agent, &lab)?;

    let diag = agent.diagnoses(n1)?;
    let g = diag
        .causes
        .iter()
        .find(|g| g.cause == Cause::DeniedByPolicy)
        .ok_or_else(|| format!("no denied_by_policy group: {diag:?}"))?;
    // felix rewrote the chains since (a) and (b): their drops are still attributed by the
    // chains as they were then.
    assert!(g.count >= 3, "{g:?}");
    drop(agent);

    // Without a datastore: the same drop stays a kernel drop, the policy said missing.
    let agent = start(&lab, false)?;
    assert!(!connect(&lab, DENIED_GNP)?);
    let f = flow_of(&agent, &lab, DENIED_GNP, Cause::KernelDrop)?;
    match f.diagnosis.as_ref().map(|d| &d.evidence) {
        Some(Evidence::KernelDrop(e)) => {
            let p = e
                .policy
                .as_ref()
                .ok_or("no policy lookup in the evidence")?;
            assert!(
                p.missing.iter().any(|m| m.contains("no datastore")),
                "{p:?}"
            );
        }
        other => return Err(format!("not a kernel drop: {other:?}").into()),
    }
    Ok(())
}

/// The Kubernetes datastore of the lab: the stand-in on the external host, and a kubeconfig
/// pointing at it.
struct Kdd {
    store: Arc<Store>,
    _standin: KubeStandin,
    kubeconfig: std::path::PathBuf,
}

impl Drop for Kdd {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

const STANDIN_PORT: u16 = 18080;

fn kdd(lab: &Cluster) -> Res<Kdd> {
    let store = Store::new();
    let addr = SocketAddr::new(lab.config.external_ip.parse()?, STANDIN_PORT);
    let standin = KubeStandin::start(&lab.external, addr, Arc::clone(&store))?;
    let kubeconfig = std::env::temp_dir().join(format!("tracer-kubeconfig-{}", lab.prefix));
    std::fs::write(&kubeconfig, standin.kubeconfig("default"))?;
    Ok(Kdd {
        store,
        _standin: standin,
        kubeconfig,
    })
}

fn start_kdd(lab: &Cluster, kdd: &Kdd) -> Res<Agent> {
    let n1 = &lab.nodes[0];
    let kc = kdd.kubeconfig.display().to_string();
    let args = [
        "--no-reply-timeout",
        "2s",
        "--datastore-type",
        "kubernetes",
        "--kubeconfig",
        &kc,
        "--nodename",
        &n1.name,
    ];
    let mut a = common::start(&n1.netns, &args)?;
    a.wait_attached(&n1.netns, &[veth(SERVER).as_str()], READY)?;
    Ok(a)
}

fn put_kdd(kdd: &Kdd, p: &LabPolicy) -> Res<()> {
    let (resource, obj) = kube::policy_object(p)?;
    kdd.store.apply(resource, obj)?;
    Ok(())
}

/// The Kubernetes NetworkPolicy as felix reads it from the Kubernetes API.
fn knp_kdd() -> LabPolicy {
    LabPolicy {
        kind: Kind::KubernetesNetworkPolicy,
        name: "allow-web".into(),
        ..knp()
    }
}

fn identity_unavailable(agent: &Agent, lab: &Cluster) -> Res<Vec<String>> {
    let h = agent
        .health(&lab.nodes[0].netns)?
        .detail
        .ok_or("no health detail")?
        .identity;
    assert!(!h.stale, "a kind not served is no staleness: {h:?}");
    Ok(h.unavailable)
}

#[test]
fn kubernetes_datastore_names_the_policies_and_says_when_calicos_crds_are_missing() -> TestResult {
    let lab = Cluster::build(&config(LabDataplane::Iptables))?;
    let kdd = kdd(&lab)?;
    // Calico's CRDs are not installed yet: their paths are 404s.
    kdd.store.serve_group(CALICO_CRD_GROUP, false);
    let agent = start_kdd(&lab, &kdd)?;
    let n1 = &lab.nodes[0].netns;
    let unavailable = poll(Duration::from_secs(20), Duration::from_millis(200), || {
        identity_unavailable(&agent, &lab)
            .ok()
            .filter(|u| u.len() == 2)
    })
    .ok_or_else(|| {
        format!(
            "/healthz never said the CRDs are missing: {:?}",
            identity_unavailable(&agent, &lab)
        )
    })?;
    assert!(
        unavailable[0].starts_with("globalnetworkpolicies.crd.projectcalico.org: ")
            && unavailable[1].starts_with("networkpolicies.crd.projectcalico.org: ")
            && unavailable.iter().all(|u| u.contains("404")),
        "{unavailable:?}"
    );

    // (a) The Kubernetes NetworkPolicy is still named: felix's end of tier "default".
    put_kdd(&kdd, &knp_kdd())?;
    write_felix_policy(
        n1,
        LabDataplane::Iptables,
        &endpoints(vec![knp_kdd()], vec![]),
    )?;
    assert!(!connect(&lab, DENIED_KNP)?, "the KNP drops web-a");
    let tw = format!("cali-tw-{}", veth(SERVER));
    assert!(
        drops_in(&lab, LabDataplane::Iptables, &tw)? > 0,
        "felix's end-of-tier DROP moved"
    );
    let f = flow_of(&agent, &lab, DENIED_KNP, Cause::DeniedByPolicy)?;
    let h = hit(&f)?;
    assert_eq!(h.action, PolicyAction::EndOfTier, "{h:?}");
    assert_eq!(h.tier.as_deref(), Some("default"));
    assert_eq!(h.chain, tw);
    assert_eq!(
        h.policies,
        [format!("KubernetesNetworkPolicy {NS}/allow-web")],
        "{h:?}"
    );
    allowed_is_not_blamed(&agent, &lab)?;

    // Calico's CRDs get installed: the agent's retry picks them up.
    kdd.store.serve_group(CALICO_CRD_GROUP, true);
    poll(Duration::from_secs(45), Duration::from_millis(200), || {
        identity_unavailable(&agent, &lab)
            .ok()
            .filter(|u| u.is_empty())
    })
    .ok_or("the CRDs stayed unavailable")?;

    // (b) A Calico NetworkPolicy CRD in tier "security": its rule 1 denies web-b.
    put_kdd(&kdd, &tiered_np())?;
    write_felix_policy(
        n1,
        LabDataplane::Iptables,
        &endpoints(vec![tiered_np()], vec![]),
    )?;
    assert!(!connect(&lab, DENIED_NP)?, "the tiered policy drops web-b");
    let f = flow_of(&agent, &lab, DENIED_NP, Cause::DeniedByPolicy)?;
    let h = hit(&f)?;
    assert_eq!(h.action, PolicyAction::Deny, "{h:?}");
    assert_eq!(h.kind.as_deref(), Some("NetworkPolicy"));
    assert_eq!(h.name.as_deref(), Some("security.deny-web-b"));
    assert_eq!(h.tier.as_deref(), Some("security"));
    assert_eq!(h.rule_index, Some(1), "{h:?}");
    assert_eq!(h.chain, tiered_np().chain());
    allowed_is_not_blamed(&agent, &lab)?;

    // (c) A GlobalNetworkPolicy CRD denies web-c's egress with its rule 0.
    put_kdd(&kdd, &gnp())?;
    write_felix_policy(n1, LabDataplane::Iptables, &endpoints(vec![], vec![gnp()]))?;
    assert!(!connect(&lab, DENIED_GNP)?, "the GNP drops web-c");
    let f = flow_of(&agent, &lab, DENIED_GNP, Cause::DeniedByPolicy)?;
    let h = hit(&f)?;
    assert_eq!(h.action, PolicyAction::Deny, "{h:?}");
    assert_eq!(h.kind.as_deref(), Some("GlobalNetworkPolicy"));
    assert_eq!(h.name.as_deref(), Some("deny-web-c-egress"));
    assert_eq!(h.direction, PolicyDirection::Egress);
    assert_eq!(h.rule_index, Some(0));
    allowed_is_not_blamed(&agent, &lab)?;
    Ok(())
}
