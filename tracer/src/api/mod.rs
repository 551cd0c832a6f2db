//! The agent's HTTP API (hyper): routing, authentication, limits, and the rendering of the
//! state's answers (JSON of the model's wire types, Prometheus text, pcapng). See docs/api.md
//! for the contract.
#[cfg(test)]
mod golden;
pub mod metrics;
pub mod pcap;

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

use serde::Serialize;
use tracer_model::{
    attach::AttachRequest,
    defaults,
    query::{FlowQuery, DEFAULT_LIMIT},
    ApiErrorBody, Attached, WatchLine,
};

use crate::state::{AttachError, AttachTarget, FlowCursor, Shared, WatchEvent, WatchState};

/// Largest request body accepted (only POST /attach has one).
pub const MAX_BODY: usize = 64 * 1024;
/// How often a watch stream looks for changes, and how often it says it is alive.
const WATCH_TICK: Duration = Duration::from_millis(250);
const WATCH_HEARTBEAT: Duration = Duration::from_secs(10);
/// Lines a watcher may have queued for its client; then its poll waits (bounded memory).
const WATCH_QUEUE: usize = 64;
/// A client must send its request headers within this time, and an idle keep-alive connection
/// is closed after it (hyper restarts the header timer whenever a connection goes idle).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body (POST /attach) must arrive within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose peer reads nothing of its answer for this long is closed, so that a
/// client that stops reading cannot pin an answer's (or a watcher's) memory.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// Connection slots kept for peers on the node itself (the kubelet's probes, `kubectl exec`
/// clients): pods on the node network cannot take them.
const NODE_RESERVE: usize = 32;
/// Judging and rendering jobs run at once, off the runtime's worker threads.
const HEAVY_JOBS: usize = 2;
/// `/flows` answers with up to this many flows (and no verdict or cause) are built in one go;
/// larger ones are streamed a part at a time.
const ONE_GO_LIMIT: usize = DEFAULT_LIMIT;

pub type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// `--max-watchers`.
pub const DEFAULT_MAX_WATCHERS: u32 = 32;

/// Limits on what clients may hold.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Connections open at once (besides [`NODE_RESERVE`] for peers on the node).
    pub max_connections: usize,
    /// `/watch` streams open at once; more are refused with 429.
    pub max_watchers: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            max_watchers: DEFAULT_MAX_WATCHERS as usize,
        }
    }
}

/// Counts one of `gauge` while alive.
struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    fn new(gauge: &'a AtomicU64) -> Held<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Held(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct ApiState {
    shared: Arc<Shared>,
    /// The bearer token clients must send; none: anyone may ask.
    token: Option<String>,
    watchers: Arc<Semaphore>,
    heavy: Arc<Semaphore>,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ApiError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })
}

/// Serves until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: ApiLimits,
    token: Option<String>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let reserve = Arc::new(Semaphore::new(NODE_RESERVE));
    let state = Arc::new(ApiState {
        shared,
        token,
        watchers: Arc::new(Semaphore::new(limits.max_watchers)),
        heavy: Arc::new(Semaphore::new(HEAVY_JOBS)),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A peer on the node connects from one of the node's own addresses (or loopback): the
        // address it connected to. Pods cannot, so they cannot take the reserve.
        let from_node =
            peer.ip().is_loopback() || stream.local_addr().is_ok_and(|l| l.ip() == peer.ip());
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(p) if from_node => p,
                _ => {
                    refuse(stream, &state.shared);
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = Held::new(&state.shared.api.connections);
            let svc = {
                let state = state.clone();
                service_fn(move |req| handle(req, state.clone()))
            };
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(StallGuard::new(stream)), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Beyond the connection cap: a short 503 if the socket takes it at once, then close.
fn refuse(stream: TcpStream, shared: &Shared) {
    shared
        .api
        .connections_rejected
        .fetch_add(1, Ordering::Relaxed);
    const BODY: &str = r#"{"error":"too many connections","status":503}"#;
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(resp.as_bytes());
}

/// Fails writes that make no progress for [`WRITE_STALL`].
struct StallGuard<T> {
    inner: T,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuard<T> {
    fn new(inner: T) -> StallGuard<T> {
        StallGuard {
            inner,
            stalled: None,
        }
    }

    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<R>(&mut self, p: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match p {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(p, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(p, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(p, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn handle(req: Request<Incoming>, st: Arc<ApiState>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let header_text = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    // The API server's pods/proxy strips `Authorization` (it authenticated the caller with it),
    // so clients reaching the agent through it send the token in a header of its own.
    let authorized = authorized(st.token.as_deref(), header_text(header::AUTHORIZATION))
        || st.token.is_some()
            && authorized(
                st.token.as_deref(),
                header_text(header::HeaderName::from_static(defaults::TOKEN_HEADER))
                    .map(|t| format!("Bearer {t}"))
                    .as_deref(),
            );
    // Probes (kubelet) cannot send a token: liveness and readiness stay open, and then say
    // only how the agent is, nothing of the node.
    let open = matches!(path.trim_end_matches('/'), "/healthz" | "/readyz");
    // Before any body is read: an unauthorized client costs no more than its headers.
    if !authorized && !open {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <token>, or X-Tracer-Token: <token>)",
        ));
    }
    let body = if method == Method::POST {
        let read = Limited::new(req.into_body(), MAX_BODY).collect();
        match tokio::time::timeout(BODY_TIMEOUT, read).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => {
                return Ok(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body over {MAX_BODY} bytes"),
                ))
            }
            Err(_) => {
                return Ok(error(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!("request body not received within {BODY_TIMEOUT:?}"),
                ))
            }
        }
    } else {
        Bytes::new()
    };
    Ok(route(&method, &path, query.as_deref(), &body, authorized, &st).await)
}

/// True when no token is configured or `header` carries it.
fn authorized(token: Option<&str>, header: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    // Constant time in the token's length, so a timing probe learns nothing of its prefix.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Runs judging or rendering work on the blocking pool, [`HEAVY_JOBS`] at a time: the runtime's
/// worker threads stay free for probes and I/O, and the table is shared fairly with the reader.
async fn heavy<T: Send + 'static>(
    st: &ApiState,
    f: impl FnOnce(&Shared) -> T + Send + 'static,
) -> Option<T> {
    let permit: OwnedSemaphorePermit = st.heavy.clone().acquire_owned().await.ok()?;
    let shared = st.shared.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f(&shared)
    })
    .await
    .ok()
}

/// `namespace=` and `selector=` filter by names, which only identity provides. Looked for
/// before the query is parsed: with identity off, no value of them could be answered, valid or
/// not, and that is what the client needs to hear first.
fn asks_names(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "namespace" || k == "selector")
    })
}

/// Said, not answered with an empty list: without names no flow could ever match. 409: the
/// request is well formed, this agent's state (identity off) is what refuses it.
fn names_off() -> Response<Body> {
    error(
        StatusCode::CONFLICT,
        "namespace= and selector= need identity, which is off on this agent (no DATASTORE_TYPE, or --no-identity)",
    )
}

fn internal() -> Response<Body> {
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

async fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
    authorized: bool,
    st: &Arc<ApiState>,
) -> Response<Body> {
    let shared = &st.shared;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ok_or_503 = |ok: bool| {
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["healthz"]) => {
            let (healthy, v) = shared.health(authorized);
            respond_sorted(ok_or_503(healthy), &v)
        }
        (Method::GET, ["readyz"]) => {
            let v = shared.readiness(authorized);
            respond_sorted(ok_or_503(v.ready), &v)
        }
        (Method::GET, ["metrics"]) => match heavy(st, |s| metrics::exposition(&s.census())).await {
            Some(m) => text(StatusCode::OK, "text/plain; version=0.0.4", m),
            None => internal(),
        },
        (Method::GET, ["diagnoses"]) => match query {
            Some(q) if !q.is_empty() => {
                error(StatusCode::BAD_REQUEST, "/diagnoses takes no parameters")
            }
            _ => match heavy(st, Shared::diagnoses).await {
                Some(v) => respond_sorted(StatusCode::OK, &v),
                None => internal(),
            },
        },
        (Method::GET, ["flows" | "watch"]) if asks_names(query) && !shared.identities().is_on() => {
            names_off()
        }
        (Method::GET, ["flows"]) => match FlowQuery::parse(query) {
            Ok(q) => flows(q, st).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        (Method::GET, ["flows", id]) => match id.parse::<u64>() {
            Ok(id) => match heavy(st, move |s| s.flow(id)).await {
                Some(Some(v)) => respond_sorted(StatusCode::OK, &v),
                Some(None) => error(StatusCode::NOT_FOUND, &format!("no flow {id}")),
                None => internal(),
            },
            Err(_) => error(
                StatusCode::BAD_REQUEST,
                &format!("flow id {id:?} is not a number"),
            ),
        },
        (Method::GET, ["flows", id, "pcap"]) => match id.parse::<u64>() {
            Ok(id) => match heavy(st, move |s| {
                s.samples(id).map(|(samples, names)| {
                    pcap::flow_pcapng(
                        &samples,
                        |i| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}")),
                        &s.clock,
                    )
                })
            })
            .await
            .map(Option::transpose)
            {
                Some(Ok(Some(bytes))) => {
                    let mut r = Response::new(full(bytes));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/x-pcapng"),
                    );
                    if let Ok(v) = header::HeaderValue::from_str(&format!(
                        "attachment; filename=\"flow-{id}.pcapng\""
                    )) {
                        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
                    }
                    r
                }
                Some(Ok(None)) => error(
                    StatusCode::NOT_FOUND,
                    &format!("no flow {id}, or none of its records are kept any more"),
                ),
                Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                None => internal(),
            },
            Err(_) => error(
                StatusCode::BAD_REQUEST,
                &format!("flow id {id:?} is not a number"),
            ),
        },
        (Method::GET, ["watch"]) => match FlowQuery::parse(query) {
            Ok(q) if q.limit.is_some() => {
                error(StatusCode::BAD_REQUEST, "limit: not supported by /watch")
            }
            Ok(q) => match st.watchers.clone().try_acquire_owned() {
                Ok(permit) => watch(q, st.clone(), permit),
                Err(_) => {
                    shared.api.watchers_rejected.fetch_add(1, Ordering::Relaxed);
                    error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many /watch streams open on this agent (--max-watchers); retry later",
                    )
                }
            },
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        (Method::POST, ["attach"]) => match parse_attach(body) {
            Ok((target, ttl)) => match shared.attach(target, ttl).await {
                Ok((a, lease)) => respond_sorted(
                    StatusCode::CREATED,
                    &Attached {
                        lease,
                        ..Attached::from(&a)
                    },
                ),
                Err(e) => error(attach_status(&e), &e.to_string()),
            },
            Err(msg) => error(StatusCode::BAD_REQUEST, &msg),
        },
        (Method::DELETE, ["attach", id]) => match id.parse::<u32>() {
            Ok(id) => no_content(shared.detach(id, None).await),
            Err(_) => error(
                StatusCode::BAD_REQUEST,
                &format!("attachment id {id:?} is not a number"),
            ),
        },
        (Method::PUT | Method::DELETE, ["attach", id, "leases", lease]) => {
            match (id.parse::<u32>(), lease.parse::<u64>()) {
                (Ok(id), Ok(lease)) if *method == Method::PUT => {
                    match shared.renew(id, lease).await {
                        Ok((a, lease)) => respond_sorted(
                            StatusCode::OK,
                            &Attached {
                                lease: Some(lease),
                                ..Attached::from(&a)
                            },
                        ),
                        Err(e) => error(attach_status(&e), &e.to_string()),
                    }
                }
                (Ok(id), Ok(lease)) => no_content(shared.detach(id, Some(lease)).await),
                _ => error(
                    StatusCode::BAD_REQUEST,
                    &format!("attachment id {id:?} or lease {lease:?} is not a number"),
                ),
            }
        }
        (_, segments) => match allowed_methods(segments) {
            Some(allow) => {
                let mut r = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{method} not allowed on {path}"),
                );
                r.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static(allow));
                r
            }
            None => error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint {method} {path}"),
            ),
        },
    }
}

/// What each endpoint answers to, for a 405's `Allow` header (RFC 9110); None for no endpoint.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["healthz" | "readyz" | "metrics" | "diagnoses" | "flows" | "watch"]
        | ["flows", _]
        | ["flows", _, "pcap"] => Some("GET"),
        ["attach"] => Some("POST"),
        ["attach", _] => Some("DELETE"),
        ["attach", _, "leases", _] => Some("PUT, DELETE"),
        _ => None,
    }
}

/// The status code of a failed attach or detach.
fn attach_status(e: &AttachError) -> StatusCode {
    match e {
        AttachError::NoIface(_)
        | AttachError::NoPod { .. }
        | AttachError::NoAttachment(_)
        | AttachError::NoLease { .. } => StatusCode::NOT_FOUND,
        AttachError::NotOnDemand(_) => StatusCode::CONFLICT,
        AttachError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        AttachError::NotRunning => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// `204` for a detach that went through.
fn no_content(r: Result<(), AttachError>) -> Response<Body> {
    match r {
        Ok(()) => {
            let mut r = Response::new(full(Vec::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Err(e) => error(attach_status(&e), &e.to_string()),
    }
}

/// The target and the lease's time to live of a `POST /attach` body.
fn parse_attach(body: &[u8]) -> Result<(AttachTarget, Duration), String> {
    let mut v: Value =
        serde_json::from_slice(body).map_err(|e| format!("body must be JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else {
        return Err("body must be a JSON object".into());
    };
    let ttl = match obj.remove("ttl_seconds") {
        None => defaults::LEASE_TTL_SECONDS,
        // JSON numbers: 30 and 30.0 are the same integer.
        Some(t) => t
            .as_u64()
            .or_else(|| {
                t.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
                    .map(|f| f as u64)
            })
            .filter(|t| (1..=defaults::MAX_LEASE_TTL_SECONDS).contains(t))
            .ok_or_else(|| {
                format!(
                    "ttl_seconds must be a whole number of seconds from 1 to {}",
                    defaults::MAX_LEASE_TTL_SECONDS
                )
            })?,
    };
    let exactly_one =
        "give exactly one of {\"iface\": \"<name>\"} or {\"pod\": \"<namespace>/<name>\"}";
    if v.get("iface").is_some() && v.get("pod").is_some() {
        return Err(exactly_one.into());
    }
    let target =
        match serde_json::from_value::<AttachRequest>(v).map_err(|_| exactly_one.to_string())? {
            AttachRequest::Iface { iface } => crate::calico::check_iface_name(&iface)
                .map(|_| AttachTarget::Iface(iface.clone()))
                .map_err(|e| e.to_string()),
            // The same names `pod=` takes on /flows.
            AttachRequest::Pod { pod } => tracer_model::query::pod(&pod)
                .map(|(namespace, name)| AttachTarget::Pod { namespace, name })
                .map_err(|e| e.to_string()),
        }?;
    Ok((target, Duration::from_secs(ttl)))
}

/// `/flows`: small answers in one go; large or judging ones a part at a time, each part sent
/// before the next is built.
async fn flows(q: FlowQuery, st: &Arc<ApiState>) -> Response<Body> {
    let small = q.limit.unwrap_or(DEFAULT_LIMIT) <= ONE_GO_LIMIT
        && q.verdict.is_none()
        && q.cause.is_none();
    if small {
        return match heavy(st, move |s| s.flows_json(&q)).await {
            Some(json) => json_bytes(StatusCode::OK, json),
            None => internal(),
        };
    }
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let st = st.clone();
    tokio::spawn(async move {
        // The body is framed here, `{"flows":[`, the flows of each part, then the counts, so
        // that each part goes out before the next is built.
        // `written`: whether a flow is in the body yet, which decides the next one's comma.
        let mut cur = Some((FlowCursor::new(q), false));
        while let Some((mut c, mut written)) = cur.take() {
            if c.done() {
                return;
            }
            let Some((part, c)) = heavy(&st, move |s| {
                let part = flows_part(s, &mut c, &mut written);
                (part, (c, written))
            })
            .await
            else {
                return;
            };
            // The client went away: stop walking.
            if tx.send(Bytes::from(part)).await.is_err() {
                return;
            }
            cur = Some(c);
        }
    });
    let mut r = stream_body(rx);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The next part of a streamed `/flows` body: `{"flows":[` before the first flows, the
/// flows of this part, and the counts after the last. `written` says whether an earlier flow
/// of the body was written (the next one then opens with a comma).
fn flows_part(s: &Shared, c: &mut FlowCursor, written: &mut bool) -> Vec<u8> {
    let first = !c.started();
    let flows = s.flows_chunk(c);
    let mut out = Vec::new();
    if first {
        out.extend_from_slice(b"{\"flows\":[");
    }
    for f in &flows {
        // A flow that cannot be written is left out, with its comma, rather than breaking
        // the body.
        let mark = out.len();
        if *written {
            out.push(b',');
        }
        match f.write_json(&mut out) {
            Ok(()) => *written = true,
            Err(_) => out.truncate(mark),
        }
    }
    if c.done() {
        out.extend_from_slice(
            format!(
                "],\"matched\":{},\"truncated\":{}}}",
                c.matched(),
                c.matched() > c.shown()
            )
            .as_bytes(),
        );
    }
    out
}

fn stream_body(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::new(BodyExt::boxed(StreamBody::new(stream)))
}

fn watch(q: FlowQuery, st: Arc<ApiState>, permit: OwnedSemaphorePermit) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(WATCH_QUEUE);
    tokio::spawn(async move {
        let _permit = permit;
        let _open = Held::new(&st.shared.api.watchers);
        let mut state = Some(WatchState::starting_now(&st.shared));
        let mut q = Some(q);
        let mut tick = tokio::time::interval(WATCH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // Free the slot as soon as the client hangs up, not at the next line.
                _ = tx.closed() => return,
            }
            loop {
                let (Some(mut s), Some(query)) = (state.take(), q.take()) else {
                    return;
                };
                let Some((lines, s, query)) = heavy(&st, move |sh| {
                    let lines = sh.watch_poll(&query, &mut s);
                    (lines, s, query)
                })
                .await
                else {
                    return;
                };
                let more = s.has_backlog();
                state = Some(s);
                q = Some(query);
                for l in lines {
                    let line = match l {
                        WatchEvent::Flow(f) => ndjson_sorted(&f),
                        WatchEvent::Skipped(n) => ndjson_sorted(&WatchLine::Skipped { skipped: n }),
                    };
                    // Waits while the client is slow: the queue, not the agent, absorbs it.
                    if tx.send(Bytes::from(line)).await.is_err() {
                        return;
                    }
                }
                if !more {
                    break;
                }
            }
            if last_beat.elapsed() >= WATCH_HEARTBEAT {
                last_beat = tokio::time::Instant::now();
                let beat = WatchLine::Heartbeat {
                    heartbeat: humantime::format_rfc3339_millis(std::time::SystemTime::now())
                        .to_string(),
                };
                if tx.send(Bytes::from(ndjson_sorted(&beat))).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut r = stream_body(rx);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

fn full(bytes: Vec<u8>) -> Body {
    BodyExt::boxed(Full::new(Bytes::from(bytes)))
}

/// The body of `GET /flows`: the flows in the model's field order (they are rendered in bulk,
/// without the detour through `serde_json::Value`, by the model's hand-written writer).
pub fn flows_page_json(page: &tracer_model::FlowsPage) -> Vec<u8> {
    // A flow with four hops is about 1.5 KB: sized once, not grown by doubling and copying
    // through a thousand flows.
    let mut out = Vec::with_capacity(64 + page.flows.len() * 1536);
    match page.write_json(&mut out) {
        Ok(()) => out,
        Err(_) => b"{}".to_vec(),
    }
}

/// JSON with every object's keys in sorted order (through `serde_json::Value`), as the API has
/// always sent every answer but `/flows` (whose flows keep the model's field order).
pub fn sorted_json<T: Serialize>(body: &T) -> Vec<u8> {
    serde_json::to_value(body)
        .and_then(|v| serde_json::to_vec(&v))
        .unwrap_or_else(|_| b"{}".to_vec())
}

fn respond_sorted<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    json_bytes(status, sorted_json(body))
}

/// One NDJSON line (`/watch`).
fn ndjson_sorted<T: Serialize>(body: &T) -> Vec<u8> {
    let mut b = sorted_json(body);
    b.push(b'\n');
    b
}

fn json_bytes(status: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body.into_bytes()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

pub fn error(status: StatusCode, msg: &str) -> Response<Body> {
    respond_sorted(
        status,
        &ApiErrorBody {
            error: msg.to_string(),
            status: status.as_u16(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_bodies_carry_a_lease_time_to_live() {
        let ttl = |body: &str| parse_attach(body.as_bytes()).map(|(_, t)| t.as_secs());
        assert_eq!(ttl(r#"{"pod": "ns/web"}"#), Ok(defaults::LEASE_TTL_SECONDS));
        assert_eq!(ttl(r#"{"pod": "ns/web", "ttl_seconds": 5}"#), Ok(5));
        assert_eq!(ttl(r#"{"iface": "eth0", "ttl_seconds": 5.0}"#), Ok(5));
        for bad in [
            r#"{"pod": "ns/web", "ttl_seconds": 0}"#,
            r#"{"pod": "ns/web", "ttl_seconds": 3601}"#,
            r#"{"pod": "ns/web", "ttl_seconds": "5"}"#,
            r#"{"pod": "ns/web", "ttl_seconds": 1.5}"#,
            r#"{"ttl_seconds": 5}"#,
        ] {
            assert!(ttl(bad).is_err(), "{bad}");
        }
    }

    /// `v` without the waits measured up to now (they differ between two answers).
    fn timeless(mut v: Value) -> Value {
        fn strip(v: &mut Value) {
            match v {
                Value::Object(o) => {
                    o.remove("waited_ms");
                    o.values_mut().for_each(strip);
                }
                Value::Array(a) => a.iter_mut().for_each(strip),
                _ => {}
            }
        }
        strip(&mut v);
        v
    }

    #[test]
    fn flows_json_equals_the_page_written() -> Result<(), tracer_model::query::QueryError> {
        let shared = crate::state::tests::unanswered(2 * 1024 + 5);
        for query in [
            "",
            "limit=700",
            "dst=10.96.0.7&limit=3000",
            "dst=10.96.0.0/16",
            "dst=10.1.1.1",
            "dst=10.96.0.7&port=80",
            "src=10.0.0.1",
            "verdict=no_reply",
        ] {
            let q = FlowQuery::parse(Some(query))?;
            let page = flows_page_json(&shared.flows(&q));
            let fused = shared.flows_json(&q);
            // Byte for byte, but for how long an unanswered flow has waited (the clock moved).
            let waitless = |b: &[u8]| {
                let s = String::from_utf8_lossy(b);
                let mut parts = s.split("\"waited_ms\":");
                let mut out = parts.next().unwrap_or_default().to_string();
                for p in parts {
                    out.push_str(p.trim_start_matches(|c: char| c.is_ascii_digit()));
                }
                out
            };
            assert!(page.len() > 2, "{query}");
            assert_eq!(waitless(&fused), waitless(&page), "{query}");
        }
        Ok(())
    }

    #[test]
    fn streamed_flows_equal_the_one_go_body() -> Result<(), tracer_model::query::QueryError> {
        let shared = crate::state::tests::unanswered(2 * 4096 + 5);
        for query in [
            "limit=100000",
            "limit=700",
            "dst=10.96.0.7&limit=3000",
            "dst=10.1.1.1",
        ] {
            let q = FlowQuery::parse(Some(query))?;
            let one: Value =
                serde_json::from_slice(&flows_page_json(&shared.flows(&q))).unwrap_or_default();
            let mut cur = FlowCursor::new(q);
            let mut body = Vec::new();
            let mut written = false;
            while !cur.done() {
                body.extend(flows_part(&shared, &mut cur, &mut written));
            }
            let streamed: Value = serde_json::from_slice(&body).unwrap_or_default();
            assert!(one.get("matched").is_some(), "{query}");
            assert_eq!(timeless(one), timeless(streamed), "{query}");
        }
        Ok(())
    }
}
