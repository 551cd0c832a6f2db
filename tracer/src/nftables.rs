//! felix's nftables dataplane, read over nfnetlink: the sets of `table ip calico` /
//! `table ip6 calico` and the rules of its `nat-cali-nat-outgoing` chain.
//!
//! felix renders these with knftables (felix/nftables/): the sets carry the ipset names
//! (`cali40masq-ipam-pools`...), `hash:net` sets are `flags interval`, and the natOutgoing rule
//! is `ip saddr @cali40masq-ipam-pools ip daddr != @cali40network-ip-pools [ip daddr !=
//! @cali40all-hosts-net] [oifname "eth*"] counter masquerade fully-random`. The kernel hands
//! back sets as interval start/end elements and rules as expressions; this module decodes
//! just enough of both, and never trusts a length it has not checked.
use std::{collections::HashMap, net::IpAddr};

use netlink_sys::{protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, TokioSocket};

use crate::{calico::NatOutgoing, net::Cidr};

/// felix's table, in the `ip` and `ip6` families.
pub const TABLE: &str = "calico";
/// felix's natOutgoing chain in nftables mode (`nat-` + `cali-nat-outgoing`).
pub const NAT_OUTGOING_CHAIN: &str = "nat-cali-nat-outgoing";

// nfnetlink / nf_tables ABI (include/uapi/linux/netfilter/nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u8 = 1;
const NFT_MSG_GETCHAIN: u8 = 4;
const NFT_MSG_GETRULE: u8 = 7;
const NFT_MSG_GETSET: u8 = 10;
const NFT_MSG_GETSETELEM: u8 = 13;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_META_OIFNAME: u32 = 7;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_LOOKUP_F_INV: u32 = 0x1;
const NFT_NAT_SNAT: u32 = 0;
/// `NF_NAT_RANGE_PROTO_RANDOM_FULLY`: `fully-random`.
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
/// A dump larger than this is not felix's: stop rather than grow without bound.
const MAX_DUMP_BYTES: usize = 64 << 20;

/// The address family of one of felix's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ip,
    Ip6,
}

impl Family {
    fn nfproto(self) -> u8 {
        match self {
            Family::Ip => libc::NFPROTO_IPV4 as u8,
            Family::Ip6 => libc::NFPROTO_IPV6 as u8,
        }
    }

    fn addr_len(self) -> usize {
        match self {
            Family::Ip => 4,
            Family::Ip6 => 16,
        }
    }

    /// felix's set names start `cali4`/`cali6`; `None` for anything else.
    pub fn of_set(name: &str) -> Option<Family> {
        if name.starts_with("cali4") {
            Some(Family::Ip)
        } else if name.starts_with("cali6") {
            Some(Family::Ip6)
        } else {
            None
        }
    }

    /// `ip` / `ip6`, as `nft` spells the family.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nfnetlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel refused: {0}")]
    Errno(std::io::Error),
    #[error("bad nfnetlink message: {0}")]
    Decode(&'static str),
    #[error("the ruleset changed during the dump")]
    Interrupted,
    #[error("dump larger than {MAX_DUMP_BYTES} bytes")]
    TooBig,
}

impl NftError {
    fn is_not_found(&self) -> bool {
        matches!(self, NftError::Errno(e) if e.raw_os_error() == Some(libc::ENOENT))
    }
}

/// An nfnetlink socket for reading nf_tables objects of the current network namespace.
pub struct Nft {
    sock: TokioSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl Nft {
    pub fn open() -> Result<Nft, NftError> {
        let mut sock = TokioSocket::new(NETLINK_NETFILTER)?;
        sock.socket_mut().bind_auto()?;
        sock.socket_mut()
            .connect(&netlink_sys::SocketAddr::new(0, 0))?;
        Ok(Nft {
            sock,
            seq: 0,
            buf: Vec::with_capacity(256 << 10),
        })
    }

    /// Whether `table <family> calico` exists.
    pub async fn has_table(&mut self, family: Family) -> Result<bool, NftError> {
        let mut attrs = Vec::new();
        put_str(&mut attrs, 1, TABLE); // NFTA_TABLE_NAME
        match self.request(NFT_MSG_GETTABLE, family, false, &attrs).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The members of felix's set `name` as CIDRs; `None` when the set does not exist.
    pub async fn set_members(
        &mut self,
        family: Family,
        name: &str,
    ) -> Result<Option<Vec<Cidr>>, NftError> {
        let mut attrs = Vec::new();
        put_str(&mut attrs, 1, TABLE); // NFTA_SET_TABLE
        put_str(&mut attrs, 2, name); // NFTA_SET_NAME
        let set = match self.request(NFT_MSG_GETSET, family, false, &attrs).await {
            Ok(msgs) => msgs
                .iter()
                .find_map(|m| decode_set(m).ok())
                .ok_or(NftError::Decode("no set in the answer"))?,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        // NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET
        let msgs = match self.request(NFT_MSG_GETSETELEM, family, true, &attrs).await {
            Ok(m) => m,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut elems = Vec::new();
        for m in &msgs {
            elems.extend(decode_set_elems(m)?);
        }
        Ok(Some(elems_to_cidrs(&elems, set.interval(), family)))
    }

    /// The rules of `chain` in felix's table, as expressions; `None` when the chain (or the
    /// table) does not exist.
    pub async fn chain_rules(
        &mut self,
        family: Family,
        chain: &str,
    ) -> Result<Option<Vec<Vec<Expr>>>, NftError> {
        let mut attrs = Vec::new();
        put_str(&mut attrs, 1, TABLE); // NFTA_CHAIN_TABLE
        put_str(&mut attrs, 3, chain); // NFTA_CHAIN_NAME
        match self.request(NFT_MSG_GETCHAIN, family, false, &attrs).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut attrs = Vec::new();
        put_str(&mut attrs, 1, TABLE); // NFTA_RULE_TABLE
        put_str(&mut attrs, 2, chain); // NFTA_RULE_CHAIN
        let msgs = self.request(NFT_MSG_GETRULE, family, true, &attrs).await?;
        // The dump filter on the chain is the kernel's; check it anyway.
        let mut rules = Vec::new();
        for m in &msgs {
            let (rule_chain, exprs) = decode_rule(m)?;
            if rule_chain.as_deref() == Some(chain) {
                rules.push(exprs);
            }
        }
        Ok(Some(rules))
    }

    /// Sends one request and collects the payloads (after the nfgenmsg header) of its answers.
    async fn request(
        &mut self,
        msg: u8,
        family: Family,
        dump: bool,
        attrs: &[u8],
    ) -> Result<Vec<Vec<u8>>, NftError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        let req = encode_request(msg, family, flags, seq, attrs);
        self.sock.send(&req).await?;
        let mut out = Vec::new();
        let mut total = 0usize;
        loop {
            self.buf.clear();
            self.sock.recv(&mut self.buf).await?;
            total += self.buf.len();
            if total > MAX_DUMP_BYTES {
                return Err(NftError::TooBig);
            }
            for m in parse_messages(&self.buf)? {
                // Answers to an earlier request that timed out are skipped.
                if m.seq != seq {
                    continue;
                }
                if m.flags & NLM_F_DUMP_INTR != 0 {
                    return Err(NftError::Interrupted);
                }
                match m.ty {
                    NLMSG_NOOP => {}
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(i32::from_ne_bytes)
                            .ok_or(NftError::Decode("short error message"))?;
                        return if code == 0 {
                            Ok(out)
                        } else {
                            Err(NftError::Errno(std::io::Error::from_raw_os_error(
                                code.saturating_neg(),
                            )))
                        };
                    }
                    _ => {
                        let body = m
                            .payload
                            .get(4..)
                            .ok_or(NftError::Decode("no nfgenmsg header"))?;
                        out.push(body.to_vec());
                    }
                }
            }
        }
    }
}

fn encode_request(msg: u8, family: Family, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | u16::from(msg)).to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, res_id 0.
    b.extend_from_slice(&[family.nfproto(), 0, 0, 0]);
    b.extend_from_slice(attrs);
    b
}

/// Appends a NUL-terminated string attribute, padded to 4 bytes.
fn put_str(b: &mut Vec<u8>, ty: u16, s: &str) {
    let len = 4 + s.len() + 1;
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(s.as_bytes());
    b.push(0);
    b.resize(b.len() + (align4(len) - len), 0);
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// One netlink message of a datagram.
#[derive(Debug)]
struct NlMsg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn parse_messages(buf: &[u8]) -> Result<Vec<NlMsg<'_>>, NftError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let head = rest.get(..16).ok_or(NftError::Decode("truncated header"))?;
        let len = u32::from_ne_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len < 16 || len > rest.len() {
            return Err(NftError::Decode("bad message length"));
        }
        out.push(NlMsg {
            ty: u16::from_ne_bytes([head[4], head[5]]),
            flags: u16::from_ne_bytes([head[6], head[7]]),
            seq: u32::from_ne_bytes([head[8], head[9], head[10], head[11]]),
            payload: &rest[16..len],
        });
        rest = rest.get(align4(len)..).unwrap_or_default();
    }
    Ok(out)
}

/// The attributes of a netlink payload: (type without flags, value).
fn parse_attrs(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, NftError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return Err(NftError::Decode("bad attribute length"));
        }
        out.push((ty, &rest[4..len]));
        rest = rest.get(align4(len)..).unwrap_or_default();
    }
    if !rest.is_empty() {
        return Err(NftError::Decode("trailing bytes after attributes"));
    }
    Ok(out)
}

fn attr<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
}

/// nf_tables' u32 attributes are big-endian.
fn be32(v: Option<&[u8]>) -> Option<u32> {
    v.and_then(|b| b.try_into().ok()).map(u32::from_be_bytes)
}

fn string(v: Option<&[u8]>) -> Option<String> {
    let b = v?;
    let b = b.split(|c| *c == 0).next().unwrap_or_default();
    Some(String::from_utf8_lossy(b).into_owned())
}

/// `NFTA_DATA_VALUE` inside a nested data attribute.
fn data_value(v: Option<&[u8]>) -> Result<Option<Vec<u8>>, NftError> {
    let Some(v) = v else { return Ok(None) };
    Ok(attr(&parse_attrs(v)?, NFTA_DATA_VALUE).map(<[u8]>::to_vec))
}

/// What felix's set declaration says about its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetInfo {
    pub name: String,
    pub flags: u32,
}

impl SetInfo {
    fn interval(&self) -> bool {
        self.flags & NFT_SET_INTERVAL != 0
    }
}

fn decode_set(payload: &[u8]) -> Result<SetInfo, NftError> {
    let a = parse_attrs(payload)?;
    Ok(SetInfo {
        name: string(attr(&a, 2)).ok_or(NftError::Decode("set without a name"))?,
        flags: be32(attr(&a, 3)).unwrap_or(0),
    })
}

/// One set element as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    pub key: Vec<u8>,
    /// `NFT_SET_ELEM_INTERVAL_END`: the first address after an interval.
    pub end: bool,
    /// `NFTA_SET_ELEM_KEY_END`: the last address of an interval, where the set keeps both.
    pub key_end: Option<Vec<u8>>,
}

fn decode_set_elems(payload: &[u8]) -> Result<Vec<Elem>, NftError> {
    let a = parse_attrs(payload)?;
    let Some(list) = attr(&a, 3) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (ty, e) in parse_attrs(list)? {
        if ty != NFTA_LIST_ELEM {
            continue;
        }
        let ea = parse_attrs(e)?;
        let Some(key) = data_value(attr(&ea, 1))? else {
            continue;
        };
        out.push(Elem {
            key,
            end: be32(attr(&ea, 3)).unwrap_or(0) & NFT_SET_ELEM_INTERVAL_END != 0,
            key_end: data_value(attr(&ea, 10))?,
        });
    }
    Ok(out)
}

fn key_to_u128(key: &[u8], family: Family) -> Option<u128> {
    if key.len() != family.addr_len() {
        return None;
    }
    Some(key.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b)))
}

fn u128_to_ip(v: u128, family: Family) -> IpAddr {
    match family {
        Family::Ip => IpAddr::from((v as u32).to_be_bytes()),
        Family::Ip6 => IpAddr::from(v.to_be_bytes()),
    }
}

/// Set elements back to CIDRs. An interval set lists each range as a start element and an
/// end element (the first address after it; none when the range runs to the last address),
/// in no promised order; a range that is not one CIDR becomes the fewest CIDRs covering it.
/// Keys of the wrong length are skipped.
pub fn elems_to_cidrs(elems: &[Elem], interval: bool, family: Family) -> Vec<Cidr> {
    let bits = 8 * family.addr_len() as u32;
    let max = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    let mut ranges: Vec<(u128, u128)> = Vec::new();
    let mut points: Vec<(u128, bool)> = Vec::new();
    for e in elems {
        let Some(k) = key_to_u128(&e.key, family) else {
            tracing::debug!(len = e.key.len(), "skipping set element of odd length");
            continue;
        };
        match &e.key_end {
            Some(ke) => {
                if let Some(last) = key_to_u128(ke, family).filter(|l| *l >= k) {
                    ranges.push((k, last));
                }
            }
            None if interval => points.push((k, e.end)),
            None => ranges.push((k, k)),
        }
    }
    // Ends before starts at the same key: adjacent ranges.
    points.sort_by_key(|&(k, end)| (k, !end));
    let mut open: Option<u128> = None;
    for (k, end) in points {
        match (open, end) {
            (Some(s), true) => {
                if k > s {
                    ranges.push((s, k - 1));
                }
                open = None;
            }
            (Some(s), false) => {
                // Two starts in a row: the kernel never lists that; keep what is certain.
                if k > s {
                    ranges.push((s, k - 1));
                }
                open = Some(k);
            }
            (None, false) => open = Some(k),
            // nft's leading end element at 0 closes nothing.
            (None, true) => {}
        }
    }
    if let Some(s) = open {
        ranges.push((s, max));
    }
    let mut out = Vec::new();
    for (start, last) in ranges {
        range_to_cidrs(start, last, bits, family, &mut out);
    }
    out
}

fn range_to_cidrs(start: u128, last: u128, bits: u32, family: Family, out: &mut Vec<Cidr>) {
    let ones = |k: u32| {
        if k >= 128 {
            u128::MAX
        } else {
            (1u128 << k) - 1
        }
    };
    let mut cur = start;
    while cur <= last {
        let mut k = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        while k > 0 && (cur | ones(k)) > last {
            k -= 1;
        }
        if let Some(c) = Cidr::new(u128_to_ip(cur, family), (bits - k) as u8) {
            out.push(c);
        }
        let block_last = cur | ones(k);
        if block_last >= last {
            break;
        }
        cur = block_last + 1;
    }
}

/// One expression of a rule, as far as the natOutgoing rule needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    Meta {
        dreg: u32,
        key: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Lookup {
        set: String,
        sreg: u32,
        inv: bool,
    },
    /// `masquerade` / `snat`: range flags (`fully-random` is `NF_NAT_RANGE_PROTO_RANDOM_FULLY`)
    /// and the registers holding `to :MIN-MAX`.
    Nat {
        masq: bool,
        flags: u32,
        ports: Option<(u32, u32)>,
    },
    /// A constant loaded into a register (the NAT port range).
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    /// Anything else; `dreg` when it is known to load a register.
    Other {
        name: String,
        dreg: Option<u32>,
    },
}

/// A rule's chain and expressions.
fn decode_rule(payload: &[u8]) -> Result<(Option<String>, Vec<Expr>), NftError> {
    let a = parse_attrs(payload)?;
    let chain = string(attr(&a, 2));
    let mut exprs = Vec::new();
    if let Some(list) = attr(&a, 4) {
        for (ty, e) in parse_attrs(list)? {
            if ty != NFTA_LIST_ELEM {
                continue;
            }
            let ea = parse_attrs(e)?;
            let name = string(attr(&ea, 1)).ok_or(NftError::Decode("expression without a name"))?;
            let d = match attr(&ea, 2) {
                Some(d) => parse_attrs(d)?,
                None => Vec::new(),
            };
            let u = |t: u16| be32(attr(&d, t));
            exprs.push(match name.as_str() {
                "payload" => match (u(1), u(2), u(3), u(4)) {
                    (Some(dreg), Some(base), Some(offset), Some(len)) => Expr::Payload {
                        dreg,
                        base,
                        offset,
                        len,
                    },
                    // A payload write (sreg): loads nothing.
                    _ => Expr::Other { name, dreg: None },
                },
                "meta" => match (u(1), u(2)) {
                    (Some(dreg), Some(key)) => Expr::Meta { dreg, key },
                    _ => Expr::Other { name, dreg: None },
                },
                "cmp" => Expr::Cmp {
                    sreg: u(1).ok_or(NftError::Decode("cmp without sreg"))?,
                    op: u(2).ok_or(NftError::Decode("cmp without op"))?,
                    data: data_value(attr(&d, 3))?.unwrap_or_default(),
                },
                "lookup" => Expr::Lookup {
                    set: string(attr(&d, 1)).ok_or(NftError::Decode("lookup without a set"))?,
                    sreg: u(2).ok_or(NftError::Decode("lookup without sreg"))?,
                    inv: u(5).unwrap_or(0) & NFT_LOOKUP_F_INV != 0,
                },
                "masq" => Expr::Nat {
                    masq: true,
                    flags: u(1).unwrap_or(0),
                    ports: u(2).map(|min| (min, u(3).unwrap_or(min))),
                },
                "nat" if u(1) == Some(NFT_NAT_SNAT) => Expr::Nat {
                    masq: false,
                    flags: u(7).unwrap_or(0),
                    ports: u(5).map(|min| (min, u(6).unwrap_or(min))),
                },
                // A verdict (dreg 0) carries no value: loads nothing the NAT reads.
                "immediate" => match u(1) {
                    Some(dreg) => Expr::Immediate {
                        dreg,
                        data: data_value(attr(&d, 2))?.unwrap_or_default(),
                    },
                    None => Expr::Other { name, dreg: None },
                },
                // Register loads that could overwrite an address or interface just loaded.
                "bitwise" => Expr::Other { dreg: u(2), name },
                "ct" | "fib" | "rt" | "socket" | "osf" | "numgen" | "hash" => {
                    Expr::Other { dreg: u(1), name }
                }
                _ => Expr::Other { name, dreg: None },
            });
        }
    }
    Ok((chain, exprs))
}

/// What a register holds, as far as the natOutgoing rule is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loaded {
    Saddr,
    Daddr,
    Oifname,
    Other,
}

/// felix's natOutgoing rule from the expressions of `nat-cali-nat-outgoing`, with the same
/// reading as the iptables dataplane's `parse_nat_outgoing`: every masquerade/SNAT rule must
/// agree on what it excludes, odd matches are errors, never guesses.
pub fn nat_outgoing_of(rules: &[Vec<Expr>], family: Family) -> Result<NatOutgoing, String> {
    let (saddr, daddr) = match family {
        Family::Ip => (12, 16),
        Family::Ip6 => (8, 24),
    };
    let len = family.addr_len() as u32;
    let mut found: Option<NatOutgoing> = None;
    let mut count = 0;
    for exprs in rules {
        let mut regs: HashMap<u32, Loaded> = HashMap::new();
        let mut consts: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut r = NatOutgoing::default();
        let mut nat = false;
        for e in exprs {
            match e {
                Expr::Payload {
                    dreg,
                    base,
                    offset,
                    len: l,
                } => {
                    let what = match (*base, *offset, *l) {
                        (NFT_PAYLOAD_NETWORK_HEADER, o, l) if o == saddr && l == len => {
                            Loaded::Saddr
                        }
                        (NFT_PAYLOAD_NETWORK_HEADER, o, l) if o == daddr && l == len => {
                            Loaded::Daddr
                        }
                        _ => Loaded::Other,
                    };
                    regs.insert(*dreg, what);
                }
                Expr::Meta { dreg, key } => {
                    let what = if *key == NFT_META_OIFNAME {
                        Loaded::Oifname
                    } else {
                        Loaded::Other
                    };
                    regs.insert(*dreg, what);
                }
                Expr::Other {
                    dreg: Some(dreg), ..
                } => {
                    regs.insert(*dreg, Loaded::Other);
                }
                Expr::Cmp { sreg, op, data } if regs.get(sreg) == Some(&Loaded::Oifname) => {
                    let negated = match *op {
                        NFT_CMP_EQ => false,
                        NFT_CMP_NEQ => true,
                        _ => return Err(format!("odd oifname comparison (op {op})")),
                    };
                    r.out_iface = Some(iface_match(data));
                    r.out_iface_negated = negated;
                }
                Expr::Lookup { set, sreg, inv }
                    if *inv && regs.get(sreg) == Some(&Loaded::Daddr) =>
                {
                    if set.ends_with("all-hosts-net") {
                        r.excludes_host_ips = true;
                    } else if set.ends_with("ipam-pools") || set.ends_with("network-ip-pools") {
                        r.pool_set = Some(set.clone());
                    }
                }
                Expr::Immediate { dreg, data } => {
                    regs.insert(*dreg, Loaded::Other);
                    consts.insert(*dreg, data.clone());
                }
                Expr::Nat { masq, flags, ports } => {
                    nat = true;
                    r.action = Some(if *masq { "MASQUERADE" } else { "SNAT" }.into());
                    r.random_fully = flags & NF_NAT_RANGE_PROTO_RANDOM_FULLY != 0;
                    let port = |reg: u32| -> Option<u16> {
                        let d = consts.get(&reg)?;
                        Some(u16::from_be_bytes([*d.first()?, *d.get(1)?]))
                    };
                    if let Some((lo, hi)) = ports {
                        match (port(*lo), port(*hi)) {
                            (Some(lo), Some(hi)) => r.port_range = Some(format!("{lo}-{hi}")),
                            _ => {
                                return Err(
                                    "a NAT port range from a register not loaded by a constant"
                                        .into(),
                                )
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if !nat {
            continue;
        }
        count += 1;
        found =
            Some(NatOutgoing::merge(found, r).map_err(|()| {
                "its masquerade/SNAT rules disagree on what they exclude".to_string()
            })?);
    }
    let mut r = found.unwrap_or_default();
    r.rules = count;
    Ok(r)
}

/// An `oifname` comparison in iptables spelling: nft compares the whole NUL-padded name for
/// an exact match, and only the prefix for `"eth*"`, which iptables writes `eth+`.
fn iface_match(data: &[u8]) -> String {
    match data.iter().position(|b| *b == 0) {
        Some(nul) => String::from_utf8_lossy(&data[..nul]).into_owned(),
        None => format!("{}+", String::from_utf8_lossy(data)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(ty: u16, val: &[u8]) -> Vec<u8> {
        let len = 4 + val.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(val);
        b.resize(align4(b.len()), 0);
        b
    }

    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        nla(ty | 0x8000, &parts.concat())
    }

    fn s(v: &str) -> Vec<u8> {
        let mut b = v.as_bytes().to_vec();
        b.push(0);
        b
    }

    fn u(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    fn elem(key: &[u8], end: bool) -> Vec<u8> {
        let mut parts = vec![nested(1, &[nla(NFTA_DATA_VALUE, key)])];
        if end {
            parts.push(nla(3, &u(NFT_SET_ELEM_INTERVAL_END)));
        }
        nested(NFTA_LIST_ELEM, &parts)
    }

    /// A GETSETELEM answer as the kernel sends it for `elements = { 192.168.0.0/16, 10.0.0.1,
    /// 10.1.0.0-10.1.0.5 }` (`nft --debug=netlink`: descending, with a leading end at 0).
    fn elems_msg() -> Vec<u8> {
        let list = [
            elem(&[192, 169, 0, 0], true),
            elem(&[192, 168, 0, 0], false),
            elem(&[10, 1, 0, 6], true),
            elem(&[10, 1, 0, 0], false),
            elem(&[10, 0, 0, 2], true),
            elem(&[10, 0, 0, 1], false),
            elem(&[0, 0, 0, 0], true),
        ];
        [
            nla(1, &s("calico")),
            nla(2, &s("cali40masq-ipam-pools")),
            nested(3, &list),
        ]
        .concat()
    }

    fn expr(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
        nested(NFTA_LIST_ELEM, &[nla(1, &s(name)), nested(2, data)])
    }

    /// `oifname "eth*" ip saddr @cali40masq-ipam-pools ip daddr != @cali40network-ip-pools
    /// counter masquerade fully-random`, as `nft --debug=netlink` shows it.
    fn rule_msg(oif: &[u8]) -> Vec<u8> {
        let exprs = [
            expr("meta", &[nla(2, &u(NFT_META_OIFNAME)), nla(1, &u(1))]),
            expr(
                "cmp",
                &[
                    nla(1, &u(1)),
                    nla(2, &u(NFT_CMP_EQ)),
                    nested(3, &[nla(NFTA_DATA_VALUE, oif)]),
                ],
            ),
            expr(
                "payload",
                &[nla(1, &u(1)), nla(2, &u(1)), nla(3, &u(12)), nla(4, &u(4))],
            ),
            expr(
                "lookup",
                &[nla(1, &s("cali40masq-ipam-pools")), nla(2, &u(1))],
            ),
            expr(
                "payload",
                &[nla(1, &u(1)), nla(2, &u(1)), nla(3, &u(16)), nla(4, &u(4))],
            ),
            expr(
                "lookup",
                &[
                    nla(1, &s("cali40network-ip-pools")),
                    nla(2, &u(1)),
                    nla(5, &u(NFT_LOOKUP_F_INV)),
                ],
            ),
            expr("counter", &[]),
            expr("masq", &[nla(1, &u(0x10))]),
        ];
        [
            nla(1, &s("calico")),
            nla(2, &s(NAT_OUTGOING_CHAIN)),
            nested(4, &exprs),
            nla(7, b"\x00\x17cali:JjuWIaIfSLZi41Xk;\x00"),
        ]
        .concat()
    }

    fn strs(c: &[Cidr]) -> Vec<String> {
        c.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn interval_elements_become_cidrs() -> Result<(), NftError> {
        let elems = decode_set_elems(&elems_msg())?;
        assert_eq!(elems.len(), 7);
        let got = strs(&elems_to_cidrs(&elems, true, Family::Ip));
        let mut got = got;
        got.sort();
        assert_eq!(
            got,
            [
                "10.0.0.1/32",
                "10.1.0.0/30",
                "10.1.0.4/31",
                "192.168.0.0/16"
            ]
        );
        // A plain (non-interval) set: every key is an address.
        let plain = [Elem {
            key: vec![10, 128, 0, 212],
            end: false,
            key_end: None,
        }];
        assert_eq!(
            strs(&elems_to_cidrs(&plain, false, Family::Ip)),
            ["10.128.0.212/32"]
        );
        Ok(())
    }

    #[test]
    fn intervals_at_the_edges_and_in_ipv6() {
        let e = |key: Vec<u8>, end| Elem {
            key,
            end,
            key_end: None,
        };
        // 0.0.0.0/0: a start at 0 and no end.
        assert_eq!(
            strs(&elems_to_cidrs(&[e(vec![0; 4], false)], true, Family::Ip)),
            ["0.0.0.0/0"]
        );
        // The last /24 of the space: no end element either.
        assert_eq!(
            strs(&elems_to_cidrs(
                &[e(vec![255, 255, 255, 0], false), e(vec![0; 4], true)],
                true,
                Family::Ip
            )),
            ["255.255.255.0/24"]
        );
        // fd00::/8 and ::/0 in IPv6.
        let mut fd = vec![0u8; 16];
        fd[0] = 0xfd;
        let mut fe = vec![0u8; 16];
        fe[0] = 0xfe;
        assert_eq!(
            strs(&elems_to_cidrs(
                &[e(fe, true), e(fd, false)],
                true,
                Family::Ip6
            )),
            ["fd00::/8"]
        );
        assert_eq!(
            strs(&elems_to_cidrs(&[e(vec![0; 16], false)], true, Family::Ip6)),
            ["::/0"]
        );
        // Adjacent ranges: an end and a start at the same key.
        assert_eq!(
            strs(&elems_to_cidrs(
                &[
                    e(vec![10, 0, 0, 0], false),
                    e(vec![10, 0, 1, 0], true),
                    e(vec![10, 0, 1, 0], false),
                    e(vec![10, 0, 2, 0], true),
                ],
                true,
                Family::Ip
            )),
            ["10.0.0.0/24", "10.0.1.0/24"]
        );
        // KEY_END ranges, and keys of the wrong length skipped.
        let ranged = Elem {
            key: vec![10, 0, 0, 0],
            end: false,
            key_end: Some(vec![10, 0, 0, 255]),
        };
        assert_eq!(
            strs(&elems_to_cidrs(
                &[ranged, e(vec![1, 2, 3], false)],
                true,
                Family::Ip
            )),
            ["10.0.0.0/24"]
        );
    }

    #[test]
    fn masquerade_rule_is_read() -> Result<(), NftError> {
        let (chain, exprs) = decode_rule(&rule_msg(b"eth"))?;
        assert_eq!(chain.as_deref(), Some(NAT_OUTGOING_CHAIN));
        let r = nat_outgoing_of(&[exprs], Family::Ip).unwrap_or_default();
        assert_eq!(r.rules, 1);
        assert_eq!(r.pool_set.as_deref(), Some("cali40network-ip-pools"));
        assert_eq!(r.out_iface.as_deref(), Some("eth+"));
        assert!(!r.excludes_host_ips && !r.out_iface_negated);
        let mut exact = b"eth0".to_vec();
        exact.resize(16, 0);
        let (_, exprs) = decode_rule(&rule_msg(&exact))?;
        let r = nat_outgoing_of(std::slice::from_ref(&exprs), Family::Ip).unwrap_or_default();
        assert_eq!(r.out_iface.as_deref(), Some("eth0"));
        // In an ip6 table the same offsets are not addresses: no pool set is named.
        let r6 = nat_outgoing_of(std::slice::from_ref(&exprs), Family::Ip6).unwrap_or_default();
        assert_eq!(r6.pool_set, None);
        // A second rule that excludes something else: an error, not a guess.
        let (_, other) = decode_rule(&rule_msg(b"bond"))?;
        assert!(nat_outgoing_of(&[exprs, other], Family::Ip).is_err());
        // An empty chain: no pool has natOutgoing.
        assert_eq!(
            nat_outgoing_of(&[], Family::Ip).unwrap_or_default(),
            NatOutgoing::default()
        );
        Ok(())
    }

    #[test]
    fn messages_and_requests_frame() -> Result<(), NftError> {
        let mut attrs = Vec::new();
        put_str(&mut attrs, 1, "calico");
        let req = encode_request(NFT_MSG_GETTABLE, Family::Ip6, NLM_F_REQUEST, 7, &attrs);
        let msgs = parse_messages(&req)?;
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].ty, 0x0a01);
        assert_eq!(msgs[0].seq, 7);
        assert_eq!(msgs[0].payload[0], libc::NFPROTO_IPV6 as u8);
        let a = parse_attrs(&msgs[0].payload[4..])?;
        assert_eq!(string(attr(&a, 1)).as_deref(), Some("calico"));
        Ok(())
    }

    /// Truncated, garbled and random input: errors or odd results, never a panic.
    #[test]
    fn garbage_never_panics() {
        let samples = [elems_msg(), rule_msg(b"eth"), {
            let mut a = Vec::new();
            put_str(&mut a, 1, "calico");
            encode_request(NFT_MSG_GETSET, Family::Ip, NLM_F_DUMP, 1, &a)
        }];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let exercise = |b: &[u8]| {
            let _ = parse_messages(b);
            let _ = decode_set(b);
            if let Ok(e) = decode_set_elems(b) {
                let _ = elems_to_cidrs(&e, true, Family::Ip);
                let _ = elems_to_cidrs(&e, true, Family::Ip6);
                let _ = elems_to_cidrs(&e, false, Family::Ip);
            }
            if let Ok((_, e)) = decode_rule(b) {
                let _ = nat_outgoing_of(std::slice::from_ref(&e), Family::Ip);
                let _ = nat_outgoing_of(&[e], Family::Ip6);
            }
        };
        for s in &samples {
            for cut in 0..=s.len() {
                exercise(&s[..cut]);
            }
            for _ in 0..2000 {
                let mut b = s.clone();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                exercise(&b);
            }
        }
        for _ in 0..2000 {
            let n = (next() % 96) as usize;
            let b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            exercise(&b);
        }
        // A message whose length says more than there is.
        let mut m = elems_msg();
        m.splice(0..0, [0xff, 0xff, 0, 0]);
        assert!(parse_attrs(&m).is_err());
    }
}
