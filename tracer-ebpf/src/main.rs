//! tracer's kernel side: observe-only tc programs on Calico's interfaces.
//!
//! Every tc program returns `TC_PASS_ON` (TCX_NEXT / TC_ACT_UNSPEC) whatever happens: tracer
//! never drops, redirects or rewrites a packet, and never ends another program's chain. Records go to one ring buffer; per-flow state in an LRU map keeps a bulk
//! flow from emitting a record per packet.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; nothing is ever executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
