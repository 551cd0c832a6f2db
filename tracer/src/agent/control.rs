//! Carries out on-demand attach/detach requests from the API in the sync loop (which owns the
//! kernel programs), and the leases that make every on-demand hold lapse unless renewed.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracer_model::{attach::Lease, AttachHow};

use super::AgentConfig;
use crate::{
    calico::Role,
    hooks::{AttachedIface, Hooks},
    state::{AttachError, AttachTarget, Command, Shared},
};

/// One client's hold on an on-demand attachment.
#[derive(Debug)]
struct Held {
    ifindex: u32,
    ttl: Duration,
    expires: Instant,
}

/// Every on-demand hold is a lease: it lapses `ttl` after it was taken or last renewed, so a
/// client that vanishes (a SIGKILLed laptop, a cut network) never leaves programs attached for
/// longer than that. Owned by the sync loop, next to the hooks.
#[derive(Debug, Default)]
pub struct Leases {
    next: u64,
    held: BTreeMap<u64, Held>,
}

impl Leases {
    fn take(&mut self, ifindex: u32, ttl: Duration, now: Instant) -> Lease {
        self.next += 1;
        self.held.insert(
            self.next,
            Held {
                ifindex,
                ttl,
                expires: now + ttl,
            },
        );
        Lease {
            id: self.next,
            ttl_seconds: ttl.as_secs(),
        }
    }
}

pub fn handle(
    cmd: Command,
    cfg: &AgentConfig,
    hooks: &mut Hooks,
    leases: &mut Leases,
    shared: &Shared,
) {
    let now = Instant::now();
    match cmd {
        Command::Attach { target, ttl, reply } => {
            let _ = reply.send(attach(target, ttl, now, cfg, hooks, leases, shared));
        }
        Command::Detach {
            ifindex,
            lease,
            reply,
        } => {
            let r = match hooks.attached().into_iter().find(|a| a.ifindex == ifindex) {
                None => Err(AttachError::NoAttachment(ifindex)),
                Some(a) if a.how != AttachHow::OnDemand => Err(AttachError::NotOnDemand(ifindex)),
                Some(_) => {
                    // Without a lease id (a client of the API before leases): the hold that
                    // lapses first.
                    let id = lease.or_else(|| {
                        leases
                            .held
                            .iter()
                            .filter(|(_, h)| h.ifindex == ifindex)
                            .min_by_key(|(_, h)| h.expires)
                            .map(|(id, _)| *id)
                    });
                    match id {
                        Some(id) if leases.held.get(&id).is_some_and(|h| h.ifindex == ifindex) => {
                            leases.held.remove(&id);
                            release(ifindex, id, hooks, shared);
                            Ok(())
                        }
                        Some(id) => Err(AttachError::NoLease { ifindex, lease: id }),
                        None => Err(AttachError::NoAttachment(ifindex)),
                    }
                }
            };
            refresh(hooks, shared);
            let _ = reply.send(r);
        }
        Command::Renew {
            ifindex,
            lease,
            reply,
        } => {
            let r = match leases.held.get_mut(&lease) {
                Some(h) if h.ifindex == ifindex && hooks.holds(ifindex, lease) => {
                    h.expires = now + h.ttl;
                    let ttl = h.ttl;
                    hooks
                        .attached()
                        .into_iter()
                        .find(|a| a.ifindex == ifindex)
                        .map(|a| {
                            (
                                a,
                                Lease {
                                    id: lease,
                                    ttl_seconds: ttl.as_secs(),
                                },
                            )
                        })
                        .ok_or(AttachError::NoAttachment(ifindex))
                }
                _ => Err(AttachError::NoLease { ifindex, lease }),
            };
            let _ = reply.send(r);
        }
    }
}

/// Lets go of every lease that lapsed by `now` (run on the sync loop's tick).
pub fn expire(now: Instant, hooks: &mut Hooks, leases: &mut Leases, shared: &Shared) {
    let lapsed: Vec<(u64, u32)> = leases
        .held
        .iter()
        .filter(|(_, h)| h.expires <= now)
        .map(|(id, h)| (*id, h.ifindex))
        .collect();
    if lapsed.is_empty() {
        return;
    }
    for (id, ifindex) in lapsed {
        leases.held.remove(&id);
        tracing::info!(
            ifindex,
            lease = id,
            "on-demand lease lapsed: its client stopped renewing"
        );
        release(ifindex, id, hooks, shared);
    }
    refresh(hooks, shared);
}

/// Lease `id` lets go; the programs come off with the last holder. A lease whose interface
/// went (and its holds with it) has nothing left to release.
fn release(ifindex: u32, id: u64, hooks: &mut Hooks, shared: &Shared) {
    if hooks.release(ifindex, id) == Some(0) {
        hooks.detach(ifindex);
        super::purge_kernel_state(hooks, shared);
    }
}

fn attach(
    target: AttachTarget,
    ttl: Duration,
    now: Instant,
    cfg: &AgentConfig,
    hooks: &mut Hooks,
    leases: &mut Leases,
    shared: &Shared,
) -> Result<(AttachedIface, Option<Lease>), AttachError> {
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
        let lease = (existing.how == AttachHow::OnDemand).then(|| {
            let lease = leases.take(link.index, ttl, now);
            hooks.hold(link.index, lease.id);
            lease
        });
        return Ok((existing, lease));
    }
    shared.announce(link.index, &link.name, role);
    hooks
        .attach(&link, role, AttachHow::OnDemand)
        .map_err(|e| AttachError::Failed(e.to_string()))?;
    let lease = leases.take(link.index, ttl, now);
    hooks.hold(link.index, lease.id);
    refresh(hooks, shared);
    hooks
        .attached()
        .into_iter()
        .find(|a| a.ifindex == link.index)
        .map(|a| (a, Some(lease)))
        .ok_or_else(|| AttachError::Failed("attachment vanished".into()))
}

/// Publishes the attachment list so the API and the reader see it at once.
fn refresh(hooks: &Hooks, shared: &Shared) {
    shared.set_attached(hooks.attached());
}
