//! The container image, built and run as the DaemonSet runs it: scripts/build-image.sh makes it
//! FROM scratch from the binary under test; podman starts it inside a lab node's network
//! namespace with exactly the security context deploy/base/daemonset.yaml asks for (the
//! capabilities it adds and nothing else, read-only root, no privilege escalation, not
//! privileged, the runtime's default seccomp filter, tracefs and BTF mounted read-only, the
//! token from a file); it must attach and diagnose seed 002.
//!
//! "RuntimeDefault" is containerd's default profile there, which lets CAP_BPF and CAP_PERFMON
//! holders call bpf() and perf_event_open(). Podman's own default (containers/common, as
//! CRI-O's) allows them only with CAP_SYS_ADMIN, so the test derives containerd's rule from
//! podman's profile rather than add SYS_ADMIN (deploy/README.md says the same for CRI-O).
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{connect_via_vip, run_tool as run, yaml_strings, Client, TestResult, API_PORT, VIP};
use serde_json::Value;
use tracer_lab::topo::SingleNode;
use tracer_model::{Cause, FlowsPage};
use yaml_rust2::YamlLoader;

const TOKEN: &str = "image-test-token";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Podman told about this machine's limits (tight RLIMIT_NOFILE, a cgroup layout crun refuses)
/// through a containers.conf of our own; the machine's /etc/containers stays as it is.
struct Podman {
    dir: PathBuf,
    image: String,
    container: String,
}

impl Podman {
    fn new() -> Result<Podman, Box<dyn std::error::Error>> {
        let id = std::process::id();
        let dir = std::env::temp_dir().join(format!("tracer-image-{id}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\n",
        )?;
        std::fs::write(dir.join("token"), TOKEN)?;
        Ok(Podman {
            dir,
            image: format!("localhost/tracer:test-{id}"),
            container: format!("tracer-test-{id}"),
        })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c
    }

    /// containerd's RuntimeDefault: podman's default profile, with bpf() and
    /// perf_event_open() allowed to CAP_BPF and CAP_PERFMON holders instead of CAP_SYS_ADMIN
    /// ones only.
    fn runtime_default_seccomp(&self) -> Result<PathBuf, Box<dyn std::error::Error>> {
        let mut p: Value =
            serde_json::from_slice(&std::fs::read("/usr/share/containers/seccomp.json")?)?;
        let gated = ["bpf", "perf_event_open"];
        let rules = p["syscalls"]
            .as_array_mut()
            .ok_or("no syscalls in the profile")?;
        for r in rules.iter_mut() {
            let denies_without_admin =
                r["excludes"]["caps"] == serde_json::json!(["CAP_SYS_ADMIN"]);
            if denies_without_admin {
                if let Some(names) = r["names"].as_array_mut() {
                    names.retain(|n| !gated.iter().any(|g| n == g));
                }
            }
        }
        rules.retain(|r| r["names"].as_array().is_some_and(|n| !n.is_empty()));
        for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
            rules.push(serde_json::json!({
                "names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}
            }));
        }
        let path = self.dir.join("seccomp.json");
        std::fs::write(&path, serde_json::to_vec(&p)?)?;
        Ok(path)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["rm", "-f", "-t", "5", &self.container])
            .output();
        let _ = self.cmd().args(["rmi", "-f", &self.image]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The agent container's security context and mounts, as deploy/base/daemonset.yaml has them.
struct SecurityContext {
    caps: Vec<String>,
    read_only: bool,
    no_new_privileges: bool,
    privileged: bool,
    seccomp: String,
    read_only_mounts: Vec<String>,
}

fn daemonset_context() -> Result<SecurityContext, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(repo().join("deploy/base/daemonset.yaml"))?;
    let docs = YamlLoader::load_from_str(&text)?;
    let ds = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .ok_or("no DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    let strs = yaml_strings;
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let host_paths: Vec<(String, String)> = pod["volumes"]
        .as_vec()
        .ok_or("no volumes")?
        .iter()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_string(),
                v["hostPath"]["path"].as_str()?.to_string(),
            ))
        })
        .collect();
    let mut read_only_mounts = Vec::new();
    for m in c["volumeMounts"].as_vec().ok_or("no volumeMounts")? {
        let name = m["name"].as_str().unwrap_or_default();
        if let Some((_, host)) = host_paths.iter().find(|(n, _)| n == name) {
            assert_eq!(
                m["readOnly"].as_bool(),
                Some(true),
                "{name} is mounted read-only"
            );
            let at = m["mountPath"].as_str().ok_or("no mountPath")?;
            read_only_mounts.push(format!("{host}:{at}:ro"));
        }
    }
    Ok(SecurityContext {
        caps: strs(&sc["capabilities"]["add"]),
        read_only: sc["readOnlyRootFilesystem"].as_bool() == Some(true),
        no_new_privileges: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
        privileged: sc["privileged"].as_bool() == Some(true),
        seccomp: pod["securityContext"]["seccompProfile"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        read_only_mounts,
    })
}

#[test]
fn the_image_runs_with_the_daemonsets_security_context_and_diagnoses_seed_002() -> TestResult {
    let podman = Podman::new()?;
    let manifest = podman.dir.join("manifest.tsv");
    let built = run(Command::new("bash")
        .arg(repo().join("scripts/build-image.sh"))
        .arg(env!("CARGO_BIN_EXE_tracer"))
        .arg(&podman.image)
        .arg(&manifest)
        .env("CONTAINERS_CONF", podman.dir.join("containers.conf")))?;
    println!("{}", built.trim());
    let size: u64 =
        run(podman
            .cmd()
            .args(["image", "inspect", "--format", "{{.Size}}", &podman.image]))?
        .trim()
        .parse()?;
    // FROM scratch: the agent, iptables/ipset and their libraries. A base image creeping in
    // would show here.
    assert!(size < 48 << 20, "the image grew to {size} bytes");
    let listed = std::fs::read_to_string(&manifest)?;
    assert!(listed
        .lines()
        .all(|l| l.split('\t').nth(1).is_some_and(|why| !why.is_empty())));

    let sc = daemonset_context()?;
    assert!(sc.read_only && sc.no_new_privileges && !sc.privileged);
    assert_eq!(sc.seccomp, "RuntimeDefault");

    let lab = SingleNode::build(&SingleNode::seed_002())?;
    let netns = format!("ns:/run/netns/{}", lab.node.name());
    let seccomp = podman.runtime_default_seccomp()?;
    let mut run_cmd = podman.cmd();
    run_cmd
        .args([
            "run",
            "-d",
            "--name",
            &podman.container,
            "--network",
            &netns,
        ])
        .args(["--cap-drop", "ALL", "--cap-add", &sc.caps.join(",")])
        .arg("--read-only")
        .args(["--security-opt", "no-new-privileges"])
        .arg("--security-opt")
        .arg(format!("seccomp={}", seccomp.display()))
        .arg("-v")
        .arg(format!(
            "{}:/etc/tracer/token:ro",
            podman.dir.join("token").display()
        ));
    for m in &sc.read_only_mounts {
        run_cmd.args(["-v", m]);
    }
    run_cmd.arg(&podman.image).args([
        "agent",
        "--listen",
        &format!("0.0.0.0:{API_PORT}"),
        "--token-file",
        "/etc/tracer/token",
        "--no-reply-timeout",
        "2s",
    ]);
    run(&mut run_cmd)?;
    let logs = || {
        podman
            .cmd()
            .args(["logs", &podman.container])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    };
    // Exactly the capabilities asked for, nothing more.
    let caps = run(podman.cmd().args([
        "inspect",
        "--format",
        "{{.EffectiveCaps}} {{.HostConfig.ReadonlyRootfs}}",
        &podman.container,
    ]))?;
    for cap in &sc.caps {
        assert!(caps.contains(&format!("CAP_{cap}")), "{caps}");
    }
    assert_eq!(caps.matches("CAP_").count(), sc.caps.len(), "{caps}");
    assert!(caps.trim().ends_with("true"), "read-only root: {caps}");

    let client = Client::new(std::net::SocketAddr::from(([127, 0, 0, 1], API_PORT)));
    let auth = format!("Authorization: Bearer {TOKEN}");
    let get = |path: &str| -> Result<Value, Box<dyn std::error::Error>> {
        let r = client.request(&lab.node, "GET", path, None, &[auth.as_str()])?;
        if r.status != 200 {
            return Err(format!("{path}: {} {}", r.status, r.text()).into());
        }
        Ok(serde_json::from_slice(&r.body)?)
    };
    // Attached to the pod's veth and the host NIC, and the kernel-drop program loaded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = get("/healthz");
        let attached = |h: &Value, iface: &str| {
            h["attached"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["name"] == iface))
        };
        if let Ok(h) = &h {
            if attached(h, &lab.pod.veth) && attached(h, "eth0") {
                assert_eq!(
                    h["drops"]["enabled"], true,
                    "drop tracing in the container: {h}"
                );
                break;
            }
        }
        if Instant::now() > deadline {
            return Err(format!("not attached in the container: {h:?}\n{}", logs()).into());
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // Seed 002: the pod's connection to the apiserver VIP leaves un-masqueraded.
    assert!(
        !connect_via_vip(&lab)?,
        "the VIP must not answer in this lab"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let page: FlowsPage = serde_json::from_value(get(&format!("/flows?dst={VIP}"))?)?;
        let cause = page
            .flows
            .iter()
            .find_map(|f| f.diagnosis.as_ref().map(|d| d.cause));
        if cause == Some(Cause::IppoolOverlapsHostNetwork) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "seed 002 not diagnosed in the container: {page:?}\n{}",
                logs()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // It read felix's sets with the ipset tool inside the image.
    assert_eq!(get("/healthz")?["pools"]["source"], "ipset");
    Ok(())
}
