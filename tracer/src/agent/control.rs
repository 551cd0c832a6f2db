//! Carries out on-demand attach/detach requests from the API in the sync loop (which owns the
//! kernel programs).
use tracer_model::AttachHow;

use super::AgentConfig;
use crate::{
    calico::Role,
    hooks::{AttachedIface, Hooks},
    state::{AttachError, AttachTarget, Command, Shared},
};

pub fn handle(cmd: Command, cfg: &AgentConfig, hooks: &mut Hooks, shared: &Shared) {
    match cmd {
        Command::Attach { target, reply } => {
            let _ = reply.send(attach(target, cfg, hooks, shared));
        }
        Command::Detach { ifindex, reply } => {
            let r = match hooks.attached().into_iter().find(|a| a.ifindex == ifindex) {
                None => Err(AttachError::NoAttachment(ifindex)),
                Some(a) if a.how != AttachHow::OnDemand => Err(AttachError::NotOnDemand(ifindex)),
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
        if existing.how == AttachHow::OnDemand {
            hooks.hold(link.index);
        }
        return Ok(existing);
    }
    shared.announce(link.index, &link.name, role);
    hooks
        .attach(&link, role, AttachHow::OnDemand)
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
