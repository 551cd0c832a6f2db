//! `GET /diagnoses`: faulty flows grouped by cause, plus what the node's configuration alone
//! shows. The server sends its keys sorted.
use serde::{Deserialize, Serialize};

use crate::{diagnosis::Evidence, health::TurnedOff, Cause, Diagnosis};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagnosesAnswer {
    /// Most frequent first.
    pub causes: Vec<CauseGroup>,
    pub node_findings: Vec<Diagnosis>,
    pub flows_judged: u64,
    pub evidence: EvidenceSummary,
    /// Verdicts and causes not judged on this node, and why (felix's eBPF dataplane): a cause
    /// listed here is absent from `causes` and `node_findings` because it is off, not because
    /// no flow has it.
    #[serde(default)]
    pub turned_off: Vec<TurnedOff>,
}

/// The flows diagnosed with one cause, told by the latest of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CauseGroup {
    pub cause: Cause,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub summary: String,
    pub evidence: Evidence,
    pub fix: String,
    /// Up to five flow ids (`/flows/{id}`).
    pub example_flows: Vec<u64>,
    /// Flows of the group whose records may be partial.
    pub evidence_incomplete: u64,
    /// Who the latest flow's addresses are; present only while identity is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<crate::identity::FlowEndpoints>,
}

/// What the answer may be missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceSummary {
    pub complete: bool,
    /// Records lost (ring buffer full): flows may be partial; they are never called unanswered
    /// for it.
    pub lost_records: u64,
    pub flows_with_incomplete_evidence: u64,
    /// Flows evicted from the table are gone from the answer.
    pub flows_evicted: u64,
    pub reader_lag_ms: u64,
}
