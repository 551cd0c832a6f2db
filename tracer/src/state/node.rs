//! The node as last read (facts, pools, attachments, kernel counters) and the on-demand
//! attach requests: written by the sync loop, read by every answer.
use std::sync::{atomic::Ordering, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{mpsc, oneshot};
use tracer_model::attach::Lease;

use super::{lock, AttachError, AttachTarget, Command, DropTracing, NodeView, Shared};
use crate::{
    calico::{Pools, Role},
    flows::Iface,
    hooks::{ifstate::Purged, AttachedIface, KernelCounters, KernelStats, TcBackend},
    kernel_names::DropReasons,
    netlink::NodeFacts,
};

impl Shared {
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
        self.judgement_gen.fetch_add(1, Ordering::Relaxed);
    }

    /// The programs cannot run here: say why, stay up, never become ready.
    pub(crate) fn set_unsupported(&self, why: String) {
        self.liveness.set_unsupported();
        self.node_mut().unsupported = Some(why);
    }

    pub(crate) fn set_tc_backend(&self, tc: TcBackend) {
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
        total.cached += p.cached;
    }

    pub(crate) fn set_counters(&self, c: KernelCounters) {
        *lock(&self.counters) = Some(c);
    }

    /// The kernel's counters, read now.
    /// The ring buffer's size, once the programs are loaded.
    pub fn ring_bytes(&self) -> Option<u64> {
        lock(&self.counters)
            .as_ref()
            .and_then(KernelCounters::ring_bytes)
    }

    pub fn kernel(&self) -> KernelStats {
        lock(&self.counters)
            .as_ref()
            .map(KernelCounters::read)
            .unwrap_or_default()
    }

    pub(crate) fn update_node(&self, facts: NodeFacts, pools: Pools, attached: Vec<AttachedIface>) {
        self.intern(&attached);
        // The metrics' tally re-judges every flow when what the rules read changed.
        let mut h = super::tally::FixedHasher::default();
        let _ = serde_json::to_writer(&mut h, &facts);
        let _ = serde_json::to_writer(&mut h, &pools);
        // Read by the rules but not serialised: the dataplane (fix texts) and eBPF mode
        // (what is turned off).
        std::hash::Hasher::write(
            &mut h,
            format!("{:?}{:?}", pools.dataplane, pools.ebpf).as_bytes(),
        );
        let hash = std::hash::Hasher::finish(&h);
        if self.node_hash.swap(hash, Ordering::Relaxed) != hash {
            self.judgement_gen.fetch_add(1, Ordering::Relaxed);
        }
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

    pub async fn attach(
        &self,
        target: AttachTarget,
        ttl: std::time::Duration,
    ) -> Result<(AttachedIface, Option<Lease>), AttachError> {
        self.command(|reply| Command::Attach { target, ttl, reply })
            .await
    }

    /// Lets go of `lease` on `ifindex`, or of the hold that lapses first.
    pub async fn detach(&self, ifindex: u32, lease: Option<u64>) -> Result<(), AttachError> {
        self.command(|reply| Command::Detach {
            ifindex,
            lease,
            reply,
        })
        .await
    }

    pub async fn renew(
        &self,
        ifindex: u32,
        lease: u64,
    ) -> Result<(AttachedIface, Lease), AttachError> {
        self.command(|reply| Command::Renew {
            ifindex,
            lease,
            reply,
        })
        .await
    }

    /// Sends a command to the sync loop and waits for its answer.
    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, AttachError>>) -> Command,
    ) -> Result<T, AttachError> {
        let tx = self.commands.get().ok_or(AttachError::NotRunning)?;
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply))
            .await
            .map_err(|_| AttachError::NotRunning)?;
        rx.await.map_err(|_| AttachError::NotRunning)?
    }
}
