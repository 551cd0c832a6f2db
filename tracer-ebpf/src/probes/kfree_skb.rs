//! `skb:kfree_skb`: packets the kernel dropped, with its reason.
//!
//! Record and `sk_buff` layouts differ between kernels, so every offset comes from the agent
//! (tracefs format file and BTF) through DROP_CONF rather than being compiled in.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    Direction, EmitReason, Encapsulation, Family, PacketEvent, RecordKind, STAT_DROPS, STAT_LOST,
    STAT_RECORDS,
};

use crate::{
    maps::{count, DROP_CONF, EVENTS, SCRATCH},
    parse::{l3l4, Kernel},
};

/// The drop program's own scratch slot: it can fire while a tc program holds slot 0.
const SCRATCH_DROP: u32 = 1;

#[tracepoint]
pub fn tracer_kfree_skb(ctx: TracePointContext) -> u32 {
    let _ = observe_drop(&ctx);
    0
}

#[inline(always)]
fn read<T>(addr: u64) -> Result<T, ()> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| ())
}

#[inline(always)]
fn observe_drop(ctx: &TracePointContext) -> Result<(), ()> {
    let conf = match DROP_CONF.get(0) {
        Some(c) if c.enabled != 0 => *c,
        _ => return Ok(()),
    };
    let reason: u32 = unsafe { ctx.read_at(conf.tp_reason as usize) }.map_err(|_| ())?;
    if reason < conf.min_reason {
        return Ok(());
    }
    if reason < 256 && conf.ignore[(reason / 64) as usize & 3] & (1u64 << (reason % 64)) != 0 {
        return Ok(());
    }
    let proto: u16 = unsafe { ctx.read_at(conf.tp_protocol as usize) }.map_err(|_| ())?;
    // The tracepoint stores ntohs(skb->protocol): already host order.
    let family = match proto {
        0x0800 => Family::V4,
        0x86dd => Family::V6,
        _ => return Ok(()),
    };
    let skb: u64 = unsafe { ctx.read_at(conf.tp_skbaddr as usize) }.map_err(|_| ())?;
    let location: u64 = unsafe { ctx.read_at(conf.tp_location as usize) }.map_err(|_| ())?;
    let head: u64 = read(skb + conf.skb_head as u64)?;
    let network_header: u16 = read(skb + conf.skb_network_header as u64)?;
    // 0xffff means "not set" in the kernel.
    if head == 0 || network_header == 0xffff {
        return Ok(());
    }
    let dev: u64 = read(skb + conf.skb_dev as u64).unwrap_or(0);
    if conf.netns_inum != 0 {
        // The namespace of the device, or of the socket for drops after the device let go.
        let net: u64 = if dev != 0 {
            read(dev + conf.dev_nd_net as u64).unwrap_or(0)
        } else {
            let sk: u64 = read(skb + conf.skb_sk as u64).unwrap_or(0);
            if sk != 0 {
                read(sk + conf.sk_net as u64).unwrap_or(0)
            } else {
                0
            }
        };
        if net == 0 {
            return Ok(());
        }
        let inum: u32 = read(net + conf.net_inum as u64)?;
        if inum != conf.netns_inum {
            return Ok(());
        }
    }
    // Counted here: this namespace's IP drops, whether or not a flow claims them.
    count(STAT_DROPS);
    let ifindex: u32 = if dev != 0 {
        read(dev + conf.dev_ifindex as u64).unwrap_or(0)
    } else {
        0
    };

    let Some(p) = SCRATCH.get_ptr_mut(SCRATCH_DROP) else {
        return Ok(());
    };
    let p = unsafe { &mut *p };
    crate::parse::clear(&mut p.outer);
    crate::parse::clear(&mut p.inner);
    let src = Kernel(head + network_header as u64);
    if l3l4(&src, 0, family, &mut p.outer).is_err() {
        return Ok(());
    }
    p.ts_ns = unsafe { bpf_ktime_get_ns() };
    p.bytes = 0;
    p.ifindex = ifindex;
    p.len = 0;
    p.pkts = 1;
    p.vni = 0;
    p.dir = Direction::Ingress as u8;
    p.encap = Encapsulation::None as u8;
    p.emit = EmitReason::First as u8;
    p.kind = RecordKind::Drop as u8;
    p.drop_reason = reason;
    p.location = location;
    if EVENTS.output::<PacketEvent>(&*p, 0).is_err() {
        count(STAT_LOST);
        return Ok(());
    }
    count(STAT_RECORDS);
    Ok(())
}
