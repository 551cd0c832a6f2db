//! tracer's wire vocabulary, shared by the agent (server), the CLI, the lab, the tests and the
//! benchmark. serde only: no aya, no hyper, nothing about how the answers are computed.
//!
//! Every wire name here is part of the API: add new ones, never rename.
pub mod diagnosis;
pub mod vocab;

pub use diagnosis::{Diagnosis, Evidence, SnatExclusion};
pub use vocab::{AttachHow, Cause, Dir, Role, Side, Verdict};
