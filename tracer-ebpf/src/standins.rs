//! Stand-ins for *other* programs that share tracer's tc hooks on a real node: a CNI's eBPF
//! dataplane (Calico eBPF, Cilium), a policy program or another observer. No felix or Cilium
//! runs on the test machines, so the tests and the lab attach these beside tracer's programs to
//! prove coexistence: one after tracer must see every packet, one before tracer that drops or
//! redirects must be obeyed. They are never loaded by the agent.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_redirect, macros::classifier, macros::map, maps::PerCpuArray,
    programs::TcContext,
};

/// Packets each stand-in saw: index 0 pass, 1 drop, 2 redirect.
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
