//! Identity from the Kubernetes API (`DATASTORE_TYPE=kubernetes`): the agent's production
//! kube-rs code reads pods, Services and Nodes from the lab's Kubernetes API **stand-in**
//! (`tracer_lab::kube`; no kube-apiserver installs here) through a kubeconfig pointing at it.
mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{connect_via_vip, has_verdict, query, Res, TestResult, READY, VIP};
use tracer_lab::{
    agent::Agent,
    daemon::poll,
    kube::{self, KubeStandin, Store},
    netns::Netns,
    topo::{SingleNode, POD_NAME, POD_NAMESPACE},
};
use tracer_model::{identity::IdentityHealth, Endpoint, FlowView, Verdict};

const NODE: &str = "lab-node";
const MASTER: &str = "lab-master";
const STANDIN_PORT: u16 = 8080;

struct Lab {
    standin: Option<KubeStandin>,
    store: Arc<Store>,
    kubeconfig: std::path::PathBuf,
    lab: SingleNode,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The healthy lab (pod -> Service VIP, DNAT to the master, SNAT to the node) and the
/// stand-in on the master holding the pod, a pod of another node, the Service and both nodes.
fn lab() -> Res<Lab> {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let store = Store::new();
    let pod_ip = lab.pod.ip.to_string();
    store.apply(
        "pods",
        kube::pod(
            POD_NAMESPACE,
            POD_NAME,
            NODE,
            &pod_ip,
            &[("k8s-app", "calico-kube-controllers")],
            Some(("ReplicaSet", "calico-kube-controllers-596576f79")),
        ),
    )?;
    store.apply(
        "pods",
        kube::pod("shop", "elsewhere", "other-node", "10.244.9.9", &[], None),
    )?;
    store.apply("services", kube::service("default", "kubernetes", VIP, 443))?;
    store.apply("nodes", kube::node(NODE, &lab.config.node_ip))?;
    store.apply("nodes", kube::node(MASTER, &lab.config.apiserver_ip))?;
    let addr = SocketAddr::new(lab.config.apiserver_ip.parse()?, STANDIN_PORT);
    let standin = KubeStandin::start(&lab.apiserver, addr, Arc::clone(&store))?;
    let kubeconfig = std::env::temp_dir().join(format!("tracer-kubeconfig-{}", lab.prefix));
    std::fs::write(&kubeconfig, standin.kubeconfig("default"))?;
    Ok(Lab {
        standin: Some(standin),
        store,
        kubeconfig,
        lab,
    })
}

fn start(l: &Lab) -> Res<Agent> {
    let kc = l.kubeconfig.display().to_string();
    let mut agent = common::start(
        &l.lab.node,
        &[
            "--datastore-type",
            "kubernetes",
            "--kubeconfig",
            &kc,
            "--nodename",
            NODE,
        ],
    )?;
    agent.wait_attached(&l.lab.node, &[l.lab.pod.veth.as_str(), "eth0"], READY)?;
    Ok(agent)
}

fn identity(agent: &Agent, ns: &Netns) -> Res<IdentityHealth> {
    Ok(agent.health(ns)?.detail.ok_or("no health detail")?.identity)
}

fn wait_identity(
    agent: &Agent,
    ns: &Netns,
    what: &str,
    pred: impl Fn(&IdentityHealth) -> bool,
) -> Res<IdentityHealth> {
    poll(Duration::from_secs(20), Duration::from_millis(100), || {
        identity(agent, ns).ok().filter(|h| pred(h))
    })
    .ok_or_else(|| format!("identity never {what}: {:?}", identity(agent, ns)).into())
}

fn synced(h: &IdentityHealth) -> bool {
    h.synced && !h.stale && h.pods == 1 && h.services == 1 && h.nodes == 2
}

fn src_pod(f: &FlowView) -> Option<String> {
    match &f.endpoints.as_ref()?.src {
        Endpoint::Pod(p) => Some(format!("{}/{}", p.namespace, p.name)),
        _ => None,
    }
}

fn vip_flow(agent: &Agent, l: &Lab, not: Option<u64>) -> Res<FlowView> {
    assert!(connect_via_vip(&l.lab)?, "the healthy lab's VIP answers");
    Ok(agent.wait_flow(
        &l.lab.node,
        &query(&format!("dst={VIP}&proto=tcp"))?,
        Duration::from_secs(10),
        |f| has_verdict(f, Verdict::Replied) && Some(f.id) != not && f.endpoints.is_some(),
    )?)
}

#[test]
fn flows_name_the_pod_its_workload_the_service_and_the_nodes() -> TestResult {
    let l = lab()?;
    let agent = start(&l)?;
    // Only this node's pod: the field selector spec.nodeName left the other node's out.
    wait_identity(&agent, &l.lab.node, "synced", synced)?;

    let f = vip_flow(&agent, &l, None)?;
    let ep = f.endpoints.as_ref().ok_or("no endpoints")?;
    let Endpoint::Pod(p) = &ep.src else {
        return Err(format!("source not a pod: {ep:?}").into());
    };
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str()),
        (POD_NAMESPACE, POD_NAME)
    );
    let w = p.workload.as_ref().ok_or("no workload")?;
    assert_eq!(
        (w.kind.as_str(), w.name.as_str()),
        ("ReplicaSet", "calico-kube-controllers-596576f79")
    );
    assert_eq!(p.node.as_deref(), Some(NODE));
    let Endpoint::Service(s) = &ep.dst else {
        return Err(format!("destination not a Service: {ep:?}").into());
    };
    assert_eq!(
        (s.namespace.as_str(), s.name.as_str()),
        ("default", "kubernetes")
    );
    assert_eq!(s.cluster_ip.map(|i| i.to_string()).as_deref(), Some(VIP));
    // SNAT to this node's address, DNAT to the master's.
    assert_eq!(
        ep.nat_src.as_ref().and_then(Endpoint::name),
        Some(format!("node {NODE}"))
    );
    assert_eq!(
        ep.nat_dst.as_ref().and_then(Endpoint::name),
        Some(format!("node {MASTER}"))
    );

    let n = |q: &str| -> Res<usize> { Ok(agent.flows(&l.lab.node, &query(q)?)?.matched) };
    // The Service puts the flow in `default` too.
    assert!(n(&format!("namespace={POD_NAMESPACE}&dst={VIP}"))? >= 1);
    assert!(n(&format!("namespace=default&dst={VIP}"))? >= 1);
    assert_eq!(n("namespace=shop")?, 0);
    assert!(n("selector=k8s-app%3Dcalico-kube-controllers")? >= 1);
    assert_eq!(n("selector=k8s-app%3Dother")?, 0);
    Ok(())
}

#[test]
fn an_expired_watch_relists() -> TestResult {
    let l = lab()?;
    let agent = start(&l)?;
    wait_identity(&agent, &l.lab.node, "synced", synced)?;
    // Bookmarks flow while the watch is open.
    std::thread::sleep(Duration::from_millis(1500));
    let lists = l.store.lists("pods");
    l.store.expire_watches();
    // The client's re-watch from the version it had is answered 410 Gone...
    poll(Duration::from_secs(10), Duration::from_millis(20), || {
        (l.store.expired("pods") > 0).then_some(())
    })
    .ok_or("the pods re-watch was never answered 410 Gone")?;
    // ...so a pod created now reaches it only through a relist.
    l.store.apply(
        "pods",
        kube::pod(
            "shop",
            "late",
            NODE,
            "10.244.1.77",
            &[("app", "late")],
            None,
        ),
    )?;
    wait_identity(&agent, &l.lab.node, "relisted and fresh", |h| {
        h.pods == 2 && !h.stale
    })?;
    assert!(
        l.store.lists("pods") > lists,
        "410 Gone must make the client relist ({} lists before, {} after)",
        lists,
        l.store.lists("pods")
    );
    Ok(())
}

#[test]
fn the_api_server_going_away_keeps_flows_flowing_and_names_go_stale() -> TestResult {
    let mut l = lab()?;
    let agent = start(&l)?;
    wait_identity(&agent, &l.lab.node, "synced", synced)?;
    drop(l.standin.take());
    let h = wait_identity(&agent, &l.lab.node, "stale", |h| h.stale)?;
    assert!(h.error.is_some() && h.pods == 1, "{h:?}");
    let metrics = agent.get(&l.lab.node, "/metrics")?.text();
    assert!(metrics.contains("tracer_identity_stale 1"), "{metrics}");
    assert!(
        metrics.contains("tracer_identity_last_sync_age_seconds"),
        "{metrics}"
    );
    // The data path does not wait on the datastore: flows still come, with the last names.
    let f = vip_flow(&agent, &l, None)?;
    assert_eq!(src_pod(&f), Some(format!("{POD_NAMESPACE}/{POD_NAME}")));
    // Back again: fresh.
    let addr = SocketAddr::new(l.lab.config.apiserver_ip.parse()?, STANDIN_PORT);
    l.standin = Some(KubeStandin::start(
        &l.lab.apiserver,
        addr,
        Arc::clone(&l.store),
    )?);
    wait_identity(&agent, &l.lab.node, "fresh again", |h| !h.stale)?;
    Ok(())
}

#[test]
fn a_pod_recreated_with_the_same_address_is_never_given_the_old_name() -> TestResult {
    let l = lab()?;
    let agent = start(&l)?;
    wait_identity(&agent, &l.lab.node, "synced", synced)?;
    let old = vip_flow(&agent, &l, None)?;
    l.store.delete("pods", POD_NAMESPACE, POD_NAME);
    wait_identity(&agent, &l.lab.node, "without the pod", |h| h.pods == 0)?;
    let ip = l.lab.pod.ip.to_string();
    l.store.apply(
        "pods",
        kube::pod("shop", "web-2", NODE, &ip, &[("app", "web")], None),
    )?;
    wait_identity(&agent, &l.lab.node, "with the new pod", |h| h.pods == 1)?;
    let new = vip_flow(&agent, &l, Some(old.id))?;
    assert_eq!(src_pod(&new).as_deref(), Some("shop/web-2"));
    let old = agent.flow(&l.lab.node, old.id)?;
    assert_eq!(src_pod(&old), Some(format!("{POD_NAMESPACE}/{POD_NAME}")));
    Ok(())
}

#[test]
fn a_kubeconfig_list_that_is_completed_after_start_is_merged_and_picked_up() -> TestResult {
    let l = lab()?;
    // KUBECONFIG as kubectl users split it: contexts/users in one file, the cluster in another
    // that does not exist yet when the agent starts (a volume mounted late).
    let full = std::fs::read_to_string(&l.kubeconfig)?;
    let (head, users) = full
        .split_once("users:\n")
        .ok_or("stand-in kubeconfig without users")?;
    let (clusters, contexts) = head
        .split_once("contexts:\n")
        .ok_or("stand-in kubeconfig without contexts")?;
    let late = l.kubeconfig.with_extension("clusters");
    let first = l.kubeconfig.with_extension("contexts");
    std::fs::write(
        &first,
        format!("apiVersion: v1\nkind: Config\ncontexts:\n{contexts}users:\n{users}"),
    )?;
    let _ = std::fs::remove_file(&late);
    let list = format!("{}:{}", first.display(), late.display());
    let agent = common::start(
        &l.lab.node,
        &[
            "--datastore-type",
            "kubernetes",
            "--kubeconfig",
            &list,
            "--nodename",
            NODE,
        ],
    )?;
    let h = wait_identity(&agent, &l.lab.node, "failing", |h| h.error.is_some())?;
    assert!(!h.synced, "{h:?}");
    std::fs::write(&late, clusters)?;
    let synced = wait_identity(&agent, &l.lab.node, "synced", synced);
    let _ = std::fs::remove_file(&late);
    let _ = std::fs::remove_file(&first);
    synced?;
    Ok(())
}
