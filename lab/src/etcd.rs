//! The datastore: a real etcd 3.4 in a lab namespace, its v3 JSON gateway's client, and a
//! userspace delay line in front of it (the lab's stand-in for a datastore in another region:
//! no netem here). What calico-node reads from it is in [`crate::startup`].

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

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

    /// Writes all `kvs`, in transactions of at most 100 puts (etcd's default limit is 128).
    pub fn put_all(&self, ns: &Netns, kvs: &[(String, String)]) -> Result<(), LabError> {
        for chunk in kvs.chunks(100) {
            let ops: Vec<_> = chunk
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

    /// One request to the gateway; its JSON answer.
    fn call(&mut self, path: &str, body: Value, what: &str) -> Result<Value, LabError> {
        let r = self.conn.request("POST", path, Some(&body.to_string()))?;
        if r.status != 200 {
            return Err(LabError::Unexpected(format!(
                "etcd {what} answered {}: {}",
                r.status,
                http::truncate(&r.body, 300)
            )));
        }
        r.json()
    }

    /// `POST /v3/kv/range` for one key: its value, `None` if absent.
    pub fn get(&mut self, key: &str) -> Result<Option<String>, LabError> {
        let v = self.call(
            "/v3/kv/range",
            json!({ "key": base64_encode(key.as_bytes()) }),
            &format!("range {key}"),
        )?;
        Ok(v["kvs"]
            .as_array()
            .and_then(|kvs| kvs.first())
            .and_then(|kv| kv["value"].as_str())
            .and_then(base64_decode)
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// A prefix Get (what Calico's etcdv3 List is): every key under `prefix`, with its value
    /// unless `keys_only`.
    pub fn list(
        &mut self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<Vec<(String, String)>, LabError> {
        let v = self.call(
            "/v3/kv/range",
            json!({
                "key": base64_encode(prefix.as_bytes()),
                "range_end": base64_encode(&prefix_end(prefix.as_bytes())),
                "keys_only": keys_only,
            }),
            &format!("range {prefix}*"),
        )?;
        let text = |kv: &Value, f: &str| {
            kv[f]
                .as_str()
                .and_then(base64_decode)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        Ok(v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| (text(kv, "key"), text(kv, "value")))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Creates `key` unless it exists (Calico's Create: a txn on `create_revision == 0`).
    /// Whether it was created.
    pub fn create(&mut self, key: &str, value: &str) -> Result<bool, LabError> {
        let k = base64_encode(key.as_bytes());
        let v = self.call(
            "/v3/kv/txn",
            json!({
                "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                "success": [{"request_put": {"key": k, "value": base64_encode(value.as_bytes())}}],
            }),
            &format!("create {key}"),
        )?;
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }

    /// `POST /v3/kv/put`.
    pub fn put(&mut self, key: &str, value: &str) -> Result<(), LabError> {
        self.call(
            "/v3/kv/put",
            json!({"key": base64_encode(key.as_bytes()), "value": base64_encode(value.as_bytes())}),
            &format!("put {key}"),
        )
        .map(|_| ())
    }

    /// `POST /v3/kv/deleterange` for one key (absent is fine).
    pub fn delete(&mut self, key: &str) -> Result<(), LabError> {
        self.call(
            "/v3/kv/deleterange",
            json!({"key": base64_encode(key.as_bytes())}),
            &format!("delete {key}"),
        )
        .map(|_| ())
    }
}

/// The end of a prefix range: the prefix with its last byte incremented (etcd's `WithPrefix`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
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
        let listener = ns.listen(listen, "delay proxy")?;
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
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/calico/"), b"/calico0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
