//! `tracer agent --flow-log`: one line of NDJSON per flow, written once. The flow's fields are
//! [`FlowView`]'s, at the top level, exactly as `/flows` names them; the log adds why and when
//! the line was written and by which node. Readers deserialise lines with this type.
use serde::{Deserialize, Serialize};

use crate::{FlowView, LogReason};

/// One line of the flow log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowLogRecord {
    /// Why the flow was written now.
    pub logged: LogReason,
    /// When the line was written (RFC 3339).
    pub logged_at: String,
    /// The node the agent runs on (`--node-name`, `NODENAME`, else the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The flow as `/flows/{id}` would have shown it when the line was written.
    #[serde(flatten)]
    pub flow: FlowView,
}

/// What the flow log has done, for `/healthz` and `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogStats {
    /// Lines queued for writing, by why.
    pub settled: u64,
    pub evicted: u64,
    pub shutdown: u64,
    /// Flows never written because the writer fell behind (its queue was full) or too many
    /// unsettled flows were evicted between two ticks.
    pub dropped: u64,
    /// Lines lost to write errors (disk full, closed pipe).
    pub write_errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_the_flows_fields_plus_why_and_where() -> Result<(), serde_json::Error> {
        let line = r#"{"logged":"settled","logged_at":"2026-01-01T00:00:00Z","node":"n1","id":7,
            "proto":"tcp","src":"10.0.0.1","sport":1,"dst":"10.0.0.2","dport":2,
            "first_seen":"t","last_seen":"t","nat":null,"path":[],"forward":{"pkts":1,"bytes":60},
            "reverse":{"pkts":0,"bytes":0},"reply_after_ms":null,"tcp":null,"exchanges":null,
            "drops":[],"verdicts":["no_reply"],"diagnosis":null}"#;
        let r: FlowLogRecord = serde_json::from_str(line)?;
        assert_eq!((r.logged, r.flow.id), (LogReason::Settled, 7));
        let back: serde_json::Value = serde_json::to_value(&r)?;
        assert_eq!(back["verdicts"][0], "no_reply");
        assert_eq!(back["node"], "n1");
        Ok(())
    }
}
