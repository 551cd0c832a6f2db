//! `DATASTORE_TYPE=kubernetes`: this node's pods (field selector `spec.nodeName=$NODENAME`),
//! Services and Nodes, and felix's policies (Kubernetes NetworkPolicies, Calico's
//! NetworkPolicy and GlobalNetworkPolicy CRDs: `kdd_policy`), through kube-rs's watcher (list,
//! then watch from the list's resourceVersion with bookmarks; a 410 Gone relists).
//! Read-only: get/list/watch.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::watcher,
    Api, Client, Resource, ResourceExt,
};
use tracer_model::identity::{Endpoint, NodeRef, PodRef, ServiceRef, Workload};

use super::{backoff, kdd_policy, parse_addr, Book, Identities, IdentityConfig, Kind, Object};
use crate::felix_policy::{Policy, PolicyKind, PolicySet};

/// The client: `--kubeconfig`/`KUBECONFIG` when given (a colon-separated list is merged as
/// kubectl merges it: the first file to set a value wins), else the in-cluster service account.
pub async fn client(cfg: &IdentityConfig) -> anyhow::Result<Client> {
    let config = match &cfg.kubeconfig {
        Some(list) => {
            let kc = read_kubeconfigs(list.as_os_str())?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::incluster()?,
    };
    Ok(Client::try_from(config)?)
}

/// Every file of a KUBECONFIG-style list, merged (kube-rs's own merge, as `Kubeconfig::read`
/// does for the environment variable).
pub fn read_kubeconfigs(list: &std::ffi::OsStr) -> anyhow::Result<kube::config::Kubeconfig> {
    let mut merged: Option<kube::config::Kubeconfig> = None;
    for path in std::env::split_paths(list).filter(|p| !p.as_os_str().is_empty()) {
        let next = kube::config::Kubeconfig::read_from(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        merged = Some(match merged {
            Some(m) => m.merge(next)?,
            None => next,
        });
    }
    merged.ok_or_else(|| anyhow::anyhow!("the kubeconfig list {list:?} names no file"))
}

/// Runs until the agent stops: the identity watches and the policy watches side by side.
pub async fn run(ids: Arc<Identities>, client: Client, nodename: Option<String>) {
    futures::join!(
        identities(&ids, client.clone(), nodename),
        policies(&ids, client)
    );
}

/// Merges the three identity watches into one book. An error marks the view stale until that
/// watch has relisted.
async fn identities(ids: &Identities, client: Client, nodename: Option<String>) {
    let mut pods_cfg = watcher::Config::default();
    if let Some(node) = &nodename {
        pods_cfg = pods_cfg.fields(&format!("spec.nodeName={node}"));
    }
    let pods = tagged(Api::<Pod>::all(client.clone()), pods_cfg, Kind::Pod, pod);
    let services = tagged(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        Kind::Service,
        service,
    );
    let nodes = tagged(
        Api::<Node>::all(client),
        watcher::Config::default(),
        Kind::Node,
        node,
    );
    let mut events = futures::stream::select_all([pods, services, nodes]);
    let mut book = Book::default();
    // Objects of a list in progress, per kind, until its InitDone.
    let mut listing: BTreeMap<Kind, Vec<(String, Object)>> = BTreeMap::new();
    while let Some((kind, ev)) = events.next().await {
        match ev {
            Err(e) => ids.failed(part(kind), format!("{} watch: {e}", part(kind))),
            Ok(ev) => {
                match ev {
                    Change::Init => {
                        listing.insert(kind, Vec::new());
                    }
                    Change::InitApply(key, obj) => {
                        if let Some(objs) = listing.get_mut(&kind) {
                            objs.extend(obj.map(|o| (key, o)));
                        }
                    }
                    Change::InitDone => {
                        book.replace(kind, listing.remove(&kind).unwrap_or_default());
                    }
                    Change::Apply(key, Some(obj)) => book.upsert(kind, key, obj),
                    // An object that names no address (a pod without an IP yet, a host-network
                    // pod, a headless Service) holds none.
                    Change::Apply(key, None) | Change::Delete(key) => book.remove(kind, &key),
                }
                ids.publish(&book, part(kind));
            }
        }
    }
}

/// Where felix's policies come from in KDD mode (`kdd_policy`), each its own watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PolicySource {
    /// networking.k8s.io/v1 NetworkPolicy.
    Kubernetes,
    /// crd.projectcalico.org/v1 NetworkPolicy.
    Calico,
    /// crd.projectcalico.org/v1 GlobalNetworkPolicy.
    CalicoGlobal,
}

const POLICY_SOURCES: [PolicySource; 3] = [
    PolicySource::Kubernetes,
    PolicySource::Calico,
    PolicySource::CalicoGlobal,
];

impl PolicySource {
    /// The resource, as RBAC and `kubectl api-resources` name it.
    fn part(self) -> &'static str {
        match self {
            PolicySource::Kubernetes => "networkpolicies.networking.k8s.io",
            PolicySource::Calico => "networkpolicies.crd.projectcalico.org",
            PolicySource::CalicoGlobal => "globalnetworkpolicies.crd.projectcalico.org",
        }
    }
}

/// Calico's policy CRD as a dynamic resource (no Rust type for it: the spec is read as the v3
/// JSON it is).
fn calico_crd(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.projectcalico.org", "v1", kind),
        plural,
    )
}

/// Watches the three policy kinds and publishes one [`PolicySet`] once each has listed (or is
/// not served), then after every change. A kind the cluster does not serve (404: Calico's CRDs
/// not installed; 403: no RBAC for it) is read as empty and said in health, and asked again
/// with the watch's backoff, so CRDs installed later are picked up.
async fn policies(ids: &Identities, client: Client) {
    let np = calico_crd("NetworkPolicy", "networkpolicies");
    let gnp = calico_crd("GlobalNetworkPolicy", "globalnetworkpolicies");
    let streams = [
        tagged(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            PolicySource::Kubernetes,
            kdd_policy::knp,
        ),
        tagged(
            Api::<DynamicObject>::all_with(client.clone(), &np),
            watcher::Config::default(),
            PolicySource::Calico,
            |o| crd_policy(PolicyKind::NetworkPolicy, o),
        ),
        tagged(
            Api::<DynamicObject>::all_with(client, &gnp),
            watcher::Config::default(),
            PolicySource::CalicoGlobal,
            |o| crd_policy(PolicyKind::GlobalNetworkPolicy, o),
        ),
    ];
    let mut events = futures::stream::select_all(streams);
    let mut known: BTreeMap<PolicySource, BTreeMap<String, Policy>> = BTreeMap::new();
    let mut listing: BTreeMap<PolicySource, BTreeMap<String, Policy>> = BTreeMap::new();
    let mut unserved: BTreeMap<PolicySource, String> = BTreeMap::new();
    while let Some((src, ev)) = events.next().await {
        match ev {
            Err(e) => match not_served(&e) {
                Some(why) => {
                    ids.unavailable(src.part(), why.clone());
                    known.insert(src, BTreeMap::new());
                    unserved.insert(src, why);
                }
                None => {
                    ids.failed(src.part(), format!("{} watch: {e}", src.part()));
                    continue;
                }
            },
            Ok(Change::Init) => {
                listing.insert(src, BTreeMap::new());
                continue;
            }
            Ok(Change::InitApply(key, p)) => {
                if let (Some(l), Some(p)) = (listing.get_mut(&src), p) {
                    l.insert(key, p);
                }
                continue;
            }
            Ok(Change::InitDone) => {
                known.insert(src, listing.remove(&src).unwrap_or_default());
                unserved.remove(&src);
                ids.confirm(src.part());
            }
            Ok(Change::Apply(key, p)) => {
                let set = known.entry(src).or_default();
                match p {
                    Some(p) => set.insert(key, p),
                    None => set.remove(&key),
                };
                ids.confirm(src.part());
            }
            Ok(Change::Delete(key)) => {
                known.entry(src).or_default().remove(&key);
                ids.confirm(src.part());
            }
        }
        // Until every kind has answered once, a partial set would name chains wrongly absent.
        if POLICY_SOURCES.iter().all(|s| known.contains_key(s)) {
            let unread = unserved
                .iter()
                .map(|(s, why)| format!("{} not read ({why})", s.part()))
                .collect();
            ids.publish_policies(
                PolicySet::new(known.values().flat_map(|m| m.values().cloned()))
                    .with_unread(unread),
            );
        }
    }
}

/// A watch error that means the cluster does not serve the kind to us: why, or None.
fn not_served(e: &watcher::Error) -> Option<String> {
    let (watcher::Error::InitialListFailed(kube::Error::Api(s))
    | watcher::Error::WatchStartFailed(kube::Error::Api(s))) = e
    else {
        return None;
    };
    match s.code {
        404 => Some("not served by the API server (404): the CRD is not installed".into()),
        403 => Some(format!("forbidden (403): {}", s.message)),
        _ => None,
    }
}

fn crd_policy(kind: PolicyKind, o: &DynamicObject) -> Option<Policy> {
    kdd_policy::crd(kind, o)
        .inspect_err(|e| {
            tracing::warn!(name = ?o.metadata.name, error = %e, "policy: unreadable Calico policy CRD")
        })
        .ok()
}

enum Change<T> {
    Init,
    InitApply(String, Option<T>),
    InitDone,
    Apply(String, Option<T>),
    Delete(String),
}

type Tagged<Tag, T> =
    std::pin::Pin<Box<dyn Stream<Item = (Tag, Result<Change<T>, watcher::Error>)> + Send>>;

/// Each kind's watch is tracked on its own: the view is stale while any of them fails.
fn part(kind: Kind) -> &'static str {
    match kind {
        Kind::Pod => "pods",
        Kind::Service => "services",
        Kind::Node => "nodes",
    }
}

/// One kind's watcher, its events turned into [`Change`]s tagged `tag`. After an error the
/// watcher is dropped and started again (after a backoff that doubles while errors repeat):
/// the new one relists, so the view is confirmed current as soon as the datastore answers
/// again, even when nothing changed (a resumed watch of an idle kind would say nothing).
fn tagged<K, Tag, T>(
    api: Api<K>,
    cfg: watcher::Config,
    tag: Tag,
    convert: impl Fn(&K) -> Option<T> + Send + Sync + 'static,
) -> Tagged<Tag, T>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    Tag: Copy + Send + 'static,
    T: Send + 'static,
{
    let delay = Arc::new(Mutex::new(Duration::ZERO));
    let runs = {
        let delay = Arc::clone(&delay);
        futures::stream::unfold((), move |()| {
            let (api, cfg) = (api.clone(), cfg.clone());
            let wait = *delay.lock().unwrap_or_else(|e| e.into_inner());
            async move {
                tokio::time::sleep(wait).await;
                Some((watcher(api, cfg), ()))
            }
        })
    };
    let events = runs.flat_map(move |run| {
        let delay = Arc::clone(&delay);
        // This run's events up to and including its first error.
        run.scan(false, move |failed, ev| {
            if *failed {
                return futures::future::ready(None);
            }
            let mut d = delay.lock().unwrap_or_else(|e| e.into_inner());
            *d = match &ev {
                Err(_) => {
                    *failed = true;
                    backoff(*d)
                }
                Ok(_) => Duration::ZERO,
            };
            futures::future::ready(Some(ev))
        })
    });
    Box::pin(events.map(move |ev| {
        let key = |o: &K| {
            let m = o.meta();
            format!(
                "{}/{}",
                m.namespace.as_deref().unwrap_or(""),
                m.name.as_deref().unwrap_or("")
            )
        };
        let change = match ev {
            Err(e) => Err(e),
            Ok(watcher::Event::Init) => Ok(Change::Init),
            Ok(watcher::Event::InitApply(o)) => Ok(Change::InitApply(key(&o), convert(&o))),
            Ok(watcher::Event::InitDone) => Ok(Change::InitDone),
            Ok(watcher::Event::Apply(o)) => Ok(Change::Apply(key(&o), convert(&o))),
            Ok(watcher::Event::Delete(o)) => Ok(Change::Delete(key(&o))),
        };
        (tag, change)
    }))
}

/// A pod with its own addresses: not host-network (those are the node's), not finished (its
/// address is free again).
fn pod(p: &Pod) -> Option<Object> {
    let spec = p.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|a| a.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.as_deref().and_then(parse_addr));
    }
    if ips.is_empty() {
        return None;
    }
    let workload = p
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| Workload {
            kind: o.kind.clone(),
            name: o.name.clone(),
        });
    Some(Object {
        ips,
        endpoint: Arc::new(Endpoint::Pod(PodRef {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            workload,
            node: spec.node_name.clone(),
            labels: p.labels().clone(),
        })),
    })
}

fn service(s: &Service) -> Option<Object> {
    let spec = s.spec.as_ref()?;
    let ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .fold(Vec::new(), |mut v, ip| {
            if !v.contains(&ip) {
                v.push(ip);
            }
            v
        });
    let first = *ips.first()?;
    Some(Object {
        ips,
        endpoint: Arc::new(Endpoint::Service(ServiceRef {
            namespace: s.namespace().unwrap_or_default(),
            name: s.name_any(),
            cluster_ip: Some(first),
        })),
    })
}

/// Calico's node annotations (`libcalico-go/lib/backend/k8s/conversion`): the BGP address and
/// the tunnel addresses it gives the node.
const NODE_ANNOTATIONS: [&str; 5] = [
    "projectcalico.org/IPv4Address",
    "projectcalico.org/IPv6Address",
    "projectcalico.org/IPv4IPIPTunnelAddr",
    "projectcalico.org/IPv4VXLANTunnelAddr",
    "projectcalico.org/IPv4WireguardInterfaceAddr",
];

fn node(n: &Node) -> Option<Object> {
    let mut ips: Vec<IpAddr> = n
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| parse_addr(&a.address))
        .collect();
    let ann = n.annotations();
    ips.extend(
        NODE_ANNOTATIONS
            .iter()
            .filter_map(|k| ann.get(*k))
            .filter_map(|v| parse_addr(v)),
    );
    ips.sort();
    ips.dedup();
    (!ips.is_empty()).then(|| Object {
        ips,
        endpoint: Arc::new(Endpoint::Node(NodeRef { name: n.name_any() })),
    })
}
