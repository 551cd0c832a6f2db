//! Calico's policies as `DATASTORE_TYPE=kubernetes` serves them to felix, converted into the
//! [`Policy`] model that felix's chain names are computed from.
//!
//! Calico sources (projectcalico/calico, v3.32+):
//! - Kubernetes NetworkPolicies (networking.k8s.io/v1): `K8sNetworkPolicyToCalico` in
//!   `libcalico-go/lib/backend/k8s/conversion/conversion.go`: kind `KubernetesNetworkPolicy`,
//!   the Kubernetes name unchanged, tier `default`, one Allow rule per protocol and peer
//!   (`k8sRuleToCalico`). felix's policy id is then `knp/<namespace>/<name>`
//!   (`felix/types/policy_id.go`); before v3.32 it was NetworkPolicy `knp.default.<name>`.
//! - Calico's CRDs (crd.projectcalico.org/v1 NetworkPolicy, GlobalNetworkPolicy) carry the v3
//!   spec; their v3 name is `ConvertK8sResourceToCalicoResource`'s
//!   (`libcalico-go/lib/backend/k8s/resources/resources.go`): the name stored in the
//!   `projectcalico.org/metadata` annotation when it holds one, else the CRD's name with a
//!   `default.` prefix removed for tier `default` (`determinePolicyName`), and the CRD's name
//!   as it is when the annotation is absent.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::api::DynamicObject;
use serde_json::Value;

use crate::felix_policy::{parse_policy, Entity, Policy, PolicyKind, Rule};

/// libcalico-go's `metadataAnnotation`: the v3 ObjectMeta of a CRD-backed resource, as JSON.
const METADATA_ANNOTATION: &str = "projectcalico.org/metadata";
/// `apiv3.LabelOrchestrator`: every converted pod selector starts with it.
const ORCHESTRATOR_K8S: &str = "projectcalico.org/orchestrator == 'k8s'";

/// A Kubernetes NetworkPolicy as felix sees it in KDD mode.
pub fn knp(np: &NetworkPolicy) -> Option<Policy> {
    let name = np.metadata.name.clone()?;
    let spec = np.spec.as_ref();
    let ingress = spec
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| {
            rules(
                r.from.as_deref().unwrap_or_default(),
                r.ports.as_deref().unwrap_or_default(),
                true,
            )
        })
        .collect();
    let egress = spec
        .and_then(|s| s.egress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| {
            rules(
                r.to.as_deref().unwrap_or_default(),
                r.ports.as_deref().unwrap_or_default(),
                false,
            )
        })
        .collect();
    Some(Policy {
        kind: PolicyKind::KubernetesNetworkPolicy,
        namespace: np.metadata.namespace.clone(),
        name,
        tier: "default".into(),
        ingress,
        egress,
    })
}

/// `k8sRuleToCalico`: ports grouped by protocol (sorted; a rule without ports is one group of
/// any protocol), then one Allow rule per protocol and peer. The ports are kept as listed
/// (`SimplifyPorts`' merging of adjacent numbers is not modelled; it changes no rule count).
fn rules(peers: &[NetworkPolicyPeer], ports: &[NetworkPolicyPort], ingress: bool) -> Vec<Rule> {
    let mut by_proto: BTreeMap<String, Option<Vec<Value>>> = BTreeMap::new();
    if ports.is_empty() {
        by_proto.insert(String::new(), None);
    }
    for p in ports {
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        let port = p.port.as_ref().map(|port| {
            let s = match port {
                IntOrString::Int(n) => n.to_string(),
                IntOrString::String(s) => s.clone(),
            };
            match (p.end_port, s.parse::<u16>()) {
                (Some(end), _) => Value::String(format!("{s}:{end}")),
                (None, Ok(n)) => Value::from(n),
                (None, Err(_)) => Value::String(s),
            }
        });
        let entry = by_proto.entry(proto).or_insert_with(|| Some(Vec::new()));
        match port {
            // No port: every port of the protocol, which no later port narrows.
            None => *entry = None,
            Some(v) => {
                if let Some(list) = entry {
                    list.push(v);
                }
            }
        }
    }
    let peers: Vec<Option<&NetworkPolicyPeer>> = if peers.is_empty() {
        vec![None]
    } else {
        peers.iter().map(Some).collect()
    };
    let mut out = Vec::new();
    for (proto, ports) in by_proto {
        let protocol = (!proto.is_empty()).then_some(Value::String(proto));
        for peer in &peers {
            let mut peer_side = peer.map(entity).unwrap_or_default();
            let ports = ports.clone().unwrap_or_default();
            let mut rule = Rule {
                action: "Allow".into(),
                protocol: protocol.clone(),
                ..Rule::default()
            };
            if ingress {
                rule.source = peer_side;
                rule.destination.ports = ports;
            } else {
                peer_side.ports = ports;
                rule.destination = peer_side;
            }
            out.push(rule);
        }
    }
    out
}

/// `k8sPeerToCalicoFields`.
fn entity(peer: &NetworkPolicyPeer) -> Entity {
    if let Some(b) = &peer.ip_block {
        return Entity {
            nets: vec![b.cidr.clone()],
            not_nets: b.except.clone().unwrap_or_default(),
            ..Entity::default()
        };
    }
    let ns = peer
        .namespace_selector
        .as_ref()
        .map(|s| selector(Some(s), false));
    Entity {
        selector: Some(selector(peer.pod_selector.as_ref(), true)).filter(|s| !s.is_empty()),
        namespace_selector: ns.filter(|s| !s.is_empty()),
        ..Entity::default()
    }
}

/// `k8sSelectorToCalico`: a pod selector always starts with the orchestrator label; an empty
/// namespace selector selects every namespace.
fn selector(s: Option<&LabelSelector>, pod: bool) -> String {
    let mut parts: Vec<String> = Vec::new();
    if pod {
        parts.push(ORCHESTRATOR_K8S.into());
    }
    let Some(s) = s else {
        return parts.join(" && ");
    };
    let labels = s.match_labels.as_ref();
    let exprs = s.match_expressions.as_deref().unwrap_or_default();
    if !pod && labels.is_none_or(|l| l.is_empty()) && exprs.is_empty() {
        return "all()".into();
    }
    // A BTreeMap iterates sorted, as the conversion sorts the keys.
    for (k, v) in labels.into_iter().flatten() {
        parts.push(format!("{k} == '{v}'"));
    }
    for e in exprs {
        let values = e.values.as_deref().unwrap_or_default().join("', '");
        match e.operator.as_str() {
            "In" => parts.push(format!("{} in {{ '{values}' }}", e.key)),
            "NotIn" => parts.push(format!("{} not in {{ '{values}' }}", e.key)),
            "Exists" => parts.push(format!("has({})", e.key)),
            "DoesNotExist" => parts.push(format!("! has({})", e.key)),
            _ => {}
        }
    }
    parts.join(" && ")
}

/// A crd.projectcalico.org/v1 NetworkPolicy or GlobalNetworkPolicy, by its v3 name.
pub fn crd(kind: PolicyKind, obj: &DynamicObject) -> Result<Policy, String> {
    let crd_name = obj.metadata.name.clone().unwrap_or_default();
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    let tier = spec.get("tier").and_then(Value::as_str).unwrap_or("");
    let name = v3_name(
        &crd_name,
        tier,
        obj.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(METADATA_ANNOTATION))
            .map(String::as_str),
    );
    let mut metadata = serde_json::json!({ "name": name });
    if let Some(ns) = &obj.metadata.namespace {
        metadata["namespace"] = Value::String(ns.clone());
    }
    let json = serde_json::json!({ "metadata": metadata, "spec": spec });
    parse_policy(kind, &json.to_string()).map_err(|e| e.to_string())
}

/// `ConvertK8sResourceToCalicoResource`'s name for a policy CRD.
fn v3_name(crd_name: &str, tier: &str, metadata: Option<&str>) -> String {
    let Some(meta) = metadata else {
        return crd_name.to_string();
    };
    let stored = serde_json::from_str::<Value>(meta)
        .ok()
        .and_then(|m| m.get("name").and_then(Value::as_str).map(str::to_string))
        .filter(|n| !n.is_empty());
    match stored {
        Some(n) => n,
        None if tier.is_empty() || tier == "default" => crd_name
            .strip_prefix("default.")
            .unwrap_or(crd_name)
            .to_string(),
        None => crd_name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::felix_policy::PolicySet;
    use tracer_model::diagnosis::PolicyDirection;

    fn np(json: Value) -> NetworkPolicy {
        serde_json::from_value(json).unwrap_or_default()
    }

    #[test]
    fn a_kubernetes_network_policy_converts_as_libcalico_go_does() {
        let p = knp(&np(serde_json::json!({
            "metadata": {"name": "allow-web", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "web", "app": "x"}}},
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                    "ports": [{"port": 5432}, {"protocol": "UDP", "port": "dns"},
                        {"port": 8000, "endPort": 8080}]}],
                "policyTypes": ["Ingress"]}})));
        let Some(p) = p else { panic!("not converted") };
        assert_eq!(p.id(), "knp/shop/allow-web");
        assert_eq!(p.label(), "KubernetesNetworkPolicy shop/allow-web");
        // 26 characters: under felix's 28, not hashed.
        assert_eq!(
            p.chain(PolicyDirection::Ingress),
            "cali-pi-knp/shop/allow-web"
        );
        // TCP then UDP, each for both peers.
        assert_eq!(p.ingress.len(), 4);
        assert_eq!(
            p.ingress[0].describe(),
            "Allow TCP from selector \"projectcalico.org/orchestrator == 'k8s' && app == 'x' && role == 'web'\" to ports 5432,8000:8080"
        );
        assert_eq!(
            p.ingress[1].describe(),
            "Allow TCP from nets 10.0.0.0/8 notNets 10.1.0.0/16 to ports 5432,8000:8080"
        );
        assert_eq!(p.ingress[2].describe(), "Allow UDP from selector \"projectcalico.org/orchestrator == 'k8s' && app == 'x' && role == 'web'\" to ports dns");
        assert!(p.egress.is_empty());
        // An empty rule allows everything; an empty namespace selector is all().
        let p = knp(&np(serde_json::json!({
            "metadata": {"name": "e", "namespace": "shop"},
            "spec": {"podSelector": {}, "egress": [{}, {"to": [{"namespaceSelector": {}}]}]}})));
        let Some(p) = p else { panic!("not converted") };
        assert_eq!(p.egress[0].describe(), "Allow");
        assert_eq!(
            p.egress[1].describe(),
            "Allow to selector \"projectcalico.org/orchestrator == 'k8s'\" namespaceSelector \"all()\""
        );
    }

    #[test]
    fn crd_names_follow_libcalico_go() {
        assert_eq!(v3_name("default.a", "", None), "default.a");
        assert_eq!(v3_name("default.a", "default", Some("{}")), "a");
        assert_eq!(v3_name("default.a", "other", Some("{}")), "default.a");
        assert_eq!(
            v3_name("default.a", "default", Some(r#"{"name":"default.a"}"#)),
            "default.a"
        );
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "security.deny-web-b", "namespace": "shop",
                "annotations": {METADATA_ANNOTATION: "{\"name\":\"security.deny-web-b\",\"namespace\":\"shop\"}"}},
            "spec": {"tier": "security", "ingress": [{"action": "Deny", "protocol": "TCP"}]}}))
        .unwrap_or_else(|_| DynamicObject::new("x", &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&())));
        let p = crd(PolicyKind::NetworkPolicy, &obj);
        let Ok(p) = p else { panic!("{p:?}") };
        assert_eq!(
            (p.id().as_str(), p.tier.as_str()),
            ("np/shop/security.deny-web-b", "security")
        );
        let set = PolicySet::new([p.clone()]);
        assert!(set.by_chain(&p.chain(PolicyDirection::Ingress)).is_some());
    }
}
