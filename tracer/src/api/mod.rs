//! The agent's HTTP API (hyper). See docs/api.md for the contract.
pub mod metrics;
pub mod pcap;
pub mod query;
pub mod view;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::mpsc};

use crate::agent::{AttachTarget, Shared, WatchState};
use query::FlowQuery;

/// Largest request body accepted (only POST /attach has one).
pub const MAX_BODY: usize = 64 * 1024;
/// How often a watch stream looks for changes, and how often it says it is alive.
const WATCH_TICK: Duration = Duration::from_millis(250);
const WATCH_HEARTBEAT: Duration = Duration::from_secs(10);

pub type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ApiError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
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
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, shared.clone()));
            if let Err(e) = http1::Builder::new()
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let authorized = shared.authorized(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body over {MAX_BODY} bytes"),
            ))
        }
    };
    // Probes (kubelet) cannot send a token: liveness and readiness stay open; they reveal only
    // counters and interface names.
    let open = matches!(path.trim_end_matches('/'), "/healthz" | "/readyz");
    if !authorized && !open {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
        ));
    }
    Ok(route(&method, &path, query.as_deref(), &body, &shared).await)
}

async fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
    shared: &Arc<Shared>,
) -> Response<Body> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = method == Method::GET;
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["healthz"]) => respond(StatusCode::OK, shared.health()),
        (Method::GET, ["readyz"]) => {
            let (ready, v) = shared.readiness();
            respond(
                if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                v,
            )
        }
        (Method::GET, ["metrics"]) => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics(),
        ),
        (Method::GET, ["diagnoses"]) => match query {
            Some(q) if !q.is_empty() => {
                error(StatusCode::BAD_REQUEST, "/diagnoses takes no parameters")
            }
            _ => respond(StatusCode::OK, shared.diagnoses()),
        },
        (Method::GET, ["flows"]) => match FlowQuery::parse(query) {
            Ok(q) => json_bytes(StatusCode::OK, shared.flows(&q).json),
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        (Method::GET, ["flows", id]) => match id.parse::<u64>() {
            Ok(id) => match shared.flow(id) {
                Some(v) => respond(StatusCode::OK, v),
                None => error(StatusCode::NOT_FOUND, &format!("no flow {id}")),
            },
            Err(_) => error(
                StatusCode::BAD_REQUEST,
                &format!("flow id {id:?} is not a number"),
            ),
        },
        (Method::GET, ["flows", id, "pcap"]) => match id.parse::<u64>() {
            Ok(id) => match shared.pcap(id) {
                Ok(Some(bytes)) => {
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
                Ok(None) => error(
                    StatusCode::NOT_FOUND,
                    &format!("no flow {id}, or none of its records are kept any more"),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
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
            Ok(q) => watch(q, shared.clone()),
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        (Method::POST, ["attach"]) => match parse_attach(body) {
            Ok(target) => match shared.attach(target).await {
                Ok(a) => respond(
                    StatusCode::CREATED,
                    json!({"id": a.ifindex, "iface": a.name, "ifindex": a.ifindex, "role": a.role, "how": a.how}),
                ),
                Err(e) => error(e.status(), &e.to_string()),
            },
            Err(msg) => error(StatusCode::BAD_REQUEST, &msg),
        },
        (Method::DELETE, ["attach", id]) => match id.parse::<u32>() {
            Ok(id) => match shared.detach(id).await {
                Ok(()) => {
                    let mut r = Response::new(full(Vec::new()));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    r
                }
                Err(e) => error(e.status(), &e.to_string()),
            },
            Err(_) => error(
                StatusCode::BAD_REQUEST,
                &format!("attachment id {id:?} is not a number"),
            ),
        },
        (_, ["healthz" | "readyz" | "metrics" | "diagnoses" | "flows" | "watch"])
        | (_, ["flows", _] | ["flows", _, "pcap"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} not allowed on {path}"),
        ),
        (_, ["attach"] | ["attach", _]) if get => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} not allowed on {path}"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("no such endpoint {method} {path}"),
        ),
    }
}

fn parse_attach(body: &[u8]) -> Result<AttachTarget, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body must be JSON: {e}"))?;
    let obj = v.as_object().ok_or("body must be a JSON object")?;
    match (obj.get("iface"), obj.get("pod")) {
        (Some(Value::String(i)), None) => crate::calico::check_iface_name(i)
            .map(|_| AttachTarget::Iface(i.clone()))
            .map_err(|e| e.to_string()),
        (None, Some(Value::String(p))) => {
            let (ns, name) = p
                .split_once('/')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('/'))
                .ok_or_else(|| format!("pod {p:?} must be namespace/name"))?;
            Ok(AttachTarget::Pod {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => Err(
            "give exactly one of {\"iface\": \"<name>\"} or {\"pod\": \"<namespace>/<name>\"}"
                .into(),
        ),
    }
}

fn watch(q: FlowQuery, shared: Arc<Shared>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let mut state = WatchState::starting_now(&shared);
        let mut tick = tokio::time::interval(WATCH_TICK);
        let mut last_beat = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            for line in shared.watch_poll(&q, &mut state) {
                let mut b = serde_json::to_vec(&line).unwrap_or_default();
                b.push(b'\n');
                if tx.send(Bytes::from(b)).await.is_err() {
                    return;
                }
            }
            if last_beat.elapsed() >= WATCH_HEARTBEAT {
                last_beat = tokio::time::Instant::now();
                let beat = json!({"heartbeat": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()});
                let mut b = serde_json::to_vec(&beat).unwrap_or_default();
                b.push(b'\n');
                if tx.send(Bytes::from(b)).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

fn full(bytes: Vec<u8>) -> Body {
    BodyExt::boxed(Full::new(Bytes::from(bytes)))
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    json_bytes(
        status,
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec()),
    )
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
    respond(status, json!({"error": msg, "status": status.as_u16()}))
}
