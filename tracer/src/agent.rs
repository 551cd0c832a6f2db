//! The agent: hooks -> events -> flows -> diagnoses -> API, wired together on tokio.
use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use serde_json::{json, Value};
use tokio::io::unix::AsyncFd;

use crate::{
    api::{self, query::FlowQuery, query::DEFAULT_LIMIT, view::flow_json},
    calico::{self, Pools, Role, RoleConfig},
    clock::{mono_now_ns, Clock},
    diagnose::{judge, Context, Rules},
    events,
    flows::FlowTable,
    hooks::{
        drops::{DropReasons, Symbols},
        AttachedIface, HookError, Hooks, KernelStats,
    },
    net::Cidr,
    netlink::{self, NodeFacts},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Hooks(#[from] HookError),
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("watching the ring buffer: {0}")]
    RingBuf(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub roles: RoleConfig,
    pub pools: Vec<Cidr>,
    pub masq_pools: Vec<Cidr>,
    pub rules: Rules,
    pub flow_cap: usize,
    pub summary_interval: Duration,
    /// Full resync of interfaces and pools even without netlink notifications.
    pub resync: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            roles: RoleConfig::default(),
            pools: Vec::new(),
            masq_pools: Vec::new(),
            rules: Rules::default(),
            flow_cap: 100_000,
            summary_interval: Duration::from_secs(1),
            resync: Duration::from_secs(10),
        }
    }
}

/// What the node looks like right now.
#[derive(Debug, Default)]
pub struct NodeView {
    pub facts: NodeFacts,
    pub pools: Pools,
    pub attached: Vec<AttachedIface>,
    pub kernel: KernelStats,
    /// The first interface sync has finished.
    pub ready: bool,
    /// Whether kernel drops are traced, and why not.
    pub drops: DropTracing,
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

/// State shared between the reader, the sync loop and the API.
pub struct Shared {
    table: Mutex<FlowTable>,
    reasons: RwLock<DropReasons>,
    /// Loaded on first use: only drops need it, and it is a few MB.
    symbols: OnceLock<Symbols>,
    node: RwLock<NodeView>,
    reader: Mutex<ReaderStats>,
    clock: Clock,
    rules: Rules,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
        }
    }

    fn node(&self) -> std::sync::RwLockReadGuard<'_, NodeView> {
        self.node.read().unwrap_or_else(|e| e.into_inner())
    }

    fn node_mut(&self) -> std::sync::RwLockWriteGuard<'_, NodeView> {
        self.node.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Ingests a batch of raw ring-buffer records.
    pub fn ingest(&self, records: &[Vec<u8>]) {
        let roles: HashMap<u32, (String, Role)> = self
            .node()
            .attached
            .iter()
            .map(|a| (a.ifindex, (a.name.clone(), a.role)))
            .collect();
        let lookup = |ifindex: u32| match roles.get(&ifindex) {
            Some((n, r)) => (n.clone(), Some(*r)),
            None => (format!("if{ifindex}"), None),
        };
        let mut errors = 0u64;
        {
            let mut table = lock(&self.table);
            for r in records {
                match events::decode(r) {
                    Ok(obs) => {
                        table.ingest(&obs, &lookup);
                    }
                    Err(e) => {
                        errors += 1;
                        tracing::debug!(error = %e, "undecodable record");
                    }
                }
            }
        }
        let mut st = lock(&self.reader);
        st.records += records.len() as u64;
        st.decode_errors += errors;
    }

    /// Runs `f` with everything the diagnosis rules need, consistent for one answer.
    fn with_context<T>(&self, f: impl FnOnce(&Context<'_>, &FlowTable) -> T) -> T {
        static NO_SYMBOLS: OnceLock<Symbols> = OnceLock::new();
        let node = self.node();
        let reasons = self.reasons.read().unwrap_or_else(|e| e.into_inner());
        let table = lock(&self.table);
        let symbols = if table.stats().drops > 0 {
            self.symbols.get_or_init(Symbols::load)
        } else {
            NO_SYMBOLS.get_or_init(Symbols::default)
        };
        let cx = Context {
            pools: &node.pools,
            facts: &node.facts,
            now_ns: mono_now_ns(),
            rules: &self.rules,
            reasons: &reasons,
            symbols,
        };
        f(&cx, &table)
    }

    pub fn flows(&self, q: &FlowQuery) -> Value {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        self.with_context(|cx, table| {
            let mut out = Vec::new();
            let mut matched = 0usize;
            for f in table.iter_newest() {
                if !q.matches_tuple(f) {
                    continue;
                }
                let j = judge(f, cx);
                if q.verdict.is_some_and(|v| !j.verdicts.contains(&v)) {
                    continue;
                }
                if q.cause
                    .is_some_and(|c| j.diagnosis.as_ref().map(|d| d.cause) != Some(c))
                {
                    continue;
                }
                matched += 1;
                if out.len() < limit {
                    out.push(flow_json(f, &j, &self.clock));
                }
            }
            json!({"flows": out, "matched": matched, "truncated": matched > out.len()})
        })
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
        }
        self.with_context(|cx, table| {
            let mut groups: std::collections::BTreeMap<&'static str, Group> = Default::default();
            let mut judged = 0u64;
            for f in table.iter_newest() {
                judged += 1;
                let Some(d) = judge(f, cx).diagnosis else {
                    continue;
                };
                let g = groups.entry(d.cause).or_default();
                g.count += 1;
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
                    }))
                })
                .collect();
            causes.sort_by(|a, b| b["count"].as_u64().cmp(&a["count"].as_u64()));
            json!({
                "causes": causes,
                "node_findings": crate::diagnose::node_findings(cx),
                "flows_judged": judged,
            })
        })
    }

    pub fn flow(&self, id: u64) -> Option<Value> {
        self.with_context(|cx, table| {
            table
                .get(id)
                .map(|f| flow_json(f, &judge(f, cx), &self.clock))
        })
    }

    pub fn health(&self) -> Value {
        let node = self.node();
        let table = lock(&self.table).stats();
        let reader = *lock(&self.reader);
        json!({
            "status": if node.ready { "ok" } else { "starting" },
            "ready": node.ready,
            "drops": node.drops,
            "attached": node.attached,
            "pools": node.pools,
            "kernel": node.kernel,
            "reader": reader,
            "flows": table,
        })
    }
}

/// Runs the agent until `shutdown` resolves; tc programs are detached before returning.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let (mut hooks, ring) = Hooks::load(cfg.summary_interval.as_nanos() as u64)?;
    let shared = Arc::new(Shared::new(&cfg));
    // Drop tracing is a bonus: without tracefs or BTF the agent still traces paths.
    let drops = match hooks.enable_drops() {
        Ok(reasons) => {
            *shared.reasons.write().unwrap_or_else(|e| e.into_inner()) = reasons;
            DropTracing {
                enabled: true,
                error: None,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "kernel drops will not be reported");
            DropTracing {
                enabled: false,
                error: Some(e.to_string()),
            }
        }
    };
    shared.node_mut().drops = drops;
    let listener = api::bind(cfg.listen).await?;
    tracing::info!(listen = %cfg.listen, "serving the API");

    let (conn, handle, _) = rtnetlink::new_connection().map_err(netlink::NetlinkError::from)?;
    tokio::spawn(conn);
    let mut changes = netlink::watch()?;

    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the AsyncFd
    // (and the RingBuf inside it) is dropped.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| AgentError::RingBuf(std::io::Error::other(e.to_string())))?;
    let reader = tokio::spawn(read_events(ring, shared.clone()));
    let server = tokio::spawn(api::serve(listener, shared.clone()));

    let mut resync = tokio::time::interval(cfg.resync);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    sync(&handle, &cfg, &mut hooks, &shared).await;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = changes.recv() => {
                // Coalesce a burst (a pod start creates a veth, addresses and routes at once).
                tokio::time::sleep(Duration::from_millis(20)).await;
                while changes.try_recv().is_ok() {}
                sync(&handle, &cfg, &mut hooks, &shared).await;
            }
            _ = resync.tick() => sync(&handle, &cfg, &mut hooks, &shared).await,
            _ = tick.tick() => {
                shared.node_mut().kernel = hooks.kernel_stats();
                lock(&shared.table).sweep(mono_now_ns());
            }
        }
    }
    tracing::info!("shutting down: detaching tc programs");
    reader.abort();
    server.abort();
    hooks.detach_all();
    Ok(())
}

/// Re-reads the node and makes the attachments match the roles.
async fn sync(handle: &rtnetlink::Handle, cfg: &AgentConfig, hooks: &mut Hooks, shared: &Shared) {
    let facts = match netlink::snapshot(handle).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "reading interfaces failed; keeping the previous view");
            return;
        }
    };
    let pools = calico::read_pools(&cfg.pools, &cfg.masq_pools);
    let mut wanted = BTreeSet::new();
    for link in facts.links.values() {
        let Some(role) = cfg.roles.role_of(link, &facts) else {
            continue;
        };
        wanted.insert(link.index);
        hooks.rename(link.index, &link.name);
        if !hooks.is_attached(link.index) {
            if let Err(e) = hooks.attach(link, role, "auto") {
                tracing::warn!(error = %e, "attach failed; will retry on the next sync");
                wanted.remove(&link.index);
            }
        }
    }
    for a in hooks.attached() {
        if !wanted.contains(&a.ifindex) {
            hooks.detach(a.ifindex);
        }
    }
    let mut node = shared.node_mut();
    node.facts = facts;
    node.pools = pools;
    node.attached = hooks.attached();
    node.kernel = hooks.kernel_stats();
    node.ready = true;
}

async fn read_events(mut ring: AsyncFd<RingBuf<MapData>>, shared: Arc<Shared>) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(1024);
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "ring buffer poll failed; reader stops");
                return;
            }
        };
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            batch.push(item.to_vec());
            if batch.len() >= 4096 {
                shared.ingest(&batch);
                batch.clear();
            }
        }
        guard.clear_ready();
        if !batch.is_empty() {
            shared.ingest(&batch);
            batch.clear();
        }
    }
}
