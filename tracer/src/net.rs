//! Small address helpers: CIDRs and protocol names.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Serialize, Serializer};
use tracer_common::Family;
pub use tracer_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    #[error("invalid IP address {0:?}")]
    BadAddr(String),
    #[error("invalid CIDR {0:?}: prefix must be 0-32 for IPv4, 0-128 for IPv6")]
    BadCidr(String),
    #[error("unknown protocol {0:?} (use tcp, udp, icmp, icmpv6 or a number)")]
    BadProto(String),
}

/// An IP network; the address is kept with host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        Some(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    pub fn host(addr: IpAddr) -> Cidr {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }

    /// True when the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

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

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| NetError::BadCidr(s.to_string()))?;
        match p {
            None => Ok(Cidr::host(addr)),
            Some(p) => {
                let prefix: u8 = p.parse().map_err(|_| NetError::BadCidr(s.to_string()))?;
                Cidr::new(addr, prefix).ok_or_else(|| NetError::BadCidr(s.to_string()))
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Transport protocol name for the API; unknown numbers print as digits.
pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_ICMP => "icmp".into(),
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMPV6 => "icmpv6".into(),
        n => n.to_string(),
    }
}

pub fn parse_proto(s: &str) -> Result<u8, NetError> {
    match s.to_ascii_lowercase().as_str() {
        "icmp" => Ok(PROTO_ICMP),
        "tcp" => Ok(PROTO_TCP),
        "udp" => Ok(PROTO_UDP),
        "icmpv6" | "ipv6-icmp" => Ok(PROTO_ICMPV6),
        other => other
            .parse::<u8>()
            .map_err(|_| NetError::BadProto(s.to_string())),
    }
}

/// Rebuilds an address from the kernel's 16-byte representation.
pub fn ip_from_raw(family: Family, raw: &[u8; 16]) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(*raw)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_and_contains() -> Result<(), NetError> {
        let c: Cidr = "192.168.0.0/16".parse()?;
        assert!(c.contains(
            "192.168.21.11"
                .parse()
                .map_err(|_| NetError::BadAddr(String::new()))?
        ));
        assert!(!c.contains(
            "10.0.0.1"
                .parse()
                .map_err(|_| NetError::BadAddr(String::new()))?
        ));
        let host: Cidr = "192.168.21.0/24".parse()?;
        assert!(c.overlaps(&host) && host.overlaps(&c));
        assert_eq!("10.1.2.3/8".parse::<Cidr>()?.to_string(), "10.0.0.0/8");
        assert_eq!("10.1.2.3".parse::<Cidr>()?.prefix(), 32);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
        let v6: Cidr = "fd00:10:244::/48".parse()?;
        assert!(v6.contains(
            "fd00:10:244::5"
                .parse()
                .map_err(|_| NetError::BadAddr(String::new()))?
        ));
        assert!(!v6.contains(
            "10.0.0.1"
                .parse()
                .map_err(|_| NetError::BadAddr(String::new()))?
        ));
        assert_eq!("0.0.0.0/0".parse::<Cidr>()?.prefix(), 0);
        Ok(())
    }

    #[test]
    fn proto_names_round_trip() {
        for p in [1u8, 6, 17, 58, 132] {
            assert_eq!(parse_proto(&proto_name(p)), Ok(p));
        }
        assert!(parse_proto("sctpx").is_err());
    }
}
