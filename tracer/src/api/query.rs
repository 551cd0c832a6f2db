//! `/flows` query parameters: parsed strictly, so a typo is a 400 rather than a silent no-op.
use std::{fmt::Display, net::IpAddr, str::FromStr};

use tracer_model::{Cause, Verdict};

use crate::{
    flows::Flow,
    net::{parse_proto, Cidr},
};

/// Longest query string accepted.
pub const MAX_QUERY_LEN: usize = 4096;
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 100_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("query string longer than {MAX_QUERY_LEN} bytes")]
    TooLong,
    #[error("parameter {0:?} given more than once")]
    Repeated(String),
    #[error(
        "unknown parameter {0:?} (known: dst, src, pod, port, proto, verdict, cause, since, limit)"
    )]
    Unknown(String),
    #[error("{param}: {msg}")]
    Invalid { param: &'static str, msg: String },
}

/// `since=`: a wall-clock time or a look-back window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Since {
    At(std::time::SystemTime),
    Ago(std::time::Duration),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowQuery {
    /// `namespace/name`: flows through that pod's veth.
    pub pod: Option<(String, String)>,
    pub since: Option<Since>,
    pub dst: Option<Cidr>,
    pub src: Option<Cidr>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
    pub verdict: Option<Verdict>,
    pub cause: Option<Cause>,
    pub limit: Option<usize>,
}

impl FlowQuery {
    pub fn parse(query: Option<&str>) -> Result<FlowQuery, QueryError> {
        let mut q = FlowQuery::default();
        let Some(query) = query else {
            return Ok(q);
        };
        if query.len() > MAX_QUERY_LEN {
            return Err(QueryError::TooLong);
        }
        let mut seen: Vec<String> = Vec::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if k.is_empty() {
                continue;
            }
            if seen.iter().any(|s| s == k.as_ref()) {
                return Err(QueryError::Repeated(k.into_owned()));
            }
            seen.push(k.to_string());
            let v = v.trim();
            match k.as_ref() {
                "dst" => q.dst = Some(cidr("dst", v)?),
                "src" => q.src = Some(cidr("src", v)?),
                "port" => {
                    q.port = Some(v.parse().map_err(|_| QueryError::Invalid {
                        param: "port",
                        msg: format!("{v:?} is not a port number (0-65535)"),
                    })?)
                }
                "proto" => {
                    q.proto = Some(parse_proto(v).map_err(|e| QueryError::Invalid {
                        param: "proto",
                        msg: e.to_string(),
                    })?)
                }
                "verdict" => q.verdict = Some(known("verdict", v, Verdict::ALL)?),
                "pod" => {
                    let (ns, name) = v
                        .split_once('/')
                        .filter(|(a, b)| valid_k8s_name(a) && valid_k8s_name(b))
                        .ok_or_else(|| QueryError::Invalid {
                            param: "pod",
                            msg: format!("{v:?} is not namespace/name"),
                        })?;
                    q.pod = Some((ns.to_string(), name.to_string()));
                }
                "since" => {
                    q.since = Some(
                        humantime::parse_duration(v)
                            .map(Since::Ago)
                            .or_else(|_| humantime::parse_rfc3339_weak(v).map(Since::At))
                            .map_err(|_| QueryError::Invalid {
                                param: "since",
                                msg: format!(
                                    "{v:?} is neither a duration (5m) nor an RFC 3339 time"
                                ),
                            })?,
                    )
                }
                "cause" => q.cause = Some(known("cause", v, Cause::ALL)?),
                "limit" => {
                    let n: usize = v.parse().map_err(|_| QueryError::Invalid {
                        param: "limit",
                        msg: format!("{v:?} is not a positive number"),
                    })?;
                    if n == 0 || n > MAX_LIMIT {
                        return Err(QueryError::Invalid {
                            param: "limit",
                            msg: format!("must be 1..={MAX_LIMIT}"),
                        });
                    }
                    q.limit = Some(n);
                }
                other => return Err(QueryError::Unknown(other.to_string())),
            }
        }
        Ok(q)
    }

    /// The single source and destination addresses asked for (host-length prefixes), which the
    /// table can look up by tag instead of reading every flow.
    pub fn hosts(&self) -> (Option<IpAddr>, Option<IpAddr>) {
        let host = |c: &Cidr| {
            let max = if c.addr().is_ipv4() { 32 } else { 128 };
            (c.prefix() == max).then(|| c.addr())
        };
        (
            self.src.as_ref().and_then(host),
            self.dst.as_ref().and_then(host),
        )
    }

    /// Filters that need no judgement: addresses match the original or the translated tuple.
    pub fn matches_tuple(&self, f: &Flow) -> bool {
        let dsts = [Some(f.dst), f.nat.map(|n| n.dst)];
        let srcs = [Some(f.src), f.nat.map(|n| n.src)];
        let any = |set: &[Option<IpAddr>], c: &Cidr| set.iter().flatten().any(|ip| c.contains(*ip));
        if let Some(c) = &self.dst {
            if !any(&dsts, c) {
                return false;
            }
        }
        if let Some(c) = &self.src {
            if !any(&srcs, c) {
                return false;
            }
        }
        if let Some(p) = self.port {
            let ports = [
                Some(f.sport),
                Some(f.dport),
                f.nat.map(|n| n.sport),
                f.nat.map(|n| n.dport),
            ];
            if !ports.iter().flatten().any(|x| *x == p) {
                return false;
            }
        }
        if let Some(p) = self.proto {
            if f.proto != p {
                return false;
            }
        }
        true
    }
}

/// DNS-1123 names as Kubernetes allows for namespaces and pods.
fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn cidr(param: &'static str, v: &str) -> Result<Cidr, QueryError> {
    v.parse().map_err(|_| QueryError::Invalid {
        param,
        msg: format!("{v:?} is not an IP address or CIDR"),
    })
}

/// One of a wire enum's names; the error lists them all.
fn known<T: FromStr + Display>(param: &'static str, v: &str, all: &[T]) -> Result<T, QueryError> {
    v.parse().map_err(|_| QueryError::Invalid {
        param,
        msg: format!(
            "unknown {param} {v:?}; known: {}",
            all.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filters() -> Result<(), QueryError> {
        let q = FlowQuery::parse(Some(
            "dst=10.96.0.1&port=443&proto=tcp&verdict=no_reply&limit=5",
        ))?;
        assert_eq!(
            q.dst.map(|c| c.to_string()).as_deref(),
            Some("10.96.0.1/32")
        );
        assert_eq!(q.port, Some(443));
        assert_eq!(q.proto, Some(6));
        assert_eq!(q.verdict, Some(Verdict::NoReply));
        assert_eq!(q.limit, Some(5));
        let q = FlowQuery::parse(Some(
            "pod=kube-system/calico-kube-controllers-596576f79-j2pkg&since=5m",
        ))?;
        assert_eq!(q.pod.as_ref().map(|p| p.0.as_str()), Some("kube-system"));
        assert_eq!(
            q.since,
            Some(Since::Ago(std::time::Duration::from_secs(300)))
        );
        let q = FlowQuery::parse(Some("since=2026-11-23T12:00:00Z"))?;
        assert!(matches!(q.since, Some(Since::At(_))));
        let q = FlowQuery::parse(Some("src=192.168.0.0%2F16"))?;
        assert_eq!(
            q.src.map(|c| c.to_string()).as_deref(),
            Some("192.168.0.0/16")
        );
        assert_eq!(FlowQuery::parse(None)?, FlowQuery::default());
        assert_eq!(FlowQuery::parse(Some(""))?, FlowQuery::default());
        Ok(())
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "dst=10.0.0.300",
            "dst=10.0.0.0/40",
            "src=",
            "port=70000",
            "port=-1",
            "proto=foo",
            "verdict=slow",
            "cause=everything",
            "limit=0",
            "limit=abc",
            "dst=1.1.1.1&dst=2.2.2.2",
            "bogus=1",
            "dst=%ZZ",
            "pod=nons",
            "pod=a/B",
            "pod=/x",
            "since=yesterday",
        ] {
            assert!(FlowQuery::parse(Some(bad)).is_err(), "{bad} accepted");
        }
        let long = format!("dst={}", "1".repeat(MAX_QUERY_LEN));
        assert_eq!(FlowQuery::parse(Some(&long)), Err(QueryError::TooLong));
    }
}
