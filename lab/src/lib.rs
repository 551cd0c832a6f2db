//! tracer's lab: Calico-shaped data paths built entirely inside network namespaces.
//!
//! Everything this crate creates lives in namespaces it owns (see [`netns::Netns`]); the root
//! namespace only ever sees `ip netns add/del`. Addresses are restricted to 10.0.0.0/8 and
//! 192.168.0.0/16 and are only ever configured inside lab namespaces, and no lab namespace has
//! a link to the machine's real interfaces, so no packet can leave the lab.
//!
//! - [`netns`]: owned namespaces (deleted on drop), command execution and `setns(2)` threads.
//! - [`calico`]: what Calico's CNI and felix (iptables dataplane) write on a node.
//! - [`node`]: a pod wired to a node the way Calico's CNI wires it.
//! - [`topo`]: whole topologies, e.g. the single-node shape of seed 002 and its healthy control.
//! - [`traffic`]: TCP probes, a greeting TCP server and a tcpdump capture helper.
//! - [`iptables`]: reading rule counters.
//! - [`bird`], [`etcd`]: calico-node's BIRD and the datastore (plus a delay line), as daemons
//!   ([`daemon`]) confined to lab namespaces and a per-lab directory.
//! - [`scenario`]: the seed incidents on a two-node [`topo::Cluster`], each with its traffic and
//!   a packet-level proof of the fault.
//! - [`agent`]: the one harness for a real `tracer agent` (start, wait ready, typed client),
//!   shared by the lab, tracer's integration tests and its benchmark; [`diagnoses`] reads and
//!   renders what the agents diagnosed.
//! - [`http`]: a small HTTP/1.1 client for etcd's JSON gateway and tracer's API.
//!
//! Seed 002 in a few lines (needs root):
//!
//! ```no_run
//! use std::time::Duration;
//! use tracer_lab::{calico, topo::SingleNode, traffic};
//!
//! # fn main() -> Result<(), tracer_lab::LabError> {
//! let lab = SingleNode::build(&SingleNode::seed_002())?;
//! let pod = &lab.pod.netns;
//! // The pool overlaps the LAN: no MASQUERADE, and the apiserver's replies die at the gateway.
//! assert!(!traffic::tcp_probe(pod, lab.apiserver_addr(), Duration::from_secs(2))?);
//! assert_eq!(calico::nat_outgoing_packets(&lab.node)?, 0);
//! # Ok(())
//! # }
//! ```
//!
//! A seed on the two-node cluster (BIRD mesh, VXLAN, etcd), with its packet-level proof:
//!
//! ```no_run
//! use tracer_lab::{scenario::Scenario, topo::Cluster};
//!
//! # fn main() -> Result<(), tracer_lab::LabError> {
//! let seed: Scenario = "seed-003".parse()?;
//! let lab = Cluster::build(&seed.config())?;
//! println!("{}", seed.drive(&lab)?); // the incident's traffic: cross-node connects hang
//! seed.evidence(&lab)?; // tcpdump: VXLAN for ce-demo-2 goes to 10.4.0.1 and dies at the gateway
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod bird;
pub mod calico;
pub mod daemon;
pub mod diagnoses;
pub mod etcd;
pub mod http;
pub mod iptables;
pub mod kube;
pub mod netns;
pub mod node;
pub mod policy;
pub mod scenario;
pub mod startup;
pub mod topo;
pub mod traffic;

mod addr;
mod cmd;

/// Everything that can go wrong while building or driving a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// An external command (ip, iptables, ipset, ...) exited unsuccessfully.
    #[error("`{cmdline}` failed ({status}): {stderr}")]
    Command {
        cmdline: String,
        status: String,
        stderr: String,
    },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The caller asked for something the lab refuses to build (bad address, out-of-lab range...).
    #[error("invalid lab configuration: {0}")]
    Config(String),
    /// A closure run inside a namespace (see [`netns::Netns::run`]) panicked.
    #[error("thread running in namespace {netns} panicked: {message}")]
    Panicked { netns: String, message: String },
    /// A tool's output was not what the lab expected, or something did not happen in time.
    #[error("{0}")]
    Unexpected(String),
    /// A scenario's packet-level check failed: the lab did not reproduce what it should.
    #[error("not reproduced: {0}")]
    Verify(String),
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }
}

pub use calico::Pool;
pub use netns::Netns;
