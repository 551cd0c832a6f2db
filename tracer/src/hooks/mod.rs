//! Loading tracer's kernel programs and keeping them attached to the right interfaces.
pub mod drops;
pub mod kernel;
mod tc;

/// Kernel state of interfaces let go of.
pub mod ifstate;

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    Ebpf, EbpfLoader,
};
use tracer_common::{
    EVENTS_MAP, FLOWS_MAP, STATS_MAP, STAT_COUNT, STAT_DROPS, STAT_LOST, STAT_MALFORMED,
    STAT_PACKETS, STAT_RB_PENDING, STAT_RECORDS, SUMMARY_INTERVAL_GLOBAL, TURNS_MAP,
};

use tracer_model::AttachHow;

use crate::{calico::Role, kernel_names::DropReasons, netlink::Link};
pub use kernel::{TcBackend, TcMode};
pub use tc::{StaleFilter, CLSACT_EGRESS_PRIORITY, CLSACT_INGRESS_PRIORITY};

/// What to load and how to attach, beyond the defaults compiled into the object.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// How often a busy flow re-reports its counters; None keeps the object's 1 s.
    pub summary_interval_ns: Option<u64>,
    /// Ring buffer size; None keeps the compiled-in 8 MiB.
    pub ringbuf_bytes: Option<u32>,
    /// Entries of the kernel's per-hook flow and turn maps; None keeps 65,536.
    pub kernel_flow_entries: Option<u32>,
    pub tc_mode: TcMode,
}

/// The object built from tracer-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer.bpf.o"));

/// Stand-ins for *other* programs sharing tracer's hooks (tracer-ebpf/src/standins.rs): a pass-on
/// counter, a dropper and a redirector. For the coexistence tests and the lab; the agent never
/// loads them.
pub static STANDINS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/standins.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "loading the eBPF object: {0} (tracer needs root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("ring buffer size {0} must be a power of two of at least 4096 bytes")]
    RingBufSize(u32),
    #[error("kernel flow map size {0} must be between 1024 and 16777216 entries")]
    FlowEntries(u32),
    #[error("{0}")]
    Kernel(String),
    #[error("kernel drop tracing: {0}")]
    Drops(drops::DropError),
    #[error("attaching to {iface}: {source}")]
    Attach {
        iface: String,
        source: aya::programs::ProgramError,
    },
}

impl HookError {
    /// The kernel (or what the agent may do in it) cannot run the programs: no configuration
    /// change on tracer's side helps, and a restart would fail the same way.
    pub fn is_unsupported_kernel(&self) -> bool {
        matches!(
            self,
            HookError::Kernel(_)
                | HookError::Load(_)
                | HookError::Program(_)
                | HookError::MissingProgram(_)
                | HookError::MissingMap(_)
                | HookError::Map(_)
        )
    }
}

/// An interface tracer observes (wire type of the model).
pub use tracer_model::Attachment as AttachedIface;

/// Kernel-side counters, summed over CPUs (wire type of the model).
pub use tracer_model::health::KernelStats;

/// `--kernel-flow-entries`: entries of each per-hook kernel map.
pub const DEFAULT_KERNEL_FLOW_ENTRIES: u32 = 65_536;
/// `--summary-interval`: how often a busy flow re-reports its counters.
pub const DEFAULT_SUMMARY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Owns the loaded object and the tc attachments.
pub struct Hooks {
    ebpf: Ebpf,
    attached: BTreeMap<u32, (AttachedIface, tc::Links)>,
    /// The leases holding each on-demand attachment; it goes when the last one lets go.
    holders: BTreeMap<u32, BTreeSet<u64>>,
    /// Which programs `test_run` feeds: those for devices without an Ethernet header.
    test_l3: bool,
    backend: TcBackend,
}

/// The kernel's per-CPU counters, readable from anywhere (the API reads them fresh).
pub struct KernelCounters {
    stats: PerCpuArray<MapData, u64>,
    /// The ring buffer's size, when the kernel said.
    ring_bytes: Option<u64>,
}

impl KernelCounters {
    /// The ring buffer's size in bytes, when known.
    pub fn ring_bytes(&self) -> Option<u64> {
        self.ring_bytes
    }

    /// Records the kernel could not hand over (ring buffer full), summed over CPUs: one map
    /// read, cheap enough for the reader to ask after every drain.
    pub fn lost(&self) -> u64 {
        self.stats
            .get(&STAT_LOST, 0)
            .map(|v| v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .unwrap_or(0)
    }

    /// The reader found the ring empty: nothing is pending, whatever the kernel last wrote. The
    /// kernel updates the gauge only when it writes a record, so after a burst it would go on
    /// showing the backlog of the burst's last record.
    pub fn clear_pending(&mut self) {
        let Ok(n) = aya::util::nr_cpus() else {
            return;
        };
        if let Ok(zeros) = aya::maps::PerCpuValues::try_from(vec![0u64; n]) {
            let _ = self.stats.set(STAT_RB_PENDING, zeros, 0);
        }
    }

    pub fn read(&self) -> KernelStats {
        let per_cpu = |i: u32| -> Vec<u64> {
            self.stats
                .get(&i, 0)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default()
        };
        let sum = |i: u32| per_cpu(i).into_iter().fold(0u64, u64::wrapping_add);
        const { assert!(STAT_COUNT == 6) };
        KernelStats {
            packets: sum(STAT_PACKETS),
            records: sum(STAT_RECORDS),
            lost: sum(STAT_LOST),
            malformed: sum(STAT_MALFORMED),
            drops: sum(STAT_DROPS),
            ringbuf_pending_bytes: per_cpu(STAT_RB_PENDING).into_iter().max().unwrap_or(0),
        }
    }
}

impl Hooks {
    /// Starts reporting kernel drops (`skb:kfree_skb`) in the agent's own network namespace; the
    /// agent runs on without it on failure.
    pub fn enable_drops(&mut self) -> Result<DropReasons, HookError> {
        drops::enable(&mut self.ebpf, drops::NetnsFilter::Current)
    }

    /// Like [`Hooks::enable_drops`] for another namespace (or all of them).
    pub fn enable_drops_in(&mut self, netns: drops::NetnsFilter) -> Result<DropReasons, HookError> {
        drops::enable(&mut self.ebpf, netns)
    }

    /// Loads the object and verifies its programs; nothing is attached yet.
    pub fn load(
        summary_interval_ns: u64,
    ) -> Result<(Hooks, RingBuf<MapData>, KernelCounters), HookError> {
        Hooks::load_with(summary_interval_ns, None)
    }

    /// Like [`Hooks::load`], with a ring buffer of `ringbuf_bytes` (a power of two, at least a
    /// page) instead of the default 8 MiB.
    pub fn load_with(
        summary_interval_ns: u64,
        ringbuf_bytes: Option<u32>,
    ) -> Result<(Hooks, RingBuf<MapData>, KernelCounters), HookError> {
        Hooks::load_opts(LoadOptions {
            summary_interval_ns: Some(summary_interval_ns),
            ringbuf_bytes,
            ..Default::default()
        })
    }

    /// Loads the object with `opts`, after checking the kernel can run it.
    pub fn load_opts(
        opts: LoadOptions,
    ) -> Result<(Hooks, RingBuf<MapData>, KernelCounters), HookError> {
        kernel::check_minimum().map_err(HookError::Kernel)?;
        let backend = opts.tc_mode.resolve().map_err(HookError::Kernel)?;
        let mut loader = EbpfLoader::new();
        if let Some(ns) = &opts.summary_interval_ns {
            loader.override_global(SUMMARY_INTERVAL_GLOBAL, ns, true);
        }
        if let Some(bytes) = opts.ringbuf_bytes {
            if !bytes.is_power_of_two() || bytes < 4096 {
                return Err(HookError::RingBufSize(bytes));
            }
            loader.map_max_entries(EVENTS_MAP, bytes);
        }
        if let Some(n) = opts.kernel_flow_entries {
            if !(1024..=1 << 24).contains(&n) {
                return Err(HookError::FlowEntries(n));
            }
            loader.map_max_entries(FLOWS_MAP, n);
            loader.map_max_entries(TURNS_MAP, n);
        }
        let mut ebpf = loader.load(OBJECT)?;
        tc::load(&mut ebpf)?;
        let events = ebpf
            .take_map(EVENTS_MAP)
            .ok_or(HookError::MissingMap(EVENTS_MAP))?;
        // The ring's size as the kernel made it (the object's default or --ringbuf-bytes), for
        // the fill gauge's denominator.
        let ring_bytes = match &events {
            aya::maps::Map::RingBuf(d) => d.info().map(|i| u64::from(i.max_entries())).ok(),
            _ => None,
        };
        let events = RingBuf::try_from(events)?;
        let stats = ebpf
            .take_map(STATS_MAP)
            .ok_or(HookError::MissingMap(STATS_MAP))?;
        let stats = PerCpuArray::try_from(stats)?;
        Ok((
            Hooks {
                ebpf,
                attached: BTreeMap::new(),
                holders: BTreeMap::new(),
                test_l3: false,
                backend,
            },
            events,
            KernelCounters { stats, ring_bytes },
        ))
    }

    /// TCX links or clsact filters.
    pub fn backend(&self) -> TcBackend {
        self.backend
    }

    /// Finds tracer's clsact filters on `links` whose programs no live process holds (an agent
    /// killed before it could detach) and removes exactly those. Filters of other programs, and
    /// tracer filters some process still holds, are never touched. TCX links need no such care:
    /// the kernel removes them with the process that held them.
    pub async fn remove_stale_filters(
        handle: &rtnetlink::Handle,
        links: &[(u32, String)],
    ) -> Vec<StaleFilter> {
        let mut found = Vec::new();
        for (ifindex, name) in links {
            match tc::tracer_filters(handle, *ifindex, name).await {
                Ok(f) => found.extend(f),
                // No clsact on the interface is the common case.
                Err(e) => tracing::trace!(iface = %name, error = %e, "no tc filters listed"),
            }
        }
        if found.is_empty() {
            return found;
        }
        let Some(live) = tc::live_program_ids() else {
            tracing::warn!("cannot read /proc: leaving tracer's old clsact filters in place");
            return Vec::new();
        };
        let mut removed = Vec::new();
        for f in found {
            if live.contains(&f.prog_id) {
                continue;
            }
            match tc::remove_filter(&f) {
                Ok(()) => {
                    tracing::info!(iface = %f.iface, program = %f.program, prog_id = f.prog_id,
                        priority = f.priority, handle = f.handle, "removed a stale tracer filter");
                    removed.push(f);
                }
                Err(e) => tracing::warn!(iface = %f.iface, error = %e, "removing a stale filter"),
            }
        }
        removed
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attached.contains_key(&ifindex)
    }

    pub fn attached(&self) -> Vec<AttachedIface> {
        self.attached.values().map(|(a, _)| a.clone()).collect()
    }

    /// Attaches ingress and egress observers to `link`.
    pub fn attach(&mut self, link: &Link, role: Role, how: AttachHow) -> Result<(), HookError> {
        if self.attached.contains_key(&link.index) {
            return Ok(());
        }
        let links =
            tc::attach(&mut self.ebpf, self.backend, &link.name, link.l3).map_err(|source| {
                HookError::Attach {
                    iface: link.name.clone(),
                    source,
                }
            })?;
        tracing::info!(iface = %link.name, ifindex = link.index, role = role.as_str(), how = how.as_str(), "attached");
        self.attached.insert(
            link.index,
            (
                AttachedIface {
                    ifindex: link.index,
                    name: link.name.clone(),
                    role,
                    how,
                },
                links,
            ),
        );
        Ok(())
    }

    /// Lease `lease` holds the attachment on `ifindex`.
    pub fn hold(&mut self, ifindex: u32, lease: u64) {
        self.holders.entry(ifindex).or_default().insert(lease);
    }

    /// Lease `lease` lets go of `ifindex`; returns how many leases still hold it, or `None`
    /// when this lease did not hold it (the interface went, and its holds with it).
    pub fn release(&mut self, ifindex: u32, lease: u64) -> Option<usize> {
        let held = self.holders.get_mut(&ifindex)?;
        if !held.remove(&lease) {
            return None;
        }
        let left = held.len();
        if left == 0 {
            self.holders.remove(&ifindex);
        }
        Some(left)
    }

    /// Whether lease `lease` holds `ifindex`.
    pub fn holds(&self, ifindex: u32, lease: u64) -> bool {
        self.holders
            .get(&ifindex)
            .is_some_and(|h| h.contains(&lease))
    }

    /// Detaches from `ifindex`. An interface that is already gone took its programs with it.
    pub fn detach(&mut self, ifindex: u32) {
        self.holders.remove(&ifindex);
        if let Some((iface, links)) = self.attached.remove(&ifindex) {
            tc::detach(&mut self.ebpf, links);
            tracing::info!(iface = %iface.name, ifindex, "detached");
        }
    }

    /// Keeps the recorded name current when an interface is renamed under us.
    pub fn rename(&mut self, ifindex: u32, name: &str) {
        if let Some((iface, _)) = self.attached.get_mut(&ifindex) {
            if iface.name != name {
                tracing::info!(old = %iface.name, new = name, ifindex, "interface renamed");
                iface.name = name.to_string();
            }
        }
    }

    pub fn detach_all(&mut self) {
        let all: Vec<u32> = self.attached.keys().copied().collect();
        for i in all {
            self.detach(i);
        }
    }

    /// Makes `test_run` feed the programs for devices whose frames start at the IP header.
    pub fn set_test_l3(&mut self, l3: bool) {
        self.test_l3 = l3;
    }

    /// Feeds one frame to the ingress or egress program in the kernel (BPF_PROG_TEST_RUN) on
    /// the loopback device; its records arrive on the ring buffer like real ones. For tests and
    /// the benchmark: no packet is sent anywhere.
    pub fn test_run(&mut self, egress: bool, frame: &[u8], repeat: u32) -> Result<u32, HookError> {
        tc::test_run(&mut self.ebpf, self.test_l3, egress, frame, repeat)
            .map(|(verdict, _)| verdict)
    }

    /// Like `test_run`; returns the kernel's average time for one run of the program.
    pub fn time_run(
        &mut self,
        egress: bool,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration, HookError> {
        tc::test_run(&mut self.ebpf, self.test_l3, egress, frame, repeat).map(|(_, took)| took)
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        self.detach_all();
    }
}
