//! State shared between the ring-buffer reader, the sync loop and the API.
use std::{
    collections::HashMap,
    sync::Arc,
    sync::{Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracer_model::{Cause, Verdict};

use super::{
    control::{AttachError, AttachTarget, Command},
    health::Liveness,
    AgentConfig,
};
use crate::{
    api::{
        metrics::{label, render, Family},
        query::{FlowQuery, Since, DEFAULT_LIMIT},
        view::{flow_json, FlowView},
    },
    calico::{Pools, Role},
    clock::{mono_now_ns, Clock},
    diagnose::{judge, Context, Judgement, Rules},
    events::Observation,
    flows::{Flow, FlowId, FlowTable, Gaps, Iface},
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

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DropTracing {
    pub enabled: bool,
    pub error: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ReaderStats {
    pub records: u64,
    pub decode_errors: u64,
}

/// The body of GET /flows.
#[derive(serde::Serialize)]
struct FlowsPage<'a> {
    flows: Vec<FlowView<'a>>,
    matched: usize,
    truncated: bool,
}

/// GET /flows's answer: the JSON body, and how many flows matched (of which `limit` are in it).
pub struct FlowsAnswer {
    pub json: Vec<u8>,
    pub matched: usize,
}

/// State shared between the reader, the sync loop and the API.
pub struct Shared {
    pub(super) table: Mutex<FlowTable>,
    reasons: RwLock<DropReasons>,
    /// Loaded on first use: only drops need it, and it is a few MB.
    symbols: OnceLock<Symbols>,
    node: RwLock<NodeView>,
    reader: Mutex<ReaderStats>,
    pub(super) clock: Clock,
    rules: Rules,
    /// felix's InterfacePrefix, to resolve pods to their veth.
    workload_prefix: String,
    token: Option<String>,
    commands: OnceLock<mpsc::Sender<Command>>,
    counters: Mutex<Option<KernelCounters>>,
    /// Attached interfaces by ifindex, shared by the hops that cross them.
    names: RwLock<HashMap<u32, Arc<Iface>>>,
    /// Lost records and how far the reader has got.
    gaps: Mutex<Gaps>,
    liveness: Liveness,
    resync: Duration,
    pub api: crate::api::ApiCounters,
    /// Kernel map entries removed with the interfaces they were keyed with, so far.
    purged: Mutex<Purged>,
}

/// Flows judged per hold of the flow table by endpoints that judge them all.
const VISIT_CHUNK: usize = 4096;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the API down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(cfg: &AgentConfig) -> Shared {
        Shared {
            table: Mutex::new(FlowTable::new(cfg.flow_cap)),
            reasons: RwLock::new(DropReasons::default()),
            symbols: OnceLock::new(),
            node: RwLock::new(NodeView::default()),
            reader: Mutex::new(ReaderStats::default()),
            clock: Clock::new(),
            rules: cfg.rules.clone(),
            workload_prefix: cfg
                .roles
                .workload_prefixes
                .first()
                .cloned()
                .unwrap_or_else(|| crate::calico::DEFAULT_INTERFACE_PREFIX.into()),
            token: cfg.token.clone(),
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
    pub fn checks(&self) -> super::health::Checks {
        self.liveness
            .checks(mono_now_ns(), self.clock.start_ns(), self.resync)
    }

    pub(super) fn node(&self) -> RwLockReadGuard<'_, NodeView> {
        self.node.read().unwrap_or_else(|e| e.into_inner())
    }

    fn node_mut(&self) -> RwLockWriteGuard<'_, NodeView> {
        self.node.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_commands(&self, tx: mpsc::Sender<Command>) {
        let _ = self.commands.set(tx);
    }

    pub(super) fn set_reasons(&self, r: DropReasons) {
        *self.reasons.write().unwrap_or_else(|e| e.into_inner()) = r;
    }

    /// The programs cannot run here: say why, stay up, never become ready.
    pub(super) fn set_unsupported(&self, why: String) {
        self.liveness.set_unsupported();
        self.node_mut().unsupported = Some(why);
    }

    pub(super) fn set_tc_backend(&self, tc: crate::hooks::TcBackend) {
        self.node_mut().tc = Some(tc);
    }

    pub(super) fn set_drop_tracing(&self, d: DropTracing) {
        self.node_mut().drops = d;
    }

    pub(super) fn set_attached(&self, attached: Vec<AttachedIface>) {
        self.intern(&attached);
        self.node_mut().attached = attached;
    }

    /// Names an interface about to be attached, so its first records carry its name and role.
    pub(super) fn announce(&self, ifindex: u32, name: &str, role: Role) {
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

    pub(super) fn note_purged(&self, p: Purged) {
        let mut total = lock(&self.purged);
        total.flows += p.flows;
        total.turns += p.turns;
        total.scanned += p.scanned;
    }

    pub(super) fn set_counters(&self, c: KernelCounters) {
        *lock(&self.counters) = Some(c);
    }

    /// The kernel's counters, read now.
    pub fn kernel(&self) -> KernelStats {
        lock(&self.counters)
            .as_ref()
            .map(KernelCounters::read)
            .unwrap_or_default()
    }

    pub(super) fn sweep(&self, now_ns: u64) {
        lock(&self.table).sweep(now_ns);
        // Follow wall-clock steps (NTP) in rendered times and since= filters.
        self.clock.resync();
    }

    pub(super) fn update_node(&self, facts: NodeFacts, pools: Pools, attached: Vec<AttachedIface>) {
        self.intern(&attached);
        let mut node = self.node_mut();
        node.facts = facts;
        node.pools = pools;
        node.attached = attached;
        node.ready = true;
    }

    /// True when no token is configured or `header` carries it.
    pub fn authorized(&self, header: Option<&str>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        // Constant time in the token's length, so a timing probe learns nothing of its prefix.
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
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
    pub(super) fn reader_drained(&self, now_ns: u64) {
        let lost = lock(&self.counters).as_ref().map(KernelCounters::lost);
        let mut gaps = lock(&self.gaps);
        match lost {
            Some(lost) => gaps.look(now_ns, lost),
            None => gaps.drained(now_ns),
        }
    }

    /// The reader has been idle a while with the ring empty.
    pub(super) fn reader_idle(&self, now_ns: u64) {
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
    pub(super) fn with_context<T>(&self, f: impl FnOnce(&Context<'_>, &FlowTable) -> T) -> T {
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
    pub(super) fn matcher<'q>(&self, q: &'q FlowQuery, now_ns: u64) -> impl Fn(&Flow) -> bool + 'q {
        let veth = q.pod.as_ref().map(|(ns, name)| self.pod_veth(ns, name));
        let since_ns = match q.since {
            Some(Since::Ago(d)) => now_ns.saturating_sub(d.as_nanos() as u64),
            Some(Since::At(t)) => self.clock.mono_of(t),
            None => 0,
        };
        move |f: &Flow| {
            q.matches_tuple(f)
                && f.last_ns >= since_ns
                && veth
                    .as_deref()
                    .is_none_or(|v| f.hops.iter().any(|h| *h.iface.name == *v))
        }
    }

    /// GET /flows: the answer's JSON, serialized while the table is held (no copy of the flows).
    pub fn flows(&self, q: &FlowQuery) -> FlowsAnswer {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        if q.verdict.is_some() || q.cause.is_some() {
            return self.flows_judged(q, limit);
        }
        // Judging is the expensive part: only the flows rendered are judged, the rest counted.
        self.with_context(|cx, table| {
            let mut shown = Vec::new();
            let mut matched = 0usize;
            let matches = self.matcher(q, cx.now_ns);
            let (src, dst) = q.hosts();
            for f in table.iter_newest_with(src, dst) {
                if !matches(f) {
                    continue;
                }
                matched += 1;
                if shown.len() < limit {
                    shown.push((f, judge(f, cx)));
                }
            }
            self.page(cx, &shown, matched)
        })
    }

    /// `/flows` with a verdict or cause filter: every candidate must be judged, a part of the
    /// table at a time (see [`super::FlowCursor`]).
    fn flows_judged(&self, q: &FlowQuery, _limit: usize) -> FlowsAnswer {
        let mut cur = super::FlowCursor::new(q.clone());
        let mut json = Vec::new();
        while !cur.done() {
            json.extend(self.flows_chunk(&mut cur));
        }
        FlowsAnswer {
            json,
            matched: cur.matched(),
        }
    }

    fn page(&self, cx: &Context<'_>, shown: &[(&Flow, Judgement)], matched: usize) -> FlowsAnswer {
        let page = FlowsPage {
            truncated: matched > shown.len(),
            flows: shown
                .iter()
                .map(|(f, j)| FlowView::new(f, j, &self.clock, cx))
                .collect(),
            matched,
        };
        FlowsAnswer {
            json: serde_json::to_vec(&page).unwrap_or_else(|_| b"{}".to_vec()),
            matched,
        }
    }

    /// Faulty flows grouped by cause, plus what the node's configuration alone shows.
    pub fn diagnoses(&self) -> Value {
        #[derive(Default)]
        struct Group {
            count: u64,
            first_ns: u64,
            last_ns: u64,
            latest: Option<(u64, crate::diagnose::Diagnosis)>,
            examples: Vec<u64>,
            /// Flows of the group whose records may be partial.
            incomplete: u64,
        }
        let mut groups: std::collections::BTreeMap<&'static str, Group> = Default::default();
        let mut judged = 0u64;
        let mut incomplete = 0u64;
        self.visit_chunked(|cx, f| {
            judged += 1;
            let j = judge(f, cx);
            if j.lost_records > 0 {
                incomplete += 1;
            }
            if let Some(d) = j.diagnosis {
                // Keyed by name: causes with equal counts stay in alphabetical order.
                let g = groups.entry(d.cause.as_str()).or_default();
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
            let mut causes: Vec<Value> = groups
                .into_iter()
                .filter_map(|(cause, g)| {
                    let (_, d) = g.latest?;
                    Some(json!({
                        "cause": cause,
                        "count": g.count,
                        "first_seen": self.clock.rfc3339(g.first_ns),
                        "last_seen": self.clock.rfc3339(g.last_ns),
                        "summary": d.summary,
                        "evidence": d.evidence,
                        "fix": d.fix,
                        "example_flows": g.examples,
                        "evidence_incomplete": g.incomplete,
                    }))
                })
                .collect();
            causes.sort_by(|a, b| b["count"].as_u64().cmp(&a["count"].as_u64()));
            let gaps = cx.gaps;
            let evicted = table.stats().evicted;
            json!({
                "causes": causes,
                "node_findings": crate::diagnose::node_findings(cx),
                "flows_judged": judged,
                // What the answer may be missing: lost records make flows partial (they are
                // never called unanswered for it); evicted flows are gone from the answer.
                "evidence": {
                    "complete": gaps.total_lost() == 0 && evicted == 0,
                    "lost_records": gaps.total_lost(),
                    "flows_with_incomplete_evidence": incomplete,
                    "flows_evicted": evicted,
                    "reader_lag_ms": cx.now_ns.saturating_sub(cx.evidence_now_ns()) / 1_000_000,
                },
            })
        })
    }

    pub fn flow(&self, id: u64) -> Option<Value> {
        self.with_context(|cx, table| {
            table
                .get(id)
                .map(|f| flow_json(f, &judge(f, cx), &self.clock, cx))
        })
    }

    /// Ready once the programs are loaded and the first interface sync is done, while healthy.
    /// `detail` (authorized callers only) adds what is attached and whether drops are traced.
    pub fn readiness(&self, detail: bool) -> (bool, Value) {
        let healthy = !self.checks().failing();
        let node = self.node();
        let ready = node.ready && healthy;
        let mut v = json!({"ready": ready});
        if detail {
            v["attached"] = json!(node.attached.len());
            v["drops"] = json!(node.drops);
        }
        (ready, v)
    }

    /// The flow's kept records as pcapng; None when there is no such flow or no record left.
    pub fn pcap(&self, id: u64) -> Result<Option<Vec<u8>>, crate::api::pcap::PcapError> {
        let names: HashMap<u32, String> = {
            let node = self.node();
            node.facts
                .links
                .values()
                .map(|l| (l.index, l.name.clone()))
                .collect()
        };
        let table = lock(&self.table);
        if table.get(id).is_none() {
            return Ok(None);
        }
        let samples = table.samples().of(id);
        if samples.is_empty() {
            return Ok(None);
        }
        crate::api::pcap::flow_pcapng(
            &samples,
            |i| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}")),
            &self.clock,
        )
        .map(Some)
    }

    /// Prometheus exposition of the agent's state.
    pub fn metrics(&self) -> String {
        let mut by_verdict: HashMap<Verdict, u64> = HashMap::new();
        let mut by_cause: HashMap<Cause, u64> = HashMap::new();
        self.visit_chunked(|cx, f| {
            let j = judge(f, cx);
            for x in &j.verdicts {
                *by_verdict.entry(*x).or_default() += 1;
            }
            if let Some(d) = j.diagnosis {
                *by_cause.entry(d.cause).or_default() += 1;
            }
            true
        });
        let (flows, table) = {
            let t = lock(&self.table);
            (t.len(), t.stats())
        };
        let node = self.node();
        let reader = *lock(&self.reader);
        let mut roles: HashMap<&'static str, u64> = HashMap::new();
        for a in &node.attached {
            *roles.entry(a.role.as_str()).or_default() += 1;
        }
        let counter = |name, help, v: u64| Family {
            name,
            help,
            kind: "counter",
            samples: vec![(String::new(), v as f64)],
        };
        let k = self.kernel();
        let api = self.api.snapshot();
        let interned = self.names.read().unwrap_or_else(|e| e.into_inner()).len();
        let fp = super::footprint::Footprint::now();
        let gauge = |name, help, v: f64| Family {
            name,
            help,
            kind: "gauge",
            samples: vec![(String::new(), v)],
        };
        let purged = *lock(&self.purged);
        let mut own = vec![
            Family {
                name: "tracer_kernel_entries_purged_total",
                help: "Kernel map entries removed with the interface they were keyed with.",
                kind: "counter",
                samples: vec![
                    ("map=\"flows\"".to_string(), purged.flows as f64),
                    ("map=\"turns\"".to_string(), purged.turns as f64),
                ],
            },
            gauge(
                "process_resident_memory_bytes",
                "Resident memory of the agent process.",
                fp.rss_bytes as f64,
            ),
            gauge(
                "process_open_fds",
                "Open file descriptors of the agent process.",
                fp.fds as f64,
            ),
            gauge(
                "tracer_interfaces_interned",
                "Interface records interned for naming hops: one per attached interface.",
                interned as f64,
            ),
            gauge(
                "tracer_interface_records",
                "Interface records alive: the interned ones plus those only flows over renamed \
                 or deleted interfaces still hold (freed as those flows are evicted).",
                Iface::live() as f64,
            ),
            gauge(
                "tracer_bpf_links",
                "BPF link objects the agent holds open (two per interface under TCX).",
                fp.bpf_links as f64,
            ),
        ];
        if let (Some(used), Some(free)) = (fp.heap_bytes, fp.heap_free_bytes) {
            own.push(gauge(
                "tracer_heap_bytes",
                "Heap bytes in use by the agent (malloc's view).",
                used as f64,
            ));
            own.push(gauge(
                "tracer_heap_free_bytes",
                "Heap bytes malloc holds but are free (fragmentation, untrimmed).",
                free as f64,
            ));
        }
        let mut families = vec![
            Family {
                name: "tracer_flows",
                help: "Flows in the agent's table.",
                kind: "gauge",
                samples: vec![(String::new(), flows as f64)],
            },
            Family {
                name: "tracer_flows_by_verdict",
                help: "Flows in the table by verdict.",
                kind: "gauge",
                samples: Verdict::ALL
                    .iter()
                    .map(|v| {
                        (
                            format!("verdict=\"{}\"", label(v.as_str())),
                            *by_verdict.get(v).unwrap_or(&0) as f64,
                        )
                    })
                    .collect(),
            },
            Family {
                name: "tracer_flows_by_cause",
                help: "Flows in the table by diagnosed cause.",
                kind: "gauge",
                samples: Cause::ALL
                    .iter()
                    .map(|c| {
                        (
                            format!("cause=\"{}\"", label(c.as_str())),
                            *by_cause.get(c).unwrap_or(&0) as f64,
                        )
                    })
                    .collect(),
            },
            counter(
                "tracer_kernel_packets_total",
                "Packets the tc programs saw.",
                k.packets,
            ),
            counter(
                "tracer_kernel_records_total",
                "Records the kernel wrote to the ring buffer.",
                k.records,
            ),
            counter(
                "tracer_kernel_records_lost_total",
                "Records lost because the ring buffer was full.",
                k.lost,
            ),
            counter(
                "tracer_kernel_malformed_total",
                "Packets whose headers could not be parsed.",
                k.malformed,
            ),
            counter(
                "tracer_kernel_drops_total",
                "Kernel drops with a reportable reason (any packet).",
                k.drops,
            ),
            Family {
                name: "tracer_ringbuf_pending_bytes",
                help:
                    "Ring-buffer bytes not yet consumed by the agent, as last seen by the kernel.",
                kind: "gauge",
                samples: vec![(String::new(), k.ringbuf_pending_bytes as f64)],
            },
            Family {
                name: "tracer_attached_interfaces",
                help: "Interfaces with tracer's tc programs, by role.",
                kind: "gauge",
                samples: ["workload", "tunnel", "host"]
                    .iter()
                    .map(|r| (format!("role=\"{r}\""), *roles.get(r).unwrap_or(&0) as f64))
                    .collect(),
            },
            counter(
                "tracer_records_decoded_total",
                "Ring-buffer records the agent read.",
                reader.records,
            ),
            counter(
                "tracer_decode_errors_total",
                "Ring-buffer records the agent could not decode.",
                reader.decode_errors,
            ),
            Family {
                name: "tracer_api_connections",
                help: "API connections open now.",
                kind: "gauge",
                samples: vec![(String::new(), api.connections as f64)],
            },
            counter(
                "tracer_api_connections_rejected_total",
                "API connections refused because all connection slots were taken.",
                api.connections_rejected,
            ),
            Family {
                name: "tracer_api_watchers",
                help: "/watch streams open now.",
                kind: "gauge",
                samples: vec![(String::new(), api.watchers as f64)],
            },
            counter(
                "tracer_api_watchers_rejected_total",
                "/watch requests refused (429) because --max-watchers streams were open.",
                api.watchers_rejected,
            ),
            counter(
                "tracer_flows_evicted_total",
                "Flows evicted because the table was full.",
                table.evicted,
            ),
            counter(
                "tracer_drops_matched_total",
                "Kernel drops attributed to a traced flow.",
                table.drops,
            ),
        ];
        families.extend(own);
        render(&families)
    }

    /// `/healthz`: healthy (false: answer 503) and the body. Without `detail` (callers without
    /// the token) the body holds fixed words only: no interface names (they tell which pod runs
    /// where), no pools, no error text.
    pub fn health(&self, detail: bool) -> (bool, Value) {
        let checks = self.checks();
        let now = mono_now_ns();
        let node = self.node();
        let status = if node.unsupported.is_some() {
            "unsupported"
        } else if checks.failing() {
            "failing"
        } else if node.ready {
            "ok"
        } else {
            "starting"
        };
        let mut v = json!({
            "status": status,
            "ready": node.ready,
            "checks": checks,
        });
        if detail {
            if let Some(why) = &node.unsupported {
                v["unsupported"] = json!(why);
            }
            v["tc"] = json!(node.tc);
            let table = lock(&self.table).stats();
            let reader = *lock(&self.reader);
            let mut reader = json!(reader);
            reader["idle_ms"] = json!(self.liveness.reader_idle_ms(now));
            v["drops"] = json!(node.drops);
            v["attached"] = json!(node.attached);
            v["pools"] = json!(node.pools);
            v["kernel"] = json!(self.kernel());
            v["reader"] = reader;
            v["node_sync_age_ms"] = json!(self.liveness.sync_age_ms(now));
            v["flows"] = json!(table);
            v["api"] = json!(self.api.snapshot());
            v["uptime_s"] =
                json!(Duration::from_nanos(now.saturating_sub(self.clock.start_ns())).as_secs());
        }
        (!checks.failing(), v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::Dir,
        testutil::{obs, tcp},
    };

    /// A table spanning several visiting chunks of unanswered SYNs (ids 1..=n).
    fn unanswered(n: u32) -> Shared {
        let shared = Shared::new(&AgentConfig {
            flow_cap: n as usize,
            ..AgentConfig::default()
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
    fn judging_endpoints_see_every_flow_across_chunks() -> Result<(), crate::api::query::QueryError>
    {
        let n = 3 * VISIT_CHUNK as u32 + 17;
        let shared = unanswered(n);
        assert_eq!(shared.diagnoses()["flows_judged"], n);
        let metrics = shared.metrics();
        assert!(
            metrics.contains(&format!(
                "tracer_flows_by_verdict{{verdict=\"no_reply\"}} {n}"
            )),
            "{metrics}"
        );
        let q = FlowQuery::parse(Some("verdict=no_reply&limit=5"))?;
        let answer = shared.flows(&q);
        let v: Value = serde_json::from_slice(&answer.json).unwrap_or_default();
        assert_eq!(
            (answer.matched, &v["truncated"]),
            (n as usize, &json!(true))
        );
        let ids: Vec<u64> = v["flows"]
            .as_array()
            .map(|a| a.iter().filter_map(|f| f["id"].as_u64()).collect())
            .unwrap_or_default();
        let newest = u64::from(n);
        assert_eq!(ids, (newest - 4..=newest).rev().collect::<Vec<_>>());
        // Without a verdict filter the same flows come from one pass.
        let q = FlowQuery::parse(Some("limit=5"))?;
        assert_eq!(shared.flows(&q).matched, n as usize);
        Ok(())
    }

    /// `v` without the waits measured up to now (they differ between two answers).
    fn timeless(mut v: Value) -> Value {
        fn strip(v: &mut Value) {
            match v {
                Value::Object(o) => {
                    o.remove("waited_ms");
                    o.values_mut().for_each(strip);
                }
                Value::Array(a) => a.iter_mut().for_each(strip),
                _ => {}
            }
        }
        strip(&mut v);
        v
    }

    #[test]
    fn streamed_flows_equal_the_one_pass_answer() -> Result<(), crate::api::query::QueryError> {
        let n = 2 * VISIT_CHUNK as u32 + 5;
        let shared = unanswered(n);
        for query in ["limit=100000", "limit=700", "dst=10.96.0.7&limit=3000"] {
            let q = FlowQuery::parse(Some(query))?;
            let one: Value = serde_json::from_slice(&shared.flows(&q).json).unwrap_or_default();
            let mut cur = super::super::FlowCursor::new(q);
            let mut parts = 0;
            let mut body = Vec::new();
            while !cur.done() {
                body.extend(shared.flows_chunk(&mut cur));
                parts += 1;
            }
            let streamed: Value = serde_json::from_slice(&body).unwrap_or_default();
            assert!(
                one["flows"].as_array().is_some_and(|f| !f.is_empty()),
                "{query}"
            );
            assert_eq!(timeless(one), timeless(streamed), "{query}");
            if query == "limit=100000" {
                assert!(parts > 4, "{parts} parts");
            }
        }
        Ok(())
    }
}

/// The API's answers for every verdict and cause, against tracer/tests/golden.
#[cfg(test)]
#[path = "golden.rs"]
mod golden;
