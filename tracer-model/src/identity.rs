//! Who a flow's addresses belong to, as read from Calico's datastore (issue 14): a pod, a
//! Service, a node, this host, or something outside the cluster. Wire names (`kind`, the
//! source names) are API: add, never rename.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

/// What an address is, as far as the datastore knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Endpoint {
    Pod(PodRef),
    Service(ServiceRef),
    Node(NodeRef),
    /// An address of this node that the datastore does not name (NODENAME unset).
    Host,
    /// Neither a pod, a Service nor a node the datastore knows.
    External,
}

impl Endpoint {
    /// `ns/pod`, `service ns/name`, `node name`; None for host and external.
    pub fn name(&self) -> Option<String> {
        match self {
            Endpoint::Pod(p) => Some(format!("{}/{}", p.namespace, p.name)),
            Endpoint::Service(s) => Some(format!("service {}/{}", s.namespace, s.name)),
            Endpoint::Node(n) => Some(format!("node {}", n.name)),
            Endpoint::Host | Endpoint::External => None,
        }
    }

    /// [`Endpoint::name`], or `host` / `external`: what a table cell shows.
    pub fn label(&self) -> String {
        match self {
            Endpoint::Host => "host".into(),
            Endpoint::External => "external".into(),
            named => named.name().unwrap_or_default(),
        }
    }

    /// The namespace of a pod or Service.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Endpoint::Pod(p) => Some(&p.namespace),
            Endpoint::Service(s) => Some(&s.namespace),
            _ => None,
        }
    }

    /// A pod's labels (empty for anything else).
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        match self {
            Endpoint::Pod(p) => Some(&p.labels),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// The controller that owns the pod (ownerReferences with controller=true, or Calico's
    /// `orchestrator`-less WorkloadEndpoint: absent).
    pub workload: Option<Workload>,
    /// The node it runs on.
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// The owner's kind, e.g. `ReplicaSet`, `DaemonSet`, `StatefulSet`.
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    pub name: String,
}

/// Who each address of a flow is: the tuple as first seen, and after SNAT/DNAT when the flow
/// was translated. Present only while identity is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoints {
    pub src: Endpoint,
    pub dst: Endpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_src: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_dst: Option<Endpoint>,
}

impl FlowEndpoints {
    /// Every endpoint of the flow, translated ones included.
    pub fn all(&self) -> impl Iterator<Item = &Endpoint> {
        [
            Some(&self.src),
            Some(&self.dst),
            self.nat_src.as_ref(),
            self.nat_dst.as_ref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// Where identities come from: Calico's `DATASTORE_TYPE`, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    Off,
    Kubernetes,
    Etcdv3,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Off => "off",
            IdentitySource::Kubernetes => "kubernetes",
            IdentitySource::Etcdv3 => "etcdv3",
        }
    }
}

/// `/healthz`'s `identity`: where names come from and how fresh they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityHealth {
    pub source: IdentitySource,
    /// A full view has been read at least once.
    pub synced: bool,
    /// Seconds since the view was last confirmed current (a list, a watch event or a
    /// bookmark); None before the first sync.
    pub last_sync_age_s: Option<f64>,
    /// The datastore is unreachable: names are the last known ones.
    pub stale: bool,
    pub pods: u64,
    pub services: u64,
    pub nodes: u64,
    /// The last error talking to the datastore, while stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Kinds the datastore does not serve (`<resource>: <why>`, e.g. Calico's policy CRDs not
    /// installed, or no RBAC for them): read as empty, while the rest of identity works.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
}

impl Default for IdentityHealth {
    fn default() -> Self {
        IdentityHealth::off()
    }
}

impl IdentityHealth {
    pub fn off() -> IdentityHealth {
        IdentityHealth {
            source: IdentitySource::Off,
            synced: false,
            last_sync_age_s: None,
            stale: false,
            pods: 0,
            services: 0,
            nodes: 0,
            error: None,
            unavailable: Vec::new(),
        }
    }
}

/// A label selector in kubectl's syntax: `app=web,tier!=db,env in (a,b),!legacy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    text: String,
    reqs: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, String> {
        // Requirements are separated by commas outside parentheses.
        let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&text[start..]);
        let reqs = parts
            .into_iter()
            .map(|p| requirement(p.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if reqs.is_empty() {
            return Err("empty selector".into());
        }
        Ok(Selector {
            text: text.trim().to_string(),
            reqs,
        })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| match r {
            Requirement::Eq(k, v) => labels.get(k) == Some(v),
            Requirement::NotEq(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|x| vs.contains(x)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|x| !vs.contains(x)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn requirement(s: &str) -> Result<Requirement, String> {
    if s.is_empty() {
        return Err("empty requirement".into());
    }
    if let Some(k) = s.strip_prefix('!') {
        return Ok(Requirement::NotExists(key(k.trim())?));
    }
    for (op, not) in [(" notin ", true), (" in ", false)] {
        if let Some((k, set)) = s.split_once(op) {
            let set = set
                .trim()
                .strip_prefix('(')
                .and_then(|x| x.strip_suffix(')'))
                .ok_or_else(|| format!("{s:?}: the values of {} need (a,b)", op.trim()))?;
            let vs = set
                .split(',')
                .map(|v| value(v.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            let k = key(k.trim())?;
            return Ok(if not {
                Requirement::NotIn(k, vs)
            } else {
                Requirement::In(k, vs)
            });
        }
    }
    for (op, which) in [("!=", 2), ("==", 1), ("=", 1)] {
        if let Some((k, v)) = s.split_once(op) {
            let (k, v) = (key(k.trim())?, value(v.trim())?);
            return Ok(if which == 2 {
                Requirement::NotEq(k, v)
            } else {
                Requirement::Eq(k, v)
            });
        }
    }
    Ok(Requirement::Exists(key(s)?))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters (alphanumerics, `-`, `_`, `.`, beginning and ending alphanumeric).
fn key(k: &str) -> Result<String, String> {
    let name = match k.rsplit_once('/') {
        Some((prefix, name)) => {
            let ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !ok {
                return Err(format!("{k:?} is not a label key"));
            }
            name
        }
        None => k,
    };
    if name.is_empty() || !label_value_ok(name) {
        return Err(format!("{k:?} is not a label key"));
    }
    Ok(k.to_string())
}

fn value(v: &str) -> Result<String, String> {
    if label_value_ok(v) {
        Ok(v.to_string())
    } else {
        Err(format!("{v:?} is not a label value"))
    }
}

fn label_value_ok(v: &str) -> bool {
    let b = v.as_bytes();
    v.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_as_kubectl_does() -> Result<(), String> {
        let l = labels(&[
            ("app", "web"),
            ("tier", "front"),
            ("app.kubernetes.io/part-of", "shop"),
        ]);
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=db", false),
            ("app in (db, web)", true),
            ("app notin (db,web)", false),
            ("tier,app=web", true),
            ("!legacy", true),
            ("!tier", false),
            ("legacy!=x", true),
            ("app.kubernetes.io/part-of=shop,tier in (front)", true),
        ] {
            assert_eq!(Selector::parse(sel)?.matches(&l), want, "{sel}");
        }
        Ok(())
    }

    #[test]
    fn bad_selectors_are_refused() {
        for bad in [
            "",
            "=x",
            "app=",
            "app in web",
            "a b=c",
            "app=we b",
            "-x=y",
            "app=web,",
            "/x",
        ] {
            let parsed = Selector::parse(bad);
            // `app=` is a valid empty value in Kubernetes; the rest are not.
            if bad == "app=" {
                assert!(parsed.is_ok(), "{bad}");
            } else {
                assert!(parsed.is_err(), "{bad:?} accepted: {parsed:?}");
            }
        }
    }

    #[test]
    fn endpoints_have_stable_wire_names() -> Result<(), serde_json::Error> {
        let pod = Endpoint::Pod(PodRef {
            namespace: "default".into(),
            name: "web-1".into(),
            workload: Some(Workload {
                kind: "ReplicaSet".into(),
                name: "web-5d8f".into(),
            }),
            node: Some("node-a".into()),
            labels: labels(&[("app", "web")]),
        });
        let text = serde_json::to_string(&pod)?;
        assert!(
            text.starts_with(r#"{"kind":"pod","namespace":"default""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Endpoint>(&text)?, pod);
        assert_eq!(
            serde_json::to_string(&Endpoint::External)?,
            r#"{"kind":"external"}"#
        );
        assert_eq!(pod.name().as_deref(), Some("default/web-1"));
        Ok(())
    }
}
