//! The per-verdict and per-cause counts behind `/metrics`, kept incrementally: a flow is
//! judged again only when it changed, when time alone can change its judgement (the no-reply
//! timeout passing, see [`next_change_ns`]), or when what every judgement reads changed (the
//! node, the drop-reason names, lost records). A scrape then costs what changed since the last
//! tally, not a judgement of every flow.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use tracer_model::{identity::PodRef, Cause, Verdict};

use super::{lock, names::Naming, Shared, VISIT_CHUNK};
use crate::{
    diagnose::{judge, next_change_ns, Context},
    flows::{Flow, FlowId},
};

/// A full re-judgement (after the node, the drop-reason names or the lost records changed)
/// runs at most this often; in between, the counts lag such a change by at most this much.
const FULL_PASS_MIN_GAP: Duration = Duration::from_secs(5);

/// Upper bounds (seconds) of the time-to-diagnosis buckets: the no-reply timeout (default
/// 5 s) and the tally's tick set the low end; slow datastores show over minutes.
pub const DIAGNOSIS_BUCKETS: &[f64] = &[0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0];
/// Upper bounds (seconds) of the first-reply buckets: from a local pod to a far datastore.
pub const REPLY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A Prometheus histogram: cumulative rendering is the exposition's job.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: &'static [f64],
    /// Per bucket (not cumulative), plus the +Inf bucket last.
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What one flow contributes to the counts, as last judged.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    /// Bit i: `Verdict::ALL[i]`.
    verdicts: u16,
    cause: Option<u8>,
    /// Bit i: `Cause::ALL[i]` was counted in `diagnoses_total` for this flow already.
    counted: u16,
    diagnosed_once: bool,
    replied_once: bool,
    /// Handed to the flow log as settled already.
    settled: bool,
    /// Records lost while the flow ran: its evidence may be incomplete.
    incomplete: bool,
}

fn verdict_bit(v: Verdict) -> u16 {
    Verdict::ALL
        .iter()
        .position(|x| *x == v)
        .map_or(0, |i| 1 << i)
}

fn cause_index(c: Cause) -> Option<u8> {
    Cause::ALL.iter().position(|x| *x == c).map(|i| i as u8)
}

/// What the tally reports.
#[derive(Debug, Clone)]
pub struct TallyCounts {
    /// Flows in the table by verdict, in `Verdict::ALL` order.
    pub by_verdict: Vec<u64>,
    /// Flows in the table by diagnosed cause, in `Cause::ALL` order.
    pub by_cause: Vec<u64>,
    /// Flows that reached a diagnosis of each cause, since the agent started (counter).
    pub diagnoses: Vec<u64>,
    /// First packet to first diagnosis, per diagnosed flow (as the tally first saw it).
    pub time_to_diagnosis: Histogram,
    /// First packet to first reply, per answered flow.
    pub first_reply: Histogram,
    /// Full re-judgements so far (the expensive path), for the benchmark and the docs.
    pub full_passes: u64,
    /// `diagnoses` by the pod at either end (identity on): (cause index, namespace, workload
    /// kind, workload name) -> flows. At most [`MAX_WORKLOAD_LABELS`] (namespace, workload)
    /// pairs; later ones count under [`OTHER_WORKLOAD`].
    pub by_workload: BTreeMap<(u8, String, String, String), u64>,
}

/// Distinct (namespace, workload) label pairs `tracer_diagnoses_by_workload_total` carries:
/// label cardinality is causes x this, whatever the cluster's pod churn.
pub const MAX_WORKLOAD_LABELS: usize = 256;
/// The label value of the pairs beyond [`MAX_WORKLOAD_LABELS`].
pub const OTHER_WORKLOAD: &str = "_other";

/// Keyed by flow id, hashed on every judged and evicted flow: SipHash (std's default) is built
/// against HashDoS, and flow ids are the agent's own counter.
type IdMap<V> = HashMap<FlowId, V, foldhash::fast::RandomState>;

pub(crate) struct Tally {
    /// The flow table's version judged up to.
    version: u64,
    /// What every judgement reads, as of the last full pass; None before the first.
    basis: Option<(u64, u64)>,
    last_full: Option<Instant>,
    marks: IdMap<Mark>,
    /// Flows whose judgement time alone changes, and when.
    due: IdMap<u64>,
    evicted_seen: u64,
    counts: TallyCounts,
    /// With a flow log: flows that settled, for it to write (each flow once: `Mark::settled`).
    settled: Option<Vec<FlowId>>,
    /// The (namespace, workload) pairs given their own labels so far.
    workloads: HashSet<(String, String)>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            version: 0,
            basis: None,
            last_full: None,
            marks: IdMap::default(),
            due: IdMap::default(),
            evicted_seen: 0,
            counts: TallyCounts {
                by_verdict: vec![0; Verdict::ALL.len()],
                by_cause: vec![0; Cause::ALL.len()],
                diagnoses: vec![0; Cause::ALL.len()],
                time_to_diagnosis: Histogram::new(DIAGNOSIS_BUCKETS),
                first_reply: Histogram::new(REPLY_BUCKETS),
                full_passes: 0,
                by_workload: BTreeMap::new(),
            },
            settled: None,
            workloads: HashSet::new(),
        }
    }
}

impl Tally {
    /// Lists the flows that settle, for the flow log.
    pub(super) fn with_flow_log() -> Tally {
        Tally {
            settled: Some(Vec::new()),
            ..Tally::default()
        }
    }
}

impl Tally {
    fn add(&mut self, m: Mark, sign: i64) {
        let apply = |n: &mut u64| *n = n.saturating_add_signed(sign);
        for (i, n) in self.counts.by_verdict.iter_mut().enumerate() {
            if m.verdicts & (1 << i) != 0 {
                apply(n);
            }
        }
        if let Some(n) = m
            .cause
            .and_then(|c| self.counts.by_cause.get_mut(c as usize))
        {
            apply(n);
        }
    }

    /// A flow newly diagnosed with cause `c`, under the labels of the pod at its ends.
    fn count_workload(&mut self, c: u8, pod: Option<&PodRef>) {
        let Some(p) = pod else {
            return;
        };
        let (kind, name) = match &p.workload {
            Some(w) => (w.kind.clone(), w.name.clone()),
            // A bare pod is its own workload.
            None => ("Pod".to_string(), p.name.clone()),
        };
        let pair = (p.namespace.clone(), format!("{kind}/{name}"));
        let labelled = self.workloads.contains(&pair)
            || (self.workloads.len() < MAX_WORKLOAD_LABELS && self.workloads.insert(pair));
        let key = if labelled {
            (c, p.namespace.clone(), kind, name)
        } else {
            let other = OTHER_WORKLOAD.to_string();
            (c, other.clone(), other.clone(), other)
        };
        *self.counts.by_workload.entry(key).or_default() += 1;
    }

    fn judge(&mut self, f: &Flow, cx: &Context<'_>, names: &Naming) {
        let j = judge(f, cx);
        let old = self.marks.get(&f.id).copied();
        let mut m = old.unwrap_or_default();
        m.verdicts = j.verdicts.iter().fold(0, |a, v| a | verdict_bit(*v));
        m.cause = j.diagnosis.as_ref().and_then(|d| cause_index(d.cause));
        m.incomplete = j.lost_records > 0;
        if let Some(c) = m.cause {
            if m.counted & (1 << c) == 0 {
                m.counted |= 1 << c;
                self.counts.diagnoses[c as usize] += 1;
                self.count_workload(c, names.pod_of(f));
            }
            if !m.diagnosed_once {
                m.diagnosed_once = true;
                let age = cx.now_ns.saturating_sub(f.first_ns);
                self.counts.time_to_diagnosis.observe(age as f64 / 1e9);
            }
        }
        if let (false, Some(r)) = (m.replied_once, f.first_reply_ns()) {
            m.replied_once = true;
            let rtt = r.saturating_sub(f.first_ns);
            self.counts.first_reply.observe(rtt as f64 / 1e9);
        }
        if let Some(o) = old {
            self.add(o, -1);
        }
        self.add(m, 1);
        let next = next_change_ns(f, cx.rules, cx.evidence_now_ns());
        // Time alone cannot change its verdicts any more: the flow log writes it now.
        if let (None, false, Some(settled)) = (next, m.settled || f.logged, self.settled.as_mut()) {
            m.settled = true;
            settled.push(f.id);
        }
        self.marks.insert(f.id, m);
        match next {
            Some(due) => self.due.insert(f.id, due),
            None => self.due.remove(&f.id),
        };
    }

    /// Whether the marks were judged on `basis` (a full pass may be held back after a change).
    pub(super) fn is_current(&self, basis: (u64, u64)) -> bool {
        self.basis == Some(basis)
    }

    /// Flow `id`'s cause and whether its evidence may be incomplete, as last judged; None for a
    /// flow not judged yet.
    pub(super) fn diagnosis_of(&self, id: FlowId) -> Option<(Option<Cause>, bool)> {
        self.marks.get(&id).map(|m| {
            (
                m.cause
                    .and_then(|c| Cause::ALL.get(usize::from(c)).copied()),
                m.incomplete,
            )
        })
    }

    /// Flows that settled since the last call (with a flow log).
    pub(super) fn take_settled(&mut self) -> Vec<FlowId> {
        self.settled
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn forget(&mut self, id: FlowId) {
        if let Some(m) = self.marks.remove(&id) {
            self.add(m, -1);
        }
        self.due.remove(&id);
    }
}

impl Shared {
    /// What every judgement reads, as a value that changes with it: the node and drop-reason
    /// generation, and the records lost.
    pub(super) fn judgement_basis(&self) -> (u64, u64) {
        (
            self.judgement_gen
                .load(std::sync::atomic::Ordering::Relaxed),
            lock(&self.gaps).total_lost(),
        )
    }

    /// Brings the tally up to date: judges the flows that changed or fell due since the last
    /// call, or every flow when what judgements read changed. Called by the agent's tick and
    /// before each scrape; concurrent calls take turns.
    pub fn tally(&self) {
        let names = self.naming();
        let mut t = lock(&self.tally);
        let basis = self.judgement_basis();
        let (version, changed) = {
            let table = lock(&self.table);
            (table.version(), table.changed_since(t.version))
        };
        let full_due = t.basis != Some(basis)
            && t.last_full
                .is_none_or(|at| at.elapsed() >= FULL_PASS_MIN_GAP);
        match changed {
            Some(ids) if !full_due => {
                let now = self.with_context(|cx, _| cx.evidence_now_ns());
                let mut ids = ids;
                ids.extend(t.due.iter().filter(|(_, d)| **d <= now).map(|(id, _)| *id));
                ids.sort_unstable();
                ids.dedup();
                for chunk in ids.chunks(VISIT_CHUNK) {
                    self.with_context(|cx, table| {
                        for id in chunk {
                            match table.get(*id) {
                                Some(f) => t.judge(f, cx, &names),
                                None => t.forget(*id),
                            }
                        }
                    });
                }
            }
            _ => {
                t.basis = Some(basis);
                t.last_full = Some(Instant::now());
                t.counts.full_passes += 1;
                self.visit_chunked(|cx, f| {
                    t.judge(f, cx, &names);
                    true
                });
            }
        }
        t.version = version;
        // Evicted flows are not in the change list: drop their marks, by the table's list of
        // evictions while it reaches back far enough (a walk of every mark is 100k lookups).
        let table = lock(&self.table);
        let evicted = table.stats().evicted;
        let mut walk = false;
        if evicted != t.evicted_seen {
            match table.evicted_since(t.evicted_seen) {
                Some(ids) => ids.for_each(|id| t.forget(id)),
                None => walk = true,
            }
            t.evicted_seen = evicted;
        }
        if walk || t.marks.len() > table.len() {
            let gone: Vec<FlowId> = t
                .marks
                .keys()
                .filter(|id| table.get(**id).is_none())
                .copied()
                .collect();
            for id in gone {
                t.forget(id);
            }
        }
    }

    /// The tally's counts, brought up to date first.
    pub fn tally_counts(&self) -> TallyCounts {
        self.tally();
        lock(&self.tally).counts.clone()
    }
}

/// FNV-1a: a hasher with no random state, so equal inputs give equal bases across calls.
pub(super) struct FixedHasher(u64);

impl Default for FixedHasher {
    fn default() -> Self {
        FixedHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for FixedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl std::io::Write for FixedHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::hash::Hasher::write(self, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::{Dir, Observation},
        testutil::{obs, tcp},
    };

    #[test]
    fn workload_labels_are_bounded_whatever_the_pod_churn() {
        let mut t = Tally::default();
        let pod = |i: usize, owned: bool| PodRef {
            namespace: format!("ns-{}", (i / 2) % 3),
            name: format!("web-{i}"),
            workload: owned.then(|| tracer_model::identity::Workload {
                kind: "ReplicaSet".into(),
                name: format!("web-{}", i / 2),
            }),
            node: None,
            labels: Default::default(),
        };
        // Two pods per ReplicaSet share a label set; 1,000 bare pods are each their own.
        for i in 0..8 {
            t.count_workload(0, Some(&pod(i, true)));
        }
        t.count_workload(0, None);
        let c = &t.counts.by_workload;
        assert_eq!(c.len(), 4, "{c:?}");
        assert!(c.values().all(|n| *n == 2), "{c:?}");
        assert_eq!(c.values().sum::<u64>(), 8);
        for i in 0..1000 {
            t.count_workload(1, Some(&pod(i, false)));
        }
        let c = &t.counts.by_workload;
        let labelled: HashSet<(&str, &str, &str)> = c
            .keys()
            .map(|(_, ns, kind, name)| (ns.as_str(), kind.as_str(), name.as_str()))
            .filter(|(ns, _, _)| *ns != OTHER_WORKLOAD)
            .collect();
        assert!(labelled.len() <= MAX_WORKLOAD_LABELS, "{}", labelled.len());
        let other = c
            .get(&(
                1,
                OTHER_WORKLOAD.into(),
                OTHER_WORKLOAD.into(),
                OTHER_WORKLOAD.into(),
            ))
            .copied()
            .unwrap_or(0);
        // Every flow is counted once, labelled or not.
        assert_eq!(c.values().sum::<u64>(), 1008);
        assert!(other >= 1000 - MAX_WORKLOAD_LABELS as u64, "{other}");
    }

    fn no_reply(c: &TallyCounts) -> u64 {
        let i = Verdict::ALL.iter().position(|v| *v == Verdict::NoReply);
        i.map_or(0, |i| c.by_verdict[i])
    }

    /// `n` SYNs from `src` to `dst`:443 on ifindex 5, ports and sequence numbers from `first`,
    /// timestamps from `at`.
    fn syns(src: &str, dst: &str, n: u32, first: u16, at: u64) -> Vec<Observation> {
        (0..n)
            .map(|i| {
                let p = tcp(src, first + i as u16, dst, 443, 0x02, at as u32 + i, 0);
                obs(at + u64::from(i), 5, Dir::Ingress, p)
            })
            .collect()
    }

    #[test]
    fn counts_follow_new_and_evicted_flows_without_judging_all_again() {
        // Ten unanswered SYNs long past the timeout fill a table of ten.
        let shared = crate::state::tests::unanswered(10);
        let c = shared.tally_counts();
        assert_eq!(no_reply(&c), 10);
        assert_eq!(c.by_cause.iter().sum::<u64>(), 10, "{c:?}");
        assert_eq!(c.diagnoses.iter().sum::<u64>(), 10, "{c:?}");
        assert_eq!(c.time_to_diagnosis.count(), 10);
        assert_eq!(c.full_passes, 1);
        // Five more evict five: the gauges follow the table, the counter only grows.
        let batch = syns("10.244.1.11", "10.96.9.9", 5, 2000, 5_000);
        shared.ingest(&batch, 0);
        let c = shared.tally_counts();
        assert_eq!(no_reply(&c), 10, "{c:?}");
        assert_eq!(c.by_cause.iter().sum::<u64>(), 10, "{c:?}");
        assert_eq!(c.diagnoses.iter().sum::<u64>(), 15, "{c:?}");
        // A flow judged again with the same diagnosis is not counted twice.
        let again = shared.tally_counts();
        assert_eq!(again.diagnoses, c.diagnoses);
        assert_eq!(
            again.full_passes, 1,
            "only the first tally judged every flow"
        );
    }

    #[test]
    fn diagnoses_from_the_tally_equal_judging_every_flow() {
        // One "now" for both answers: an unanswered flow's `waited_ms` is measured to now, and
        // two calls straddling a millisecond would differ in it alone.
        let now = crate::clock::mono_now_ns();
        crate::clock::FIXED_NOW_NS.with(|n| n.set(Some(now)));
        let shared = crate::state::tests::unanswered(3 * VISIT_CHUNK as u32 + 5);
        // The first call's tally judges every flow; the answer is then read from its marks.
        let fast = shared.diagnoses();
        let passes = shared.tally_counts().full_passes;
        assert_eq!(fast, shared.diagnoses_judging_all());
        assert!(!fast.causes.is_empty(), "{fast:?}");
        // Flows that arrived since the last tally are judged on the spot, and the next answer
        // still equals a full judgement without another full pass.
        let batch = syns("10.244.1.12", "10.96.7.7", 7, 3000, 9_000);
        shared.ingest(&batch, 0);
        let again = shared.diagnoses();
        assert_eq!(again, shared.diagnoses_judging_all());
        assert_eq!(shared.tally_counts().full_passes, passes);
        crate::clock::FIXED_NOW_NS.with(|n| n.set(None));
    }

    #[test]
    fn histogram_buckets_take_values_up_to_their_bound() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 9.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1, 1]);
        assert_eq!((h.count(), h.sum), (4, 12.0));
    }
}
