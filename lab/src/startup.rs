//! Calico's keys in the lab's etcd, and a stand-in for calico-node's start-up that reads them
//! as Calico does (seed 001). No calico-node runs here: the stand-in makes the same sequence
//! of datastore requests, in the same order, one request per exchange, as
//! `node/pkg/lifecycle/startup/startup.go` (v3.32, etcdv3) or calico 2.6.5's
//! `calico_node/startup/startup.go` with libcalico-go v1.7 (etcdv2) for a node joining the
//! cluster, and counts and times them. Counts are [`ReadPattern`]'s, shared with tracer.
//!
//! Stand-in differences: it speaks etcd's v3 JSON gateway over HTTP/1.1 (calico v3 uses gRPC,
//! calico 2.x etcd's v2 HTTP API; both one request and one answer per operation), without TLS,
//! and always takes the joining-node path whatever an earlier run wrote.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracer_model::startup::{Outcome, ProbeBudget, ReadPattern};

use crate::etcd::EtcdClient;
use crate::netns::Netns;
use crate::LabError;

/// Where Calico v3 keeps a resource in etcd (`libcalico-go/lib/backend/model/resource.go`).
pub const V3_PREFIX: &str = "/calico/resources/v3/projectcalico.org";

/// `/calico/resources/v3/projectcalico.org/<plural>/[<namespace>/]<name>`.
pub fn v3_key(plural: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{V3_PREFIX}/{plural}/{ns}/{name}"),
        None => format!("{V3_PREFIX}/{plural}/{name}"),
    }
}

/// A WorkloadEndpoint's name as libcalico-go computes it (`lib/names/workloadendpoint.go`):
/// `<node>-<orchestrator>-<pod>-<endpoint>` with every `-` inside a part doubled.
pub fn wep_name(node: &str, pod: &str) -> String {
    [node, "k8s", pod, "eth0"]
        .iter()
        .map(|p| p.replace('-', "--"))
        .collect::<Vec<_>>()
        .join("-")
}

/// A Kubernetes pod's WorkloadEndpoint as Calico's etcdv3 backend stores it (key, JSON): the
/// pod's labels plus the three Calico adds, the k8s profiles, the veth name.
pub fn workload_endpoint(
    node: &str,
    namespace: &str,
    pod: &str,
    ip: &str,
    iface: &str,
    labels: &[(&str, &str)],
) -> (String, String) {
    let name = wep_name(node, pod);
    let mut l: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    l.insert(
        "projectcalico.org/namespace".into(),
        serde_json::json!(namespace),
    );
    l.insert(
        "projectcalico.org/orchestrator".into(),
        serde_json::json!("k8s"),
    );
    l.insert(
        "projectcalico.org/serviceaccount".into(),
        serde_json::json!("default"),
    );
    let value = serde_json::json!({
        "kind": "WorkloadEndpoint",
        "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": name, "namespace": namespace, "labels": l,
            "uid": "5b1e2c3d-0000-4000-8000-000000000001",
            "creationTimestamp": "2026-11-27T00:00:00Z"},
        "spec": {"orchestrator": "k8s", "node": node, "containerID": "0123456789abcdef",
            "pod": pod, "endpoint": "eth0", "serviceAccountName": "default",
            "ipNetworks": [format!("{ip}/32")],
            "profiles": [format!("kns.{namespace}"), format!("ksa.{namespace}.default")],
            "interfaceName": iface},
    });
    (
        v3_key("workloadendpoints", Some(namespace), &name),
        value.to_string(),
    )
}

/// A Calico Node resource (key, JSON) with its BGP address.
pub fn calico_node(name: &str, ipv4: &str) -> (String, String) {
    (
        v3_key("nodes", None, name),
        resource(
            "Node",
            name,
            3000,
            serde_json::json!({"bgp": {"ipv4Address": format!("{ipv4}/24")},
                "orchRefs": [{"nodeName": name, "orchestrator": "k8s"}]}),
        ),
    )
}

/// Seed 001's cluster: 53 nodes in four AWS regions.
pub const SEED_001_NODES: u32 = 53;

/// Host names like the seed's (`AMZ-IAD12-OpsResPool-13-33`).
pub fn seed_001_hosts(n: u32) -> Vec<String> {
    const REGIONS: [&str; 4] = ["AMZ-SIN8", "AMZ-IAD12", "AMZ-OR39", "AMZ-NRT3"];
    (0..n as usize)
        .map(|i| format!("{}-OpsResPool-{}-{}", REGIONS[i % 4], 13 + i / 4, 31 + i))
        .collect()
}

fn host_ip(i: usize) -> String {
    format!("10.12.{}.{}", 13 + i / 200, 10 + i % 200)
}

/// A resource as Calico's etcdv3 backend stores it: the v3 object's JSON.
fn resource(kind: &str, name: &str, uid: usize, spec: serde_json::Value) -> String {
    serde_json::json!({
        "kind": kind,
        "apiVersion": "projectcalico.org/v3",
        "metadata": {
            "name": name,
            "uid": format!("00000000-0000-4000-8000-{uid:012x}"),
            "creationTimestamp": "2018-10-31T07:00:00Z",
        },
        "spec": spec,
    })
    .to_string()
}

/// Calico v3's keys for a cluster of `hosts` (names lower-cased, as v3 requires): nodes,
/// per-node FelixConfigurations, the pool, ClusterInformation, the global Felix and BGP
/// configurations and the three tiers. Block affinities stay in the v1 IPAM tree on etcd
/// (`/calico/ipam/v2/host/...`), which is why start-up's affinity List finds none there.
pub fn v3_layout(hosts: &[String]) -> Vec<(String, String)> {
    let mut kvs = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let name = h.to_lowercase();
        kvs.push((
            v3_key("nodes", None, &name),
            resource(
                "Node",
                &name,
                i,
                serde_json::json!({
                    "bgp": {"ipv4Address": format!("{}/24", host_ip(i))},
                    "orchRefs": [{"nodeName": name, "orchestrator": "k8s"}],
                }),
            ),
        ));
        kvs.push((
            v3_key("felixconfigurations", None, &format!("node.{name}")),
            resource(
                "FelixConfiguration",
                &format!("node.{name}"),
                1000 + i,
                serde_json::json!({"defaultEndpointToHostAction": "Return"}),
            ),
        ));
        kvs.push((
            format!("/calico/ipam/v2/host/{name}/ipv4/block/192.168.{i}.0-26"),
            r#"{"state":"confirmed","deleted":false}"#.into(),
        ));
    }
    let globals = [
        (
            "ippools",
            "IPPool",
            "default-ipv4-ippool",
            serde_json::json!({"cidr": "192.168.0.0/16", "ipipMode": "Always", "vxlanMode": "Never",
                "natOutgoing": true, "blockSize": 26, "nodeSelector": "all()",
                "allowedUses": ["Workload", "Tunnel"]}),
        ),
        (
            "clusterinformations",
            "ClusterInformation",
            "default",
            serde_json::json!({"clusterGUID": "5e1b1d9a3c0a4a7d9f0e2b6c8d4f1a3e",
                "clusterType": "k8s,bgp", "calicoVersion": "v3.32.1", "datastoreReady": true}),
        ),
        (
            "felixconfigurations",
            "FelixConfiguration",
            "default",
            serde_json::json!({"reportingInterval": "0s", "logSeverityScreen": "Info"}),
        ),
        (
            "bgpconfigurations",
            "BGPConfiguration",
            "default",
            serde_json::json!({"nodeToNodeMeshEnabled": true, "asNumber": 64512,
                "logSeverityScreen": "Info"}),
        ),
        (
            "tiers",
            "Tier",
            "default",
            serde_json::json!({"order": 1_000_000, "defaultAction": "Deny"}),
        ),
        (
            "tiers",
            "Tier",
            "kube-admin",
            serde_json::json!({"order": 1_000, "defaultAction": "Pass"}),
        ),
        (
            "tiers",
            "Tier",
            "kube-baseline",
            serde_json::json!({"order": 10_000_000, "defaultAction": "Pass"}),
        ),
    ];
    for (i, (plural, kind, name, spec)) in globals.into_iter().enumerate() {
        kvs.push((
            v3_key(plural, None, name),
            resource(kind, name, 2000 + i, spec),
        ));
    }
    kvs
}

/// Calico 2.x's keys (libcalico-go v1.7 on etcdv2) for the same hosts, as seed 001's cluster
/// held them: host metadata, per-node BGP address and network, orchestrator refs, the pool.
pub fn v2_layout(hosts: &[String]) -> Vec<(String, String)> {
    let mut kvs = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        kvs.push((format!("/calico/v1/host/{h}/metadata"), "{}".into()));
        kvs.push((format!("/calico/bgp/v1/host/{h}/ip_addr_v4"), host_ip(i)));
        kvs.push((
            format!("/calico/bgp/v1/host/{h}/network_v4"),
            "10.12.13.0/24".into(),
        ));
        kvs.push((
            format!("/calico/v1/host/{h}/orchestrator_refs"),
            format!(r#"[{{"Orchestrator":"k8s","NodeName":"{h}"}}]"#),
        ));
    }
    kvs.push((
        "/calico/v1/ipam/v4/pool/192.168.0.0-16".into(),
        r#"{"cidr":"192.168.0.0/16","ipip":"tunl0","ipip_mode":"always","masquerade":true}"#.into(),
    ));
    kvs
}

/// One datastore request of the start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Get(String),
    /// A prefix Get; `keys_only` for calico 2.x's listing of host directories.
    List {
        prefix: String,
        keys_only: bool,
    },
    /// Create if absent (a txn on `create_revision == 0`).
    Create(String, String),
    Put(String, String),
    Delete(String),
}

/// What calico-node `node` reads and writes, in order, when it joins a cluster of `hosts`.
pub fn steps(pattern: ReadPattern, node: &str, hosts: &[String]) -> Vec<Step> {
    match pattern {
        ReadPattern::CalicoV3Etcdv3 => v3_steps(&node.to_lowercase()),
        ReadPattern::CalicoV2Etcdv2 => v2_steps(node, hosts),
    }
}

fn list(plural: &str) -> Step {
    Step::List {
        prefix: format!("{V3_PREFIX}/{plural}/"),
        keys_only: false,
    }
}

/// startup.go `Run` (v3.32) for a new node.
fn v3_steps(node: &str) -> Vec<Step> {
    let felix_node = format!("node.{node}");
    let node_value = resource(
        "Node",
        node,
        9999,
        serde_json::json!({"bgp": {"ipv4Address": "10.51.0.100/24"}}),
    );
    let create =
        |plural: &str, name: &str, value: String| Step::Create(v3_key(plural, None, name), value);
    vec![
        // IPAM().UpgradeHost: List BlockAffinity resources.
        list("blockaffinities"),
        // getNode.
        Step::Get(v3_key("nodes", None, node)),
        // checkConflictingNodes (a new node's IP is new): one prefix Get of every node.
        list("nodes"),
        // CreateOrUpdate.
        create("nodes", node, node_value),
        // configureIPPools.
        list("ippools"),
        // EnsureInitialized: ClusterInformation, then the three tiers.
        Step::Get(v3_key("clusterinformations", None, "default")),
        create("tiers", "default", "{}".into()),
        create("tiers", "kube-admin", "{}".into()),
        create("tiers", "kube-baseline", "{}".into()),
        // ensureDefaultConfig.
        Step::Get(v3_key("felixconfigurations", None, "default")),
        Step::Get(v3_key("felixconfigurations", None, &felix_node)),
        create(
            "felixconfigurations",
            &felix_node,
            resource(
                "FelixConfiguration",
                &felix_node,
                9998,
                serde_json::json!({"defaultEndpointToHostAction": "Return"}),
            ),
        ),
        Step::Get(v3_key("bgpconfigurations", None, "default")),
    ]
}

/// calico 2.6.5's `main` for a new node, through libcalico-go v1.7's compat layer.
fn v2_steps(node: &str, hosts: &[String]) -> Vec<Step> {
    let host = |k: &str| format!("/calico/v1/host/{node}/{k}");
    let bgp = |k: &str| format!("/calico/bgp/v1/host/{node}/{k}");
    let config = |k: &str| format!("/calico/v1/config/{k}");
    let mut s = vec![
        // getNode: the metadata, then its directory (getHostMetadataFromDirectory).
        Step::Get(host("metadata")),
        Step::Get(format!("/calico/v1/host/{node}")),
        // checkConflictingNodes -> listNodes -> listHostMetadata: the host directories.
        Step::List {
            prefix: "/calico/v1/host/".into(),
            keys_only: true,
        },
    ];
    // getNodeSubcomponents, for every node: six Gets.
    for h in hosts {
        for k in [
            "ip_addr_v4",
            "network_v4",
            "ip_addr_v6",
            "network_v6",
            "as_num",
        ] {
            s.push(Step::Get(format!("/calico/bgp/v1/host/{h}/{k}")));
        }
        s.push(Step::Get(format!("/calico/v1/host/{h}/orchestrator_refs")));
    }
    // Nodes().Apply: the metadata and seven components (applied or deleted).
    s.extend([
        Step::Put(host("metadata"), "{}".into()),
        Step::Put(bgp("ip_addr_v4"), "10.51.0.100".into()),
        Step::Delete(bgp("ip_addr_v6")),
        Step::Put(host("bird_ip"), "10.51.0.100".into()),
        Step::Delete(bgp("as_num")),
        Step::Put(bgp("network_v4"), "10.51.0.0/24".into()),
        Step::Delete(bgp("network_v6")),
        Step::Put(host("orchestrator_refs"), "[]".into()),
        // configureIPPools.
        Step::List {
            prefix: "/calico/v1/ipam/".into(),
            keys_only: false,
        },
        // ensureDefaultConfig.
        Step::Get(config("ReportingIntervalSecs")),
        Step::Get(config("LogSeverityScreen")),
        Step::Get(host("config/DefaultEndpointToHostAction")),
        Step::Put(host("config/DefaultEndpointToHostAction"), "RETURN".into()),
        Step::Put(config("CalicoVersion"), "v2.6.5".into()),
        Step::Get(config("ClusterType")),
        Step::Put(config("ClusterType"), "k8s,bgp".into()),
        Step::Get("/calico/bgp/v1/global/node_mesh".into()),
        Step::Get("/calico/bgp/v1/global/as_num".into()),
        Step::Get("/calico/bgp/v1/global/loglevel".into()),
    ]);
    // EnsureCalicoNodeInitialized: six directories (empty keys through the v3 gateway).
    for d in [
        "/calico/v1/ipam/v4/pool".to_string(),
        "/calico/v1/ipam/v6/pool".into(),
        "/calico/bgp/v1/global/custom_filters/v4".into(),
        "/calico/bgp/v1/global/custom_filters/v6".into(),
        format!("/calico/ipam/v2/host/{node}/ipv4/block"),
        format!("/calico/ipam/v2/host/{node}/ipv6/block"),
    ] {
        s.push(Step::Put(d, String::new()));
    }
    s
}

/// The lab does not wait out a 60-70 s probe: a stand-in stops after this much wall time and
/// the rest of its exchanges are projected at the latency it measured.
pub const LAB_CAP: Duration = Duration::from_secs(5);

/// What one start-up stand-in did, and what its full read pattern projects to.
#[derive(Debug, Clone, PartialEq)]
pub struct StartupReport {
    pub pattern: ReadPattern,
    pub endpoint: SocketAddr,
    /// Nodes already in the cluster (what the per-node reads walk).
    pub nodes: u32,
    /// Exchanges the full start-up needs.
    pub reads_needed: usize,
    /// Exchanges done before it finished or the lab's cap stopped it.
    pub reads_done: usize,
    /// The TCP connect.
    pub connect: Duration,
    /// Latency of each exchange.
    pub latencies: Vec<Duration>,
    /// From connect to the last exchange.
    pub elapsed: Duration,
    /// The earliest kill of the manifests' livenessProbe (60 s).
    pub budget: Duration,
    /// The projected start-up ends before `budget`.
    pub finished_in_budget: bool,
}

impl StartupReport {
    pub fn min_latency(&self) -> Duration {
        self.latencies.iter().min().copied().unwrap_or_default()
    }

    pub fn mean_latency(&self) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.iter().sum::<Duration>() / self.latencies.len() as u32
    }

    /// The full start-up: what was done, plus the rest at the measured mean latency.
    pub fn projected(&self) -> Duration {
        let rest = self.reads_needed.saturating_sub(self.reads_done) as u32;
        self.elapsed + self.mean_latency() * rest
    }

    /// Where the projected start-up lands under the manifests' livenessProbe.
    pub fn outcome(&self) -> Outcome {
        ProbeBudget::manifest().outcome(self.projected().as_secs_f64())
    }
}

impl std::fmt::Display for StartupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.pattern {
            ReadPattern::CalicoV3Etcdv3 => "calico v3.32 (etcdv3)",
            ReadPattern::CalicoV2Etcdv2 => "calico v2.6.5 (etcdv2)",
        };
        let m = ProbeBudget::manifest();
        write!(
            f,
            "{name} start-up stand-in, {} nodes: {} of {} sequential exchanges with {} in {:.2?}{}; \
             per exchange min {:.1?} mean {:.1?}; projected start-up {:.1?} vs the manifests' \
             livenessProbe (killed {:.0}-{:.0} s after the start) -> {}",
            self.nodes,
            self.reads_done,
            self.reads_needed,
            self.endpoint,
            self.elapsed,
            if self.reads_done < self.reads_needed {
                " (stopped at the lab's cap, the rest projected)"
            } else {
                ""
            },
            self.min_latency(),
            self.mean_latency(),
            self.projected(),
            m.kill_from_s,
            m.kill_by_s,
            match self.outcome() {
                Outcome::Fits => "live in time",
                Outcome::AtRisk => "killed or not, by the probe's phase",
                Outcome::Killed => "killed by the liveness probe",
            }
        )
    }
}

/// Runs `steps` one after the other over one keep-alive connection from `ns` to `endpoint`,
/// stopping after [`LAB_CAP`].
pub fn run(
    ns: &Netns,
    endpoint: SocketAddr,
    pattern: ReadPattern,
    nodes: u32,
    steps: &[Step],
) -> Result<StartupReport, LabError> {
    let start = Instant::now();
    let mut client = EtcdClient::connect(ns, endpoint, Duration::from_secs(5))?;
    let connect = start.elapsed();
    let mut latencies = Vec::with_capacity(steps.len());
    for step in steps {
        if start.elapsed() >= LAB_CAP {
            break;
        }
        let t = Instant::now();
        match step {
            Step::Get(k) => client.get(k).map(|_| ())?,
            Step::List { prefix, keys_only } => client.list(prefix, *keys_only).map(|_| ())?,
            Step::Create(k, v) => client.create(k, v).map(|_| ())?,
            Step::Put(k, v) => client.put(k, v)?,
            Step::Delete(k) => client.delete(k)?,
        }
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    let budget = Duration::from_secs_f64(ProbeBudget::manifest().kill_from_s);
    let mut r = StartupReport {
        pattern,
        endpoint,
        nodes,
        reads_needed: steps.len(),
        reads_done: latencies.len(),
        connect,
        latencies,
        elapsed,
        budget,
        finished_in_budget: false,
    };
    r.finished_in_budget = r.projected() < budget;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_in_steps_count_as_calico_does() {
        let hosts = seed_001_hosts(SEED_001_NODES);
        for p in ReadPattern::ALL {
            let s = steps(p, "ce-demo-1", &hosts);
            assert_eq!(s.len() as u32, p.exchanges(SEED_001_NODES), "{p:?}");
        }
        // v3: exactly one List of the nodes, whatever the cluster size.
        let v3 = steps(ReadPattern::CalicoV3Etcdv3, "ce-demo-1", &hosts);
        let node_lists = v3
            .iter()
            .filter(|s| matches!(s, Step::List { prefix, .. } if prefix.ends_with("/nodes/")))
            .count();
        assert_eq!(node_lists, 1);
        assert_eq!(
            v3[1],
            Step::Get(format!("{V3_PREFIX}/nodes/ce-demo-1")),
            "getNode comes right after the affinity upgrade"
        );
    }

    #[test]
    fn v3_keys_follow_calicos_layout() {
        let hosts = seed_001_hosts(2);
        let kvs = v3_layout(&hosts);
        assert_eq!(
            kvs[0].0,
            "/calico/resources/v3/projectcalico.org/nodes/amz-sin8-opsrespool-13-31"
        );
        let v: serde_json::Value = serde_json::from_str(&kvs[0].1).unwrap_or_default();
        assert_eq!(v["kind"], "Node");
        assert_eq!(v["apiVersion"], "projectcalico.org/v3");
        assert_eq!(v["spec"]["bgp"]["ipv4Address"], "10.12.13.10/24");
        assert!(kvs.iter().any(
            |(k, _)| k == "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool"
        ));
        assert_eq!(
            v3_key("networkpolicies", Some("kube-system"), "p"),
            "/calico/resources/v3/projectcalico.org/networkpolicies/kube-system/p"
        );
        let v2 = v2_layout(&hosts);
        assert!(v2[1].0.starts_with("/calico/bgp/v1/host/AMZ-SIN8-"));
        assert!(v2[1].0.ends_with("/ip_addr_v4"));
    }

    #[test]
    fn projection_adds_the_rest_at_the_mean() {
        let r = StartupReport {
            pattern: ReadPattern::CalicoV2Etcdv2,
            endpoint: SocketAddr::from(([10, 51, 0, 10], 2379)),
            nodes: 53,
            reads_needed: 346,
            reads_done: 22,
            connect: Duration::from_millis(220),
            latencies: vec![Duration::from_millis(220); 22],
            elapsed: Duration::from_millis(220 * 23),
            budget: Duration::from_secs(60),
            finished_in_budget: false,
        };
        assert_eq!(r.projected(), Duration::from_millis(220 * 347));
        assert_eq!(r.outcome(), Outcome::Killed);
    }
}
