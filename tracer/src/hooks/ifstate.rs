//! Kernel state keyed by interface: the per-hook flow summaries (FLOWS) and request/response
//! turns (TURNS). Both are LRU maps, so they are bounded, but an entry of an interface tracer no
//! longer observes (deleted with its pod, or detached on request) would stay until LRU pressure
//! pushed it out: on a node that churns pods the maps fill with the dead. The agent removes them
//! when it lets go of an interface, so the kernel side too holds only what exists now.
use std::mem::{offset_of, size_of};

use aya::maps::{HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues};
use tracer_common::{
    CachedFlow, ConvKey, FlowKey, FlowState, FLOWS_MAP as FLOWS, FLOW_CACHE_MAP as FLOW_CACHE,
    TURNS_MAP as TURNS,
};

use super::{HookError, Hooks};

/// Entries removed by one purge, per map.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub flows: u64,
    pub turns: u64,
    /// Entries looked at (both maps).
    pub scanned: u64,
    /// Per-CPU cache slots emptied (FLOW_CACHE).
    pub cached: u64,
}

impl Hooks {
    /// Removes the kernel entries of every interface that is not attached now. One pass over
    /// each map's keys (a syscall per entry: ~1 µs each, so milliseconds for the thousands of
    /// entries a busy node has), whatever the number of interfaces let go since the last one.
    pub fn purge_unattached(&mut self) -> Result<Purged, HookError> {
        let attached = &self.attached;
        let keep = |ifindex: u32| attached.contains_key(&ifindex);
        let mut purged = Purged::default();
        // Keys and values as bytes of the right sizes: only the key's ifindex is read.
        const FLOW_KEY: usize = size_of::<FlowKey>();
        const FLOW_STATE: usize = size_of::<FlowState>();
        const CONV_KEY: usize = size_of::<ConvKey>();
        // The cache first: a slot handed back to FLOWS re-creates its entry there, so a dead
        // interface's slot emptied after the FLOWS walk could leave an entry behind. Emptied
        // first, the walk below removes whatever a slot handed back meanwhile.
        if let Some(map) = self.ebpf.map_mut(FLOW_CACHE) {
            const SLOT: usize = size_of::<CachedFlow>();
            let mut m: PerCpuArray<&mut MapData, [u8; SLOT]> = PerCpuArray::try_from(map)?;
            purged.cached = empty_slots(&mut m, offset_of!(CachedFlow, key.ifindex), keep)?;
        }
        if let Some(map) = self.ebpf.map_mut(FLOWS) {
            let mut m: HashMap<&mut MapData, [u8; FLOW_KEY], [u8; FLOW_STATE]> =
                HashMap::try_from(map)?;
            let (scanned, removed) = purge(&mut m, offset_of!(FlowKey, ifindex), keep)?;
            purged.flows = removed;
            purged.scanned += scanned;
        }
        if let Some(map) = self.ebpf.map_mut(TURNS) {
            let mut m: HashMap<&mut MapData, [u8; CONV_KEY], u8> = HashMap::try_from(map)?;
            let (scanned, removed) = purge(&mut m, offset_of!(ConvKey, ifindex), keep)?;
            purged.turns = removed;
            purged.scanned += scanned;
        }
        Ok(purged)
    }
}

/// Empties the per-CPU cache slots whose key holds, at byte `at`, an ifindex `keep` rejects (a
/// slot whose interface is gone would otherwise carry the old flow's state into a new one that
/// reuses the ifindex); returns the slots emptied. The write covers every CPU's value of the
/// slot, and a CPU may change its value between the read and the write: then the counts of that
/// moment are lost or reported twice, as with the kernel's own races (a summary, not accounting).
/// Only slots where some CPU holds a dead interface are written, and only when interfaces go.
fn empty_slots<const N: usize>(
    m: &mut PerCpuArray<&mut MapData, [u8; N]>,
    at: usize,
    keep: impl Fn(u32) -> bool,
) -> Result<u64, MapError> {
    let dead = |slot: &[u8; N]| {
        slot.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            // An empty slot is all zeros: ifindex 0 is no interface.
            .is_some_and(|i| i != 0 && !keep(i))
    };
    let mut emptied = 0;
    for index in 0..m.len() {
        let values = m.get(&index, 0)?;
        if !values.iter().any(dead) {
            continue;
        }
        let slots: Vec<[u8; N]> = values
            .iter()
            .map(|v| {
                if dead(v) {
                    emptied += 1;
                    [0; N]
                } else {
                    *v
                }
            })
            .collect();
        m.set(index, PerCpuValues::try_from(slots)?, 0)?;
    }
    Ok(emptied)
}

/// Removes the entries of `m` whose key holds, at byte `at`, an ifindex `keep` rejects; returns
/// (keys scanned, entries removed).
fn purge<const K: usize, V: aya::Pod>(
    m: &mut HashMap<&mut MapData, [u8; K], V>,
    at: usize,
    keep: impl Fn(u32) -> bool,
) -> Result<(u64, u64), MapError> {
    let ifindex_of = |key: &[u8; K]| {
        key.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    // While the programs run, LRU eviction can remove the key the walk stands on, and the
    // kernel then restarts the walk from the first key: bound it by twice the map's size.
    let limit = m
        .map()
        .info()
        .map(|i| u64::from(i.max_entries()) * 2)
        .unwrap_or(1 << 21);
    let mut dead = Vec::new();
    let mut scanned = 0u64;
    for key in m.keys() {
        let key = key?;
        scanned += 1;
        if ifindex_of(&key).is_some_and(|i| !keep(i)) {
            dead.push(key);
        }
        if scanned >= limit {
            break;
        }
    }
    dead.sort_unstable();
    dead.dedup();
    let mut removed = 0;
    for key in &dead {
        match m.remove(key) {
            Ok(()) => removed += 1,
            // Evicted meanwhile: gone all the same.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((scanned, removed))
}
