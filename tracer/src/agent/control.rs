//! On-demand attach/detach requests from the API, carried out by the sync loop (which owns the
//! kernel programs).
use hyper::StatusCode;
use tokio::sync::oneshot;

use super::{AgentConfig, Shared};
use crate::{calico::Role, hooks::AttachedIface, hooks::Hooks};

pub const ON_DEMAND: &str = "on-demand";

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
    #[error(
        "attachment {0} was made automatically; it follows the interface's role, not requests"
    )]
    NotOnDemand(u32),
    #[error("attaching failed: {0}")]
    Failed(String),
    #[error("the agent is shutting down")]
    NotRunning,
}

impl AttachError {
    pub fn status(&self) -> StatusCode {
        match self {
            AttachError::NoIface(_) | AttachError::NoPod { .. } | AttachError::NoAttachment(_) => {
                StatusCode::NOT_FOUND
            }
            AttachError::NotOnDemand(_) => StatusCode::CONFLICT,
            AttachError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AttachError::NotRunning => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

pub enum Command {
    Attach {
        target: AttachTarget,
        reply: oneshot::Sender<Result<AttachedIface, AttachError>>,
    },
    Detach {
        ifindex: u32,
        reply: oneshot::Sender<Result<(), AttachError>>,
    },
}

pub fn handle(cmd: Command, cfg: &AgentConfig, hooks: &mut Hooks, shared: &Shared) {
    match cmd {
        Command::Attach { target, reply } => {
            let _ = reply.send(attach(target, cfg, hooks, shared));
        }
        Command::Detach { ifindex, reply } => {
            let r = match hooks.attached().into_iter().find(|a| a.ifindex == ifindex) {
                None => Err(AttachError::NoAttachment(ifindex)),
                Some(a) if a.how != ON_DEMAND => Err(AttachError::NotOnDemand(ifindex)),
                Some(_) => {
                    // Another client (a second `tracer watch` of the same pod) may still hold it.
                    if hooks.release(ifindex) == 0 {
                        hooks.detach(ifindex);
                        super::purge_kernel_state(hooks, shared);
                    }
                    Ok(())
                }
            };
            refresh(hooks, shared);
            let _ = reply.send(r);
        }
    }
}

fn attach(
    target: AttachTarget,
    cfg: &AgentConfig,
    hooks: &mut Hooks,
    shared: &Shared,
) -> Result<AttachedIface, AttachError> {
    let (link, role) = {
        let node = shared.node();
        let facts = &node.facts;
        match &target {
            AttachTarget::Iface(name) => {
                let link = facts
                    .link_by_name(name)
                    .ok_or_else(|| AttachError::NoIface(name.clone()))?;
                let role = cfg.roles.role_of(link, facts).unwrap_or(Role::Host);
                (link.clone(), role)
            }
            AttachTarget::Pod { namespace, name } => {
                let veth = shared.pod_veth(namespace, name);
                let link = facts
                    .link_by_name(&veth)
                    .ok_or_else(|| AttachError::NoPod {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        veth: veth.clone(),
                    })?;
                (link.clone(), Role::Workload)
            }
        }
    };
    if let Some(existing) = hooks
        .attached()
        .into_iter()
        .find(|a| a.ifindex == link.index)
    {
        if existing.how == ON_DEMAND {
            hooks.hold(link.index);
        }
        return Ok(existing);
    }
    shared.announce(link.index, &link.name, role);
    hooks
        .attach(&link, role, ON_DEMAND)
        .map_err(|e| AttachError::Failed(e.to_string()))?;
    hooks.hold(link.index);
    refresh(hooks, shared);
    hooks
        .attached()
        .into_iter()
        .find(|a| a.ifindex == link.index)
        .ok_or_else(|| AttachError::Failed("attachment vanished".into()))
}

/// Publishes the attachment list so the API and the reader see it at once.
fn refresh(hooks: &Hooks, shared: &Shared) {
    shared.set_attached(hooks.attached());
}
