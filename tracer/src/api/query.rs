//! `/flows` query parameters: parsed strictly, so a typo is a 400 rather than a silent no-op.
use std::net::IpAddr;

use crate::{
    diagnose::{CAUSES, VERDICTS},
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
    #[error("unknown parameter {0:?} (known: dst, src, port, proto, verdict, cause, limit)")]
    Unknown(String),
    #[error("{param}: {msg}")]
    Invalid { param: &'static str, msg: String },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowQuery {
    pub dst: Option<Cidr>,
    pub src: Option<Cidr>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
    pub verdict: Option<&'static str>,
    pub cause: Option<&'static str>,
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
                "verdict" => q.verdict = Some(known("verdict", v, VERDICTS)?),
                "cause" => q.cause = Some(known("cause", v, CAUSES)?),
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

fn cidr(param: &'static str, v: &str) -> Result<Cidr, QueryError> {
    v.parse().map_err(|_| QueryError::Invalid {
        param,
        msg: format!("{v:?} is not an IP address or CIDR"),
    })
}

fn known(param: &'static str, v: &str, set: &[&'static str]) -> Result<&'static str, QueryError> {
    set.iter()
        .copied()
        .find(|s| *s == v)
        .ok_or_else(|| QueryError::Invalid {
            param,
            msg: format!("unknown {param} {v:?}; known: {}", set.join(", ")),
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
        assert_eq!(q.verdict, Some("no_reply"));
        assert_eq!(q.limit, Some(5));
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
        ] {
            assert!(FlowQuery::parse(Some(bad)).is_err(), "{bad} accepted");
        }
        let long = format!("dst={}", "1".repeat(MAX_QUERY_LEN));
        assert_eq!(FlowQuery::parse(Some(&long)), Err(QueryError::TooLong));
    }
}
