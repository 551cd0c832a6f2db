//! The `skb:kfree_skb` tracepoint: kernel drops with their reason.
//!
//! Offsets of the tracepoint record come from its tracefs format file and `sk_buff` offsets from
//! BTF, both read at runtime: they differ between kernels. So do the reason numbers, whose names
//! come from the same format file's `__print_symbolic` table.
use std::collections::HashMap;

use aya::{
    maps::{Array, MapData},
    programs::TracePoint,
    Ebpf,
};
use tracer_common::{DropConf, DROP_CONF_MAP, PROG_KFREE_SKB};

use super::HookError;
use crate::{btf::Btf, kernel_names::DropReasons};

const TRACEFS_CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// Reasons up to NOT_SPECIFIED (not dropped yet, consumed, unspecified) are routine frees, not
/// drops worth reporting. Their numbers move between kernels (SKB_CONSUMED arrived in 6.2, so
/// NO_SOCKET is 2 on 6.1 and 3 later): the threshold comes from the format's table, this is the
/// fallback for a table without NOT_SPECIFIED.
const MIN_REASON: u32 = 3;
/// Reasons that are socket housekeeping or duplicates, not a packet lost on its path: a closing
/// socket purges its queues, a capture filter rejects its copy, TCP discards data it already has.
const ROUTINE_REASONS: &[&str] = &[
    "SOCKET_CLOSE",
    "QUEUE_PURGE",
    "TCP_CLOSE",
    "UNIX_DISCONNECT",
    "UNIX_SKIP_OOB",
    "SOCKET_FILTER",
    "TAP_FILTER",
    "TAP_TXFILTER",
    "TCP_OLD_DATA",
    "TCP_OLD_ACK",
    "TCP_TOO_OLD_ACK",
    "TCP_OFOMERGE",
    "TCP_OLD_SEQUENCE",
    // Data arriving for a socket its application already closed: BGP speakers dialling each
    // other at once abort one of the two connections this way, every time.
    "TCP_ABORT_ON_DATA",
];

/// Which network namespace's drops to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsFilter {
    /// The agent's own (a node agent answers for its node).
    Current,
    /// The namespace with this inode number (`stat -L -c %i /proc/<pid>/ns/net`).
    Inode(u32),
    /// Every namespace.
    Any,
}

impl NetnsFilter {
    fn inode(self) -> Result<u32, DropError> {
        use std::os::unix::fs::MetadataExt;
        match self {
            NetnsFilter::Any => Ok(0),
            NetnsFilter::Inode(i) => Ok(i),
            NetnsFilter::Current => std::fs::metadata("/proc/self/ns/net")
                .map(|m| m.ino() as u32)
                .map_err(|e| DropError::Format(format!("/proc/self/ns/net: {e}"))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("tracefs is not mounted (looked in {0}); mount it with `mount -t tracefs tracefs /sys/kernel/tracing`")]
    NoTracefs(String),
    #[error("reading the kfree_skb format: {0}")]
    Format(String),
    #[error(
        "this kernel's skb:kfree_skb tracepoint has no drop reason (Linux 5.17 or later has it); \
         packet paths are traced, kernel drops are not reported"
    )]
    NoReasons,
    #[error("BTF: {0}")]
    Btf(#[from] crate::btf::BtfError),
}

/// The lowest reason worth reporting: the one after NOT_SPECIFIED.
fn min_reason(reasons: &DropReasons) -> u32 {
    reasons
        .iter()
        .find(|(_, name)| *name == "NOT_SPECIFIED")
        .map(|(n, _)| n + 1)
        .unwrap_or(MIN_REASON)
}

/// The kernel-side bitmap of reasons to ignore.
fn routine_bitmap(reasons: &DropReasons) -> [u64; 4] {
    let mut bits = [0u64; 4];
    for (n, name) in reasons.iter() {
        if n < 256 && ROUTINE_REASONS.contains(&name) {
            bits[(n / 64) as usize] |= 1 << (n % 64);
        }
    }
    bits
}

/// Tracepoint field offsets from a tracefs `format` file.
pub fn field_offsets(format: &str) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for line in format.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(o) = part.strip_prefix("offset:") {
                offset = o.trim().parse::<u32>().ok();
            } else if decl.is_none() && !part.is_empty() {
                decl = part
                    .split_whitespace()
                    .last()
                    .map(|n| n.trim_start_matches('*').to_string());
            }
        }
        if let (Some(d), Some(o)) = (decl, offset) {
            out.insert(d, o);
        }
    }
    out
}

fn tracefs() -> Result<&'static str, DropError> {
    let find = || {
        TRACEFS_CANDIDATES
            .iter()
            .copied()
            .find(|p| std::path::Path::new(p).join("events").is_dir())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    // Not mounted in our mount namespace (`ip netns exec` remounts /sys, hiding it; so does a
    // container without the host mount): mount our own view, which is harmless if it fails.
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid NUL-terminated strings; a failure only leaves tracefs unmounted.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "mounting tracefs");
    }
    find().ok_or_else(|| DropError::NoTracefs(TRACEFS_CANDIDATES.join(", ")))
}

/// Kernels before 5.17 (5.15 LTS among them) free skbs without a reason: say so, rather than
/// "no field reason", since nothing short of a newer kernel fixes it.
fn check_has_reason(fields: &HashMap<String, u32>) -> Result<(), DropError> {
    if fields.contains_key("reason") {
        Ok(())
    } else {
        Err(DropError::NoReasons)
    }
}

/// Reads offsets, configures the kernel program and attaches it.
pub fn enable(ebpf: &mut Ebpf, netns: NetnsFilter) -> Result<DropReasons, HookError> {
    let root = tracefs().map_err(HookError::Drops)?;
    let path = format!("{root}/events/skb/kfree_skb/format");
    let format = std::fs::read_to_string(&path)
        .map_err(|e| HookError::Drops(DropError::Format(format!("{path}: {e}"))))?;
    let fields = field_offsets(&format);
    check_has_reason(&fields).map_err(HookError::Drops)?;
    let field = |n: &str| {
        fields
            .get(n)
            .copied()
            .ok_or_else(|| HookError::Drops(DropError::Format(format!("no field {n} in {path}"))))
    };
    let btf = Btf::from_sys_fs().map_err(|e| HookError::Drops(e.into()))?;
    let off = |s: &str, m: &str| {
        btf.member_offset(s, m)
            .map_err(|e| HookError::Drops(e.into()))
    };
    let reasons = DropReasons::from_format(&format);
    let conf = DropConf {
        enabled: 1,
        min_reason: min_reason(&reasons),
        tp_skbaddr: field("skbaddr")?,
        tp_location: field("location")?,
        tp_protocol: field("protocol")?,
        tp_reason: field("reason")?,
        skb_head: off("sk_buff", "head")?,
        skb_network_header: off("sk_buff", "network_header")?,
        skb_dev: off("sk_buff", "dev")?,
        dev_ifindex: off("net_device", "ifindex")?,
        ignore: routine_bitmap(&reasons),
        netns_inum: netns.inode().map_err(HookError::Drops)?,
        skb_sk: off("sk_buff", "sk")?,
        sk_net: off("sock_common", "skc_net")?,
        // possible_net_t is a one-member struct: its `net` pointer sits at its start.
        dev_nd_net: off("net_device", "nd_net")?,
        net_inum: off("net", "ns")? + off("ns_common", "inum")?,
    };
    let map = ebpf
        .map_mut(DROP_CONF_MAP)
        .ok_or(HookError::MissingMap(DROP_CONF_MAP))?;
    let mut arr: Array<&mut MapData, DropConf> = Array::try_from(map)?;
    arr.set(0, conf, 0)?;
    let prog: &mut TracePoint = ebpf
        .program_mut(PROG_KFREE_SKB)
        .ok_or(HookError::MissingProgram(PROG_KFREE_SKB))?
        .try_into()?;
    prog.load()?;
    prog.attach("skb", "kfree_skb")?;
    Ok(reasons)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: kfree_skb\nID: 2310\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\n\
print fmt: \"skbaddr=%p reason: %s\", REC->skbaddr, __print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 12, \"NETFILTER_DROP\" }, { 16, \"IP_RPFILTER\" })\n";

    #[test]
    fn parses_format_offsets_and_reason_names() {
        let f = field_offsets(FORMAT);
        assert_eq!(f.get("skbaddr"), Some(&8));
        assert_eq!(f.get("location"), Some(&16));
        assert_eq!(f.get("protocol"), Some(&32));
        assert_eq!(f.get("reason"), Some(&36));
        let r = DropReasons::from_format(FORMAT);
        assert_eq!(min_reason(&r), 3);
        assert_eq!(r.name(12), "NETFILTER_DROP");
        assert_eq!(r.name(16), "IP_RPFILTER");
        assert_eq!(r.name(999), "REASON_999");
        let fmt = FORMAT.replace(
            "{ 16, \"IP_RPFILTER\" }",
            "{ 16, \"IP_RPFILTER\" }, { 104, \"QUEUE_PURGE\" }",
        );
        let bits = routine_bitmap(&DropReasons::from_format(&fmt));
        assert_eq!(bits, [0, 1 << (104 - 64), 0, 0]);
        assert!(field_offsets("garbage\nfield:;;;\n").is_empty());
        // 6.1 (Debian 12) has no SKB_CONSUMED: NO_SOCKET is 2 there and must still be reported.
        let v6_1 = DropReasons::from_format(
            "__print_symbolic(REC->reason, { 1, \"NOT_SPECIFIED\" }, { 2, \"NO_SOCKET\" })",
        );
        assert_eq!((min_reason(&v6_1), v6_1.name(2).as_str()), (2, "NO_SOCKET"));
        assert_eq!(min_reason(&DropReasons::default()), MIN_REASON);
        assert_eq!(
            DropReasons::from_format("__print_symbolic({ x, y").name(1),
            "REASON_1"
        );
    }

    #[test]
    fn kernel_without_drop_reasons_is_named() {
        // 5.15's format: the same record without `reason`.
        let v5_15: String = FORMAT
            .lines()
            .filter(|l| !l.contains("reason;"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = check_has_reason(&field_offsets(&v5_15));
        assert!(
            e.as_ref().is_err_and(|e| e.to_string().contains("5.17")),
            "{e:?}"
        );
        assert!(check_has_reason(&field_offsets(FORMAT)).is_ok());
    }

    #[test]
    fn running_kernel_names_netfilter_drop() -> Result<(), String> {
        let root = tracefs().map_err(|e| e.to_string())?;
        let fmt = std::fs::read_to_string(format!("{root}/events/skb/kfree_skb/format"))
            .map_err(|e| e.to_string())?;
        let r = DropReasons::from_format(&fmt);
        let nf = (0..200).find(|i| r.name(*i) == "NETFILTER_DROP");
        assert!(nf.is_some(), "NETFILTER_DROP missing from {fmt}");
        // The first reason reported is a real drop on every kernel (its number is not).
        assert_eq!(r.name(min_reason(&r)), "NO_SOCKET", "{fmt}");
        Ok(())
    }
}
