//! A Kubernetes API **stand-in**: no kube-apiserver can be installed on the lab machines, so
//! this small HTTP/1.1 server speaks the real wire format for what tracer reads, from the
//! Kubernetes API reference, and tracer's production kube-rs code talks to it through a
//! kubeconfig pointing at `http://<stand-in>`. It is not an API server: no auth, no
//! admission, no writes over HTTP (tests change objects through [`Store`]).
//!
//! What it honours (see /work/shared/KUBERNETES-NOTES.md):
//! - list and watch of `pods`, `services`, `nodes` (`/api/v1/<plural>` and, for namespaced
//!   kinds, `/api/v1/namespaces/<ns>/<plural>`), of `networkpolicies` in networking.k8s.io/v1 and
//!   Calico's `networkpolicies` and `globalnetworkpolicies` CRDs in crd.projectcalico.org/v1
//!   (`/apis/<group>/<version>/...`), `*List` bodies with `metadata.resourceVersion`;
//! - a group whose CRDs are not installed ([`Store::serve_group`]) is a 404 `Status`, as the
//!   apiserver answers a resource it does not serve;
//! - `fieldSelector` (`metadata.name`, `metadata.namespace`, `spec.nodeName`; `=`, `==`, `!=`)
//!   and `labelSelector` (kubectl syntax); a bad selector is a 400 `Status`;
//! - `watch=true` from a `resourceVersion`: chunked newline-delimited `ADDED`/`MODIFIED`/
//!   `DELETED` events, `BOOKMARK`s with `allowWatchBookmarks=true`, `timeoutSeconds`;
//! - an expired `resourceVersion` (older than the last compaction) answers an `ERROR` event
//!   carrying a 410 `Status` with reason `Expired`, as the apiserver does, so clients relist.
//!
//! - GET of one object (`/api/v1/namespaces/<ns>/<plural>/<name>`), a 404 `Status` when absent;
//!   Secrets carry their `data` base64-encoded, as the API serves them;
//! - the pods/proxy subresource, `/api/v1/namespaces/<ns>/pods/<name>[:<port>]/proxy/<path>?<query>`
//!   (port a number or a container port's name; none is 80): the request goes on to the pod's
//!   `status.podIP` with the prefix removed and the answer streams back as it comes, chunked
//!   NDJSON included. As the apiserver's authentication filter does, the caller's
//!   `Authorization` is removed before the request is passed on, so the backend never sees
//!   the client's credentials; other headers pass. An unreachable pod is a 503 `Status`.
//!
//! Routes are one table ([`Route`]).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tracer_model::identity::Selector;

use crate::{netns::Netns, LabError};

/// The kinds the stand-in serves: (resource, group/version, kind, namespaced). The resource is
/// the plural for the core group and `<plural>.<group>` for the others (as RBAC and
/// `kubectl api-resources` name them); [`Store`] keys objects by it.
const KINDS: [(&str, &str, &str, bool); 7] = [
    ("pods", "v1", "Pod", true),
    ("services", "v1", "Service", true),
    ("nodes", "v1", "Node", false),
    ("secrets", "v1", "Secret", true),
    (
        "networkpolicies.networking.k8s.io",
        "networking.k8s.io/v1",
        "NetworkPolicy",
        true,
    ),
    (
        "networkpolicies.crd.projectcalico.org",
        "crd.projectcalico.org/v1",
        "NetworkPolicy",
        true,
    ),
    (
        "globalnetworkpolicies.crd.projectcalico.org",
        "crd.projectcalico.org/v1",
        "GlobalNetworkPolicy",
        false,
    ),
];

/// The group a CRD-backed kind belongs to: it is served only while its CRDs are installed.
pub const CALICO_CRD_GROUP: &str = "crd.projectcalico.org";

/// Objects, their resourceVersions and the event history watches replay from.
#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    /// (plural, namespace, name) -> object.
    objects: BTreeMap<(String, String, String), Value>,
    /// (rv, plural, type, object), oldest first; everything at or below `compacted` is gone.
    events: Vec<(u64, String, &'static str, Value)>,
    compacted: u64,
    /// Bumped to end every open watch, as their timeout would.
    generation: u64,
    /// List requests served, per plural: a relist shows here.
    lists: BTreeMap<String, u64>,
    watches: BTreeMap<String, u64>,
    /// Watches answered 410 Gone, per plural.
    expired: BTreeMap<String, u64>,
    /// API groups not served (their CRDs not installed): every path under them is a 404.
    unserved: std::collections::BTreeSet<String>,
}

/// The stand-in's data, shared by its server threads and the test that drives it.
#[derive(Debug, Default)]
pub struct Store {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Store {
    pub fn new() -> Arc<Store> {
        Arc::new(Store::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object of `plural` (`ADDED` or `MODIFIED`), setting its
    /// resourceVersion (and uid and creationTimestamp when new), as the apiserver does.
    pub fn apply(&self, plural: &str, mut obj: Value) -> Result<(), LabError> {
        let (ns, name) = ns_name(&obj)?;
        let mut g = self.lock();
        g.rv += 1;
        let rv = g.rv;
        let key = (plural.to_string(), ns, name);
        let existing = g.objects.get(&key).cloned();
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        let uid = existing
            .as_ref()
            .map(|o| o["metadata"]["uid"].clone())
            .unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{rv:012x}")));
        meta["uid"] = uid;
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = json!("2026-11-27T00:00:00Z");
        }
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        g.objects.insert(key, obj.clone());
        g.events.push((rv, plural.to_string(), kind, obj));
        drop(g);
        self.changed.notify_all();
        Ok(())
    }

    /// Deletes an object (`DELETED` with its last state); absent is fine.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) {
        let mut g = self.lock();
        let key = (plural.to_string(), namespace.to_string(), name.to_string());
        if let Some(mut obj) = g.objects.remove(&key) {
            g.rv += 1;
            let rv = g.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            g.events.push((rv, plural.to_string(), "DELETED", obj));
        }
        drop(g);
        self.changed.notify_all();
    }

    /// Compacts the history and ends every open watch: clients that re-watch from the version
    /// they had get 410 Gone and must relist.
    pub fn expire_watches(&self) {
        let mut g = self.lock();
        // Other writes happened meanwhile (as in any busy cluster) and were compacted with
        // the rest, so every client's last version is now older than the oldest kept.
        g.rv += 1;
        g.compacted = g.rv;
        g.events.clear();
        g.generation += 1;
        drop(g);
        self.changed.notify_all();
    }

    /// Serves `group` or stops serving it, as installing or removing its CRDs does.
    pub fn serve_group(&self, group: &str, served: bool) {
        let mut g = self.lock();
        if served {
            g.unserved.remove(group);
        } else {
            g.unserved.insert(group.to_string());
        }
    }

    fn served(&self, resource: &str) -> bool {
        let group = resource.split_once('.').map_or("", |(_, g)| g);
        !self.lock().unserved.contains(group)
    }

    /// List requests served for `plural` so far.
    pub fn lists(&self, plural: &str) -> u64 {
        self.lock().lists.get(plural).copied().unwrap_or(0)
    }

    /// Watches of `plural` answered 410 Gone so far.
    pub fn expired(&self, plural: &str) -> u64 {
        self.lock().expired.get(plural).copied().unwrap_or(0)
    }

    /// Watch requests served for `plural` so far.
    pub fn watches(&self, plural: &str) -> u64 {
        self.lock().watches.get(plural).copied().unwrap_or(0)
    }
}

fn ns_name(obj: &Value) -> Result<(String, String), LabError> {
    let m = &obj["metadata"];
    let name = m["name"]
        .as_str()
        .ok_or_else(|| LabError::Config("object without metadata.name".into()))?;
    Ok((
        m["namespace"].as_str().unwrap_or("").to_string(),
        name.to_string(),
    ))
}

/// The stand-in serving a [`Store`] on one address in a namespace. Stopping it (drop) closes
/// the listener and every open connection, as an unreachable API server would look; a new
/// one can serve the same store again.
#[derive(Debug)]
pub struct KubeStandin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// How often watches with allowWatchBookmarks get a BOOKMARK.
    pub bookmark_every: Duration,
}

impl KubeStandin {
    /// Serves on `addr` inside `ns`; pods/proxy connects to pods from `ns` too.
    pub fn start(ns: &Netns, addr: SocketAddr, store: Arc<Store>) -> Result<KubeStandin, LabError> {
        let listener = ns.listen(addr, "kube stand-in")?;
        KubeStandin::start_on(listener, store, Some(ns.path()))
    }

    /// Serves on `listener` (non-blocking; e.g. on the test's own loopback, where a client
    /// outside every lab namespace reaches it). pods/proxy opens its connections to pods from
    /// the namespace at `proxy_netns` (its bind mount, e.g. a lab host on the nodes' LAN), or
    /// from this process's namespace when `None`.
    pub fn start_on(
        listener: TcpListener,
        store: Arc<Store>,
        proxy_netns: Option<PathBuf>,
    ) -> Result<KubeStandin, LabError> {
        let addr = listener
            .local_addr()
            .map_err(|e| LabError::io("the stand-in's address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let bookmark_every = Duration::from_secs(1);
        let thread = {
            let stop = Arc::clone(&stop);
            let server = Server {
                store,
                stop,
                bookmarks: bookmark_every,
                proxy_netns,
            };
            std::thread::Builder::new()
                .name(format!("kube-standin-{addr}"))
                .spawn(move || accept(listener, Arc::new(server)))
                .map_err(|e| LabError::io("spawning the stand-in", e))?
        };
        Ok(KubeStandin {
            addr,
            stop,
            thread: Some(thread),
            bookmark_every,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context points at the stand-in.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\n\
             contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    \
             namespace: {namespace}\ncurrent-context: standin\nusers:\n- name: standin\n  user:\n    \
             token: standin-token\n",
            self.url()
        )
    }
}

impl Drop for KubeStandin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What every connection of one stand-in shares.
struct Server {
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
    bookmarks: Duration,
    proxy_netns: Option<PathBuf>,
}

fn accept(listener: TcpListener, server: Arc<Server>) {
    let (store, stop) = (Arc::clone(&server.store), Arc::clone(&server.stop));
    let mut conns: Vec<(TcpStream, JoinHandle<()>)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let Ok(mine) = stream.try_clone() else {
                    continue;
                };
                let server = Arc::clone(&server);
                if let Ok(t) = std::thread::Builder::new()
                    .name("kube-standin-conn".into())
                    .spawn(move || serve(stream, &server))
                {
                    conns.push((mine, t));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
        conns.retain(|(_, t)| !t.is_finished());
    }
    // Gone: every connection is cut, mid-watch included.
    store.changed.notify_all();
    for (s, t) in conns {
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = t.join();
    }
}

/// One parsed request.
struct Request {
    method: String,
    path: String,
    /// The query string as sent (pods/proxy passes it on untouched).
    raw_query: String,
    query: BTreeMap<String, String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// What a path asks for.
enum Route {
    /// list or watch of `plural`, in one namespace or all.
    Collection {
        plural: &'static str,
        namespace: Option<String>,
    },
    /// GET of one object.
    Object {
        plural: &'static str,
        namespace: String,
        name: String,
    },
    /// pods/proxy: `port` as given (a number, a port name, or none), `path` after `proxy`.
    PodProxy {
        namespace: String,
        pod: String,
        port: Option<String>,
        path: String,
    },
}

fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The resource of `plural` in `gv`, namespaced when asked for in a namespace.
    let find = |gv: &str, p: &str, namespaced: bool| {
        KINDS
            .iter()
            .find(|(res, g, _, ns)| {
                *g == gv && res.split('.').next() == Some(p) && (*ns || !namespaced)
            })
            .map(|(res, _, _, _)| *res)
    };
    match parts.as_slice() {
        ["apis", group, version, plural] => Some(Route::Collection {
            plural: find(&format!("{group}/{version}"), plural, false)?,
            namespace: None,
        }),
        ["apis", group, version, "namespaces", ns, plural] => Some(Route::Collection {
            plural: find(&format!("{group}/{version}"), plural, true)?,
            namespace: Some(ns.to_string()),
        }),
        ["apis", group, version, "namespaces", ns, plural, name] => Some(Route::Object {
            plural: find(&format!("{group}/{version}"), plural, true)?,
            namespace: ns.to_string(),
            name: name.to_string(),
        }),
        ["api", "v1", plural] => Some(Route::Collection {
            plural: find("v1", plural, false)?,
            namespace: None,
        }),
        ["api", "v1", "namespaces", ns, plural] => Some(Route::Collection {
            plural: find("v1", plural, true)?,
            namespace: Some(ns.to_string()),
        }),
        ["api", "v1", "namespaces", ns, "pods", target, "proxy", rest @ ..] => {
            let (pod, port) = match target.split_once(':') {
                Some((pod, port)) => (pod, Some(port.to_string())),
                None => (*target, None),
            };
            Some(Route::PodProxy {
                namespace: ns.to_string(),
                pod: pod.to_string(),
                port,
                path: format!("/{}", rest.join("/")),
            })
        }
        ["api", "v1", "namespaces", ns, plural, name] => Some(Route::Object {
            plural: find("v1", plural, true)?,
            namespace: ns.to_string(),
            name: name.to_string(),
        }),
        _ => None,
    }
}

/// Keep-alive: requests are served one after another on the connection until it closes.
fn serve(stream: TcpStream, server: &Server) {
    let Ok(write) = stream.try_clone() else {
        return;
    };
    let (store, stop) = (&*server.store, &*server.stop);
    let mut w = write;
    let mut r = BufReader::new(stream);
    while !stop.load(Ordering::Relaxed) {
        let Some(req) = read_request(&mut r) else {
            return;
        };
        // A group whose CRDs are not installed is not there at all.
        let route = route(&req.path).filter(|r| match r {
            Route::Collection { plural, .. } | Route::Object { plural, .. } => store.served(plural),
            Route::PodProxy { .. } => true,
        });
        if req.method != "GET" && !matches!(route, Some(Route::PodProxy { .. })) {
            // Tests write through the Store; the stand-in serves reads only.
            if !status(
                &mut w,
                405,
                "MethodNotAllowed",
                &format!("{} is not supported by the stand-in", req.method),
            ) {
                return;
            }
            continue;
        }
        let keep = match route {
            Some(Route::Collection { plural, namespace }) => collection(
                &mut w,
                store,
                stop,
                plural,
                namespace.as_deref(),
                &req,
                server.bookmarks,
            ),
            Some(Route::Object {
                plural,
                namespace,
                name,
            }) => object(&mut w, store, plural, &namespace, &name),
            Some(Route::PodProxy {
                namespace,
                pod,
                port,
                path,
            }) => pod_proxy(
                &mut w,
                server,
                &namespace,
                &pod,
                port.as_deref(),
                &path,
                &req,
            ),
            None => status(
                &mut w,
                404,
                "NotFound",
                &format!(
                    "the server could not find the requested resource ({})",
                    req.path
                ),
            ),
        };
        if !keep {
            return;
        }
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut words = line.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    // Bodies come with a Content-Length (the clients here send nothing chunked).
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(1 << 20)];
    std::io::Read::read_exact(r, &mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = form_pairs(q);
    Some(Request {
        method,
        path: path.to_string(),
        raw_query: q.to_string(),
        query,
        headers,
        body,
    })
}

/// GET of one object, as stored (Secrets' `data` is base64 already).
fn object(w: &mut TcpStream, store: &Store, plural: &str, namespace: &str, name: &str) -> bool {
    let key = (plural.to_string(), namespace.to_string(), name.to_string());
    let found = store.lock().objects.get(&key).cloned();
    match found {
        Some(obj) => respond(w, 200, &obj.to_string()),
        None => status(
            w,
            404,
            "NotFound",
            &format!("{plural} \"{name}\" not found"),
        ),
    }
}

/// Headers a proxy never passes on: hop-by-hop ones (RFC 9110 7.6.1), the ones it sets itself,
/// and `Authorization`, which the apiserver's authentication filter deletes.
const NOT_PASSED_ON: [&str; 7] = [
    "authorization",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// pods/proxy: the request goes on to the pod's IP and the answer streams back byte for byte
/// until the pod closes (the answer is framed by the pod; the connection is not reused).
fn pod_proxy(
    w: &mut TcpStream,
    server: &Server,
    namespace: &str,
    pod: &str,
    port: Option<&str>,
    path: &str,
    req: &Request,
) -> bool {
    let key = ("pods".to_string(), namespace.to_string(), pod.to_string());
    let Some(obj) = server.store.lock().objects.get(&key).cloned() else {
        return status(w, 404, "NotFound", &format!("pods \"{pod}\" not found"));
    };
    let port: Option<u16> = match port {
        None => Some(80),
        Some(p) => p.parse().ok().or_else(|| {
            obj["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .find(|cp| cp["name"].as_str() == Some(p))
                .and_then(|cp| cp["containerPort"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
        }),
    };
    let ip = obj["status"]["podIP"]
        .as_str()
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    let (Some(ip), Some(port)) = (ip, port) else {
        return status(
            w,
            503,
            "ServiceUnavailable",
            &format!("pod {namespace}/{pod} has no address or no such port"),
        );
    };
    let addr = SocketAddr::new(ip, port);
    let mut backend = match connect_from(server.proxy_netns.as_deref(), addr) {
        Ok(b) => b,
        Err(e) => {
            return status(
                w,
                503,
                "ServiceUnavailable",
                &format!("error trying to reach service: dial tcp {addr}: {e}"),
            )
        }
    };
    let target = if req.raw_query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", req.raw_query)
    };
    let mut head = format!(
        "{} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n",
        req.method
    );
    for (k, v) in &req.headers {
        if !NOT_PASSED_ON.contains(&k.to_ascii_lowercase().as_str()) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", req.body.len()));
    if backend
        .write_all(head.as_bytes())
        .and_then(|_| backend.write_all(&req.body))
        .is_err()
    {
        return status(
            w,
            503,
            "ServiceUnavailable",
            &format!("writing to {addr} failed"),
        );
    }
    // Short reads, so a stopping stand-in is noticed between an agent's heartbeats.
    let _ = backend.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 16 * 1024];
    loop {
        if server.stop.load(Ordering::Relaxed) {
            return false;
        }
        match std::io::Read::read(&mut backend, &mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                if w.write_all(&buf[..n]).and_then(|_| w.flush()).is_err() {
                    // The client went away: so does the pod's end.
                    return false;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return false,
        }
    }
}

/// A TCP connection to `addr` opened from the namespace at `netns` (a dedicated thread enters
/// it; the socket stays there).
fn connect_from(netns: Option<&Path>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let timeout = Duration::from_secs(3);
    let Some(netns) = netns else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let file = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        // SAFETY: plain system call on a valid, open descriptor; it only changes the network
        // namespace of this short-lived thread.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        TcpStream::connect_timeout(&addr, timeout)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("connect thread panicked")))
}

fn form_pairs(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

/// Percent-decoding of a query component (`+` is a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(c) => {
                        out.push(c);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A field selector: `spec.nodeName=x,metadata.namespace!=y`.
fn field_matches(sel: &[(String, bool, String)], obj: &Value) -> bool {
    sel.iter().all(|(field, eq, want)| {
        let mut v = obj;
        for part in field.split('.') {
            v = &v[part];
        }
        (v.as_str().unwrap_or("") == want) == *eq
    })
}

/// The fields the apiserver allows selecting on for these kinds.
const FIELDS: [&str; 3] = ["metadata.name", "metadata.namespace", "spec.nodeName"];

fn parse_fields(s: &str) -> Result<Vec<(String, bool, String)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, eq, v) = if let Some((k, v)) = p.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = p.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = p.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{p}'; can't understand '{p}'"));
            };
            let k = k.trim();
            if !FIELDS.contains(&k) {
                return Err(format!("field label not supported: {k}"));
            }
            Ok((k.to_string(), eq, v.trim().to_string()))
        })
        .collect()
}

/// List or watch. Whether the connection can serve another request.
fn collection(
    w: &mut TcpStream,
    store: &Store,
    stop: &AtomicBool,
    plural: &str,
    namespace: Option<&str>,
    req: &Request,
    bookmark_every: Duration,
) -> bool {
    let fields = match req.query.get("fieldSelector").map(|s| parse_fields(s)) {
        Some(Err(msg)) => return status(w, 400, "BadRequest", &msg),
        Some(Ok(f)) => f,
        None => Vec::new(),
    };
    let labels = match req.query.get("labelSelector").filter(|s| !s.is_empty()) {
        Some(s) => match Selector::parse(s) {
            Ok(sel) => Some(sel),
            Err(msg) => {
                return status(
                    w,
                    400,
                    "BadRequest",
                    &format!("unable to parse requirement: {msg}"),
                )
            }
        },
        None => None,
    };
    let matches = |obj: &Value| {
        namespace.is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && field_matches(&fields, obj)
            && labels.as_ref().is_none_or(|sel| {
                let l: BTreeMap<String, String> = obj["metadata"]["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                sel.matches(&l)
            })
    };
    let (api_version, kind) = KINDS
        .iter()
        .find(|(p, _, _, _)| *p == plural)
        .map_or(("v1", "Unknown"), |(_, gv, k, _)| (*gv, *k));
    if req
        .query
        .get("watch")
        .is_some_and(|v| v == "true" || v == "1")
    {
        return watch(
            w,
            store,
            stop,
            (plural, api_version, kind),
            req,
            &matches,
            bookmark_every,
        );
    }
    let body = {
        let mut g = store.lock();
        *g.lists.entry(plural.to_string()).or_default() += 1;
        let items: Vec<Value> = g
            .objects
            .iter()
            .filter(|((p, _, _), o)| p == plural && matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        json!({
            "kind": format!("{kind}List"),
            "apiVersion": api_version,
            "metadata": {"resourceVersion": g.rv.to_string()},
            "items": items,
        })
    };
    respond(w, 200, &body.to_string())
}

/// `what`: (resource, apiVersion, kind) of the watched objects.
fn watch(
    w: &mut TcpStream,
    store: &Store,
    stop: &AtomicBool,
    what: (&str, &str, &str),
    req: &Request,
    matches: &dyn Fn(&Value) -> bool,
    bookmark_every: Duration,
) -> bool {
    let (plural, api_version, kind) = what;
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if w.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let (mut g, generation) = {
        let mut g = store.lock();
        *g.watches.entry(plural.to_string()).or_default() += 1;
        let generation = g.generation;
        (g, generation)
    };
    // Watching from before the last compaction: the version has expired.
    if from < g.compacted && from != 0 {
        let compacted = g.compacted;
        *g.expired.entry(plural.to_string()).or_default() += 1;
        drop(g);
        let ev = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({compacted})"),
            "reason": "Expired", "code": 410}});
        return chunk(w, &ev) && end_chunks(w);
    }
    let mut seen = from.max(if from == 0 { g.rv } else { 0 });
    let started = Instant::now();
    let mut last_bookmark = Instant::now();
    loop {
        let pending: Vec<Value> = g
            .events
            .iter()
            .filter(|(rv, p, _, o)| *rv > seen && p == plural && matches(o))
            .map(|(_, _, t, o)| json!({"type": t, "object": o}))
            .collect();
        seen = g.rv;
        let ended = g.generation != generation;
        drop(g);
        for ev in &pending {
            if !chunk(w, ev) {
                return false;
            }
        }
        if stop.load(Ordering::Relaxed) {
            // Going away: the connection is cut.
            return false;
        }
        if ended {
            // Ended as a watch timeout ends it: the response completes and the connection
            // stays for the client's next request (its re-watch).
            return end_chunks(w);
        }
        if started.elapsed() >= timeout {
            return end_chunks(w);
        }
        if bookmarks && last_bookmark.elapsed() >= bookmark_every {
            last_bookmark = Instant::now();
            let ev = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": seen.to_string()}}});
            if !chunk(w, &ev) {
                return false;
            }
        }
        g = store.lock();
        if g.rv == seen && g.generation == generation {
            g = store
                .changed
                .wait_timeout(g, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

fn chunk(w: &mut TcpStream, v: &Value) -> bool {
    let line = format!("{v}\n");
    w.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
        .and_then(|_| w.flush())
        .is_ok()
}

fn end_chunks(w: &mut TcpStream) -> bool {
    w.write_all(b"0\r\n\r\n").is_ok()
}

fn respond(w: &mut TcpStream, code: u16, body: &str) -> bool {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    };
    w.write_all(
        format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .is_ok()
}

/// A `Status` failure, as the apiserver answers errors.
fn status(w: &mut TcpStream, code: u16, reason: &str, message: &str) -> bool {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code});
    respond(w, code, &body.to_string())
}

/// A Pod as the API returns it (the fields tracer reads, and the ones around them).
pub fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    ip: &str,
    labels: &[(&str, &str)],
    owner: Option<(&str, &str)>,
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let owners: Vec<Value> = owner
        .map(|(kind, oname)| {
            json!({"apiVersion": "apps/v1", "kind": kind, "name": oname,
                "uid": "00000000-0000-4000-8000-0000000000aa", "controller": true,
                "blockOwnerDeletion": true})
        })
        .into_iter()
        .collect();
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
            "ownerReferences": owners},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// A ClusterIP Service.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{"protocol": "TCP", "port": port, "targetPort": port}]},
    })
}

/// A Node with its InternalIP and Calico's address annotation.
pub fn node(name: &str, internal_ip: &str) -> Value {
    json!({
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name,
            "annotations": {"projectcalico.org/IPv4Address": format!("{internal_ip}/24")}},
        "status": {"addresses": [{"type": "InternalIP", "address": internal_ip},
            {"type": "Hostname", "address": name}]},
    })
}

/// A tracer agent pod of deploy/'s DaemonSet: host network (its IP is the node's), labelled
/// `app.kubernetes.io/name=tracer`, its API on the container port named `http`.
pub fn agent_pod(namespace: &str, name: &str, node: &str, node_ip: &str, port: u16) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "tracer"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "tracer",
                "uid": "00000000-0000-4000-8000-0000000000bb", "controller": true,
                "blockOwnerDeletion": true}]},
        "spec": {"nodeName": node, "hostNetwork": true, "serviceAccountName": "tracer",
            "containers": [{"name": "tracer", "image": "tracer:latest",
                "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": node_ip, "podIPs": [{"ip": node_ip}],
            "hostIP": node_ip,
            "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

/// `pod` as the API server lists it once its readiness probe fails: the kubelet's Ready
/// condition False with reason ContainersNotReady (what a node controller's NotReady marking
/// also leaves: Ready not True).
pub fn not_ready(mut pod: Value) -> Value {
    let names: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False",
        "reason": "ContainersNotReady",
        "message": format!("containers with unready status: [{}]", names.join(" "))}]);
    pod
}

/// An Opaque Secret; the API serves `data` values base64-encoded.
pub fn secret(namespace: &str, name: &str, data: &[(&str, &[u8])]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(crate::http::base64_encode(v))))
        .collect();
    json!({
        "kind": "Secret", "apiVersion": "v1", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace},
        "data": data,
    })
}

/// `p` as the Kubernetes datastore holds it: (resource, object).
/// - A Kubernetes NetworkPolicy (networking.k8s.io/v1): each Allow rule an ingress/egress rule
///   with an `ipBlock` peer and a TCP port; a Deny rule cannot be written as one (an error).
/// - A Calico NetworkPolicy or GlobalNetworkPolicy: the crd.projectcalico.org/v1 object as
///   libcalico-go writes it (`ConvertCalicoResourceToK8sResource`): the v3 spec, and the v3
///   metadata (its name included) in the `projectcalico.org/metadata` annotation.
pub fn policy_object(p: &crate::policy::LabPolicy) -> Result<(&'static str, Value), LabError> {
    use crate::policy::{Direction, Kind};
    let mut meta = json!({"name": p.name});
    if let Some(ns) = &p.namespace {
        meta["namespace"] = json!(ns);
    }
    let types = match p.direction {
        Direction::Ingress => "Ingress",
        Direction::Egress => "Egress",
    };
    if p.kind == Kind::KubernetesNetworkPolicy {
        let mut rules = Vec::new();
        for r in &p.rules {
            if r.deny {
                return Err(LabError::Config(
                    "a Kubernetes NetworkPolicy has no Deny rules".into(),
                ));
            }
            let net = match p.direction {
                Direction::Ingress => &r.src_net,
                Direction::Egress => &r.dst_net,
            };
            let mut rule = serde_json::Map::new();
            if let Some(n) = net {
                let peer = json!([{"ipBlock": {"cidr": n}}]);
                let key = if p.direction == Direction::Ingress {
                    "from"
                } else {
                    "to"
                };
                rule.insert(key.into(), peer);
            }
            if let Some(port) = r.dst_port {
                rule.insert("ports".into(), json!([{"protocol": "TCP", "port": port}]));
            }
            rules.push(Value::Object(rule));
        }
        let mut spec = json!({"podSelector": {}, "policyTypes": [types]});
        spec[types.to_ascii_lowercase()] = json!(rules);
        let obj = json!({"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
            "metadata": meta, "spec": spec});
        return Ok(("networkpolicies.networking.k8s.io", obj));
    }
    let (resource, kind) = match p.kind {
        Kind::GlobalNetworkPolicy => (
            "globalnetworkpolicies.crd.projectcalico.org",
            "GlobalNetworkPolicy",
        ),
        _ => ("networkpolicies.crd.projectcalico.org", "NetworkPolicy"),
    };
    let rules: Vec<Value> = p.rules.iter().map(|r| r.v3()).collect();
    let mut spec = json!({"tier": p.tier, "order": 100, "types": [types]});
    spec[types.to_ascii_lowercase()] = json!(rules);
    let mut v1_meta = meta.clone();
    v1_meta["annotations"] = json!({"projectcalico.org/metadata": meta.to_string()});
    let obj = json!({"kind": kind, "apiVersion": "crd.projectcalico.org/v1",
        "metadata": v1_meta, "spec": spec});
    Ok((resource, obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_proxy_urls_as_the_apiserver_takes_them() {
        let Some(Route::PodProxy {
            namespace,
            pod,
            port,
            path,
        }) = route("/api/v1/namespaces/kube-system/pods/tracer-x:9464/proxy/attach/3/leases/1")
        else {
            panic!("not a pods/proxy route");
        };
        assert_eq!(
            (
                namespace.as_str(),
                pod.as_str(),
                port.as_deref(),
                path.as_str()
            ),
            (
                "kube-system",
                "tracer-x",
                Some("9464"),
                "/attach/3/leases/1"
            )
        );
        let Some(Route::PodProxy { port, path, .. }) =
            route("/api/v1/namespaces/ns/pods/web/proxy")
        else {
            panic!("not a pods/proxy route");
        };
        assert_eq!((port, path.as_str()), (None, "/"));
        assert!(matches!(
            route("/api/v1/namespaces/kube-system/secrets/tracer-token"),
            Some(Route::Object {
                plural: "secrets",
                ..
            })
        ));
        assert!(route("/api/v1/namespaces/ns/bogus/x").is_none());
    }

    #[test]
    fn selectors_and_escapes() {
        assert_eq!(unescape("spec.nodeName%3Dnode-a"), "spec.nodeName=node-a");
        assert_eq!(unescape("app+in+%28a%2Cb%29"), "app in (a,b)");
        assert!(parse_fields("spec.nodeName=a").is_ok());
        assert!(parse_fields("spec.bogus=a").is_err());
        let p = pod(
            "shop",
            "web-1",
            "node-a",
            "10.244.0.5",
            &[("app", "web")],
            None,
        );
        let f = parse_fields("spec.nodeName=node-a,metadata.namespace!=kube-system")
            .unwrap_or_default();
        assert!(field_matches(&f, &p));
        assert!(!field_matches(
            &parse_fields("spec.nodeName=b").unwrap_or_default(),
            &p
        ));
    }
}
