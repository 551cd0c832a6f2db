//! Reading iptables rule counters inside a lab namespace.

use crate::netns::Netns;
use crate::LabError;

/// One rule of `iptables -L CHAIN -v -x -n`, with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounter {
    pub packets: u64,
    pub bytes: u64,
    /// The rule's target (`MASQUERADE`, `DNAT`, a chain name; empty for rules without one).
    pub target: String,
    /// The listing line, for messages.
    pub line: String,
}

/// The rules of `table`/`chain` in `ns` with their packet and byte counters, in order.
pub fn counters(ns: &Netns, table: &str, chain: &str) -> Result<Vec<RuleCounter>, LabError> {
    let out = ns.exec(&["iptables", "-w", "-t", table, "-L", chain, "-v", "-x", "-n"])?;
    parse_listing(&out)
}

fn parse_listing(out: &str) -> Result<Vec<RuleCounter>, LabError> {
    // Line 1: "Chain X (...)"; line 2: column headers; then one line per rule.
    out.lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut fields = line.split_whitespace();
            let mut num = || -> Result<u64, LabError> {
                fields
                    .next()
                    .and_then(|f| f.parse().ok())
                    .ok_or_else(|| LabError::Unexpected(format!("unparsable rule line {line:?}")))
            };
            let packets = num()?;
            let bytes = num()?;
            // A rule without target shows its protocol column next; targets are not numeric
            // ("all"/"0"/"tcp"/"6" are protocols).
            let target = fields
                .next()
                .filter(|t| !is_protocol(t))
                .unwrap_or_default()
                .to_string();
            Ok(RuleCounter {
                packets,
                bytes,
                target,
                line: line.trim().to_string(),
            })
        })
        .collect()
}

fn is_protocol(field: &str) -> bool {
    field.chars().all(|c| c.is_ascii_digit()) || matches!(field, "all" | "tcp" | "udp" | "icmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nft_backend_listing() -> Result<(), LabError> {
        let out = "Chain cali-nat-outgoing (1 references)\n    pkts      bytes target     prot opt in     out     source               destination         \n       3      180 MASQUERADE  0    --  *      *       0.0.0.0/0            0.0.0.0/0            /* cali:flqWnvo8yq4ULQLa */ match-set cali40masq-ipam-pools src ! match-set cali40all-ipam-pools dst random-fully\n       0        0            6    --  *      *       0.0.0.0/0            0.0.0.0/0\n";
        let rules = parse_listing(out)?;
        assert_eq!(rules.len(), 2);
        assert_eq!((rules[0].packets, rules[0].bytes), (3, 180));
        assert_eq!(rules[0].target, "MASQUERADE");
        assert_eq!(rules[1].target, "");
        Ok(())
    }
}
