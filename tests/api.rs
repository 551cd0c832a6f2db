//! The operator interfaces against a real agent in the lab: readiness, metrics, pcap export,
//! the watch stream, on-demand attachment, the bearer token, and `tracer watch pod/...`.
mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    get_json, has_verdict, probe_apiserver_and_wait, query, request_json, Agent, FlowView, Launch,
    TestResult, API_PORT, READY,
};
use tracer_lab::{topo::SingleNode, traffic};
use tracer_model::{
    attach::AttachRequest,
    health::{ReaderCheck, Status},
    AttachHow, Role, Verdict,
};

#[test]
fn readiness_metrics_and_pcap() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    // Wire format: /readyz's body.
    let (status, ready) = get_json(&agent, &lab.node, "/readyz")?;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);

    let f = probe_apiserver_and_wait(
        &agent,
        &lab,
        &query(&format!("dst={}&proto=tcp", lab.config.apiserver_ip))?,
        Duration::from_secs(10),
        |f| has_verdict(f, Verdict::Replied),
    )?;

    let metrics = agent.get(&lab.node, "/metrics")?;
    assert_eq!(metrics.status, 200);
    let metrics = String::from_utf8(metrics.body)?;
    let value = |line: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert!(value("tracer_flows ").unwrap_or(0.0) >= 1.0, "{metrics}");
    assert!(
        value("tracer_flows_by_verdict{verdict=\"replied\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tracer_kernel_packets_total").unwrap_or(0.0) > 0.0,
        "{metrics}"
    );
    assert_eq!(value("tracer_kernel_records_lost_total"), Some(0.0));
    assert_eq!(
        value("tracer_attached_interfaces{role=\"workload\"}"),
        Some(1.0)
    );
    assert_eq!(
        value("tracer_attached_interfaces{role=\"host\"}"),
        Some(1.0)
    );
    assert!(metrics.contains("# TYPE tracer_kernel_records_total counter"));

    // The flow as pcapng: one interface per hook, a packet per record, real TCP headers.
    let pcap = agent.get(&lab.node, &format!("/flows/{}/pcap", f.id))?;
    assert_eq!(pcap.status, 200);
    let mut reader = pcap_file::pcapng::PcapNgReader::new(&pcap.body[..])?;
    let mut ifaces = Vec::new();
    let mut syn_seen = false;
    let mut packets = 0;
    while let Some(block) = reader.next_block() {
        match block? {
            pcap_file::pcapng::Block::InterfaceDescription(idb) => {
                for o in idb.options {
                    if let pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption::IfName(n) = o {
                        ifaces.push(n.to_string());
                    }
                }
            }
            pcap_file::pcapng::Block::EnhancedPacket(p) => {
                packets += 1;
                let ip = pnet_packet::ipv4::Ipv4Packet::new(&p.data).ok_or("not IPv4")?;
                if let Some(tcp) =
                    pnet_packet::tcp::TcpPacket::new(pnet_packet::Packet::payload(&ip))
                {
                    syn_seen |= tcp.get_flags() == 0x02;
                }
            }
            _ => {}
        }
    }
    assert!(
        ifaces.contains(&format!("{} ingress", lab.pod.veth)),
        "{ifaces:?}"
    );
    assert!(ifaces.contains(&"eth0 egress".to_string()), "{ifaces:?}");
    assert!(packets >= 4, "{packets} packets");
    assert!(syn_seen);
    assert_eq!(agent.get(&lab.node, "/flows/987654/pcap")?.status, 404);
    Ok(())
}

#[test]
fn watch_streams_new_flows_as_ndjson() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let dst = lab.config.apiserver_ip.clone();
    let addr = lab.apiserver_addr();
    let pod_ns = lab.pod.netns.name().to_string();
    // Open the stream inside the node namespace, then make traffic from the pod.
    let stream = lab.node.run(move || -> Result<TcpStream, String> {
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], API_PORT)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET /watch?dst={dst} HTTP/1.1\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    })??;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        traffic::tcp_probe(&lab.pod.netns, addr, Duration::from_secs(2))?,
        "traffic from {pod_ns}"
    );
    let mut reader = BufReader::new(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = None;
    let mut line = String::new();
    while Instant::now() < deadline && got.is_none() {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        // Chunk-size lines and blank lines interleave with the NDJSON objects.
        if let Ok(v) = serde_json::from_str::<FlowView>(line.trim()) {
            if has_verdict(&v, Verdict::Replied) {
                got = Some(v);
            }
        }
    }
    let v = got.ok_or("no replied flow on the watch stream")?;
    assert_eq!(v.src.to_string(), lab.pod.ip.to_string());
    let r = agent.get(&lab.node, "/watch?limit=5")?;
    assert_eq!(r.status, 400, "{}", r.text());
    Ok(())
}

/// An agent that attaches nothing until asked, once it is ready.
fn on_demand_agent(lab: &SingleNode) -> Result<Agent, Box<dyn std::error::Error>> {
    let mut agent = common::start(&lab.node, &["--attach", "on-demand"])?;
    agent.wait_ready(&lab.node, READY)?;
    Ok(agent)
}

#[test]
fn on_demand_attach_and_detach() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let agent = on_demand_agent(&lab)?;
    // Ready, but nothing attached until asked.
    let v: tracer_model::Readiness =
        serde_json::from_slice(&agent.get(&lab.node, "/readyz")?.body)?;
    assert_eq!(v.attached, Some(0), "{v:?}");
    let pod = format!("{}/{}", lab.pod.namespace, lab.pod.name);
    for (body, status) in [
        ("{}", 400),
        ("not json", 400),
        ("{\"iface\": \"a/b\"}", 400),
        ("{\"pod\": \"nonamespace\"}", 400),
        ("{\"iface\": \"nosuchif0\"}", 404),
        ("{\"pod\": \"default/not-here\"}", 404),
    ] {
        // Wire format: bad bodies and their error bodies.
        let (s, v) = request_json(&agent, &lab.node, "POST", "/attach", Some(body), &[])?;
        assert_eq!(s, status, "{body}: {v:?}");
        assert!(v["error"].is_string(), "{v:?}");
    }
    let a = agent.attach(&lab.node, &AttachRequest::Pod { pod: pod.clone() })?;
    assert_eq!(a.iface, lab.pod.veth);
    assert_eq!(a.how, AttachHow::OnDemand);
    assert_eq!(a.role, Role::Workload);
    let id = a.id;

    let f = probe_apiserver_and_wait(
        &agent,
        &lab,
        &query(&format!("pod={pod}"))?,
        Duration::from_secs(10),
        |f| f.src.to_string() == lab.pod.ip.to_string(),
    )?;
    // Only the pod's veth is attached: its path has that hook and no host NIC.
    assert!(f.path.iter().all(|h| h.iface == lab.pod.veth), "{f:?}");

    // A second client holds the same attachment: the first one letting go keeps it attached.
    let again = agent.attach(&lab.node, &AttachRequest::Pod { pod: pod.clone() })?;
    assert_eq!(again.id, id, "{again:?}");
    // Wire format: the status of DELETE itself.
    let r = agent.request(&lab.node, "DELETE", &format!("/attach/{id}"), None, &[])?;
    assert_eq!(r.status, 204, "{}", r.text());
    let attached = |agent: &Agent| -> Result<usize, Box<dyn std::error::Error>> {
        let h = agent.health(&lab.node)?;
        Ok(h.detail.map_or(0, |d| d.attached.len()))
    };
    assert_eq!(attached(&agent)?, 1, "still held");
    agent.detach(&lab.node, id)?;
    assert_eq!(attached(&agent)?, 0);
    let r = agent.request(&lab.node, "DELETE", &format!("/attach/{id}"), None, &[])?;
    assert_eq!(r.status, 404);

    // Every hold is a lease: renewed with PUT, let go with DELETE, lapsed after its time to
    // live when nobody renews it.
    let body = format!("{{\"pod\": \"{pod}\", \"ttl_seconds\": 2}}");
    let (s, v) = request_json(&agent, &lab.node, "POST", "/attach", Some(&body), &[])?;
    assert_eq!(
        (s, v["lease"]["ttl_seconds"].as_u64()),
        (201, Some(2)),
        "{v:?}"
    );
    let lease = v["lease"]["id"].as_u64().ok_or("no lease id")?;
    let path = format!("/attach/{id}/leases/{lease}");
    let (s, v) = request_json(&agent, &lab.node, "PUT", &path, None, &[])?;
    assert_eq!((s, v["lease"]["id"].as_u64()), (200, Some(lease)), "{v:?}");
    assert_eq!(
        agent.request(&lab.node, "DELETE", &path, None, &[])?.status,
        204
    );
    assert_eq!(attached(&agent)?, 0);
    assert_eq!(
        agent.request(&lab.node, "PUT", &path, None, &[])?.status,
        404
    );
    assert_eq!(
        agent.request(&lab.node, "POST", &path, None, &[])?.status,
        405
    );
    let (s, v) = request_json(&agent, &lab.node, "POST", "/attach", Some(&body), &[])?;
    assert_eq!(s, 201, "{v:?}");
    let taken = Instant::now();
    let lapsed =
        tracer_lab::daemon::poll(Duration::from_secs(6), Duration::from_millis(100), || {
            (attached(&agent).ok()? == 0).then(|| taken.elapsed())
        })
        .ok_or("an unrenewed lease never lapsed")?;
    assert!(
        lapsed >= Duration::from_millis(1500),
        "lapsed after {lapsed:?}"
    );
    Ok(())
}

/// An agent on `lab`'s node that requires `token`; returns it and the token file (the caller
/// removes it).
fn agent_with_token(
    lab: &SingleNode,
    token: &str,
) -> Result<(Agent, std::path::PathBuf), Box<dyn std::error::Error>> {
    let token_file = std::env::temp_dir().join(format!("tracer-token-{}", lab.prefix));
    std::fs::write(&token_file, format!("{token}\n"))?;
    let token_arg = token_file.to_string_lossy().to_string();
    let agent = common::start(&lab.node, &["--token-file", &token_arg])?;
    Ok((agent, token_file))
}

#[test]
// A wire-format test: statuses of requests with and without the token.
fn bearer_token_guards_everything_but_healthz() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let (mut agent, token_file) = agent_with_token(&lab, "s3cret-token")?;
    // Waiting for readiness itself proves /readyz needs no token.
    agent.wait_ready(&lab.node, READY)?;
    // Kubelet probes carry no token: liveness and readiness stay open.
    assert_eq!(agent.get(&lab.node, "/readyz")?.status, 200);
    for path in ["/flows", "/diagnoses", "/metrics", "/flows/1", "/watch"] {
        let (s, v) = request_json(&agent, &lab.node, "GET", path, None, &[])?;
        assert_eq!(s, 401, "{path}: {v:?}");
        let s = agent.request(
            &lab.node,
            "GET",
            path,
            None,
            &["Authorization: Bearer wrong-token!"],
        )?;
        assert_eq!(s.status, 401, "{path}");
    }
    let s = agent.request(
        &lab.node,
        "GET",
        "/flows",
        None,
        &["Authorization: Bearer s3cret-token"],
    )?;
    assert_eq!(s.status, 200);
    // Oversized bodies are refused outright.
    let big = format!("{{\"iface\": \"{}\"}}", "x".repeat(70 * 1024));
    let s = agent.request(
        &lab.node,
        "POST",
        "/attach",
        Some(&big),
        &["Authorization: Bearer s3cret-token"],
    )?;
    assert_eq!(s.status, 413);
    let _ = std::fs::remove_file(&token_file);
    Ok(())
}

#[test]
fn tracer_watch_pod_attaches_streams_and_detaches() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let agent = on_demand_agent(&lab)?;
    // No -n: the namespace comes from the kubeconfig's current context as kubectl takes it,
    // here from the first file of a colon-separated KUBECONFIG (the cluster is in the second).
    // On the node, `--via direct`: the local agent, not the API server.
    let dir = std::env::temp_dir().join(format!("tracer-watch-kubeconfig-{}", lab.prefix));
    std::fs::create_dir_all(&dir)?;
    let (contexts, clusters) = (dir.join("contexts"), dir.join("clusters"));
    std::fs::write(
        &contexts,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: lab\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\n    namespace: {}\nusers:\n- name: lab\n  user: {{}}\n",
            lab.pod.namespace
        ),
    )?;
    std::fs::write(
        &clusters,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://127.0.0.1:6443\n",
    )?;
    let kubeconfig = format!("{}:{}", contexts.display(), clusters.display());
    let mut watch = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.node.name(),
            env!("CARGO_BIN_EXE_tracer"),
            "watch",
        ])
        .arg(format!("pod/{}", lab.pod.name))
        .args(["-o", "json", "--via", "direct"])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Wait for the attachment the watch asked for.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = agent.health(&lab.node)?;
        if h.detail
            .as_ref()
            .is_some_and(|d| d.attached.iter().any(|x| x.name == lab.pod.veth))
        {
            break;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            return Err(format!("watch never attached: {h:?}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(traffic::tcp_probe(
        &lab.pod.netns,
        lab.apiserver_addr(),
        Duration::from_secs(2)
    )?);
    let stdout = watch.stdout.take().ok_or("no stdout")?;
    let pod_ip = lab.pod.ip.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut found = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !found && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: FlowView = serde_json::from_str(&line)?;
            found = v.src.to_string() == pod_ip;
        }
    }
    // SIGINT, as Ctrl-C: the watch detaches and exits cleanly.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let status = watch.wait()?;
    let mut err = String::new();
    if let Some(mut e) = watch.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(found, "no flow of the pod on the watch; stderr: {err}");
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("detached"), "{err}");
    let h = agent.health(&lab.node)?;
    assert_eq!(h.detail.map(|d| d.attached.len()), Some(0));
    Ok(())
}

/// Keys of a JSON object, sorted.
fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

#[test]
// A wire-format test: which keys a caller without the token gets.
fn probes_without_the_token_tell_status_only() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let (mut agent, token_file) = agent_with_token(&lab, "probe-token")?;
    // With the token the detail is there: wait until the pod's veth is attached.
    agent.token = Some("probe-token".into());
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let (_, full) = get_json(&agent, &lab.node, "/healthz")?;
    assert!(full["pools"].is_object(), "{full}");
    agent.token = None;
    let (s, h) = get_json(&agent, &lab.node, "/healthz")?;
    assert_eq!(s, 200, "{h:?}");
    assert_eq!(
        keys(&h),
        ["checks", "ready", "status", "turned_off"],
        "{h:?}"
    );
    // Fixed words only, and nothing off on a node without felix's eBPF dataplane.
    assert_eq!(h["turned_off"], serde_json::json!([]), "{h:?}");
    assert_eq!(h["status"], "ok", "{h:?}");
    assert_eq!(h["checks"]["reader"], "ok", "{h:?}");
    assert_eq!(h["checks"]["node_sync"], "ok", "{h:?}");
    let (s, r) = get_json(&agent, &lab.node, "/readyz")?;
    assert_eq!((s, keys(&r)), (200, vec!["ready".to_string()]), "{r}");
    // Nothing of the node: no interface (which pod runs here), no pool, no error text.
    for body in [h.to_string(), r.to_string()] {
        for secret in [lab.pod.veth.as_str(), "eth0", "10.244.", "error"] {
            assert!(!body.contains(secret), "{secret} in {body}");
        }
    }
    // A client without the token is refused before its body is read: a promised body that
    // never comes costs the agent nothing and gets its 401 at once.
    let (status, waited) = lab.node.run(|| -> Result<(String, Duration), String> {
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], API_PORT)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"POST /attach HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{")
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).map_err(|e| e.to_string())?;
        Ok((
            String::from_utf8_lossy(&head[9..12]).to_string(),
            t.elapsed(),
        ))
    })??;
    assert_eq!(status, "401");
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    let _ = std::fs::remove_file(&token_file);
    Ok(())
}

/// `/healthz` answers 503 once the ring reader is gone, so that the kubelet restarts the agent.
/// The failure is injected with the test hook TRACER_TEST_FAULT (docs/api.md).
#[test]
fn healthz_fails_when_the_ring_reader_dies_or_stalls() -> TestResult {
    for (fault, state) in [
        ("reader-exits", ReaderCheck::Stopped),
        ("reader-stalls", ReaderCheck::Stalled),
    ] {
        let lab = SingleNode::build(&SingleNode::healthy())?;
        let mut agent =
            common::launch(&lab.node, Launch::default().env("TRACER_TEST_FAULT", fault))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let last = loop {
            if let Some(st) = agent.exited() {
                return Err(format!("{fault}: agent exited ({st}): {}", agent.log()).into());
            }
            let answer = agent.health(&lab.node);
            if let Ok(h) = &answer {
                if h.checks.reader == state {
                    break h.clone();
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{fault}: /healthz never failed: {answer:?}").into());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(last.status, Status::Failing, "{fault}: {last:?}");
        // Wire format: /healthz's status code.
        assert_eq!(agent.get(&lab.node, "/healthz")?.status, 503, "{fault}");
        let r = agent.get(&lab.node, "/readyz")?;
        assert_eq!(
            r.status,
            503,
            "{fault}: not ready while failing: {}",
            r.text()
        );
        // The API itself still answers.
        assert_eq!(agent.get(&lab.node, "/metrics")?.status, 200, "{fault}");
    }
    Ok(())
}

/// A kernel that cannot run the programs (older than 5.11, a missing helper, a refusing
/// verifier) must not turn into a crash loop: the agent stays up, says `unsupported`, and is
/// never ready. Injected with TRACER_TEST_FAULT=kernel-unsupported; the 6.1 guest of
/// `cargo xtask vm-test` checks the real refusal of `--tc-mode tcx` there.
#[test]
fn an_unsupported_kernel_is_reported_not_crash_looped() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::launch(
        &lab.node,
        Launch::default().env("TRACER_TEST_FAULT", "kernel-unsupported"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        if let Ok(r) = agent.get(&lab.node, "/healthz") {
            let h: tracer_model::Health = serde_json::from_slice(&r.body)?;
            break (r.status, h);
        }
        if Instant::now() > deadline {
            return Err(format!("the agent never served /healthz: {}", agent.log()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health.0, 200, "a restart would not help: {:?}", health.1);
    assert_eq!(health.1.status, Status::Unsupported);
    assert!(
        health
            .1
            .unsupported
            .as_ref()
            .is_some_and(|s| s.contains("5.11")),
        "the reason is said: {:?}",
        health.1
    );
    // Past the reader-stall threshold it is still not failing, and never ready.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        agent.exited().is_none(),
        "the agent exited: {}",
        agent.log()
    );
    assert_eq!(agent.get(&lab.node, "/healthz")?.status, 200);
    assert_eq!(agent.health(&lab.node)?.status, Status::Unsupported);
    let r = agent.get(&lab.node, "/readyz")?;
    assert_eq!(r.status, 503, "never ready: {}", r.text());
    assert!(agent.log().contains("cannot run on this kernel"));
    Ok(())
}

#[test]
fn non_loopback_listen_needs_a_token_or_insecure() -> TestResult {
    let ns = tracer_lab::netns::Netns::create(&format!(
        "{}-insecure",
        tracer_lab::netns::unique_prefix()
    ))?;
    let listen = format!("0.0.0.0:{API_PORT}");
    let mut refused = common::start_on(&ns, &listen, &[])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = refused.exited() {
            break st;
        }
        if Instant::now() > deadline {
            return Err(format!("agent served {listen} without a token: {}", refused.log()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    assert!(refused.log().contains("--insecure"), "{}", refused.log());
    drop(refused);
    // The operator's explicit choice is honoured.
    let mut agent = common::start_on(&ns, &listen, &["--insecure"])?;
    agent.wait_ready(&ns, READY)?;
    Ok(())
}

#[test]
fn watchers_beyond_the_cap_get_429() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &["--max-watchers", "2"])?;
    agent.wait_ready(&lab.node, READY)?;
    let open = |n: usize| agent.watchers(&lab.node, n);
    let watchers = open(2)?;
    // Wire format: the 429's error body.
    let (s, v) = get_json(&agent, &lab.node, "/watch")?;
    assert_eq!(s, 429, "{v:?}");
    assert_eq!(v["status"], 429, "{v:?}");
    // A watcher that hangs up frees its slot.
    drop(watchers);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match open(1) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(())
}

#[test]
fn idle_keep_alive_connections_are_closed() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &[])?;
    agent.wait_ready(&lab.node, READY)?;
    let closed_after = lab.node.run(|| -> Result<Duration, String> {
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], API_PORT)))
            .map_err(|e| e.to_string())?;
        // One keep-alive request, then silence.
        write!(s, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(40)))
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(start.elapsed()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(start.elapsed())
                }
                Err(e) => {
                    return Err(format!(
                        "still open after {:?} ({e}); got {}",
                        start.elapsed(),
                        String::from_utf8_lossy(&got)
                    ))
                }
            }
        }
    })??;
    assert!(
        closed_after >= Duration::from_secs(5) && closed_after < Duration::from_secs(20),
        "closed after {closed_after:?}"
    );
    Ok(())
}

/// `--log-format json`: every line the agent logs is one JSON object with its level, target and
/// message at the top level, as log pipelines (Loki, Fluent Bit) ingest them.
#[test]
fn json_logs_are_one_object_per_line() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &["--log-format", "json"])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let log = agent.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the agent logged nothing");
    let mut attached = 0;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("not one JSON object per line ({e}): {line}"))?;
        for key in ["timestamp", "level", "target"] {
            assert!(v.get(key).is_some(), "no {key}: {line}");
        }
        if v["message"] == "attached" {
            // Fields are top-level keys, not a nested object.
            assert!(v["iface"].is_string() && v["role"].is_string(), "{line}");
            attached += 1;
        }
    }
    assert!(attached >= 2, "no `attached` events in\n{log}");
    Ok(())
}

/// `agent --config FILE`: settings from a ConfigMap-style YAML file take effect (here: attach on
/// demand only), and a file with a setting the agent does not know stops it at start with a
/// clear error, before it touches the node.
#[test]
fn config_file_sets_agent_flags_and_bad_ones_stop_it() -> TestResult {
    let dir = std::env::temp_dir().join(format!("tracer-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let good = dir.join("good.yaml");
    std::fs::write(&good, "attach: on-demand\nno-reply-timeout: 2s\n")?;
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "attach: on-demand\nflow_cap: 10\n")?;

    let lab = SingleNode::build(&SingleNode::healthy())?;
    let config = format!("--config={}", good.display());
    let mut agent = common::start(&lab.node, &[config.as_str()])?;
    agent.wait_ready(&lab.node, READY)?;
    let detail = agent
        .health(&lab.node)?
        .detail
        .ok_or("no /healthz detail")?;
    assert!(
        detail.attached.is_empty(),
        "attach: on-demand from the file was not applied: {:?}",
        detail.attached
    );

    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["agent", "--config"])
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown setting \"flow_cap\"") && stderr.contains("bad.yaml"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
