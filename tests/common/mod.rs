//! Shared test support: run the real `tracer agent` inside a lab namespace and query it.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_lab::{netns::Netns, topo::SingleNode, traffic};

pub const AGENT_PORT: u16 = 9464;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A `tracer agent` process in a namespace; SIGTERM on drop (then SIGKILL if it lingers).
pub struct Agent {
    child: Child,
    /// Reaped already: never signal the pid again (it may belong to someone else now).
    done: bool,
    ns: String,
    log: std::path::PathBuf,
    /// Sent as `Authorization: Bearer` with every request that does not carry its own.
    pub token: Option<String>,
}

/// How to start an agent beyond its arguments.
#[derive(Default)]
pub struct Launch<'a> {
    /// Command (and arguments) the agent runs under, e.g. `setpriv --bounding-set ...`.
    pub wrapper: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
}

impl Agent {
    pub fn start(ns: &Netns, extra: &[&str]) -> Result<Agent, Box<dyn std::error::Error>> {
        Agent::start_on(ns, &format!("127.0.0.1:{AGENT_PORT}"), extra)
    }

    /// Like [`Agent::start`], listening on `listen` (e.g. 0.0.0.0:9464 to be reachable from
    /// other lab nodes; loopback still works for [`Agent::get`]).
    pub fn start_on(
        ns: &Netns,
        listen: &str,
        extra: &[&str],
    ) -> Result<Agent, Box<dyn std::error::Error>> {
        Agent::launch(ns, listen, extra, &Launch::default())
    }

    /// Like [`Agent::start_on`], under a wrapper command and with extra environment.
    pub fn launch(
        ns: &Netns,
        listen: &str,
        extra: &[&str],
        how: &Launch<'_>,
    ) -> Result<Agent, Box<dyn std::error::Error>> {
        let log = std::env::temp_dir().join(format!("tracer-agent-{}.log", ns.name()));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .args(how.wrapper)
            .args([env!("CARGO_BIN_EXE_tracer"), "agent"])
            .args(["--listen", listen])
            .args(extra)
            .env("TRACER_LOG", "info")
            .envs(how.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        let child = cmd.spawn()?;
        Ok(Agent {
            child,
            done: false,
            ns: ns.name().to_string(),
            log,
            token: None,
        })
    }

    /// The process has exited (and is reaped): its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.try_wait().ok().flatten();
        if st.is_some() {
            self.done = true;
        }
        st
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the agent process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }

    /// Open file descriptors of the agent (each TCX link is one).
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits until /readyz answers 200.
    pub fn wait_ready(&mut self, ns: &Netns) -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Err(format!("agent exited ({status}); log:\n{}", self.log()).into());
            }
            if let Ok((200, _)) = self.get(ns, "/readyz") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("agent never ready; log:\n{}", self.log()).into())
    }

    /// Sends `sig` and waits for the exit status.
    pub fn signal_and_wait(
        &mut self,
        sig: i32,
    ) -> Result<std::process::ExitStatus, Box<dyn std::error::Error>> {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let status = self.child.wait()?;
        self.done = true;
        Ok(status)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` from the agent; returns status and parsed JSON body.
    pub fn get(&self, ns: &Netns, path: &str) -> Result<(u16, Value), Box<dyn std::error::Error>> {
        self.request(ns, "GET", path, None, &[])
    }

    /// Any request; `headers` are extra header lines ("Name: value").
    pub fn request(
        &self,
        ns: &Netns,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[&str],
    ) -> Result<(u16, Value), Box<dyn std::error::Error>> {
        let (status, bytes) = self.raw(ns, method, path, body, headers)?;
        if bytes.is_empty() {
            return Ok((status, Value::Null));
        }
        let v = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{method} {path}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        Ok((status, v))
    }

    /// Any request, raw body bytes back.
    pub fn raw(
        &self,
        ns: &Netns,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[&str],
    ) -> Result<(u16, Vec<u8>), Box<dyn std::error::Error>> {
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}"));
        let mut all: Vec<&str> = headers.to_vec();
        if let Some(a) = &auth {
            if !headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with("authorization:"))
            {
                all.push(a);
            }
        }
        let req = build_request(method, path, body, &all);
        let r = ns.run(move || http_raw(SocketAddr::from(([127, 0, 0, 1], AGENT_PORT)), &req))?;
        r.map_err(|e| e.into())
    }

    /// Waits until the agent answers /healthz and has attached to every interface in `ifaces`.
    pub fn wait_attached(&mut self, ns: &Netns, ifaces: &[&str]) -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Err(format!("agent exited ({status}); log:\n{}", self.log()).into());
            }
            if let Ok((200, v)) = self.get(ns, "/healthz") {
                let attached: Vec<String> = v["attached"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x["name"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                if ifaces.iter().all(|i| attached.iter().any(|a| a == i)) {
                    return Ok(());
                }
                last = v.to_string();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "agent never attached to {ifaces:?}; last /healthz: {last}; log:\n{}",
            self.log()
        )
        .into())
    }

    /// Polls `/flows?query` until a flow satisfies `pred`; returns it.
    pub fn wait_flow(
        &self,
        ns: &Netns,
        query: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let (status, v) = self.get(ns, &format!("/flows?{query}"))?;
            if status != 200 {
                return Err(format!("/flows?{query} answered {status}: {v}").into());
            }
            if let Some(f) = v["flows"]
                .as_array()
                .and_then(|fs| fs.iter().find(|f| pred(f)))
            {
                return Ok(f.clone());
            }
            last = v;
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "no flow matched for /flows?{query} within {timeout:?}; last answer: {last}; log:\n{}",
            self.log()
        )
        .into())
    }
}

/// The lab's pod connects to the apiserver (which must answer); then `/flows?query` is polled
/// until a flow satisfies `pred`, which is returned.
pub fn probe_apiserver_and_wait(
    agent: &Agent,
    lab: &SingleNode,
    query: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value, Box<dyn std::error::Error>> {
    let answered =
        traffic::tcp_probe(&lab.pod.netns, lab.apiserver_addr(), Duration::from_secs(2))?;
    if !answered {
        return Err("the pod's connection to the apiserver was not answered".into());
    }
    agent.wait_flow(&lab.node, query, timeout, pred)
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("agent in {} ignored SIGTERM", self.ns);
    }
}

/// Minimal HTTP/1.1 GET (Connection: close) so tests depend on nothing but std.
pub fn build_request(method: &str, path: &str, body: Option<&str>, headers: &[&str]) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    match body {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    req
}

/// Minimal HTTP/1.1 client (Connection: close) so tests depend on nothing but std; handles
/// chunked bodies.
pub fn http_raw(addr: SocketAddr, request: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header end")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut body = buf[end + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[(nl + 4 + size).min(b.len())..];
    }
    out
}

pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Value), String> {
    let (status, body) = http_raw(addr, &build_request("GET", path, None, &[]))?;
    let json = serde_json::from_slice(&body)
        .map_err(|e| format!("body is not JSON ({e}): {}", String::from_utf8_lossy(&body)))?;
    Ok((status, json))
}

pub fn verdicts(f: &Value) -> Vec<String> {
    f["verdicts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub fn has_verdict(f: &Value, v: &str) -> bool {
    verdicts(f).iter().any(|x| x == v)
}

/// GET from the agent port in `ns`, whoever started the agent.
pub fn http_get_in(ns: &Netns, path: &str) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    let path = path.to_string();
    let r = ns.run(move || http_get(SocketAddr::from(([127, 0, 0, 1], AGENT_PORT)), &path))?;
    r.map_err(|e| e.into())
}

/// Opens `n` `/watch` streams to the agent in `ns` (on the default port) and waits for each one's
/// `200`; the streams stay open until dropped.
pub fn open_watchers(ns: &Netns, n: usize) -> Result<Vec<TcpStream>, Box<dyn std::error::Error>> {
    let streams = ns.run(move || -> Result<Vec<TcpStream>, String> {
        let mut v = Vec::new();
        for _ in 0..n {
            let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], AGENT_PORT)))
                .map_err(|e| e.to_string())?;
            s.write_all(b"GET /watch HTTP/1.1\r\nHost: x\r\n\r\n")
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).map_err(|e| e.to_string())?;
            if &head[9..12] != b"200" {
                return Err(String::from_utf8_lossy(&head).to_string());
            }
            v.push(s);
        }
        Ok(v)
    })??;
    Ok(streams)
}

/// Adds an up veth named like a pod's (`cali` + the lab prefix's tail + `tag`) to `node`, for
/// tests that check a new pod is still attached; returns its name.
pub fn add_pod_veth(
    node: &Netns,
    lab_prefix: &str,
    tag: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let veth = format!(
        "cali{}{tag}",
        &lab_prefix[lab_prefix.len().saturating_sub(6)..]
    );
    let peer = format!("{tag}peer0");
    node.ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
    node.ip(&["link", "set", &veth, "up"])?;
    Ok(veth)
}
