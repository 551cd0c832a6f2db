//! deploy/ says what the binary does: the DaemonSet's arguments parse with the real CLI, its
//! probes hit endpoints a real agent serves without a token, its port matches the Service, it
//! asks for exactly the capabilities tracer needs (and a real agent holding only those traces
//! paths and drops), no privileged mode, no writable host path, the runtime's seccomp filter and
//! a priority that outlives the workloads.
mod common;

use std::collections::BTreeSet;

use clap::Parser;
use common::{probe_apiserver_and_wait, query, Launch, TestResult, READY};
use tracer_lab::topo::SingleNode;
use tracer_model::Verdict;
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
    let token_path = agent_args.token_file.clone().ok_or("no --token-file")?;
    // The API is on the node network: it must not be open without a token.
    assert!(!agent_args.listen.ip().is_loopback());
    assert!(
        !agent_args.insecure,
        "the DaemonSet must not pass --insecure"
    );

    // Capabilities: exactly these, everything else dropped, never privileged. Not
    // SYS_RESOURCE: kernels >= 5.11 charge BPF memory to the memory cgroup (checked below by
    // running the agent with only these).
    let sc = &c["securityContext"];
    let add: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let want: BTreeSet<String> = ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"]
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
    for need in ["/sys/kernel/tracing", "/sys/kernel/btf"] {
        assert!(
            mounts.iter().any(|m| m == need),
            "{need} not mounted: {mounts:?}"
        );
    }
    assert!(
        mounts.iter().any(|m| token_path.starts_with(m)),
        "token {token_path:?} not mounted: {mounts:?}"
    );
    // The agent pins nothing, so it needs no bpffs; every mount is read-only.
    assert!(
        !mounts.iter().any(|m| m.starts_with("/sys/fs/bpf")),
        "bpffs mounted: {mounts:?}"
    );
    for m in c["volumeMounts"].as_vec().into_iter().flatten() {
        assert_eq!(m["readOnly"].as_bool(), Some(true), "writable mount {m:?}");
    }
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));

    // The runtime's syscall filter, for the pod or the container.
    let seccomp = |y: &Yaml| y["seccompProfile"]["type"].as_str().map(String::from);
    assert_eq!(
        seccomp(sc).or_else(|| seccomp(&pod["securityContext"])),
        Some("RuntimeDefault".to_string())
    );
    // Not evicted before the workloads it explains.
    assert_eq!(
        pod["priorityClassName"].as_str(),
        Some("system-node-critical")
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

    // RBAC: reads of exactly what identity watches, bound to the DaemonSet's account.
    let role = kind(&docs, "ClusterRole").ok_or("no ClusterRole")?;
    let mut resources = BTreeSet::new();
    for rule in role["rules"].as_vec().into_iter().flatten() {
        assert_eq!(strings(&rule["apiGroups"]), vec![String::new()], "{rule:?}");
        for verb in strings(&rule["verbs"]) {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "write verb {verb}"
            );
        }
        resources.extend(strings(&rule["resources"]));
    }
    let want_res: BTreeSet<String> = ["pods", "services", "nodes"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(resources, want_res);
    let binding = kind(&docs, "ClusterRoleBinding").ok_or("no ClusterRoleBinding")?;
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["name"].as_str(),
        pod["serviceAccountName"].as_str()
    );
    // Identity configured as calico-node is: the datastore type, and NODENAME from the
    // downward API.
    let env = c["env"].as_vec().ok_or("no env")?;
    let var = |n: &str| env.iter().find(|e| e["name"].as_str() == Some(n));
    assert_eq!(
        var("DATASTORE_TYPE").and_then(|e| e["value"].as_str()),
        Some("kubernetes")
    );
    assert_eq!(
        var("NODENAME").and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str()),
        Some("spec.nodeName")
    );

    // A real agent started the same way (with a token), holding only the manifest's
    // capabilities (a root process gets no more than its bounding set, as in the container).
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let token_file = std::env::temp_dir().join(format!("tracer-deploy-token-{}", lab.prefix));
    std::fs::write(&token_file, "deploy-test-token")?;
    let token_arg = token_file.to_string_lossy().to_string();
    let bounding = std::iter::once("-all".to_string())
        .chain(add.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    // `ip netns exec` remounts /sys, hiding tracefs; the kubelet's host-path mount is played by
    // mounting it before the capabilities go (the agent itself cannot: no CAP_SYS_ADMIN).
    // RLIMIT_MEMLOCK is cut to 64 KiB, far below the 8 MiB ring: BPF memory is charged to the
    // memory cgroup, so without CAP_SYS_RESOURCE (to raise the limit) nothing changes.
    let wrapper = [
        "sh",
        "-c",
        "mount -t tracefs tracefs /sys/kernel/tracing && ulimit -l 64 && exec \"$@\"",
        "sh",
        "setpriv",
        "--bounding-set",
        bounding.as_str(),
        "--inh-caps",
        "-all",
        "--",
    ];
    let mut agent = common::launch(
        &lab.node,
        Launch::with_args(&["--token-file", &token_arg]).wrapper(&wrapper),
    )?;
    agent.wait_ready(&lab.node, READY)?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .ok_or("no CapEff")?;
    // CAP_NET_ADMIN 12, CAP_NET_RAW 13, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(
        u64::from_str_radix(cap_eff, 16)?,
        (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39),
        "the agent holds more than the manifest's capabilities"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid()))?;
    let memlock = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .ok_or("no memlock limit")?;
    assert!(memlock.contains(" 65536 "), "{memlock}");
    // The probes answer without a token.
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["port"].as_i64(), Some(i64::from(port)), "{probe}");
        let path = get["path"].as_str().ok_or("probe path")?;
        let r = agent.get(&lab.node, path)?;
        assert_eq!(r.status, 200, "{probe} {path}: {}", r.text());
    }
    // With only those capabilities it attaches, traces drops, and follows a flow through NAT.
    agent.token = Some("deploy-test-token".into());
    let health = agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let health = health.detail.ok_or("/healthz without its detail")?;
    assert!(health.drops.enabled, "{health:?}");
    assert_eq!(health.pools.source, "ipset", "{health:?}");
    // felix's natOutgoing rule is readable with those capabilities too (`iptables-save`).
    assert_eq!(
        health.pools.nat_outgoing_v4.as_ref().map(|n| n.rules),
        Some(1),
        "{:?}",
        health.pools
    );
    probe_apiserver_and_wait(
        &agent,
        &lab,
        &query(&format!("dst={}&proto=tcp", lab.config.apiserver_ip))?,
        std::time::Duration::from_secs(10),
        |f| f.verdicts.contains(&Verdict::SnatApplied),
    )?;
    let _ = std::fs::remove_file(&token_file);
    Ok(())
}
