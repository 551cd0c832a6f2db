//! Traffic inside lab namespaces: TCP probes, a greeting TCP server, tcpdump captures.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::LabError;

/// What a TCP connection attempt ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Handshake completed; `greeting` is the first line the server sent within the timeout
    /// (empty if it sent nothing).
    Connected { greeting: String },
    /// No answer within the timeout (SYNs or SYN-ACKs lost somewhere).
    TimedOut,
    /// RST in answer to the SYN.
    Refused,
    /// Any other connect error (e.g. no route, ICMP unreachable), as the OS reported it.
    Failed(String),
}

/// From inside `ns`, connects to `addr` within `timeout` and reads the server's first line
/// within what is left of it.
pub fn tcp_connect(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<ProbeOutcome, LabError> {
    // The socket is created on a thread inside `ns`, so its traffic starts there.
    ns.run(move || {
        let start = Instant::now();
        let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => s,
            Err(e) => {
                return match e.kind() {
                    ErrorKind::TimedOut | ErrorKind::WouldBlock => ProbeOutcome::TimedOut,
                    ErrorKind::ConnectionRefused => ProbeOutcome::Refused,
                    _ => ProbeOutcome::Failed(e.to_string()),
                }
            }
        };
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        let mut greeting = Vec::new();
        if stream.set_read_timeout(Some(left)).is_ok() {
            let mut byte = [0u8; 1];
            // Byte by byte up to the newline: greetings are one short line.
            while greeting.len() < 4096 {
                match stream.read(&mut byte) {
                    Ok(1) if byte[0] != b'\n' => greeting.push(byte[0]),
                    _ => break,
                }
            }
        }
        ProbeOutcome::Connected {
            greeting: String::from_utf8_lossy(&greeting).into_owned(),
        }
    })
}

/// From inside `ns`, TCP-connects to `addr` within `timeout`: `Ok(true)` if the handshake
/// completed and the server's greeting line arrived, `Ok(false)` on timeout, refusal or any
/// other connect failure. `Err` only if the probe could not be run at all.
pub fn tcp_probe(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<bool, LabError> {
    let outcome = tcp_connect(ns, addr, timeout)?;
    tracing::debug!(netns = ns.name(), %addr, ?outcome, "lab: tcp probe");
    Ok(matches!(outcome, ProbeOutcome::Connected { greeting } if !greeting.is_empty()))
}

/// A TCP server listening inside a namespace that answers every connection with one line,
/// `hello from <addr>`, then closes it. Records each client's address as the server saw it
/// (after any NAT on the way). Stops on drop.
#[derive(Debug)]
pub struct TcpServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Binds `addr` inside `ns` (the address must be configured there) and starts serving.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<TcpServer, LabError> {
        let ctx = format!("listening on {addr} in {}", ns.name());
        // Bound on a thread inside `ns`; the listening socket stays there, so the accept loop
        // below can run on an ordinary thread.
        let listener = ns
            .run(move || -> std::io::Result<TcpListener> {
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .map_err(|e| LabError::io(&ctx, e))?;
        let local_addr = listener.local_addr().map_err(|e| LabError::io(&ctx, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let greeting = format!("hello from {local_addr}\n");
        let thread = {
            let stop = Arc::clone(&stop);
            let peers = Arc::clone(&peers);
            std::thread::Builder::new()
                .name(format!("tcp-server-{local_addr}"))
                .spawn(move || serve(listener, &greeting, &stop, &peers))
                .map_err(|e| LabError::io("spawning the server thread", e))?
        };
        tracing::debug!(netns = ns.name(), %local_addr, "lab: tcp server started");
        Ok(TcpServer {
            local_addr,
            stop,
            peers,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Client addresses of the connections accepted so far, as seen by the server.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

fn serve(listener: TcpListener, greeting: &str, stop: &AtomicBool, peers: &Mutex<Vec<SocketAddr>>) {
    // Non-blocking accept polled every 10 ms: dropping the server needs no wake-up connection
    // (which would have to be made from inside the namespace).
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                peers
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(peer);
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = stream.write_all(greeting.as_bytes());
                let _ = stream.shutdown(Shutdown::Both);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!(error = %e, "lab: accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// tcpdump filter for TCP SYNs from `src` to `dst` (connection attempts, whatever their flags
/// beyond SYN).
pub fn syn_filter(src: impl std::fmt::Display, dst: SocketAddr) -> String {
    format!(
        "tcp[tcpflags] & tcp-syn != 0 and src host {src} and dst host {} and dst port {}",
        dst.ip(),
        dst.port()
    )
}

/// A running `tcpdump -n -l` in a namespace, with its output lines collected. Killed on drop.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    lines: Receiver<String>,
}

impl Capture {
    /// Starts `tcpdump -i IFACE -n -l [-Q DIRECTION] [-c COUNT] FILTER` in `ns` and waits until
    /// it reports that it is listening, so packets sent after this returns are captured.
    /// `direction` is tcpdump's `-Q` (`in`, `out`, `inout`).
    pub fn start(
        ns: &Netns,
        iface: &str,
        direction: Option<&str>,
        count: Option<u32>,
        filter: &str,
    ) -> Result<Capture, LabError> {
        Capture::start_with(ns, iface, direction, count, &[], filter)
    }

    /// Like [`Capture::start`], with extra tcpdump options (e.g. `-tt` for epoch timestamps).
    pub fn start_with(
        ns: &Netns,
        iface: &str,
        direction: Option<&str>,
        count: Option<u32>,
        options: &[&str],
        filter: &str,
    ) -> Result<Capture, LabError> {
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", iface, "-n", "-l"]);
        if let Some(d) = direction {
            cmd.args(["-Q", d]);
        }
        if let Some(c) = count {
            cmd.arg("-c").arg(c.to_string());
        }
        cmd.args(options)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ns.spawn(&mut cmd)?;
        let (tx, lines) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || {
                let mut stderr = Vec::new();
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    // tcpdump says this once the capture and its filter are active.
                    if line.starts_with("listening on") {
                        let _ = ready_tx.send(Ok(()));
                    }
                    stderr.push(line);
                }
                let _ = ready_tx.send(Err(stderr.join("\n")));
            });
        }
        let mut capture = Capture { child, lines };
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(capture),
            Ok(Err(stderr)) => Err(LabError::Unexpected(format!(
                "tcpdump in {} exited before listening: {stderr}",
                ns.name()
            ))),
            Err(_) => {
                let _ = capture.child.kill();
                Err(LabError::Unexpected(format!(
                    "tcpdump in {} did not start listening within 10 s",
                    ns.name()
                )))
            }
        }
    }

    /// Collects output lines until tcpdump exits (e.g. after `-c COUNT` packets) or `timeout`
    /// passes, whichever is first; then stops tcpdump and returns the lines.
    pub fn finish(self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                // Disconnected: stdout closed, tcpdump has exited.
                Err(RecvTimeoutError::Disconnected) | Err(RecvTimeoutError::Timeout) => break,
            }
        }
        out
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
