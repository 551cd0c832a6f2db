//! deploy/ says what the binary does: the DaemonSet's arguments parse with the real CLI, its
//! probes hit endpoints a real agent serves without a token, its port matches the Service, and it
//! asks for exactly the capabilities tracer needs and no privileged mode.
mod common;

use std::collections::BTreeSet;

use clap::Parser;
use common::{Agent, TestResult};
use tracer_lab::topo::SingleNode;
use yaml_rust2::{Yaml, YamlLoader};

fn docs() -> Result<Vec<Yaml>, Box<dyn std::error::Error>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(path)?;
    Ok(YamlLoader::load_from_str(&text)?)
}

fn kind<'a>(docs: &'a [Yaml], k: &str) -> Option<&'a Yaml> {
    docs.iter().find(|d| d["kind"].as_str() == Some(k))
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn daemonset_matches_the_binary() -> TestResult {
    let docs = docs()?;
    let ds = kind(&docs, "DaemonSet").ok_or("no DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    // The arguments are valid for this very binary.
    let mut argv = vec!["tracer".to_string()];
    argv.extend(args.iter().cloned());
    let cli = tracer::cli::Cli::try_parse_from(&argv).map_err(|e| format!("{args:?}: {e}"))?;
    let tracer::cli::Command::Agent(agent_args) = cli.command else {
        return Err("the DaemonSet does not run `tracer agent`".into());
    };
    let port = agent_args.listen.port();
    assert_eq!(
        c["ports"][0]["containerPort"].as_i64(),
        Some(i64::from(port))
    );
    let token_path = agent_args.token_file.ok_or("no --token-file")?;

    // Capabilities: exactly these, everything else dropped, never privileged.
    let sc = &c["securityContext"];
    let add: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let want: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(add, want);
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        vec!["ALL".to_string()]
    );
    assert_ne!(sc["privileged"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));

    // What the agent needs from the host is mounted.
    let mounts: Vec<String> = c["volumeMounts"]
        .as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|m| m["mountPath"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for need in ["/sys/fs/bpf", "/sys/kernel/tracing", "/sys/kernel/btf"] {
        assert!(
            mounts.iter().any(|m| m == need),
            "{need} not mounted: {mounts:?}"
        );
    }
    assert!(
        mounts.iter().any(|m| token_path.starts_with(m)),
        "token {token_path:?} not mounted: {mounts:?}"
    );

    // The headless Service selects these pods on the agent's port.
    let svc = kind(&docs, "Service").ok_or("no Service")?;
    assert_eq!(svc["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(
        svc["spec"]["ports"][0]["port"].as_i64(),
        Some(i64::from(port))
    );
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    if let Some(sel) = svc["spec"]["selector"].as_hash() {
        for (k, v) in sel {
            assert_eq!(
                &labels[k.as_str().unwrap_or("")],
                v,
                "Service selector {k:?}"
            );
        }
    }

    // RBAC reads only.
    if let Some(role) = kind(&docs, "ClusterRole") {
        for rule in role["rules"].as_vec().into_iter().flatten() {
            for verb in strings(&rule["verbs"]) {
                assert!(
                    ["get", "list", "watch"].contains(&verb.as_str()),
                    "write verb {verb}"
                );
            }
        }
    }

    // The probes answer on a real agent started the same way (with a token), without one.
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let token_file = std::env::temp_dir().join(format!("tracer-deploy-token-{}", lab.prefix));
    std::fs::write(&token_file, "deploy-test-token")?;
    let token_arg = token_file.to_string_lossy().to_string();
    let mut agent = Agent::start(&lab.node, &["--token-file", &token_arg])?;
    agent.wait_ready(&lab.node)?;
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["port"].as_i64(), Some(i64::from(port)), "{probe}");
        let path = get["path"].as_str().ok_or("probe path")?;
        let (status, body) = agent.get(&lab.node, path)?;
        assert_eq!(status, 200, "{probe} {path}: {body}");
    }
    let _ = std::fs::remove_file(&token_file);
    Ok(())
}
