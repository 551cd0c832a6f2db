//! Long-running processes of a lab (BIRD, etcd, tracer agents) and the per-lab directory that
//! holds their configuration, state, control sockets and logs.
//!
//! Both clean up on drop: a [`Daemon`] is terminated (SIGTERM, then SIGKILL), a [`LabDir`] is
//! removed. Neither ever touches system locations (/etc/bird, /run/bird, /var/lib/etcd...).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{owner_pid, Netns};
use crate::LabError;

/// Prefix of lab directories under the system temp dir: `tracer-lab-<netns prefix>`.
const DIR_PREFIX: &str = "tracer-lab-";

/// A lab's private directory, `$TMPDIR/tracer-lab-<prefix>`; removed (recursively) on drop.
#[derive(Debug)]
pub struct LabDir {
    path: PathBuf,
}

impl LabDir {
    /// Creates the directory for the lab whose namespace prefix is `prefix`. Fails if it exists:
    /// prefixes are unique per process, so an existing one belongs to someone else.
    pub fn create(prefix: &str) -> Result<LabDir, LabError> {
        cleanup_stale_dirs();
        let path = std::env::temp_dir().join(format!("{DIR_PREFIX}{prefix}"));
        std::fs::create_dir(&path)
            .map_err(|e| LabError::io(format!("creating {}", path.display()), e))?;
        Ok(LabDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for LabDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "lab: could not remove");
        }
    }
}

/// Removes lab directories left behind by lab processes that no longer exist.
fn cleanup_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(prefix) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        // Directory names are namespace prefixes; owner_pid() wants a full namespace name.
        let Some(pid) = owner_pid(&format!("{prefix}-x")) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A background process of the lab running inside a namespace, with stdout and stderr in a log
/// file. Terminated on drop: SIGTERM, then SIGKILL after a grace period.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    grace: Duration,
}

/// Output to `log`, no stdin, and a process group of its own (so a Ctrl-C on the terminal
/// reaches only the lab process, which then tears everything down in order).
fn detach_output(cmd: &mut Command, log: &Path) -> Result<(), LabError> {
    let (out, err) = log_files(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    // A parent that takes SIGTERM/SIGINT with sigwait blocks them (the bench does): a mask is
    // inherited across exec, and a daemon that never sees SIGTERM cannot shut down cleanly.
    // SAFETY: only async-signal-safe calls between fork and exec, on a local set.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    Ok(())
}

impl Daemon {
    /// Spawns `cmd` in `ns` (see [`Netns::spawn`]) with its output appended to `log`. The child
    /// gets its own process group, so a Ctrl-C on the terminal reaches only the lab process,
    /// which then tears everything down in order.
    pub fn spawn(
        ns: &Netns,
        name: &str,
        cmd: &mut Command,
        log: &Path,
        grace: Duration,
    ) -> Result<Daemon, LabError> {
        detach_output(cmd, log)?;
        let child = ns.spawn(cmd)?;
        Ok(Daemon::of(name, child, log, grace))
    }

    /// Like [`Daemon::spawn`] for a `Command` that enters the namespace itself (e.g.
    /// [`Netns::command`], i.e. `ip netns exec`).
    pub fn spawn_command(
        name: &str,
        cmd: &mut Command,
        log: &Path,
        grace: Duration,
    ) -> Result<Daemon, LabError> {
        detach_output(cmd, log)?;
        let line = crate::cmd::cmdline(cmd);
        let child = cmd
            .spawn()
            .map_err(|e| LabError::io(format!("spawning `{line}`"), e))?;
        Ok(Daemon::of(name, child, log, grace))
    }

    fn of(name: &str, child: Child, log: &Path, grace: Duration) -> Daemon {
        Daemon {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            grace,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `Err` with the exit status and log tail if the process has exited.
    pub fn check_running(&mut self) -> Result<(), LabError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(LabError::Unexpected(format!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                self.log_tail(15)
            ))),
            Err(e) => Err(LabError::io(format!("waiting for {}", self.name), e)),
        }
    }

    /// The exit status, if the process has exited (it is then reaped).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` and waits for the exit status, however long it takes.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> Result<ExitStatus, LabError> {
        if let Some(status) = self.exit_status() {
            return Ok(status);
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot be reused.
            unsafe {
                libc::kill(pid, signal);
            }
        }
        self.child
            .wait()
            .map_err(|e| LabError::io(format!("waiting for {}", self.name), e))
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot be reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_files(log: &Path) -> Result<(File, File), LabError> {
    let ctx = || format!("opening log {}", log.display());
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| LabError::io(ctx(), e))?;
    let err = out.try_clone().map_err(|e| LabError::io(ctx(), e))?;
    Ok((out, err))
}

/// Polls `f` every `interval` until it returns `Some` or `timeout` passes.
pub fn poll<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}
