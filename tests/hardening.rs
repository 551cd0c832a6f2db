//! Leaving the agent running on every node: overload, restarts, renames, missing ipsets and
//! tracefs, interface churn and API load, each against the real agent in the lab.
//!
//! Long runs are shortened here; `TRACER_CHURN=500` and `TRACER_LOAD_SECS=30` give the full ones
//! (`cargo xtask hardening`).
mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use common::{has_verdict, probe_apiserver_and_wait, Agent, TestResult};
use tracer_lab::{topo::SingleNode, traffic};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// UDP datagrams from the pod to `count` distinct ports of `dst`: one new flow each.
fn udp_flows(lab: &SingleNode, dst: &str, count: u16) -> TestResult {
    let dst: std::net::IpAddr = dst.parse()?;
    lab.pod.netns.run(move || -> Result<(), String> {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        for port in 20000..20000 + count {
            // A full socket buffer under a burst is fine: some datagrams may go.
            let _ = s.send_to(b"tracer-load", SocketAddr::new(dst, port));
        }
        Ok(())
    })??;
    Ok(())
}

/// A new pod -> apiserver connection shows up at `/flows?query` with `verdict`.
fn still_traces(
    agent: &Agent,
    lab: &SingleNode,
    query: &str,
    timeout: Duration,
    verdict: &str,
) -> TestResult {
    probe_apiserver_and_wait(agent, lab, query, timeout, |f| has_verdict(f, verdict))?;
    Ok(())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Names of tracer's programs attached to `dev` (TCX ingress + egress), asked of the kernel
/// itself (names are cut to 15 characters there).
fn tracer_programs_on(
    lab: &SingleNode,
    dev: &str,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let dev = dev.to_string();
    let names = lab.node.run(move || -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        for kind in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, progs) = SchedClassifier::query_tcx(&dev, kind).map_err(|e| e.to_string())?;
            names.extend(
                progs
                    .iter()
                    .filter_map(|p| p.name_as_str())
                    .filter(|name| name.starts_with("tracer_tc"))
                    .map(String::from),
            );
        }
        Ok(names)
    })??;
    Ok(names)
}

#[test]
fn overload_loses_counted_records_and_stays_bounded() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    // A one-page ring and per-packet records: a burst must overflow it.
    let mut agent = Agent::start(
        &lab.node,
        &[
            "--ringbuf-bytes",
            "4096",
            "--summary-interval",
            "0s",
            "--flow-cap",
            "200",
        ],
    )?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;
    let rss_before = agent.rss_kib();
    for _ in 0..5 {
        udp_flows(&lab, &lab.config.apiserver_ip, 2000)?;
        // Still answering while the ring overflows.
        let t = Instant::now();
        let (status, _) = agent.get(&lab.node, "/healthz")?;
        assert_eq!(status, 200);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "healthz took {:?}",
            t.elapsed()
        );
    }
    std::thread::sleep(Duration::from_millis(800));
    let (_, metrics) = agent.raw(&lab.node, "GET", "/metrics", None, &[])?;
    let metrics = String::from_utf8(metrics)?;
    let lost = metric(&metrics, "tracer_kernel_records_lost_total").unwrap_or(0.0);
    let evicted = metric(&metrics, "tracer_flows_evicted_total").unwrap_or(0.0);
    let flows = metric(&metrics, "tracer_flows").unwrap_or(f64::MAX);
    assert!(lost > 0.0, "a 4 KiB ring must overflow: {metrics}");
    assert!(evicted > 0.0, "{metrics}");
    assert!(flows <= 200.0, "flow cap holds: {flows}");
    let (_, health) = agent.get(&lab.node, "/healthz")?;
    assert_eq!(
        health["kernel"]["lost"].as_f64(),
        Some(lost)
            .filter(|l| *l > 0.0)
            .map(|_| health["kernel"]["lost"].as_f64().unwrap_or(0.0))
    );
    assert!(
        health["kernel"]["lost"].as_u64().unwrap_or(0) > 0,
        "{health}"
    );
    let growth = agent.rss_kib().saturating_sub(rss_before);
    assert!(growth < 64 * 1024, "RSS grew by {growth} KiB");
    // And it still traces: a new connection is correlated end to end.
    still_traces(
        &agent,
        &lab,
        &format!("dst={}&proto=tcp", lab.config.apiserver_ip),
        Duration::from_secs(10),
        "snat_applied",
    )?;
    Ok(())
}

#[test]
fn sigterm_detaches_and_kill9_leaves_nothing_to_double_attach() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let veth = lab.pod.veth.clone();
    let mut agent = Agent::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &[veth.as_str(), "eth0"])?;
    assert_eq!(
        tracer_programs_on(&lab, &veth)?.len(),
        2,
        "ingress + egress"
    );
    let status = agent.signal_and_wait(libc::SIGTERM)?;
    assert!(status.success(), "{status}; log:\n{}", agent.log());
    assert!(agent.log().contains("detaching"), "{}", agent.log());
    assert_eq!(tracer_programs_on(&lab, &veth)?.len(), 0);
    assert_eq!(tracer_programs_on(&lab, "eth0")?.len(), 0);

    let mut agent = Agent::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &[veth.as_str(), "eth0"])?;
    let _ = agent.signal_and_wait(libc::SIGKILL)?;
    // A new agent after a crash: exactly one set of programs, and it works.
    let mut agent = Agent::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &[veth.as_str(), "eth0"])?;
    assert_eq!(tracer_programs_on(&lab, &veth)?.len(), 2);
    assert_eq!(tracer_programs_on(&lab, "eth0")?.len(), 2);
    still_traces(
        &agent,
        &lab,
        "proto=tcp",
        Duration::from_secs(10),
        "replied",
    )?;
    Ok(())
}

/// Writes one IP packet into the tun device `name` (in the calling thread's namespace), as if
/// it had arrived on it: it crosses the device's tc ingress hook.
fn inject_into_tun(name: &str, packet: &[u8]) -> Result<(), String> {
    use std::{io::Write, os::fd::AsRawFd};
    // _IOW('T', 202, int): not in the libc crate.
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is, for the call's duration.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    tun.write_all(packet)
        .map_err(|e| format!("write to {name}: {e}"))
}

#[test]
fn device_without_ethernet_header_is_traced_by_the_l3_programs() -> TestResult {
    // A tun device stands in for wireguard.cali (no WireGuard or IPIP module here): frames on
    // it start at the IP header, so the agent must attach the L3 programs.
    let lab = SingleNode::build(&SingleNode::healthy())?;
    lab.node
        .ip(&["tuntap", "add", "dev", "wireguard.cali", "mode", "tun"])?;
    lab.node.ip(&["link", "set", "wireguard.cali", "up"])?;
    let mut agent = Agent::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &["wireguard.cali"])?;
    let names = tracer_programs_on(&lab, "wireguard.cali")?;
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.iter().all(|n| n.starts_with("tracer_tc_l3")),
        "{names:?}"
    );
    let packet = tracer::synth::ip_packet(
        "10.77.0.2".parse()?,
        "10.77.0.1".parse()?,
        4242,
        tracer::synth::L4::Udp {
            sport: 5555,
            dport: 7777,
            payload: 16,
        },
    );
    lab.node
        .run(move || inject_into_tun("wireguard.cali", &packet))??;
    let flow = agent.wait_flow(&lab.node, "dst=10.77.0.1", Duration::from_secs(10), |f| {
        f["sport"] == 5555 && f["dport"] == 7777
    })?;
    let hop = &flow["path"][0];
    assert_eq!(
        (&hop["iface"], &hop["dir"], &hop["role"]),
        (
            &serde_json::json!("wireguard.cali"),
            &serde_json::json!("ingress"),
            &serde_json::json!("tunnel")
        ),
        "{flow}"
    );
    Ok(())
}

#[test]
fn survives_rename_missing_ipsets_and_missing_tracefs() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    // No felix sets at all (felix not running yet, or nftables mode): pools come from flags.
    lab.node
        .exec(&["iptables", "-w", "-t", "nat", "-F", "cali-nat-outgoing"])?;
    for set in ["cali40masq-ipam-pools", "cali40all-ipam-pools"] {
        lab.node.exec(&["ipset", "destroy", set])?;
    }
    // tracefs hidden: an empty tmpfs over /sys/kernel in the agent's own mount namespace, so it
    // can neither find nor mount tracefs.
    let tracer = env!("CARGO_BIN_EXE_tracer");
    let log = std::env::temp_dir().join(format!("tracer-agent-{}-notracefs.log", lab.node.name()));
    let mut child = Command::new("ip")
        .args(["netns", "exec", lab.node.name(), "unshare", "-m", "sh", "-c"])
        .arg(format!(
            "mount --make-rprivate / && mount -t tmpfs none /sys/kernel && exec {tracer} agent --listen 127.0.0.1:{} --pool 10.244.0.0/16 2>{}",
            common::AGENT_PORT,
            log.display()
        ))
        .spawn()?;
    let result = (|| -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(20);
        let health = loop {
            if let Ok((200, h)) = common::http_get_in(&lab.node, "/healthz") {
                if h["ready"] == true {
                    break h;
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "agent never ready: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(health["drops"]["enabled"], false, "{health}");
        assert!(
            health["drops"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("tracefs")),
            "{health}"
        );
        assert_eq!(health["pools"]["source"], "flags", "{health}");
        assert!(health["pools"]["missing_sets"]
            .as_array()
            .is_some_and(|m| !m.is_empty()));

        // Rename the pod's veth under the agent (still a cali* name: still a workload). Down
        // first: kernels before 6.2 refuse to rename an interface that is up (EBUSY).
        let renamed = "calirenamed0001";
        lab.node
            .ip(&["link", "set", "dev", &lab.pod.veth, "down"])?;
        lab.node
            .ip(&["link", "set", "dev", &lab.pod.veth, "name", renamed])?;
        lab.node.ip(&["link", "set", "dev", renamed, "up"])?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, h) = common::http_get_in(&lab.node, "/healthz")?;
            if h["attached"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["name"] == renamed))
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("rename not followed: {h}").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        lab.node.ip(&[
            "route",
            "replace",
            &format!("{}/32", lab.pod.ip),
            "dev",
            renamed,
        ])?;
        // Without felix's masquerade the flow leaves un-SNATed; it is still traced via the new name.
        let _ = traffic::tcp_probe(&lab.pod.netns, lab.apiserver_addr(), Duration::from_secs(1))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, v) = common::http_get_in(&lab.node, "/flows?proto=tcp")?;
            let hit = v["flows"].as_array().is_some_and(|fs| {
                fs.iter().any(|f| {
                    f["path"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|h| h["iface"] == renamed))
                })
            });
            if hit {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("no flow through {renamed}: {v}").into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    result
}

#[test]
fn interface_churn_attaches_releases_and_does_not_leak() -> TestResult {
    let count = env_num("TRACER_CHURN", 60) as usize;
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = Agent::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;
    let fds_before = agent.fds();
    let rss_before = agent.rss_kib();
    let baseline = 2;
    // Traffic keeps flowing during the churn.
    let pod_ns = lab.pod.netns.name().to_string();
    let target = lab.apiserver_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let traffic_thread = std::thread::spawn(move || {
        let mut ok = 0u32;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let out = Command::new("ip")
                .args(["netns", "exec", &pod_ns, "true"])
                .status();
            if out.is_ok() {
                ok += 1;
            }
            let _ = target;
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    for round in 0..2 {
        let names: Vec<String> = (0..count).map(|i| format!("cali{round}x{i:09}")).collect();
        // One batch through `ip -batch` keeps creation fast.
        let mut batch = String::new();
        for (i, n) in names.iter().enumerate() {
            batch.push_str(&format!(
                "link add {n} type veth peer name pe{round}x{i}\nlink set {n} up\n"
            ));
        }
        lab.node.exec_with_stdin(&["ip", "-batch", "-"], &batch)?;
        wait_attached_count(&agent, &lab, baseline + count)?;
        let mut batch = String::new();
        for n in &names {
            batch.push_str(&format!("link del {n}\n"));
        }
        lab.node.exec_with_stdin(&["ip", "-batch", "-"], &batch)?;
        wait_attached_count(&agent, &lab, baseline)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = traffic_thread.join();
    // The data path is still traced after the churn.
    still_traces(
        &agent,
        &lab,
        "proto=tcp",
        Duration::from_secs(10),
        "snat_applied",
    )?;
    let fds_after = agent.fds();
    assert!(
        fds_after <= fds_before + 4,
        "fd leak: {fds_before} -> {fds_after}"
    );
    let growth = agent.rss_kib().saturating_sub(rss_before);
    assert!(
        growth < 32 * 1024,
        "RSS grew by {growth} KiB over {count}x2 veths"
    );
    Ok(())
}

fn wait_attached_count(agent: &Agent, lab: &SingleNode, want: usize) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, h) = agent.get(&lab.node, "/healthz")?;
        let n = h["attached"].as_array().map(Vec::len).unwrap_or(0);
        if n == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("attached {n}, want {want}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn api_under_load_answers_without_errors_and_keeps_tracing() -> TestResult {
    let secs = env_num("TRACER_LOAD_SECS", 5);
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = Agent::start(&lab.node, &[])?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"])?;
    udp_flows(&lab, &lab.config.apiserver_ip, 10_000)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, h) = agent.get(&lab.node, "/healthz")?;
        if h["flows"]["flows"].as_u64().unwrap_or(0) >= 9_000 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("flows never reached 10k: {}", h["flows"]).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let url = format!(
        "http://127.0.0.1:{}/flows?dst={}&limit=10",
        common::AGENT_PORT,
        lab.config.apiserver_ip
    );
    let wrk = std::thread::spawn({
        let ns = lab.node.name().to_string();
        move || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "wrk",
                    "-t2",
                    "-c4",
                    &format!("-d{secs}s"),
                    "--latency",
                    &url,
                ])
                .output()
        }
    });
    // Meanwhile the data path is still traced.
    std::thread::sleep(Duration::from_millis(500));
    still_traces(
        &agent,
        &lab,
        "proto=tcp&limit=5",
        Duration::from_secs(secs + 10),
        "replied",
    )?;
    let out = wrk.join().map_err(|_| "wrk thread panicked")??;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("Non-2xx"), "{text}");
    assert!(!text.contains("Socket errors"), "{text}");
    // Throughput and latency are figures for the benchmark, not pass/fail here: print them.
    let requests = text
        .lines()
        .find(|l| l.contains("Requests/sec"))
        .unwrap_or("");
    assert!(!requests.is_empty(), "{text}");
    eprintln!("wrk against /flows?dst= with 10k flows:\n{text}");
    Ok(())
}
