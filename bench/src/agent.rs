//! The real `tracer agent` in a lab namespace, and small process helpers.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tracer_lab::{daemon::Daemon, http, netns::Netns};

pub const API: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));

/// A running agent; SIGTERM on drop (it detaches its tc programs), SIGKILL after 5 s.
pub struct Agent {
    daemon: Daemon,
}

impl Agent {
    /// Starts `tracer agent --listen 127.0.0.1:9464 EXTRA...` in `ns`, logging to `log`.
    pub fn start(ns: &Netns, tracer: &Path, log: &Path, extra: &[&str]) -> Result<Agent> {
        let mut cmd = Command::new(tracer);
        cmd.arg("agent")
            .arg("--listen")
            .arg(API.to_string())
            .args(extra)
            .env("TRACER_LOG", "warn");
        let daemon = Daemon::spawn(ns, "tracer agent", &mut cmd, log, Duration::from_secs(5))?;
        Ok(Agent { daemon })
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Waits until /healthz lists every interface of `ifaces` as attached.
    pub fn wait_attached(&mut self, ns: &Netns, ifaces: &[&str]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            self.daemon.check_running()?;
            if let Ok(v) = self.get(ns, "/healthz") {
                let names: Vec<&str> = v["attached"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x["name"].as_str()).collect())
                    .unwrap_or_default();
                if ifaces.iter().all(|i| names.contains(i)) {
                    return Ok(());
                }
                last = v.to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "agent never attached to {ifaces:?}; last /healthz: {last}; log:\n{}",
            self.daemon.log_tail(10)
        )
    }

    /// One-shot GET, parsed as JSON.
    pub fn get(&self, ns: &Netns, path: &str) -> Result<Value> {
        let r = http::get(ns, API, path, Duration::from_secs(5))?;
        if r.status != 200 {
            bail!("GET {path}: HTTP {}: {}", r.status, r.body);
        }
        Ok(r.json()?)
    }
}

/// Resident set size of a process, in bytes (VmRSS).
pub fn rss_bytes(pid: Option<u32>) -> Result<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))?;
    Ok(kb * 1024)
}

/// Runs `cmd` in `ns` to completion and returns its stdout; fails on a non-zero exit.
pub fn output_in(ns: &Netns, cmd: &mut Command) -> Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = ns.spawn(cmd)?;
    let out = child.wait_with_output().context("waiting for a command")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} in {} failed ({}): {}{}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            stdout.chars().take(400).collect::<String>()
        );
    }
    Ok(stdout)
}

/// Polls `log` until it contains `needle` (a daemon saying it is ready).
pub fn wait_log(daemon: &mut Daemon, log: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        daemon.check_running()?;
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "{} did not log {needle:?} within {timeout:?}:\n{}",
        daemon.name(),
        daemon.log_tail(10)
    )
}
