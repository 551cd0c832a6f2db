//! `GET /watch`: one JSON object per line.
use serde::{Deserialize, Serialize};

use crate::FlowView;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WatchLine {
    /// The stream is alive (every 10 s).
    Heartbeat { heartbeat: String },
    /// Flows that changed faster than the stream could send them were skipped.
    Skipped { skipped: u64 },
    /// A new or changed flow.
    Flow(Box<FlowView>),
}

/// A JSON error answer (4xx, 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
    pub status: u16,
}
