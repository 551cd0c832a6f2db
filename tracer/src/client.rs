//! A small HTTP client for the agent's API, answering in the model's wire types (used by
//! `tracer flows|watch|diagnoses`, the tests and the bench). It reaches the agent directly, or
//! through the API server's pods/proxy subresource ([`Transport::PodProxy`]).
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpStream;
use tracer_model::{
    attach::AttachBody, defaults, Attached, DiagnosesAnswer, FlowQuery, FlowView, FlowsPage,
    Health, WatchLine,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A response body from either transport.
type Body = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad agent URL {0:?}: {1}")]
    Url(String, String),
    #[error("connecting to the agent at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("the agent at {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("the agent at {0} did not accept a connection within {1:?} (agent or node down?)")]
    ConnectTimeout(String, Duration),
    #[error("not asked: {0}")]
    NotAsked(String),
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    #[error("talking to the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("reading the answer: {0}")]
    Body(BoxError),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("agent sent invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// How requests reach the agent.
#[derive(Clone)]
pub enum Transport {
    /// Straight to `base` (`http://` only).
    Direct,
    /// Through the API server's pods/proxy subresource of the agent's pod:
    /// `prefix` is `/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy`. The API server
    /// authenticates the caller with the kubeconfig's credentials and drops `Authorization`,
    /// so the agent's token travels in [`defaults::TOKEN_HEADER`].
    PodProxy {
        client: kube::Client,
        prefix: String,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Direct => f.write_str("Direct"),
            Transport::PodProxy { prefix, .. } => write!(f, "PodProxy({prefix})"),
        }
    }
}

/// Where the agent is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The agent's URL, or for [`Transport::PodProxy`] the name errors give it.
    pub base: String,
    pub token: Option<String>,
    /// For the whole request and for reading the answer.
    pub timeout: Duration,
    /// For the TCP connection alone ([`Transport::Direct`]; through the API server, the API
    /// server connects and `timeout` bounds it).
    pub connect_timeout: Duration,
    pub transport: Transport,
}

impl Agent {
    pub fn new(base: &str, token: Option<String>) -> Agent {
        Agent {
            base: base.trim_end_matches('/').to_string(),
            token,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            transport: Transport::Direct,
        }
    }

    /// The agent in pod `namespace/pod`, reached through the API server `client` talks to.
    pub fn through_api_server(
        client: kube::Client,
        namespace: &str,
        pod: &str,
        port: u16,
        token: Option<String>,
    ) -> Agent {
        Agent {
            base: format!("pod {namespace}/{pod} (through the API server)"),
            token,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            transport: Transport::PodProxy {
                client,
                prefix: format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy"),
            },
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Response<Body>, ClientError> {
        let payload = match &body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        let Transport::PodProxy { client, prefix } = &self.transport else {
            return self
                .send_direct(method, path, body.is_some(), payload)
                .await;
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{prefix}{path}"));
        if let Some(t) = &self.token {
            req = req.header(defaults::TOKEN_HEADER, t.as_str());
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(kube::client::Body::from(payload.to_vec()))?;
        let resp = tokio::time::timeout(self.timeout, client.send(req))
            .await
            .map_err(|_| ClientError::Timeout(self.base.clone(), self.timeout))??;
        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
    }

    async fn send_direct(
        &self,
        method: Method,
        path: &str,
        json: bool,
        payload: Bytes,
    ) -> Result<Response<Body>, ClientError> {
        let url = format!("{}{}", self.base, path);
        let uri: Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| {
            ClientError::Url(url.clone(), e.to_string())
        })?;
        if uri.scheme_str() != Some("http") {
            return Err(ClientError::Url(url, "only http:// is supported".into()));
        }
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Url(url.clone(), "no host".into()))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let port = uri.port_u16().unwrap_or(80);
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let connect_timeout = self.connect_timeout.min(self.timeout);
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&authority))
            .await
            .map_err(|_| ClientError::ConnectTimeout(authority.clone(), connect_timeout))?
            .map_err(|e| ClientError::Connect(authority.clone(), e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(hyper::header::HOST, authority.clone());
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if json {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let resp = tokio::time::timeout(
            self.timeout,
            sender.send_request(req.body(Full::new(payload))?),
        )
        .await
        .map_err(|_| ClientError::Timeout(authority, self.timeout))??;
        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
    }

    /// Sends a request and parses the JSON answer (`Value::Null` for an empty body).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| ClientError::Timeout(self.base.clone(), self.timeout))?
            .map_err(ClientError::Body)?
            .to_bytes();
        if !status.is_success() {
            return Err(ClientError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.json(Method::GET, path, None).await
    }

    /// GETs `path` and reads the answer as `T`.
    pub async fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Ok(serde_json::from_value(self.get(path).await?)?)
    }

    /// `GET /flows?<q>`.
    pub async fn flows(&self, q: &FlowQuery) -> Result<FlowsPage, ClientError> {
        self.get_as(&flows_path("/flows", q)).await
    }

    /// `GET /flows/{id}`.
    pub async fn flow(&self, id: u64) -> Result<FlowView, ClientError> {
        self.get_as(&format!("/flows/{id}")).await
    }

    /// `GET /diagnoses`.
    pub async fn diagnoses(&self) -> Result<DiagnosesAnswer, ClientError> {
        self.get_as("/diagnoses").await
    }

    /// `GET /healthz` (the detail sections need the token).
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get_as("/healthz").await
    }

    /// `POST /attach` with `body`.
    pub async fn attach(&self, body: &AttachBody) -> Result<Attached, ClientError> {
        let v = serde_json::to_value(body)?;
        Ok(serde_json::from_value(
            self.json(Method::POST, "/attach", Some(v)).await?,
        )?)
    }

    /// `PUT /attach/{id}/leases/{lease}`: the hold lasts its time to live from now.
    pub async fn renew(&self, id: u32, lease: u64) -> Result<Attached, ClientError> {
        let path = format!("/attach/{id}/leases/{lease}");
        Ok(serde_json::from_value(
            self.json(Method::PUT, &path, None).await?,
        )?)
    }

    /// Lets go of `lease` (`DELETE /attach/{id}/leases/{lease}`), or of one hold of the
    /// attachment (`DELETE /attach/{id}`) when the agent gave no lease.
    pub async fn detach(&self, id: u32, lease: Option<u64>) -> Result<(), ClientError> {
        let path = match lease {
            Some(l) => format!("/attach/{id}/leases/{l}"),
            None => format!("/attach/{id}"),
        };
        self.json(Method::DELETE, &path, None).await.map(|_| ())
    }

    /// Follows `GET /watch?<q>`, calling `line` for each line until the stream ends or `line`
    /// returns false. Lines that are not one of the [`WatchLine`] shapes are skipped.
    pub async fn watch(
        &self,
        q: &FlowQuery,
        mut line: impl FnMut(WatchLine) -> bool,
    ) -> Result<(), ClientError> {
        self.stream(&flows_path("/watch", q), |v| {
            match serde_json::from_value::<WatchLine>(v) {
                Ok(l) => line(l),
                Err(_) => true,
            }
        })
        .await
    }

    /// Follows an NDJSON stream, calling `line` for each object until the stream ends or
    /// `line` returns false.
    pub async fn stream(
        &self,
        path: &str,
        mut line: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map_err(ClientError::Body)?.to_bytes();
            return Err(ClientError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(ClientError::Body)?.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let rest = buf.split_off(pos + 1);
                let text = std::mem::replace(&mut buf, rest);
                if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                    if !line(v) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

/// `path`, with `q`'s query string when it has one.
pub fn flows_path(path: &str, q: &FlowQuery) -> String {
    let qs = q.to_query_string();
    if qs.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{qs}")
    }
}
