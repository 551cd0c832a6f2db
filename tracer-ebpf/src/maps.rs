//! Maps shared by the probes. Names must match `tracer_common::*_MAP`.
use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    CachedFlow, ConvKey, DropConf, FlowKey, FlowState, PacketEvent, FLOW_CACHE_SLOTS, STAT_COUNT,
};

/// 8 MiB: about 50k records of headroom for the agent to fall behind by.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Per-hook, per-flow summary state; LRU so that idle flows age out without the agent's help.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(65536, 0);

/// A CPU's slots in front of FLOWS (see `CachedFlow`): a per-CPU array element is found without
/// hashing (the verifier inlines the lookup), which is most of what a known flow's packet costs
/// otherwise. Per-CPU, so a slot has one writer and needs no lock.
#[map(name = "FLOW_CACHE")]
pub static FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// Which side of a TCP connection sent payload last (0: a->b, 1: b->a), per interface: a change
/// is a request/response turn, which the agent needs to time exchanges.
#[map(name = "TURNS")]
pub static TURNS: LruHashMap<ConvKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// Per-CPU scratch record: the BPF stack (512 bytes) cannot hold a record plus the parser's state.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<PacketEvent> = PerCpuArray::with_max_entries(2, 0);

#[map(name = "DROP_CONF")]
pub static DROP_CONF: Array<DropConf> = Array::with_max_entries(1, 0);

/// How often a busy flow re-reports its counters; the agent may override it before load.
#[unsafe(no_mangle)]
static SUMMARY_INTERVAL_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn summary_interval_ns() -> u64 {
    // Volatile so the compiler keeps the load the loader patches instead of folding the default.
    unsafe { core::ptr::read_volatile(&SUMMARY_INTERVAL_NS) }
}

#[inline(always)]
pub fn count(stat: u32) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn set(stat: u32, value: u64) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        unsafe { *p = value };
    }
}
