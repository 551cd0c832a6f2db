//! Small address helpers: interface addresses and kernel address bytes. CIDRs and protocol
//! names are wire vocabulary (`tracer_model::net`), re-exported here.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;
use tracer_common::Family;

pub use tracer_model::net::{
    parse_proto, proto_name, Cidr, NetError, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

/// An address configured on an interface: the address itself and its subnet's prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IfAddr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl IfAddr {
    pub fn network(&self) -> Cidr {
        Cidr::new(self.ip, self.prefix).unwrap_or(Cidr::host(self.ip))
    }

    /// A /32 (or /128): no subnet is attached through it.
    pub fn is_host(&self) -> bool {
        self.prefix >= if self.ip.is_ipv4() { 32 } else { 128 }
    }
}

impl fmt::Display for IfAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// Rebuilds an address from the kernel's 16-byte representation.
pub fn ip_from_raw(family: Family, raw: &[u8; 16]) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(*raw)),
    }
}
