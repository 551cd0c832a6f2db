//! The agent's state: the flow table, the node as last read, the attachments and the
//! liveness evidence. The ring reader and the sync loop write it; the API reads it. Every
//! answer is a wire type of `tracer_model`: this module knows nothing of HTTP.
mod answers;
mod control;
mod flowlog;
pub mod footprint;
pub mod health;
mod names;
mod node;
mod reader;
mod stream;
mod tally;
mod view;
mod watch;

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
    sync::{Mutex, MutexGuard, OnceLock, RwLock},
    time::Duration,
};

use tokio::sync::mpsc;
use tracer_model::{health::ApiStats, Cause, Verdict};

pub use answers::matches_tuple;
pub use control::{AttachError, AttachTarget, Command};
pub use flowlog::FlowLogCounters;
pub use health::{Fault, Liveness};
pub use stream::FlowCursor;
pub use tally::{Histogram, TallyCounts};
pub use tracer_model::health::DropTracing;
pub use watch::{WatchEvent, WatchState};

use crate::{
    calico::{Pools, Role},
    clock::{mono_now_ns, Clock},
    diagnose::{Context, Rules},
    felix_policy::{Counters, FilterRule, PolicyView},
    flows::{Flow, FlowId, FlowTable, Gaps, Iface, TableStats},
    hooks::{ifstate::Purged, AttachedIface, KernelCounters, KernelStats},
    identity::Identities,
    kernel_names::{DropReasons, Symbols},
    netlink::NodeFacts,
};

/// What the node looks like right now.
#[derive(Debug, Default)]
pub struct NodeView {
    pub facts: NodeFacts,
    pub pools: Pools,
    pub attached: Vec<AttachedIface>,
    /// The first interface sync has finished.
    pub ready: bool,
    /// Whether kernel drops are traced, and why not.
    pub drops: DropTracing,
    /// Why the programs could not be loaded, when they could not.
    pub unsupported: Option<String>,
    /// How the tc programs attach here.
    pub tc: Option<crate::hooks::TcBackend>,
}

/// What the ring reader has read.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReaderStats {
    pub records: u64,
    pub decode_errors: u64,
}

/// `--flow-cap`: most flows kept.
pub const DEFAULT_FLOW_CAP: usize = 100_000;

/// What the state needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Most flows kept.
    pub flow_cap: usize,
    pub rules: Rules,
    /// felix's InterfacePrefix (the first of the list), to resolve pods to their veth.
    pub workload_prefix: String,
    /// How often the sync loop reads the node, for the liveness checks.
    pub resync: Duration,
    /// Every flow is written to the flow log once: keep what that needs.
    pub flow_log: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            flow_cap: DEFAULT_FLOW_CAP,
            rules: Rules::default(),
            workload_prefix: crate::calico::DEFAULT_INTERFACE_PREFIX.into(),
            resync: crate::netlink::DEFAULT_RESYNC,
            flow_log: false,
        }
    }
}

/// What the API is doing, counted by the API and reported by `/metrics` and `/healthz`.
#[derive(Debug, Default)]
pub struct ApiCounters {
    pub connections: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub watchers: AtomicU64,
    pub watchers_rejected: AtomicU64,
}

impl ApiCounters {
    pub fn snapshot(&self) -> ApiStats {
        ApiStats {
            connections: self.connections.load(Ordering::Relaxed),
            connections_rejected: self.connections_rejected.load(Ordering::Relaxed),
            watchers: self.watchers.load(Ordering::Relaxed),
            watchers_rejected: self.watchers_rejected.load(Ordering::Relaxed),
        }
    }
}

/// What `/metrics` reports, gathered in one pass.
#[derive(Debug, Default)]
pub struct Census {
    pub flows: usize,
    pub by_verdict: HashMap<Verdict, u64>,
    pub by_cause: HashMap<Cause, u64>,
    pub table: TableStats,
    pub reader: ReaderStats,
    pub attached_by_role: HashMap<Role, u64>,
    pub kernel: KernelStats,
    pub api: ApiStats,
    pub interned: usize,
    pub purged: Purged,
    /// The tally's counters and histograms (None only in a default census).
    pub tally: Option<TallyCounts>,
    /// The ring buffer's size, once the programs are loaded.
    pub ring_bytes: Option<u64>,
    /// Kernel drops of traced flows by reason name (bounded: see `FlowTable::drops_by_reason`).
    pub drops_by_reason: Vec<(String, u64)>,
    pub identity: tracer_model::identity::IdentityHealth,
    /// The flow log's counts, when there is one.
    pub flow_log: Option<tracer_model::FlowLogStats>,
}

/// State shared between the reader, the sync loop and the API.
pub struct Shared {
    pub(crate) table: Mutex<FlowTable>,
    reasons: RwLock<DropReasons>,
    /// Loaded on first use: only drops need it, and it is a few MB.
    symbols: OnceLock<Symbols>,
    node: RwLock<NodeView>,
    reader: Mutex<ReaderStats>,
    pub(crate) clock: Clock,
    rules: Rules,
    /// felix's InterfacePrefix, to resolve pods to their veth.
    workload_prefix: String,
    commands: OnceLock<mpsc::Sender<Command>>,
    counters: Mutex<Option<KernelCounters>>,
    /// Attached interfaces by ifindex, shared by the hops that cross them.
    /// Asked for every record at a hop new to its flow: foldhash, not SipHash (ifindexes are
    /// the kernel's).
    names: RwLock<HashMap<u32, Arc<Iface>, foldhash::fast::RandomState>>,
    /// Lost records and how far the reader has got.
    gaps: Mutex<Gaps>,
    liveness: Liveness,
    resync: Duration,
    pub api: ApiCounters,
    /// Kernel map entries removed with the interfaces they were keyed with, so far.
    purged: Mutex<Purged>,
    /// The per-verdict and per-cause counts of `/metrics`, kept incrementally.
    tally: Mutex<tally::Tally>,
    /// Bumped when the node or the drop-reason names change: every judgement is then redone.
    judgement_gen: AtomicU64,
    /// A hash of the node's facts and pools as last read, to see them change.
    node_hash: AtomicU64,
    /// Names of addresses, when identity is on (set once at start).
    identities: OnceLock<Arc<Identities>>,
    /// What the flow log has written, when there is one.
    flow_log: Option<FlowLogCounters>,
    /// felix's filter rule counters as last read (`felix_policy`).
    policy_counters: RwLock<Arc<Counters>>,
    /// felix's eBPF rule counters (`cali_rule_ctrs2`), read in eBPF mode.
    bpf_policy_counters: RwLock<Arc<crate::felix_policy::bpf::Counters>>,
    conntrack: RwLock<Arc<crate::conntrack::Readings>>,
}

/// Flows judged per hold of the flow table by endpoints that judge them all.
const VISIT_CHUNK: usize = 4096;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the API down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(cfg: &StateConfig) -> Shared {
        let mut table = FlowTable::new(cfg.flow_cap);
        if cfg.flow_log {
            table.keep_unlogged();
        }
        Shared {
            table: Mutex::new(table),
            reasons: RwLock::new(DropReasons::default()),
            symbols: OnceLock::new(),
            node: RwLock::new(NodeView::default()),
            reader: Mutex::new(ReaderStats::default()),
            clock: Clock::new(),
            rules: cfg.rules.clone(),
            workload_prefix: cfg.workload_prefix.clone(),
            commands: OnceLock::new(),
            counters: Mutex::new(None),
            names: RwLock::new(HashMap::default()),
            gaps: Mutex::new(Gaps::default()),
            liveness: Liveness::default(),
            resync: cfg.resync,
            api: Default::default(),
            purged: Mutex::new(Purged::default()),
            tally: Mutex::new(if cfg.flow_log {
                tally::Tally::with_flow_log()
            } else {
                tally::Tally::default()
            }),
            judgement_gen: AtomicU64::new(0),
            node_hash: AtomicU64::new(0),
            identities: OnceLock::new(),
            flow_log: cfg.flow_log.then(FlowLogCounters::default),
            policy_counters: RwLock::new(Arc::default()),
            bpf_policy_counters: RwLock::new(Arc::default()),
            conntrack: RwLock::new(Arc::default()),
        }
    }

    /// Turns identity on with `ids` (once, at start).
    pub fn set_identities(&self, ids: Arc<Identities>) {
        let _ = self.identities.set(ids);
    }

    /// Kernel drops of traced flows so far: the policy counter reader reads felix's counters
    /// only when this moved.
    pub fn traced_drops(&self) -> u64 {
        lock(&self.table).stats().drops
    }

    /// A reading of felix's filter rule counters taken at `at_ns` (before the command ran).
    pub fn record_policy_counters(&self, at_ns: u64, read: Result<Vec<FilterRule>, String>) {
        let mut guard = self
            .policy_counters
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let mut next = Counters::clone(&guard);
        match read {
            Ok(rules) => next.record(at_ns, rules),
            Err(e) => next.error = Some(e),
        }
        *guard = Arc::new(next);
    }

    /// A reading of felix's eBPF rule counters taken at `at_ns`.
    pub fn record_bpf_policy_counters(
        &self,
        at_ns: u64,
        read: Result<std::collections::HashMap<u64, u64>, String>,
    ) {
        let mut guard = self
            .bpf_policy_counters
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let mut next = crate::felix_policy::bpf::Counters::clone(&guard);
        match read {
            Ok(r) => next.record(at_ns, r),
            Err(e) => next.error = Some(e),
        }
        *guard = Arc::new(next);
    }

    /// A reading of the node's conntrack counters taken at `at_ns`.
    pub fn record_conntrack(&self, at_ns: u64, read: Result<crate::conntrack::Stats, String>) {
        let mut guard = self.conntrack.write().unwrap_or_else(|e| e.into_inner());
        let mut next = crate::conntrack::Readings::clone(&guard);
        next.record(at_ns, read);
        *guard = Arc::new(next);
    }

    /// What the rules see of Calico's policies and felix's counters, for one answer.
    fn policy_view(&self, pools: &Pools) -> PolicyView {
        let (policies, policies_missing) = match self.identities().policies() {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        };
        let ebpf = pools.ebpf.as_ref().map(|_| {
            Arc::clone(
                &self
                    .bpf_policy_counters
                    .read()
                    .unwrap_or_else(|e| e.into_inner()),
            )
        });
        PolicyView {
            policies,
            policies_missing,
            counters: Arc::clone(
                &self
                    .policy_counters
                    .read()
                    .unwrap_or_else(|e| e.into_inner()),
            ),
            ebpf,
        }
    }

    /// Where names come from; off unless [`Shared::set_identities`] was called.
    pub fn identities(&self) -> &Identities {
        static OFF: OnceLock<Identities> = OnceLock::new();
        self.identities
            .get()
            .map(|i| i.as_ref())
            .unwrap_or_else(|| OFF.get_or_init(Identities::off))
    }

    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Runs `f` with everything the diagnosis rules need, consistent for one answer.
    pub(crate) fn with_context<T>(&self, f: impl FnOnce(&Context<'_>, &FlowTable) -> T) -> T {
        self.with_context_mut(|cx, table| f(cx, table))
    }

    /// [`Shared::with_context`], with the table to change (the flow log marks what it wrote).
    pub(crate) fn with_context_mut<T>(
        &self,
        f: impl FnOnce(&Context<'_>, &mut FlowTable) -> T,
    ) -> T {
        static NO_SYMBOLS: OnceLock<Symbols> = OnceLock::new();
        let node = self.node();
        let reasons = self.reasons.read().unwrap_or_else(|e| e.into_inner());
        let mut table = lock(&self.table);
        let symbols = if table.stats().drops > 0 {
            self.symbols.get_or_init(Symbols::load)
        } else {
            NO_SYMBOLS.get_or_init(Symbols::default)
        };
        let gaps = lock(&self.gaps).clone();
        // A copy (at most TOO_BIG_KEPT small entries): `f` may change the table.
        let too_big = table.too_big().to_vec();
        let answered = table.answered().to_vec();
        let policy = self.policy_view(&node.pools);
        let conntrack = Arc::clone(&self.conntrack.read().unwrap_or_else(|e| e.into_inner()));
        let cx = Context {
            policy: &policy,
            conntrack: &conntrack,
            pools: &node.pools,
            facts: &node.facts,
            now_ns: mono_now_ns(),
            rules: &self.rules,
            reasons: &reasons,
            symbols,
            gaps: &gaps,
            too_big: &too_big,
            answered: &answered,
        };
        f(&cx, &mut table)
    }

    /// Runs `visit` on every flow, newest first, until it returns false. The table is held for
    /// at most [`VISIT_CHUNK`] flows at a time: judging a full table takes long enough (over
    /// 100 ms with many faulty flows) to back the ring buffer up if the reader had to wait for
    /// all of it. Flows created meanwhile are not visited; flows evicted meanwhile are skipped.
    fn visit_chunked(&self, mut visit: impl FnMut(&Context<'_>, &Flow) -> bool) {
        let mut bound = FlowId::MAX;
        loop {
            let more = self.with_context(|cx, table| {
                let mut seen = 0;
                for (slot, f) in table.iter_newest_below(bound) {
                    bound = slot;
                    if !visit(cx, f) {
                        return false;
                    }
                    seen += 1;
                    if seen == VISIT_CHUNK {
                        return true;
                    }
                }
                false
            });
            if !more {
                return;
            }
        }
    }
}

/// Hooks for tests elsewhere in the crate (the API's golden answers) that build a state at
/// fixed times.
#[cfg(test)]
impl Shared {
    pub(crate) fn anchor_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    pub(crate) fn preload_symbols(&self, symbols: Symbols) {
        let _ = self.symbols.set(symbols);
    }

    pub(crate) fn gaps_mut(&self) -> MutexGuard<'_, Gaps> {
        lock(&self.gaps)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tracer_model::{query::QueryError, FlowQuery, FlowView};

    use super::*;
    use crate::{
        events::Dir,
        testutil::{obs, tcp},
    };

    /// A table spanning several visiting chunks of unanswered SYNs (ids 1..=n).
    pub(crate) fn unanswered(n: u32) -> Shared {
        let shared = Shared::new(&StateConfig {
            flow_cap: n as usize,
            ..StateConfig::default()
        });
        let batch: Vec<_> = (0..n)
            .map(|i| {
                let p = tcp(
                    "10.244.1.10",
                    (i % 60_000) as u16 + 1024,
                    &format!("10.96.{}.{}", i / 60_000, 1 + i % 250),
                    443,
                    0x02,
                    i + 1,
                    0,
                );
                obs(1_000 + u64::from(i), 5, Dir::Ingress, p)
            })
            .collect();
        shared.ingest(&batch, 0);
        shared
    }

    #[test]
    fn judging_endpoints_see_every_flow_across_chunks() -> Result<(), QueryError> {
        let n = 3 * VISIT_CHUNK as u32 + 17;
        let shared = unanswered(n);
        assert_eq!(shared.diagnoses().flows_judged, u64::from(n));
        let census = shared.census();
        assert_eq!(
            census.by_verdict.get(&Verdict::NoReply).copied(),
            Some(u64::from(n))
        );
        let q = FlowQuery::parse(Some("verdict=no_reply&limit=5"))?;
        let page = shared.flows(&q);
        assert_eq!((page.matched, page.truncated), (n as usize, true));
        let ids: Vec<u64> = page.flows.iter().map(|f| f.id).collect();
        let newest = u64::from(n);
        assert_eq!(ids, (newest - 4..=newest).rev().collect::<Vec<_>>());
        // Without a verdict filter the same flows come from one pass.
        let q = FlowQuery::parse(Some("limit=5"))?;
        assert_eq!(shared.flows(&q).matched, n as usize);
        Ok(())
    }

    /// `/flows?dst=` through the address index (counting from it where only `dst` is asked)
    /// answers what matching every flow answers, also after eviction.
    #[test]
    fn indexed_dst_queries_equal_a_scan() -> Result<(), QueryError> {
        let n = 3 * VISIT_CHUNK as u32 + 11;
        let shared = unanswered(n);
        // More flows than the cap: the oldest went.
        let batch: Vec<_> = (0..n / 3)
            .map(|i| {
                let p = tcp(
                    "10.244.1.11",
                    2000 + i as u16,
                    "10.96.0.7",
                    80,
                    0x02,
                    i + 1,
                    0,
                );
                obs(9_000_000 + u64::from(i), 5, Dir::Ingress, p)
            })
            .collect();
        shared.ingest(&batch, 0);
        for query in [
            "dst=10.96.0.7",
            "dst=10.96.0.7&limit=3",
            "dst=10.96.0.0/16",
            "dst=10.96.0.0/24&limit=5",
            "dst=10.96.1.0/24&proto=tcp",
            "dst=10.0.0.0/8&limit=3000",
            "dst=10.96.0.7&src=10.244.1.11",
            "dst=fd00::/8",
            "dst=10.97.0.0/16",
        ] {
            let q = FlowQuery::parse(Some(query))?;
            let page = shared.flows(&q);
            let all: Vec<u64> = shared.with_context(|cx, table| {
                let matches = shared.matcher(&q, cx.now_ns);
                table
                    .iter_newest()
                    .filter(|f| matches(f))
                    .map(|f| f.id)
                    .collect()
            });
            let limit = q.limit.unwrap_or(tracer_model::query::DEFAULT_LIMIT);
            let ids: Vec<u64> = page.flows.iter().map(|f| f.id).collect();
            assert_eq!(
                ids,
                all.iter().copied().take(limit).collect::<Vec<_>>(),
                "{query}"
            );
            assert_eq!(page.matched, all.len(), "{query}");
            assert_eq!(page.truncated, all.len() > ids.len(), "{query}");
        }
        Ok(())
    }

    #[test]
    fn walked_flows_equal_the_one_pass_answer() -> Result<(), QueryError> {
        let n = 2 * VISIT_CHUNK as u32 + 5;
        let shared = unanswered(n);
        for query in ["limit=100000", "limit=700", "dst=10.96.0.7&limit=3000"] {
            let q = FlowQuery::parse(Some(query))?;
            let one = shared.flows(&q);
            let mut cur = FlowCursor::new(q);
            let mut parts = 0;
            let mut walked = Vec::new();
            while !cur.done() {
                walked.extend(shared.flows_chunk(&mut cur));
                parts += 1;
            }
            assert!(!one.flows.is_empty(), "{query}");
            let ids = |f: &[FlowView]| f.iter().map(|f| f.id).collect::<Vec<_>>();
            assert_eq!(ids(&one.flows), ids(&walked), "{query}");
            assert_eq!(
                (one.matched, one.truncated),
                (cur.matched(), cur.matched() > cur.shown())
            );
            if query == "limit=100000" {
                assert!(parts > 4, "{parts} parts");
            }
        }
        Ok(())
    }
}
