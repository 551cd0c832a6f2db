//! On-demand attach/detach requests from the API, carried out by the sync loop (which owns the
//! kernel programs): the messages, and why a request failed.
use std::time::Duration;

use tokio::sync::oneshot;
use tracer_model::attach::Lease;

use crate::hooks::AttachedIface;

/// What a client asks to observe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachTarget {
    Iface(String),
    Pod { namespace: String, name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no interface {0} on this node")]
    NoIface(String),
    #[error("pod {namespace}/{name} has no interface {veth} on this node (is it scheduled here?)")]
    NoPod {
        namespace: String,
        name: String,
        veth: String,
    },
    #[error("no attachment {0}")]
    NoAttachment(u32),
    #[error("attachment {ifindex} holds no lease {lease} (it lapsed or was let go: attach again)")]
    NoLease { ifindex: u32, lease: u64 },
    #[error(
        "attachment {0} was made automatically; it follows the interface's role, not requests"
    )]
    NotOnDemand(u32),
    #[error("attaching failed: {0}")]
    Failed(String),
    #[error("the agent is shutting down")]
    NotRunning,
}

pub enum Command {
    /// Attach and hold for `ttl`; the lease is `None` when the interface is attached
    /// automatically (nothing to hold).
    Attach {
        target: AttachTarget,
        ttl: Duration,
        reply: oneshot::Sender<Result<(AttachedIface, Option<Lease>), AttachError>>,
    },
    /// Let go of `lease`, or of the hold that lapses first when `None`.
    Detach {
        ifindex: u32,
        lease: Option<u64>,
        reply: oneshot::Sender<Result<(), AttachError>>,
    },
    /// Extend `lease` by its time to live from now.
    Renew {
        ifindex: u32,
        lease: u64,
        reply: oneshot::Sender<Result<(AttachedIface, Lease), AttachError>>,
    },
}
