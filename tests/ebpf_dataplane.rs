//! Calico's eBPF dataplane, with a STAND-IN for felix (no felix runs here): the agent tells the
//! mode from felix's pinned routes map and its per-hook program name, shares the hooks with the
//! stand-in (which still NATs and redirects: tracer never ends its chain), and reports correct
//! or explicitly turned-off verdicts, never a false diagnosis.
//!
//! The stand-in is `cali_tc_preamble` of tracer-ebpf/src/standins.rs, named as felix's program;
//! its `cali_v4_routes` map is pinned in a bpffs the test mounts itself (the agent is pointed
//! there with `--felix-bpf-dir`), never in the host's /sys/fs/bpf.
mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{HashMap as AyaHashMap, PerCpuArray, PerCpuHashMap},
    programs::{SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use common::{connect_via_vip, has_verdict, query, Res, TestResult, READY, VIP};
use tracer::{felix_bpf, felix_policy, hooks::STANDINS_OBJECT};
use tracer_lab::scenario::policy::{
    gnp, net, tiered_np, ALLOWED, DENIED_GNP, DENIED_NP, NS, SERVER,
};
use tracer_lab::{
    calico::{veth_name, Pool},
    netns::{unique_prefix, Netns},
    policy::{Direction, Kind, LabPolicy, PolicyRule},
    topo::{Cluster, ClusterConfig, PodConfig, SingleNode},
    traffic::tcp_probe,
};
use tracer_model::{
    diagnosis::{PolicyAction, PolicyDirection, PolicyHit},
    health::TcBackend,
    Cause, Dir, Evidence, FlowView, Verdict,
};

/// How long a node sync may take to notice a change (the agent resyncs every 10 s).
const SYNC: Duration = Duration::from_secs(25);

/// A private bpffs, unmounted (and its directory removed) on drop, even on failure.
struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    fn mount() -> Res<Bpffs> {
        let dir = std::env::temp_dir().join(format!("{}bpffs", unique_prefix()));
        std::fs::create_dir_all(&dir)?;
        let d = dir.display().to_string();
        let out = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", &d])
            .output()?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!("mount bpffs: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let fs = Bpffs { dir };
        std::fs::create_dir_all(fs.globals())?;
        Ok(fs)
    }

    /// Where felix's pins would be (`tc/globals` under the bpffs).
    fn globals(&self) -> PathBuf {
        self.dir.join("tc/globals")
    }

    fn routes_pin(&self) -> PathBuf {
        self.globals().join("cali_v4_routes")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// What one instance of the stand-in does (`FELIX_ACTION` of standins.rs).
#[derive(Clone, Copy)]
enum Felix {
    /// Hands every packet on (felix's program on a pod veth allowing it).
    Pass,
    /// natOutgoing SNAT of the pod's ICMP: source `pod` -> `node` (host NIC egress).
    Snat { pod: [u8; 4], node: [u8; 4] },
    /// The reverse on the NIC's ingress, then `bpf_redirect_peer` into the pod: the reply never
    /// crosses the pod veth's egress hook.
    UnSnatRedirect {
        node: [u8; 4],
        pod: [u8; 4],
        pod_mac: [u8; 6],
        veth: u32,
    },
}

/// Loads the stand-in in `ns` and attaches it to `iface`'s `kind` hook as felix does: a TCX
/// link with no position flags (appended), so tracer, attached before, stays first on ingress
/// and runs before it on egress.
fn felix_standin(ns: &Netns, iface: &str, kind: TcAttachType, what: Felix) -> Res<Ebpf> {
    let iface = iface.to_string();
    let ebpf = ns.run(move || -> Result<Ebpf, String> {
        let (action, matched, rewrite, mac, ifindex) = match what {
            Felix::Pass => (0u32, [0; 4], [0; 4], [0; 6], 0),
            Felix::Snat { pod, node } => (1, pod, node, [0; 6], 0),
            Felix::UnSnatRedirect {
                node,
                pod,
                pod_mac,
                veth,
            } => (2, node, pod, pod_mac, veth),
        };
        let (matched, rewrite) = (u32::from_ne_bytes(matched), u32::from_ne_bytes(rewrite));
        let mut ebpf = EbpfLoader::new()
            .override_global("FELIX_ACTION", &action, true)
            .override_global("MATCH_V4", &matched, true)
            .override_global("REWRITE_V4", &rewrite, true)
            .override_global("REWRITE_MAC", &mac, true)
            .override_global("REDIRECT_IFINDEX", &ifindex, true)
            .load(STANDINS_OBJECT)
            .map_err(|e| e.to_string())?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut("cali_tc_preamble")
            .ok_or("stand-in program missing")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| e.to_string())?;
        prog.attach(&iface, kind).map_err(|e| e.to_string())?;
        Ok(ebpf)
    })??;
    Ok(ebpf)
}

fn seen(ebpf: &mut Ebpf, slot: u32) -> Res<u64> {
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map_mut("STANDIN_SEEN").ok_or("no STANDIN_SEEN map")?)?;
    Ok(map.get(&slot, 0)?.iter().sum())
}

/// Pins a stand-in's `cali_v4_routes` (felix's name and layout) where felix pins its own.
fn pin_routes(ebpf: &Ebpf, at: &Path) -> TestResult {
    ebpf.map("cali_v4_routes")
        .ok_or("no cali_v4_routes map")?
        .pin(at)?;
    Ok(())
}

fn octets(ip: &str) -> Res<[u8; 4]> {
    Ok(ip.parse::<std::net::Ipv4Addr>()?.octets())
}

fn mac_of(ns: &Netns, iface: &str) -> Res<[u8; 6]> {
    let text = ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")])?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(format!("bad MAC {text:?}").into());
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

fn ifindex(ns: &Netns, iface: &str) -> Res<u32> {
    Ok(ns
        .exec(&["cat", &format!("/sys/class/net/{iface}/ifindex")])?
        .trim()
        .parse()?)
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Res<Option<T>>) -> Res<T> {
    let until = std::time::Instant::now() + timeout;
    loop {
        if let Some(t) = f()? {
            return Ok(t);
        }
        if std::time::Instant::now() > until {
            return Err(format!("not within {timeout:?}").into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// felix-style eBPF natOutgoing on a node: the stand-in SNATs the pod's ping on the host NIC
/// and redirects the reply into the pod past the veth's egress hook. The ping works (tracer
/// ends nobody's chain), the agent detects the mode from the stand-in's program and pin, and
/// the flow, which tracer never sees answered, gets no `no_reply`, no diagnosis, and the
/// answers say what is off and why.
#[test]
fn standin_ebpf_natoutgoing_is_detected_and_nothing_false_is_reported() -> TestResult {
    // In eBPF mode felix's iptables rule masquerades only what its programs marked: the
    // lab's ipset-based rule must not fire, so the pool is written without natOutgoing.
    let mut cfg = SingleNode::healthy();
    cfg.pool = Pool::new("10.244.0.0/16", false);
    let lab = SingleNode::build(&cfg)?;
    let fs = Bpffs::mount()?;
    let globals = fs.globals().display().to_string();
    let mut agent = common::start(
        &lab.node,
        &["--no-reply-timeout", "2s", "--felix-bpf-dir", &globals],
    )?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    let health = agent.health(&lab.node)?;
    assert!(health.turned_off.is_empty(), "{health:?}");

    let (pod, node) = (octets(&cfg.pod_ip)?, octets(&cfg.node_ip)?);
    let felix = vec![
        felix_standin(&lab.node, &lab.pod.veth, TcAttachType::Ingress, Felix::Pass)?,
        felix_standin(
            &lab.node,
            "eth0",
            TcAttachType::Egress,
            Felix::Snat { pod, node },
        )?,
        felix_standin(
            &lab.node,
            "eth0",
            TcAttachType::Ingress,
            Felix::UnSnatRedirect {
                node,
                pod,
                pod_mac: mac_of(&lab.pod.netns, "eth0")?,
                veth: ifindex(&lab.node, &lab.pod.veth)?,
            },
        )?,
    ];
    pin_routes(&felix[0], &fs.routes_pin())?;
    let result = (|| -> TestResult {
        let mut felix = felix;
        let health = wait_for(SYNC, || {
            let h = agent.health(&lab.node)?;
            Ok((!h.turned_off.is_empty()).then_some(h))
        })?;
        let off: Vec<Verdict> = health
            .turned_off
            .iter()
            .flat_map(|t| t.verdicts.clone())
            .collect();
        assert_eq!(off, felix_bpf::OFF_VERDICTS, "{health:?}");
        assert!(health
            .turned_off
            .iter()
            .all(|t| t.dataplane == "calico-ebpf"));
        let detail = health.detail.ok_or("no /healthz detail")?;
        let tcx = detail.tc == Some(TcBackend::Tcx);
        let ebpf = detail
            .ebpf_dataplane
            .ok_or("no ebpf_dataplane in /healthz")?;
        assert_eq!(ebpf.pinned_maps, [fs.routes_pin().display().to_string()]);
        // felix's program on both hooks of the host NIC, tracer before it on both. Programs
        // are looked for on TCX only (before 6.6 the stand-in and tracer use clsact filters).
        let mut hooks: Vec<(String, Dir, String, Option<bool>)> = ebpf
            .programs
            .iter()
            .map(|p| (p.iface.clone(), p.dir, p.program.clone(), p.tracer_first))
            .collect();
        hooks.sort_by_key(|h| h.1.as_str());
        let want: Vec<(String, Dir, String, Option<bool>)> = if tcx {
            vec![
                (
                    "eth0".into(),
                    Dir::Egress,
                    "cali_tc_preambl".into(),
                    Some(true),
                ),
                (
                    "eth0".into(),
                    Dir::Ingress,
                    "cali_tc_preambl".into(),
                    Some(true),
                ),
            ]
        } else {
            Vec::new()
        };
        assert_eq!(hooks, want);

        // The stand-in's NAT and redirect happen: the ping is answered.
        lab.pod
            .netns
            .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", &cfg.apiserver_ip])?;
        assert!(
            seen(&mut felix[0], 0)? >= 3,
            "the pod veth's stand-in saw nothing"
        );
        assert!(seen(&mut felix[1], 3)? >= 3, "no SNAT on eth0 egress");
        assert!(
            seen(&mut felix[2], 2)? >= 3,
            "no reply redirected into the pod"
        );

        // Past the no-reply timeout: tracer saw the request leave un-translated (it runs
        // before felix on egress) and never saw the reply (redirected past its hooks). That
        // is exactly what it must not call no_reply or snat_skipped.
        std::thread::sleep(Duration::from_secs(3));
        let q = query(&format!("src={}&proto=icmp", cfg.pod_ip))?;
        let page = agent.flows(&lab.node, &q)?;
        let f = page.flows.first().ok_or("no flow of the pod's ping")?;
        eprintln!("{f:?}");
        assert!(!has_verdict(f, Verdict::Replied), "{f:?}");
        for v in &f.verdicts {
            assert!(!felix_bpf::is_off_verdict(*v), "{f:?}");
            assert!(!v.is_fault(), "{f:?}");
        }
        assert!(f.diagnosis.is_none(), "{f:?}");
        let d = agent.diagnoses(&lab.node)?;
        assert!(d.causes.is_empty() && d.node_findings.is_empty(), "{d:?}");
        let causes: Vec<Cause> = d.turned_off.iter().flat_map(|t| t.causes.clone()).collect();
        assert_eq!(causes, felix_bpf::OFF_CAUSES);
        Ok(())
    })();
    // The stand-in's TCX links go with their file descriptors, here.
    result
}

/// Seed 002 (a pool over the host LAN) on a node whose felix runs in eBPF mode: the overlap is
/// read from ipsets felix does not decide natOutgoing by there, so it is turned off, never
/// replaced by another cause. When felix leaves eBPF mode (its pins go), the next node sync
/// turns it back on and the overlap is diagnosed again.
#[test]
fn seed_002_in_ebpf_mode_is_turned_off_then_back_on() -> TestResult {
    let lab = SingleNode::build(&SingleNode::seed_002())?;
    let fs = Bpffs::mount()?;
    let globals = fs.globals().display().to_string();
    // Only the pin (felix on a clsact kernel shows no TCX program): a stand-in map of felix's
    // name and layout, loaded in the node's namespace and pinned, no program attached.
    let marker = lab.node.run(|| {
        EbpfLoader::new()
            .load(STANDINS_OBJECT)
            .map_err(|e| e.to_string())
    })??;
    pin_routes(&marker, &fs.routes_pin())?;
    let mut agent = common::start(
        &lab.node,
        &["--no-reply-timeout", "2s", "--felix-bpf-dir", &globals],
    )?;
    agent.wait_attached(&lab.node, &[lab.pod.veth.as_str(), "eth0"], READY)?;
    assert!(
        !connect_via_vip(&lab)?,
        "the VIP must not answer in seed 002"
    );
    std::thread::sleep(Duration::from_secs(3));
    let page = agent.flows(&lab.node, &query(&format!("dst={VIP}"))?)?;
    let f = page.flows.first().ok_or("no flow to the VIP")?;
    assert!(f.diagnosis.is_none(), "{f:?}");
    assert!(
        f.verdicts.iter().all(|v| !felix_bpf::is_off_verdict(*v)),
        "{f:?}"
    );
    let d = agent.diagnoses(&lab.node)?;
    assert!(d.causes.is_empty() && d.node_findings.is_empty(), "{d:?}");
    assert!(
        d.turned_off
            .iter()
            .any(|t| t.causes.contains(&Cause::IppoolOverlapsHostNetwork)),
        "{d:?}"
    );
    let h = agent.health(&lab.node)?;
    let ebpf = h
        .detail
        .and_then(|d| d.ebpf_dataplane)
        .ok_or("not detected")?;
    assert!(ebpf.programs.is_empty(), "{ebpf:?}");
    // Nor do the metrics count it (alerts would fire on a turned-off cause).
    let overlap = |metric: &str| -> Result<f64, Box<dyn std::error::Error>> {
        let text = agent.get(&lab.node, "/metrics")?.text();
        let key = format!("{metric}{{cause=\"ippool_overlaps_host_network\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no {key} in /metrics").into())
    };
    assert_eq!(overlap("tracer_flows_by_cause")?, 0.0);
    assert_eq!(overlap("tracer_diagnoses_total")?, 0.0);

    // felix leaves eBPF mode: its pins go.
    std::fs::remove_file(fs.routes_pin())?;
    drop(marker);
    wait_for(SYNC, || {
        Ok(agent.health(&lab.node)?.turned_off.is_empty().then_some(()))
    })?;
    assert!(!connect_via_vip(&lab)?);
    let f = agent.wait_flow(
        &lab.node,
        &query(&format!("dst={VIP}"))?,
        Duration::from_secs(10),
        |f| f.diagnosis.is_some(),
    )?;
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert_eq!(d.cause, Cause::IppoolOverlapsHostNetwork, "{f:?}");
    assert!(agent.diagnoses(&lab.node)?.turned_off.is_empty());
    // The metrics follow the mode switch: both flows to the VIP, the one judged while the
    // cause was off among them, now count.
    wait_for(Duration::from_secs(10), || {
        Ok((overlap("tracer_flows_by_cause")? >= 2.0).then_some(()))
    })?;
    Ok(())
}

// --- Which policy dropped it, in felix's eBPF dataplane (issue 17 §2) ---

/// A client falling off the end of tier `default` (the Kubernetes NetworkPolicy below allows
/// only the allowed client).
const DENIED_KNP: (&str, &str) = ("web-a", "10.244.142.36");

fn policy_lab() -> Res<Cluster> {
    let mut cfg = ClusterConfig::two_nodes();
    cfg.nodes[0].pods = [SERVER, ALLOWED, DENIED_KNP, DENIED_NP, DENIED_GNP]
        .iter()
        .map(|(name, ip)| PodConfig::new(NS, name, ip))
        .collect();
    Ok(Cluster::build(&cfg)?)
}

/// A Kubernetes NetworkPolicy as kube-controllers writes it to etcd, allowing only the allowed
/// client to the server.
fn knp(port: u16) -> LabPolicy {
    LabPolicy {
        kind: Kind::NetworkPolicy,
        namespace: Some(NS.into()),
        name: "knp.default.allow-web".into(),
        tier: "default".into(),
        direction: Direction::Ingress,
        rules: vec![PolicyRule::allow().from(&net(ALLOWED)).port(port)],
    }
}

/// FNV-1a 64 (the test's own, from the algorithm's definition): felix's rule id of an NFLOG
/// prefix with its flow logs off (`bpf_ep_mgr.go` `ruleMatchIDFromNFLOGPrefix`).
fn felix_rule_id(prefix: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in prefix.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn pod_ns<'a>(lab: &'a Cluster, pod: (&str, &str)) -> Res<&'a Netns> {
    Ok(lab
        .pods
        .iter()
        .find(|p| p.pod.name == pod.0)
        .ok_or_else(|| format!("no pod {}", pod.0))?
        .netns())
}

fn connect_server(lab: &Cluster, client: (&str, &str)) -> Res<bool> {
    let addr = std::net::SocketAddr::new(SERVER.1.parse()?, lab.config.pod_port);
    Ok(tcp_probe(
        pod_ns(lab, client)?,
        addr,
        Duration::from_millis(1500),
    )?)
}

/// The stand-in's rule counter for `id`, summed over CPUs (read by the test, not the agent).
fn rule_counter(ebpf: &Ebpf, id: u64) -> Res<u64> {
    let map: PerCpuHashMap<_, u64, u64> =
        PerCpuHashMap::try_from(ebpf.map("cali_rule_ctrs2").ok_or("no cali_rule_ctrs2")?)?;
    Ok(match map.get(&id, 0) {
        Ok(v) => v.iter().sum(),
        Err(aya::maps::MapError::KeyNotFound) => 0,
        Err(e) => return Err(e.into()),
    })
}

/// Sets the stand-in's verdict for packets from `pod`: count `id`, drop or pass.
fn verdict(ebpf: &mut Ebpf, pod: (&str, &str), id: u64, drop: bool) -> TestResult {
    let mut map: AyaHashMap<_, u32, [u64; 2]> =
        AyaHashMap::try_from(ebpf.map_mut("STANDIN_POLICY").ok_or("no STANDIN_POLICY")?)?;
    map.insert(u32::from_ne_bytes(octets(pod.1)?), [id, u64::from(drop)], 0)?;
    Ok(())
}

fn denied_flow(
    agent: &common::Agent,
    lab: &Cluster,
    client: (&str, &str),
    cause: Cause,
) -> Res<FlowView> {
    Ok(agent.wait_flow(
        &lab.nodes[0].netns,
        &query(&format!("src={}/32&dst={}/32", client.1, SERVER.1))?,
        Duration::from_secs(10),
        |f| f.diagnosis.as_ref().is_some_and(|d| d.cause == cause),
    )?)
}

fn policy_hit(f: &FlowView) -> Res<PolicyHit> {
    match f.diagnosis.as_ref().map(|d| &d.evidence) {
        Some(Evidence::DeniedByPolicy(e)) => Ok(e.policy.clone()),
        other => Err(format!("not denied_by_policy: {other:?}").into()),
    }
}

fn allowed_not_blamed(agent: &common::Agent, lab: &Cluster) -> TestResult {
    assert!(
        connect_server(lab, ALLOWED)?,
        "the allowed client gets through"
    );
    common::none_blamed(agent, &lab.nodes[0].netns, ALLOWED.1)
}

/// felix's eBPF dataplane drops three clients by policy (a STAND-IN for felix's tc program on
/// the pods' veths moves felix's rule counter, `cali_rule_ctrs2` pinned in a private bpffs,
/// and returns TC_ACT_SHOT): the agent computes felix's rule ids from the policies in the
/// lab's etcd and names the end of tier `default` (a Kubernetes NetworkPolicy's), rule 1 of
/// the tiered Calico NetworkPolicy and rule 0 of the GlobalNetworkPolicy (egress, dropped on
/// the client's veth). The allowed client, whose Allow rule counter moves too, is never
/// blamed. A counter whose id no policy computes (felix's flow logs on: ids allocated at run
/// time) leaves the drop a kernel_drop that says so.
#[test]
fn standin_ebpf_policy_drop_names_the_policy_from_felix_rule_counters() -> TestResult {
    let lab = policy_lab()?;
    let n1 = &lab.nodes[0];
    let port = lab.config.pod_port;
    for p in [knp(port), tiered_np(), gnp()] {
        lab.datastore.etcd.put_all(&lab.external, &[p.etcd_kv()])?;
    }
    // The ids felix gives these rules (felix/rules/nflogprefix.go), computed here from the
    // prefixes; the agent computes its own from the datastore.
    let end_of_default = felix_rule_id("DPI|default");
    let np_deny = felix_rule_id(&format!("DPI1|np/{NS}/security.deny-web-b"));
    let gnp_deny = felix_rule_id("DPE0|gnp/deny-web-c-egress");
    let knp_allow = felix_rule_id(&format!("API0|np/{NS}/knp.default.allow-web"));

    let fs = Bpffs::mount()?;
    let globals = fs.globals().display().to_string();
    let mut felix = EbpfLoader::new()
        .override_global("FELIX_ACTION", &3u32, true)
        .load(STANDINS_OBJECT)?;
    pin_routes(&felix, &fs.routes_pin())?;
    felix
        .map("cali_rule_ctrs2")
        .ok_or("no cali_rule_ctrs2")?
        .pin(fs.globals().join(felix_policy::bpf::RULE_COUNTERS_MAP))?;
    verdict(&mut felix, ALLOWED, knp_allow, false)?;
    verdict(&mut felix, DENIED_KNP, end_of_default, true)?;
    verdict(&mut felix, DENIED_NP, np_deny, true)?;
    verdict(&mut felix, DENIED_GNP, gnp_deny, true)?;

    let url = format!("http://{}", lab.etcd_endpoint());
    let mut agent = common::start(
        &n1.netns,
        &[
            "--no-reply-timeout",
            "2s",
            "--felix-bpf-dir",
            &globals,
            "--datastore-type",
            "etcdv3",
            "--etcd-endpoints",
            &url,
            "--nodename",
            &n1.name,
        ],
    )?;
    let server_veth = veth_name(NS, SERVER.0);
    let gnp_veth = veth_name(NS, DENIED_GNP.0);
    agent.wait_attached(&n1.netns, &[server_veth.as_str(), gnp_veth.as_str()], READY)?;
    // felix's program attached after tracer's, as felix appends: the server's ingress policy
    // on its veth's egress, web-c's egress policy on its veth's ingress.
    let (sv, gv) = (server_veth.clone(), gnp_veth.clone());
    let felix = n1.netns.run(move || -> Result<Ebpf, String> {
        let mut felix = felix;
        let prog: &mut SchedClassifier = felix
            .program_mut("cali_tc_preamble")
            .ok_or("stand-in program missing")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| e.to_string())?;
        prog.attach(&sv, TcAttachType::Egress)
            .map_err(|e| e.to_string())?;
        prog.attach(&gv, TcAttachType::Ingress)
            .map_err(|e| e.to_string())?;
        Ok(felix)
    })??;
    let mut felix = felix;
    wait_for(SYNC, || {
        let h = agent.health(&n1.netns)?;
        Ok((!h.turned_off.is_empty()).then_some(()))
    })?;
    // The agent's first reading of felix's counters after detecting the mode (within one
    // 250 ms poll) is the baseline the drops are measured from.
    std::thread::sleep(Duration::from_millis(600));

    // (a) End of tier default, ingress.
    assert!(
        !connect_server(&lab, DENIED_KNP)?,
        "the stand-in drops web-a"
    );
    assert!(rule_counter(&felix, end_of_default)? > 0);
    let f = denied_flow(&agent, &lab, DENIED_KNP, Cause::DeniedByPolicy)?;
    let h = policy_hit(&f)?;
    assert_eq!(h.action, PolicyAction::EndOfTier, "{h:?}");
    assert_eq!(h.tier.as_deref(), Some("default"));
    assert_eq!(h.direction, PolicyDirection::Ingress);
    assert_eq!(h.chain, "DPI|default");
    allowed_not_blamed(&agent, &lab)?;
    assert!(
        rule_counter(&felix, knp_allow)? > 0,
        "the Allow rule's counter moves too"
    );

    // (b) Rule 1 of the tiered Calico NetworkPolicy.
    assert!(!connect_server(&lab, DENIED_NP)?);
    assert!(rule_counter(&felix, np_deny)? > 0);
    let f = denied_flow(&agent, &lab, DENIED_NP, Cause::DeniedByPolicy)?;
    let h = policy_hit(&f)?;
    assert_eq!(h.action, PolicyAction::Deny, "{h:?}");
    assert_eq!(h.kind.as_deref(), Some("NetworkPolicy"));
    assert_eq!(h.namespace.as_deref(), Some(NS));
    assert_eq!(h.name.as_deref(), Some("security.deny-web-b"));
    assert_eq!(h.tier.as_deref(), Some("security"));
    assert_eq!(h.direction, PolicyDirection::Ingress);
    assert_eq!(h.rule_index, Some(1), "{h:?}");
    let d = f.diagnosis.as_ref().ok_or("no diagnosis")?;
    assert!(d.fix.contains("cali_rule_ctrs2"), "{}", d.fix);
    allowed_not_blamed(&agent, &lab)?;

    // (c) Rule 0 of the GlobalNetworkPolicy, web-c's egress (dropped on its own veth).
    assert!(!connect_server(&lab, DENIED_GNP)?);
    assert!(rule_counter(&felix, gnp_deny)? > 0);
    let f = denied_flow(&agent, &lab, DENIED_GNP, Cause::DeniedByPolicy)?;
    let h = policy_hit(&f)?;
    assert_eq!(h.action, PolicyAction::Deny, "{h:?}");
    assert_eq!(h.kind.as_deref(), Some("GlobalNetworkPolicy"));
    assert_eq!(h.name.as_deref(), Some("deny-web-c-egress"));
    assert_eq!(h.direction, PolicyDirection::Egress);
    assert_eq!(h.rule_index, Some(0));

    // (d) felix with flow logs on: the id is one its run-time allocator handed out, which no
    // policy computes. The drop stays a kernel_drop saying why.
    verdict(&mut felix, DENIED_NP, 7, true)?;
    assert!(!connect_server(&lab, DENIED_NP)?);
    assert!(rule_counter(&felix, 7)? > 0);
    let f = denied_flow(&agent, &lab, DENIED_NP, Cause::KernelDrop)?;
    match f.diagnosis.as_ref().map(|d| &d.evidence) {
        Some(Evidence::KernelDrop(e)) => {
            let p = e
                .policy
                .as_ref()
                .ok_or("no policy lookup in the evidence")?;
            assert!(p.missing.iter().any(|m| m.contains("flow logs")), "{p:?}");
        }
        other => return Err(format!("not a kernel drop: {other:?}").into()),
    }
    let d = agent.diagnoses(&n1.netns)?;
    assert!(
        d.turned_off
            .iter()
            .all(|t| !t.causes.contains(&Cause::DeniedByPolicy)),
        "{d:?}"
    );
    Ok(())
}
