//! The real `tracer agent` in a bench lab (the lab's one harness, quiet), and small process
//! helpers.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tracer_lab::{
    agent::{Agent, Launch},
    daemon::Daemon,
    netns::Netns,
    topo::SingleNode,
};

/// Starts `tracer agent EXTRA...` on the lab's node, logging warnings to `log`, and waits
/// until it has attached to the pod's veth and the node's NIC.
pub fn start(lab: &SingleNode, tracer: &Path, log: &Path, extra: &[&str]) -> Result<Agent> {
    let mut agent = Launch::with_args(extra).env("TRACER_LOG", "warn").start(
        &lab.node,
        "tracer agent",
        tracer,
        log,
    )?;
    agent.wait_attached(
        &lab.node,
        &[lab.pod.veth.as_str(), lab.node_nic.as_str()],
        Duration::from_secs(20),
    )?;
    Ok(agent)
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
