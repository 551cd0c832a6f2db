//! tracer's wire vocabulary, shared by the agent (server), the CLI, the lab, the tests and the
//! benchmark. No aya, no hyper, nothing about how the answers are computed: serde types, their
//! wire names, and the query strings that select them.
//!
//! Every wire name here is part of the API: add new ones, never rename.
pub mod attach;
pub mod defaults;
pub mod diagnoses;
pub mod diagnosis;
pub mod flow;
pub mod flowlog;
pub mod health;
pub mod identity;
pub mod net;
pub mod query;
pub mod startup;
pub mod vocab;
pub mod watch;

pub use attach::{Attached, Attachment};
pub use diagnoses::DiagnosesAnswer;
pub use diagnosis::{Diagnosis, Evidence, SnatExclusion};
pub use flow::{FlowView, FlowsPage};
pub use flowlog::{FlowLogRecord, FlowLogStats};
pub use health::{Health, Readiness};
pub use identity::{Endpoint, FlowEndpoints};
pub use net::Cidr;
pub use query::FlowQuery;
pub use vocab::{AttachHow, Cause, Dir, Encap, LogReason, Role, Side, UnknownName, Verdict};
pub use watch::{ApiErrorBody, WatchLine};
