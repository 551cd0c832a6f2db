//! Shared test support: the tracer under test started through the lab's agent harness
//! ([`tracer_lab::agent`]), and small helpers.
// Each test binary uses a different part of it.
#![allow(dead_code, unused_imports)]

use std::{error::Error, net::SocketAddr, time::Duration};

use serde_json::Value;
pub use tracer_lab::agent::{Agent, Client, Launch, Raw};
use tracer_lab::{netns::Netns, topo::SingleNode, traffic};
pub use tracer_model::{defaults::API_PORT, FlowQuery, FlowView, Verdict};

pub type TestResult = Result<(), Box<dyn Error>>;
pub type Res<T> = Result<T, Box<dyn Error>>;

/// How long an agent may take to become ready or to attach.
pub const READY: Duration = Duration::from_secs(20);

/// The apiserver Service VIP of the single-node labs (kube-proxy-style DNAT to :6443).
pub const VIP: &str = "10.96.0.1";

/// Whether the lab's pod can open a TCP connection to the apiserver Service VIP.
pub fn connect_via_vip(lab: &SingleNode) -> Res<bool> {
    let vip: SocketAddr = format!("{VIP}:443").parse()?;
    Ok(traffic::tcp_probe(
        &lab.pod.netns,
        vip,
        Duration::from_secs(2),
    )?)
}

/// Starts the tracer under test in `ns`, on loopback at the default port.
pub fn start(ns: &Netns, extra: &[&str]) -> Res<Agent> {
    launch(ns, Launch::with_args(extra))
}

/// Like [`start`], listening on `listen` (e.g. 0.0.0.0:9464 to be reachable from other lab
/// nodes; requests still go to loopback).
pub fn start_on(ns: &Netns, listen: &str, extra: &[&str]) -> Res<Agent> {
    launch(ns, Launch::with_args(extra).listen(listen.parse()?))
}

/// Starts the tracer under test as `how` says, log in the temp directory.
pub fn launch(ns: &Netns, how: Launch) -> Res<Agent> {
    let log = std::env::temp_dir().join(format!("tracer-agent-{}.log", ns.name()));
    // A fresh log per agent: tests read it whole.
    std::fs::write(&log, "")?;
    let tracer = std::path::Path::new(env!("CARGO_BIN_EXE_tracer"));
    Ok(how.start(ns, &format!("agent in {}", ns.name()), tracer, &log)?)
}

/// A `/flows` query from its query string.
pub fn query(q: &str) -> Res<FlowQuery> {
    Ok(FlowQuery::parse(Some(q))?)
}

/// Wire-format tests: a raw body as JSON (`null` when empty).
pub fn json(r: &Raw) -> Res<Value> {
    if r.body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&r.body)
        .map_err(|e| format!("body is not JSON ({e}): {}", r.text()).into())
}

/// Wire-format tests: GET `path`, status and body as JSON.
pub fn get_json(c: &Client, ns: &Netns, path: &str) -> Res<(u16, Value)> {
    let r = c.get(ns, path)?;
    Ok((r.status, json(&r)?))
}

/// The lab's pod connects to the apiserver (which must answer); then `/flows?query` is polled
/// until a flow satisfies `pred`, which is returned.
pub fn probe_apiserver_and_wait(
    agent: &Agent,
    lab: &SingleNode,
    query: &FlowQuery,
    timeout: Duration,
    pred: impl Fn(&FlowView) -> bool,
) -> Res<FlowView> {
    let answered =
        traffic::tcp_probe(&lab.pod.netns, lab.apiserver_addr(), Duration::from_secs(2))?;
    if !answered {
        return Err("the pod's connection to the apiserver was not answered".into());
    }
    Ok(agent.wait_flow(&lab.node, query, timeout, pred)?)
}

/// The agent on loopback at `port`, whoever started it.
pub fn client_on(port: u16) -> Client {
    Client::new(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Adds an up veth named like a pod's (`cali` + the lab prefix's tail + `tag`) to `node`, for
/// tests that check a new pod is still attached; returns its name.
pub fn add_pod_veth(node: &Netns, lab_prefix: &str, tag: &str) -> Res<String> {
    let veth = format!(
        "cali{}{tag}",
        &lab_prefix[lab_prefix.len().saturating_sub(6)..]
    );
    let peer = format!("{tag}peer0");
    node.ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
    node.ip(&["link", "set", &veth, "up"])?;
    Ok(veth)
}

pub fn has_verdict(f: &FlowView, v: Verdict) -> bool {
    f.verdicts.contains(&v)
}

/// Wire-format tests: any request, status and body as JSON.
pub fn request_json(
    c: &Client,
    ns: &Netns,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[&str],
) -> Res<(u16, Value)> {
    let r = c.request(ns, method, path, body, headers)?;
    Ok((r.status, json(&r)?))
}

/// Runs a tool the suite depends on (installed by scripts/setup.sh) and returns its stdout, or
/// an error with everything it printed.
pub fn run_tool(cmd: &mut std::process::Command) -> Res<String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{cmd:?}: {e} (scripts/setup.sh installs it)"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The strings of a YAML list (manifests), in order; empty when it is not a list.
pub fn yaml_strings(y: &yaml_rust2::Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Flows from `src` exist on `ns`'s agent and none of them is diagnosed: an allowed client is
/// never blamed for its neighbours' drops.
pub fn none_blamed(agent: &Agent, ns: &Netns, src: &str) -> TestResult {
    let page = agent.flows(ns, &query(&format!("src={src}/32"))?)?;
    assert!(!page.flows.is_empty(), "no flow from {src}");
    for f in &page.flows {
        assert!(f.diagnosis.is_none(), "flow from {src} blamed: {f:?}");
    }
    Ok(())
}

/// The BPF maps named `name` that process `pid` ("self" for this one) holds open, found by the
/// `map_id` of its fds' fdinfo; each opened anew (its own fd).
pub fn maps_named(pid: &str, name: &str) -> Res<Vec<aya::maps::MapData>> {
    use aya::maps::{MapData, MapInfo};
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let mut maps = Vec::new();
    for id in ids {
        // Another test thread (or the agent) may close its maps between the fdinfo walk and
        // this open: a map gone by then is not one still in use, so it is skipped.
        let Some(info) = gone_is_none(MapInfo::from_id(id))? else {
            continue;
        };
        if info.name_as_str() == Some(name) {
            if let Some(data) = gone_is_none(MapData::from_id(id))? {
                maps.push(data);
            }
        }
    }
    Ok(maps)
}

/// The one BPF map named `name` that process `pid` holds (the first, should it hold several),
/// or an error saying it holds none.
pub fn map_named(pid: &str, name: &str) -> Res<aya::maps::MapData> {
    maps_named(pid, name)?
        .into_iter()
        .next()
        .ok_or_else(|| format!("process {pid} holds no map {name}").into())
}

/// `Ok(None)` for a map id the kernel no longer knows (ENOENT), any other error as it is.
fn gone_is_none<T>(r: Result<T, aya::maps::MapError>) -> Res<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
