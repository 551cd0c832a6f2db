//! Who an address is: pods, Services and nodes, read from the datastore Calico itself uses
//! (`DATASTORE_TYPE=kubernetes` through kube-rs, `etcdv3` through an etcd v3 client).
//!
//! A source task keeps a [`Book`] of the objects it has read and publishes an immutable
//! [`View`] after each change. Readers (the API's answers) take the last published view with
//! one `Arc` clone under a read lock that is never held across I/O, so an unreachable
//! datastore never delays an answer or the ring reader: the last view stays, marked stale.
//!
//! Names are looked up when an answer is rendered, at the flow's first-seen time: an address
//! keeps the tenants it had recently ([`Tenant::until_ns`]), so a flow of a deleted pod keeps
//! that pod's name and a new pod at the same address never inherits it. Nothing is stored per
//! flow and the ingest path does not look anything up.
pub mod etcd;
pub mod kdd_policy;
pub mod kube;

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tracer_model::identity::{Endpoint, IdentityHealth, IdentitySource};

use crate::{clock::mono_now_ns, felix_policy::PolicySet};

/// Ended tenancies kept, so that flows of deleted pods keep their names. Oldest go first.
pub const MAX_ENDED: usize = 4096;
/// First retry after a datastore error; doubled up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the agent was told about its datastore (Calico's own variables, see `cli.rs`).
#[derive(Debug, Clone, Default)]
pub struct IdentityConfig {
    pub source: Option<IdentitySource>,
    /// calico-node's `NODENAME`: this node's name, for the pod field selector and for naming
    /// the node's own addresses.
    pub nodename: Option<String>,
    /// `ETCD_ENDPOINTS`, comma-separated URLs.
    pub etcd_endpoints: Vec<String>,
    /// `KUBECONFIG`; in-cluster configuration when unset.
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// The kinds of objects that name addresses, in the order they win when two claim one
/// address at once (a pod over the Service or node that shares it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Service,
    Node,
}

/// One object's claim on its addresses.
#[derive(Debug, Clone)]
pub struct Object {
    pub ips: Vec<IpAddr>,
    pub endpoint: Arc<Endpoint>,
}

/// An address's holder: current (`until_ns` None) or ended at `until_ns` (CLOCK_MONOTONIC).
#[derive(Debug, Clone)]
struct Tenant {
    endpoint: Arc<Endpoint>,
    until_ns: Option<u64>,
}

/// The published, immutable map from address to holder.
#[derive(Debug, Default)]
pub struct View {
    by_ip: HashMap<IpAddr, Vec<Tenant>>,
    counts: [u64; 3],
}

impl View {
    /// Who held `ip` at `at_ns`: the earliest tenant that had not yet left then. A flow seen
    /// after its pod left (and before any new tenant's event arrived) goes to the next tenant
    /// or to nobody, never to the pod that left.
    pub fn lookup(&self, ip: IpAddr, at_ns: u64) -> Option<&Arc<Endpoint>> {
        self.by_ip
            .get(&ip)?
            .iter()
            .find(|t| t.until_ns.is_none_or(|u| u > at_ns))
            .map(|t| &t.endpoint)
    }
}

/// The source task's working copy: objects by (kind, key), and recently ended tenancies.
#[derive(Debug, Default)]
pub struct Book {
    objects: HashMap<(Kind, String), Object>,
    ended: VecDeque<(IpAddr, Arc<Endpoint>, u64)>,
}

impl Book {
    pub fn upsert(&mut self, kind: Kind, key: String, obj: Object) {
        let now = mono_now_ns();
        if let Some(old) = self.objects.get(&(kind, key.clone())) {
            for ip in old.ips.iter().filter(|ip| !obj.ips.contains(ip)) {
                Self::end(&mut self.ended, *ip, &old.endpoint, now);
            }
        }
        self.objects.insert((kind, key), obj);
    }

    pub fn remove(&mut self, kind: Kind, key: &str) {
        if let Some(old) = self.objects.remove(&(kind, key.to_string())) {
            let now = mono_now_ns();
            for ip in &old.ips {
                Self::end(&mut self.ended, *ip, &old.endpoint, now);
            }
        }
    }

    /// A full list of one kind (a first list or a relist): what is gone has left.
    pub fn replace(&mut self, kind: Kind, objects: Vec<(String, Object)>) {
        let keep: std::collections::HashSet<&str> =
            objects.iter().map(|(k, _)| k.as_str()).collect();
        let gone: Vec<String> = self
            .objects
            .keys()
            .filter(|(k, key)| *k == kind && !keep.contains(key.as_str()))
            .map(|(_, key)| key.clone())
            .collect();
        for key in gone {
            self.remove(kind, &key);
        }
        for (key, obj) in objects {
            self.upsert(kind, key, obj);
        }
    }

    fn end(
        ended: &mut VecDeque<(IpAddr, Arc<Endpoint>, u64)>,
        ip: IpAddr,
        ep: &Arc<Endpoint>,
        now: u64,
    ) {
        if ended.len() == MAX_ENDED {
            ended.pop_front();
        }
        ended.push_back((ip, Arc::clone(ep), now));
    }

    /// The view readers get: per address, ended tenants oldest first, then the current one.
    pub fn view(&self) -> View {
        let mut v = View::default();
        for (ip, ep, until) in &self.ended {
            v.by_ip.entry(*ip).or_default().push(Tenant {
                endpoint: Arc::clone(ep),
                until_ns: Some(*until),
            });
        }
        let mut current: Vec<(&(Kind, String), &Object)> = self.objects.iter().collect();
        current.sort_by(|a, b| a.0.cmp(b.0));
        for ((kind, _), obj) in current {
            v.counts[*kind as usize] += 1;
            for ip in &obj.ips {
                let tenants = v.by_ip.entry(*ip).or_default();
                // The first current claim (by kind order) wins; later ones are shadowed.
                if tenants.last().is_none_or(|t| t.until_ns.is_some()) {
                    tenants.push(Tenant {
                        endpoint: Arc::clone(&obj.endpoint),
                        until_ns: None,
                    });
                }
            }
        }
        v
    }
}

#[derive(Debug, Default)]
struct Status {
    /// When a full view was last read or confirmed by an event (CLOCK_MONOTONIC).
    synced_ns: Option<u64>,
    /// Parts of the source (a watch each) whose last attempt failed, with the error: the
    /// view is then the last known one.
    errors: std::collections::BTreeMap<&'static str, String>,
    /// Parts the datastore does not serve (a 404 or 403: Calico's CRDs not installed, no RBAC
    /// for them), with why: read as empty, not stale; the other parts work.
    unavailable: std::collections::BTreeMap<&'static str, String>,
}

/// Identity as the rest of the agent sees it: the last view and how fresh it is.
#[derive(Debug)]
pub struct Identities {
    source: IdentitySource,
    nodename: Option<Arc<Endpoint>>,
    view: RwLock<Arc<View>>,
    status: Mutex<Status>,
    /// Calico's policies, by felix's chain names; None until the source lists them (the
    /// etcdv3 and Kubernetes sources do).
    policies: RwLock<Option<Arc<PolicySet>>>,
}

impl Identities {
    pub fn new(source: IdentitySource, nodename: Option<&str>) -> Identities {
        Identities {
            source,
            nodename: nodename.map(|n| {
                Arc::new(Endpoint::Node(tracer_model::identity::NodeRef {
                    name: n.to_string(),
                }))
            }),
            view: RwLock::new(Arc::new(View::default())),
            status: Mutex::new(Status::default()),
            policies: RwLock::new(None),
        }
    }

    pub fn off() -> Identities {
        Identities::new(IdentitySource::Off, None)
    }

    pub fn is_on(&self) -> bool {
        self.source != IdentitySource::Off
    }

    /// The last published view: one `Arc` clone, never waits on the datastore.
    pub fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The policies as last listed, or why there are none.
    pub fn policies(&self) -> Result<Arc<PolicySet>, String> {
        if !self.is_on() {
            return Err("no datastore configured (DATASTORE_TYPE)".into());
        }
        self.policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| format!("policies not read from {}", self.source.as_str()))
    }

    pub fn publish_policies(&self, set: PolicySet) {
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
    }

    /// This node, as NODENAME names it.
    pub fn local_node(&self) -> Option<&Arc<Endpoint>> {
        self.nodename.as_ref()
    }

    /// `part` of the source read a full view or an event: publish the book and mark that
    /// part current.
    pub fn publish(&self, book: &Book, part: &'static str) {
        let v = Arc::new(book.view());
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = v;
        self.confirm(part);
    }

    /// `part` of the datastore answered (an event, a list, a progress notice): it is current.
    pub fn confirm(&self, part: &'static str) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.synced_ns = Some(mono_now_ns());
        if s.unavailable.remove(part).is_some() {
            tracing::info!(part, "identity: the datastore serves this kind now");
        }
        if s.errors.remove(part).is_some() && s.errors.is_empty() {
            tracing::info!(
                source = self.source.as_str(),
                "identity: datastore reachable again"
            );
        }
    }

    /// `part` works again without having read anything yet (the client could be built):
    /// its error goes, the sync time stays.
    pub fn cleared(&self, part: &'static str) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.errors.remove(part);
    }

    /// `part` of the datastore failed: keep the view, say it is stale until that part answers.
    pub fn failed(&self, part: &'static str, error: String) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if s.errors.is_empty() {
            tracing::warn!(source = self.source.as_str(), %error, "identity: datastore unreachable; keeping the last view");
        }
        s.errors.insert(part, error);
    }

    /// The datastore does not serve `part` (404/403): no error, no staleness; said in health.
    pub fn unavailable(&self, part: &'static str, why: String) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.errors.remove(part);
        if s.unavailable.insert(part, why.clone()).is_none() {
            tracing::warn!(part, %why, "identity: the datastore does not serve this kind; read as empty");
        }
    }

    pub fn health(&self) -> IdentityHealth {
        if !self.is_on() {
            return IdentityHealth::off();
        }
        let (synced_ns, error, unavailable) = {
            let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            let errors: Vec<&str> = s.errors.values().map(String::as_str).collect();
            let unavailable = s
                .unavailable
                .iter()
                .map(|(part, why)| format!("{part}: {why}"))
                .collect();
            (
                s.synced_ns,
                (!errors.is_empty()).then(|| errors.join("; ")),
                unavailable,
            )
        };
        let counts = self.view().counts;
        let now = mono_now_ns();
        IdentityHealth {
            source: self.source,
            synced: synced_ns.is_some(),
            last_sync_age_s: synced_ns
                .map(|t| (now.saturating_sub(t) as f64 / 1e9 * 1000.0).round() / 1000.0),
            stale: error.is_some(),
            pods: counts[Kind::Pod as usize],
            services: counts[Kind::Service as usize],
            nodes: counts[Kind::Node as usize],
            error,
            unavailable,
        }
    }
}

/// The next retry delay after `prev`.
pub fn backoff(prev: Duration) -> Duration {
    (prev * 2).clamp(MIN_BACKOFF, MAX_BACKOFF)
}

/// `10.0.0.1/24` or `10.0.0.1` (Calico writes both) as an address.
pub fn parse_addr(s: &str) -> Option<IpAddr> {
    s.split('/').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_model::identity::PodRef;

    fn pod(name: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint::Pod(PodRef {
            namespace: "ns".into(),
            name: name.into(),
            workload: None,
            node: None,
            labels: Default::default(),
        }))
    }

    #[test]
    fn a_reused_address_never_carries_the_old_name_forward() -> Result<(), std::net::AddrParseError>
    {
        let ip: IpAddr = "10.244.0.5".parse()?;
        let mut book = Book::default();
        let before = mono_now_ns();
        book.upsert(
            Kind::Pod,
            "ns/a".into(),
            Object {
                ips: vec![ip],
                endpoint: pod("a"),
            },
        );
        book.remove(Kind::Pod, "ns/a");
        let after_delete = mono_now_ns() + 1;
        // Deleted and nobody new yet: the old flow keeps its name, a new one gets none.
        let v = book.view();
        assert_eq!(
            v.lookup(ip, before).and_then(|e| e.name()).as_deref(),
            Some("ns/a")
        );
        assert!(v.lookup(ip, after_delete).is_none());
        book.upsert(
            Kind::Pod,
            "ns/b".into(),
            Object {
                ips: vec![ip],
                endpoint: pod("b"),
            },
        );
        let v = book.view();
        assert_eq!(
            v.lookup(ip, after_delete).and_then(|e| e.name()).as_deref(),
            Some("ns/b")
        );
        assert_eq!(
            v.lookup(ip, before).and_then(|e| e.name()).as_deref(),
            Some("ns/a")
        );
        Ok(())
    }

    #[test]
    fn a_relist_ends_what_is_gone_and_a_pod_wins_over_its_node(
    ) -> Result<(), std::net::AddrParseError> {
        let ip: IpAddr = "10.0.0.1".parse()?;
        let mut book = Book::default();
        let node = Arc::new(Endpoint::Node(tracer_model::identity::NodeRef {
            name: "n".into(),
        }));
        book.upsert(
            Kind::Node,
            "n".into(),
            Object {
                ips: vec![ip],
                endpoint: node,
            },
        );
        book.upsert(
            Kind::Pod,
            "ns/a".into(),
            Object {
                ips: vec![ip],
                endpoint: pod("a"),
            },
        );
        assert_eq!(
            book.view()
                .lookup(ip, mono_now_ns())
                .and_then(|e| e.name())
                .as_deref(),
            Some("ns/a")
        );
        book.replace(Kind::Pod, Vec::new());
        let v = book.view();
        assert_eq!(
            v.lookup(ip, mono_now_ns() + 1)
                .and_then(|e| e.name())
                .as_deref(),
            Some("node n")
        );
        assert_eq!(v.counts, [0, 0, 1]);
        Ok(())
    }
}
