//! The agent's HTTP API (hyper): `/flows`, `/flows/{id}`, `/diagnoses`, `/healthz`.
pub mod query;
pub mod view;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::agent::Shared;
use query::FlowQuery;

/// Request bodies are not used by any GET endpoint; anything larger is refused.
const MAX_BODY: usize = 64 * 1024;

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
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    // Drain (bounded) so keep-alive connections stay usable; the content is ignored.
    let _ = Limited::new(req.into_body(), MAX_BODY).collect().await;
    Ok(route(&method, &path, query.as_deref(), &shared))
}

pub fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} not allowed on {path}"),
        );
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] => respond(StatusCode::OK, shared.health()),
        ["diagnoses"] => match query {
            Some(q) if !q.is_empty() => {
                error(StatusCode::BAD_REQUEST, "/diagnoses takes no parameters")
            }
            _ => respond(StatusCode::OK, shared.diagnoses()),
        },
        ["flows"] => match FlowQuery::parse(query) {
            Ok(q) => respond(StatusCode::OK, shared.flows(&q)),
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        ["flows", id] => match id.parse::<u64>() {
            Ok(id) => match shared.flow(id) {
                Some(v) => respond(StatusCode::OK, v),
                None => error(StatusCode::NOT_FOUND, &format!("no flow {id}")),
            },
            Err(_) => error(
                StatusCode::BAD_REQUEST,
                &format!("flow id {id:?} is not a number"),
            ),
        },
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint {path}")),
    }
}

fn respond(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    respond(status, json!({"error": msg, "status": status.as_u16()}))
}
