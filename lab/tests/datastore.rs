//! The lab's etcd holds Calico's keys as Calico writes them, read back through etcd's own
//! gateway. Needs root (it builds a lab).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tracer_lab::etcd::EtcdClient;
use tracer_lab::startup::{self, V3_PREFIX};
use tracer_lab::topo::{Cluster, ClusterConfig};

/// Calico's global v3 plurals the lab writes (`libcalico-go/lib/backend/model/resource.go`).
const PLURALS: [&str; 6] = [
    "nodes",
    "felixconfigurations",
    "ippools",
    "clusterinformations",
    "bgpconfigurations",
    "tiers",
];

#[test]
fn etcd_holds_calicos_v3_layout() {
    let lab = Cluster::build(&ClusterConfig::two_nodes()).unwrap();
    let n1 = &lab.nodes[0];
    let mut c =
        EtcdClient::connect(&n1.netns, lab.etcd_endpoint(), Duration::from_secs(5)).unwrap();
    let kvs = c.list(&format!("{V3_PREFIX}/"), false).unwrap();
    let mut nodes = 0;
    let mut weps = Vec::new();
    for (key, value) in &kvs {
        let rest = key.strip_prefix(&format!("{V3_PREFIX}/")).unwrap();
        let v: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(v["apiVersion"], "projectcalico.org/v3", "{key}");
        // Namespaced: /calico/resources/v3/projectcalico.org/workloadendpoints/<ns>/<name>.
        if let Some(wep) = rest.strip_prefix("workloadendpoints/") {
            let (ns, name) = wep.split_once('/').unwrap();
            assert!(!name.contains('/'), "{key}");
            assert_eq!(v["kind"], "WorkloadEndpoint", "{key}");
            assert_eq!(v["metadata"]["namespace"], ns, "{key}");
            assert_eq!(v["metadata"]["name"], name, "{key}");
            let node = v["spec"]["node"].as_str().unwrap();
            let pod = v["spec"]["pod"].as_str().unwrap();
            assert_eq!(name, startup::wep_name(node, pod), "{key}");
            weps.push((
                ns.to_string(),
                pod.to_string(),
                node.to_string(),
                v["spec"]["ipNetworks"][0].as_str().unwrap().to_string(),
                v["spec"]["interfaceName"].as_str().unwrap().to_string(),
            ));
            continue;
        }
        // /calico/resources/v3/projectcalico.org/<plural>/<name> (global resources).
        let (plural, name) = rest.split_once('/').unwrap();
        assert!(PLURALS.contains(&plural), "{key}");
        assert!(
            !name.contains('/'),
            "{key}: global resources have no namespace"
        );
        assert_eq!(v["metadata"]["name"], name, "{key}");
        assert!(
            v["kind"]
                .as_str()
                .is_some_and(|k| k.to_lowercase() + "s" == plural
                    || (plural == "ippools" && k == "IPPool")
                    || (plural == "felixconfigurations" && k == "FelixConfiguration")),
            "{key}: {v}"
        );
        if plural == "nodes" {
            nodes += 1;
            assert!(v["spec"]["bgp"]["ipv4Address"].as_str().is_some(), "{v}");
        }
    }
    // One WorkloadEndpoint per lab pod, on its node, with its address and veth.
    let mut want: Vec<_> = lab
        .pods
        .iter()
        .map(|p| {
            (
                p.pod.namespace.clone(),
                p.pod.name.clone(),
                lab.nodes[p.node].name.clone(),
                format!("{}/32", p.pod.ip),
                p.pod.veth.clone(),
            )
        })
        .collect();
    want.sort();
    weps.sort();
    assert_eq!(weps, want);
    // Seed 001's nodes plus the lab's own.
    assert_eq!(
        nodes,
        startup::SEED_001_NODES as usize + lab.nodes.len(),
        "{kvs:?}"
    );
    for k in [
        "ippools/default-ipv4-ippool",
        "clusterinformations/default",
        "felixconfigurations/default",
        "bgpconfigurations/default",
        "tiers/default",
    ] {
        assert!(c.get(&format!("{V3_PREFIX}/{k}")).unwrap().is_some(), "{k}");
    }
    // Calico 2.x's layout for the same nodes, for seed 001's stand-in.
    let hosts = c.list("/calico/v1/host/", true).unwrap();
    assert_eq!(
        hosts
            .iter()
            .filter(|(k, _)| k.ends_with("/metadata"))
            .count() as u32,
        startup::SEED_001_NODES
    );
}
