//! tc ingress/egress observers for workload, tunnel and host interfaces.
use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use tracer_common::{
    CachedFlow, ConvKey, Direction, EmitReason, Encapsulation, FlowKey, FlowState, PacketEvent,
    RecordKind, Tuple, CACHE_CLEAN, CACHE_DIRTY, CACHE_EMPTY, PROTO_TCP, STAT_LOST, STAT_MALFORMED,
    STAT_PACKETS, STAT_RB_PENDING, STAT_RECORDS, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    maps::{count, set, summary_interval_ns, EVENTS, FLOWS, FLOW_CACHE, SCRATCH, TURNS},
    parse::{parse, Outcome},
};

/// What every program returns, on every path: TCX_NEXT under TCX and TC_ACT_UNSPEC under a
/// clsact filter (both -1). Anything else ends the chain: tcx_run stops at the first program
/// that does not return TCX_NEXT, and tcf_classify stops at the first filter that returns a
/// verdict >= 0 (TC_ACT_PIPE included), so a CNI's or another observer's program after ours
/// would never run. The packet's fate stays with whoever runs after us.
pub const PASS_ON: i32 = tracer_common::TC_PASS_ON;

#[classifier]
pub fn tracer_tc_ingress(ctx: TcContext) -> i32 {
    observe::<false>(&ctx, Direction::Ingress);
    PASS_ON
}

#[classifier]
pub fn tracer_tc_egress(ctx: TcContext) -> i32 {
    observe::<false>(&ctx, Direction::Egress);
    PASS_ON
}

/// For devices whose frames start at the IP header (tunl0, wireguard.cali).
#[classifier]
pub fn tracer_tc_l3_ingress(ctx: TcContext) -> i32 {
    observe::<true>(&ctx, Direction::Ingress);
    PASS_ON
}

#[classifier]
pub fn tracer_tc_l3_egress(ctx: TcContext) -> i32 {
    observe::<true>(&ctx, Direction::Egress);
    PASS_ON
}

#[inline(always)]
fn observe<const L3: bool>(ctx: &TcContext, dir: Direction) {
    count(STAT_PACKETS);
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // Per-CPU slot: a tc program runs to completion before the packet moves on (a tunnel's
    // nested transmit starts only after we return), so nothing else uses it meanwhile.
    let p = unsafe { &mut *p };
    match parse(ctx, L3, p) {
        Ok(()) => {}
        Err(Outcome::Bad(_)) => {
            count(STAT_MALFORMED);
            return;
        }
        Err(Outcome::Skip(_)) => return,
    };
    // Summarise on the innermost packet: that is the flow an operator asks about.
    let t: &Tuple = if p.encap != Encapsulation::None as u8 {
        &p.inner
    } else {
        &p.outer
    };
    let key = FlowKey {
        src: t.src,
        dst: t.dst,
        sport: t.sport,
        dport: t.dport,
        ifindex,
        proto: t.proto,
        dir: dir as u8,
        encap: p.encap,
        _pad: 0,
    };
    // The coarse clock (a tick's resolution) is enough to pace summaries and costs a fraction of
    // the precise one, which only emitted records pay for.
    let coarse = unsafe { bpf_ktime_get_coarse_ns() };
    let len = ctx.len();
    let seq_end = t.seq.wrapping_add(t.payload_len as u32);

    // Turns are tracked on TCP payload packets, whatever else decides to emit, so the state
    // stays current.
    let payload = t.proto == PROTO_TCP && t.payload_len > 0;

    let pk = Pkt {
        t,
        ifindex,
        coarse,
        len,
        seq_end,
        payload,
    };
    let Some(slot) = FLOW_CACHE.get_ptr_mut(key.cache_slot()) else {
        return;
    };
    // Per-CPU slot, and nothing else runs on this CPU until we return (as SCRATCH).
    let (emit, pkts, bytes) = summarise(unsafe { &mut *slot }, &key, &pk);
    let Some(emit) = emit else {
        return;
    };
    p.ts_ns = unsafe { bpf_ktime_get_ns() };
    p.bytes = bytes;
    p.ifindex = ifindex;
    p.len = len;
    p.pkts = pkts;
    p.dir = dir as u8;
    p.emit = emit as u8;
    p.kind = RecordKind::Packet as u8;
    p.drop_reason = 0;
    p.location = 0;
    if EVENTS.output::<PacketEvent>(&*p, 0).is_err() {
        count(STAT_LOST);
        return;
    }
    count(STAT_RECORDS);
    set(STAT_RB_PENDING, EVENTS.query(BPF_RB_AVAIL_DATA));
}

/// What one packet brings to its flow's summary.
struct Pkt<'a> {
    t: &'a Tuple,
    ifindex: u32,
    coarse: u64,
    len: u32,
    seq_end: u32,
    /// TCP payload: turns are tracked on these.
    payload: bool,
}

/// Counts the packet into its flow's state, through this CPU's cache slot for the key; returns
/// whether to emit a record, and the packets and bytes it reports.
#[inline(always)]
fn summarise(c: &mut CachedFlow, key: &FlowKey, pk: &Pkt) -> (Option<EmitReason>, u32, u64) {
    if c.held == CACHE_EMPTY || !same_key(&c.key, key) {
        // The slot goes to this flow: the one it held first hands its changes back to FLOWS.
        if c.held == CACHE_DIRTY {
            hand_back(c);
        }
        match FLOWS.get_ptr_mut(key) {
            None => {
                if pk.payload {
                    // Records the side; the first record is emitted anyway.
                    is_turn(pk.t, pk.ifindex);
                }
                let st = FlowState {
                    last_emit_ns: pk.coarse,
                    bytes: 0,
                    pkts: 0,
                    seq_end: pk.seq_end,
                    turn_ack: pk.t.ack,
                    _pad: 0,
                };
                let _ = FLOWS.insert(key, &st, 0);
                c.key = *key;
                c.st = st;
                c.held = CACHE_CLEAN;
                return (Some(EmitReason::First), 1, pk.len as u64);
            }
            Some(st) => {
                // The slot takes over the counts FLOWS has not reported: whoever reports them
                // next is this slot, so no other CPU's record repeats them.
                let st = unsafe { &mut *st };
                c.key = *key;
                c.st = *st;
                st.pkts = 0;
                st.bytes = 0;
            }
        }
    }
    c.held = CACHE_DIRTY;
    step(&mut c.st, pk)
}

/// A known flow's packet: counters, retransmission, turn and pacing of its records.
#[inline(always)]
fn step(st: &mut FlowState, pk: &Pkt) -> (Option<EmitReason>, u32, u64) {
    let t = pk.t;
    // Racy across CPUs by design: these are counters for a summary, not accounting.
    // The peer's payload moves this side's acknowledgment on; while it stays put (bulk transfer
    // one way) no turn can have happened, and the turn map is left alone.
    let turn = pk.payload && t.ack != st.turn_ack && is_turn(t, pk.ifindex);
    if pk.payload {
        st.turn_ack = t.ack;
    }
    let pkts = st.pkts + 1;
    let bytes = st.bytes + pk.len as u64;
    let mut emit = None;
    if t.proto == PROTO_TCP {
        if t.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
            emit = Some(EmitReason::TcpControl);
        } else if t.payload_len > 0 && !seq_after(pk.seq_end, st.seq_end) {
            emit = Some(EmitReason::Retransmit);
        }
        if seq_after(pk.seq_end, st.seq_end) {
            st.seq_end = pk.seq_end;
        }
    }
    if emit.is_none() && turn {
        emit = Some(EmitReason::Turn);
    }
    if emit.is_none() && pk.coarse.wrapping_sub(st.last_emit_ns) >= summary_interval_ns() {
        emit = Some(EmitReason::Periodic);
    }
    if emit.is_none() {
        st.pkts = pkts;
        st.bytes = bytes;
    } else {
        st.pkts = 0;
        st.bytes = 0;
        st.last_emit_ns = pk.coarse;
    }
    (emit, pkts, bytes)
}

/// Folds a slot's changes into the flow's FLOWS entry: the counts it has not reported, and the
/// newest sequence end, acknowledgment and record time. A flow busy in a slot never touches its
/// FLOWS entry, so LRU pressure may have evicted it: the slot's state goes back whole, and the
/// flow stays known (no second first record, no counts lost). The agent empties the slots of an
/// interface before it purges the interface's FLOWS entries, so this never brings one back.
#[inline(always)]
fn hand_back(c: &CachedFlow) {
    let Some(st) = FLOWS.get_ptr_mut(&c.key) else {
        let _ = FLOWS.insert(&c.key, &c.st, 0);
        return;
    };
    let st = unsafe { &mut *st };
    st.pkts = st.pkts.wrapping_add(c.st.pkts);
    st.bytes = st.bytes.wrapping_add(c.st.bytes);
    if seq_after(c.st.seq_end, st.seq_end) {
        st.seq_end = c.st.seq_end;
    }
    st.turn_ack = c.st.turn_ack;
    if (c.st.last_emit_ns.wrapping_sub(st.last_emit_ns) as i64) > 0 {
        st.last_emit_ns = c.st.last_emit_ns;
    }
}

/// Whether sequence number `a` lies after `b` (serial number arithmetic: across wrap-around).
#[inline(always)]
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Key equality as 11 words folded into one test: no branch per field, no memcmp loop.
#[inline(always)]
fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    const WORDS: usize = core::mem::size_of::<FlowKey>() / 4;
    // SAFETY: FlowKey is 44 bytes of plain data (its padding byte is always written as 0),
    // 4-byte aligned.
    let (a, b) = unsafe {
        (
            &*(a as *const FlowKey as *const [u32; WORDS]),
            &*(b as *const FlowKey as *const [u32; WORDS]),
        )
    };
    let mut d = 0;
    for i in 0..WORDS {
        d |= a[i] ^ b[i];
    }
    d == 0
}

/// `bpf_ringbuf_query` flag: bytes written and not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Records which side sent this payload; true when it differs from the previous payload's side.
#[inline(always)]
fn is_turn(t: &Tuple, ifindex: u32) -> bool {
    // Order endpoints so both directions map to one key. Any fixed order will do: compared as
    // words (a byte-array comparison becomes a memcmp loop in BPF).
    let word = |a: &[u8; 16], port: u16| {
        let hi = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
        let lo = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
        (hi, lo, port)
    };
    let src_first = word(&t.src, t.sport) <= word(&t.dst, t.dport);
    let (a, a_port, b, b_port, side) = if src_first {
        (t.src, t.sport, t.dst, t.dport, 0u8)
    } else {
        (t.dst, t.dport, t.src, t.sport, 1u8)
    };
    let key = ConvKey {
        a,
        b,
        a_port,
        b_port,
        ifindex,
    };
    match TURNS.get_ptr_mut(&key) {
        Some(last) => {
            let last = unsafe { &mut *last };
            if *last == side {
                false
            } else {
                *last = side;
                true
            }
        }
        None => {
            let _ = TURNS.insert(&key, &side, 0);
            true
        }
    }
}
