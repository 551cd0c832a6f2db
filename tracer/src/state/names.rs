//! Identity in the state's answers: each flow endpoint's [`Endpoint`], the `namespace=` and
//! `selector=` filters, and pod and node names in diagnosis text. One [`Naming`] per answer
//! holds the identity view as it was when the answer began.
use std::{net::IpAddr, sync::Arc};

use tracer_model::{
    identity::{Endpoint, FlowEndpoints, PodRef},
    FlowQuery,
};

use super::Shared;
use crate::{flows::Flow, identity::View, netlink::NodeFacts};

pub(crate) struct Naming {
    /// None while identity is off.
    view: Option<Arc<View>>,
    local: Option<Arc<Endpoint>>,
}

impl Shared {
    pub(crate) fn naming(&self) -> Naming {
        let ids = self.identities();
        Naming {
            view: ids.is_on().then(|| ids.view()),
            local: ids.local_node().cloned(),
        }
    }
}

impl Naming {
    fn known(&self, ip: IpAddr, at_ns: u64) -> Option<&Endpoint> {
        self.view.as_ref()?.lookup(ip, at_ns).map(|e| e.as_ref())
    }

    fn endpoint(&self, ip: IpAddr, at_ns: u64, facts: &NodeFacts) -> Endpoint {
        if let Some(e) = self.known(ip, at_ns) {
            return e.clone();
        }
        if facts.iface_holding(ip).is_some() {
            return self.local.as_deref().cloned().unwrap_or(Endpoint::Host);
        }
        Endpoint::External
    }

    /// Who the flow's addresses are, at the time the flow began; None while identity is off.
    pub fn endpoints(&self, f: &Flow, facts: &NodeFacts) -> Option<FlowEndpoints> {
        self.view.as_ref()?;
        let at = f.first_ns;
        Some(FlowEndpoints {
            src: self.endpoint(f.src, at, facts),
            dst: self.endpoint(f.dst, at, facts),
            nat_src: f
                .nat
                .filter(|n| n.src != f.src)
                .map(|n| self.endpoint(n.src, at, facts)),
            nat_dst: f
                .nat
                .filter(|n| n.dst != f.dst)
                .map(|n| self.endpoint(n.dst, at, facts)),
        })
    }

    /// `namespace=` and `selector=`: some endpoint of the flow (translated ones included) is a
    /// pod or Service of that namespace, and a pod whose labels match.
    pub fn matches(&self, q: &FlowQuery, f: &Flow) -> bool {
        if q.namespace.is_none() && q.selector.is_none() {
            return true;
        }
        self.any_endpoint(f, |e| {
            q.namespace
                .as_deref()
                .is_none_or(|ns| e.namespace() == Some(ns))
                && q.selector
                    .as_ref()
                    .is_none_or(|s| e.labels().is_some_and(|l| s.matches(l)))
        })
    }

    /// `pod=ns/name` through identity: some address of the flow (translated ones included)
    /// was that pod's when the flow began. Finds the pod's flows that never cross its veth on
    /// this node (a remote pod, or a Service's backend after DNAT). False while identity is off.
    pub fn is_pod(&self, f: &Flow, namespace: &str, name: &str) -> bool {
        self.any_endpoint(
            f,
            |e| matches!(e, Endpoint::Pod(p) if p.namespace == namespace && p.name == name),
        )
    }

    /// The pod at the flow's ends (the source first, translated addresses last) when the
    /// flow began: whose flow it is, for the metrics' namespace and workload labels.
    pub fn pod_of(&self, f: &Flow) -> Option<&PodRef> {
        self.known_endpoints(f).find_map(|e| match e {
            Endpoint::Pod(p) => Some(p),
            _ => None,
        })
    }

    fn any_endpoint(&self, f: &Flow, pred: impl Fn(&Endpoint) -> bool) -> bool {
        self.known_endpoints(f).any(pred)
    }

    /// What the datastore named the flow's addresses when it began: source, destination, then
    /// the translated ones.
    fn known_endpoints<'a>(&'a self, f: &Flow) -> impl Iterator<Item = &'a Endpoint> {
        let at = f.first_ns;
        [
            Some(f.src),
            Some(f.dst),
            f.nat.map(|n| n.src),
            f.nat.map(|n| n.dst),
        ]
        .into_iter()
        .flatten()
        .filter_map(move |ip| self.known(ip, at))
    }

    /// `text` with each address the datastore names written as `name (address)`: a pod as
    /// `ns/pod`, a Service as `service ns/name`, a node as `node name`. Done once here for
    /// every cause's text, which the rules write in addresses.
    pub fn name_text(&self, text: &str, at_ns: u64) -> String {
        if self.view.is_none() {
            return text.to_string();
        }
        let is_addr_char = |c: char| c.is_ascii_hexdigit() || c == '.' || c == ':';
        let mut out = String::with_capacity(text.len() + 32);
        let mut rest = text;
        while let Some(start) = rest.find(is_addr_char) {
            out.push_str(&rest[..start]);
            let run_len = rest[start..]
                .find(|c: char| !is_addr_char(c))
                .unwrap_or(rest.len() - start);
            let run = &rest[start..start + run_len];
            // Sentence punctuation is not part of the address.
            let token = run.trim_end_matches(['.', ':']);
            match self.name_of(token, at_ns) {
                Some(name) => {
                    out.push_str(&format!("{name} ({token})"));
                    out.push_str(&run[token.len()..]);
                }
                None => out.push_str(run),
            }
            rest = &rest[start + run_len..];
        }
        out.push_str(rest);
        out
    }

    /// The name of an address token (`10.0.0.1`, `10.0.0.1:443`, `fd00::1`).
    fn name_of(&self, token: &str, at_ns: u64) -> Option<String> {
        let ip: IpAddr = token.parse().ok().or_else(|| {
            let (host, port) = token.rsplit_once(':')?;
            port.parse::<u16>().ok()?;
            host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
        })?;
        self.known(ip, at_ns)?.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Book, Kind, Object};
    use tracer_model::identity::{NodeRef, PodRef};

    /// A book holding pod shop/web-1 at 10.244.1.10.
    fn web_1_book() -> Result<Book, std::net::AddrParseError> {
        let mut book = Book::default();
        book.upsert(
            Kind::Pod,
            "shop/web-1".into(),
            Object {
                ips: vec!["10.244.1.10".parse()?],
                endpoint: Arc::new(Endpoint::Pod(PodRef {
                    namespace: "shop".into(),
                    name: "web-1".into(),
                    workload: None,
                    node: None,
                    labels: Default::default(),
                })),
            },
        );
        Ok(book)
    }

    #[test]
    fn diagnosis_text_names_pods_and_nodes() -> Result<(), std::net::AddrParseError> {
        let mut book = web_1_book()?;
        book.upsert(
            Kind::Node,
            "n".into(),
            Object {
                ips: vec!["192.168.21.10".parse()?],
                endpoint: Arc::new(Endpoint::Node(NodeRef {
                    name: "node-a".into(),
                })),
            },
        );
        let n = Naming {
            view: Some(Arc::new(book.view())),
            local: None,
        };
        let now = crate::clock::mono_now_ns();
        assert_eq!(
            n.name_text("tcp 10.244.1.10:5000 -> 10.96.0.1:443 left 192.168.21.10. 10.244.1.100 too", now),
            "tcp shop/web-1 (10.244.1.10:5000) -> 10.96.0.1:443 left node node-a (192.168.21.10). 10.244.1.100 too"
        );
        let off = Naming {
            view: None,
            local: None,
        };
        assert_eq!(off.name_text("10.244.1.10 x", now), "10.244.1.10 x");
        Ok(())
    }

    #[test]
    fn pod_filter_matches_an_address_that_was_the_pods_when_the_flow_began(
    ) -> Result<(), std::net::AddrParseError> {
        let pod_ip: IpAddr = "10.244.1.10".parse()?;
        let book = web_1_book()?;
        let n = Naming {
            view: Some(Arc::new(book.view())),
            local: None,
        };
        let now = crate::clock::mono_now_ns();
        let flow = |src: IpAddr, dst: IpAddr| {
            crate::flows::Flow::new(
                1,
                crate::flows::DirTuple {
                    proto: tracer_common::PROTO_TCP,
                    src,
                    sport: 40000,
                    dst,
                    dport: 80,
                },
                now,
            )
        };
        let other: IpAddr = "10.244.2.7".parse()?;
        assert!(n.is_pod(&flow(other, pod_ip), "shop", "web-1"));
        assert!(n.is_pod(&flow(pod_ip, other), "shop", "web-1"));
        assert!(!n.is_pod(&flow(pod_ip, other), "shop", "web-2"));
        assert!(!n.is_pod(&flow(pod_ip, other), "default", "web-1"));
        assert!(!n.is_pod(&flow(other, other), "shop", "web-1"));
        let off = Naming {
            view: None,
            local: None,
        };
        assert!(!off.is_pod(&flow(pod_ip, other), "shop", "web-1"));
        Ok(())
    }
}
