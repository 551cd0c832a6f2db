//! `DATASTORE_TYPE=etcdv3`: Calico's WorkloadEndpoints and Nodes as libcalico-go's etcdv3
//! backend stores them: `/calico/resources/v3/projectcalico.org/<plural>/[<namespace>/]<name>`
//! holding the v3 object's JSON (`libcalico-go/lib/backend/model/resource.go`; shapes from
//! `libcalico-go/lib/apis/internalapi/{workloadendpoint,node}.go`). A prefix Get (Calico's
//! List) then a prefix watch from the next revision; a compaction or an error relists.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::Deserialize;
use tracer_model::identity::{Endpoint, NodeRef, PodRef};

use super::{backoff, parse_addr, Book, Identities, Kind, Object, MIN_BACKOFF};
use crate::felix_policy::{parse_policy, Policy, PolicyKind, PolicySet};

pub const V3_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";
const WEPS: &str = "/calico/resources/v3/projectcalico.org/workloadendpoints/";
const NODES: &str = "/calico/resources/v3/projectcalico.org/nodes/";
/// Calico's policies: `networkpolicies/<namespace>/<name>` (Kubernetes NetworkPolicies too, as
/// kube-controllers' `knp.default.<name>`) and `globalnetworkpolicies/<name>`.
const POLICIES: [(&str, PolicyKind); 2] = [
    (
        "/calico/resources/v3/projectcalico.org/networkpolicies/",
        PolicyKind::NetworkPolicy,
    ),
    (
        "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/",
        PolicyKind::GlobalNetworkPolicy,
    ),
];
/// The one watch this source keeps, as [`Identities`] tracks its health.
const PART: &str = "etcd";
/// Labels Calico adds to a pod's own on its WorkloadEndpoint (`projectcalico.org/namespace`,
/// `.../orchestrator`, `.../serviceaccount`): not the pod's.
const CALICO_LABEL_PREFIX: &str = "projectcalico.org/";

/// Runs until the agent stops.
pub async fn run(ids: Arc<Identities>, endpoints: Vec<String>) {
    let mut delay = Duration::ZERO;
    loop {
        let mut listed = false;
        let e = match watch(&ids, &endpoints, &mut listed).await {
            Ok(()) => anyhow::anyhow!("watch ended"),
            Err(e) => e,
        };
        ids.failed(PART, format!("etcd {}: {e}", endpoints.join(",")));
        // A session that got as far as a list starts the backoff over.
        delay = if listed { MIN_BACKOFF } else { backoff(delay) };
        tokio::time::sleep(delay).await;
    }
}

/// One connection: list, then watch until it fails or is compacted away. `listed` says
/// whether it got a full view first.
async fn watch(ids: &Identities, endpoints: &[String], listed: &mut bool) -> anyhow::Result<()> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        // A vanished server is noticed on an idle watch too.
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    let mut client = Client::connect(endpoints, Some(opts)).await?;
    let mut book = Book::default();
    let mut revision = 0;
    for (kind, prefix) in [(Kind::Pod, WEPS), (Kind::Node, NODES)] {
        let resp = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        revision = resp.header().map_or(0, |h| h.revision());
        let objects = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let (key, value) = (kv.key_str().ok()?, kv.value_str().ok()?);
                Some((key.to_string(), object(kind, key, value)?))
            })
            .collect();
        book.replace(kind, objects);
    }
    let mut policies: BTreeMap<String, Policy> = BTreeMap::new();
    for (prefix, kind) in POLICIES {
        let resp = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        revision = resp.header().map_or(revision, |h| h.revision());
        for kv in resp.kvs() {
            if let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) {
                if let Some(p) = policy(kind, key, value) {
                    policies.insert(key.to_string(), p);
                }
            }
        }
    }
    ids.publish_policies(PolicySet::new(policies.values().cloned()));
    ids.publish(&book, PART);
    *listed = true;
    let mut stream = client
        .watch(
            V3_PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify(),
            ),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.compact_revision() > 0 || resp.canceled() {
            anyhow::bail!("watch cancelled ({}); relisting", resp.cancel_reason());
        }
        let mut changed = false;
        let mut policies_changed = false;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            if let Some((_, kind)) = POLICIES.iter().find(|(p, _)| key.starts_with(p)) {
                policies_changed = true;
                let parsed = match ev.event_type() {
                    EventType::Put => kv.value_str().ok().and_then(|v| policy(*kind, key, v)),
                    EventType::Delete => None,
                };
                match parsed {
                    Some(p) => policies.insert(key.to_string(), p),
                    None => policies.remove(key),
                };
                continue;
            }
            let Some(kind) = kind_of(key) else { continue };
            changed = true;
            match ev.event_type() {
                EventType::Put => match kv.value_str().ok().and_then(|v| object(kind, key, v)) {
                    Some(obj) => book.upsert(kind, key.to_string(), obj),
                    None => book.remove(kind, key),
                },
                EventType::Delete => book.remove(kind, key),
            }
        }
        if policies_changed {
            ids.publish_policies(PolicySet::new(policies.values().cloned()));
        }
        if changed {
            ids.publish(&book, PART);
        } else {
            ids.confirm(PART);
        }
    }
    Ok(())
}

/// A policy's JSON; one that does not parse is skipped (logged), never guessed at.
fn policy(kind: PolicyKind, key: &str, value: &str) -> Option<Policy> {
    parse_policy(kind, value)
        .inspect_err(|e| tracing::warn!(key, error = %e, "policy: unreadable Calico policy"))
        .ok()
}

fn kind_of(key: &str) -> Option<Kind> {
    if key.starts_with(WEPS) {
        Some(Kind::Pod)
    } else if key.starts_with(NODES) {
        Some(Kind::Node)
    } else {
        None
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Meta {
    name: String,
    namespace: String,
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WepSpec {
    node: String,
    pod: String,
    workload: String,
    ip_networks: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct NodeSpec {
    bgp: Option<NodeBgp>,
    #[serde(rename = "ipv4VXLANTunnelAddr")]
    ipv4_vxlan_tunnel_addr: String,
    #[serde(rename = "ipv6VXLANTunnelAddr")]
    ipv6_vxlan_tunnel_addr: String,
    wireguard: Option<NodeWireguard>,
    addresses: Vec<NodeAddress>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeBgp {
    #[serde(rename = "ipv4Address")]
    ipv4_address: String,
    #[serde(rename = "ipv6Address")]
    ipv6_address: String,
    #[serde(rename = "ipv4IPIPTunnelAddr")]
    ipv4_ipip_tunnel_addr: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct NodeWireguard {
    interface_ipv4_address: String,
    interface_ipv6_address: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeAddress {
    address: String,
}

#[derive(Deserialize)]
struct Resource<S> {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: S,
}

/// The object a key's JSON names, if it names any address. A value that does not parse is
/// skipped (logged), never guessed at.
fn object(kind: Kind, key: &str, value: &str) -> Option<Object> {
    let parsed = match kind {
        Kind::Pod => serde_json::from_str::<Resource<WepSpec>>(value).map(wep),
        _ => serde_json::from_str::<Resource<NodeSpec>>(value).map(node),
    };
    match parsed {
        Ok(obj) => obj,
        Err(e) => {
            tracing::warn!(key, error = %e, "identity: unreadable Calico resource");
            None
        }
    }
}

fn wep(r: Resource<WepSpec>) -> Option<Object> {
    let ips: Vec<_> = r
        .spec
        .ip_networks
        .iter()
        .filter_map(|n| parse_addr(n))
        .collect();
    if ips.is_empty() {
        return None;
    }
    let labels = r
        .metadata
        .labels
        .into_iter()
        .filter(|(k, _)| !k.starts_with(CALICO_LABEL_PREFIX))
        .collect();
    // Kubernetes pods carry their pod name in spec.pod; other orchestrators name the workload.
    let name = if r.spec.pod.is_empty() {
        r.spec.workload.clone()
    } else {
        r.spec.pod.clone()
    };
    Some(Object {
        ips,
        endpoint: Arc::new(Endpoint::Pod(PodRef {
            namespace: r.metadata.namespace,
            name,
            // A WorkloadEndpoint does not record the pod's owner; absent, not guessed.
            workload: None,
            node: (!r.spec.node.is_empty()).then_some(r.spec.node),
            labels,
        })),
    })
}

fn node(r: Resource<NodeSpec>) -> Option<Object> {
    let s = r.spec;
    let bgp = s.bgp.unwrap_or_default();
    let wg = s.wireguard.unwrap_or_default();
    let mut ips: Vec<_> = [
        bgp.ipv4_address,
        bgp.ipv6_address,
        bgp.ipv4_ipip_tunnel_addr,
        s.ipv4_vxlan_tunnel_addr,
        s.ipv6_vxlan_tunnel_addr,
        wg.interface_ipv4_address,
        wg.interface_ipv6_address,
    ]
    .iter()
    .chain(s.addresses.iter().map(|a| &a.address))
    .filter_map(|a| parse_addr(a))
    .collect();
    ips.sort();
    ips.dedup();
    (!ips.is_empty()).then(|| Object {
        ips,
        endpoint: Arc::new(Endpoint::Node(NodeRef {
            name: r.metadata.name,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WorkloadEndpoint as Calico's k8s conversion writes it (`workload_endpoint_default.go`).
    const WEP: &str = r#"{"kind":"WorkloadEndpoint","apiVersion":"projectcalico.org/v3",
      "metadata":{"name":"node--a-k8s-web--1-eth0","namespace":"shop",
        "labels":{"app":"web","projectcalico.org/namespace":"shop",
          "projectcalico.org/orchestrator":"k8s","projectcalico.org/serviceaccount":"default"}},
      "spec":{"orchestrator":"k8s","node":"node-a","containerID":"abc","pod":"web-1",
        "endpoint":"eth0","serviceAccountName":"default","ipNetworks":["10.244.1.5/32"],
        "profiles":["kns.shop","ksa.shop.default"],"interfaceName":"cali0123456789a"}}"#;

    #[test]
    fn reads_calicos_workload_endpoints_and_nodes() {
        let obj = object(Kind::Pod, "k", WEP);
        let Some(Object { ips, endpoint }) = obj else {
            panic!("no object")
        };
        assert_eq!(format!("{ips:?}"), "[10.244.1.5]");
        let Endpoint::Pod(p) = endpoint.as_ref() else {
            panic!("{endpoint:?}")
        };
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.node.as_deref()),
            ("shop", "web-1", Some("node-a"))
        );
        assert_eq!(p.labels.keys().collect::<Vec<_>>(), vec!["app"]);
        let n = object(
            Kind::Node,
            "k",
            r#"{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{"name":"node-a"},
               "spec":{"bgp":{"ipv4Address":"10.0.0.1/24","ipv4IPIPTunnelAddr":"10.244.1.1"},
               "orchRefs":[{"nodeName":"node-a","orchestrator":"k8s"}]}}"#,
        );
        assert_eq!(n.map(|o| o.ips.len()), Some(2));
        assert!(object(Kind::Pod, "k", "not json").is_none());
    }
}
