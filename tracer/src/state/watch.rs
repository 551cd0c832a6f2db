//! `/watch`: streaming new and changed flows that match a query.
use std::collections::{HashMap, HashSet, VecDeque};

use tracer_model::{FlowQuery, FlowView, Verdict};

use super::{lock, view::flow_view, Shared};
use crate::{diagnose::judge, flows::FlowId};

// A watcher's memory is bounded by these, whatever the flood (about 0.5 MiB each).
/// Most flows a watcher remembers having sent (older memories are dropped wholesale).
const REMEMBERED: usize = 8192;
/// Most flows awaiting a reply that a watcher re-judges on every tick.
const PENDING_MAX: usize = 4096;
/// Most changed flows a watcher queues; beyond that the oldest changes are skipped and the
/// client is told how many (`{"skipped": n}`).
const BACKLOG_MAX: usize = 8192;
/// Flows judged and rendered per hold of the flow table.
const BATCH: usize = 256;

/// Where one watcher is: which changes it has seen and what it last sent for each flow.
pub struct WatchState {
    version: u64,
    /// A cheap summary of what was sent last time, to send only real changes.
    sent: HashMap<FlowId, u64>,
    /// Flows awaiting a reply: time alone can change their verdicts (no_reply).
    pending: HashSet<FlowId>,
    /// Changed flows still to look at, oldest first.
    backlog: VecDeque<FlowId>,
    /// Changes dropped because the watcher fell behind, not yet reported.
    skipped: u64,
}

impl WatchState {
    pub fn starting_now(shared: &Shared) -> WatchState {
        WatchState {
            version: lock(&shared.table).version(),
            sent: HashMap::new(),
            pending: HashSet::new(),
            backlog: VecDeque::new(),
            skipped: 0,
        }
    }

    /// More changes are queued than one poll handles.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }
}

/// What a watcher sends: a new or changed flow, or how many changes it had to skip.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    Flow(Box<FlowView>),
    Skipped(u64),
}

fn signature(v: &FlowView) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.verdicts.hash(&mut h);
    v.diagnosis.as_ref().map(|d| d.cause).hash(&mut h);
    v.last_seen.hash(&mut h);
    v.path.len().hash(&mut h);
    h.finish()
}

impl Shared {
    /// Flows matching `q` that are new or changed since the last call, at most [`BATCH`] flows
    /// per call: call again while [`WatchState::has_backlog`].
    pub fn watch_poll(&self, q: &FlowQuery, st: &mut WatchState) -> Vec<WatchEvent> {
        let mut out = Vec::new();
        self.with_context(|cx, table| {
            if st.backlog.is_empty() {
                let mut ids: Vec<FlowId> = match table.changed_since(st.version) {
                    Some(ids) => ids,
                    None => {
                        // Too far behind to know what changed: the newest flows, the rest skipped.
                        st.skipped += table.len().saturating_sub(BACKLOG_MAX) as u64;
                        let mut ids: Vec<FlowId> = table
                            .iter_newest()
                            .take(BACKLOG_MAX)
                            .map(|f| f.id)
                            .collect();
                        ids.reverse();
                        ids
                    }
                };
                st.version = table.version();
                if ids.len() > BACKLOG_MAX {
                    let drop = ids.len() - BACKLOG_MAX;
                    st.skipped += drop as u64;
                    ids.drain(..drop);
                }
                ids.extend(st.pending.iter().copied());
                ids.sort_unstable();
                ids.dedup();
                st.backlog.extend(ids);
            }
            let matches = self.matcher(q, cx.now_ns);
            let names = self.naming();
            for _ in 0..BATCH {
                let Some(id) = st.backlog.pop_front() else {
                    break;
                };
                let Some(f) = table.get(id) else {
                    st.pending.remove(&id);
                    st.sent.remove(&id);
                    continue;
                };
                if !matches(f) {
                    continue;
                }
                let j = judge(f, cx);
                let waiting = f.expects_reply
                    && f.first_reply_ns().is_none()
                    && !j.verdicts.contains(&Verdict::NoReply);
                if waiting {
                    if st.pending.len() < PENDING_MAX {
                        st.pending.insert(id);
                    }
                } else {
                    st.pending.remove(&id);
                }
                if q.verdict.is_some_and(|v| !j.verdicts.contains(&v)) {
                    continue;
                }
                if q.cause
                    .is_some_and(|c| j.diagnosis.as_ref().map(|d| d.cause) != Some(c))
                {
                    continue;
                }
                let v = flow_view(f, j, &self.clock, cx, &names);
                let sig = signature(&v);
                if st.sent.get(&id) != Some(&sig) {
                    if st.sent.len() >= REMEMBERED {
                        st.sent.clear();
                    }
                    st.sent.insert(id, sig);
                    out.push(WatchEvent::Flow(Box::new(v)));
                }
            }
        });
        if st.skipped > 0 {
            out.push(WatchEvent::Skipped(st.skipped));
            st.skipped = 0;
        }
        out
    }
}
