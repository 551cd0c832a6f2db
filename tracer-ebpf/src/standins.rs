//! Stand-ins for *other* programs that share tracer's tc hooks on a real node: a CNI's eBPF
//! dataplane (Calico eBPF, Cilium), a policy program or another observer. No felix or Cilium
//! runs on the test machines, so the tests and the lab attach these beside tracer's programs to
//! prove coexistence: one after tracer must see every packet, one before tracer that drops or
//! redirects must be obeyed. They are never loaded by the agent.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::classifier,
    macros::map,
    maps::{HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};

/// Packets each stand-in saw: index 0 pass, 1 drop, 2 redirect, 3 rewritten.
#[map(name = "STANDIN_SEEN")]
static SEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

/// Where `standin_redirect` sends packets (egress of that ifindex); set before load.
#[unsafe(no_mangle)]
static REDIRECT_IFINDEX: u32 = 0;

const TC_ACT_SHOT: i32 = 2;
/// TCX_NEXT / TC_ACT_UNSPEC.
const PASS_ON: i32 = -1;

#[inline(always)]
fn seen(i: u32) {
    if let Some(p) = SEEN.get_ptr_mut(i) {
        unsafe { *p += 1 };
    }
}

/// Counts and hands the packet on, like an observer or a policy program that allows it.
#[classifier]
pub fn standin_pass(_ctx: TcContext) -> i32 {
    seen(0);
    PASS_ON
}

/// Drops every packet, like a policy program that denies it.
#[classifier]
pub fn standin_drop(_ctx: TcContext) -> i32 {
    seen(1);
    TC_ACT_SHOT
}

/// Redirects every packet to another device's egress, as felix's eBPF programs do to skip
/// the host stack.
#[classifier]
pub fn standin_redirect(_ctx: TcContext) -> i32 {
    seen(2);
    let ifindex = unsafe { core::ptr::read_volatile(&REDIRECT_IFINDEX) };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// The address `standin_snat` / `standin_dnat` write (network byte order); set before load.
#[unsafe(no_mangle)]
static REWRITE_V4: u32 = 0;

const ETH_HLEN: usize = 14;
/// Offsets in the IPv4 header.
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;

/// Rewrites an IPv4 address field and the header checksum, as a NAT program does (only the
/// IP header: enough for ICMP, whose checksum does not cover addresses).
#[inline(always)]
fn rewrite(ctx: &mut TcContext, field: usize) -> i32 {
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
        return PASS_ON;
    };
    if ethertype != [0x08, 0x00] {
        return PASS_ON;
    }
    let to = unsafe { core::ptr::read_volatile(&REWRITE_V4) };
    let Ok(from) = ctx.load::<u32>(field) else {
        return PASS_ON;
    };
    if ctx.store(field, &to, 0).is_err() {
        return PASS_ON;
    }
    let _ = ctx.l3_csum_replace(IP_CSUM, from as u64, to as u64, 4);
    seen(3);
    PASS_ON
}

/// Rewrites the source address of leaving packets, like felix's eBPF SNAT on a host NIC.
#[classifier]
pub fn standin_snat(mut ctx: TcContext) -> i32 {
    rewrite(&mut ctx, IP_SRC)
}

/// Rewrites the destination of arriving packets, like felix's eBPF DNAT at a pod's veth.
#[classifier]
pub fn standin_dnat(mut ctx: TcContext) -> i32 {
    rewrite(&mut ctx, IP_DST)
}

/// STAND-IN for felix's routes map, under felix's name and with its layout (`cali_rt_key`
/// `{u32 prefixlen; be32 addr}`, `cali_rt` `{u32 flags; be32 next_hop}`;
/// felix/bpf-gpl/routes.h). Tests pin it where the agent looks for felix's pins (a bpffs they
/// mount themselves); nothing reads it.
#[map(name = "cali_v4_routes")]
static CALI_V4_ROUTES: LpmTrie<u32, [u32; 2]> = LpmTrie::with_max_entries(16, 0);

/// STAND-IN for felix's rule counters, under felix's pinned name and with its layout (per-CPU
/// hash, key u64 rule id, value u64 packets; felix/bpf-gpl/rule_counters.h `cali_rule_ctrs`
/// version 2). Tests pin it where the agent looks for felix's pins.
#[map(name = "cali_rule_ctrs2")]
static CALI_RULE_CTRS: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(10000, 0);

/// The stand-in's policy (`FELIX_ACTION` 3), written by the test: IPv4 source (network byte
/// order) -> `[rule id, 1 to drop / 0 to allow]`. The ids are what felix computes for the
/// policy the test wrote to the datastore; the agent computes its own from the datastore.
#[map(name = "STANDIN_POLICY")]
static STANDIN_POLICY: HashMap<u32, [u64; 2]> = HashMap::with_max_entries(16, 0);

/// What `cali_tc_preamble` does: 0 hand on, 1 SNAT (source := `REWRITE_V4`), 2 reverse SNAT
/// (destination := `REWRITE_V4`, destination MAC := `REWRITE_MAC`, then `bpf_redirect_peer`
/// into the pod behind `REDIRECT_IFINDEX`), 3 policy (felix's verdict from `STANDIN_POLICY`:
/// its rule's counter in `cali_rule_ctrs2` moves, as felix's `update_rule_counters` does on
/// the allow path and in `calico_tc_skb_drop`, and a denied packet gets `TC_ACT_SHOT`). 1 and 2 touch only ICMP packets whose rewritten
/// field holds `MATCH_V4` (the IP header checksum is fixed; ICMP's does not cover addresses).
#[unsafe(no_mangle)]
static FELIX_ACTION: u32 = 0;
#[unsafe(no_mangle)]
static MATCH_V4: u32 = 0;
#[unsafe(no_mangle)]
static REWRITE_MAC: [u8; 6] = [0; 6];

const IP_PROTO: usize = ETH_HLEN + 9;
const IPPROTO_ICMP: u8 = 1;

/// STAND-IN for felix's eBPF dataplane, named as felix's per-hook program `cali_tc_preamble`
/// (felix/bpf-gpl/tc_preamble.c; the kernel keeps `cali_tc_preambl`) so that the agent's
/// detection sees felix's name. No felix runs in the tests: this does the felix-style
/// natOutgoing SNAT on a host NIC's egress, its reverse on the NIC's ingress with a redirect
/// past the host stack into the pod (as felix does for replies), or nothing (a pod veth).
#[classifier]
pub fn cali_tc_preamble(mut ctx: TcContext) -> i32 {
    let action = unsafe { core::ptr::read_volatile(&FELIX_ACTION) };
    if action == 0 {
        seen(0);
        return PASS_ON;
    }
    if action == 3 {
        return policy(&ctx);
    }
    // Keeps the map in the object (its pin is the marker the tests want).
    let _ = CALI_V4_ROUTES.get(aya_ebpf::maps::lpm_trie::Key::new(0, 0));
    let field = if action == 1 { IP_SRC } else { IP_DST };
    let want = unsafe { core::ptr::read_volatile(&MATCH_V4) };
    match (
        ctx.load::<[u8; 2]>(12),
        ctx.load::<u8>(IP_PROTO),
        ctx.load::<u32>(field),
    ) {
        (Ok([0x08, 0x00]), Ok(IPPROTO_ICMP), Ok(v)) if v == want => {}
        _ => return PASS_ON,
    }
    rewrite(&mut ctx, field);
    if action != 2 {
        return PASS_ON;
    }
    let mac = unsafe { core::ptr::read_volatile(&REWRITE_MAC) };
    if ctx.store(0, &mac, 0).is_err() {
        return PASS_ON;
    }
    seen(2);
    let ifindex = unsafe { core::ptr::read_volatile(&REDIRECT_IFINDEX) };
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}

/// felix's policy verdict for IPv4 packets by source (`FELIX_ACTION` 3).
#[inline(always)]
fn policy(ctx: &TcContext) -> i32 {
    let (Ok([0x08, 0x00]), Ok(src)) = (ctx.load::<[u8; 2]>(12), ctx.load::<u32>(IP_SRC)) else {
        return PASS_ON;
    };
    let Some(&[id, drop]) = (unsafe { STANDIN_POLICY.get(&src) }) else {
        return PASS_ON;
    };
    match CALI_RULE_CTRS.get_ptr_mut(&id) {
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = CALI_RULE_CTRS.insert(&id, &1, 0);
        }
    }
    if drop != 0 {
        seen(1);
        TC_ACT_SHOT
    } else {
        seen(0);
        PASS_ON
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
