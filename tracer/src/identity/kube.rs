//! `DATASTORE_TYPE=kubernetes`: this node's pods (field selector `spec.nodeName=$NODENAME`),
//! Services and Nodes, through kube-rs's watcher (list, then watch from the list's
//! resourceVersion with bookmarks; a 410 Gone relists). Read-only: get/list/watch.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::{runtime::watcher, Api, Client, Resource, ResourceExt};
use tracer_model::identity::{Endpoint, NodeRef, PodRef, ServiceRef, Workload};

use super::{backoff, parse_addr, Book, Identities, IdentityConfig, Kind, Object};

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

/// Runs until the agent stops: merges the three watches into one book. An error marks the
/// view stale until that watch has relisted.
pub async fn run(ids: Arc<Identities>, client: Client, nodename: Option<String>) {
    let mut pods_cfg = watcher::Config::default();
    if let Some(node) = &nodename {
        pods_cfg = pods_cfg.fields(&format!("spec.nodeName={node}"));
    }
    let pods = tagged(Api::<Pod>::all(client.clone()), pods_cfg, |p| {
        pod(p).map(|o| (Kind::Pod, o))
    });
    let services = tagged(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        |s| service(s).map(|o| (Kind::Service, o)),
    );
    let nodes = tagged(Api::<Node>::all(client), watcher::Config::default(), |n| {
        node(n).map(|o| (Kind::Node, o))
    });
    let mut events = futures::stream::select_all([pods, services, nodes]);
    let mut book = Book::default();
    // Objects of a list in progress, per kind, until its InitDone.
    let mut listing: BTreeMap<Kind, Vec<(String, Object)>> = BTreeMap::new();
    while let Some(ev) = events.next().await {
        match ev {
            Err((kind, e)) => ids.failed(part(kind), e),
            Ok((kind, ev)) => {
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

enum Change {
    Init,
    InitApply(String, Option<Object>),
    InitDone,
    Apply(String, Option<Object>),
    Delete(String),
}

type Tagged = std::pin::Pin<Box<dyn Stream<Item = Result<(Kind, Change), (Kind, String)>> + Send>>;

/// Each kind's watch is tracked on its own: the view is stale while any of them fails.
fn part(kind: Kind) -> &'static str {
    match kind {
        Kind::Pod => "pods",
        Kind::Service => "services",
        Kind::Node => "nodes",
    }
}

/// One kind's watcher, its events turned into [`Change`]s of that kind. After an error the
/// watcher is dropped and started again (after a backoff that doubles while errors repeat):
/// the new one relists, so the view is confirmed current as soon as the datastore answers
/// again, even when nothing changed (a resumed watch of an idle kind would say nothing).
fn tagged<K>(
    api: Api<K>,
    cfg: watcher::Config,
    convert: impl Fn(&K) -> Option<(Kind, Object)> + Send + Sync + 'static,
) -> Tagged
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let kind = kind_of::<K>();
    let convert = Arc::new(convert);
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
        let obj = |o: &K| convert(o).map(|(_, x)| x);
        match ev {
            Err(e) => Err((kind, format!("{} watch: {e}", part(kind)))),
            Ok(watcher::Event::Init) => Ok((kind, Change::Init)),
            Ok(watcher::Event::InitApply(o)) => Ok((kind, Change::InitApply(key(&o), obj(&o)))),
            Ok(watcher::Event::InitDone) => Ok((kind, Change::InitDone)),
            Ok(watcher::Event::Apply(o)) => Ok((kind, Change::Apply(key(&o), obj(&o)))),
            Ok(watcher::Event::Delete(o)) => Ok((kind, Change::Delete(key(&o)))),
        }
    }))
}

fn kind_of<K: Resource>() -> Kind
where
    K::DynamicType: Default,
{
    match K::kind(&Default::default()).as_ref() {
        "Pod" => Kind::Pod,
        "Service" => Kind::Service,
        _ => Kind::Node,
    }
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
