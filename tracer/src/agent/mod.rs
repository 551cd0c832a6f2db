//! The agent: hooks -> events -> flows -> state -> API, wired together on tokio. It owns the
//! kernel programs (the sync loop) and the ring reader thread; the API reads the state.
mod control;
mod flowlog;

pub use flowlog::FlowLogTarget;

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc;
use tracer_model::AttachHow;

pub use crate::state::Fault;

use crate::{
    api,
    calico::{self, Role, RoleConfig},
    clock::mono_now_ns,
    diagnose::Rules,
    felix_bpf,
    hooks::{HookError, Hooks, LoadOptions, TcBackend, TcMode},
    net::Cidr,
    netlink,
    state::{footprint, health, Command, DropTracing, Shared, StateConfig},
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
    #[error("reading the token file {0}: {1}")]
    Token(String, std::io::Error),
    #[error("the token file {0} is empty")]
    EmptyToken(String),
    #[error("opening the flow log {0}: {1}")]
    FlowLog(String, std::io::Error),
    #[error(
        "refusing to serve the API on {0} without a token: anyone on that network could read \
         the node's traffic. Give --token-file, listen on loopback, or pass --insecure"
    )]
    Insecure(SocketAddr),
    #[error("identity: {0}")]
    Identity(String),
}

/// Whether the agent attaches by itself or only when a client asks (POST /attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachMode {
    #[default]
    Auto,
    OnDemand,
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
    pub attach: AttachMode,
    /// Bearer token every endpoint but /healthz and /readyz requires.
    pub token: Option<String>,
    /// Ring buffer size; None keeps the compiled-in 8 MiB.
    pub ringbuf_bytes: Option<u32>,
    pub tc_mode: TcMode,
    /// Entries of the kernel's per-hook flow and turn maps.
    pub kernel_flow_entries: u32,
    /// Serve a non-loopback address without a token anyway.
    pub insecure: bool,
    pub api: api::ApiLimits,
    /// Where felix pins its eBPF dataplane's maps (its mode is told by them).
    pub felix_bpf_dir: std::path::PathBuf,
    /// Where pod, Service and node names come from (off by default).
    pub identity: crate::identity::IdentityConfig,
    /// Write every flow once, as NDJSON, here.
    pub flow_log: Option<FlowLogTarget>,
    /// The node's name, for the flow log's lines.
    pub node_name: Option<String>,
}

impl AgentConfig {
    /// What the state needs of it.
    pub fn state(&self) -> StateConfig {
        StateConfig {
            flow_cap: self.flow_cap,
            rules: self.rules.clone(),
            workload_prefix: self
                .roles
                .workload_prefixes
                .first()
                .cloned()
                .unwrap_or_else(|| crate::calico::DEFAULT_INTERFACE_PREFIX.into()),
            resync: self.resync,
            flow_log: self.flow_log.is_some(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], tracer_model::defaults::API_PORT)),
            roles: RoleConfig::default(),
            pools: Vec::new(),
            masq_pools: Vec::new(),
            rules: Rules::default(),
            flow_cap: crate::state::DEFAULT_FLOW_CAP,
            summary_interval: crate::hooks::DEFAULT_SUMMARY_INTERVAL,
            resync: netlink::DEFAULT_RESYNC,
            attach: AttachMode::Auto,
            token: None,
            ringbuf_bytes: None,
            tc_mode: TcMode::Auto,
            kernel_flow_entries: crate::hooks::DEFAULT_KERNEL_FLOW_ENTRIES,
            insecure: false,
            api: api::ApiLimits::default(),
            felix_bpf_dir: crate::felix_bpf::GLOBALS_DIR.into(),
            identity: Default::default(),
            flow_log: None,
            node_name: None,
        }
    }
}

/// Runs the agent until `shutdown` resolves; tc programs are detached before returning.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    if cfg.token.as_deref().is_some_and(str::is_empty) {
        return Err(AgentError::EmptyToken("(given)".into()));
    }
    check_exposure(&cfg)?;
    // Opened first: a log that cannot be written stops the agent before it loads anything.
    let flow_log_sink = cfg
        .flow_log
        .as_ref()
        .map(flowlog::FlowLog::open)
        .transpose()?;
    let fault = Fault::from_env();
    let loaded = if fault == Some(Fault::KernelUnsupported) {
        Err(HookError::Kernel(
            "test fault: the kernel is taken to be older than 5.11".into(),
        ))
    } else {
        Hooks::load_opts(LoadOptions {
            summary_interval_ns: Some(cfg.summary_interval.as_nanos() as u64),
            ringbuf_bytes: cfg.ringbuf_bytes,
            kernel_flow_entries: Some(cfg.kernel_flow_entries),
            tc_mode: cfg.tc_mode,
        })
    };
    let (mut hooks, ring, counters) = match loaded {
        Ok(l) => l,
        Err(e) if e.is_unsupported_kernel() => return run_unsupported(&cfg, e, shutdown).await,
        Err(e) => return Err(e.into()),
    };
    tracing::info!(tc = hooks.backend().as_str(), "programs loaded");
    let shared = Arc::new(Shared::new(&cfg.state()));
    start_identity(&shared, &cfg.identity).await;
    let flow_log = match flow_log_sink {
        Some(sink) => {
            let log = flowlog::FlowLog::start(sink, cfg.node_name.clone(), shared.clone())?;
            tracing::info!(target = ?cfg.flow_log, "writing the flow log");
            Some(Arc::new(log))
        }
        None => None,
    };
    shared.set_counters(counters);
    shared.set_tc_backend(hooks.backend());
    // Drop tracing is a bonus: without tracefs or BTF the agent still traces paths.
    let drops = match hooks.enable_drops() {
        Ok(reasons) => {
            shared.set_reasons(reasons);
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
    shared.set_drop_tracing(drops);
    let listener = api::bind(cfg.listen).await?;
    tracing::info!(listen = %cfg.listen, "serving the API");

    let (conn, handle, _) = rtnetlink::new_connection().map_err(netlink::NetlinkError::from)?;
    tokio::spawn(conn);
    if hooks.backend() == TcBackend::Clsact {
        // A previous agent killed with SIGKILL (or by the OOM killer) left its clsact filters
        // behind: remove them before attaching, so each hook runs tracer once.
        match netlink::snapshot(&handle).await {
            Ok(facts) => {
                let links: Vec<(u32, String)> = facts
                    .links
                    .values()
                    .map(|l| (l.index, l.name.clone()))
                    .collect();
                let removed = Hooks::remove_stale_filters(&handle, &links).await;
                if !removed.is_empty() {
                    tracing::info!(count = removed.len(), "removed stale tracer filters");
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing interfaces for stale filters"),
        }
    }
    let mut changes = netlink::watch()?;

    let (cmd_tx, mut cmds) = mpsc::channel::<Command>(16);
    shared.set_commands(cmd_tx);
    // The reader has a thread of its own: no API request, judging or sync can delay it.
    let stop_reader = Arc::new(AtomicBool::new(false));
    // No pause after a drain of over a quarter of the ring: the reader is behind, or the ring
    // is small (`--ringbuf-bytes`; the kernel programs' default is 8 MiB), and could overflow.
    let pause_below = cfg.ringbuf_bytes.map_or(8 << 20, |b| b as usize) / 4;
    let reader = {
        let (shared, stop) = (shared.clone(), stop_reader.clone());
        std::thread::Builder::new()
            .name("ring-reader".into())
            .spawn(move || {
                let _exit = ReaderExit(&shared, &stop);
                read_events(ring, &shared, &stop, fault, pause_below);
            })
            .map_err(AgentError::RingBuf)?
    };
    let server = tokio::spawn(api::serve(
        listener,
        shared.clone(),
        cfg.api.clone(),
        cfg.token.clone(),
    ));

    let policy_counters = tokio::spawn(read_policy_counters(
        shared.clone(),
        cfg.felix_bpf_dir.clone(),
    ));
    let conntrack_stats = tokio::spawn(read_conntrack_stats(shared.clone()));
    let mut resync = tokio::time::interval(cfg.resync);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    let mut syncs = Syncs { fault, done: 0 };
    syncs.run(&handle, &cfg, &mut hooks, &shared).await;
    // Set when interfaces came or went: the syncs that followed freed their transient heap,
    // which the next tick hands back to the system.
    let mut trim_due = false;
    let mut tally: Option<tokio::task::JoinHandle<()>> = None;
    let mut leases = control::Leases::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = changes.recv() => {
                // Coalesce a burst (a pod start creates a veth, addresses and routes at once).
                tokio::time::sleep(Duration::from_millis(20)).await;
                while changes.try_recv().is_ok() {}
                trim_due |= syncs.run(&handle, &cfg, &mut hooks, &shared).await;
            }
            _ = resync.tick() => trim_due |= syncs.run(&handle, &cfg, &mut hooks, &shared).await,
            Some(cmd) = cmds.recv() => {
                // Act on the freshest view: the pod's veth may have just appeared.
                trim_due |= syncs.run(&handle, &cfg, &mut hooks, &shared).await;
                control::handle(cmd, &cfg, &mut hooks, &mut leases, &shared);
            }
            _ = tick.tick() => {
                control::expire(std::time::Instant::now(), &mut hooks, &mut leases, &shared);
                shared.sweep(mono_now_ns());
                // Diagnoses are counted as flows reach them, not only when scraped: a flow
                // evicted between two scrapes still counts. Off the loop, one at a time.
                // The flow log's flows are the tally's settled ones: it tallies first.
                if tally.as_ref().is_none_or(|t| t.is_finished()) {
                    let (shared, flow_log) = (shared.clone(), flow_log.clone());
                    tally = Some(tokio::task::spawn_blocking(move || match flow_log {
                        Some(log) => log.tick(&shared),
                        None => shared.tally(),
                    }));
                }
                if std::mem::take(&mut trim_due) {
                    let started = std::time::Instant::now();
                    let released = footprint::release_free_heap();
                    tracing::debug!(released, took = ?started.elapsed(), "returned free heap to the system");
                }
            }
        }
    }
    tracing::info!("shutting down: detaching tc programs");
    server.abort();
    policy_counters.abort();
    conntrack_stats.abort();
    hooks.detach_all();
    // The reader wakes every READER_WAKE and then sees the flag.
    stop_reader.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    if let Some(log) = flow_log {
        // Nothing changes the table any more: every flow not written yet is written now.
        if let Some(t) = tally {
            let _ = t.await;
        }
        let done = shared.clone();
        let _ = tokio::task::spawn_blocking(move || log.finish(&done)).await;
        if let Some(s) = shared.flow_log_stats() {
            tracing::info!(
                settled = s.settled,
                evicted = s.evicted,
                shutdown = s.shutdown,
                dropped = s.dropped,
                write_errors = s.write_errors,
                "flow log written"
            );
        }
    }
    Ok(())
}

/// The programs cannot run on this kernel (too old, a helper or map type missing, the verifier
/// refuses, not permitted): exiting would only make the kubelet restart the agent into the same
/// failure, forever. It says why once, serves `/healthz` (200, status `unsupported`) and never
/// becomes ready, so the DaemonSet shows the node as not ready instead of crash-looping.
async fn run_unsupported(
    cfg: &AgentConfig,
    why: HookError,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let reason = why.to_string();
    tracing::error!(
        error = %reason,
        kernel = %aya::util::KernelVersion::current().map(|v| v.to_string()).unwrap_or_default(),
        "tracer's programs cannot run on this kernel; serving /healthz with status `unsupported` \
         and staying not ready (see docs/compatibility.md)"
    );
    let shared = Arc::new(Shared::new(&cfg.state()));
    shared.set_unsupported(reason);
    let listener = api::bind(cfg.listen).await?;
    let server = tokio::spawn(api::serve(
        listener,
        shared,
        cfg.api.clone(),
        cfg.token.clone(),
    ));
    shutdown.await;
    server.abort();
    Ok(())
}

/// Without a token, only loopback is served unless the operator says otherwise.
fn check_exposure(cfg: &AgentConfig) -> Result<(), AgentError> {
    if cfg.token.is_none() && !cfg.listen.ip().is_loopback() {
        if !cfg.insecure {
            return Err(AgentError::Insecure(cfg.listen));
        }
        tracing::warn!(listen = %cfg.listen, "--insecure: serving the API without a token");
    }
    Ok(())
}

/// Marks the reader stopped however its thread ends, a panic included.
struct ReaderExit<'a>(&'a Shared, &'a AtomicBool);

impl Drop for ReaderExit<'_> {
    fn drop(&mut self) {
        self.0.liveness().reader_exited();
        if !self.1.load(Ordering::Relaxed) {
            tracing::error!("the ring-buffer reader stopped; /healthz now fails");
        }
    }
}

/// Node syncs, and the fault a test may inject into them.
struct Syncs {
    fault: Option<Fault>,
    done: u64,
}

impl Syncs {
    async fn run(
        &mut self,
        handle: &rtnetlink::Handle,
        cfg: &AgentConfig,
        hooks: &mut Hooks,
        shared: &Shared,
    ) -> bool {
        if self.fault == Some(Fault::SyncStuck) && self.done > 0 {
            return false;
        }
        match sync(handle, cfg, hooks, shared).await {
            Some(changed) => {
                self.done += 1;
                shared.liveness().sync_done(mono_now_ns());
                changed
            }
            None => false,
        }
    }
}

/// How long reading felix's ipsets may take in all: a hung `ipset` must not hold the sync loop.
const POOLS_DEADLINE: Duration = Duration::from_secs(5);
/// How long the netlink dump of links, addresses and routes may take.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(10);

/// Re-reads the node and makes the attachments match the roles; None when it could not, else
/// whether interfaces came or went.
async fn sync(
    handle: &rtnetlink::Handle,
    cfg: &AgentConfig,
    hooks: &mut Hooks,
    shared: &Shared,
) -> Option<bool> {
    let mut facts = match tokio::time::timeout(SNAPSHOT_DEADLINE, netlink::snapshot(handle)).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reading interfaces failed; keeping the previous view");
            return None;
        }
        Err(_) => {
            tracing::warn!("reading interfaces timed out; keeping the previous view");
            return None;
        }
    };
    // /proc/net/tcp holds every socket of the node's namespace: off the async threads.
    facts.own_sockets = tokio::task::spawn_blocking(crate::own_sockets::read)
        .await
        .unwrap_or_default();
    let links_changed = !facts.links.keys().eq(shared.node().facts.links.keys());
    let pools = calico::read_pools(&cfg.pools, &cfg.masq_pools, POOLS_DEADLINE).await;
    let mut wanted = BTreeSet::new();
    // On-demand attachments stay while their interface exists.
    for a in hooks.attached() {
        if a.how == AttachHow::OnDemand {
            if let Some(link) = facts.link(a.ifindex) {
                wanted.insert(a.ifindex);
                hooks.rename(a.ifindex, &link.name);
            }
        }
    }
    for link in facts.links.values() {
        if cfg.attach == AttachMode::OnDemand {
            break;
        }
        let Some(role) = cfg.roles.role_of(link, &facts) else {
            continue;
        };
        wanted.insert(link.index);
        hooks.rename(link.index, &link.name);
        if !hooks.is_attached(link.index) {
            // Name the interface for the reader before its first record can arrive.
            shared.announce(link.index, &link.name, role);
            if let Err(e) = hooks.attach(link, role, AttachHow::Auto) {
                tracing::warn!(error = %e, "attach failed; will retry on the next sync");
                wanted.remove(&link.index);
            }
        }
    }
    let mut detached = false;
    for a in hooks.attached() {
        if !wanted.contains(&a.ifindex) {
            hooks.detach(a.ifindex);
            detached = true;
        }
    }
    if detached {
        purge_kernel_state(hooks, shared);
    }
    let attached = hooks.attached();
    // felix can switch dataplanes while tracer runs: looked for on every sync (two stats and
    // a query of each host NIC's hooks).
    let host_ifaces: Vec<String> = attached
        .iter()
        .filter(|a| a.role == Role::Host)
        .map(|a| a.name.to_string())
        .collect();
    let mut pools = pools;
    pools.ebpf = felix_bpf::detect(
        &cfg.felix_bpf_dir,
        &host_ifaces,
        hooks.backend() == TcBackend::Tcx,
    );
    if pools.ebpf.is_some() != shared.node().pools.ebpf.is_some() {
        tracing::info!(
            ebpf = pools.ebpf.is_some(),
            "felix's eBPF dataplane {}",
            if pools.ebpf.is_some() {
                "detected: verdicts it makes untrustworthy are off"
            } else {
                "not (or no longer) detected"
            }
        );
    }
    shared.update_node(facts, pools, attached);
    Some(detached || links_changed)
}

/// After letting go of interfaces, their entries in the kernel's per-hook maps go too.
fn purge_kernel_state(hooks: &mut Hooks, shared: &Shared) {
    let started = std::time::Instant::now();
    match hooks.purge_unattached() {
        Ok(p) => {
            tracing::debug!(
                flows = p.flows,
                turns = p.turns,
                cache_slots = p.cached,
                scanned = p.scanned,
                took = ?started.elapsed(),
                "purged kernel state of detached interfaces"
            );
            shared.note_purged(p);
        }
        Err(e) => tracing::warn!(error = %e, "purging kernel state of detached interfaces"),
    }
}

/// How long the reader waits after a drain that found records before it looks again: at 40k
/// records/s a wake per 200 records instead of one per few, for at most this much later
/// evidence (the 8 MiB ring holds ~50k records of 160 bytes, over a second at that rate).
const BATCH_PAUSE: Duration = Duration::from_millis(5);
/// The reader pauses only while more than this many records arrived in the current and the
/// previous [`BUSY_WINDOW_NS`] (about 2,500 a second): a quiet node's records, even a burst such as one connection's handshake
/// and teardown at every hook (each record of it can wake the reader), are read as they come,
/// and a busy node's in batches. Counted in records, not wakes: pausing itself makes wakes rare.
const BUSY_RECORDS: u64 = 500;
const BUSY_WINDOW_NS: u64 = 100_000_000;

/// Drains the ring buffer into the flow table until `stop`; beats at every wake and batch, so
/// `/healthz` tells an idle reader (beating) from a stuck one (silent).
fn read_events(
    mut ring: RingBuf<MapData>,
    shared: &Shared,
    stop: &AtomicBool,
    fault: Option<Fault>,
    pause_below: usize,
) {
    let mut batch: Vec<crate::events::Observation> = Vec::with_capacity(1024);
    let mut errors = 0u64;
    // Records read in the current window and in the one before it: a new window starts from
    // the last one's rate, not from nothing.
    let (mut window_ns, mut records, mut before) = (0u64, 0u64, 0u64);
    let fd = ring.as_raw_fd();
    let wake_ms = health::READER_WAKE.as_millis() as i32;
    while !stop.load(Ordering::Relaxed) {
        match fault {
            Some(Fault::ReaderExits) => {
                tracing::error!("test fault: the ring reader exits");
                return;
            }
            Some(Fault::ReaderStalls) => {
                // Alive but silent, as if stuck: it only watches for shutdown.
                std::thread::sleep(health::READER_WAKE);
                continue;
            }
            _ => {}
        }
        shared.liveness().reader_beat(mono_now_ns());
        // Decode outside the table lock; ingest in batches to take the lock rarely. The drain
        // point is a time at which the ring was empty: taken before a look that found nothing,
        // so no record written before it can still be waiting.
        // Passes until one finds the ring empty; the clock is read once a pass, not a record.
        let mut found = 0u64;
        let mut drained_bytes = 0usize;
        let drained_at = loop {
            let before = mono_now_ns();
            let mut got = 0usize;
            while let Some(item) = ring.next() {
                got += 1;
                drained_bytes += item.len();
                match crate::events::decode(&item) {
                    Ok(o) => batch.push(o),
                    Err(e) => {
                        errors += 1;
                        tracing::debug!(error = %e, "undecodable record");
                    }
                }
                if batch.len() >= 4096 {
                    break;
                }
            }
            if batch.len() >= 4096 {
                shared.ingest(&batch, std::mem::take(&mut errors));
                batch.clear();
                shared.liveness().reader_beat(mono_now_ns());
            }
            if got == 0 {
                break before;
            }
            found += got as u64;
        };
        if !batch.is_empty() || errors > 0 {
            shared.ingest(&batch, std::mem::take(&mut errors));
            batch.clear();
        }
        // The rules trust "no reply" only up to the time the ring was last emptied.
        shared.reader_drained(drained_at);
        if found > 0 {
            let since = drained_at.saturating_sub(window_ns);
            if since > BUSY_WINDOW_NS {
                // A window that ended long ago says nothing about now.
                before = if since > 2 * BUSY_WINDOW_NS {
                    0
                } else {
                    records
                };
                (window_ns, records) = (drained_at, 0);
            }
            records += found;
        }
        if found > 0 && records + before > BUSY_RECORDS && drained_bytes < pause_below {
            // Under load, let records gather instead of waking for every few: the kernel wakes
            // the reader for the first record after each drain. The drain point above was
            // taken before this pause, so nothing written during it counts as read.
            std::thread::sleep(BATCH_PAUSE);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the ring (and its fd) outlives the call.
        let r = unsafe { libc::poll(&mut pfd, 1, wake_ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "ring buffer poll failed; reader stops");
                return;
            }
        }
        if r == 0 {
            // Nothing arrived for a whole wake period.
            shared.reader_idle();
        }
    }
}

/// How often the policy counter reader looks for new kernel drops of traced flows.
const POLICY_POLL: Duration = Duration::from_millis(250);

/// Reads felix's rule counters (`felix_policy`) once at start and then only when traced flows
/// saw new kernel drops: at most one `iptables-save` (or `nft list table ip calico` in felix's
/// nftables dataplane, as detected for natOutgoing; or one walk of its `cali_rule_ctrs2` map,
/// opened read-only, in its eBPF dataplane) per [`POLICY_POLL`], off the data path.
async fn read_policy_counters(shared: Arc<Shared>, felix_bpf_dir: std::path::PathBuf) {
    use crate::felix_policy::{bpf, FilterRule};
    enum Reader {
        Filter(fn() -> Result<Vec<FilterRule>, String>),
        Bpf,
    }
    let mut seen = None;
    let mut was_bpf = None;
    let mut poll = tokio::time::interval(POLICY_POLL);
    loop {
        poll.tick().await;
        let reader = {
            let n = shared.node();
            match (n.pools.ebpf.is_some(), n.pools.dataplane) {
                (true, _) => Reader::Bpf,
                (false, crate::calico::Dataplane::Iptables) => {
                    Reader::Filter(crate::felix_policy::read_iptables)
                }
                (false, crate::calico::Dataplane::Nftables) => {
                    Reader::Filter(crate::felix_policy::read_nft)
                }
            }
        };
        // A switch of felix's dataplane reads the new source at once: its first reading is
        // the baseline later drops are measured from.
        let bpf = matches!(reader, Reader::Bpf);
        if was_bpf != Some(bpf) {
            was_bpf = Some(bpf);
            seen = None;
        }
        let drops = shared.traced_drops();
        if seen == Some(drops) {
            continue;
        }
        seen = Some(drops);
        let at = mono_now_ns();
        let started = std::time::Instant::now();
        match reader {
            Reader::Filter(reader) => {
                let read = tokio::task::spawn_blocking(reader)
                    .await
                    .unwrap_or_else(|e| Err(format!("reader task: {e}")));
                if let Err(e) = &read {
                    tracing::debug!(error = %e, "policy: felix's filter counters unread");
                }
                shared.record_policy_counters(at, read);
            }
            Reader::Bpf => {
                let dir = felix_bpf_dir.clone();
                let read = tokio::task::spawn_blocking(move || bpf::read_counters(&dir))
                    .await
                    .unwrap_or_else(|e| Err(format!("reader task: {e}")));
                if let Err(e) = &read {
                    tracing::debug!(error = %e, "policy: felix's eBPF rule counters unread");
                }
                shared.record_bpf_policy_counters(at, read);
            }
        }
        // A node with a big rule set and drops that never stop (a scanner on a denied port)
        // must not pay for iptables-save (or nft) all the time: at most a tenth of one core. Longer gaps
        // make more drops ambiguous, which the evidence then says.
        tokio::time::sleep(started.elapsed().saturating_mul(9)).await;
    }
}

/// Reads the node's conntrack counters (`conntrack`) every [`crate::conntrack::READ_EVERY`]:
/// three small procfs files, off the data path, never per packet, and at most a tenth of one
/// core like the policy counters (a slow read waits 9x its time before the next).
async fn read_conntrack_stats(shared: Arc<Shared>) {
    let mut poll = tokio::time::interval(crate::conntrack::READ_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged = false;
    loop {
        poll.tick().await;
        let at = mono_now_ns();
        let started = std::time::Instant::now();
        let read = crate::conntrack::read();
        if let Err(e) = &read {
            if !logged {
                tracing::info!(error = %e, "conntrack counters unreadable: snat_port_exhaustion is not diagnosed");
            }
        }
        logged = read.is_err();
        shared.record_conntrack(at, read);
        tokio::time::sleep(started.elapsed().saturating_mul(9)).await;
    }
}

/// Starts the configured identity source in the background. A source that cannot even be
/// configured yet (a kubeconfig not mounted yet, no in-cluster account) leaves identity on and
/// stale, saying why, and is tried again with backoff: the data path never waits on it.
async fn start_identity(shared: &Arc<Shared>, cfg: &crate::identity::IdentityConfig) {
    use crate::identity::{self, Identities};
    use tracer_model::identity::IdentitySource;
    let Some(source) = cfg.source else {
        return;
    };
    let ids = Arc::new(Identities::new(source, cfg.nodename.as_deref()));
    shared.set_identities(Arc::clone(&ids));
    tracing::info!(source = source.as_str(), nodename = ?cfg.nodename, "identity: reading names from Calico's datastore");
    match source {
        IdentitySource::Etcdv3 => {
            tokio::spawn(identity::etcd::run(ids, cfg.etcd_endpoints.clone()));
        }
        IdentitySource::Kubernetes => {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let mut delay = identity::MIN_BACKOFF;
                loop {
                    match identity::kube::client(&cfg).await {
                        Ok(client) => {
                            ids.cleared("client");
                            return identity::kube::run(ids, client, cfg.nodename.clone()).await;
                        }
                        Err(e) => {
                            ids.failed("client", format!("kubernetes client: {e}"));
                            tokio::time::sleep(delay).await;
                            delay = identity::backoff(delay);
                        }
                    }
                }
            });
        }
        IdentitySource::Off => {}
    }
}
