//! deploy/ as Kubernetes sees it: every overlay renders with `kubectl kustomize` and every object
//! it renders validates, in strict mode, against the schemas of the Kubernetes versions tracer
//! supports (the PyPI package kubernetes-validate, installed by scripts/setup.sh). Then what each
//! overlay promises is checked on the rendered objects: no credentials in plain, a Secret the pods
//! really mount in token-secret, read-only RBAC on exactly pods/services/nodes (and list/watch on
//! felix's policy kinds) in identity.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use yaml_rust2::{Yaml, YamlLoader};

mod common;

use common::{run_tool as run, TestResult};

/// Oldest to newest Kubernetes that current Calico releases support, with one in between.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.32.0", "1.35.0", "1.37.0"];
const OVERLAYS: &[&str] = &["plain", "token-secret", "identity", "monitoring"];

/// A copy of deploy/ in a fresh directory, with the `token` file the token overlay reads (never
/// committed), removed on drop.
struct Tree(PathBuf);

impl Tree {
    fn new() -> Result<Tree, Box<dyn std::error::Error>> {
        // Tests run in parallel: one directory each.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tracer-manifests-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let out = Command::new("cp").arg("-r").arg(&src).arg(&dir).output()?;
        if !out.status.success() {
            return Err(format!("cp: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        std::fs::write(dir.join("overlays/token-secret/token"), TOKEN)?;
        Ok(Tree(dir))
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const TOKEN: &str = "test-token-not-a-secret";

/// Renders an overlay, validates it against every supported version, and parses it.
fn render(tree: &Tree, overlay: &str) -> Result<Vec<Yaml>, Box<dyn std::error::Error>> {
    let text = run(Command::new("kubectl")
        .arg("kustomize")
        .arg(tree.0.join("overlays").join(overlay)))?;
    let file = tree.0.join(format!("{overlay}.rendered.yaml"));
    std::fs::write(&file, &text)?;
    for v in KUBERNETES_VERSIONS {
        run(Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", v])
            .arg(&file))
        .map_err(|e| format!("overlay {overlay} against Kubernetes {v}: {e}"))?;
    }
    Ok(YamlLoader::load_from_str(&text)?)
}

fn find<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn pod_spec(docs: &[Yaml]) -> Result<&Yaml, Box<dyn std::error::Error>> {
    let ds = find(docs, "DaemonSet");
    let [ds] = ds.as_slice() else {
        return Err(format!("{} DaemonSets", ds.len()).into());
    };
    Ok(&ds["spec"]["template"]["spec"])
}

fn env_names(pod: &Yaml) -> Vec<String> {
    pod["containers"][0]["env"]
        .as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|e| e["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_overlay_renders_and_validates_against_supported_kubernetes() -> TestResult {
    let tree = Tree::new()?;
    for overlay in OVERLAYS {
        let docs = render(&tree, overlay)?;
        assert!(!docs.is_empty(), "{overlay} rendered nothing");
        for d in &docs {
            assert_eq!(
                d["metadata"]["labels"]["app.kubernetes.io/name"].as_str(),
                Some("tracer"),
                "{overlay}: every object is labelled as tracer's: {d:?}"
            );
            if d["kind"].as_str() != Some("ClusterRole")
                && d["kind"].as_str() != Some("ClusterRoleBinding")
            {
                assert_eq!(d["metadata"]["namespace"].as_str(), Some("kube-system"));
            }
        }
        let pod = pod_spec(&docs)?;
        // Every overlay mounts the token Secret by the name clients read it from.
        assert_eq!(
            pod["volumes"][0]["secret"]["secretName"].as_str(),
            Some("tracer-token")
        );
    }
    Ok(())
}

#[test]
fn plain_holds_no_api_credentials() -> TestResult {
    let tree = Tree::new()?;
    let docs = render(&tree, "plain")?;
    assert!(find(&docs, "ClusterRole").is_empty() && find(&docs, "Role").is_empty());
    assert!(
        find(&docs, "Secret").is_empty(),
        "plain expects the Secret made by hand"
    );
    let sa = find(&docs, "ServiceAccount");
    assert_eq!(sa.len(), 1);
    assert_eq!(sa[0]["automountServiceAccountToken"].as_bool(), Some(false));
    let pod = pod_spec(&docs)?;
    assert_ne!(pod["automountServiceAccountToken"].as_bool(), Some(true));
    assert!(!env_names(pod).iter().any(|n| n == "DATASTORE_TYPE"));
    Ok(())
}

#[test]
fn token_secret_generates_the_secret_the_pods_mount() -> TestResult {
    let tree = Tree::new()?;
    let docs = render(&tree, "token-secret")?;
    let secrets = find(&docs, "Secret");
    let [s] = secrets.as_slice() else {
        return Err(format!("{} Secrets", secrets.len()).into());
    };
    assert_eq!(s["metadata"]["name"].as_str(), Some("tracer-token"));
    let data = s["data"]["token"].as_str().ok_or("no data.token")?;
    let decoded = run(Command::new("sh")
        .arg("-c")
        .arg(format!("printf %s '{data}' | base64 -d")))?;
    assert_eq!(decoded, TOKEN, "the Secret holds the token file's bytes");
    let pod = pod_spec(&docs)?;
    assert_eq!(
        pod["volumes"][0]["secret"]["items"][0]["key"].as_str(),
        Some("token")
    );
    // `kubectl tracer` finds the agents and their token by the names tracer-model defines.
    use tracer_model::defaults;
    assert_eq!(s["metadata"]["name"].as_str(), Some(defaults::TOKEN_SECRET));
    assert_eq!(
        s["metadata"]["namespace"].as_str(),
        Some(defaults::NAMESPACE)
    );
    assert!(s["data"][defaults::TOKEN_SECRET_KEY].as_str().is_some());
    let ds = find(&docs, "DaemonSet");
    let labels = &ds.first().ok_or("no DaemonSet")?["spec"]["template"]["metadata"]["labels"];
    let (key, value) = defaults::AGENT_SELECTOR
        .split_once('=')
        .ok_or("AGENT_SELECTOR is key=value")?;
    assert_eq!(labels[key].as_str(), Some(value), "{labels:?}");
    let ports = &pod["containers"][0]["ports"][0];
    assert_eq!(ports["name"].as_str(), Some("http"));
    assert_eq!(
        ports["containerPort"].as_i64(),
        Some(i64::from(defaults::API_PORT))
    );
    Ok(())
}

#[test]
fn identity_grants_read_only_access_to_pods_services_and_nodes() -> TestResult {
    let tree = Tree::new()?;
    let docs = render(&tree, "identity")?;
    let roles = find(&docs, "ClusterRole");
    let [role] = roles.as_slice() else {
        return Err(format!("{} ClusterRoles", roles.len()).into());
    };
    let rules = role["rules"].as_vec().ok_or("no rules")?;
    let strs = |y: &Yaml| -> Vec<String> {
        let mut v: Vec<String> = y
            .as_vec()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    assert_eq!(rules.len(), 3, "{rules:?}");
    assert_eq!(strs(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strs(&rules[0]["resources"]), ["nodes", "pods", "services"]);
    assert_eq!(strs(&rules[0]["verbs"]), ["get", "list", "watch"]);
    // felix's policies in the Kubernetes datastore: list/watch, exactly these kinds.
    assert_eq!(strs(&rules[1]["apiGroups"]), ["networking.k8s.io"]);
    assert_eq!(strs(&rules[1]["resources"]), ["networkpolicies"]);
    assert_eq!(strs(&rules[1]["verbs"]), ["list", "watch"]);
    assert_eq!(strs(&rules[2]["apiGroups"]), ["crd.projectcalico.org"]);
    assert_eq!(
        strs(&rules[2]["resources"]),
        ["globalnetworkpolicies", "networkpolicies"]
    );
    assert_eq!(strs(&rules[2]["verbs"]), ["list", "watch"]);
    let bindings = find(&docs, "ClusterRoleBinding");
    let [b] = bindings.as_slice() else {
        return Err(format!("{} ClusterRoleBindings", bindings.len()).into());
    };
    assert_eq!(
        b["roleRef"]["name"].as_str(),
        role["metadata"]["name"].as_str()
    );
    assert_eq!(b["subjects"][0]["name"].as_str(), Some("tracer"));
    assert_eq!(b["subjects"][0]["namespace"].as_str(), Some("kube-system"));
    let pod = pod_spec(&docs)?;
    assert_eq!(pod["serviceAccountName"].as_str(), Some("tracer"));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(true));
    let env = pod["containers"][0]["env"].as_vec().ok_or("no env")?;
    let var = |name: &str| env.iter().find(|e| e["name"].as_str() == Some(name));
    assert_eq!(
        var("DATASTORE_TYPE").and_then(|e| e["value"].as_str()),
        Some("kubernetes")
    );
    assert_eq!(
        var("NODENAME").and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str()),
        Some("spec.nodeName"),
        "NODENAME as calico-node gets it"
    );
    // The base's own variables survive the patch.
    assert!(var("TRACER_TOKEN_FILE").is_some());
    Ok(())
}

#[test]
fn an_invalid_object_is_rejected_by_the_validator() -> TestResult {
    // The validator itself is live: a field Kubernetes does not know fails strict validation.
    let tree = Tree::new()?;
    let bad = tree.0.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: tracer\nspec:\n  clusterIp: None\n",
    )?;
    let r = run(Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSIONS[0]])
        .arg(&bad));
    assert!(r.is_err(), "a misspelt field passed strict validation");
    Ok(())
}

#[test]
fn monitoring_scrapes_the_agents_with_their_token() -> TestResult {
    let tree = Tree::new()?;
    let docs = render(&tree, "monitoring")?;
    let monitors = find(&docs, "PodMonitor");
    let [m] = monitors.as_slice() else {
        return Err(format!("{} PodMonitors", monitors.len()).into());
    };
    let ds = find(&docs, "DaemonSet");
    let pod_labels = &ds.first().ok_or("no DaemonSet")?["spec"]["template"]["metadata"]["labels"];
    // It selects the agents' pods, on a port they expose, with the Secret the overlay makes.
    for (k, v) in m["spec"]["selector"]["matchLabels"]
        .as_hash()
        .ok_or("no matchLabels")?
    {
        assert_eq!(
            &pod_labels[k.as_str().unwrap_or_default()],
            v,
            "selector {k:?}"
        );
    }
    let ep = &m["spec"]["podMetricsEndpoints"][0];
    let port = ep["port"].as_str().ok_or("no port")?;
    let pod = pod_spec(&docs)?;
    let ports = pod["containers"][0]["ports"].as_vec().ok_or("no ports")?;
    assert!(
        ports.iter().any(|p| p["name"].as_str() == Some(port)),
        "{port}"
    );
    let secret = find(&docs, "Secret");
    let secret = secret.first().ok_or("no Secret")?;
    let creds = &ep["authorization"]["credentials"];
    assert_eq!(creds["name"], secret["metadata"]["name"]);
    assert!(!secret["data"][creds["key"].as_str().unwrap_or_default()].is_badvalue());
    assert_eq!(ep["relabelings"][0]["targetLabel"].as_str(), Some("node"));
    Ok(())
}
