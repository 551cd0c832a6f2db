//! The lab's etcd holds Calico's keys as Calico writes them, read back through etcd's own
//! gateway. Needs root (it builds a lab).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tracer_lab::etcd::EtcdClient;
use tracer_lab::startup::{self, V3_PREFIX};
use tracer_lab::topo::{Cluster, ClusterConfig};

/// Calico's v3 plurals the lab writes (`libcalico-go/lib/backend/model/resource.go`).
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
    for (key, value) in &kvs {
        // /calico/resources/v3/projectcalico.org/<plural>/<name> (all global resources here).
        let rest = key.strip_prefix(&format!("{V3_PREFIX}/")).unwrap();
        let (plural, name) = rest.split_once('/').unwrap();
        assert!(PLURALS.contains(&plural), "{key}");
        assert!(
            !name.contains('/'),
            "{key}: global resources have no namespace"
        );
        let v: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(v["apiVersion"], "projectcalico.org/v3", "{key}");
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
    assert_eq!(nodes, startup::SEED_001_NODES, "{kvs:?}");
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
