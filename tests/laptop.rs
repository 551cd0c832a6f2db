//! `kubectl tracer` from a laptop, through the API server: the real `tracer` binary invoked as
//! `kubectl-tracer` (a symlink, as a krew install leaves it) with a kubeconfig pointing at the
//! lab's Kubernetes API **stand-in** (`tracer_lab::kube`; no kube-apiserver installs here). The
//! stand-in listens on this process's loopback, outside every lab namespace, as a cluster's
//! API server is reachable from a laptop; its pods/proxy opens connections to the agents from
//! the lab's external host on the nodes' LAN. Two lab nodes run real agents with token auth.
mod common;

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use common::{Agent, Res, TestResult, READY};
use tracer_lab::{
    daemon::poll,
    kube::{self, KubeStandin, Store},
    netns::Netns,
    topo::{Cluster, ClusterConfig, ClusterPod},
    traffic,
};
use tracer_model::{defaults, FlowView};

const TOKEN: &str = "laptop-test-token-5b1e";
/// The watch's lease: short, so a vanished client's hold lapses quickly.
const TTL: Duration = Duration::from_secs(3);

struct Laptop {
    /// Holds the `kubectl-tracer` symlink and the kubeconfigs; removed on drop.
    dir: PathBuf,
    /// One per node, `None` once stopped.
    agents: Vec<Option<Agent>>,
    _standin: KubeStandin,
    store: Arc<Store>,
    lab: Cluster,
}

impl Drop for Laptop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Laptop {
    /// The plugin as kubectl runs it, from outside every lab namespace, with no in-cluster
    /// variables.
    fn kubectl_tracer(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.dir.join("kubectl-tracer"));
        c.args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("TRACER_AGENT")
            .env_remove("TRACER_TOKEN_FILE")
            .env_remove("TRACER_VIA")
            .env("KUBECONFIG", self.kubeconfig_list());
        c
    }

    /// `kubectl tracer watch pod/NAME -n NS` and more arguments.
    fn watch(&self, pod: &ClusterPod, more: &[&str]) -> Command {
        let target = format!("pod/{}", pod.pod.name);
        let mut args = vec!["watch", &target, "-n", &pod.pod.namespace];
        args.extend_from_slice(more);
        self.kubectl_tracer(&args)
    }

    /// KUBECONFIG as a list, merged as kubectl merges it: the first file knows only another
    /// cluster and sets no current context; the second names the stand-in and makes it
    /// current. Only the merge reaches the stand-in.
    fn kubeconfig_list(&self) -> String {
        format!(
            "{}:{}",
            self.dir.join("other.yaml").display(),
            self.dir.join("standin.yaml").display()
        )
    }

    fn run(&self, args: &[&str]) -> Res<Output> {
        Ok(self.kubectl_tracer(args).output()?)
    }

    fn agent(&self, node: usize) -> Res<&Agent> {
        Ok(self.agents[node].as_ref().ok_or("agent stopped")?)
    }

    fn node_ns(&self, node: usize) -> &Netns {
        &self.lab.nodes[node].netns
    }

    /// Interfaces the agent on `node` has attached, from its /healthz.
    fn attached(&self, node: usize) -> Res<Vec<String>> {
        let h = self.agent(node)?.health(self.node_ns(node))?;
        Ok(h.detail
            .ok_or("no health detail")?
            .attached
            .into_iter()
            .map(|a| a.name)
            .collect())
    }
}

/// The two-node cluster, an agent on each (`extra` args, the token), the stand-in holding the
/// workload pods, the agent pods and the token Secret, and the plugin's directory.
fn laptop(extra: &[&str]) -> Res<Laptop> {
    let lab = Cluster::build(&ClusterConfig::two_nodes())?;
    let dir = std::env::temp_dir().join(format!("tracer-laptop-{}", lab.prefix));
    std::fs::create_dir_all(&dir)?;
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tracer"), dir.join("kubectl-tracer"))?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let token_arg = token_file.display().to_string();

    let store = Store::new();
    for p in &lab.pods {
        let node = &lab.nodes[p.node].name;
        let ip = p.ip().to_string();
        store.apply(
            "pods",
            kube::pod(&p.pod.namespace, &p.pod.name, node, &ip, &[], None),
        )?;
    }
    let mut agents = Vec::new();
    for (i, n) in lab.nodes.iter().enumerate() {
        store.apply(
            "pods",
            kube::agent_pod(
                defaults::NAMESPACE,
                &format!("tracer-{i}x7k2"),
                &n.name,
                &n.ip.to_string(),
                defaults::API_PORT,
            ),
        )?;
        let mut args = vec!["--token-file", token_arg.as_str()];
        args.extend_from_slice(extra);
        let mut agent =
            common::start_on(&n.netns, &format!("0.0.0.0:{}", defaults::API_PORT), &args)?;
        agent.token = Some(TOKEN.into());
        agent.wait_ready(&n.netns, READY)?;
        agents.push(Some(agent));
    }
    store.apply(
        "secrets",
        kube::secret(
            defaults::NAMESPACE,
            defaults::TOKEN_SECRET,
            &[(defaults::TOKEN_SECRET_KEY, format!("{TOKEN}\n").as_bytes())],
        ),
    )?;
    // This process's loopback: the laptop's view of the API server.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let standin = KubeStandin::start_on(listener, Arc::clone(&store), Some(lab.external.path()))?;
    std::fs::write(dir.join("standin.yaml"), standin.kubeconfig("default"))?;
    std::fs::write(
        dir.join("other.yaml"),
        "apiVersion: v1\nkind: Config\nclusters:\n- name: elsewhere\n  cluster:\n    server: \
         http://127.0.0.1:9\ncontexts:\n- name: elsewhere\n  context:\n    cluster: elsewhere\n    \
         user: elsewhere\nusers:\n- name: elsewhere\n  user:\n    token: nope\n",
    )?;
    Ok(Laptop {
        dir,
        agents,
        _standin: standin,
        store,
        lab,
    })
}

/// Lines of a child's stdout, as they come.
fn lines(child: &mut Child) -> Res<mpsc::Receiver<String>> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Kills the child on drop, whatever happened.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut s);
    }
    s
}

/// The pods of node 1 (ce-demo-2): the watched one and its peer.
fn pods(l: &Laptop) -> Res<(&ClusterPod, &ClusterPod)> {
    let mut on = l.lab.pods_on(1);
    Ok((
        on.next().ok_or("no pod")?,
        on.next().ok_or("no second pod")?,
    ))
}

#[test]
fn watch_finds_the_pods_node_streams_through_the_api_server_and_the_lease_lapses() -> TestResult {
    let l = laptop(&["--attach", "on-demand"])?;
    let (pod, peer) = pods(&l)?;
    let ttl = format!("{}s", TTL.as_secs());
    let mut child = Reap(
        l.watch(pod, &["-o", "json", "--lease-ttl", &ttl])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let rx = lines(&mut child.0)?;
    // The pod's node (ce-demo-2, index 1) attached its veth; the other node nothing.
    let attached = poll(Duration::from_secs(15), Duration::from_millis(100), || {
        l.attached(1).ok().filter(|a| a.contains(&pod.pod.veth))
    });
    if attached.is_none() {
        let _ = child.0.kill();
        return Err(format!(
            "the watch never attached; stderr:\n{}",
            stderr_of(&mut child.0)
        )
        .into());
    }
    assert!(
        l.attached(0)?.is_empty(),
        "the other node attached {:?}",
        l.attached(0)?
    );

    // The pod's flow streams back through the API server.
    let pod_ip = pod.ip().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut streamed = None;
    while streamed.is_none() && Instant::now() < deadline {
        traffic::tcp_probe(pod.netns(), peer.addr(), Duration::from_secs(2))?;
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            let f: FlowView = serde_json::from_str(&line)?;
            if f.src.to_string() == pod_ip && f.dst.to_string() == peer.ip().to_string() {
                streamed = Some(f);
                break;
            }
        }
    }
    let f = streamed.ok_or("the pod's flow never streamed through the API server")?;
    assert!(f.path.iter().any(|h| h.iface == pod.pod.veth), "{f:?}");

    // Renewed while the client runs: still attached after more than one time to live.
    std::thread::sleep(TTL + Duration::from_secs(1));
    assert!(
        l.attached(1)?.contains(&pod.pod.veth),
        "the renewed lease lapsed"
    );

    // A laptop killed outright never detaches; the lease does, within its time to live.
    let killed = Instant::now();
    child.0.kill()?;
    let _ = child.0.wait();
    let gone = poll(
        TTL + Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            l.attached(1)
                .ok()
                .filter(|a| !a.contains(&pod.pod.veth))
                .map(|_| killed.elapsed())
        },
    )
    .ok_or("the killed client's attachment never lapsed")?;
    assert!(
        gone >= TTL - Duration::from_secs(TTL.as_secs() / 3 + 1),
        "detached after {gone:?}: before the lease could lapse, so not by the lease"
    );
    let log = l.agent(1)?.log();
    assert!(log.contains("on-demand lease lapsed"), "{log}");
    Ok(())
}

#[test]
fn watch_exits_on_sigterm_and_detaches_at_once() -> TestResult {
    let l = laptop(&["--attach", "on-demand"])?;
    let (pod, _) = pods(&l)?;
    let mut child = Reap(
        l.watch(pod, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    poll(Duration::from_secs(15), Duration::from_millis(100), || {
        l.attached(1).ok().filter(|a| a.contains(&pod.pod.veth))
    })
    .ok_or("the watch never attached")?;
    // SAFETY: signalling the child this test spawned.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.0.wait()?;
    let stderr = stderr_of(&mut child.0);
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(stderr.contains("detached from"), "{stderr}");
    assert!(!l.attached(1)?.contains(&pod.pod.veth));
    Ok(())
}

/// `flows -o json` lines of a merged answer: (node, flow).
fn node_flows(out: &Output) -> Res<Vec<(String, FlowView)>> {
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let j: serde_json::Value = serde_json::from_str(line)?;
        let node = j["node"]
            .as_str()
            .ok_or("a merged line without node")?
            .to_string();
        v.push((node, serde_json::from_value(j)?));
    }
    Ok(v)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn all_nodes_through_the_api_server_names_nodes_and_reports_the_unreachable() -> TestResult {
    let mut l = laptop(&[])?;
    let nodes: Vec<String> = l.lab.nodes.iter().map(|n| n.name.clone()).collect();
    // A flow on each node, between its own pods.
    for i in 0..2 {
        let mut on = l.lab.pods_on(i);
        let (a, b) = (on.next().ok_or("pod")?, on.next().ok_or("pod")?);
        poll(READY, Duration::from_millis(100), || {
            l.attached(i).ok().filter(|x| x.contains(&a.pod.veth))
        })
        .ok_or("the agent never attached the pod's veth")?;
        assert!(traffic::tcp_probe(
            a.netns(),
            b.addr(),
            Duration::from_secs(2)
        )?);
    }
    let seen = |out: &Output| -> Res<Vec<String>> {
        let mut n: Vec<String> = node_flows(out)?.into_iter().map(|(n, _)| n).collect();
        n.sort();
        n.dedup();
        Ok(n)
    };
    let out = poll(Duration::from_secs(10), Duration::from_millis(300), || {
        let out = l
            .run(&["flows", "--all-nodes", "--proto", "tcp", "-o", "json"])
            .ok()?;
        (seen(&out).ok()? == nodes).then_some(out)
    })
    .ok_or_else(|| {
        format!(
            "--all-nodes never merged both nodes by name: {:?}",
            l.run(&["flows", "--all-nodes", "-o", "json"])
                .map(|o| text(&o))
        )
    })?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // --node: only that node's agent is asked.
    let out = l.run(&["flows", "--node", &nodes[1], "--proto", "tcp", "-o", "json"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(seen(&out)?, vec![nodes[1].clone()], "{}", text(&out));

    // One agent down: the other still answers, the missing node is named, the exit status
    // says the answer is partial.
    l.agents[0] = None;
    let out = l.run(&["flows", "--all-nodes", "--proto", "tcp", "-o", "json"])?;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(seen(&out)?, vec![nodes[1].clone()], "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&nodes[0]) && stderr.contains("did not answer"),
        "{}",
        text(&out)
    );
    let out = l.run(&["diagnoses", "--all-nodes"])?;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("== {}", nodes[1])),
        "{}",
        text(&out)
    );
    assert!(
        !stdout.contains(&format!("== {}", nodes[0])),
        "{}",
        text(&out)
    );

    // An agent pod the API server lists as not ready is named and not asked: no slot and no
    // timeout spent on it.
    l.store.apply(
        "pods",
        kube::not_ready(kube::agent_pod(
            defaults::NAMESPACE,
            "tracer-gone",
            "node-gone",
            "10.255.255.1",
            defaults::API_PORT,
        )),
    )?;
    let out = l.run(&["flows", "--all-nodes", "--proto", "tcp", "-o", "json"])?;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(seen(&out)?, vec![nodes[1].clone()], "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("node-gone")
            && stderr.contains(
                "not asked: pod tracer-gone is not ready (Ready=False, ContainersNotReady"
            ),
        "{}",
        text(&out)
    );

    // Asked directly, an address that never accepts (no host answers ARP for it on the LAN)
    // costs the short connect timeout and is named as such; the live agent still answers.
    let node = &l.lab.nodes[1];
    let [a, b, c, _] = node.ip.octets();
    let agents = format!(
        "http://{}:{port},http://{}:{port}",
        node.ip,
        std::net::Ipv4Addr::new(a, b, c, 250),
        port = defaults::API_PORT
    );
    let token_file = l.dir.join("token").display().to_string();
    let out = node
        .netns
        .command(env!("CARGO_BIN_EXE_tracer"))
        .args(["flows", "--agents", &agents, "--token-file", &token_file])
        .args(["--proto", "tcp", "-o", "json"])
        .output()?;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(".250") && stderr.contains("did not accept a connection within 1s"),
        "{}",
        text(&out)
    );

    // Without a kubeconfig's help nothing is guessed: --node needs the API server.
    let out = l
        .kubectl_tracer(&["flows", "--node", &nodes[1], "--via", "direct"])
        .output()?;
    assert!(!out.status.success(), "{}", text(&out));
    Ok(())
}
