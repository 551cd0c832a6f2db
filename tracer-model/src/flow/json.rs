//! A flow's JSON written by hand: the bytes `serde_json::to_writer` writes for [`FlowView`] and
//! [`FlowsPage`] (compact, fields in declaration order), without serde's per-key escaping. A
//! `/flows` answer is up to a thousand flows, and serde's generic path was half its cost.
//!
//! The serde derive stays the definition: every struct here is destructured without `..`, so a
//! new field fails to compile until it is written here; `json/tests.rs` compares these bytes
//! with serde_json's for generated flows, and the API goldens pin them. The parts that are rare
//! or deep (encapsulation, diagnosis, endpoints) go through serde_json itself.
use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr},
};

use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter};

use super::{Counters, DropView, Exchanges, FlowView, FlowsPage, Hop, Nat, TcpSummary};

impl FlowsPage {
    /// This page as `serde_json::to_writer` writes it.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let FlowsPage {
            flows,
            matched,
            truncated,
        } = self;
        let mut w = FlowsPageWriter::new(out);
        for f in flows {
            w.flow(f)?;
        }
        w.finish(*matched, *truncated);
        Ok(())
    }
}

/// A [`FlowsPage`]'s bytes written a flow at a time, as each flow's view is built: the views
/// of a page need not all live at once. The same bytes as [`FlowsPage::write_json`].
pub struct FlowsPageWriter<'a> {
    out: &'a mut Vec<u8>,
    written: bool,
}

impl<'a> FlowsPageWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> FlowsPageWriter<'a> {
        out.extend_from_slice(b"{\"flows\":[");
        FlowsPageWriter {
            out,
            written: false,
        }
    }

    /// Room for `bytes` more.
    pub fn reserve(&mut self, bytes: usize) {
        self.out.reserve_exact(bytes);
    }

    pub fn flow(&mut self, f: &FlowView) -> serde_json::Result<()> {
        if self.written {
            self.out.push(b',');
        }
        self.written = true;
        f.write_json(self.out)
    }

    /// The counts that follow the flows (`matched` and `truncated` of [`FlowsPage`]).
    pub fn finish(self, matched: usize, truncated: bool) {
        self.out.extend_from_slice(b"],\"matched\":");
        u64_(self.out, matched as u64);
        self.out.extend_from_slice(b",\"truncated\":");
        bool_(self.out, truncated);
        self.out.push(b'}');
    }
}

impl FlowView {
    /// This flow as `serde_json::to_writer` writes it.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let FlowView {
            id,
            proto,
            src,
            sport,
            dst,
            dport,
            first_seen,
            last_seen,
            nat,
            path,
            forward,
            reverse,
            reply_after_ms,
            tcp,
            exchanges,
            drops,
            verdicts,
            diagnosis,
            snat_excluded,
            evidence_incomplete,
            endpoints,
        } = self;
        out.extend_from_slice(b"{\"id\":");
        u64_(out, *id);
        out.extend_from_slice(b",\"proto\":");
        str_(out, proto)?;
        tuple(out, src, *sport, dst, *dport);
        out.extend_from_slice(b",\"first_seen\":");
        str_(out, first_seen)?;
        out.extend_from_slice(b",\"last_seen\":");
        str_(out, last_seen)?;
        out.extend_from_slice(b",\"nat\":");
        match nat {
            Some(n) => nat_(out, n),
            None => null(out),
        }
        out.extend_from_slice(b",\"path\":[");
        items(out, path, hop)?;
        out.extend_from_slice(b"],\"forward\":");
        counters(out, forward);
        out.extend_from_slice(b",\"reverse\":");
        counters(out, reverse);
        out.extend_from_slice(b",\"reply_after_ms\":");
        opt_f64(out, *reply_after_ms);
        out.extend_from_slice(b",\"tcp\":");
        match tcp {
            Some(t) => tcp_(out, t),
            None => null(out),
        }
        out.extend_from_slice(b",\"exchanges\":");
        match exchanges {
            Some(x) => exchanges_(out, x),
            None => null(out),
        }
        out.extend_from_slice(b",\"drops\":[");
        items(out, drops, drop_)?;
        out.extend_from_slice(b"],\"verdicts\":[");
        items(out, verdicts, |out, v| str_(out, v.as_str()))?;
        out.extend_from_slice(b"],\"diagnosis\":");
        serde_(out, diagnosis)?;
        if let Some(x) = snat_excluded {
            out.extend_from_slice(b",\"snat_excluded\":");
            serde_(out, x)?;
        }
        if let Some(g) = evidence_incomplete {
            out.extend_from_slice(b",\"evidence_incomplete\":");
            serde_(out, g)?;
        }
        if let Some(e) = endpoints {
            out.extend_from_slice(b",\"endpoints\":");
            serde_(out, e)?;
        }
        out.push(b'}');
        Ok(())
    }
}

fn hop(out: &mut Vec<u8>, h: &Hop) -> serde_json::Result<()> {
    let Hop {
        iface,
        ifindex,
        role,
        dir,
        side,
        src,
        sport,
        dst,
        dport,
        encap,
        pkts,
        bytes,
        retransmits,
        t_ms,
        tcp_flags,
    } = h;
    out.extend_from_slice(b"{\"iface\":");
    str_(out, iface)?;
    out.extend_from_slice(b",\"ifindex\":");
    u64_(out, u64::from(*ifindex));
    out.extend_from_slice(b",\"role\":");
    match role {
        Some(r) => str_(out, r.as_str())?,
        None => null(out),
    }
    out.extend_from_slice(b",\"dir\":");
    str_(out, dir.as_str())?;
    out.extend_from_slice(b",\"side\":");
    str_(out, side.as_str())?;
    tuple(out, src, *sport, dst, *dport);
    out.extend_from_slice(b",\"encap\":");
    serde_(out, encap)?;
    out.extend_from_slice(b",\"pkts\":");
    u64_(out, *pkts);
    out.extend_from_slice(b",\"bytes\":");
    u64_(out, *bytes);
    out.extend_from_slice(b",\"retransmits\":");
    u64_(out, u64::from(*retransmits));
    out.extend_from_slice(b",\"t_ms\":");
    f64_(out, *t_ms);
    out.extend_from_slice(b",\"tcp_flags\":");
    str_(out, tcp_flags)?;
    out.push(b'}');
    Ok(())
}

fn nat_(out: &mut Vec<u8>, n: &Nat) {
    let Nat {
        src,
        sport,
        dst,
        dport,
    } = n;
    out.extend_from_slice(b"{\"src\":");
    ip(out, src);
    out.extend_from_slice(b",\"sport\":");
    u64_(out, u64::from(*sport));
    out.extend_from_slice(b",\"dst\":");
    ip(out, dst);
    out.extend_from_slice(b",\"dport\":");
    u64_(out, u64::from(*dport));
    out.push(b'}');
}

fn counters(out: &mut Vec<u8>, c: &Counters) {
    let Counters { pkts, bytes } = c;
    out.extend_from_slice(b"{\"pkts\":");
    u64_(out, *pkts);
    out.extend_from_slice(b",\"bytes\":");
    u64_(out, *bytes);
    out.push(b'}');
}

fn tcp_(out: &mut Vec<u8>, t: &TcpSummary) {
    let TcpSummary {
        syn,
        syn_ack,
        fin,
        rst,
        retransmits,
        handshake_ms,
    } = t;
    out.extend_from_slice(b"{\"syn\":");
    bool_(out, *syn);
    out.extend_from_slice(b",\"syn_ack\":");
    bool_(out, *syn_ack);
    out.extend_from_slice(b",\"fin\":");
    bool_(out, *fin);
    out.extend_from_slice(b",\"rst\":");
    bool_(out, *rst);
    out.extend_from_slice(b",\"retransmits\":");
    u64_(out, u64::from(*retransmits));
    out.extend_from_slice(b",\"handshake_ms\":");
    opt_f64(out, *handshake_ms);
    out.push(b'}');
}

fn exchanges_(out: &mut Vec<u8>, x: &Exchanges) {
    let Exchanges {
        count,
        p50_ms,
        p90_ms,
        max_ms,
    } = x;
    out.extend_from_slice(b"{\"count\":");
    u64_(out, u64::from(*count));
    out.extend_from_slice(b",\"p50_ms\":");
    opt_f64(out, *p50_ms);
    out.extend_from_slice(b",\"p90_ms\":");
    opt_f64(out, *p90_ms);
    out.extend_from_slice(b",\"max_ms\":");
    f64_(out, *max_ms);
    out.push(b'}');
}

fn drop_(out: &mut Vec<u8>, d: &DropView) -> serde_json::Result<()> {
    let DropView {
        reason,
        iface,
        function,
        side,
        count,
        t_ms,
    } = d;
    out.extend_from_slice(b"{\"reason\":");
    str_(out, reason)?;
    out.extend_from_slice(b",\"iface\":");
    match iface {
        Some(s) => str_(out, s)?,
        None => null(out),
    }
    out.extend_from_slice(b",\"function\":");
    match function {
        Some(s) => str_(out, s)?,
        None => null(out),
    }
    out.extend_from_slice(b",\"side\":");
    str_(out, side.as_str())?;
    out.extend_from_slice(b",\"count\":");
    u64_(out, u64::from(*count));
    out.extend_from_slice(b",\"t_ms\":");
    f64_(out, *t_ms);
    out.push(b'}');
    Ok(())
}

/// `,"src":..,"sport":..,"dst":..,"dport":..`, as a flow and a hop both carry them.
fn tuple(out: &mut Vec<u8>, src: &IpAddr, sport: u16, dst: &IpAddr, dport: u16) {
    out.extend_from_slice(b",\"src\":");
    ip(out, src);
    out.extend_from_slice(b",\"sport\":");
    u64_(out, u64::from(sport));
    out.extend_from_slice(b",\"dst\":");
    ip(out, dst);
    out.extend_from_slice(b",\"dport\":");
    u64_(out, u64::from(dport));
}

/// The elements of a JSON array, comma-separated (the brackets are the caller's).
fn items<T>(
    out: &mut Vec<u8>,
    xs: &[T],
    mut each: impl FnMut(&mut Vec<u8>, &T) -> serde_json::Result<()>,
) -> serde_json::Result<()> {
    for (i, x) in xs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, x)?;
    }
    Ok(())
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"null");
}

fn bool_(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

fn u64_(out: &mut Vec<u8>, n: u64) {
    // Writing to a Vec cannot fail.
    let _ = CompactFormatter.write_u64(out, n);
}

/// As serde_json: `null` for NaN and the infinities, else its shortest round-trip text.
fn f64_(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        let _ = CompactFormatter.write_f64(out, v);
    } else {
        null(out);
    }
}

fn opt_f64(out: &mut Vec<u8>, v: Option<f64>) {
    match v {
        Some(v) => f64_(out, v),
        None => null(out),
    }
}

/// A string as serde_json writes it. Interface names, drop reasons and symbols can hold any
/// byte a user or the kernel chose: a string with a quote, a backslash or a control character
/// goes through serde_json's escaping; the rest (all of them in practice) is copied.
fn str_(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        return serde_(out, s);
    }
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
    Ok(())
}

/// An address as its text, quoted; the text needs no escaping.
fn ip(out: &mut Vec<u8>, a: &IpAddr) {
    match a {
        IpAddr::V4(v4) => ipv4(out, v4),
        IpAddr::V6(v6) => {
            let _ = write!(out, "\"{v6}\"");
        }
    }
}

fn ipv4(out: &mut Vec<u8>, a: &Ipv4Addr) {
    out.push(b'"');
    for (i, o) in a.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if o >= 100 {
            out.push(b'0' + o / 100);
        }
        if o >= 10 {
            out.push(b'0' + o / 10 % 10);
        }
        out.push(b'0' + o % 10);
    }
    out.push(b'"');
}

fn serde_<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> serde_json::Result<()> {
    serde_json::to_writer(out, v)
}

#[cfg(test)]
mod tests;
