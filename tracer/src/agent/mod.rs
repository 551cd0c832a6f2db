//! The agent: hooks -> events -> flows -> diagnoses -> API, wired together on tokio.
mod control;
mod footprint;
mod shared;
mod watch;

use std::{collections::BTreeSet, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

pub use control::{AttachError, AttachTarget, Command};
pub use shared::{DropTracing, FlowsAnswer, NodeView, ReaderStats, Shared};
pub use watch::WatchState;

use crate::{
    api,
    calico::{self, RoleConfig},
    clock::mono_now_ns,
    diagnose::Rules,
    hooks::{HookError, Hooks},
    net::Cidr,
    netlink,
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
            attach: AttachMode::Auto,
            token: None,
            ringbuf_bytes: None,
        }
    }
}

/// Runs the agent until `shutdown` resolves; tc programs are detached before returning.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    if cfg.token.as_deref().is_some_and(str::is_empty) {
        return Err(AgentError::EmptyToken("(given)".into()));
    }
    let (mut hooks, ring, counters) =
        Hooks::load_with(cfg.summary_interval.as_nanos() as u64, cfg.ringbuf_bytes)?;
    let shared = Arc::new(Shared::new(&cfg));
    shared.set_counters(counters);
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
    let mut changes = netlink::watch()?;

    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the AsyncFd
    // (and the RingBuf inside it) is dropped.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| AgentError::RingBuf(std::io::Error::other(e.to_string())))?;
    let (cmd_tx, mut cmds) = mpsc::channel::<Command>(16);
    shared.set_commands(cmd_tx);
    let reader = tokio::spawn(read_events(ring, shared.clone()));
    let server = tokio::spawn(api::serve(listener, shared.clone()));

    let mut resync = tokio::time::interval(cfg.resync);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    sync(&handle, &cfg, &mut hooks, &shared).await;
    // Set when interfaces came or went: the syncs that followed freed their transient heap,
    // which the next tick hands back to the system.
    let mut trim_due = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = changes.recv() => {
                // Coalesce a burst (a pod start creates a veth, addresses and routes at once).
                tokio::time::sleep(Duration::from_millis(20)).await;
                while changes.try_recv().is_ok() {}
                trim_due |= sync(&handle, &cfg, &mut hooks, &shared).await;
            }
            _ = resync.tick() => trim_due |= sync(&handle, &cfg, &mut hooks, &shared).await,
            Some(cmd) = cmds.recv() => {
                // Act on the freshest view: the pod's veth may have just appeared.
                trim_due |= sync(&handle, &cfg, &mut hooks, &shared).await;
                control::handle(cmd, &cfg, &mut hooks, &shared);
            }
            _ = tick.tick() => {
                shared.sweep(mono_now_ns());
                if std::mem::take(&mut trim_due) {
                    let started = std::time::Instant::now();
                    let released = footprint::release_free_heap();
                    tracing::debug!(released, took = ?started.elapsed(), "returned free heap to the system");
                }
            }
        }
    }
    tracing::info!("shutting down: detaching tc programs");
    reader.abort();
    server.abort();
    hooks.detach_all();
    Ok(())
}

/// Re-reads the node and makes the attachments match the roles; true when interfaces came or
/// went.
async fn sync(
    handle: &rtnetlink::Handle,
    cfg: &AgentConfig,
    hooks: &mut Hooks,
    shared: &Shared,
) -> bool {
    let facts = match netlink::snapshot(handle).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "reading interfaces failed; keeping the previous view");
            return false;
        }
    };
    let links_changed = !facts.links.keys().eq(shared.node().facts.links.keys());
    let pools = calico::read_pools(&cfg.pools, &cfg.masq_pools);
    let mut wanted = BTreeSet::new();
    // On-demand attachments stay while their interface exists.
    for a in hooks.attached() {
        if a.how == control::ON_DEMAND {
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
            if let Err(e) = hooks.attach(link, role, "auto") {
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
    shared.update_node(facts, pools, hooks.attached());
    detached || links_changed
}

/// After letting go of interfaces, their entries in the kernel's per-hook maps go too.
fn purge_kernel_state(hooks: &mut Hooks, shared: &Shared) {
    let started = std::time::Instant::now();
    match hooks.purge_unattached() {
        Ok(p) => {
            tracing::debug!(
                flows = p.flows,
                turns = p.turns,
                scanned = p.scanned,
                took = ?started.elapsed(),
                "purged kernel state of detached interfaces"
            );
            shared.note_purged(p);
        }
        Err(e) => tracing::warn!(error = %e, "purging kernel state of detached interfaces"),
    }
}

async fn read_events(mut ring: AsyncFd<RingBuf<MapData>>, shared: Arc<Shared>) {
    let mut batch: Vec<crate::events::Observation> = Vec::with_capacity(1024);
    let mut errors = 0u64;
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "ring buffer poll failed; reader stops");
                return;
            }
        };
        let rb = guard.get_inner_mut();
        // Decode outside the table lock; ingest in batches to take the lock rarely.
        while let Some(item) = rb.next() {
            match crate::events::decode(&item) {
                Ok(o) => batch.push(o),
                Err(e) => {
                    errors += 1;
                    tracing::debug!(error = %e, "undecodable record");
                }
            }
            if batch.len() >= 4096 {
                shared.ingest(&batch, std::mem::take(&mut errors));
                batch.clear();
            }
        }
        guard.clear_ready();
        if !batch.is_empty() || errors > 0 {
            shared.ingest(&batch, std::mem::take(&mut errors));
            batch.clear();
        }
    }
}
