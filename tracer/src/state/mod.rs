//! The agent's state: the flow table, the node as last read, the attachments and the
//! liveness evidence. The ring reader and the sync loop write it; the API reads it. Every
//! answer is a wire type of `tracer_model`: this module knows nothing of HTTP.
mod control;
pub mod footprint;
pub mod health;
mod stream;
mod view;
mod watch;

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
    sync::{Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tracer_model::{
    diagnoses::{CauseGroup, EvidenceSummary},
    health::{ApiStats, HealthDetail, Status},
    query::{FlowQuery, Since, DEFAULT_LIMIT},
    Cause, DiagnosesAnswer, FlowView, FlowsPage, Health, Readiness, Verdict,
};

pub use control::{AttachError, AttachTarget, Command};
pub use health::{Fault, Liveness};
pub use stream::FlowCursor;
pub use tracer_model::health::DropTracing;
pub use watch::{WatchEvent, WatchState};

use crate::{
    calico::{Pools, Role},
    clock::{mono_now_ns, Clock},
    diagnose::{judge, Context, Rules},
    events::Observation,
    flows::{Flow, FlowId, FlowTable, Gaps, Iface, Sample, TableStats},
    hooks::{ifstate::Purged, AttachedIface, KernelCounters, KernelStats},
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
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            flow_cap: DEFAULT_FLOW_CAP,
            rules: Rules::default(),
            workload_prefix: crate::calico::DEFAULT_INTERFACE_PREFIX.into(),
            resync: crate::netlink::DEFAULT_RESYNC,
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
    names: RwLock<HashMap<u32, Arc<Iface>>>,
    /// Lost records and how far the reader has got.
    gaps: Mutex<Gaps>,
    liveness: Liveness,
    resync: Duration,
    pub api: ApiCounters,
    /// Kernel map entries removed with the interfaces they were keyed with, so far.
    purged: Mutex<Purged>,
}

/// Flows judged per hold of the flow table by endpoints that judge them all.
const VISIT_CHUNK: usize = 4096;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the API down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(cfg: &StateConfig) -> Shared {
        Shared {
            table: Mutex::new(FlowTable::new(cfg.flow_cap)),
            reasons: RwLock::new(DropReasons::default()),
            symbols: OnceLock::new(),
            node: RwLock::new(NodeView::default()),
            reader: Mutex::new(ReaderStats::default()),
            clock: Clock::new(),
            rules: cfg.rules.clone(),
            workload_prefix: cfg.workload_prefix.clone(),
            commands: OnceLock::new(),
            counters: Mutex::new(None),
            names: RwLock::new(HashMap::new()),
            gaps: Mutex::new(Gaps::default()),
            liveness: Liveness::default(),
            resync: cfg.resync,
            api: Default::default(),
            purged: Mutex::new(Purged::default()),
        }
    }

    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Whether the reader and the sync loop are alive, judged now.
    pub fn checks(&self) -> tracer_model::health::Checks {
        self.liveness
            .checks(mono_now_ns(), self.clock.start_ns(), self.resync)
    }

    pub(crate) fn node(&self) -> RwLockReadGuard<'_, NodeView> {
        self.node.read().unwrap_or_else(|e| e.into_inner())
    }

    fn node_mut(&self) -> RwLockWriteGuard<'_, NodeView> {
        self.node.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_commands(&self, tx: mpsc::Sender<Command>) {
        let _ = self.commands.set(tx);
    }

    pub(crate) fn set_reasons(&self, r: DropReasons) {
        *self.reasons.write().unwrap_or_else(|e| e.into_inner()) = r;
    }

    /// The programs cannot run here: say why, stay up, never become ready.
    pub(crate) fn set_unsupported(&self, why: String) {
        self.liveness.set_unsupported();
        self.node_mut().unsupported = Some(why);
    }

    pub(crate) fn set_tc_backend(&self, tc: crate::hooks::TcBackend) {
        self.node_mut().tc = Some(tc);
    }

    pub(crate) fn set_drop_tracing(&self, d: DropTracing) {
        self.node_mut().drops = d;
    }

    pub(crate) fn set_attached(&self, attached: Vec<AttachedIface>) {
        self.intern(&attached);
        self.node_mut().attached = attached;
    }

    /// Names an interface about to be attached, so its first records carry its name and role.
    pub(crate) fn announce(&self, ifindex: u32, name: &str, role: Role) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ifindex, Iface::new(name, ifindex, Some(role)));
    }

    /// Interface names shared by every hop that crosses them: one allocation per interface.
    fn intern(&self, attached: &[AttachedIface]) {
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        names.retain(|i, n| {
            attached
                .iter()
                .any(|a| a.ifindex == *i && *a.name == *n.name && Some(a.role) == n.role)
        });
        for a in attached {
            names
                .entry(a.ifindex)
                .or_insert_with(|| Iface::new(&a.name, a.ifindex, Some(a.role)));
        }
    }

    pub(crate) fn note_purged(&self, p: Purged) {
        let mut total = lock(&self.purged);
        total.flows += p.flows;
        total.turns += p.turns;
        total.scanned += p.scanned;
    }

    pub(crate) fn set_counters(&self, c: KernelCounters) {
        *lock(&self.counters) = Some(c);
    }

    /// The kernel's counters, read now.
    pub fn kernel(&self) -> KernelStats {
        lock(&self.counters)
            .as_ref()
            .map(KernelCounters::read)
            .unwrap_or_default()
    }

    pub(crate) fn sweep(&self, now_ns: u64) {
        lock(&self.table).sweep(now_ns);
        // Follow wall-clock steps (NTP) in rendered times and since= filters.
        self.clock.resync();
    }

    pub(crate) fn update_node(&self, facts: NodeFacts, pools: Pools, attached: Vec<AttachedIface>) {
        self.intern(&attached);
        let mut node = self.node_mut();
        node.facts = facts;
        node.pools = pools;
        node.attached = attached;
        node.ready = true;
    }

    /// The veth Calico gives `namespace/name`.
    pub fn pod_veth(&self, namespace: &str, name: &str) -> String {
        crate::calico::veth_name_with_prefix(&self.workload_prefix, namespace, name)
    }

    pub async fn attach(&self, target: AttachTarget) -> Result<AttachedIface, AttachError> {
        let tx = self.commands.get().ok_or(AttachError::NotRunning)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Attach { target, reply })
            .await
            .map_err(|_| AttachError::NotRunning)?;
        rx.await.map_err(|_| AttachError::NotRunning)?
    }

    pub async fn detach(&self, ifindex: u32) -> Result<(), AttachError> {
        let tx = self.commands.get().ok_or(AttachError::NotRunning)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Detach { ifindex, reply })
            .await
            .map_err(|_| AttachError::NotRunning)?;
        rx.await.map_err(|_| AttachError::NotRunning)?
    }

    /// The reader has emptied the ring at `now_ns`: notes how far the evidence reaches and
    /// whether the kernel had to drop records since the last time.
    pub(crate) fn reader_drained(&self, now_ns: u64) {
        let lost = lock(&self.counters).as_ref().map(KernelCounters::lost);
        let mut gaps = lock(&self.gaps);
        match lost {
            Some(lost) => gaps.look(now_ns, lost),
            None => gaps.drained(now_ns),
        }
    }

    /// The reader has been idle a while with the ring empty.
    pub(crate) fn reader_idle(&self, now_ns: u64) {
        if let Some(c) = lock(&self.counters).as_mut() {
            c.clear_pending();
        }
        self.reader_drained(now_ns);
    }

    /// Lost records and the reader's progress, for /diagnoses and /metrics.
    pub fn gaps(&self) -> Gaps {
        lock(&self.gaps).clone()
    }

    /// Ingests a batch of decoded records; `decode_errors` counts the ones that were not.
    pub fn ingest(&self, batch: &[Observation], decode_errors: u64) {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        // Asked once per new hop, not per record.
        let lookup = |ifindex: u32| match names.get(&ifindex) {
            Some(i) => i.clone(),
            None => Iface::unnamed(ifindex),
        };
        {
            let mut table = lock(&self.table);
            for obs in batch {
                table.ingest(obs, &lookup);
            }
        }
        let mut st = lock(&self.reader);
        st.records += batch.len() as u64 + decode_errors;
        st.decode_errors += decode_errors;
    }

    /// Runs `f` with everything the diagnosis rules need, consistent for one answer.
    pub(crate) fn with_context<T>(&self, f: impl FnOnce(&Context<'_>, &FlowTable) -> T) -> T {
        static NO_SYMBOLS: OnceLock<Symbols> = OnceLock::new();
        let node = self.node();
        let reasons = self.reasons.read().unwrap_or_else(|e| e.into_inner());
        let table = lock(&self.table);
        let symbols = if table.stats().drops > 0 {
            self.symbols.get_or_init(Symbols::load)
        } else {
            NO_SYMBOLS.get_or_init(Symbols::default)
        };
        let gaps = lock(&self.gaps).clone();
        let cx = Context {
            pools: &node.pools,
            facts: &node.facts,
            now_ns: mono_now_ns(),
            rules: &self.rules,
            reasons: &reasons,
            symbols,
            gaps: &gaps,
        };
        f(&cx, &table)
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

    /// The query as a predicate over flows. The pod's veth name (a sha1) and the `since`
    /// threshold are worked out once per query, not once per flow.
    pub(crate) fn matcher<'q>(&self, q: &'q FlowQuery, now_ns: u64) -> impl Fn(&Flow) -> bool + 'q {
        let veth = q.pod.as_ref().map(|(ns, name)| self.pod_veth(ns, name));
        let since_ns = match q.since {
            Some(Since::Ago(d)) => now_ns.saturating_sub(d.as_nanos() as u64),
            Some(Since::At(t)) => self.clock.mono_of(t),
            None => 0,
        };
        move |f: &Flow| {
            matches_tuple(q, f)
                && f.last_ns >= since_ns
                && veth
                    .as_deref()
                    .is_none_or(|v| f.hops.iter().any(|h| *h.iface.name == *v))
        }
    }

    /// `GET /flows` answered in one go (the API streams large or judging queries through
    /// [`FlowCursor`] instead).
    pub fn flows(&self, q: &FlowQuery) -> FlowsPage {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        if q.verdict.is_some() || q.cause.is_some() {
            return self.flows_judged(q);
        }
        // Judging is the expensive part: only the flows rendered are judged, the rest counted.
        self.with_context(|cx, table| {
            let mut flows = Vec::new();
            let mut matched = 0usize;
            let matches = self.matcher(q, cx.now_ns);
            let (src, dst) = q.hosts();
            for f in table.iter_newest_with(src, dst) {
                if !matches(f) {
                    continue;
                }
                matched += 1;
                if flows.len() < limit {
                    flows.push(view::flow_view(f, judge(f, cx), &self.clock, cx));
                }
            }
            FlowsPage {
                truncated: matched > flows.len(),
                flows,
                matched,
            }
        })
    }

    /// `/flows` with a verdict or cause filter: every candidate must be judged, a part of the
    /// table at a time (see [`FlowCursor`]).
    fn flows_judged(&self, q: &FlowQuery) -> FlowsPage {
        let mut cur = FlowCursor::new(q.clone());
        let mut flows = Vec::new();
        while !cur.done() {
            flows.extend(self.flows_chunk(&mut cur));
        }
        FlowsPage {
            truncated: cur.matched() > flows.len(),
            matched: cur.matched(),
            flows,
        }
    }

    /// Faulty flows grouped by cause, plus what the node's configuration alone shows.
    pub fn diagnoses(&self) -> DiagnosesAnswer {
        #[derive(Default)]
        struct Group {
            count: u64,
            first_ns: u64,
            last_ns: u64,
            latest: Option<(u64, tracer_model::Diagnosis)>,
            examples: Vec<u64>,
            /// Flows of the group whose records may be partial.
            incomplete: u64,
        }
        // Keyed by wire name: causes with equal counts are listed alphabetically.
        let mut groups: std::collections::BTreeMap<&'static str, (Cause, Group)> =
            Default::default();
        let mut judged = 0u64;
        let mut incomplete = 0u64;
        self.visit_chunked(|cx, f| {
            judged += 1;
            let j = judge(f, cx);
            if j.lost_records > 0 {
                incomplete += 1;
            }
            if let Some(d) = j.diagnosis {
                let (_, g) = groups
                    .entry(d.cause.as_str())
                    .or_insert_with(|| (d.cause, Group::default()));
                g.count += 1;
                if j.lost_records > 0 {
                    g.incomplete += 1;
                }
                g.first_ns = if g.first_ns == 0 {
                    f.first_ns
                } else {
                    g.first_ns.min(f.first_ns)
                };
                g.last_ns = g.last_ns.max(f.last_ns);
                if g.examples.len() < 5 {
                    g.examples.push(f.id);
                }
                if g.latest.as_ref().is_none_or(|(t, _)| f.last_ns > *t) {
                    g.latest = Some((f.last_ns, d));
                }
            }
            true
        });
        self.with_context(|cx, table| {
            let mut causes: Vec<CauseGroup> = groups
                .into_values()
                .filter_map(|(cause, g)| {
                    let (_, d) = g.latest?;
                    Some(CauseGroup {
                        cause,
                        count: g.count,
                        first_seen: self.clock.rfc3339(g.first_ns),
                        last_seen: self.clock.rfc3339(g.last_ns),
                        summary: d.summary,
                        evidence: d.evidence,
                        fix: d.fix,
                        example_flows: g.examples,
                        evidence_incomplete: g.incomplete,
                    })
                })
                .collect();
            // Stable: equal counts keep the causes' wire-name order.
            causes.sort_by_key(|c| std::cmp::Reverse(c.count));
            let gaps = cx.gaps;
            let evicted = table.stats().evicted;
            DiagnosesAnswer {
                causes,
                node_findings: crate::diagnose::node_findings(cx),
                flows_judged: judged,
                // What the answer may be missing: lost records make flows partial (they are
                // never called unanswered for it); evicted flows are gone from the answer.
                evidence: EvidenceSummary {
                    complete: gaps.total_lost() == 0 && evicted == 0,
                    lost_records: gaps.total_lost(),
                    flows_with_incomplete_evidence: incomplete,
                    flows_evicted: evicted,
                    reader_lag_ms: cx.now_ns.saturating_sub(cx.evidence_now_ns()) / 1_000_000,
                },
            }
        })
    }

    pub fn flow(&self, id: u64) -> Option<FlowView> {
        self.with_context(|cx, table| {
            table
                .get(id)
                .map(|f| view::flow_view(f, judge(f, cx), &self.clock, cx))
        })
    }

    /// Ready once the programs are loaded and the first interface sync is done, while healthy.
    /// `detail` (authorized callers only) adds what is attached and whether drops are traced.
    pub fn readiness(&self, detail: bool) -> Readiness {
        let healthy = !self.checks().failing();
        let node = self.node();
        Readiness {
            ready: node.ready && healthy,
            attached: detail.then_some(node.attached.len()),
            drops: detail.then(|| node.drops.clone()),
        }
    }

    /// The flow's kept records and the names of the interfaces they were seen on; None when
    /// there is no such flow or no record left.
    pub fn samples(&self, id: u64) -> Option<(Vec<Sample>, HashMap<u32, String>)> {
        let names: HashMap<u32, String> = {
            let node = self.node();
            node.facts
                .links
                .values()
                .map(|l| (l.index, l.name.clone()))
                .collect()
        };
        let table = lock(&self.table);
        table.get(id)?;
        let samples: Vec<Sample> = table.samples().of(id).into_iter().cloned().collect();
        (!samples.is_empty()).then_some((samples, names))
    }

    /// Everything `/metrics` reports. Judges every flow.
    pub fn census(&self) -> Census {
        let mut c = Census::default();
        self.visit_chunked(|cx, f| {
            let j = judge(f, cx);
            for x in &j.verdicts {
                *c.by_verdict.entry(*x).or_default() += 1;
            }
            if let Some(d) = j.diagnosis {
                *c.by_cause.entry(d.cause).or_default() += 1;
            }
            true
        });
        {
            let t = lock(&self.table);
            c.flows = t.len();
            c.table = t.stats();
        }
        for a in &self.node().attached {
            *c.attached_by_role.entry(a.role).or_default() += 1;
        }
        c.reader = *lock(&self.reader);
        c.kernel = self.kernel();
        c.api = self.api.snapshot();
        c.interned = self.names.read().unwrap_or_else(|e| e.into_inner()).len();
        c.purged = *lock(&self.purged);
        c
    }

    /// `/healthz`: healthy (false: answer 503) and the body. Without `detail` (callers without
    /// the token) the body holds fixed words only: no interface names (they tell which pod runs
    /// where), no pools, no error text.
    pub fn health(&self, detail: bool) -> (bool, Health) {
        let checks = self.checks();
        let now = mono_now_ns();
        let node = self.node();
        let status = if node.unsupported.is_some() {
            Status::Unsupported
        } else if checks.failing() {
            Status::Failing
        } else if node.ready {
            Status::Ok
        } else {
            Status::Starting
        };
        let detail = detail.then(|| {
            let reader = *lock(&self.reader);
            HealthDetail {
                tc: node.tc,
                drops: node.drops.clone(),
                attached: node.attached.clone(),
                pools: (&node.pools).into(),
                kernel: self.kernel(),
                reader: tracer_model::health::ReaderStats {
                    records: reader.records,
                    decode_errors: reader.decode_errors,
                    idle_ms: self.liveness.reader_idle_ms(now),
                },
                node_sync_age_ms: self.liveness.sync_age_ms(now),
                flows: lock(&self.table).stats(),
                api: self.api.snapshot(),
                uptime_s: Duration::from_nanos(now.saturating_sub(self.clock.start_ns())).as_secs(),
            }
        });
        let health = Health {
            status,
            ready: node.ready,
            checks,
            unsupported: detail.as_ref().and(node.unsupported.clone()),
            detail,
        };
        (!checks.failing(), health)
    }
}

/// The filters that need no judgement: addresses match the original or the translated tuple.
pub fn matches_tuple(q: &FlowQuery, f: &Flow) -> bool {
    let dsts = [Some(f.dst), f.nat.map(|n| n.dst)];
    let srcs = [Some(f.src), f.nat.map(|n| n.src)];
    let any = |set: &[Option<std::net::IpAddr>], c: &crate::net::Cidr| {
        set.iter().flatten().any(|ip| c.contains(*ip))
    };
    if q.dst.as_ref().is_some_and(|c| !any(&dsts, c)) {
        return false;
    }
    if q.src.as_ref().is_some_and(|c| !any(&srcs, c)) {
        return false;
    }
    if let Some(p) = q.port {
        let ports = [
            Some(f.sport),
            Some(f.dport),
            f.nat.map(|n| n.sport),
            f.nat.map(|n| n.dport),
        ];
        if !ports.iter().flatten().any(|x| *x == p) {
            return false;
        }
    }
    q.proto.is_none_or(|p| f.proto == p)
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
    use tracer_model::query::QueryError;

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
