//! Diagnoses: a cause, what shows it, and what to change.
use serde::{Deserialize, Serialize};

use crate::Cause;

/// What shows a cause (typed per cause by the diagnose split).
pub type Evidence = serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub cause: Cause,
    pub summary: String,
    pub evidence: Evidence,
    pub fix: String,
}

/// Why felix skipped masquerade on purpose: not a fault, so not a diagnosis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnatExclusion {
    /// The felix setting that did it, e.g. `NATOutgoingExclusions=IPPoolsAndHostIPs`.
    pub setting: String,
    pub summary: String,
    pub evidence: Evidence,
}
