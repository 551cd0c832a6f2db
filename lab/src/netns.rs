//! Network namespaces owned by the lab.
//!
//! A [`Netns`] is created with `ip netns add` (so it is visible to `ip netns`, tcpdump users and
//! humans alike) and deleted on drop, after killing whatever still runs in it. Names carry a
//! per-process prefix from [`unique_prefix`] so that parallel tests never collide, and so that
//! namespaces leaked by a crashed test process can be recognised and removed later.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::{cmd, LabError};

/// Where iproute2 keeps the bind mounts of named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";
/// Prefix of every lab namespace name: `tr<pid><letters>-<role>`.
const NAME_PREFIX: &str = "tr";

/// A network namespace owned by the lab; deleted (`ip netns del`) on drop, after its processes
/// are killed. Errors during cleanup are logged and otherwise ignored.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (`ip netns add`) and brings its `lo` up.
    ///
    /// Fails if a namespace of that name already exists: silently adopting it could mean
    /// deleting someone else's namespace on drop.
    pub fn create(name: &str) -> Result<Netns, LabError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(LabError::Config(format!("bad namespace name {name:?}")));
        }
        cmd::run(Command::new("ip").args(["netns", "add", name]), None)?;
        // From here on, Drop cleans up even if the rest of the setup fails.
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        tracing::debug!(netns = name, "lab: namespace created");
        Ok(ns)
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount (`/run/netns/NAME`), e.g. for `setns(2)` or tools taking a
    /// namespace path.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip netns exec NAME args...` and returns its stdout. The error carries the command
    /// line, the exit status and stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String, LabError> {
        cmd::run(&mut self.exec_command(args), None)
    }

    /// Like [`Netns::exec`], feeding `stdin` to the command (for `iptables-restore`,
    /// `ipset restore`...).
    pub fn exec_with_stdin(&self, args: &[&str], stdin: &str) -> Result<String, LabError> {
        cmd::run(&mut self.exec_command(args), Some(stdin))
    }

    /// Runs `ip -n NAME args...` (cheaper than `exec(&["ip", ...])`) and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        cmd::run(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            None,
        )
    }

    /// Creates a veth pair: `name` here, its peer `peer` in `peer_ns`.
    pub fn add_veth(&self, name: &str, peer: &str, peer_ns: &Netns) -> Result<(), LabError> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &peer_ns.name,
        ])?;
        Ok(())
    }

    /// Writes a sysctl inside the namespace. `key` is either the `/proc/sys` path form
    /// (`net/ipv4/conf/eth0/rp_filter`, required when a component contains a dot, e.g.
    /// `vxlan.calico`) or the dotted form (`net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        let rel = if key.contains('/') {
            key.to_string()
        } else {
            key.replace('.', "/")
        };
        let path = Path::new("/proc/sys").join(rel.trim_start_matches('/'));
        let value = value.to_string();
        let ctx = format!("writing {} in {}", path.display(), self.name);
        // /proc/sys/net resolves against the netns of the thread doing the lookup.
        self.run(move || std::fs::write(&path, value))?
            .map_err(|e| LabError::io(ctx, e))
    }

    /// Disables IPv6 in the namespace, also for interfaces created afterwards. Lab captures then
    /// hold only the IPv4 traffic under test (no router solicitations, MLD or DAD).
    pub fn disable_ipv6(&self) -> Result<(), LabError> {
        for key in [
            "net/ipv6/conf/default/disable_ipv6",
            "net/ipv6/conf/all/disable_ipv6",
        ] {
            match self.sysctl(key, "1") {
                Err(LabError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    // Kernel without IPv6: nothing to silence.
                    return Ok(());
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// A `Command` for `ip netns exec NAME program`; add arguments and stdio, then spawn it.
    /// Unlike [`Netns::spawn`], it also bind-mounts `/etc/netns/NAME/*` like `ip netns exec`.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn exec_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Spawns `cmd` inside the namespace and returns the child; program, arguments,
    /// environment, working directory and stdio are used exactly as the caller configured them.
    ///
    /// The child enters the namespace between fork and exec (`setns(2)`), then gets a private
    /// mount namespace with `/sys` remounted, as `ip netns exec` does, so that tools reading
    /// `/sys/class/net` see the namespace's interfaces. The namespace handle is owned by `cmd`:
    /// a `Command` configured for one namespace must not be reused for another.
    ///
    /// The child is killed when this namespace is dropped; callers may also kill/wait it.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child, LabError> {
        let ns_file = File::open(self.path())
            .map_err(|e| LabError::io(format!("opening {}", self.path().display()), e))?;
        let sysfs_source = CString::new(self.name.as_str())
            .map_err(|_| LabError::Config(format!("namespace name {:?} has a NUL", self.name)))?;
        // SAFETY: the hook only makes raw system calls (setns, unshare, mount, umount2) on data
        // prepared before fork; it does not allocate, lock or touch shared state, so it is safe
        // to run in the forked child of a multi-threaded process.
        unsafe {
            cmd.pre_exec(move || enter_netns_for_exec(&ns_file, &sysfs_source));
        }
        let line = cmd::cmdline(cmd);
        tracing::debug!(netns = %self.name, cmd = %line, "lab: spawning");
        cmd.spawn()
            .map_err(|e| LabError::io(format!("spawning `{line}` in {}", self.name), e))
    }

    /// Runs `f` on a new OS thread that has entered this namespace (`setns(2)`), and returns its
    /// result. Sockets created by `f` stay in this namespace wherever they are used afterwards.
    /// A panic in `f` is returned as [`LabError::Panicked`].
    /// A non-blocking TCP listener bound to `addr` inside this namespace (the address must be
    /// configured here); the socket stays in the namespace, so its accept loop can run on any
    /// thread. `what` names the listener in errors.
    pub fn listen(
        &self,
        addr: std::net::SocketAddr,
        what: &str,
    ) -> Result<std::net::TcpListener, LabError> {
        let ctx = format!("{what} listening on {addr} in {}", self.name);
        self.run(move || -> std::io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?
        .map_err(|e| LabError::io(&ctx, e))
    }

    pub fn run<T, F>(&self, f: F) -> Result<T, LabError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = self.path();
        let name = self.name.clone();
        let handle = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || -> Result<T, LabError> {
                let file = File::open(&path)
                    .map_err(|e| LabError::io(format!("opening {}", path.display()), e))?;
                // SAFETY: plain system call on a valid, open descriptor; it only changes the
                // network namespace of this (dedicated, short-lived) thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(LabError::io(
                        format!("setns into {}", path.display()),
                        std::io::Error::last_os_error(),
                    ));
                }
                Ok(f())
            })
            .map_err(|e| LabError::io("spawning a namespace thread", e))?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => Err(LabError::Panicked {
                netns: self.name.clone(),
                message: panic_message(panic.as_ref()),
            }),
        }
    }
}

impl Netns {
    /// Starts `f` on a new, named OS thread that has entered this namespace and returns at
    /// once (unlike [`Netns::run`], which waits). Sockets the thread creates, and threads it
    /// spawns, live in this namespace. The thread's result includes a failed `setns`.
    pub fn spawn_thread<T, F>(
        &self,
        thread_name: &str,
        f: F,
    ) -> Result<std::thread::JoinHandle<Result<T, LabError>>, LabError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = self.path();
        // Opened here so a missing namespace is reported to the caller, not to the thread.
        let file = File::open(&path)
            .map_err(|e| LabError::io(format!("opening {}", path.display()), e))?;
        std::thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || -> Result<T, LabError> {
                // SAFETY: plain system call on a valid, open descriptor; it only changes the
                // network namespace of this dedicated thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(LabError::io(
                        format!("setns into {}", path.display()),
                        std::io::Error::last_os_error(),
                    ));
                }
                Ok(f())
            })
            .map_err(|e| LabError::io("spawning a namespace thread", e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs in the forked child before exec: only raw system calls (async-signal-safe).
fn enter_netns_for_exec(ns_file: &File, sysfs_source: &CString) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: raw system calls on valid descriptors and NUL-terminated strings owned by the
    // caller for the whole call.
    unsafe {
        check(libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET))?;
        // Same dance as iproute2's netns_switch: a private mount namespace in which /sys is a
        // fresh sysfs, which shows the network devices of the netns that mounts it.
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        ))?;
        // /sys may not be mounted at all; mounting over nothing is fine.
        let _ = libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH);
        check(libc::mount(
            sysfs_source.as_ptr(),
            c"/sys".as_ptr(),
            c"sysfs".as_ptr(),
            0,
            std::ptr::null(),
        ))?;
    }
    Ok(())
}

/// Kills the processes in namespace `name`, then deletes it. Best effort: logs failures.
fn remove_netns(name: &str) {
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = netns_pids(name);
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!(netns = name, ?pids, "lab: processes survive SIGKILL");
            break;
        }
        for pid in pids.into_iter().filter(|p| *p != me) {
            let Ok(pid) = libc::pid_t::try_from(pid) else {
                continue;
            };
            // SAFETY: kill(2) with a pid read from `ip netns pids`; a stale pid just fails.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match cmd::run(Command::new("ip").args(["netns", "del", name]), None) {
        Ok(_) => tracing::debug!(netns = name, "lab: namespace deleted"),
        Err(e) => tracing::warn!(netns = name, error = %e, "lab: could not delete namespace"),
    }
}

fn netns_pids(name: &str) -> Vec<u32> {
    match cmd::run(Command::new("ip").args(["netns", "pids", name]), None) {
        Ok(out) => out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A short prefix unique to this lab instance: `tr` + pid + letters from a process-wide counter
/// (e.g. `tr1234a`, `tr1234b`, ... `tr1234aa`), so namespace names look like `tr1234a-node`.
///
/// The first call in a process also removes stale lab namespaces left behind by lab processes
/// that no longer exist (see [`cleanup_stale`]).
pub fn unique_prefix() -> String {
    STALE_CLEANUP.call_once(|| {
        let n = cleanup_stale();
        if n > 0 {
            tracing::info!(removed = n, "lab: removed stale namespaces");
        }
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}{}", std::process::id(), letters(n))
}

/// Bijective base-26: 0 -> a, 25 -> z, 26 -> aa. Letters (not digits) keep pid and counter
/// apart, so the owning pid can be read back from a name.
fn letters(mut n: u32) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// The pid encoded in a lab namespace name (`tr<pid><letters>-...`), if it is one.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let digits_end = rest.find(|c: char| !c.is_ascii_digit())?;
    let (pid, rest) = rest.split_at(digits_end);
    let letters_end = rest.find(|c: char| !c.is_ascii_lowercase())?;
    if digits_end == 0 || letters_end == 0 || !rest[letters_end..].starts_with('-') {
        return None;
    }
    pid.parse().ok()
}

/// Deletes lab namespaces whose owning process is gone (crashed or killed test runs); returns
/// how many were removed. Namespaces of live processes, including this one, are left alone.
pub fn cleanup_stale() -> usize {
    let Ok(list) = cmd::run(Command::new("ip").args(["netns", "list"]), None) else {
        return 0;
    };
    let mut removed = 0;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = owner_pid(name) else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        tracing::info!(netns = name, pid, "lab: removing stale namespace");
        remove_netns(name);
        removed += 1;
    }
    removed
}

/// Names of all namespaces `ip netns list` shows (for tests and diagnostics).
pub fn list() -> Result<Vec<String>, LabError> {
    let out = cmd::run(Command::new("ip").args(["netns", "list"]), None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_are_bijective_base26() {
        assert_eq!(letters(0), "a");
        assert_eq!(letters(25), "z");
        assert_eq!(letters(26), "aa");
        assert_eq!(letters(27), "ab");
        assert_eq!(letters(26 + 26 * 26), "aaa");
    }

    #[test]
    fn owner_pid_parses_lab_names_only() {
        assert_eq!(owner_pid("tr1234a-node"), Some(1234));
        assert_eq!(owner_pid("tr1234ab-node-cali0123456789a"), Some(1234));
        assert_eq!(owner_pid("tr1234-node"), None);
        assert_eq!(owner_pid("tra-node"), None);
        assert_eq!(owner_pid("tr1234a"), None);
        assert_eq!(owner_pid("cni-1234a-x"), None);
    }

    #[test]
    fn prefixes_are_unique() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert_eq!(owner_pid(&format!("{a}-x")), Some(std::process::id()));
    }
}
