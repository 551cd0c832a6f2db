//! A small HTTP client for the agent's API (used by `tracer flows` and the lab).
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad agent URL {0:?}: {1}")]
    Url(String, String),
    #[error("connecting to the agent at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("agent sent invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// GETs `base` + `path_and_query` and parses the JSON answer.
pub async fn get_json(base: &str, path_and_query: &str) -> Result<Value, ClientError> {
    let url = format!("{}{}", base.trim_end_matches('/'), path_and_query);
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| ClientError::Url(url.clone(), e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(ClientError::Url(url, "only http:// is supported".into()));
    }
    let host = uri
        .host()
        .ok_or_else(|| ClientError::Url(url.clone(), "no host".into()))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let authority = format!("{host}:{port}");
    let stream = TcpStream::connect(&authority)
        .await
        .map_err(|e| ClientError::Connect(authority.clone(), e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(ClientError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(serde_json::from_slice(&body)?)
}
