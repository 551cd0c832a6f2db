//! `/flows` (and `/watch`) query parameters: parsed strictly on the server, so a typo is a 400
//! rather than a silent no-op, and rendered back to a query string by the clients.
use std::{
    fmt,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use crate::{
    net::{parse_proto, proto_name, Cidr},
    Cause, Verdict,
};

/// Longest query string accepted.
pub const MAX_QUERY_LEN: usize = 4096;
/// Flows in an answer when the query has no `limit`.
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    TooLong,
    Repeated(String),
    Unknown(String),
    Invalid { param: &'static str, msg: String },
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::TooLong => write!(f, "query string longer than {MAX_QUERY_LEN} bytes"),
            QueryError::Repeated(p) => write!(f, "parameter {p:?} given more than once"),
            QueryError::Unknown(p) => write!(
                f,
                "unknown parameter {p:?} (known: dst, src, pod, namespace, selector, port, proto, verdict, cause, since, limit)"
            ),
            QueryError::Invalid { param, msg } => write!(f, "{param}: {msg}"),
        }
    }
}

impl std::error::Error for QueryError {}

/// `since=`: a wall-clock time or a look-back window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Since {
    At(SystemTime),
    Ago(Duration),
}

impl Since {
    /// A look-back window (`30s`, `5m`, `1h30m`, `250ms`, `2d`) or an RFC 3339 time with `Z` or
    /// an offset. Exactly the grammar docs/openapi.yaml declares, so a client generated from
    /// the schema never sends what the agent refuses.
    pub fn parse(v: &str) -> Result<Since, QueryError> {
        window(v)
            .map(Since::Ago)
            .or_else(|| {
                time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                    .ok()
                    // Before 1970 means "everything" here; clamped, since SystemTime's
                    // formatters refuse earlier times.
                    .map(|t| Since::At(SystemTime::from(t).max(SystemTime::UNIX_EPOCH)))
            })
            .ok_or_else(|| QueryError::Invalid {
                param: "since",
                msg: format!(
                    "{v:?} is neither a duration (30s, 5m, 1h30m, 250ms, 2d) nor an RFC 3339 time"
                ),
            })
    }
}

/// Units of a look-back window, longest name first (`ms` before `m`).
const WINDOW_UNITS: &[(&str, Duration)] = &[
    ("ms", Duration::from_millis(1)),
    ("s", Duration::from_secs(1)),
    ("m", Duration::from_secs(60)),
    ("h", Duration::from_secs(3600)),
    ("d", Duration::from_secs(86_400)),
];

/// `(digits unit)+`, each number of at most 9 digits, no spaces.
fn window(v: &str) -> Option<Duration> {
    let mut rest = v;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let n: u32 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (name, unit) = WINDOW_UNITS.iter().find(|(u, _)| rest.starts_with(u))?;
        total = total.checked_add(unit.checked_mul(n)?)?;
        rest = &rest[name.len()..];
    }
    Some(total)
}

impl fmt::Display for Since {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Since::Ago(d) => {
                // In the grammar `parse` reads: whole units, largest first, sub-milliseconds
                // dropped.
                let mut ms = d.as_millis();
                if ms == 0 {
                    return write!(f, "0s");
                }
                for (name, unit) in WINDOW_UNITS.iter().rev() {
                    let per = unit.as_millis();
                    if ms >= per {
                        write!(f, "{}{name}", ms / per)?;
                        ms %= per;
                    }
                }
                Ok(())
            }
            Since::At(t) => write!(f, "{}", humantime::format_rfc3339_nanos(*t)),
        }
    }
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
    /// Flows with a pod or Service of this namespace at either end.
    pub namespace: Option<String>,
    /// Flows with a pod at either end whose labels match (kubectl's label-selector syntax).
    pub selector: Option<crate::identity::Selector>,
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
                "port" => q.port = Some(port(v)?),
                "proto" => q.proto = Some(proto(v)?),
                "verdict" => q.verdict = Some(known("verdict", v, Verdict::ALL)?),
                "pod" => q.pod = Some(pod(v)?),
                "since" => q.since = Some(Since::parse(v)?),
                "cause" => q.cause = Some(known("cause", v, Cause::ALL)?),
                "limit" => q.limit = Some(limit(v)?),
                "namespace" => q.namespace = Some(namespace(v)?),
                "selector" => {
                    q.selector = Some(crate::identity::Selector::parse(v).map_err(|msg| {
                        QueryError::Invalid {
                            param: "selector",
                            msg,
                        }
                    })?)
                }
                other => return Err(QueryError::Unknown(other.to_string())),
            }
        }
        Ok(q)
    }

    /// The query string that [`FlowQuery::parse`] reads back as this query.
    pub fn to_query_string(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        let pairs = [
            ("dst", self.dst.map(|c| c.to_string())),
            ("src", self.src.map(|c| c.to_string())),
            ("pod", self.pod.as_ref().map(|(ns, n)| format!("{ns}/{n}"))),
            ("since", self.since.map(|x| x.to_string())),
            ("port", self.port.map(|p| p.to_string())),
            ("proto", self.proto.map(proto_name)),
            ("verdict", self.verdict.map(|v| v.to_string())),
            ("cause", self.cause.map(|c| c.to_string())),
            ("limit", self.limit.map(|l| l.to_string())),
            ("namespace", self.namespace.clone()),
            ("selector", self.selector.as_ref().map(|s| s.to_string())),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                s.append_pair(k, &v);
            }
        }
        s.finish()
    }

    /// The single source and destination addresses asked for (host-length prefixes), which the
    /// table can look up by tag instead of reading every flow.
    pub fn hosts(&self) -> (Option<IpAddr>, Option<IpAddr>) {
        let host = |c: &Cidr| c.is_host().then(|| c.addr());
        (
            self.src.as_ref().and_then(host),
            self.dst.as_ref().and_then(host),
        )
    }
}

/// DNS-1123 names as Kubernetes allows for namespaces and pods.
fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// `namespace=`: a DNS-1123 label.
fn namespace(v: &str) -> Result<String, QueryError> {
    (valid_k8s_name(v) && v.len() <= 63 && !v.contains('.'))
        .then(|| v.to_string())
        .ok_or_else(|| QueryError::Invalid {
            param: "namespace",
            msg: format!("{v:?} is not a namespace name"),
        })
}

/// `namespace/name`, as `pod=` and the CLI's `--pod` take it.
pub fn pod(v: &str) -> Result<(String, String), QueryError> {
    v.split_once('/')
        .filter(|(a, b)| valid_k8s_name(a) && valid_k8s_name(b))
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
        .ok_or_else(|| QueryError::Invalid {
            param: "pod",
            msg: format!("{v:?} is not namespace/name"),
        })
}

fn cidr(param: &'static str, v: &str) -> Result<Cidr, QueryError> {
    v.parse().map_err(|_| QueryError::Invalid {
        param,
        msg: format!("{v:?} is not an IP address or CIDR"),
    })
}

fn port(v: &str) -> Result<u16, QueryError> {
    v.parse().map_err(|_| QueryError::Invalid {
        param: "port",
        msg: format!("{v:?} is not a port number (0-65535)"),
    })
}

fn proto(v: &str) -> Result<u8, QueryError> {
    parse_proto(v).map_err(|e| QueryError::Invalid {
        param: "proto",
        msg: e.to_string(),
    })
}

fn limit(v: &str) -> Result<usize, QueryError> {
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
    Ok(n)
}

fn known<T: Copy + fmt::Display>(param: &'static str, v: &str, all: &[T]) -> Result<T, QueryError> {
    all.iter()
        .copied()
        .find(|x| x.to_string() == v)
        .ok_or_else(|| QueryError::Invalid {
            param,
            msg: format!(
                "unknown {param} {v:?}; known: {}",
                all.iter()
                    .map(|x| x.to_string())
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
        assert_eq!(q.since, Some(Since::Ago(Duration::from_secs(300))));
        let q = FlowQuery::parse(Some("since=2026-11-23T12:00:00Z"))?;
        assert!(matches!(q.since, Some(Since::At(_))));
        // An offset is the same instant.
        let q2 = FlowQuery::parse(Some("since=2026-11-23T13:00:00%2B01:00"))?;
        assert_eq!(q2.since, q.since);
        let old = FlowQuery::parse(Some("since=0001-01-01T00:00:00Z"))?;
        assert_eq!(old.since, Some(Since::At(SystemTime::UNIX_EPOCH)));
        assert!(old.to_query_string().contains("1970-01-01T00"));
        for (text, secs) in [("1h30m", 5400), ("2d", 172_800), ("0s", 0), ("90s", 90)] {
            let q = FlowQuery::parse(Some(&format!("since={text}")))?;
            assert_eq!(
                q.since,
                Some(Since::Ago(Duration::from_secs(secs))),
                "{text}"
            );
        }
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
            "since=5",
            "since=5%20m",
            "since=1.5h",
            "since=1234567890s",
            "since=2026-11-23",
            "since=2026-11-23T12:00:00",
            "since=2026-02-30T12:00:00Z",
            "namespace=Bad_NS",
            "selector=app%20in%20web",
            "selector=",
        ] {
            assert!(FlowQuery::parse(Some(bad)).is_err(), "{bad} accepted");
        }
        let long = format!("dst={}", "1".repeat(MAX_QUERY_LEN));
        assert_eq!(FlowQuery::parse(Some(&long)), Err(QueryError::TooLong));
    }

    #[test]
    fn renders_back_to_what_it_parses() -> Result<(), QueryError> {
        for text in [
            "",
            "dst=10.96.0.0%2F12&src=192.168.1.5%2F32&port=53&proto=udp",
            "pod=kube-system%2Fcoredns-1&since=5m&verdict=no_reply&cause=kernel_drop&limit=7",
            "since=2026-11-23T12%3A00%3A00Z&proto=132",
            "since=1d2h3m4s5ms",
            "since=250ms",
            "namespace=shop&selector=app%3Dweb%2Ctier+in+%28a%2Cb%29",
        ] {
            let q = FlowQuery::parse(Some(text))?;
            let back = FlowQuery::parse(Some(&q.to_query_string()))?;
            assert_eq!(back, q, "{text}");
        }
        Ok(())
    }
}
