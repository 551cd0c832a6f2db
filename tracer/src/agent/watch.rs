//! `/watch`: streaming new and changed flows that match a query.
use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::{shared::lock, Shared};
use crate::{api::query::FlowQuery, api::view::flow_json, diagnose::judge, flows::FlowId};

/// Most flows a watcher remembers having sent (older memories are dropped wholesale).
const REMEMBERED: usize = 200_000;

/// Where one watcher is: which changes it has seen and what it last sent for each flow.
pub struct WatchState {
    version: u64,
    /// A cheap summary of what was sent last time, to send only real changes.
    sent: HashMap<FlowId, u64>,
    /// Flows awaiting a reply: time alone can change their verdicts (no_reply).
    pending: HashSet<FlowId>,
}

impl WatchState {
    pub fn starting_now(shared: &Shared) -> WatchState {
        WatchState {
            version: lock(&shared.table).version(),
            sent: HashMap::new(),
            pending: HashSet::new(),
        }
    }
}

fn signature(v: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v["verdicts"].to_string().hash(&mut h);
    v["diagnosis"]["cause"].to_string().hash(&mut h);
    v["last_seen"].to_string().hash(&mut h);
    v["path"].as_array().map(Vec::len).hash(&mut h);
    h.finish()
}

impl Shared {
    /// Flows matching `q` that are new or changed since the last call.
    pub fn watch_poll(&self, q: &FlowQuery, st: &mut WatchState) -> Vec<Value> {
        self.with_context(|cx, table| {
            let ids: Vec<FlowId> = match table.changed_since(st.version) {
                Some(ids) => ids,
                None => table.iter_newest().map(|f| f.id).collect(),
            };
            st.version = table.version();
            let mut check: Vec<FlowId> = ids;
            check.extend(st.pending.iter().copied());
            check.sort_unstable();
            check.dedup();
            let mut out = Vec::new();
            let matches = self.matcher(q, cx.now_ns);
            for id in check {
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
                    && !j.verdicts.contains(&crate::diagnose::NO_REPLY);
                if waiting {
                    st.pending.insert(id);
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
                let v = flow_json(f, &j, &self.clock, cx);
                let sig = signature(&v);
                if st.sent.get(&id) != Some(&sig) {
                    if st.sent.len() >= REMEMBERED {
                        st.sent.clear();
                    }
                    st.sent.insert(id, sig);
                    out.push(v);
                }
            }
            out
        })
    }
}
