//! The one harness for a real `tracer agent`, used by the lab, the integration tests and the
//! benchmark: start it inside a node's namespace, wait until it is ready, ask it typed
//! questions ([`Client`]), and stop it on drop (SIGTERM, then SIGKILL).
//!
//! Only the wire vocabulary ([`tracer_model`]) is shared with tracer itself: the harness talks
//! to the agent over HTTP like any other client.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tracer_model::{
    attach::AttachRequest, defaults::API_PORT, Attached, DiagnosesAnswer, FlowQuery, FlowView,
    FlowsPage, Health,
};

use crate::daemon::{poll, Daemon};
use crate::http::{truncate, Connection};
use crate::netns::Netns;
use crate::LabError;

/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping agent gets after SIGTERM (it detaches its tc programs) before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How to start an agent: `ip netns exec NS [WRAPPER...] TRACER agent --listen LISTEN ARGS...`.
#[derive(Debug, Clone)]
pub struct Launch {
    pub listen: SocketAddr,
    /// Arguments after `--listen`.
    pub args: Vec<String>,
    /// Environment on top of `TRACER_LOG=info` (which it may override).
    pub env: Vec<(String, String)>,
    /// A command the agent runs under (it must exec it), e.g. `setpriv --bounding-set ...`.
    pub wrapper: Vec<String>,
}

impl Default for Launch {
    fn default() -> Launch {
        Launch {
            listen: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), API_PORT),
            args: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }
}

impl Launch {
    /// On loopback, the default port, with `args`.
    pub fn with_args(args: &[&str]) -> Launch {
        Launch::default().args(args)
    }

    pub fn listen(mut self, listen: SocketAddr) -> Launch {
        self.listen = listen;
        self
    }

    pub fn args(mut self, args: &[&str]) -> Launch {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn wrapper(mut self, wrapper: &[&str]) -> Launch {
        self.wrapper = wrapper.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Starts `tracer` as an agent in `ns`, output appended to `log`. `name` names it in errors.
    pub fn start(
        &self,
        ns: &Netns,
        name: &str,
        tracer: &Path,
        log: &Path,
    ) -> Result<Agent, LabError> {
        let tracer = tracer.to_string_lossy();
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = ns.command(program);
                c.args(rest).arg(tracer.as_ref());
                c
            }
            None => ns.command(&tracer),
        };
        cmd.arg("agent")
            .arg("--listen")
            .arg(self.listen.to_string())
            .args(&self.args)
            .env("TRACER_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let daemon = Daemon::spawn_command(name, &mut cmd, log, STOP_GRACE)?;
        // An agent on every address is asked on loopback.
        let ip = match self.listen.ip() {
            ip if ip.is_unspecified() => IpAddr::from(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        Ok(Agent {
            daemon,
            client: Client::new(SocketAddr::new(ip, self.listen.port())),
        })
    }
}

/// A running `tracer agent`; SIGTERM on drop (it detaches its tc programs), SIGKILL after 5 s.
/// Derefs to its [`Client`].
#[derive(Debug)]
pub struct Agent {
    daemon: Daemon,
    client: Client,
}

impl Deref for Agent {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl Agent {
    pub fn name(&self) -> &str {
        self.daemon.name()
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.daemon.exit_status()
    }

    /// Sends `signal` and waits for the exit status.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> Result<ExitStatus, LabError> {
        self.daemon.signal_and_wait(signal)
    }

    pub fn log_path(&self) -> &Path {
        self.daemon.log_path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.daemon.log_tail(lines)
    }

    /// Resident memory, in KiB (0 once the process is gone).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(Some(self.pid())).unwrap_or(0)
    }

    /// Open file descriptors (each TCX link is one).
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Polls `/healthz` until `done` accepts it; fails early if the agent exits.
    fn wait_health(
        &mut self,
        ns: &Netns,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Health) -> bool,
    ) -> Result<Health, LabError> {
        let mut last = String::from("no answer");
        let found = poll_or_fail(timeout, Duration::from_millis(100), || {
            self.daemon.check_running()?;
            match self.client.health(ns) {
                Ok(h) if done(&h) => return Ok(Some(h)),
                Ok(h) => last = format!("{h:?}"),
                Err(e) => last = e.to_string(),
            }
            Ok(None)
        })?;
        found.ok_or_else(|| {
            LabError::Unexpected(format!(
                "{} not {what} within {timeout:?}; last /healthz: {}; log:\n{}",
                self.name(),
                truncate(&last, 600),
                self.log_tail(15)
            ))
        })
    }

    /// Waits until `/healthz` says ready; returns that answer.
    pub fn wait_ready(&mut self, ns: &Netns, timeout: Duration) -> Result<Health, LabError> {
        self.wait_health(ns, timeout, "ready", |h| h.ready)
    }

    /// Waits until `/healthz` lists every interface of `ifaces` as attached (its detail needs
    /// the token, if the agent has one).
    pub fn wait_attached(
        &mut self,
        ns: &Netns,
        ifaces: &[&str],
        timeout: Duration,
    ) -> Result<Health, LabError> {
        let what = format!("attached to {ifaces:?}");
        self.wait_health(ns, timeout, &what, |h| {
            h.detail.as_ref().is_some_and(|d| {
                ifaces
                    .iter()
                    .all(|i| d.attached.iter().any(|a| a.name == *i))
            })
        })
    }
}

/// Typed requests to an agent's API, made from inside a namespace; `token` is sent as a bearer
/// token with every request that does not carry its own `Authorization`.
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

/// A response as received.
#[derive(Debug, Clone)]
pub struct Raw {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Raw {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr, token: None }
    }

    /// The agent on loopback at the default port, whoever started it.
    pub fn local() -> Client {
        Client::new(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), API_PORT))
    }

    /// Any request; `headers` are extra header lines (`Name: value`). For tests of the wire
    /// format itself; everything else reads the typed answers below.
    pub fn request(
        &self,
        ns: &Netns,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[&str],
    ) -> Result<Raw, LabError> {
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}"));
        let mut all = headers.to_vec();
        if let Some(a) = &auth {
            if !headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with("authorization:"))
            {
                all.push(a);
            }
        }
        let (status, body) =
            Connection::open(ns, self.addr, REQUEST_TIMEOUT)?.exchange(method, path, body, &all)?;
        Ok(Raw { status, body })
    }

    /// GET `path`, the body as received.
    pub fn get(&self, ns: &Netns, path: &str) -> Result<Raw, LabError> {
        self.request(ns, "GET", path, None, &[])
    }

    /// `method path`, the answer read as `T` if it has the status `want`.
    fn typed<T: DeserializeOwned>(
        &self,
        ns: &Netns,
        method: &str,
        path: &str,
        body: Option<&str>,
        want: u16,
    ) -> Result<T, LabError> {
        let r = self.request(ns, method, path, body, &[])?;
        if r.status != want {
            return Err(self.answered(method, path, &r));
        }
        serde_json::from_slice(&r.body).map_err(|e| {
            LabError::Unexpected(format!(
                "{method} {path} on {}: unexpected answer ({e}): {}",
                self.addr,
                truncate(&r.text(), 300)
            ))
        })
    }

    fn answered(&self, method: &str, path: &str, r: &Raw) -> LabError {
        let hint = if r.status == 401 && self.token.is_none() {
            " (the agent wants a bearer token)"
        } else {
            ""
        };
        LabError::Unexpected(format!(
            "{method} {path} on {} answered {}{hint}: {}",
            self.addr,
            r.status,
            truncate(&r.text(), 300)
        ))
    }

    pub fn flows(&self, ns: &Netns, query: &FlowQuery) -> Result<FlowsPage, LabError> {
        let q = query.to_query_string();
        let path = if q.is_empty() {
            "/flows".to_string()
        } else {
            format!("/flows?{q}")
        };
        self.typed(ns, "GET", &path, None, 200)
    }

    pub fn flow(&self, ns: &Netns, id: u64) -> Result<FlowView, LabError> {
        self.typed(ns, "GET", &format!("/flows/{id}"), None, 200)
    }

    pub fn diagnoses(&self, ns: &Netns) -> Result<DiagnosesAnswer, LabError> {
        self.typed(ns, "GET", "/diagnoses", None, 200)
    }

    /// `/healthz`, also when it answers 503 (a failing check).
    pub fn health(&self, ns: &Netns) -> Result<Health, LabError> {
        let r = self.get(ns, "/healthz")?;
        if r.status != 200 && r.status != 503 {
            return Err(self.answered("GET", "/healthz", &r));
        }
        serde_json::from_slice(&r.body).map_err(|e| {
            LabError::Unexpected(format!(
                "/healthz on {}: unexpected answer ({e}): {}",
                self.addr,
                truncate(&r.text(), 300)
            ))
        })
    }

    pub fn attach(&self, ns: &Netns, req: &AttachRequest) -> Result<Attached, LabError> {
        let body = serde_json::to_string(req)
            .map_err(|e| LabError::Unexpected(format!("encoding {req:?}: {e}")))?;
        self.typed(ns, "POST", "/attach", Some(&body), 201)
    }

    pub fn detach(&self, ns: &Netns, id: u32) -> Result<(), LabError> {
        let path = format!("/attach/{id}");
        let r = self.request(ns, "DELETE", &path, None, &[])?;
        if r.status / 100 != 2 {
            return Err(self.answered("DELETE", &path, &r));
        }
        Ok(())
    }

    /// Polls `/flows?query` until a flow satisfies `pred`; returns it.
    pub fn wait_flow(
        &self,
        ns: &Netns,
        query: &FlowQuery,
        timeout: Duration,
        pred: impl Fn(&FlowView) -> bool,
    ) -> Result<FlowView, LabError> {
        let mut last = None;
        let found = poll_or_fail(timeout, Duration::from_millis(200), || {
            let page = self.flows(ns, query)?;
            let hit = page.flows.iter().find(|f| pred(f)).cloned();
            last = Some(page);
            Ok(hit)
        })?;
        found.ok_or_else(|| {
            LabError::Unexpected(format!(
                "no flow matched /flows?{} on {} within {timeout:?}; last answer: {}",
                query.to_query_string(),
                self.addr,
                truncate(&format!("{last:?}"), 2000)
            ))
        })
    }

    /// Opens `n` `/watch` streams and waits for each one's `200`; they stay open until dropped.
    pub fn watchers(&self, ns: &Netns, n: usize) -> Result<Vec<TcpStream>, LabError> {
        let addr = self.addr;
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET /watch HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n");
        ns.run(move || -> std::io::Result<Vec<TcpStream>> {
            let mut v = Vec::new();
            for _ in 0..n {
                let mut s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
                s.write_all(req.as_bytes())?;
                s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                let mut head = [0u8; 12];
                s.read_exact(&mut head)?;
                if &head[9..12] != b"200" {
                    return Err(std::io::Error::other(format!(
                        "/watch answered {}",
                        String::from_utf8_lossy(&head)
                    )));
                }
                v.push(s);
            }
            Ok(v)
        })?
        .map_err(|e| LabError::io(format!("opening /watch streams to {addr}"), e))
    }
}

/// [`poll`] for a check that can fail: its first error ends the wait.
fn poll_or_fail<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<Option<T>, LabError>,
) -> Result<Option<T>, LabError> {
    poll(timeout, interval, || match f() {
        Ok(None) => None,
        Ok(Some(v)) => Some(Ok(Some(v))),
        Err(e) => Some(Err(e)),
    })
    .unwrap_or(Ok(None))
}

/// Resident memory of process `pid` (this process with `None`), in KiB.
pub fn rss_kib(pid: Option<u32>) -> Result<u64, LabError> {
    let path = PathBuf::from(match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    });
    let text = std::fs::read_to_string(&path)
        .map_err(|e| LabError::io(format!("reading {}", path.display()), e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| LabError::Unexpected(format!("no VmRSS in {}", path.display())))
}
