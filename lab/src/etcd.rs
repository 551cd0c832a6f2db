//! The datastore: a real etcd 3.4 in a lab namespace, a userspace delay line in front of it
//! (the lab's stand-in for a datastore in another region: no netem here), and a calico-node-like
//! startup that reads the datastore sequentially under a liveness-probe budget (seed 001).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::daemon::{poll, Daemon, LabDir};
use crate::http::{self, base64_decode, base64_encode, Connection};
use crate::netns::Netns;
use crate::LabError;

/// A single-member etcd cluster in a namespace, with its data dir and log in the lab directory.
/// Killed on drop.
#[derive(Debug)]
pub struct Etcd {
    daemon: Daemon,
    /// Where etcd itself serves clients.
    pub client: SocketAddr,
    /// Its peer URL's address (bound to the host's own address, like a real member).
    pub peer: SocketAddr,
    /// The data dir; unique per lab, so `pgrep -f` finds this daemon.
    pub data_dir: std::path::PathBuf,
}

impl Etcd {
    /// Starts etcd in `ns` serving clients on `client` and peers on `peer`, and waits until
    /// `/health` answers healthy.
    pub fn start(
        ns: &Netns,
        dir: &LabDir,
        name: &str,
        client: SocketAddr,
        peer: SocketAddr,
    ) -> Result<Etcd, LabError> {
        let data_dir = dir.join(&format!("etcd-{name}"));
        let log = dir.join(&format!("etcd-{name}.log"));
        let client_url = format!("http://{client}");
        let peer_url = format!("http://{peer}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("{name}={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        let mut daemon = Daemon::spawn(
            ns,
            &format!("etcd {name}"),
            &mut cmd,
            &log,
            Duration::from_millis(500),
        )?;
        let healthy = poll(Duration::from_secs(20), Duration::from_millis(50), || {
            if daemon.check_running().is_err() {
                return Some(false);
            }
            http::get(ns, client, "/health", Duration::from_millis(500))
                .ok()
                .filter(|r| r.status == 200 && r.body.contains("true"))
                .map(|_| true)
        });
        if healthy != Some(true) {
            daemon.check_running()?;
            return Err(LabError::Unexpected(format!(
                "etcd {name} did not become healthy on {client}; log:\n{}",
                daemon.log_tail(15)
            )));
        }
        Ok(Etcd {
            daemon,
            client,
            peer,
            data_dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Writes all `kvs` in one transaction (one fsync) through etcd's v3 JSON gateway.
    pub fn put_all(&self, ns: &Netns, kvs: &[(String, String)]) -> Result<(), LabError> {
        let ops: Vec<_> = kvs
            .iter()
            .map(|(k, v)| {
                json!({"request_put": {"key": base64_encode(k.as_bytes()),
                                        "value": base64_encode(v.as_bytes())}})
            })
            .collect();
        let body = json!({ "success": ops }).to_string();
        let r = http::post(
            ns,
            self.client,
            "/v3/kv/txn",
            &body,
            Duration::from_secs(10),
        )?;
        if r.status != 200 {
            return Err(LabError::Unexpected(format!(
                "etcd txn answered {}: {}",
                r.status,
                http::truncate(&r.body, 300)
            )));
        }
        Ok(())
    }
}

/// A client of etcd's v3 JSON gateway over one keep-alive HTTP/1.1 connection.
#[derive(Debug)]
pub struct EtcdClient {
    conn: Connection,
}

impl EtcdClient {
    /// Connects from inside `ns` to `endpoint`.
    pub fn connect(ns: &Netns, endpoint: SocketAddr, timeout: Duration) -> Result<Self, LabError> {
        Ok(EtcdClient {
            conn: Connection::open(ns, endpoint, timeout)?,
        })
    }

    /// `POST /v3/kv/range` for one key: its value, `None` if absent.
    pub fn get(&mut self, key: &str) -> Result<Option<String>, LabError> {
        let body = json!({ "key": base64_encode(key.as_bytes()) }).to_string();
        let r = self.conn.request("POST", "/v3/kv/range", Some(&body))?;
        if r.status != 200 {
            return Err(LabError::Unexpected(format!(
                "etcd range {key} answered {}: {}",
                r.status,
                http::truncate(&r.body, 300)
            )));
        }
        let v = r.json()?;
        Ok(v["kvs"]
            .as_array()
            .and_then(|kvs| kvs.first())
            .and_then(|kv| kv["value"].as_str())
            .and_then(base64_decode)
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}

/// calico-node's liveness probe, scaled down. Startup must finish before
/// `initial_delay + failure_threshold x period`, or the kubelet restarts the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub initial_delay: Duration,
    pub period: Duration,
    pub failure_threshold: u32,
}

impl Liveness {
    /// Seed 001's probe (initialDelaySeconds 10, periodSeconds 10, failureThreshold 6: 70 s)
    /// scaled 1:20 to 3.5 s.
    pub fn seed_001_scaled() -> Liveness {
        Liveness {
            initial_delay: Duration::from_millis(500),
            period: Duration::from_millis(500),
            failure_threshold: 6,
        }
    }

    /// How long startup may take before the probe kills it.
    pub fn budget(&self) -> Duration {
        self.initial_delay + self.period * self.failure_threshold
    }
}

/// What one calico-node-like startup did.
#[derive(Debug, Clone, PartialEq)]
pub struct StartupReport {
    pub endpoint: SocketAddr,
    /// Reads startup needs before it is live.
    pub reads_needed: usize,
    /// Reads done before it finished or was killed.
    pub reads_done: usize,
    /// Latency of each read.
    pub latencies: Vec<Duration>,
    /// From connect to the last read (or to the kill).
    pub elapsed: Duration,
    pub budget: Duration,
    /// All reads done within the budget.
    pub finished_in_budget: bool,
}

impl StartupReport {
    pub fn min_latency(&self) -> Duration {
        self.latencies.iter().min().copied().unwrap_or_default()
    }

    pub fn mean_latency(&self) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.iter().sum::<Duration>() / self.latencies.len() as u32
    }

    /// Projected startup time at the measured mean latency.
    pub fn projected(&self) -> Duration {
        self.mean_latency() * self.reads_needed as u32
    }
}

impl std::fmt::Display for StartupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} sequential datastore reads from {} in {:.2?} (budget {:.2?}): \
             per read min {:.1?} mean {:.1?}, projected startup {:.2?} -> {}",
            self.reads_done,
            self.reads_needed,
            self.endpoint,
            self.elapsed,
            self.budget,
            self.min_latency(),
            self.mean_latency(),
            self.projected(),
            if self.finished_in_budget {
                "live in time"
            } else {
                "killed by the liveness probe"
            }
        )
    }
}

/// The keys a calico-node startup reads (seed 001's debug log: per host metadata, BGP address,
/// network, AS number, orchestrator refs), for `hosts` hosts.
pub fn startup_keys(hosts: &[String]) -> Vec<(String, String)> {
    let mut kvs = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let ip = format!("10.12.{}.{}", 13 + i / 200, 10 + i % 200);
        kvs.push((format!("/calico/v1/host/{h}/metadata"), "{}".to_string()));
        kvs.push((format!("/calico/bgp/v1/host/{h}/ip_addr_v4"), ip));
        kvs.push((
            format!("/calico/bgp/v1/host/{h}/network_v4"),
            "10.12.13.0/24".into(),
        ));
        kvs.push((format!("/calico/bgp/v1/host/{h}/as_num"), "64512".into()));
        kvs.push((
            format!("/calico/v1/host/{h}/orchestrator_refs"),
            "[]".into(),
        ));
    }
    kvs
}

/// Host names of seed 001's cluster, for [`startup_keys`].
pub fn seed_001_hosts(n: usize) -> Vec<String> {
    const REGIONS: [&str; 4] = ["AMZ-SIN8", "AMZ-IAD12", "AMZ-OR39", "AMZ-NRT3"];
    (0..n)
        .map(|i| format!("{}-OpsResPool-{}-{}", REGIONS[i % 4], 13 + i / 4, 31 + i))
        .collect()
}

/// A calico-node-like startup on `ns`'s host network: reads `keys` one after the other over one
/// keep-alive connection to `endpoint`, and gives up ("killed by the liveness probe") once
/// `liveness.budget()` has passed.
pub fn run_startup(
    ns: &Netns,
    endpoint: SocketAddr,
    keys: &[String],
    liveness: Liveness,
) -> Result<StartupReport, LabError> {
    let budget = liveness.budget();
    let start = Instant::now();
    let mut client = EtcdClient::connect(ns, endpoint, Duration::from_secs(5))?;
    let mut latencies = Vec::with_capacity(keys.len());
    for key in keys {
        if start.elapsed() >= budget {
            break;
        }
        let t = Instant::now();
        client.get(key)?;
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    let reads_done = latencies.len();
    Ok(StartupReport {
        endpoint,
        reads_needed: keys.len(),
        reads_done,
        latencies,
        elapsed,
        budget,
        finished_in_budget: reads_done == keys.len() && elapsed <= budget,
    })
}

/// A TCP proxy that holds every byte coming back from the upstream for `delay` before passing
/// it on: each request/response exchange through it takes at least `delay` longer, as with a
/// datastore far away. Runs inside a namespace; stops on drop.
#[derive(Debug)]
pub struct DelayProxy {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), LabError>>>,
}

impl DelayProxy {
    /// Listens on `listen` in `ns` and forwards to `upstream` (also reached from `ns`).
    pub fn start(
        ns: &Netns,
        listen: SocketAddr,
        upstream: SocketAddr,
        delay: Duration,
    ) -> Result<DelayProxy, LabError> {
        let ctx = format!("delay proxy listening on {listen} in {}", ns.name());
        let listener = ns
            .run(move || -> std::io::Result<TcpListener> {
                let l = TcpListener::bind(listen)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .map_err(|e| LabError::io(&ctx, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        // Upstream connections are made from this thread, so it must live in the namespace.
        let thread = ns.spawn_thread(&format!("delay-proxy-{listen}"), move || {
            accept_loop(&listener, upstream, delay, &stop2);
        })?;
        Ok(DelayProxy {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    upstream: SocketAddr,
    delay: Duration,
    stop: &Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, peer)) => {
                let up = match TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, %upstream, error = %e, "lab: delay proxy upstream");
                        continue;
                    }
                };
                if let Err(e) = splice(client, up, delay, stop) {
                    tracing::warn!(%peer, error = %e, "lab: delay proxy connection");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "lab: delay proxy accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Starts the three pump threads of one proxied connection: client -> upstream as is,
/// upstream -> delay line -> client.
fn splice(
    client: TcpStream,
    up: TcpStream,
    delay: Duration,
    stop: &Arc<AtomicBool>,
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    for s in [&client, &up] {
        s.set_nodelay(true)?;
        // Reads wake up regularly to notice the proxy stopping.
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
    }
    let (c_read, c_write) = (client.try_clone()?, client);
    let (u_read, u_write) = (up.try_clone()?, up);
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let s1 = Arc::clone(stop);
    std::thread::spawn(move || {
        pump(c_read, |buf| (&u_write).write_all(buf), &s1);
        // The client is done sending: pass the half-close on.
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let s2 = Arc::clone(stop);
    std::thread::spawn(move || {
        // Dropping `tx` at the end ends the delay line, which then closes the client.
        pump(
            u_read,
            |buf| {
                tx.send((Instant::now(), buf.to_vec()))
                    .map_err(|_| std::io::Error::new(ErrorKind::BrokenPipe, "delay line closed"))
            },
            &s2,
        )
    });
    let s3 = Arc::clone(stop);
    std::thread::spawn(move || {
        // The delay line: each chunk leaves `delay` after it arrived.
        while let Ok((arrived, buf)) = rx.recv() {
            if s3.load(Ordering::Relaxed) {
                break;
            }
            let due = arrived + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if (&c_write).write_all(&buf).is_err() {
                break;
            }
        }
        let _ = c_write.shutdown(Shutdown::Both);
    });
    Ok(())
}

/// Copies from `from` into `sink` until EOF, an error, or the proxy stopping.
fn pump(
    mut from: TcpStream,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sink(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_budget_is_scaled_seed_001() {
        let l = Liveness::seed_001_scaled();
        assert_eq!(l.budget(), Duration::from_millis(3500));
        // The unscaled probe: 10 s + 6 x 10 s.
        let real = Liveness {
            initial_delay: Duration::from_secs(10),
            period: Duration::from_secs(10),
            failure_threshold: 6,
        };
        assert_eq!(real.budget(), l.budget() * 20);
    }

    #[test]
    fn startup_keys_follow_calicos_layout() {
        let hosts = seed_001_hosts(2);
        let kvs = startup_keys(&hosts);
        assert_eq!(kvs.len(), 10);
        assert!(kvs[1].0.starts_with("/calico/bgp/v1/host/AMZ-SIN8-"));
        assert!(kvs[1].0.ends_with("/ip_addr_v4"));
    }
}
