//! `/flows` answers too big to build at once (a large `limit`, or a verdict or cause filter that
//! judges every flow): walked newest first and rendered a part at a time, so that neither the
//! ring reader (waiting for the table) nor the agent's memory (holding the whole answer) pays
//! for a large query. The API sends each part as it comes.
use tracer_model::{
    query::{FlowQuery, DEFAULT_LIMIT},
    FlowView,
};

use super::{view::flow_view, Shared};
use crate::{
    diagnose::{judge, Judgement},
    flows::{Flow, FlowId},
};

/// Flows examined, and flows rendered, per hold of the flow table (a few ms either way).
const EXAMINE_CHUNK: usize = 4096;
const RENDER_CHUNK: usize = 256;

/// Where a `/flows` walk is.
pub struct FlowCursor {
    q: FlowQuery,
    limit: usize,
    /// Flows with ids below this are still to be visited. Flows created during the walk are
    /// not visited; flows evicted during it are skipped.
    bound: FlowId,
    matched: usize,
    shown: usize,
    started: bool,
    done: bool,
}

impl FlowCursor {
    pub fn new(q: FlowQuery) -> FlowCursor {
        FlowCursor {
            limit: q.limit.unwrap_or(DEFAULT_LIMIT),
            q,
            bound: FlowId::MAX,
            matched: 0,
            shown: 0,
            started: false,
            done: false,
        }
    }

    pub fn done(&self) -> bool {
        self.done
    }

    pub fn matched(&self) -> usize {
        self.matched
    }
}

impl FlowCursor {
    /// Flows shown so far.
    pub fn shown(&self) -> usize {
        self.shown
    }

    /// Whether a part has been taken yet.
    pub fn started(&self) -> bool {
        self.started
    }
}

impl Shared {
    /// The next flows of the walk (none once the cursor is done). The API frames them as
    /// `{"flows": [...], "matched": N, "truncated": B}`.
    pub fn flows_chunk(&self, cur: &mut FlowCursor) -> Vec<FlowView> {
        let mut out = Vec::new();
        if cur.done {
            return out;
        }
        cur.started = true;
        let judged = cur.q.verdict.is_some() || cur.q.cause.is_some();
        let (verdict, cause) = (cur.q.verdict, cur.q.cause);
        let wanted = |j: &Judgement| {
            verdict.is_none_or(|v| j.verdicts.contains(&v))
                && cause.is_none_or(|c| j.diagnosis.as_ref().map(|d| d.cause) == Some(c))
        };
        let finished = self.with_context(|cx, table| {
            let matches = self.matcher(&cur.q, cx.now_ns);
            let names = self.naming();
            let (mut examined, mut rendered) = (0, 0);
            // By destination, only the flows the address index finds.
            let walk: Box<dyn Iterator<Item = (FlowId, &Flow)>> = match &cur.q.dst {
                Some(net) => Box::new(table.iter_newest_to(net, cur.bound)),
                None => Box::new(table.iter_newest_below(cur.bound)),
            };
            for (slot, f) in walk {
                cur.bound = slot;
                examined += 1;
                if matches(f) {
                    let show = cur.shown < cur.limit;
                    if !judged && !show {
                        // Counted, not judged: judging is the expensive part.
                        cur.matched += 1;
                    } else {
                        let j = judge(f, cx);
                        if wanted(&j) {
                            cur.matched += 1;
                            if show {
                                out.push(flow_view(f, j, &self.clock, cx, &names));
                                cur.shown += 1;
                                rendered += 1;
                            }
                        }
                    }
                }
                if examined >= EXAMINE_CHUNK || rendered >= RENDER_CHUNK {
                    return false;
                }
            }
            true
        });
        if finished {
            cur.done = true;
        }
        out
    }
}
