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
        let listener = ns.listen(addr, "TCP server")?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| LabError::io(format!("address of the TCP server on {addr}"), e))?;
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

/// A TCP sink listening inside a namespace: reads every connection to its end and counts the
/// bytes that arrived (what the network delivered, whatever the sender managed to write).
/// Stops on drop.
#[derive(Debug)]
pub struct TcpSink {
    local_addr: SocketAddr,
    received: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpSink {
    /// Binds `addr` inside `ns` and starts counting.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<TcpSink, LabError> {
        let listener = ns.listen(addr, "sink")?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| LabError::io(format!("address of the sink on {addr}"), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
            std::thread::Builder::new()
                .name(format!("tcp-sink-{local_addr}"))
                .spawn(move || sink(listener, &stop, &received))
                .map_err(|e| LabError::io("spawning the sink thread", e))?
        };
        Ok(TcpSink {
            local_addr,
            received,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Bytes received so far, over every connection.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

fn sink(listener: TcpListener, stop: &AtomicBool, received: &std::sync::atomic::AtomicU64) {
    // One connection at a time is all the scenarios make; each is read on this thread, with a
    // short timeout so that a stop request is seen even while a transfer is stuck.
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!(error = %e, "lab: sink accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// From inside `ns`, connects to `sink` and writes `total` bytes, then waits until the sink
/// has them all or `timeout` has passed since the start. Returns the bytes the sink received:
/// below `total` when full-size packets do not get through. The socket is left to the kernel
/// (closed, its unsent data still queued), so a stuck transfer keeps being retransmitted.
pub fn tcp_bulk(
    ns: &Netns,
    sink: &TcpSink,
    total: usize,
    timeout: Duration,
) -> Result<u64, LabError> {
    let addr = sink.local_addr();
    let start = Instant::now();
    let wrote = ns.run(move || -> std::io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(&vec![0x5a; total])?;
        stream.shutdown(Shutdown::Write)
    })?;
    if let Err(e) = wrote {
        tracing::debug!(error = %e, %addr, "lab: bulk write did not finish");
    }
    while sink.received() < total as u64 && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(sink.received())
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
