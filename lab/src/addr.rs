//! IPv4 parsing and the lab's address guard.

use std::net::Ipv4Addr;

use crate::LabError;

/// An IPv4 prefix such as 192.168.21.0/24 (host bits may be set: 192.168.21.10/24 is fine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, LabError> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| LabError::Config(format!("{s:?} is not a CIDR (a.b.c.d/len)")))?;
        let addr = parse_ip(ip, s)?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| LabError::Config(format!("bad prefix length in {s:?}")))?;
        Ok(Cidr { addr, prefix })
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// True if every address of `self` is inside `outer`.
    pub fn within(&self, outer: &Cidr) -> bool {
        self.prefix >= outer.prefix && outer.contains(self.addr)
    }
}

pub(crate) fn parse_ip(s: &str, what: &str) -> Result<Ipv4Addr, LabError> {
    s.trim()
        .parse()
        .map_err(|_| LabError::Config(format!("{what}: {s:?} is not an IPv4 address")))
}

/// The only ranges the lab may configure (inside its own namespaces).
const LAB_RANGES: [Cidr; 2] = [
    Cidr {
        addr: Ipv4Addr::new(10, 0, 0, 0),
        prefix: 8,
    },
    Cidr {
        addr: Ipv4Addr::new(192, 168, 0, 0),
        prefix: 16,
    },
];

/// Refuses addresses outside 10.0.0.0/8 and 192.168.0.0/16.
pub(crate) fn ensure_lab_ip(ip: Ipv4Addr, what: &str) -> Result<(), LabError> {
    if LAB_RANGES.iter().any(|r| r.contains(ip)) {
        Ok(())
    } else {
        Err(LabError::Config(format!(
            "{what} {ip} is outside the lab ranges 10.0.0.0/8 and 192.168.0.0/16"
        )))
    }
}

/// Refuses prefixes not entirely inside 10.0.0.0/8 or 192.168.0.0/16.
pub(crate) fn ensure_lab_cidr(c: &Cidr, what: &str) -> Result<(), LabError> {
    if LAB_RANGES.iter().any(|r| c.within(r)) {
        Ok(())
    } else {
        Err(LabError::Config(format!(
            "{what} {}/{} is not inside the lab ranges 10.0.0.0/8 and 192.168.0.0/16",
            c.addr, c.prefix
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains_and_within() -> Result<(), LabError> {
        let pool = Cidr::parse("192.168.0.0/16")?;
        let host = Cidr::parse("192.168.21.0/24")?;
        assert!(pool.contains(Ipv4Addr::new(192, 168, 21, 11)));
        assert!(host.within(&pool));
        assert!(!pool.within(&host));
        assert!(Cidr::parse("0.0.0.0/0")?.contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(Cidr::parse("10.0.0.1/33").is_err());
        assert!(Cidr::parse("10.0.0.1").is_err());
        assert!(ensure_lab_cidr(&Cidr::parse("10.244.0.0/16")?, "pool").is_ok());
        assert!(ensure_lab_cidr(&Cidr::parse("192.0.0.0/8")?, "pool").is_err());
        assert!(ensure_lab_ip(Ipv4Addr::new(172, 17, 0, 1), "ip").is_err());
        Ok(())
    }
}
