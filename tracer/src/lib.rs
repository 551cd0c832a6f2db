//! tracer: an eBPF packet path tracer for Kubernetes nodes networked by Calico.
//!
//! The modules follow the packet path: [`hooks`] (kernel programs on interfaces) ->
//! [`events`] (records they emit) -> [`flows`] (correlated connections) -> [`diagnose`]
//! (verdicts and causes) -> [`state`] (what the agent knows, answered in the model's wire
//! types) -> [`api`] (HTTP). [`netlink`], [`calico`] and [`nftables`] describe the node;
//! [`identity`] names its addresses (pods, Services, nodes) from Calico's datastore;
//! [`agent`] wires them together. The wire vocabulary is the `tracer_model` crate.
pub mod agent;
pub mod api;
pub mod apiserver;
pub mod btf;
pub mod calico;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod diagnose;
pub mod events;
pub mod felix_bpf;
pub mod felix_policy;
pub mod flows;
pub mod hooks;
pub mod identity;
pub mod kernel_names;
pub mod net;
pub mod netlink;
pub mod nftables;
pub mod own_sockets;
pub mod state;
pub mod synth;
#[cfg(test)]
mod testutil;
