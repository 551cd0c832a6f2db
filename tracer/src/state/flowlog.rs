//! The flow log's side of the state: which flows to write now, each exactly once, as the
//! model's [`FlowView`]. A flow is written when the tally finds it settled (time alone can no
//! longer change its verdicts), when it is evicted, or at shutdown, whichever comes first; the
//! flow's `logged` bit (or its eviction) makes sure it is never written twice. Writing is the
//! agent's.
use std::sync::atomic::{AtomicU64, Ordering};

use tracer_model::{FlowLogStats, FlowView, LogReason};

use super::{lock, view::flow_view, Shared, VISIT_CHUNK};
use crate::{
    diagnose::{judge, next_change_ns, Context},
    flows::{Flow, FlowId},
};

/// What the flow log has done, counted as it happens.
#[derive(Debug, Default)]
pub struct FlowLogCounters {
    queued: [AtomicU64; 3],
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

impl FlowLogCounters {
    /// A line was handed to the writer.
    pub fn queued(&self, why: LogReason) {
        let i = LogReason::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.queued[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A flow's line was dropped: the writer's queue was full.
    pub fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// `lines` lines were lost to a write error; returns the errors so far.
    pub fn write_failed(&self, lines: u64) -> u64 {
        self.write_errors.fetch_add(lines, Ordering::Relaxed) + lines
    }
}

impl Shared {
    /// The flow log's counters, when there is one.
    pub fn flow_log_counters(&self) -> Option<&FlowLogCounters> {
        self.flow_log.as_ref()
    }

    /// The flow log's counts (None without one).
    pub fn flow_log_stats(&self) -> Option<FlowLogStats> {
        let c = self.flow_log.as_ref()?;
        let n = |i: usize| c.queued[i].load(Ordering::Relaxed);
        Some(FlowLogStats {
            settled: n(0),
            evicted: n(1),
            shutdown: n(2),
            dropped: c.dropped.load(Ordering::Relaxed) + lock(&self.table).unlogged_lost(),
            write_errors: c.write_errors.load(Ordering::Relaxed),
        })
    }

    /// The flows to write now, each marked written: those evicted before they settled, and
    /// those that settled since the last call. With `shutdown`, also every flow not written
    /// yet (the reader must have stopped). The table is held for at most [`VISIT_CHUNK`]
    /// flows at a time.
    pub fn flow_log_take(&self, shutdown: bool) -> Vec<(LogReason, FlowView)> {
        if self.flow_log.is_none() {
            return Vec::new();
        }
        self.tally();
        let settled = lock(&self.tally).take_settled();
        // Names as the API gives them (when identity is on).
        let names = self.naming();
        let render =
            |f: &Flow, cx: &Context<'_>| flow_view(f, judge(f, cx), &self.clock, cx, &names);
        // A flow that left (or is still there at shutdown) after it settled, before a tick
        // wrote it, is written as settled: the reason tells whether its verdicts are final.
        let why = |f: &Flow, cx: &Context<'_>, unsettled: LogReason| match next_change_ns(
            f,
            cx.rules,
            cx.evidence_now_ns(),
        ) {
            None => LogReason::Settled,
            Some(_) => unsettled,
        };
        let mut out = Vec::new();
        let evicted = self.with_context_mut(|_, table| table.take_unlogged());
        for chunk in evicted.chunks(VISIT_CHUNK) {
            self.with_context(|cx, _| {
                out.extend(
                    chunk
                        .iter()
                        .map(|f| (why(f, cx, LogReason::Evicted), render(f, cx))),
                );
            });
        }
        let mut mark = |ids: &[FlowId], unsettled: LogReason| {
            for chunk in ids.chunks(VISIT_CHUNK) {
                self.with_context_mut(|cx, table| {
                    for id in chunk {
                        if let Some(f) = table.get_mut(*id).filter(|f| !f.logged) {
                            f.logged = true;
                            out.push((why(f, cx, unsettled), render(f, cx)));
                        }
                    }
                });
            }
        };
        mark(&settled, LogReason::Settled);
        if shutdown {
            let rest: Vec<FlowId> = lock(&self.table)
                .iter_newest()
                .filter(|f| !f.logged)
                .map(|f| f.id)
                .collect();
            mark(&rest, LogReason::Shutdown);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::Dir,
        state::StateConfig,
        testutil::{obs, tcp},
    };

    fn syn(shared: &Shared, i: u32, ts_ns: u64) {
        let p = tcp(
            "10.244.1.10",
            3000 + i as u16,
            "10.96.0.9",
            443,
            0x02,
            i + 1,
            0,
        );
        shared.ingest(&[obs(ts_ns, 5, Dir::Ingress, p)], 0);
    }

    #[test]
    fn every_flow_is_taken_once_settled_evicted_or_at_shutdown() {
        let shared = Shared::new(&StateConfig {
            flow_cap: 4,
            flow_log: true,
            ..StateConfig::default()
        });
        // Four SYNs long past the no-reply timeout settle at once.
        for i in 0..4 {
            syn(&shared, i, 1_000 + u64::from(i));
        }
        let first = shared.flow_log_take(false);
        assert_eq!(first.len(), 4, "{first:?}");
        assert!(first.iter().all(|(why, _)| *why == LogReason::Settled));
        assert!(shared.flow_log_take(false).is_empty(), "written twice");
        // Four more evict the written four: nothing new for them.
        for i in 4..8 {
            syn(&shared, i, 2_000 + u64::from(i));
        }
        let second = shared.flow_log_take(false);
        assert_eq!(second.len(), 4, "{second:?}");
        let ids = |v: &[(LogReason, FlowView)]| v.iter().map(|(_, f)| f.id).collect::<Vec<_>>();
        let mut all = [ids(&first), ids(&second)].concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 8);
        assert!(shared.flow_log_take(true).is_empty());
        assert_eq!(shared.flow_log_stats().map(|s| s.dropped), Some(0));
        // /healthz and /metrics report it (and take the table's lock once at a time).
        let (_, health) = shared.health(true);
        assert!(health.detail.and_then(|d| d.flow_log).is_some());
        assert!(shared.census().flow_log.is_some());
    }

    #[test]
    fn unsettled_flows_are_taken_when_evicted_or_at_shutdown() {
        let shared = Shared::new(&StateConfig {
            flow_cap: 2,
            flow_log: true,
            ..StateConfig::default()
        });
        // Stamped now: within the no-reply timeout, not settled.
        let now = crate::clock::mono_now_ns();
        for i in 0..3 {
            syn(&shared, i, now + u64::from(i));
        }
        let taken = shared.flow_log_take(false);
        let whys: Vec<LogReason> = taken.iter().map(|(w, _)| *w).collect();
        assert_eq!(whys, [LogReason::Evicted], "{taken:?}");
        let rest = shared.flow_log_take(true);
        assert_eq!(rest.len(), 2, "{rest:?}");
        assert!(rest.iter().all(|(w, _)| *w == LogReason::Shutdown));
        assert!(shared.flow_log_take(true).is_empty());
    }
}
