//! Identity from Calico's etcdv3 datastore: a real etcd in the lab holding WorkloadEndpoints
//! and Nodes under Calico's keys, read by the agent with `DATASTORE_TYPE=etcdv3`.
mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use common::{connect_via_vip, has_verdict, json, query, Res, TestResult, READY, VIP};
use tracer_lab::{
    agent::Agent,
    daemon::{poll, Daemon, LabDir},
    etcd::{Etcd, EtcdClient},
    netns::Netns,
    startup::{calico_node, workload_endpoint},
    topo::{SingleNode, POD_NAME, POD_NAMESPACE},
};
use tracer_model::{identity::IdentityHealth, Cause, Endpoint, Verdict};

const NODE: &str = "lab-node";
const MASTER: &str = "lab-master";
/// Keys the non-agent watch waits on.
const WATCHED: &str = "/calico/resources/v3/projectcalico.org/felixconfigurations/";

struct Lab {
    etcd: Option<Etcd>,
    _dir: LabDir,
    lab: SingleNode,
}

/// Seed 002's lab (un-masqueraded pod traffic that is never answered: a diagnosis) with etcd
/// on the master holding the pod's WorkloadEndpoint and both Nodes.
fn lab() -> Res<Lab> {
    let lab = SingleNode::build(&SingleNode::seed_002())?;
    let dir = LabDir::create(&format!("{}-etcd", lab.prefix))?;
    let ip: std::net::IpAddr = lab.config.apiserver_ip.parse()?;
    let etcd = Etcd::start(
        &lab.apiserver,
        &dir,
        "master",
        SocketAddr::new(ip, 2379),
        SocketAddr::new(ip, 2380),
    )?;
    let mut c = EtcdClient::connect(&lab.apiserver, etcd.client, Duration::from_secs(5))?;
    let pod_ip = lab.pod.ip.to_string();
    let (k, v) = workload_endpoint(
        NODE,
        POD_NAMESPACE,
        POD_NAME,
        &pod_ip,
        &lab.pod.veth,
        &[("k8s-app", "calico-kube-controllers")],
    );
    c.put(&k, &v)?;
    for (name, addr) in [
        (NODE, &lab.config.node_ip),
        (MASTER, &lab.config.apiserver_ip),
    ] {
        let (k, v) = calico_node(name, addr);
        c.put(&k, &v)?;
    }
    Ok(Lab {
        etcd: Some(etcd),
        _dir: dir,
        lab,
    })
}

fn start(l: &Lab) -> Res<Agent> {
    let etcd = l.etcd.as_ref().ok_or("etcd gone")?;
    let url = format!("http://{}", etcd.client);
    let mut agent = common::start(
        &l.lab.node,
        &[
            "--no-reply-timeout",
            "2s",
            "--datastore-type",
            "etcdv3",
            "--etcd-endpoints",
            &url,
            "--nodename",
            NODE,
        ],
    )?;
    agent.wait_attached(&l.lab.node, &[l.lab.pod.veth.as_str(), "eth0"], READY)?;
    Ok(agent)
}

fn identity(agent: &Agent, ns: &Netns) -> Res<IdentityHealth> {
    let h = agent.health(ns)?;
    Ok(h.detail.ok_or("no health detail")?.identity)
}

fn wait_identity(
    agent: &Agent,
    ns: &Netns,
    what: &str,
    pred: impl Fn(&IdentityHealth) -> bool,
) -> Res<IdentityHealth> {
    let got = poll(Duration::from_secs(20), Duration::from_millis(100), || {
        identity(agent, ns).ok().filter(|h| pred(h))
    });
    got.ok_or_else(|| format!("identity never {what}: {:?}", identity(agent, ns)).into())
}

fn pod_name(e: &Endpoint) -> Option<String> {
    match e {
        Endpoint::Pod(p) => Some(format!("{}/{}", p.namespace, p.name)),
        _ => None,
    }
}

#[test]
fn flows_and_diagnoses_name_the_pod_and_nodes_from_etcd() -> TestResult {
    let l = lab()?;
    let agent = start(&l)?;
    let h = wait_identity(&agent, &l.lab.node, "synced", |h| {
        h.synced && h.pods == 1 && h.nodes == 2
    })?;
    assert!(!h.stale, "{h:?}");

    assert!(!connect_via_vip(&l.lab)?, "seed 002's VIP never answers");
    let f = agent.wait_flow(
        &l.lab.node,
        &query(&format!("dst={VIP}"))?,
        Duration::from_secs(10),
        |f| has_verdict(f, Verdict::NoReply) && f.diagnosis.is_some(),
    )?;
    let ep = f
        .endpoints
        .as_ref()
        .ok_or("no endpoints with identity on")?;
    let want = format!("{POD_NAMESPACE}/{POD_NAME}");
    assert_eq!(pod_name(&ep.src).as_deref(), Some(want.as_str()), "{ep:?}");
    let Endpoint::Pod(p) = &ep.src else {
        return Err("not a pod".into());
    };
    assert_eq!(p.node.as_deref(), Some(NODE));
    assert_eq!(
        p.labels.get("k8s-app").map(String::as_str),
        Some("calico-kube-controllers")
    );
    assert!(
        !p.labels.keys().any(|k| k.starts_with("projectcalico.org/")),
        "Calico's own labels are not the pod's: {p:?}"
    );
    // etcd holds no Services: the VIP is outside what Calico names; its DNAT target is the
    // master node.
    assert_eq!(ep.dst, Endpoint::External);
    assert_eq!(
        ep.nat_dst.as_ref().and_then(|e| e.name()).as_deref(),
        Some(&*format!("node {MASTER}"))
    );
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert!(d.summary.contains(&want), "{}", d.summary);

    let diag = agent.diagnoses(&l.lab.node)?;
    let g = diag
        .causes
        .iter()
        .find(|g| g.cause == Cause::IppoolOverlapsHostNetwork)
        .ok_or_else(|| format!("no group: {diag:?}"))?;
    assert!(g.summary.contains(&want), "{}", g.summary);
    assert_eq!(
        g.endpoints
            .as_ref()
            .and_then(|e| pod_name(&e.src))
            .as_deref(),
        Some(want.as_str())
    );

    // The metrics split the cause by the pod's namespace and workload (a WorkloadEndpoint
    // records no owner: the pod is its own workload).
    let metrics = agent.get(&l.lab.node, "/metrics")?.text();
    let series = format!(
        "tracer_diagnoses_by_workload_total{{cause=\"ippool_overlaps_host_network\",namespace=\"{POD_NAMESPACE}\",workload_kind=\"Pod\",workload=\"{POD_NAME}\"}} "
    );
    assert!(metrics.contains(&series), "{series} not in {metrics}");

    // namespace= and selector= select by the names.
    let n = |q: &str| -> Res<usize> { Ok(agent.flows(&l.lab.node, &query(q)?)?.matched) };
    assert!(n(&format!("namespace={POD_NAMESPACE}"))? >= 1);
    assert_eq!(n("namespace=default")?, 0);
    assert!(n("selector=k8s-app%3Dcalico-kube-controllers")? >= 1);
    assert!(n("selector=k8s-app+in+%28a%2Ccalico-kube-controllers%29")? >= 1);
    assert_eq!(n("selector=k8s-app%21%3Dcalico-kube-controllers")?, 0);
    for bad in [
        "selector=app+in+web",
        "selector=%3Dx",
        "namespace=Not_A_Namespace",
    ] {
        let r = agent.get(&l.lab.node, &format!("/flows?{bad}"))?;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        let body = json(&r)?;
        assert!(body["error"].is_string(), "{bad}: {body}");
    }
    Ok(())
}

#[test]
fn etcd_going_away_keeps_flows_flowing_and_names_go_stale() -> TestResult {
    let mut l = lab()?;
    let agent = start(&l)?;
    wait_identity(&agent, &l.lab.node, "synced", |h| h.synced && h.pods == 1)?;
    // The datastore goes away mid-run.
    drop(l.etcd.take());
    let h = wait_identity(&agent, &l.lab.node, "stale", |h| h.stale)?;
    assert!(h.error.is_some(), "{h:?}");
    let metrics = agent.get(&l.lab.node, "/metrics")?.text();
    assert!(metrics.contains("tracer_identity_stale 1"), "{metrics}");
    assert!(
        metrics.contains("tracer_identity_objects{kind=\"pod\"} 1"),
        "{metrics}"
    );
    // Flows keep flowing and keep the last known names.
    assert!(!connect_via_vip(&l.lab)?);
    let f = agent.wait_flow(
        &l.lab.node,
        &query(&format!("dst={VIP}"))?,
        Duration::from_secs(10),
        |f| f.endpoints.is_some(),
    )?;
    let ep = f.endpoints.ok_or("no endpoints")?;
    assert_eq!(
        pod_name(&ep.src),
        Some(format!("{POD_NAMESPACE}/{POD_NAME}"))
    );
    Ok(())
}

#[test]
fn a_pod_recreated_with_the_same_address_gets_its_new_name() -> TestResult {
    let l = lab()?;
    let etcd = l.etcd.as_ref().ok_or("etcd gone")?;
    let agent = start(&l)?;
    wait_identity(&agent, &l.lab.node, "synced", |h| h.synced && h.pods == 1)?;
    assert!(!connect_via_vip(&l.lab)?);
    let old = agent.wait_flow(
        &l.lab.node,
        &query(&format!("dst={VIP}"))?,
        Duration::from_secs(10),
        |f| f.endpoints.is_some(),
    )?;
    // Delete the pod's endpoint and create another pod with the same address.
    let mut c = EtcdClient::connect(&l.lab.apiserver, etcd.client, Duration::from_secs(5))?;
    let ip = l.lab.pod.ip.to_string();
    let (old_key, _) = workload_endpoint(NODE, POD_NAMESPACE, POD_NAME, &ip, &l.lab.pod.veth, &[]);
    c.delete(&old_key)?;
    wait_identity(&agent, &l.lab.node, "empty", |h| h.pods == 0)?;
    let (k, v) = workload_endpoint(
        NODE,
        "shop",
        "web-2",
        &ip,
        &l.lab.pod.veth,
        &[("app", "web")],
    );
    c.put(&k, &v)?;
    wait_identity(&agent, &l.lab.node, "refilled", |h| h.pods == 1)?;
    // A new connection (new source port: a new flow).
    std::thread::sleep(Duration::from_millis(50));
    assert!(!connect_via_vip(&l.lab)?);
    let new = agent.wait_flow(
        &l.lab.node,
        &query(&format!("dst={VIP}"))?,
        Duration::from_secs(10),
        |f| f.id != old.id && f.endpoints.is_some(),
    )?;
    let name = |f: &tracer_model::FlowView| f.endpoints.as_ref().and_then(|e| pod_name(&e.src));
    assert_eq!(name(&new).as_deref(), Some("shop/web-2"));
    // The old flow keeps the pod it was.
    let old = agent.flow(&l.lab.node, old.id)?;
    assert_eq!(name(&old), Some(format!("{POD_NAMESPACE}/{POD_NAME}")));
    assert_eq!(
        agent
            .flows(&l.lab.node, &query("namespace=shop")?)?
            .flows
            .iter()
            .map(|f| f.id)
            .collect::<Vec<_>>(),
        vec![new.id]
    );
    Ok(())
}

#[test]
fn identity_off_is_said_and_name_filters_are_refused() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &[])?;
    agent.wait_ready(&lab.node, READY)?;
    let h = identity(&agent, &lab.node)?;
    assert_eq!(h, IdentityHealth::off());
    let r = agent.get(&lab.node, "/flows?namespace=default")?;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(json(&r)?["error"]
        .as_str()
        .is_some_and(|e| e.contains("identity")));
    assert!(!agent
        .get(&lab.node, "/metrics")?
        .text()
        .contains("tracer_identity_"));
    Ok(())
}

/// A long-lived watch that is not the agent's (calico-node's and felix's own, written in Go with
/// etcd's clientv3, as `etcdctl` is) waits for the datastore's next change: that wait is not a
/// slow exchange, however long the datastore stays quiet.
#[test]
fn another_process_idle_etcd_watch_is_not_datastore_latency() -> TestResult {
    let l = lab()?;
    let agent = start(&l)?;
    let etcd = l.etcd.as_ref().ok_or("etcd gone")?;
    let url = format!("http://{}", etcd.client);
    let log = l._dir.join("etcdctl-watch.log");
    let mut watch = Daemon::spawn(
        &l.lab.node,
        "etcdctl-watch",
        Command::new("etcdctl")
            .args(["--endpoints", &url, "watch", "--prefix", WATCHED])
            .env("ETCDCTL_API", "3"),
        &log,
        Duration::from_secs(2),
    )?;
    let mut c = EtcdClient::connect(&l.lab.apiserver, etcd.client, Duration::from_secs(5))?;
    // Changes 1.5 s apart: fifteen times the slow threshold between events.
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(1500));
        c.put(&format!("{WATCHED}key-{i}"), &format!("value-{i}"))?;
    }
    // The watch saw every change (proof it was waiting, not reconnecting).
    let seen = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.matches("value-").count() == 5).then_some(())
    });
    watch.check_running()?;
    seen.ok_or_else(|| format!("etcdctl missed changes: {}", watch.log_tail(20)))?;
    watch.stop();

    let etcd_ip = etcd.client.ip();
    let flows = agent.flows(&l.lab.node, &query(&format!("dst={etcd_ip}&port=2379"))?)?;
    // etcdctl's connection was traced, its turns timed (each event and the client's answer to
    // it, gRPC's flow-control ping), and the quiet between events is no exchange.
    assert!(
        flows
            .flows
            .iter()
            .any(|f| f.exchanges.as_ref().is_some_and(|e| e.count >= 5)),
        "{flows:#?}"
    );
    assert!(
        flows.flows.iter().all(|f| f
            .diagnosis
            .as_ref()
            .is_none_or(|d| d.cause != Cause::DatastoreLatency)),
        "{flows:#?}"
    );
    Ok(())
}
